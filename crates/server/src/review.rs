//! The state of legal review: approvals bound to a query's content hash, and every version of
//! every query kept for diffs. Its handlers are `LegalService`'s ([`crate::legal`]).
//!
//! Decisions live in the hash-chained audit trail and nowhere else: the service rebuilds them from
//! it at start-up, so an approval cannot be forged or edited without breaking the chain. The text
//! of every version the service has seen is archived under `data_dir/allowlist/` so that a
//! reviewer can compare the approved version with a proposed one after the file has changed.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, NaiveDate, Utc};
use cleanroom_core::allowlist::{AllowList, QueryDef};
use cleanroom_core::files::{self, AppendLog};
use cleanroom_engine::guard::admission::shown;
use serde::{Deserialize, Serialize};

use crate::audit::{Event, Record};
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

/// The archive's index as start-up found it: read, not yet changed.
pub struct IndexFile {
    path: PathBuf,
    versions: Vec<VersionEntry>,
    torn: Option<files::TornTail>,
}

impl IndexFile {
    /// Its torn last record, which opening cuts.
    pub fn torn(&self) -> Option<&files::TornTail> {
        self.torn.as_ref()
    }
}

struct Inner {
    decisions: Vec<Decision>,
    versions: Vec<VersionEntry>,
}

/// Approval decisions and the archive of query versions.
pub struct ReviewState {
    dir: PathBuf,
    inner: Mutex<Inner>,
    /// `versions.jsonl`, the archive's index: appended whole or cut back.
    index: Mutex<AppendLog>,
    /// The torn last index record cut at open, if any.
    torn: Option<cleanroom_core::files::TornTail>,
}

const VERSIONS: &str = "versions.jsonl";

fn storage(e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("allow-list archive: {e}"))
}

impl ReviewState {
    /// Reads the archive's index of `data_dir` without changing it (a missing one is empty).
    pub fn read_index(data_dir: &Path) -> Result<IndexFile> {
        let path = data_dir.join("allowlist").join(VERSIONS);
        let (lines, torn) = files::read_jsonl(&path, false)?;
        let versions = files::parse_jsonl(&path, &lines)?;
        Ok(IndexFile {
            path,
            versions,
            torn,
        })
    }

    /// Opens the archive in `data_dir/allowlist` from its index as read (a torn last record is
    /// cut) and rebuilds the decisions from audit records.
    pub fn open(data_dir: &Path, index: IndexFile, history: &[Record]) -> Result<Self> {
        let dir = data_dir.join("allowlist");
        std::fs::create_dir_all(&dir).map_err(storage)?;
        if let Some(torn) = &index.torn {
            files::cut_torn_tail(torn)?;
        }
        let log = AppendLog::open(&index.path, index.versions.len() as u64)?;
        let decisions = history.iter().filter_map(decision_of).collect();
        Ok(Self {
            dir,
            inner: Mutex::new(Inner {
                decisions,
                versions: index.versions,
            }),
            index: Mutex::new(log),
            torn: index.torn,
        })
    }

    /// The torn last index record cut at open, if there was one.
    pub fn recovered(&self) -> Option<cleanroom_core::files::TornTail> {
        self.torn.clone()
    }

    /// Archives every query version not seen before, so it can be compared later.
    pub fn archive(&self, allowlist: &AllowList, now: DateTime<Utc>) -> Result<()> {
        // Decided under the lock, written and synced outside it: approvals are read on every
        // query and never wait for the disk. Only the reload watcher (and start-up) archives.
        let unseen: Vec<&QueryDef> = {
            let inner = self.inner.lock().expect("review lock poisoned");
            allowlist
                .iter()
                .filter(|q| {
                    !inner
                        .versions
                        .iter()
                        .any(|v| v.id == q.id && v.content_sha256 == q.content_sha256)
                })
                .collect()
        };
        for query in unseen {
            let file = format!("{}-{}.toml", shown(&query.id), &query.content_sha256[..16]);
            files::write_atomic(&self.dir.join(&file), query.source_text.as_bytes())?;
            let entry = VersionEntry {
                id: query.id.clone(),
                content_sha256: query.content_sha256.clone(),
                version: query.version,
                first_seen: now.to_rfc3339(),
                file,
            };
            let line = serde_json::to_vec(&entry).map_err(storage)?;
            self.index
                .lock()
                .expect("review lock poisoned")
                .append(&line)?;
            self.inner
                .lock()
                .expect("review lock poisoned")
                .versions
                .push(entry);
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

    /// Takes a decision into effect (once the audit trail holds it).
    pub(crate) fn add(&self, decision: Decision) {
        self.inner
            .lock()
            .expect("review lock poisoned")
            .decisions
            .push(decision);
    }

    /// Archived text of one version.
    pub(crate) fn text_of(&self, id: &str, sha: &str) -> Option<String> {
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

    /// Every version of a query seen, with the decisions on each, oldest first.
    pub(crate) fn history(&self, id: &str) -> Vec<VersionHistory> {
        let inner = self.inner.lock().expect("review lock poisoned");
        let mut versions: Vec<VersionHistory> = inner
            .versions
            .iter()
            .filter(|v| v.id == id)
            .map(|v| VersionHistory {
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
                versions.push(VersionHistory {
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
            version.decisions.push(d.clone());
        }
        versions
    }
}

/// One version of a query and the decisions on it.
#[derive(Debug, Clone)]
pub struct VersionHistory {
    /// The version's content hash.
    pub content_sha256: String,
    /// Its version number (0 when the archive never held it).
    pub version: u32,
    /// When the service first saw it (RFC 3339), if it did.
    pub first_seen: String,
    /// The decisions on it, oldest first.
    pub decisions: Vec<Decision>,
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
        let index = ReviewState::read_index(dir.path()).unwrap();
        let state = ReviewState::open(dir.path(), index, &[]).unwrap();
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
