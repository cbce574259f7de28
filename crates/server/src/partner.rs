//! The partner-facing API: list, describe and run allow-listed queries, and upload the customer
//! list. The partner is always the authenticated principal's; no request field can name another.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use cleanroom_core::allowlist::{BoundValue, ParamKind, QueryDef, RawValue};
use cleanroom_core::rules::Role;
use cleanroom_engine::guard::{self, AdmittedPartner, Answer, ListUpload, QueryRequest};
use cleanroom_engine::ingest::{self, ListInput};
use cleanroom_proto::v1::partner_service_server::PartnerService;
use cleanroom_proto::v1::{
    CustomerRecord, DescribeQueryRequest, DimensionSpec, ListQueriesRequest, ListQueriesResponse,
    ParameterSpec, Protection, QueryDescription, QuerySummary, RunQueryRequest, RunQueryResponse,
    UploadListRequest, UploadListResponse, param_value, upload_list_request,
};
use tonic::{Request, Response, Status, Streaming};

use crate::Result;
use crate::app::{App, Audited, Live};
use crate::audit::{Entry, Event};
use crate::auth::Principal;
use crate::status::to_status;
use crate::stream::{Part, collect};

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

pub(crate) use cleanroom_engine::guard::admission::shown;

/// The caller as a partner, under one configuration and one "now" for the whole call.
struct PartnerCall {
    principal: Principal,
    partner: String,
    live: Arc<Live>,
    now: DateTime<Utc>,
}

impl PartnerCall {
    /// The partner admitted under its contract (the guard decides).
    fn admitted(&self) -> Result<AdmittedPartner<'_>> {
        Ok(guard::admit_partner(
            &self.live.rules,
            &self.partner,
            self.now,
        )?)
    }
}

impl PartnerApi {
    fn partner_call<T>(
        &self,
        request: &Request<T>,
        method: &str,
        entry: &mut Entry,
    ) -> Result<PartnerCall> {
        let live = self.app.live();
        let principal = self.app.authenticate(&live, request)?;
        entry.principal = principal.name.clone();
        entry.role = principal.role.as_str().to_string();
        entry.partner = principal.partner.clone();
        principal.require(Role::Partner, method)?;
        let partner = principal
            .partner
            .clone()
            .expect("partner principals name a partner");
        let call = PartnerCall {
            principal,
            partner,
            live: Arc::clone(&live),
            now: self.app.clock.now(),
        };
        call.admitted()?;
        Ok(call)
    }

    fn describe(
        &self,
        call: &PartnerCall,
        admitted: &AdmittedPartner<'_>,
        query: &QueryDef,
    ) -> QueryDescription {
        let rules = &call.live.rules;
        let bound_text = |v: &Option<toml::Value>| match v {
            Some(toml::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        };
        QueryDescription {
            id: query.id.clone(),
            version: query.version,
            title: query.title.clone(),
            description: query.description.clone(),
            purposes: query.purposes.clone(),
            contract_clause: query.contract_clause.clone(),
            parameters: query
                .params
                .iter()
                .map(|p| ParameterSpec {
                    name: p.name.clone(),
                    r#type: p.kind.as_str().to_string(),
                    description: p.description.clone(),
                    allowed_values: if p.kind == ParamKind::Enum {
                        query.allowed_values(p, rules, &call.partner)
                    } else {
                        Vec::new()
                    },
                    min: bound_text(&p.min),
                    max: bound_text(&p.max),
                    granularity: p
                        .granularity
                        .map(|g| g.as_str().to_string())
                        .unwrap_or_default(),
                    min_window_days: p.min_window_days.unwrap_or(0),
                })
                .collect(),
            dimensions: query
                .dimensions
                .iter()
                .map(|d| DimensionSpec {
                    name: d.name.clone(),
                    domain: rules.domain(&d.domain, &call.partner).unwrap_or_default(),
                })
                .collect(),
            metrics: query.metrics.clone(),
            effective_k: rules.effective_k(admitted.contract(), query.k),
            content_sha256: query.content_sha256.clone(),
        }
    }

    async fn run(
        &self,
        request: Request<RunQueryRequest>,
        entry: &mut Entry,
    ) -> Result<RunQueryResponse> {
        let started = Instant::now();
        let call = self.partner_call(&request, "RunQuery", entry)?;
        let request = request.into_inner();
        let partner = call.admitted()?;
        let query = partner.visible(&call.live.allowlist, &request.query_id)?;
        entry.query_id = Some(query.id.clone());
        entry.query_sha256 = Some(query.content_sha256.clone());
        let admitted = guard::admit_query(partner, query, &self.app.review)?;
        let rules = &call.live.rules;
        let contract = partner.contract();
        let mut raw = BTreeMap::new();
        for (name, value) in request.params {
            let value = match value.kind {
                Some(param_value::Kind::StringValue(s)) => RawValue::Str(s),
                Some(param_value::Kind::IntValue(i)) => RawValue::Int(i),
                Some(param_value::Kind::DateValue(d)) => RawValue::Date(d),
                None => {
                    // Name the parameter only by its declared spelling: the caller's own text is
                    // never echoed.
                    let message = match query.params.iter().find(|p| p.name == name) {
                        Some(spec) => format!("parameter `{}`: no value", spec.name),
                        None => format!(
                            "query {} got a parameter it does not declare, with no value",
                            query.id
                        ),
                    };
                    return Err(cleanroom_core::Error::Input(message).into());
                }
            };
            raw.insert(name, value);
        }
        let bound = query.bind(&raw, rules, &call.partner)?;
        let snapshot = self.app.store.snapshot();
        entry.consent_snapshot = Some(snapshot.consent_snapshot_id.clone());
        let answer = self
            .app
            .guard
            .run(QueryRequest::new(admitted, &bound, &snapshot))
            .await;
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) => {
                // The parameters the caller sent are typed and checked; record them.
                entry.params = Some(params_json(&bound));
                return Err(e.into());
            }
        };
        let release = &answer.release;
        entry.params = Some(serde_json::json!(release.params));
        entry.list_version = Some(release.list_version);
        entry.rows_released = Some(answer.batch.num_rows() as u64);
        entry.rows_suppressed = Some(release.suppressed_rows);
        entry.out_of_domain_rows = Some(release.audit.out_of_domain_rows);
        entry.event = Some(Event::Answer(answer.report()));
        let (columns, rows) = crate::results::rows(&answer.batch)?;
        Ok(RunQueryResponse {
            query_id: query.id.clone(),
            query_version: query.version,
            columns,
            rows,
            arrow_ipc: release.arrow_ipc.clone(),
            suppressed_rows: release.suppressed_rows,
            effective_k: rules.effective_k(contract, query.k),
            consent_snapshot_id: release.consent_snapshot_id.clone(),
            list_version: release.list_version,
            audit_id: String::new(),
            elapsed_ms: coarse_millis(started.elapsed()),
            effective_params: release.params.clone(),
            protection: Some(protection(&answer)),
        })
    }

    async fn upload(
        &self,
        request: Request<Streaming<UploadListRequest>>,
        entry: &mut Entry,
    ) -> Result<UploadListResponse> {
        let call = self.partner_call(&request, "UploadList", entry)?;
        // Permission, contract and allowance first: no record is read while any would refuse.
        self.app.guard.check_list_allowance(&call.admitted()?)?;
        let split = |m: UploadListRequest| match m.kind {
            Some(upload_list_request::Kind::Header(h)) => Part::Header(h),
            Some(upload_list_request::Kind::Chunk(c)) => Part::Chunk(c.records),
            None => Part::Empty,
        };
        let limit = call.live.rules.privacy.max_upload_records;
        let (header, records) = collect(request.into_inner(), split, limit).await?;
        tracing::info!(partner = %call.partner, principal = %call.principal.name, "list upload received");
        store_list(&self.app, &call.partner, records, header.strict, entry)
    }
}

/// Hashes and stores a new version of a partner's list, for the partner itself or for an analyst
/// acting on its behalf. The contract must be in force; a list with no valid record is refused.
pub(crate) fn store_list(
    app: &App,
    partner_id: &str,
    records: Vec<CustomerRecord>,
    strict: bool,
    entry: &mut Entry,
) -> Result<UploadListResponse> {
    entry.partner = Some(shown(partner_id));
    let live = app.live();
    let partner = live.rules.partners.get(partner_id).ok_or_else(|| {
        cleanroom_core::Error::NotFound(format!("no partner `{}`", shown(partner_id)))
    })?;
    let admitted = guard::admit_partner(&live.rules, partner_id, app.clock.now())?;
    // Checked before any record is hashed; the guard checks again when it stores the list.
    app.guard.check_list_allowance(&admitted)?;
    let contract = admitted.contract();
    let inputs: Vec<ListInput> = records
        .into_iter()
        .map(|r| ListInput {
            email: r.email,
            phone: r.phone,
            email_token: r.email_token,
            phone_token: r.phone_token,
            attribute: r.attribute,
        })
        .collect();
    let key = app
        .secret
        .collaboration_key(admitted.contract_id(), contract.key_version);
    let (batch, report) = ingest::partner_list(&inputs, partner, &key, strict)?;
    drop(inputs);
    entry.records = Some((report.received, report.accepted));
    if report.accepted == 0 {
        return Err(cleanroom_core::Error::Input("the upload has no valid record".into()).into());
    }
    let version = app.guard.store_list(ListUpload {
        partner: admitted,
        tokens: batch,
        store: &app.store,
    })?;
    entry.list_version = Some(version);
    Ok(UploadListResponse {
        list_version: version,
        records_received: report.received,
        records_accepted: report.accepted,
        rejected_by_reason: report.rejected.into_iter().collect(),
        audit_id: String::new(),
    })
}

#[tonic::async_trait]
impl PartnerService for PartnerApi {
    async fn list_queries(
        &self,
        request: Request<ListQueriesRequest>,
    ) -> std::result::Result<Response<ListQueriesResponse>, Status> {
        let mut entry = Entry::default();
        let call = self
            .partner_call(&request, "ListQueries", &mut entry)
            .map_err(|e| to_status(&e, "-"))?;
        let admitted = call.admitted().map_err(|e| to_status(&e, "-"))?;
        let today = admitted.today();
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
                    .approval(q, today)
                    .partner_word()
                    .to_string(),
            })
            .collect();
        Ok(Response::new(ListQueriesResponse { queries }))
    }

    async fn describe_query(
        &self,
        request: Request<DescribeQueryRequest>,
    ) -> std::result::Result<Response<QueryDescription>, Status> {
        let mut entry = Entry::default();
        let call = self
            .partner_call(&request, "DescribeQuery", &mut entry)
            .map_err(|e| to_status(&e, "-"))?;
        let admitted = call.admitted().map_err(|e| to_status(&e, "-"))?;
        let query = admitted
            .visible(&call.live.allowlist, &request.get_ref().query_id)
            .map_err(|e| to_status(&e.into(), "-"))?;
        Ok(Response::new(self.describe(&call, &admitted, query)))
    }

    async fn run_query(
        &self,
        request: Request<RunQueryRequest>,
    ) -> std::result::Result<Response<RunQueryResponse>, Status> {
        let mut entry = Entry {
            method: "RunQuery".into(),
            ..Default::default()
        };
        let result = self.run(request, &mut entry).await;
        self.app.finish(entry, result)
    }

    async fn upload_list(
        &self,
        request: Request<Streaming<UploadListRequest>>,
    ) -> std::result::Result<Response<UploadListResponse>, Status> {
        let mut entry = Entry {
            method: "UploadList".into(),
            ..Default::default()
        };
        let result = self.upload(request, &mut entry).await;
        self.app.finish(entry, result)
    }
}

/// Server time rounded up to a multiple of 250 ms: coarse enough that it says little about the
/// data or about other partners' load.
fn coarse_millis(elapsed: std::time::Duration) -> u64 {
    let millis = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
    millis.div_ceil(250).max(1).saturating_mul(250)
}

/// How an answer was protected and what it cost, as the partner reads it.
fn protection(answer: &Answer) -> Protection {
    let noise = &answer.release.noise;
    let charge = &answer.charge;
    Protection {
        mode: "dp".into(),
        noise_sd: noise.noise_sd.clone(),
        per_member_bound: noise.per_member_bound.clone(),
        release_threshold: noise.release_threshold,
        interval95: noise.interval95.clone(),
        rows_per_member: noise.rows_per_member,
        fresh: charge.fresh,
        rho_spent: charge.rho_spent,
        epsilon_spent: charge.epsilon_spent,
        delta_spent: charge.delta_spent,
        period_epsilon: charge.period_epsilon,
        period_delta: charge.period_delta,
        period_days: charge.period_days,
        answers_per_period: charge.answers_per_period,
        answers_used: charge.answers_used,
        budget_resets_at: charge
            .budget_resets_at
            .map(|t| t.to_rfc3339())
            .unwrap_or_default(),
    }
}

/// Checked parameters as the audit trail keeps them.
fn params_json(params: &BTreeMap<String, BoundValue>) -> serde_json::Value {
    serde_json::Value::Object(
        params
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.to_string())))
            .collect(),
    )
}
