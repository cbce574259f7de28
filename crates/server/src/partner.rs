//! The partner-facing API: list, describe and run allow-listed queries, and upload the customer
//! list. The partner is always the authenticated principal's; no request field can name another.

use std::sync::Arc;
use std::time::Instant;

use cleanroom_engine::guard::admission::shown;
use cleanroom_engine::guard::{self, AdmittedPartner, Ask, ListUpload};
use cleanroom_engine::ingest::ListIngest;
use cleanroom_proto::v1::partner_service_server::PartnerService;
use cleanroom_proto::v1::{
    CustomerRecord, DescribeQueryRequest, ListQueriesRequest, ListQueriesResponse,
    QueryDescription, QuerySummary, RunQueryRequest, RunQueryResponse, UploadListRequest,
    UploadListResponse, upload_list_request,
};
use tonic::{Request, Response, Status, Streaming};

use crate::Result;
use crate::audit::{Entry, Event};
use crate::context::{Audited, Call};
use crate::convert;
use crate::metrics::{Refused, Table};
use crate::retry::{self, Claim};
use crate::state::App;
use crate::status::to_status;
use crate::stream::{Feed, Part, StreamLimits, feed};

/// Handlers of `cleanroom.v1.PartnerService`.
pub struct PartnerApi {
    app: Arc<App>,
}

impl PartnerApi {
    /// Wraps the shared state.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

impl Audited for RunQueryResponse {
    fn set_audit_id(&mut self, id: String) {
        self.audit_id = id;
    }
}

impl Audited for UploadListResponse {
    fn set_audit_id(&mut self, id: String) {
        self.audit_id = id;
    }
}

/// The caller admitted as a partner under its contract (the guard decides).
fn admitted<'a>(call: &'a Call, app: &App, method: &str) -> Result<AdmittedPartner<'a>> {
    Ok(guard::admit_partner(
        &call.live.rules,
        &app.keys,
        call.partner(method)?,
        call.now,
    )?)
}

impl PartnerApi {
    /// RunQuery: the guard answers or refuses in one call, the audit entry takes what it decided,
    /// and the answer goes back in its wire form.
    async fn run(
        &self,
        call: &Call,
        entry: &mut Entry,
        request: RunQueryRequest,
    ) -> Result<RunQueryResponse> {
        let started = Instant::now();
        let ask = Ask {
            rules: &call.live.rules,
            keys: &self.app.keys,
            allowlist: &call.live.allowlist,
            approvals: &self.app.review,
            store: &self.app.store,
            partner: call.partner("RunQuery")?,
            query_id: &request.query_id,
            params: convert::raw_params(request.params),
            now: call.now,
        };
        let answered = match self.app.guard.answer(ask).await {
            Ok(answered) => answered,
            Err(refused) => {
                entry.record(&refused.facts);
                return Err(refused.error.into());
            }
        };
        entry.record(&answered.facts);
        convert::run_response(&answered, started.elapsed())
    }

    /// ListQueries: the queries the partner's contract lets it see, with their approval words.
    fn list(
        &self,
        mut request: Request<ListQueriesRequest>,
    ) -> std::result::Result<Response<ListQueriesResponse>, Status> {
        let (call, _) = Call::take(&mut request)?;
        let admitted = admitted(&call, &self.app, "ListQueries").map_err(|e| to_status(&e, "-"))?;
        let queries = admitted
            .visible_queries(&call.live.allowlist)
            .into_iter()
            .map(|q| QuerySummary {
                id: q.id.clone(),
                version: q.version,
                title: q.title.clone(),
                approval: self
                    .app
                    .review
                    .approval(q, call.today)
                    .partner_word()
                    .to_string(),
            })
            .collect();
        Ok(Response::new(ListQueriesResponse { queries }))
    }

    /// DescribeQuery: one visible query's parameters, output and effective k.
    fn describe(
        &self,
        mut request: Request<DescribeQueryRequest>,
    ) -> std::result::Result<Response<QueryDescription>, Status> {
        let (call, _) = Call::take(&mut request)?;
        let admitted =
            admitted(&call, &self.app, "DescribeQuery").map_err(|e| to_status(&e, "-"))?;
        let query = admitted
            .visible(&call.live.allowlist, &request.get_ref().query_id)
            .map_err(|e| to_status(&e.into(), "-"))?;
        let rules = &call.live.rules;
        let k = rules.effective_k(admitted.contract(), query.k);
        Ok(Response::new(convert::description(
            query,
            rules,
            admitted.partner(),
            k,
        )))
    }
}

/// The header of a list upload: whose list (a partner's own upload names no one), whether one
/// bad record fails it, and the request id that names it for retries.
pub(crate) struct ListHeader {
    pub partner_id: Option<String>,
    pub strict: bool,
    pub request_id: String,
}

/// Receives a new version of a partner's list, for the partner itself (`own`) or for an analyst
/// acting on its behalf (the header names the partner). The partner is admitted under a contract
/// in force and within its list allowance before any record is read (a retry of an upload
/// committed under the same request id is answered there, with the original version, taking no
/// allowance); records are hashed as they arrive; the guard stores the list as the next version.
/// A list with no valid record is refused.
pub(crate) async fn receive_list<M>(
    app: &App,
    call: &Call,
    entry: &mut Entry,
    own: Option<&str>,
    stream: Streaming<M>,
    split: fn(M) -> Part<ListHeader, CustomerRecord>,
) -> Result<UploadListResponse>
where
    M: prost::Message + Default + Send + 'static,
{
    let rules = &call.live.rules;
    let limits = StreamLimits::of(rules);
    let method = entry.method.clone();
    let mut claim = None;
    let bytes = app.metrics.stream_bytes(&method);
    let (header, fed) = feed(stream, split, limits, bytes, |header: &ListHeader| {
        let partner_id = own.or(header.partner_id.as_deref()).unwrap_or_default();
        entry.partner = Some(shown(partner_id));
        // APPI Art. 30: nothing is received from a partner whose declaration is not current.
        let partner = crate::receiving::declared_partner(rules, partner_id, call.today)?;
        let request_id = retry::parse(&header.request_id)?;
        entry.request_id = request_id.clone();
        let admitted = guard::admit_partner(rules, &app.keys, partner_id, call.now)?;
        let claimed =
            claim.insert(app.claim_write(&method, Some(partner_id), request_id.as_deref())?);
        if let Claim::Replay(_) = claimed {
            return Ok(None);
        }
        app.guard.check_list_allowance(&admitted)?;
        let keys =
            crate::rotation::list_keys(app, admitted.contract_id(), admitted.contract(), call.now)?;
        let ingest = ListIngest::new(partner, keys, header.strict);
        Ok(Some(Feed::new(
            ingest,
            app.store.staging(),
            convert::list_input,
        )?))
    })
    .await?;
    let (_slot, fed) = match (claim, fed) {
        (Some(Claim::Replay(record)), _) => {
            entry.replayed(&record);
            // The first attempt may have committed the list and then failed to write its record
            // of receipt (a full disk): its retry writes it, as the next start would.
            crate::receiving::record_missing_now(app).await?;
            return Ok(convert::upload_response(&record, true));
        }
        (Some(Claim::Run(slot)), Some(fed)) => (slot, fed),
        _ => {
            return Err(crate::Error::Internal(
                "an upload was neither run nor replayed".into(),
            ));
        }
    };
    let report = fed.report;
    entry.records = Some((report.received, report.accepted));
    if report.accepted == 0 {
        return Err(cleanroom_core::Error::Input("the upload has no valid record".into()).into());
    }
    let partner_id = own.or(header.partner_id.as_deref()).unwrap_or_default();
    tracing::info!(partner = %shown(partner_id), principal = %call.principal.name, "list upload received");
    let facts = call.write_facts(
        &method,
        Some(partner_id),
        entry.request_id.as_deref(),
        &report,
    );
    let upload = ListUpload {
        partner: guard::admit_partner(rules, &app.keys, partner_id, call.now)?,
        list: fed.staging,
        facts,
        store: &app.store,
    };
    let (record, _receipt) =
        crate::receiving::store_and_record(app, rules, upload, call.today).await?;
    app.metrics.ingested(Table::PartnerLists, record.accepted);
    entry.committed(&record);
    Ok(convert::upload_response(&record, false))
}

fn split_upload(message: UploadListRequest) -> Part<ListHeader, CustomerRecord> {
    match message.kind {
        Some(upload_list_request::Kind::Header(h)) => Part::Header(ListHeader {
            partner_id: None,
            strict: h.strict,
            request_id: h.request_id,
        }),
        Some(upload_list_request::Kind::Chunk(c)) => Part::Chunk(c.records),
        None => Part::Empty,
    }
}

#[tonic::async_trait]
impl PartnerService for PartnerApi {
    async fn list_queries(
        &self,
        request: Request<ListQueriesRequest>,
    ) -> std::result::Result<Response<ListQueriesResponse>, Status> {
        let answer = self.list(request);
        self.app.counted("ListQueries", answer)
    }

    async fn describe_query(
        &self,
        request: Request<DescribeQueryRequest>,
    ) -> std::result::Result<Response<QueryDescription>, Status> {
        let answer = self.describe(request);
        self.app.counted("DescribeQuery", answer)
    }

    async fn run_query(
        &self,
        mut request: Request<RunQueryRequest>,
    ) -> std::result::Result<Response<RunQueryResponse>, Status> {
        let started = Instant::now();
        let (call, mut entry) = Call::take(&mut request)?;
        let result = self.run(&call, &mut entry, request.into_inner()).await;
        if let Err(e) = &result
            && let Some(reason) = refusal(e)
        {
            self.app.metrics.refused(reason);
        }
        let fresh = match &entry.event {
            Some(Event::Answer(report)) => Some(report.fresh),
            _ => None,
        };
        let answer = self.app.finish(call, entry, result).await;
        if let (Ok(_), Some(fresh)) = (&answer, fresh) {
            self.app.metrics.answered(fresh, started.elapsed());
        }
        answer
    }

    async fn upload_list(
        &self,
        mut request: Request<Streaming<UploadListRequest>>,
    ) -> std::result::Result<Response<UploadListResponse>, Status> {
        let (call, mut entry) = Call::take(&mut request)?;
        let result = match call.partner("UploadList") {
            Ok(own) => {
                let stream = request.into_inner();
                receive_list(
                    &self.app,
                    &call,
                    &mut entry,
                    Some(own),
                    stream,
                    split_upload,
                )
                .await
            }
            Err(e) => Err(e),
        };
        let partner = call.principal.partner.clone();
        let answered = self.app.finish(call, entry, result).await;
        if let (Some(partner), true) = (partner, answered.is_ok()) {
            // After the upload's own record: the version it superseded goes now, unless an
            // answer is being computed over it (then the minute's sweep destroys it).
            let app = std::sync::Arc::clone(&self.app);
            let retire = move || crate::retention::after_upload(&app, &partner);
            if let Err(e) = tokio::task::spawn_blocking(retire).await {
                tracing::error!(error = %e, "list retention after an upload panicked");
            }
        }
        answered
    }
}

/// Why a question was refused, in one fixed word from the error's kind (never its message), or
/// `None` for a failure that is not a refusal (short of memory, an internal error). Within
/// RunQuery, only the partner's ledger refuses with a limit.
fn refusal(error: &crate::Error) -> Option<Refused> {
    use cleanroom_core::Error as Domain;
    use cleanroom_engine::Error as Engine;
    match error {
        crate::Error::Engine(Engine::Guard(_)) => Some(Refused::Plan),
        crate::Error::Engine(Engine::Domain(domain)) => match domain {
            Domain::Limit(_) => Some(Refused::Budget),
            Domain::Precondition(_) => Some(Refused::Precondition),
            Domain::Input(_) => Some(Refused::Parameters),
            Domain::NotFound(_) => Some(Refused::NotVisible),
            Domain::Permission(_) => Some(Refused::Permission),
            Domain::Busy(_) | Domain::Config(_) | Domain::Storage(_) => None,
        },
        _ => None,
    }
}
