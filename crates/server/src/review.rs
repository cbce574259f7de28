//! Legal review of the allow-list: approvals bound to a query's content hash, every version of
//! every query kept for diffs, and the `LegalService` handlers (which the review page calls too).
//!
//! Decisions live in the hash-chained audit trail and nowhere else: the service rebuilds them from
//! it at start-up, so an approval cannot be forged or edited without breaking the chain. The text
//! of every version the service has seen is archived under `data_dir/allowlist/` so that a
//! reviewer can compare the approved version with a proposed one after the file has changed.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, NaiveDate, Utc};
use cleanroom_core::allowlist::{AllowList, ParamKind, QueryDef};
use cleanroom_core::rules::{Role, Rules};
use cleanroom_proto::v1::legal_service_server::LegalService;
use cleanroom_proto::v1::{
    AllowListReview, ApproveQueryRequest, AuditPage, AuditRecord, DiffLine, DimensionSpec,
    ListAllowListRequest, ListAuditRequest, PartnerAccess, QueryDiff, QueryReview, QueryVersion,
    RejectQueryRequest, ReviewDecision, ReviewDecisionResponse, ReviewMetric, ReviewParameter,
    Viewer,
};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::app::{App, Audited, Live};
use crate::audit::{Entry, Event, Record};
use crate::auth::Principal;
use crate::partner::shown;
use crate::status::to_status;
use crate::{Error, Result};

/// One approval or rejection of one version of a query.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The query.
    pub query_id: String,
    /// The content it covers.
    pub content_sha256: String,
    /// Approved (true) or rejected.
    pub approved: bool,
    /// The reviewer's principal name and role.
    pub by: String,
    /// The reviewer's role.
    pub role: String,
    /// When.
    pub at: DateTime<Utc>,
    /// Last day an approval holds, if it expires.
    pub expires: Option<NaiveDate>,
    /// The reviewer's note, or the rejection's reason.
    pub note: String,
}

/// Where a query's current content stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Approval {
    /// Approved and not expired: it may run.
    Approved(Decision),
    /// Never reviewed, and no earlier version was approved either.
    Pending,
    /// An earlier version was approved; this content was not.
    Changed {
        /// The content hash of the approved version.
        approved_sha256: String,
    },
    /// Approved, but the approval's last day has passed.
    Expired(Decision),
    /// Rejected.
    Rejected(Decision),
}

impl Approval {
    /// The state's short name, as ListAllowList and the page show it.
    pub fn name(&self) -> &'static str {
        match self {
            Approval::Approved(_) => "approved",
            Approval::Pending => "pending",
            Approval::Changed { .. } => "changed",
            Approval::Expired(_) => "expired",
            Approval::Rejected(_) => "rejected",
        }
    }

    /// The state as a partner reads it: one fixed word, never a reviewer's name or note.
    /// A changed query awaits review like a new one; a rejected or expired one is withdrawn.
    pub fn partner_word(&self) -> &'static str {
        match self {
            Approval::Approved(_) => "approved",
            Approval::Pending | Approval::Changed { .. } => "pending",
            Approval::Expired(_) | Approval::Rejected(_) => "withdrawn",
        }
    }

    /// The state in one sentence, for reviewers.
    pub fn sentence(&self) -> String {
        let day = |d: &Decision| d.at.date_naive().to_string();
        match self {
            Approval::Approved(d) => format!(
                "approved by {} on {}{}",
                d.by,
                day(d),
                d.expires
                    .map(|e| format!("; expires after {e}"))
                    .unwrap_or_default()
            ),
            Approval::Pending => "awaiting legal approval".into(),
            Approval::Changed { approved_sha256 } => format!(
                "changed since approval: version {} was approved; this content is not",
                &approved_sha256[..12]
            ),
            Approval::Expired(d) => format!(
                "approval by {} expired after {}",
                d.by,
                d.expires.map(|e| e.to_string()).unwrap_or_default()
            ),
            Approval::Rejected(d) => format!("rejected by {} on {}: {}", d.by, day(d), d.note),
        }
    }
}

/// One archived version of a query.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VersionEntry {
    id: String,
    content_sha256: String,
    version: u32,
    first_seen: String,
    /// The file's text, relative to the archive directory.
    file: String,
}

struct Inner {
    decisions: Vec<Decision>,
    versions: Vec<VersionEntry>,
}

/// Approval decisions and the archive of query versions.
pub struct ReviewState {
    dir: PathBuf,
    inner: Mutex<Inner>,
    /// The torn last index record cut at open, if any.
    torn: Option<cleanroom_core::files::TornTail>,
}

const VERSIONS: &str = "versions.jsonl";

fn storage(e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("allow-list archive: {e}"))
}

impl ReviewState {
    /// Opens the archive in `data_dir/allowlist` and rebuilds the decisions from audit records.
    pub fn open(data_dir: &Path, history: &[Record]) -> Result<Self> {
        let dir = data_dir.join("allowlist");
        std::fs::create_dir_all(&dir).map_err(storage)?;
        let (lines, torn) =
            cleanroom_core::files::read_jsonl(&dir.join(VERSIONS), true).map_err(storage)?;
        let versions = lines
            .iter()
            .map(|l| serde_json::from_str(l).map_err(storage))
            .collect::<Result<Vec<VersionEntry>>>()?;
        let decisions = history.iter().filter_map(decision_of).collect();
        Ok(Self {
            dir,
            inner: Mutex::new(Inner {
                decisions,
                versions,
            }),
            torn,
        })
    }

    /// The torn last index record cut at open, if there was one.
    pub fn recovered(&self) -> Option<cleanroom_core::files::TornTail> {
        self.torn.clone()
    }

    /// Archives every query version not seen before, so it can be compared later.
    pub fn archive(&self, allowlist: &AllowList, now: DateTime<Utc>) -> Result<()> {
        let mut inner = self.inner.lock().expect("review lock poisoned");
        for query in allowlist.iter() {
            let seen = inner
                .versions
                .iter()
                .any(|v| v.id == query.id && v.content_sha256 == query.content_sha256);
            if seen {
                continue;
            }
            let file = format!("{}-{}.toml", shown(&query.id), &query.content_sha256[..16]);
            write_new(&self.dir.join(&file), query.source_text.as_bytes())?;
            let entry = VersionEntry {
                id: query.id.clone(),
                content_sha256: query.content_sha256.clone(),
                version: query.version,
                first_seen: now.to_rfc3339(),
                file,
            };
            let mut line = serde_json::to_vec(&entry).map_err(storage)?;
            line.push(b'\n');
            let mut index = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join(VERSIONS))
                .map_err(storage)?;
            index
                .write_all(&line)
                .and_then(|_| index.sync_data())
                .map_err(storage)?;
            inner.versions.push(entry);
        }
        Ok(())
    }

    /// Where the query's current content stands on `today`.
    pub fn approval(&self, query: &QueryDef, today: NaiveDate) -> Approval {
        let inner = self.inner.lock().expect("review lock poisoned");
        let mut mine = inner.decisions.iter().filter(|d| d.query_id == query.id);
        let latest_here = mine
            .clone()
            .rfind(|d| d.content_sha256 == query.content_sha256);
        match latest_here {
            Some(d) if !d.approved => Approval::Rejected(d.clone()),
            Some(d) if d.expires.is_some_and(|e| today > e) => Approval::Expired(d.clone()),
            Some(d) => Approval::Approved(d.clone()),
            None => match mine.rfind(|d| d.approved) {
                Some(d) => Approval::Changed {
                    approved_sha256: d.content_sha256.clone(),
                },
                None => Approval::Pending,
            },
        }
    }

    fn add(&self, decision: Decision) {
        self.inner
            .lock()
            .expect("review lock poisoned")
            .decisions
            .push(decision);
    }

    /// Archived text of one version.
    fn text_of(&self, id: &str, sha: &str) -> Option<String> {
        let file = {
            let inner = self.inner.lock().expect("review lock poisoned");
            inner
                .versions
                .iter()
                .find(|v| v.id == id && v.content_sha256 == sha)?
                .file
                .clone()
        };
        std::fs::read_to_string(self.dir.join(file)).ok()
    }

    fn history(&self, id: &str) -> Vec<QueryVersion> {
        let inner = self.inner.lock().expect("review lock poisoned");
        let mut versions: Vec<QueryVersion> = inner
            .versions
            .iter()
            .filter(|v| v.id == id)
            .map(|v| QueryVersion {
                content_sha256: v.content_sha256.clone(),
                version: v.version,
                first_seen: v.first_seen.clone(),
                decisions: Vec::new(),
            })
            .collect();
        for d in inner.decisions.iter().filter(|d| d.query_id == id) {
            if !versions
                .iter()
                .any(|v| v.content_sha256 == d.content_sha256)
            {
                // Decided on a version this data directory never archived (an older trail).
                versions.push(QueryVersion {
                    content_sha256: d.content_sha256.clone(),
                    version: 0,
                    first_seen: String::new(),
                    decisions: Vec::new(),
                });
            }
            let version = versions
                .iter_mut()
                .find(|v| v.content_sha256 == d.content_sha256)
                .expect("just ensured");
            version.decisions.push(to_proto(d));
        }
        versions
    }
}

/// Writes a file that must not exist yet, through a temporary name.
fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(storage)?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .map_err(storage)?;
    std::fs::rename(&tmp, path).map_err(storage)
}

/// The guard refuses a query whose current content legal has not approved; the partner reads
/// the state as its fixed word only.
impl cleanroom_engine::guard::Approvals for ReviewState {
    fn refusal(&self, query: &QueryDef, today: NaiveDate) -> Option<String> {
        match self.approval(query, today) {
            Approval::Approved(_) => None,
            state => Some(format!("its approval is {}", state.partner_word())),
        }
    }
}

fn decision_of(record: &Record) -> Option<Decision> {
    let approved = match record.entry.method.as_str() {
        "ApproveQuery" => true,
        "RejectQuery" => false,
        _ => return None,
    };
    if record.entry.outcome != "ok" {
        return None;
    }
    let (expires, note) = match &record.entry.event {
        Some(Event::Decision { expires, note, .. }) => (*expires, note.clone()),
        _ => {
            let details = record.entry.details.clone().unwrap_or_default();
            let expires = details
                .get("expires")
                .and_then(|e| NaiveDate::parse_from_str(e, "%Y-%m-%d").ok());
            (expires, details.get("note").cloned().unwrap_or_default())
        }
    };
    Some(Decision {
        query_id: record.entry.query_id.clone()?,
        content_sha256: record.entry.query_sha256.clone()?,
        approved,
        by: record.entry.principal.clone(),
        role: record.entry.role.clone(),
        at: DateTime::parse_from_rfc3339(&record.at).ok()?.into(),
        expires,
        note,
    })
}

fn to_proto(d: &Decision) -> ReviewDecision {
    ReviewDecision {
        decision: if d.approved { "approved" } else { "rejected" }.into(),
        by: d.by.clone(),
        role: d.role.clone(),
        at: d.at.to_rfc3339(),
        expires: d.expires.map(|e| e.to_string()),
        note: d.note.clone(),
        content_sha256: d.content_sha256.clone(),
    }
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

/// Handlers of `cleanroom.v1.LegalService`.
pub struct LegalApi {
    app: Arc<App>,
}

impl LegalApi {
    /// Wraps the shared state.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }

    /// The caller, who must be a legal reviewer (or, to read, an analyst).
    fn reviewer<T>(
        &self,
        request: &Request<T>,
        live: &Live,
        method: &str,
        write: bool,
        entry: &mut Entry,
    ) -> Result<Principal> {
        let principal = self.app.authenticate(live, request)?;
        entry.principal = principal.name.clone();
        entry.role = principal.role.as_str().to_string();
        let allowed = principal.role == Role::Legal || (!write && principal.role == Role::Analyst);
        if !allowed {
            let roles = if write {
                "the legal role"
            } else {
                "the legal and analyst roles"
            };
            return Err(cleanroom_core::Error::Permission(format!(
                "{method} is for {roles}; the caller is {}",
                principal.role.as_str()
            ))
            .into());
        }
        Ok(principal)
    }

    fn review_of(&self, live: &Live, query: &QueryDef, today: NaiveDate) -> QueryReview {
        let rules = &live.rules;
        let approval = self.app.review.approval(query, today);
        let approved_sha256 = match &approval {
            Approval::Changed { approved_sha256 } => Some(approved_sha256.clone()),
            _ => None,
        };
        let diff = approved_sha256.as_ref().and_then(|sha| {
            let text = self.app.review.text_of(&query.id, sha)?;
            let old = QueryDef::parse(&text).ok()?;
            Some(QueryDiff {
                from_sha256: sha.clone(),
                to_sha256: query.content_sha256.clone(),
                sql: diff_lines(old.sql.trim(), query.sql.trim()),
                metadata: diff_lines(
                    &old.metadata_lines().join("\n"),
                    &query.metadata_lines().join("\n"),
                ),
            })
        });
        let bound_text = |v: &Option<toml::Value>| match v {
            Some(toml::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        };
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
                .map(|id| {
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
                        id: id.clone(),
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
                })
                .collect(),
            parameters: query
                .params
                .iter()
                .map(|p| ReviewParameter {
                    name: p.name.clone(),
                    r#type: p.kind.as_str().to_string(),
                    description: p.description.clone(),
                    allowed_values: match (p.kind, &p.values, &p.domain) {
                        (ParamKind::Enum, Some(values), _) => values.clone(),
                        (ParamKind::Enum, None, Some(domain)) => {
                            domain_values(rules, domain, &query.partners)
                        }
                        _ => Vec::new(),
                    },
                    min: bound_text(&p.min),
                    max: bound_text(&p.max),
                    granularity: p
                        .granularity
                        .map(|g| g.as_str().to_string())
                        .unwrap_or_default(),
                    min_window_days: p.min_window_days,
                })
                .collect(),
            dimensions: query
                .dimensions
                .iter()
                .map(|d| DimensionSpec {
                    name: d.name.clone(),
                    domain: domain_values(rules, &d.domain, &query.partners),
                })
                .collect(),
            metrics: query
                .metrics
                .iter()
                .map(|m| ReviewMetric {
                    name: m.clone(),
                    per_member_bound: query.metric_bounds.get(m).copied().unwrap_or(1),
                })
                .collect(),
            k: query.k,
            sql: query.sql.trim().to_string(),
            content_sha256: query.content_sha256.clone(),
            state: approval.name().to_string(),
            state_detail: approval.sentence(),
            approved_sha256,
            diff,
            history: self.app.review.history(&query.id),
        }
    }

    async fn list(&self, request: Request<ListAllowListRequest>) -> Result<AllowListReview> {
        let live = self.app.live();
        let principal = self.reviewer(
            &request,
            &live,
            "ListAllowList",
            false,
            &mut Entry::default(),
        )?;
        let today = self.app.today();
        let mut queries: Vec<QueryReview> = live
            .allowlist
            .iter()
            .map(|q| self.review_of(&live, q, today))
            .collect();
        queries.extend(live.allowlist.invalid().iter().map(|bad| QueryReview {
            id: bad.id.clone(),
            title: bad.id.clone(),
            state: "invalid".into(),
            state_detail: format!("the file does not load: {}", bad.reason),
            ..Default::default()
        }));
        queries.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(AllowListReview {
            generated_at: self.app.clock.now().to_rfc3339(),
            viewer: Some(Viewer {
                name: principal.name,
                role: principal.role.as_str().to_string(),
            }),
            queries,
        })
    }

    /// Approves or rejects the current content of a query, after checking the reviewer read it.
    fn decide(
        &self,
        request: Request<(String, String, Option<String>, String, bool)>,
        entry: &mut Entry,
    ) -> Result<(ReviewDecisionResponse, Decision)> {
        let live = self.app.live();
        let approved = request.get_ref().4;
        let method = if approved {
            "ApproveQuery"
        } else {
            "RejectQuery"
        };
        // Recorded before the caller is checked, so refused attempts name their query too.
        entry.query_id = Some(shown(&request.get_ref().0));
        let principal = self.reviewer(&request, &live, method, true, entry)?;
        let (query_id, sha, expires, note, _) = request.into_inner();
        let query = live.allowlist.get(&query_id).ok_or_else(|| {
            cleanroom_core::Error::NotFound(format!(
                "no valid query `{}` in the allow-list",
                shown(&query_id)
            ))
        })?;
        entry.query_id = Some(query.id.clone());
        entry.query_sha256 = Some(query.content_sha256.clone());
        if sha != query.content_sha256 {
            return Err(cleanroom_core::Error::Precondition(format!(
                "query {} changed since it was read: its content is now {}; review it again",
                query.id,
                &query.content_sha256[..12]
            ))
            .into());
        }
        let today = self.app.today();
        let expires = match expires.as_deref().map(str::trim).filter(|e| !e.is_empty()) {
            None => None,
            Some(text) => {
                let date = NaiveDate::parse_from_str(text, "%Y-%m-%d").map_err(|_| {
                    cleanroom_core::Error::Input("expires: expected a date as YYYY-MM-DD".into())
                })?;
                if date < today {
                    return Err(cleanroom_core::Error::Input(format!(
                        "expires: {date} is in the past"
                    ))
                    .into());
                }
                Some(date)
            }
        };
        let note: String = note.trim().chars().take(2000).collect();
        if !approved && note.is_empty() {
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
            approved,
            by: principal.name,
            role: principal.role.as_str().to_string(),
            at: self.app.clock.now(),
            expires,
            note,
        };
        Ok((
            ReviewDecisionResponse {
                decision: Some(to_proto(&decision)),
                audit_id: String::new(),
            },
            decision,
        ))
    }

    fn finish_decision(
        &self,
        method: &str,
        request: Request<(String, String, Option<String>, String, bool)>,
    ) -> std::result::Result<Response<ReviewDecisionResponse>, Status> {
        let mut entry = Entry {
            method: method.into(),
            ..Default::default()
        };
        let outcome = self.decide(request, &mut entry);
        let (result, decision) = match outcome {
            Ok((response, decision)) => (Ok(response), Some(decision)),
            Err(e) => (Err(e), None),
        };
        let response = self.app.finish(entry, result)?;
        // Only a decision the audit trail holds takes effect.
        if let Some(decision) = decision {
            self.app.review.add(decision);
        }
        Ok(response)
    }

    fn audit_page(
        &self,
        request: Request<ListAuditRequest>,
        entry: &mut Entry,
    ) -> Result<AuditPage> {
        let live = self.app.live();
        let _caller = self.reviewer(&request, &live, "ListAudit", false, entry)?;
        let filter = request.into_inner();
        let records = crate::audit::read(self.app.audit.path())?;
        let chain_intact = self.app.audit.verify_records(&records).is_ok();
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
            .map(audit_record)
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

fn audit_record(r: &Record) -> AuditRecord {
    let e = &r.entry;
    let params = match &e.params {
        Some(serde_json::Value::Object(map)) => map
            .iter()
            .map(|(k, v)| {
                let text = match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), text)
            })
            .collect(),
        _ => BTreeMap::new(),
    };
    let mut details = match &e.event {
        Some(event) => event.display(),
        None => e.details.clone().unwrap_or_default(),
    };
    if let Some((received, accepted)) = e.records {
        details.insert(
            "records".into(),
            format!("{accepted} of {received} accepted"),
        );
    }
    AuditRecord {
        id: r.id.clone(),
        seq: r.seq,
        at: r.at.clone(),
        principal: e.principal.clone(),
        role: e.role.clone(),
        partner: e.partner.clone(),
        method: e.method.clone(),
        query_id: e.query_id.clone(),
        query_sha256: e.query_sha256.clone(),
        params,
        rows_released: e.rows_released,
        rows_suppressed: e.rows_suppressed,
        consent_snapshot: e.consent_snapshot.clone(),
        list_version: e.list_version,
        outcome: e.outcome.clone(),
        details,
    }
}

impl Audited for ReviewDecisionResponse {
    fn set_audit_id(&mut self, id: String) {
        self.audit_id = id;
    }
}

impl Audited for AuditPage {
    fn set_audit_id(&mut self, _id: String) {}
}

#[tonic::async_trait]
impl LegalService for LegalApi {
    async fn list_allow_list(
        &self,
        request: Request<ListAllowListRequest>,
    ) -> std::result::Result<Response<AllowListReview>, Status> {
        self.list(request)
            .await
            .map(Response::new)
            .map_err(|e| to_status(&e, "-"))
    }

    async fn approve_query(
        &self,
        request: Request<ApproveQueryRequest>,
    ) -> std::result::Result<Response<ReviewDecisionResponse>, Status> {
        let (metadata, extensions, r) = request.into_parts();
        let request = Request::from_parts(
            metadata,
            extensions,
            (r.query_id, r.content_sha256, r.expires, r.note, true),
        );
        self.finish_decision("ApproveQuery", request)
    }

    async fn reject_query(
        &self,
        request: Request<RejectQueryRequest>,
    ) -> std::result::Result<Response<ReviewDecisionResponse>, Status> {
        let (metadata, extensions, r) = request.into_parts();
        let request = Request::from_parts(
            metadata,
            extensions,
            (r.query_id, r.content_sha256, None, r.reason, false),
        );
        self.finish_decision("RejectQuery", request)
    }

    async fn list_audit(
        &self,
        request: Request<ListAuditRequest>,
    ) -> std::result::Result<Response<AuditPage>, Status> {
        // Reading the trail is itself recorded: who looked at which partner's records.
        let mut entry = Entry {
            method: "ListAudit".into(),
            ..Default::default()
        };
        let filter = request.get_ref();
        // The caller's filters, as safe characters only and bounded: the trail never stores
        // caller text verbatim.
        entry.partner = Some(shown(&filter.partner)).filter(|p| !p.is_empty());
        entry.query_id = Some(shown(&filter.query_id)).filter(|q| !q.is_empty());
        let result = self.audit_page(request, &mut entry);
        self.app.finish(entry, result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(sha: &str, approved: bool, expires: Option<&str>) -> Decision {
        Decision {
            query_id: "q".into(),
            content_sha256: sha.into(),
            approved,
            by: "Legal".into(),
            role: "legal".into(),
            at: Utc::now(),
            expires: expires.map(|e| NaiveDate::parse_from_str(e, "%Y-%m-%d").unwrap()),
            note: "n".into(),
        }
    }

    fn query(sha: &str) -> QueryDef {
        let mut q = QueryDef::parse(
            "id = \"q\"\nversion = 1\ntitle = \"t\"\ndescription = \"d\"\npurposes = [\"p\"]\n\
             contract_clause = \"c\"\npartners = []\nk = 10\nsql = \"SELECT 1\"\nmetrics = [\"n\"]\n",
        )
        .unwrap();
        q.content_sha256 = sha.repeat(64 / sha.len());
        q
    }

    #[test]
    fn approval_follows_the_content_hash() {
        let dir = tempfile::tempdir().unwrap();
        let state = ReviewState::open(dir.path(), &[]).unwrap();
        let today = NaiveDate::from_ymd_opt(2026, 11, 1).unwrap();
        let (a, b) = (query("a"), query("b"));
        assert_eq!(state.approval(&a, today), Approval::Pending);
        state.add(decision(&a.content_sha256, true, Some("2026-12-31")));
        assert!(matches!(state.approval(&a, today), Approval::Approved(_)));
        assert!(matches!(
            state.approval(&b, today),
            Approval::Changed { .. }
        ));
        let later = NaiveDate::from_ymd_opt(2027, 1, 1).unwrap();
        assert!(matches!(state.approval(&a, later), Approval::Expired(_)));
        use cleanroom_engine::guard::Approvals;
        assert!(state.refusal(&a, today).is_none());
        assert_eq!(
            state.refusal(&b, today).as_deref(),
            Some("its approval is pending")
        );
        state.add(decision(&b.content_sha256, false, None));
        assert!(matches!(state.approval(&b, today), Approval::Rejected(_)));
    }
}
