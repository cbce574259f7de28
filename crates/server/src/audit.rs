//! The audit trail: one JSON record per call that reads or changes data, appended to a file as a
//! hash chain. Each record carries the SHA-256 of the previous one, so a reviewer can verify with
//! [`verify`] that nothing was removed, reordered or edited.
//!
//! Records hold query ids, parameters, counts and outcomes. They never hold an identifier: the
//! requests that carry identifiers (uploads, ingests) are recorded by their counts only.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::NaiveDate;
use cleanroom_core::files::{TornTail, read_jsonl};
use cleanroom_engine::guard::GuardReport;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// What one call did. Filled by the handler; the trail adds the chain fields.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// Principal name, or `unauthenticated`.
    pub principal: String,
    /// `partner`, `analyst`, `legal` or empty.
    pub role: String,
    /// The partner concerned, if any.
    pub partner: Option<String>,
    /// The RPC method.
    pub method: String,
    /// Query id, for query calls.
    pub query_id: Option<String>,
    /// SHA-256 of the query's content, for query calls.
    pub query_sha256: Option<String>,
    /// Checked parameters, for query calls.
    pub params: Option<serde_json::Value>,
    /// Rows released.
    pub rows_released: Option<u64>,
    /// Cells of the output domain withheld.
    pub rows_suppressed: Option<u64>,
    /// Result rows dropped because a dimension value fell outside its declared domain.
    pub out_of_domain_rows: Option<u64>,
    /// Consent snapshot the call used or produced.
    pub consent_snapshot: Option<String>,
    /// Partner list version the call used or produced.
    pub list_version: Option<u32>,
    /// Records received and accepted, for ingest calls.
    pub records: Option<(u64, u64)>,
    /// `ok`, or the status code and message of the refusal.
    pub outcome: String,
    /// What the call decided, typed: an answer's guard report, a reviewer's decision, a
    /// configuration change. Left out of records that have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<Event>,
    /// The free-form details of records written before events were typed: read so that older
    /// trails verify unchanged, never written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<BTreeMap<String, String>>,
}

/// A call's decision, as typed facts: one variant per kind of decision.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// An answer: what the guard enforced (k, list version, cell fates) and what it cost.
    Answer(GuardReport),
    /// A reviewer's decision on one version of a query.
    Decision {
        /// The query version decided on.
        version: u32,
        /// The reviewer's note (bounded).
        note: String,
        /// The last day an approval holds, if it expires.
        expires: Option<NaiveDate>,
    },
    /// A torn last record (a write cut by a crash or a full disk) found at start-up and dropped.
    Recovered {
        /// The file, relative to the data directory.
        file: String,
        /// Bytes of the incomplete record dropped.
        dropped_bytes: u64,
    },
    /// A configuration change that took effect.
    ConfigChange {
        /// The rules' digest before and after, when they changed.
        rules: Option<String>,
        /// Queries added, changed or removed.
        queries: Vec<String>,
        /// Query files that failed validation in the new configuration.
        invalid_queries: Vec<String>,
    },
}

impl Event {
    /// The event as a reviewer reads it, one labelled value per fact.
    pub fn display(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        match self {
            Event::Answer(r) => {
                for (label, value) in [
                    ("fresh", r.fresh.to_string()),
                    ("k", r.k.to_string()),
                    ("list_version", r.list_version.to_string()),
                    ("rho_spent", r.rho_spent.to_string()),
                    ("epsilon_spent", r.epsilon_spent.to_string()),
                    ("delta_spent", r.delta_spent.to_string()),
                    ("release_threshold", r.release_threshold.to_string()),
                    ("rows_per_member", r.rows_per_member.to_string()),
                    ("cells_released", r.cells.released.to_string()),
                    ("cells_below_k", r.cells.below_k.to_string()),
                    ("cells_below_threshold", r.cells.below_threshold.to_string()),
                    ("members_capped", r.cells.members_capped.to_string()),
                ] {
                    out.insert(label.to_string(), value);
                }
            }
            Event::Decision {
                version,
                note,
                expires,
            } => {
                out.insert("version".into(), version.to_string());
                out.insert("note".into(), note.clone());
                if let Some(e) = expires {
                    out.insert("expires".into(), e.to_string());
                }
            }
            Event::Recovered {
                file,
                dropped_bytes,
            } => {
                out.insert("file".into(), file.clone());
                out.insert("dropped_bytes".into(), dropped_bytes.to_string());
            }
            Event::ConfigChange {
                rules,
                queries,
                invalid_queries,
            } => {
                if let Some(r) = rules {
                    out.insert("rules".into(), r.clone());
                }
                if !queries.is_empty() {
                    out.insert("queries".into(), queries.join(", "));
                }
                if !invalid_queries.is_empty() {
                    out.insert("invalid_queries".into(), invalid_queries.join(", "));
                }
            }
        }
        out
    }
}

/// One stored record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// Position in the chain, from 1.
    pub seq: u64,
    /// `a-<seq>`, the id callers are given.
    pub id: String,
    /// When it was written (RFC 3339).
    pub at: String,
    /// The call.
    #[serde(flatten)]
    pub entry: Entry,
    /// Hash of the previous record (64 zeros for the first).
    pub prev: String,
    /// SHA-256 over `prev` and this record's content without `hash`.
    pub hash: String,
}

struct Tail {
    seq: u64,
    hash: String,
    file: File,
}

/// The append-only trail.
pub struct AuditTrail {
    path: PathBuf,
    tail: Mutex<Tail>,
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn chain_hash(record: &Record) -> Result<String> {
    let mut unhashed = record.clone();
    unhashed.hash = String::new();
    let body = serde_json::to_vec(&unhashed).map_err(|e| Error::Internal(format!("audit: {e}")))?;
    let mut hasher = Sha256::new();
    hasher.update(record.prev.as_bytes());
    hasher.update(&body);
    Ok(hex::encode(hasher.finalize()))
}

impl AuditTrail {
    /// Opens the trail, verifying the existing chain first: a service must not extend a trail that
    /// has been tampered with.
    /// Also returns the records already in it, read once, for callers that rebuild state from them,
    /// and the torn last record a crash left, if any: it is cut from the file (never a permanent
    /// outage) and the caller records that it was.
    pub fn open(path: &Path) -> Result<(Self, Vec<Record>, Option<TornTail>)> {
        let (lines, torn) = read_jsonl(path, true)?;
        let history = parse_records(&lines)?;
        let (seq, hash) = verify_records(&history)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::Internal(format!("audit trail: {e}")))?;
        let trail = Self {
            path: path.to_path_buf(),
            tail: Mutex::new(Tail { seq, hash, file }),
        };
        Ok((trail, history, torn))
    }

    /// Where the trail is kept.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record, synced to disk, and returns its id.
    pub fn append(&self, entry: Entry, at: chrono::DateTime<chrono::Utc>) -> Result<String> {
        let mut tail = self.tail.lock().expect("audit lock poisoned");
        let seq = tail.seq + 1;
        let mut record = Record {
            seq,
            id: format!("a-{seq:08}"),
            at: at.to_rfc3339(),
            entry,
            prev: tail.hash.clone(),
            hash: String::new(),
        };
        record.hash = chain_hash(&record)?;
        let mut line =
            serde_json::to_vec(&record).map_err(|e| Error::Internal(format!("audit: {e}")))?;
        line.push(b'\n');
        tail.file
            .write_all(&line)
            .and_then(|_| tail.file.sync_data())
            .map_err(|e| Error::Internal(format!("audit trail write: {e}")))?;
        tail.seq = seq;
        tail.hash = record.hash;
        Ok(record.id)
    }
}

/// Reads every complete record of a trail (a torn last record, if a crash left one, is not a
/// record).
pub fn read(path: &Path) -> Result<Vec<Record>> {
    parse_records(&read_jsonl(path, false)?.0)
}

fn parse_records(lines: &[String]) -> Result<Vec<Record>> {
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line)
                .map_err(|e| Error::Internal(format!("audit record {}: {e}", i + 1)))
        })
        .collect()
}

/// Verifies the chain without changing the file and returns the last sequence number and hash,
/// and the torn last record the service would drop at its next start, if any.
pub fn verify(path: &Path) -> Result<(u64, String, Option<TornTail>)> {
    let (lines, torn) = read_jsonl(path, false)?;
    let (seq, head) = verify_records(&parse_records(&lines)?)?;
    Ok((seq, head, torn))
}

/// Verifies the chain of records already read and returns the last sequence number and hash.
pub fn verify_records(records: &[Record]) -> Result<(u64, String)> {
    let mut prev = GENESIS.to_string();
    let mut seq = 0;
    for record in records {
        if record.seq != seq + 1 || record.prev != prev || chain_hash(record)? != record.hash {
            return Err(Error::Internal(format!(
                "audit trail broken at record {}",
                seq + 1
            )));
        }
        seq = record.seq;
        prev = record.hash.clone();
    }
    Ok((seq, prev))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn editing_a_record_breaks_the_chain() {
        let dir = std::env::temp_dir().join(format!("audit-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        let _ = std::fs::remove_file(&path);
        let (trail, _, _) = AuditTrail::open(&path).unwrap();
        let now = chrono::Utc::now();
        for method in ["A", "B", "C"] {
            trail
                .append(
                    Entry {
                        method: method.into(),
                        outcome: "ok".into(),
                        ..Default::default()
                    },
                    now,
                )
                .unwrap();
        }
        assert_eq!(verify(&path).unwrap().0, 3);
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("\"method\":\"B\"", "\"method\":\"X\"");
        std::fs::write(&path, text).unwrap();
        assert!(verify(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
