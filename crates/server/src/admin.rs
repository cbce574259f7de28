//! The retailer analyst's API: streaming ingest of members, purchases and consent events, and of
//! a partner's list on its behalf. Records are checked and hashed as they arrive; an ingest
//! becomes visible only when the whole stream has been read and accepted.

use std::sync::Arc;

use cleanroom_core::rules::Role;
use cleanroom_engine::ingest::{ConsentIngest, Ingest, MembersIngest, PurchasesIngest, TokensOnly};
use cleanroom_engine::store::{CommitRecord, Staging, Store, WriteFacts};
use cleanroom_proto::v1::admin_service_server::AdminService;
use cleanroom_proto::v1::{
    CustomerRecord, DestructionStatus, EraseMembersRequest, ErasureSummary, IngestConsentRequest,
    IngestHeader, IngestMembersRequest, IngestPartnerListRequest, IngestPurchasesRequest,
    IngestSummary, RequestDestructionRequest, UploadListResponse, ingest_consent_request,
    ingest_members_request, ingest_partner_list_request, ingest_purchases_request,
};
use tonic::{Request, Response, Status, Streaming};

use crate::Result;
use crate::audit::Entry;
use crate::context::{Audited, Call};
use crate::convert;
use crate::ending;
use crate::limit::CallSlot;
use crate::metrics::Table;
use crate::partner::{ListHeader, receive_list};
use crate::retry::{self, Claim};
use crate::state::App;
use crate::stream::{Fed, Feed, Part, StreamLimits, feed};

/// Handlers of `cleanroom.v1.AdminService`.
pub struct AdminApi {
    app: Arc<App>,
}

impl AdminApi {
    /// Wraps the shared state.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

impl Audited for ErasureSummary {
    fn set_audit_id(&mut self, id: String) {
        self.audit_id = id;
    }
}

impl Audited for IngestSummary {
    fn set_audit_id(&mut self, id: String) {
        self.audit_id = id;
    }
}

/// What an ingest stream became.
enum Written {
    /// Its tables, staged and synced, to commit while holding its request id's place.
    Fed(Fed, Option<CallSlot>),
    /// A retry of an ingest committed before under its request id: the original's record.
    Replayed(CommitRecord),
}

/// Reads an analyst's ingest stream into staged tables: the analyst role is checked before the
/// stream is read; a header whose request id names a committed ingest ends the stream there (a
/// retry); otherwise `start` makes the ingest from the header.
async fn ingest<M, R, I>(
    call: &Call,
    entry: &mut Entry,
    app: &App,
    stream: Streaming<M>,
    split: fn(M) -> Part<IngestHeader, R>,
    convert: fn(R) -> I::Input,
    start: impl FnOnce(&IngestHeader) -> crate::Result<I>,
) -> Result<Written>
where
    M: prost::Message + Default + Send + 'static,
    R: Send + 'static,
    I: Ingest + 'static,
{
    call.require(Role::Analyst, &entry.method)?;
    let limits = StreamLimits::for_ingest(&call.live.rules);
    let method = entry.method.clone();
    let mut claim = None;
    let bytes = app.metrics.stream_bytes(&method);
    let (_, fed) = feed(stream, split, limits, bytes, |header| {
        let request_id = retry::parse(&header.request_id)?;
        entry.request_id = request_id.clone();
        let claimed = claim.insert(app.claim_write(&method, None, request_id.as_deref())?);
        Ok(match claimed {
            Claim::Replay(_) => None,
            Claim::Run(_) => Some(Feed::new(start(header)?, app.store.staging(), convert)?),
        })
    })
    .await?;
    let (slot, fed) = match (claim, fed) {
        (Some(Claim::Replay(record)), _) => return Ok(Written::Replayed(*record)),
        (Some(Claim::Run(slot)), Some(fed)) => (slot, fed),
        _ => {
            return Err(crate::Error::Internal(
                "an ingest was neither run nor replayed".into(),
            ));
        }
    };
    entry.records = Some((fed.report.received, fed.report.accepted));
    if fed.report.accepted == 0 {
        return Err(cleanroom_core::Error::Input("the ingest has no valid record".into()).into());
    }
    Ok(Written::Fed(fed, slot))
}

/// Refuses `tokens_only` on an ingest that is not of members.
fn members_only(header: &IngestHeader) -> crate::Result<()> {
    if header.tokens_only {
        return Err(cleanroom_core::Error::Input(
            "tokens_only is for a members ingest; this ingest is not one".into(),
        )
        .into());
    }
    Ok(())
}

fn split_members(m: IngestMembersRequest) -> Part<IngestHeader, cleanroom_proto::v1::MemberRecord> {
    match m.kind {
        Some(ingest_members_request::Kind::Header(h)) => Part::Header(h),
        Some(ingest_members_request::Kind::Chunk(c)) => Part::Chunk(c.records),
        None => Part::Empty,
    }
}

fn split_purchases(
    m: IngestPurchasesRequest,
) -> Part<IngestHeader, cleanroom_proto::v1::PurchaseRecord> {
    match m.kind {
        Some(ingest_purchases_request::Kind::Header(h)) => Part::Header(h),
        Some(ingest_purchases_request::Kind::Chunk(c)) => match (c.arrow_ipc, c.records) {
            (ipc, records) if ipc.is_empty() => Part::Chunk(records),
            (ipc, records) if records.is_empty() => Part::Arrow(ipc),
            _ => Part::Invalid("a chunk carries records or Arrow IPC, not both"),
        },
        None => Part::Empty,
    }
}

fn split_consent(
    m: IngestConsentRequest,
) -> Part<IngestHeader, cleanroom_proto::v1::ConsentRecord> {
    match m.kind {
        Some(ingest_consent_request::Kind::Header(h)) => Part::Header(h),
        Some(ingest_consent_request::Kind::Chunk(c)) => Part::Chunk(c.records),
        None => Part::Empty,
    }
}

fn split_partner_list(m: IngestPartnerListRequest) -> Part<ListHeader, CustomerRecord> {
    match m.kind {
        Some(ingest_partner_list_request::Kind::Header(h)) => Part::Header(ListHeader {
            partner_id: Some(h.partner_id),
            strict: h.strict,
            request_id: h.request_id,
        }),
        Some(ingest_partner_list_request::Kind::Chunk(c)) => Part::Chunk(c.records),
        None => Part::Empty,
    }
}

impl AdminApi {
    async fn members(
        &self,
        call: &Call,
        entry: &mut Entry,
        stream: Streaming<IngestMembersRequest>,
    ) -> Result<IngestSummary> {
        let (rules, secret, keys) = (&call.live.rules, &self.app.secret, &self.app.keys);
        // A tokens-only ingest commits against the member table it checked its export with.
        let mut tokens_only: Option<String> = None;
        let written = ingest(
            call,
            entry,
            &self.app,
            stream,
            split_members,
            convert::member_input,
            |h| {
                if !h.tokens_only {
                    return Ok(MembersIngest::new(rules, secret, keys, call.now, h.strict)?);
                }
                let only = TokensOnly::of(&self.app.store.snapshot(), rules)?;
                tokens_only = Some(only.members_version.clone());
                let now = call.now;
                Ok(MembersIngest::tokens_only(
                    rules, secret, keys, now, h.strict, only,
                )?)
            },
        )
        .await?;
        self.commit(
            call,
            entry,
            written,
            Table::Members,
            |store, staging, facts| match &tokens_only {
                Some(members) => store.commit_member_tokens(staging, facts, members),
                None => store.commit_members(staging, facts),
            },
        )
    }

    async fn purchases(
        &self,
        call: &Call,
        entry: &mut Entry,
        stream: Streaming<IngestPurchasesRequest>,
    ) -> Result<IngestSummary> {
        let (rules, secret) = (&call.live.rules, &self.app.secret);
        let written = ingest(
            call,
            entry,
            &self.app,
            stream,
            split_purchases,
            convert::purchase_input,
            |h| {
                members_only(h)?;
                Ok(PurchasesIngest::new(rules, secret, h.strict))
            },
        )
        .await?;
        self.commit(
            call,
            entry,
            written,
            Table::Purchases,
            |store, staging, facts| store.commit_purchases(staging, facts),
        )
    }

    async fn consent(
        &self,
        call: &Call,
        entry: &mut Entry,
        stream: Streaming<IngestConsentRequest>,
    ) -> Result<IngestSummary> {
        let (rules, secret) = (&call.live.rules, &self.app.secret);
        // The erasure tombstones the events are checked against; the commit checks no erasure
        // came since.
        let erasures = self.app.store.snapshot().erasures.clone();
        let written =
            ingest(
                call,
                entry,
                &self.app,
                stream,
                split_consent,
                convert::consent_input,
                |h| {
                    members_only(h)?;
                    Ok(ConsentIngest::new(rules, secret, h.strict)
                        .after_erasures(erasures.as_ref())?)
                },
            )
            .await?;
        self.commit(
            call,
            entry,
            written,
            Table::Consent,
            |store, staging, facts| store.commit_consent(staging, facts, erasures.as_ref()),
        )
    }

    /// Commits what an ingest stream staged (its request id's place held until the call ends),
    /// or answers a retry with the original commit's result.
    fn commit(
        &self,
        call: &Call,
        entry: &mut Entry,
        written: Written,
        table: Table,
        commit: impl FnOnce(&Store, Staging, WriteFacts) -> cleanroom_engine::Result<CommitRecord>,
    ) -> Result<IngestSummary> {
        let record = match written {
            Written::Replayed(record) => {
                entry.replayed(&record);
                return Ok(convert::ingest_summary(&record, true));
            }
            Written::Fed(fed, _slot) => {
                let facts = call.write_facts(
                    &entry.method,
                    None,
                    entry.request_id.as_deref(),
                    &fed.report,
                );
                let record = commit(&self.app.store, fed.staging, facts)?;
                self.app.metrics.ingested(table, record.accepted);
                record
            }
        };
        entry.committed(&record);
        Ok(convert::ingest_summary(&record, false))
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn ingest_partner_list(
        &self,
        mut request: Request<Streaming<IngestPartnerListRequest>>,
    ) -> std::result::Result<Response<UploadListResponse>, Status> {
        let (call, mut entry) = Call::take(&mut request)?;
        let result = match call.require(Role::Analyst, "IngestPartnerList") {
            Ok(()) => {
                let stream = request.into_inner();
                receive_list(
                    &self.app,
                    &call,
                    &mut entry,
                    None,
                    stream,
                    split_partner_list,
                )
                .await
            }
            Err(e) => Err(e),
        };
        self.app.finish(call, entry, result).await
    }

    async fn ingest_members(
        &self,
        mut request: Request<Streaming<IngestMembersRequest>>,
    ) -> std::result::Result<Response<IngestSummary>, Status> {
        let (call, mut entry) = Call::take(&mut request)?;
        let result = self.members(&call, &mut entry, request.into_inner()).await;
        self.app.finish(call, entry, result).await
    }

    async fn ingest_purchases(
        &self,
        mut request: Request<Streaming<IngestPurchasesRequest>>,
    ) -> std::result::Result<Response<IngestSummary>, Status> {
        let (call, mut entry) = Call::take(&mut request)?;
        let result = self
            .purchases(&call, &mut entry, request.into_inner())
            .await;
        self.app.finish(call, entry, result).await
    }

    async fn request_destruction(
        &self,
        mut request: Request<RequestDestructionRequest>,
    ) -> std::result::Result<Response<DestructionStatus>, Status> {
        let (call, mut entry) = Call::take(&mut request)?;
        let r = request.into_inner();
        let (result, pending) =
            match ending::request(&self.app, &call, &mut entry, &r.contract_id, &r.reason) {
                Ok((status, pending)) => (Ok(status), Some(pending)),
                Err(e) => (Err(e), None),
            };
        let response = self.app.finish(call, entry, result).await?;
        // Only a request the audit trail holds waits for legal.
        if let Some(pending) = pending {
            ending::asked(&self.app, &r.contract_id, pending);
        }
        Ok(response)
    }

    async fn erase_members(
        &self,
        mut request: Request<EraseMembersRequest>,
    ) -> std::result::Result<Response<ErasureSummary>, Status> {
        let (call, mut entry) = Call::take(&mut request)?;
        let asked = request.into_inner();
        let result = crate::erasure::erase(&self.app, &call, &mut entry, &asked).await;
        drop(asked);
        self.app.finish(call, entry, result).await
    }

    async fn ingest_consent(
        &self,
        mut request: Request<Streaming<IngestConsentRequest>>,
    ) -> std::result::Result<Response<IngestSummary>, Status> {
        let (call, mut entry) = Call::take(&mut request)?;
        let result = self.consent(&call, &mut entry, request.into_inner()).await;
        self.app.finish(call, entry, result).await
    }
}
