//! The retailer analyst's API: streaming ingest of members, purchases and consent events. An ingest
//! becomes visible only when the whole stream has been read and accepted.

use std::sync::Arc;

use cleanroom_core::rules::Role;
use cleanroom_engine::ingest::{self, ConsentInput, MemberInput, PurchaseInput};
use cleanroom_proto::v1::admin_service_server::AdminService;
use cleanroom_proto::v1::{
    IngestConsentRequest, IngestMembersRequest, IngestPartnerListRequest, IngestPurchasesRequest,
    IngestSummary, UploadListResponse, ingest_consent_request, ingest_members_request,
    ingest_partner_list_request, ingest_purchases_request,
};
use tonic::{Request, Response, Status, Streaming};

use crate::Result;
use crate::app::{App, Audited};
use crate::audit::Entry;
use crate::stream::{Part, collect};

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

impl Audited for IngestSummary {
    fn set_audit_id(&mut self, id: String) {
        self.audit_id = id;
    }
}

impl AdminApi {
    /// The caller, who must be an analyst; keep it for the whole call (it holds the call's
    /// place among the principal's calls in flight).
    fn analyst<T>(
        &self,
        request: &Request<T>,
        method: &str,
        entry: &mut Entry,
    ) -> Result<crate::auth::Principal> {
        let principal = self.app.authenticate(&self.app.live(), request)?;
        entry.principal = principal.name.clone();
        entry.role = principal.role.as_str().to_string();
        principal.require(Role::Analyst, method)?;
        Ok(principal)
    }

    fn summary(report: ingest::IngestReport, consent_snapshot_id: String) -> IngestSummary {
        IngestSummary {
            records_received: report.received,
            records_accepted: report.accepted,
            rejected_by_reason: report.rejected.into_iter().collect(),
            consent_snapshot_id,
            audit_id: String::new(),
        }
    }

    fn nothing_valid(report: &ingest::IngestReport) -> Result<()> {
        if report.accepted == 0 {
            return Err(
                cleanroom_core::Error::Input("the ingest has no valid record".into()).into(),
            );
        }
        Ok(())
    }

    async fn members(
        &self,
        request: Request<Streaming<IngestMembersRequest>>,
        entry: &mut Entry,
    ) -> Result<IngestSummary> {
        let _caller = self.analyst(&request, "IngestMembers", entry)?;
        let split = |m: IngestMembersRequest| match m.kind {
            Some(ingest_members_request::Kind::Header(h)) => Part::Header(h),
            Some(ingest_members_request::Kind::Chunk(c)) => Part::Chunk(c.records),
            None => Part::Empty,
        };
        let (header, records) = collect(
            request.into_inner(),
            split,
            self.app.live().rules.privacy.max_upload_records,
        )
        .await?;
        let inputs: Vec<MemberInput> = records
            .into_iter()
            .map(|r| MemberInput {
                member_id: r.member_id,
                email: r.email,
                phone: r.phone,
                prefecture: r.prefecture,
                birth_date: r.birth_date,
                gender: r.gender,
            })
            .collect();
        let tables = ingest::members(
            &inputs,
            &self.app.live().rules,
            &self.app.secret,
            self.app.today(),
            header.strict,
        )?;
        drop(inputs);
        entry.records = Some((tables.report.received, tables.report.accepted));
        Self::nothing_valid(&tables.report)?;
        let report = self.app.store.replace_members(tables)?;
        Ok(Self::summary(report, String::new()))
    }

    async fn purchases(
        &self,
        request: Request<Streaming<IngestPurchasesRequest>>,
        entry: &mut Entry,
    ) -> Result<IngestSummary> {
        let _caller = self.analyst(&request, "IngestPurchases", entry)?;
        let split = |m: IngestPurchasesRequest| match m.kind {
            Some(ingest_purchases_request::Kind::Header(h)) => Part::Header(h),
            Some(ingest_purchases_request::Kind::Chunk(c)) => Part::Chunk(c.records),
            None => Part::Empty,
        };
        let (header, records) = collect(
            request.into_inner(),
            split,
            self.app.live().rules.privacy.max_upload_records,
        )
        .await?;
        let inputs: Vec<PurchaseInput> = records
            .into_iter()
            .map(|r| PurchaseInput {
                member_id: r.member_id,
                purchased_at: r.purchased_at,
                sku: r.sku,
                brand: r.brand,
                manufacturer: r.manufacturer,
                category: r.category,
                quantity: r.quantity,
                amount: r.amount,
            })
            .collect();
        let (batch, report) = ingest::purchases(
            &inputs,
            &self.app.live().rules,
            &self.app.secret,
            header.strict,
        )?;
        entry.records = Some((report.received, report.accepted));
        Self::nothing_valid(&report)?;
        self.app.store.append_purchases(batch)?;
        Ok(Self::summary(report, String::new()))
    }

    async fn consent(
        &self,
        request: Request<Streaming<IngestConsentRequest>>,
        entry: &mut Entry,
    ) -> Result<IngestSummary> {
        let _caller = self.analyst(&request, "IngestConsent", entry)?;
        let split = |m: IngestConsentRequest| match m.kind {
            Some(ingest_consent_request::Kind::Header(h)) => Part::Header(h),
            Some(ingest_consent_request::Kind::Chunk(c)) => Part::Chunk(c.records),
            None => Part::Empty,
        };
        let (header, records) = collect(
            request.into_inner(),
            split,
            self.app.live().rules.privacy.max_upload_records,
        )
        .await?;
        let inputs: Vec<ConsentInput> = records
            .into_iter()
            .map(|r| ConsentInput {
                member_id: r.member_id,
                purpose: r.purpose,
                notice_version: r.notice_version,
                action: r.action,
                at: r.at,
                source: r.source,
                expires_at: r.expires_at,
            })
            .collect();
        let (batch, report) = ingest::consent(
            &inputs,
            &self.app.live().rules,
            &self.app.secret,
            header.strict,
        )?;
        entry.records = Some((report.received, report.accepted));
        Self::nothing_valid(&report)?;
        let snapshot = self.app.store.append_consent(batch)?;
        entry.consent_snapshot = Some(snapshot.clone());
        Ok(Self::summary(report, snapshot))
    }
}

impl AdminApi {
    async fn partner_list(
        &self,
        request: Request<Streaming<IngestPartnerListRequest>>,
        entry: &mut Entry,
    ) -> Result<UploadListResponse> {
        let _caller = self.analyst(&request, "IngestPartnerList", entry)?;
        let split = |m: IngestPartnerListRequest| match m.kind {
            Some(ingest_partner_list_request::Kind::Header(h)) => Part::Header(h),
            Some(ingest_partner_list_request::Kind::Chunk(c)) => Part::Chunk(c.records),
            None => Part::Empty,
        };
        let limit = self.app.live().rules.privacy.max_upload_records;
        let (header, records) = collect(request.into_inner(), split, limit).await?;
        crate::partner::store_list(&self.app, &header.partner_id, records, header.strict, entry)
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn ingest_partner_list(
        &self,
        request: Request<Streaming<IngestPartnerListRequest>>,
    ) -> std::result::Result<Response<UploadListResponse>, Status> {
        let mut entry = Entry {
            method: "IngestPartnerList".into(),
            ..Default::default()
        };
        let result = self.partner_list(request, &mut entry).await;
        self.app.finish(entry, result)
    }

    async fn ingest_members(
        &self,
        request: Request<Streaming<IngestMembersRequest>>,
    ) -> std::result::Result<Response<IngestSummary>, Status> {
        let mut entry = Entry {
            method: "IngestMembers".into(),
            ..Default::default()
        };
        let result = self.members(request, &mut entry).await;
        self.app.finish(entry, result)
    }

    async fn ingest_purchases(
        &self,
        request: Request<Streaming<IngestPurchasesRequest>>,
    ) -> std::result::Result<Response<IngestSummary>, Status> {
        let mut entry = Entry {
            method: "IngestPurchases".into(),
            ..Default::default()
        };
        let result = self.purchases(request, &mut entry).await;
        self.app.finish(entry, result)
    }

    async fn ingest_consent(
        &self,
        request: Request<Streaming<IngestConsentRequest>>,
    ) -> std::result::Result<Response<IngestSummary>, Status> {
        let mut entry = Entry {
            method: "IngestConsent".into(),
            ..Default::default()
        };
        let result = self.consent(request, &mut entry).await;
        self.app.finish(entry, result)
    }
}
