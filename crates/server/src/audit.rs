//! The audit trail: one JSON record per call that reads or changes data, appended to a file as a
//! keyed hash chain. Each record carries an HMAC (keyed from the master secret) over the previous
//! record's and its own content, and a signed checkpoint of the head is kept next to the trail
//! and can be exported: with [`verify`], a reviewer checks that nothing was removed, reordered,
//! edited, cut from the end or rewritten whole.
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
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

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
    /// Start-up found the data directory ahead of its record: files no manifest named (removed),
    /// or committed writes whose call records a crash lost (recorded here, so no data is without
    /// a record).
    Reconciled {
        /// Data files removed because no manifest named them.
        orphan_files: Vec<String>,
        /// Committed writes the trail had no record of.
        unrecorded_writes: u64,
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
            Event::Reconciled {
                orphan_files,
                unrecorded_writes,
            } => {
                out.insert("orphan_files".into(), orphan_files.join(", "));
                out.insert("unrecorded_writes".into(), unrecorded_writes.to_string());
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
    /// HMAC-SHA256, keyed from the master secret, over `prev` and this record's content without
    /// `hash`.
    pub hash: String,
}

/// The trail's head, signed with the chain key: written next to the trail after every record
/// (`audit.checkpoint`) and exported for the legal reviewer to keep elsewhere. A trail shorter
/// than a checkpoint, or different at the checkpoint's position, does not verify.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Records in the trail.
    pub seq: u64,
    /// The last record's hash.
    pub head: String,
    /// HMAC-SHA256 over `seq` and `head`, with the chain key.
    pub mac: String,
}

/// The chain's key, derived from the master secret.
#[derive(Clone)]
pub struct ChainKey([u8; 32]);

impl ChainKey {
    /// The chain key of a master secret.
    pub fn new(secret: &cleanroom_core::token::MasterSecret) -> Self {
        Self(secret.audit_key())
    }

    fn mac(&self, parts: &[&[u8]]) -> String {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("any key length");
        for part in parts {
            mac.update(part);
        }
        hex::encode(mac.finalize().into_bytes())
    }

    fn record_hash(&self, record: &Record) -> Result<String> {
        let mut unhashed = record.clone();
        unhashed.hash = String::new();
        let body =
            serde_json::to_vec(&unhashed).map_err(|e| Error::Internal(format!("audit: {e}")))?;
        Ok(self.mac(&[b"record/v1", record.prev.as_bytes(), &body]))
    }

    /// A signed checkpoint of a head.
    pub fn checkpoint(&self, seq: u64, head: &str) -> Checkpoint {
        Checkpoint {
            seq,
            head: head.to_string(),
            mac: self.mac(&[
                b"checkpoint/v1",
                seq.to_string().as_bytes(),
                head.as_bytes(),
            ]),
        }
    }

    /// Checks a checkpoint's signature and that `records` extend it.
    pub fn check(&self, checkpoint: &Checkpoint, records: &[Record]) -> Result<()> {
        if self.checkpoint(checkpoint.seq, &checkpoint.head).mac != checkpoint.mac {
            return Err(Error::Internal(
                "audit checkpoint does not verify with this service's key".into(),
            ));
        }
        let at = match checkpoint.seq {
            0 => GENESIS,
            n => match records.get(n as usize - 1) {
                Some(record) => record.hash.as_str(),
                None => {
                    return Err(Error::Internal(format!(
                        "audit trail has {} records, fewer than its checkpoint's {n}: records were \
                         cut",
                        records.len()
                    )));
                }
            },
        };
        if at != checkpoint.head {
            return Err(Error::Internal(format!(
                "audit trail differs from its checkpoint at record {}: it was rewritten",
                checkpoint.seq
            )));
        }
        Ok(())
    }
}

/// The end of the chain: where the next record goes. Held only to order and write a record to the
/// file (the page cache), never across a sync.
struct Tail {
    seq: u64,
    hash: String,
    file: File,
    /// The file's length after the last whole record.
    len: u64,
    /// Why the trail takes no more records: a write that could not be undone, or a failed sync
    /// (after which the kernel may have dropped what was written). The service fails closed.
    broken: Option<String>,
}

/// What is on disk for certain: the last record synced, and the checkpoint written for it.
struct Durable {
    seq: u64,
    hash: String,
    file: File,
}

/// The append-only trail.
///
/// Appends are group-committed: a record is ordered and written under the tail's lock, then made
/// durable under a second lock by one sync that covers every record written so far, followed by
/// the checkpoint of that head. Concurrent calls share syncs instead of queueing behind each
/// other's, and no caller gets an answer before its record is on disk.
pub struct AuditTrail {
    path: PathBuf,
    key: ChainKey,
    tail: Mutex<Tail>,
    durable: Mutex<Durable>,
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Where a trail's checkpoint is kept.
pub fn checkpoint_path(trail: &Path) -> PathBuf {
    trail.with_extension("checkpoint")
}

/// Reads a trail's checkpoint; `None` if there is none.
pub fn read_checkpoint(trail: &Path) -> Result<Option<Checkpoint>> {
    let path = checkpoint_path(trail);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Internal(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Internal(format!("{}: {e}", path.display()))),
    }
}

fn write_checkpoint(trail: &Path, checkpoint: &Checkpoint) -> Result<()> {
    let path = checkpoint_path(trail);
    let tmp = path.with_extension("checkpoint.tmp");
    let io = |e: std::io::Error| Error::Internal(format!("audit checkpoint: {e}"));
    let bytes = serde_json::to_vec(checkpoint).map_err(|e| Error::Internal(e.to_string()))?;
    let mut file = File::create(&tmp).map_err(io)?;
    file.write_all(&bytes)
        .and_then(|_| file.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)
}

impl AuditTrail {
    /// Opens the trail, verifying the existing chain and its checkpoint first: a service must not
    /// extend a trail that has been tampered with, cut or rewritten. A trail with records but no
    /// checkpoint fails too (the checkpoint was removed).
    /// Also returns the records already in it, read once, for callers that rebuild state from them,
    /// and the torn last record a crash left, if any: it is cut from the file (never a permanent
    /// outage) and the caller records that it was.
    pub fn open(path: &Path, key: ChainKey) -> Result<(Self, Vec<Record>, Option<TornTail>)> {
        let (lines, torn) = read_jsonl(path, true)?;
        let history = parse_records(&lines)?;
        let (seq, hash) = verify_records(&key, &history)?;
        match read_checkpoint(path)? {
            Some(checkpoint) => key.check(&checkpoint, &history)?,
            None if !history.is_empty() => {
                return Err(Error::Internal(format!(
                    "{} is missing while the trail has {} records",
                    checkpoint_path(path).display(),
                    history.len()
                )));
            }
            None => {}
        }
        write_checkpoint(path, &key.checkpoint(seq, &hash))?;
        let io = |e: std::io::Error| Error::Internal(format!("audit trail: {e}"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let syncer = file.try_clone().map_err(io)?;
        let trail = Self {
            path: path.to_path_buf(),
            key,
            tail: Mutex::new(Tail {
                seq,
                hash: hash.clone(),
                file,
                len,
                broken: None,
            }),
            durable: Mutex::new(Durable {
                seq,
                hash,
                file: syncer,
            }),
        };
        Ok((trail, history, torn))
    }

    /// Where the trail is kept.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Verifies records read from this trail with its key.
    pub fn verify_records(&self, records: &[Record]) -> Result<(u64, String)> {
        verify_records(&self.key, records)
    }

    /// The head on disk, signed: what a legal reviewer keeps elsewhere.
    pub fn checkpoint(&self) -> Checkpoint {
        let durable = self.durable.lock().expect("audit lock poisoned");
        self.key.checkpoint(durable.seq, &durable.hash)
    }

    /// Appends one record and returns its id once the record is on disk with a checkpoint at or
    /// after it. Blocking: call it off the async workers.
    pub fn append(&self, entry: Entry, at: chrono::DateTime<chrono::Utc>) -> Result<String> {
        let (seq, id) = self.write(entry, at)?;
        self.make_durable(seq)?;
        Ok(id)
    }

    /// Orders a record after the last and writes it to the file, not yet synced. A write that
    /// fails part-way is cut back, so the file always ends with a whole record.
    fn write(&self, entry: Entry, at: chrono::DateTime<chrono::Utc>) -> Result<(u64, String)> {
        let mut tail = self.tail.lock().expect("audit lock poisoned");
        if let Some(why) = &tail.broken {
            return Err(Error::Internal(format!(
                "audit trail refuses records: {why}"
            )));
        }
        let seq = tail.seq + 1;
        let mut record = Record {
            seq,
            id: format!("a-{seq:08}"),
            at: at.to_rfc3339(),
            entry,
            prev: tail.hash.clone(),
            hash: String::new(),
        };
        record.hash = self.key.record_hash(&record)?;
        let mut line =
            serde_json::to_vec(&record).map_err(|e| Error::Internal(format!("audit: {e}")))?;
        line.push(b'\n');
        if let Err(e) = tail.file.write_all(&line) {
            let len = tail.len;
            if let Err(cut) = tail.file.set_len(len) {
                tail.broken = Some(format!("a failed write could not be cut back: {cut}"));
            }
            return Err(Error::Internal(format!("audit trail write: {e}")));
        }
        tail.len += line.len() as u64;
        tail.seq = seq;
        tail.hash = record.hash;
        Ok((seq, record.id))
    }

    /// Syncs the trail up to at least record `seq`, with every record written before the sync
    /// began, and writes the checkpoint of that head. A caller whose record an earlier sync
    /// covered returns at once.
    fn make_durable(&self, seq: u64) -> Result<()> {
        let mut durable = self.durable.lock().expect("audit lock poisoned");
        if durable.seq >= seq {
            return Ok(());
        }
        let (head_seq, head_hash) = {
            let tail = self.tail.lock().expect("audit lock poisoned");
            (tail.seq, tail.hash.clone())
        };
        if let Err(e) = durable.file.sync_data() {
            let why = format!("a sync failed: {e}");
            self.tail.lock().expect("audit lock poisoned").broken = Some(why.clone());
            return Err(Error::Internal(format!("audit trail: {why}")));
        }
        // A crash before this leaves the checkpoint behind the trail, which verifies.
        write_checkpoint(&self.path, &self.key.checkpoint(head_seq, &head_hash))?;
        durable.seq = head_seq;
        durable.hash = head_hash;
        Ok(())
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

/// What [`verify`] found.
#[derive(Debug)]
pub struct Verified {
    /// Records in the trail.
    pub records: u64,
    /// The signed head, to keep elsewhere.
    pub checkpoint: Checkpoint,
    /// A torn last record the service would drop at its next start.
    pub torn: Option<TornTail>,
}

/// Verifies a trail without changing it: the keyed chain, the service's own checkpoint (which
/// must exist once there are records) and, if given, a checkpoint kept elsewhere.
pub fn verify(path: &Path, key: &ChainKey, kept: Option<&Checkpoint>) -> Result<Verified> {
    let (lines, torn) = read_jsonl(path, false)?;
    let records = parse_records(&lines)?;
    let (seq, head) = verify_records(key, &records)?;
    match read_checkpoint(path)? {
        Some(own) => key.check(&own, &records)?,
        None if !records.is_empty() => {
            return Err(Error::Internal(format!(
                "{} is missing",
                checkpoint_path(path).display()
            )));
        }
        None => {}
    }
    if let Some(kept) = kept {
        key.check(kept, &records)?;
    }
    Ok(Verified {
        records: seq,
        checkpoint: key.checkpoint(seq, &head),
        torn,
    })
}

/// Verifies the chain of records already read and returns the last sequence number and hash.
pub fn verify_records(key: &ChainKey, records: &[Record]) -> Result<(u64, String)> {
    let mut prev = GENESIS.to_string();
    let mut seq = 0;
    for record in records {
        if record.seq != seq + 1 || record.prev != prev || key.record_hash(record)? != record.hash {
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

    fn key(secret: &[u8]) -> ChainKey {
        ChainKey::new(&cleanroom_core::token::MasterSecret::new(secret.to_vec()).unwrap())
    }

    fn trail_of(path: &Path, methods: &[&str]) {
        let (trail, _, _) = AuditTrail::open(path, key(&[7; 32])).unwrap();
        for method in methods {
            let entry = Entry {
                method: (*method).into(),
                outcome: "ok".into(),
                ..Default::default()
            };
            trail.append(entry, chrono::Utc::now()).unwrap();
        }
    }

    #[test]
    fn concurrent_appends_share_syncs_and_keep_one_whole_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (trail, _, _) = AuditTrail::open(&path, key(&[7; 32])).unwrap();
        let trail = std::sync::Arc::new(trail);
        let writers: Vec<_> = (0..8)
            .map(|writer| {
                let trail = std::sync::Arc::clone(&trail);
                std::thread::spawn(move || {
                    (0..50)
                        .map(|i| {
                            let entry = Entry {
                                method: format!("W{writer}-{i}"),
                                outcome: "ok".into(),
                                ..Default::default()
                            };
                            trail.append(entry, chrono::Utc::now()).unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let ids: std::collections::BTreeSet<String> = writers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        assert_eq!(ids.len(), 400, "every append got its own record");
        // Every acknowledged record is on disk, in one chain, and the checkpoint covers it.
        let verified = verify(&path, &key(&[7; 32]), None).unwrap();
        assert_eq!(verified.records, 400);
        assert_eq!(trail.checkpoint(), verified.checkpoint);
        let on_disk: std::collections::BTreeSet<String> =
            read(&path).unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(on_disk, ids);
    }

    #[test]
    fn edits_cuts_and_rewrites_do_not_verify() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        trail_of(&path, &["A", "B", "C"]);
        let k = key(&[7; 32]);
        let verified = verify(&path, &k, None).unwrap();
        assert_eq!(verified.records, 3);
        let whole = std::fs::read_to_string(&path).unwrap();

        // Edited.
        std::fs::write(&path, whole.replace("\"method\":\"B\"", "\"method\":\"X\"")).unwrap();
        assert!(verify(&path, &k, None).is_err());
        // Cut from the end (the checkpoint says 3).
        let two: String = whole.lines().take(2).map(|l| format!("{l}\n")).collect();
        std::fs::write(&path, &two).unwrap();
        let cut = verify(&path, &k, None).unwrap_err().to_string();
        assert!(cut.contains("fewer than its checkpoint"), "{cut}");
        assert!(
            AuditTrail::open(&path, key(&[7; 32])).is_err(),
            "the service refuses it"
        );
        // Rewritten whole by someone without the key, checkpoint and all.
        std::fs::write(&path, "").unwrap();
        std::fs::remove_file(checkpoint_path(&path)).unwrap();
        let (forged, _, _) = AuditTrail::open(&path, key(&[9; 32])).unwrap();
        forged.append(Entry::default(), chrono::Utc::now()).unwrap();
        assert!(
            verify(&path, &k, None).is_err(),
            "another key's chain does not verify"
        );
        // Rolled back to an older consistent state: the checkpoint kept elsewhere catches it.
        std::fs::write(&path, &whole).unwrap();
        std::fs::write(
            checkpoint_path(&path),
            serde_json::to_vec(&verified.checkpoint).unwrap(),
        )
        .unwrap();
        trail_of(&path, &["D"]);
        let kept = verify(&path, &k, None).unwrap().checkpoint;
        std::fs::write(&path, &whole).unwrap();
        std::fs::write(
            checkpoint_path(&path),
            serde_json::to_vec(&verified.checkpoint).unwrap(),
        )
        .unwrap();
        assert!(
            verify(&path, &k, None).is_ok(),
            "consistent with its own checkpoint"
        );
        assert!(
            verify(&path, &k, Some(&kept)).is_err(),
            "but not with the one kept elsewhere"
        );
    }
}
