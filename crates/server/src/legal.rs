//! The legal reviewer's API (`cleanroom.v1.LegalService`), which the review page calls too: the
//! allow-list as a reviewer reads it (each query's terms, its partners' guarantees, its state and
//! the diff from the approved version), approvals and rejections bound to the content read, and
//! the audit trail.

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::NaiveDate;
use cleanroom_core::allowlist::{ParamKind, ParamSpec, QueryDef};
use cleanroom_core::rules::{Role, Rules};
use cleanroom_engine::guard::admission::shown;
use cleanroom_proto::v1::legal_service_server::LegalService;
use cleanroom_proto::v1::{
    AllowListReview, ApproveQueryRequest, AuditPage, ConfirmDestructionRequest, DestructionStatus,
    DiffLine, DimensionSpec, DiscloseMemberRequest, ListAllowListRequest, ListAuditRequest,
    ListReceiptsRequest, MemberDisclosure, PartnerAccess, QueryDiff, QueryReview, ReceiptsPage,
    RejectQueryRequest, ReviewDecisionResponse, ReviewMetric, ReviewParameter, Viewer,
};
use tonic::{Request, Response, Status};

use crate::Result;
use crate::audit::{Entry, Event};
use crate::context::{Audited, Call};
use crate::convert::{self, bound_text};
use crate::live::Live;
use crate::review::{Approval, Decision};
use crate::state::{App, blocking};
use crate::status::to_status;

/// Handlers of `cleanroom.v1.LegalService`.
pub struct LegalApi {
    app: Arc<App>,
}

impl Audited for ReviewDecisionResponse {
    fn set_audit_id(&mut self, id: String) {
        self.audit_id = id;
    }
}

impl Audited for AuditPage {
    fn set_audit_id(&mut self, _id: String) {}
}

impl Audited for ReceiptsPage {
    fn set_audit_id(&mut self, _id: String) {}
}

impl Audited for MemberDisclosure {
    fn set_audit_id(&mut self, id: String) {
        self.audit_id = id;
    }
}

/// Refuses a caller who is not a legal reviewer (or, to read, an analyst).
pub(crate) fn reviewer(call: &Call, method: &str, write: bool) -> Result<()> {
    let role = call.principal.role;
    if role == Role::Legal || (!write && role == Role::Analyst) {
        return Ok(());
    }
    let roles = if write {
        "the legal role"
    } else {
        "the legal and analyst roles"
    };
    Err(cleanroom_core::Error::Permission(format!(
        "{method} is for {roles}; the caller is {}",
        role.as_str()
    ))
    .into())
}

/// What a reviewer decides on: a query, the content read, an expiry, a note, and approve or not.
struct Decide {
    query_id: String,
    content_sha256: String,
    expires: Option<String>,
    note: String,
    approved: bool,
}

impl LegalApi {
    /// Wraps the shared state.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }

    /// A query as a reviewer reads it: its terms, its partners' guarantees, its state and the diff
    /// from the approved version.
    fn review_of(&self, live: &Live, query: &QueryDef, today: NaiveDate) -> QueryReview {
        let rules = &live.rules;
        let approval = self.app.review.approval(query, today);
        let approved_sha256 = match &approval {
            Approval::Changed { approved_sha256 } => Some(approved_sha256.clone()),
            _ => None,
        };
        let diff = approved_sha256
            .as_ref()
            .and_then(|sha| self.diff_from_approved(query, sha));
        QueryReview {
            id: query.id.clone(),
            version: query.version,
            title: query.title.clone(),
            title_ja: query.title_ja.clone(),
            description: query.description.trim().to_string(),
            description_ja: query.description_ja.as_ref().map(|d| d.trim().to_string()),
            purposes: query.purposes.clone(),
            contract_clause: query.contract_clause.clone(),
            partners: query
                .partners
                .iter()
                .map(|id| partner_access(rules, query, id))
                .collect(),
            parameters: query
                .params
                .iter()
                .map(|p| review_parameter(rules, query, p))
                .collect(),
            dimensions: review_dimensions(rules, query),
            metrics: review_metrics(query),
            k: query.k,
            sql: query.sql.trim().to_string(),
            content_sha256: query.content_sha256.clone(),
            state: approval.name().to_string(),
            state_detail: approval.sentence(),
            approved_sha256,
            diff,
            history: self
                .app
                .review
                .history(&query.id)
                .iter()
                .map(convert::query_version)
                .collect(),
        }
    }

    /// The diff from the approved version `sha` to `query`, when that version's text is kept and
    /// still parses.
    fn diff_from_approved(&self, query: &QueryDef, sha: &str) -> Option<QueryDiff> {
        let text = self.app.review.text_of(&query.id, sha)?;
        let old = QueryDef::parse(&text).ok()?;
        Some(QueryDiff {
            from_sha256: sha.to_string(),
            to_sha256: query.content_sha256.clone(),
            sql: diff_lines(old.sql.trim(), query.sql.trim()),
            metadata: diff_lines(
                &old.metadata_lines().join("\n"),
                &query.metadata_lines().join("\n"),
            ),
        })
    }

    fn list(&self, call: &Call) -> Result<AllowListReview> {
        reviewer(call, "ListAllowList", false)?;
        let live = &call.live;
        let mut queries: Vec<QueryReview> = live
            .allowlist
            .iter()
            .map(|q| self.review_of(live, q, call.today))
            .collect();
        queries.extend(live.allowlist.invalid().iter().map(|bad| QueryReview {
            id: bad.id.clone(),
            title: bad.id.clone(),
            state: "invalid".into(),
            state_detail: format!("cannot be approved or run: {}", bad.reason),
            ..Default::default()
        }));
        queries.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(AllowListReview {
            generated_at: call.now.to_rfc3339(),
            viewer: Some(Viewer {
                name: call.principal.name.clone(),
                role: call.principal.role.as_str().to_string(),
            }),
            queries,
        })
    }

    /// Approves or rejects the current content of a query, after checking the reviewer read it.
    fn decide(
        &self,
        call: &Call,
        entry: &mut Entry,
        decide: Decide,
    ) -> Result<(ReviewDecisionResponse, Decision)> {
        // Recorded before the caller is checked, so refused attempts name their query too.
        entry.query_id = Some(shown(&decide.query_id));
        reviewer(call, &entry.method, true)?;
        if let Some(bad) = call
            .live
            .allowlist
            .invalid()
            .iter()
            .find(|q| q.id == decide.query_id)
        {
            // Refused before approval, so no approval can stand for a query the guard refuses.
            return Err(cleanroom_core::Error::Precondition(format!(
                "query {} cannot be approved: {}",
                bad.id, bad.reason
            ))
            .into());
        }
        let query = call.live.allowlist.get(&decide.query_id).ok_or_else(|| {
            cleanroom_core::Error::NotFound(format!(
                "no valid query `{}` in the allow-list",
                shown(&decide.query_id)
            ))
        })?;
        entry.query_id = Some(query.id.clone());
        entry.query_sha256 = Some(query.content_sha256.clone());
        if decide.content_sha256 != query.content_sha256 {
            return Err(cleanroom_core::Error::Precondition(format!(
                "query {} changed since it was read: its content is now {}; review it again",
                query.id,
                &query.content_sha256[..12]
            ))
            .into());
        }
        let expires = expiry(decide.expires.as_deref(), call.today)?;
        let note: String = decide.note.trim().chars().take(2000).collect();
        if !decide.approved && note.is_empty() {
            return Err(cleanroom_core::Error::Input("a rejection needs a reason".into()).into());
        }
        entry.event = Some(Event::Decision {
            version: query.version,
            note: note.clone(),
            expires,
        });
        let decision = Decision {
            query_id: query.id.clone(),
            content_sha256: query.content_sha256.clone(),
            approved: decide.approved,
            by: call.principal.name.clone(),
            role: call.principal.role.as_str().to_string(),
            at: call.now,
            expires,
            note,
        };
        Ok((
            ReviewDecisionResponse {
                decision: Some(convert::decision(&decision)),
                audit_id: String::new(),
            },
            decision,
        ))
    }

    async fn finish_decision(
        &self,
        call: Call,
        mut entry: Entry,
        decide: Decide,
    ) -> std::result::Result<Response<ReviewDecisionResponse>, Status> {
        let (result, decision) = match self.decide(&call, &mut entry, decide) {
            Ok((response, decision)) => (Ok(response), Some(decision)),
            Err(e) => (Err(e), None),
        };
        let response = self.app.finish(call, entry, result).await?;
        // Only a decision the audit trail holds takes effect.
        if let Some(decision) = decision {
            self.app.review.add(decision);
        }
        Ok(response)
    }

    async fn audit_page(&self, call: &Call, filter: ListAuditRequest) -> Result<AuditPage> {
        reviewer(call, "ListAudit", false)?;
        let audit = Arc::clone(&self.app.audit);
        let (records, chain_intact) = blocking(move || {
            let records = crate::audit::read(audit.path())?;
            let intact = audit.verify_records(&records).is_ok();
            Ok((records, intact))
        })
        .await?;
        let total = records.len() as u64;
        let partners: BTreeSet<String> = records
            .iter()
            .filter_map(|r| r.entry.partner.clone())
            .collect();
        let queries: BTreeSet<String> = records
            .iter()
            .filter_map(|r| r.entry.query_id.clone())
            .collect();
        let limit = match filter.limit {
            0 => 200,
            n => n.min(5000),
        } as usize;
        let page = records
            .iter()
            .rev()
            .filter(|r| {
                (filter.partner.is_empty() || r.entry.partner.as_deref() == Some(&filter.partner))
                    && (filter.query_id.is_empty()
                        || r.entry.query_id.as_deref() == Some(&filter.query_id))
            })
            .take(limit)
            .map(convert::audit_record)
            .collect();
        Ok(AuditPage {
            records: page,
            partners: partners.into_iter().collect(),
            queries: queries.into_iter().collect(),
            chain_intact,
            total,
        })
    }
}

/// An approval's optional last day: a date, today or later.
fn expiry(text: Option<&str>, today: NaiveDate) -> Result<Option<NaiveDate>> {
    let Some(text) = text.map(str::trim).filter(|e| !e.is_empty()) else {
        return Ok(None);
    };
    let date = NaiveDate::parse_from_str(text, "%Y-%m-%d").map_err(|_| {
        cleanroom_core::Error::Input("expires: expected a date as YYYY-MM-DD".into())
    })?;
    if date < today {
        return Err(cleanroom_core::Error::Input(format!("expires: {date} is in the past")).into());
    }
    Ok(Some(date))
}

#[tonic::async_trait]
impl LegalService for LegalApi {
    async fn list_allow_list(
        &self,
        mut request: Request<ListAllowListRequest>,
    ) -> std::result::Result<Response<AllowListReview>, Status> {
        let answer = Call::take(&mut request).and_then(|(call, _)| {
            self.list(&call)
                .map(Response::new)
                .map_err(|e| to_status(&e, "-"))
        });
        self.app.counted("ListAllowList", answer)
    }

    async fn confirm_destruction(
        &self,
        mut request: Request<ConfirmDestructionRequest>,
    ) -> std::result::Result<Response<DestructionStatus>, Status> {
        let (call, mut entry) = Call::take(&mut request)?;
        let contract = request.into_inner().contract_id;
        let result = match reviewer(&call, "ConfirmDestruction", true) {
            Ok(()) => crate::ending::confirm(&self.app, &call, &mut entry, &contract).await,
            Err(e) => Err(e),
        };
        self.app.finish(call, entry, result).await
    }

    async fn approve_query(
        &self,
        mut request: Request<ApproveQueryRequest>,
    ) -> std::result::Result<Response<ReviewDecisionResponse>, Status> {
        let (call, entry) = Call::take(&mut request)?;
        let r = request.into_inner();
        let decide = Decide {
            query_id: r.query_id,
            content_sha256: r.content_sha256,
            expires: r.expires,
            note: r.note,
            approved: true,
        };
        self.finish_decision(call, entry, decide).await
    }

    async fn reject_query(
        &self,
        mut request: Request<RejectQueryRequest>,
    ) -> std::result::Result<Response<ReviewDecisionResponse>, Status> {
        let (call, entry) = Call::take(&mut request)?;
        let r = request.into_inner();
        let decide = Decide {
            query_id: r.query_id,
            content_sha256: r.content_sha256,
            expires: None,
            note: r.reason,
            approved: false,
        };
        self.finish_decision(call, entry, decide).await
    }

    async fn list_audit(
        &self,
        mut request: Request<ListAuditRequest>,
    ) -> std::result::Result<Response<AuditPage>, Status> {
        // Reading the trail is itself recorded: who looked at which partner's records.
        let (call, mut entry) = Call::take(&mut request)?;
        let filter = request.into_inner();
        // The caller's filters, as safe characters only and bounded: the trail never stores
        // caller text verbatim.
        entry.partner = Some(shown(&filter.partner)).filter(|p| !p.is_empty());
        entry.query_id = Some(shown(&filter.query_id)).filter(|q| !q.is_empty());
        let result = self.audit_page(&call, filter).await;
        self.app.finish(call, entry, result).await
    }

    async fn list_receipts(
        &self,
        mut request: Request<ListReceiptsRequest>,
    ) -> std::result::Result<Response<ReceiptsPage>, Status> {
        // Reading the records is itself recorded, like reading the trail.
        let (call, mut entry) = Call::take(&mut request)?;
        let partner = request.into_inner().partner;
        entry.partner = Some(shown(&partner)).filter(|p| !p.is_empty());
        let app = Arc::clone(&self.app);
        let asked = call.clone();
        let result = blocking(move || crate::disclosure::list(&app, &asked, &partner)).await;
        self.app.finish(call, entry, result).await
    }

    async fn disclose_member(
        &self,
        mut request: Request<DiscloseMemberRequest>,
    ) -> std::result::Result<Response<MemberDisclosure>, Status> {
        let (call, entry) = Call::take(&mut request)?;
        let member_id = request.into_inner().member_id;
        let app = Arc::clone(&self.app);
        let asked = call.clone();
        let unfilled = entry.clone();
        let outcome = blocking(move || {
            let mut entry = entry;
            let result = crate::disclosure::disclose(&app, &asked, &mut entry, &member_id);
            Ok((result, entry))
        })
        .await;
        let (result, entry) = outcome.unwrap_or_else(|e| (Err(e), unfilled));
        self.app.finish(call, entry, result).await
    }
}

/// What partner `id` guarantees and is held to for `query`, as its contract says.
fn partner_access(rules: &Rules, query: &QueryDef, id: &str) -> PartnerAccess {
    let contract = rules.contract_of(id);
    let guarantee = contract.and_then(|(_, c)| c.protection.guarantee().ok());
    let g = guarantee.as_ref();
    PartnerAccess {
        period_epsilon: g.map_or(0.0, |g| g.epsilon),
        period_delta: g.map_or(0.0, |g| g.delta),
        period_days: g.map_or(0, |g| g.period_days),
        answers_per_period: g.map_or(0, |g| g.answers_per_period),
        answer_epsilon: g.map_or(0.0, |g| g.answer_epsilon),
        answer_delta: g.map_or(0.0, |g| g.answer_delta),
        rows_per_member: contract.map_or(0, |(_, c)| {
            query
                .max_rows_per_member
                .min(c.protection.max_rows_per_member)
        }),
        id: id.to_string(),
        name: rules
            .partners
            .get(id)
            .map(|p| p.name.clone())
            .unwrap_or_default(),
        effective_k: contract
            .map(|(_, c)| rules.effective_k(c, query.k))
            .unwrap_or_else(|| rules.privacy.k_floor.max(query.k)),
        on_contract: contract.is_some_and(|(_, c)| c.queries.contains(&query.id)),
    }
}

/// A parameter of `query` as a reviewer reads it, with the values an enum may take.
fn review_parameter(rules: &Rules, query: &QueryDef, p: &ParamSpec) -> ReviewParameter {
    ReviewParameter {
        name: p.name.clone(),
        r#type: p.kind.as_str().to_string(),
        description: p.description.clone(),
        allowed_values: match (p.kind, &p.values, &p.domain) {
            (ParamKind::Enum, Some(values), _) => values.clone(),
            (ParamKind::Enum, None, Some(domain)) => domain_values(rules, domain, &query.partners),
            _ => Vec::new(),
        },
        min: bound_text(&p.min),
        max: bound_text(&p.max),
        granularity: p
            .granularity
            .map(|g| g.as_str().to_string())
            .unwrap_or_default(),
        min_window_days: p.min_window_days,
    }
}

/// The dimensions of `query`, each with the values its partners' domains hold.
fn review_dimensions(rules: &Rules, query: &QueryDef) -> Vec<DimensionSpec> {
    query
        .dimensions
        .iter()
        .map(|d| DimensionSpec {
            name: d.name.clone(),
            domain: domain_values(rules, &d.domain, &query.partners),
        })
        .collect()
}

/// The metrics of `query`, each with its per-member bound (1 unless declared).
fn review_metrics(query: &QueryDef) -> Vec<ReviewMetric> {
    query
        .metrics
        .iter()
        .map(|m| ReviewMetric {
            name: m.clone(),
            per_member_bound: query.metric_bounds.get(m).copied().unwrap_or(1),
        })
        .collect()
}

/// A line diff of two texts.
fn diff_lines(old: &str, new: &str) -> Vec<DiffLine> {
    similar::TextDiff::from_lines(old, new)
        .iter_all_changes()
        .map(|change| DiffLine {
            op: match change.tag() {
                similar::ChangeTag::Equal => "equal",
                similar::ChangeTag::Insert => "insert",
                similar::ChangeTag::Delete => "delete",
            }
            .into(),
            text: change.value().trim_end_matches('\n').to_string(),
        })
        .collect()
}

/// The values a domain holds for the partners of a query. The partner attribute differs by
/// partner: its values are merged.
fn domain_values(rules: &Rules, domain: &str, partners: &[String]) -> Vec<String> {
    let mut values: Vec<String> = Vec::new();
    for partner in partners {
        for value in rules.domain(domain, partner).unwrap_or_default() {
            if !values.contains(&value) {
                values.push(value);
            }
        }
    }
    values
}
