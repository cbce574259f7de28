//! The audit trail: one JSON record per call that reads or changes data, appended to a file as a
//! keyed hash chain. Each record carries an HMAC (keyed from the master secret) over the previous
//! record's and its own content, and a signed checkpoint of the head is kept next to the trail
//! and can be exported: with [`verify`], a reviewer checks that nothing was removed, reordered,
//! edited, cut from the end or rewritten whole.
//!
//! Records hold query ids, parameters, counts and outcomes. They never hold an identifier: the
//! requests that carry identifiers (uploads, ingests) are recorded by their counts only.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use chrono::NaiveDate;
use cleanroom_core::files::{self, AppendLog, TornTail, read_jsonl};
use cleanroom_engine::guard::GuardReport;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::{Error, Result};

/// Where a chain of records ends: how many were ever appended, and the last one's hash.
pub type ChainEnd = (u64, String);

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
    /// The caller's request id, for writes that carry one (a retry sends the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The commit a write made (or, for a retry, the commit it answered): its place in the
    /// manifest's log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<u64>,
    /// The data files a write committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<String>>,
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

impl Entry {
    /// Whether this record changes what the high-water mark must remember: a write, a fresh
    /// answer, a reviewer's decision, a configuration change, a repair or an accepted restore.
    pub fn moves_the_mark(&self) -> bool {
        match &self.event {
            Some(Event::Answer(report)) => report.fresh,
            Some(Event::Replayed { .. }) => false,
            Some(_) => true,
            None => self.commit.is_some(),
        }
    }

    /// Notes what the guard decided for a question, answered or refused: the query, its
    /// parameters, the data it read, what was released and the guard's report.
    pub fn record(&mut self, facts: &cleanroom_engine::guard::AuditFacts) {
        self.query_id = facts.query_id.clone();
        self.query_sha256 = facts.query_sha256.clone();
        self.params = facts
            .params
            .as_ref()
            .map(|params| serde_json::json!(params));
        self.consent_snapshot = facts.consent_snapshot.clone();
        self.list_version = facts.list_version;
        self.rows_released = facts.rows_released;
        self.rows_suppressed = facts.rows_suppressed;
        self.out_of_domain_rows = facts.out_of_domain_rows;
        self.event = facts.report.clone().map(Event::Answer);
    }

    /// Notes that this call was a retry of a write committed before under its request id: it
    /// wrote nothing, and answered the original commit's result.
    pub fn replayed(&mut self, record: &cleanroom_engine::store::CommitRecord) {
        self.committed(record);
        self.event = Some(Event::Replayed { commit: record.seq });
    }

    /// Notes the commit a write made (or a retry answered): its place in the manifest's log and
    /// the files it placed, so the trail names every file a committed write owns.
    pub fn committed(&mut self, record: &cleanroom_engine::store::CommitRecord) {
        self.commit = Some(record.seq);
        self.files = Some(record.files.clone());
        self.records = Some((record.received, record.accepted));
        if record.list_version.is_some() {
            self.list_version = record.list_version;
        }
        if record.consent_snapshot_id.is_some() {
            self.consent_snapshot = record.consent_snapshot_id.clone();
        }
    }
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
        /// Those writes, each named: commit, call, partner, records.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        writes: Vec<UnrecordedWrite>,
    },
    /// Start-up found the data directory behind the high-water mark kept outside it (a restore
    /// from backup), and the operator accepted it: what the mark held that the directory lacked
    /// was carried over, so no budget was refilled.
    RestoreAccepted {
        /// What differed.
        reasons: Vec<String>,
        /// Charges carried over onto the privacy ledger.
        carried_charges: u64,
        /// List uploads carried over into the list allowances.
        carried_uploads: Vec<Upload>,
        /// The records of receipt the restored directory lacked (first and last position):
        /// nothing can rebuild them, so they are named here, and their positions are used again
        /// by the records that follow.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lost_receipts: Option<(u64, u64)>,
    },
    /// A retry of a write committed before under the same request id: nothing was written, the
    /// original result was answered.
    Replayed {
        /// The original write's commit.
        commit: u64,
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
    /// An analyst asked to end a collaboration early; nothing changes until legal confirms.
    DestructionRequested {
        /// The collaboration (contract id).
        contract: String,
        /// Why.
        reason: String,
    },
    /// A collaboration ended: what was destroyed, each file with its SHA-256 and rows, and which
    /// key. Never an identifier.
    Destroyed(Box<Destruction>),
    /// Records of receipt past their keeping period were purged from the start of their chain.
    ReceiptsPurged {
        /// Records removed.
        records: u64,
        /// The chain now starts after this record.
        through_seq: u64,
        /// That record's hash (the signed start of the chain).
        head: String,
        /// The newest day of receipt removed.
        newest_received_on: NaiveDate,
    },
    /// A member's records were disclosed (APPI Art. 33(5)): the member is named by a keyed digest
    /// of the id asked for, never the id.
    Disclosed {
        /// Keyed digest of the member id ([`ChainKey::digest`]).
        member_digest: String,
        /// Records of receipt that named the member.
        receipts: u64,
    },
    /// The retention rules destroyed part of what a collaboration or the retailer keeps (list
    /// versions, old purchases) while the rest runs on: each file with its SHA-256 and rows.
    /// Never an identifier or a row's content.
    Retired(Box<Retirement>),
    /// Members were erased at an analyst's request (a member's erasure): counts only, never a
    /// member id, a pseudonym or a digest of either.
    Erased(Box<ErasureCounts>),
}

/// What one erasure removed, in counts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ErasureCounts {
    /// Distinct member ids asked.
    pub members_asked: u64,
    /// Of those, members the member table held.
    pub members_found: u64,
    /// Rows removed, by table (`members`, `member_tokens`, `purchases`, `consent`).
    pub rows_removed: BTreeMap<String, u64>,
    /// Withdrawal tombstones written.
    pub tombstones: u64,
    /// Data files replaced or removed.
    pub files_replaced: u64,
    /// The analyst who asked.
    pub requested_by: String,
}

/// What one retention destroyed, under which rule: list versions of one partner, or purchases.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Retirement {
    /// `list versions`, `purchases` or `key version` (a rotation's end).
    pub what: String,
    /// The collaboration (contract id), for list versions.
    pub contract: Option<String>,
    /// Its partner, for list versions.
    pub partner: Option<String>,
    /// Why: `retention`, or `rotation`.
    pub reason: String,
    /// The rule that decided it (`keep_versions = 1`, `max_list_days = 30`, `purchases_days =
    /// 730`, `key_overlap_days = 7 (...)`).
    pub rule: String,
    /// Who: `retention rules`.
    pub requested_by: String,
    /// The collaboration's key the lists were matched under (kept: the collaboration runs on),
    /// or, for a rotation's end, the destroyed key version's.
    pub key_id: Option<String>,
    /// The key version a rotation's end destroyed (`what` = `key version`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u32>,
    /// The newest list version destroyed (every older one is gone too).
    pub through_version: Option<u32>,
    /// The files destroyed (a purchases file rewritten without its old rows included).
    pub files: Vec<cleanroom_engine::store::DestroyedFile>,
    /// The files written in place of rewritten ones (purchases).
    pub written: Vec<cleanroom_engine::store::DestroyedFile>,
    /// Purchase rows (or, for a rotation's end, member-token rows) removed.
    pub removed_rows: u64,
    /// Stored answers destroyed with the list versions they were computed over.
    pub stored_answers: u64,
}

/// What one destruction destroyed, and on whose word: the proof a certificate is made from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Destruction {
    /// The collaboration (contract id).
    pub contract: String,
    /// Its partner.
    pub partner: String,
    /// Why: `manual` destructions carry the analyst's reason.
    pub reason: String,
    /// The analyst who asked.
    pub requested_by: String,
    /// The destroyed key's version.
    pub key_version: u32,
    /// The destroyed key's public id.
    pub key_id: String,
    /// The files destroyed.
    pub files: Vec<cleanroom_engine::store::DestroyedFile>,
    /// Stored answers destroyed.
    pub stored_answers: u64,
}

impl Event {
    /// The event as a reviewer reads it, one labelled value per fact.
    pub fn display(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        match self {
            Event::Answer(r) => display_answer(r, &mut out),
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
                writes,
            } => display_reconciled(orphan_files, *unrecorded_writes, writes, &mut out),
            Event::RestoreAccepted {
                reasons,
                carried_charges,
                carried_uploads,
                lost_receipts,
            } => {
                out.insert("reasons".into(), reasons.join("; "));
                out.insert("carried_charges".into(), carried_charges.to_string());
                out.insert("carried_uploads".into(), carried_uploads.len().to_string());
                if let Some((first, last)) = lost_receipts {
                    out.insert("lost_receipts".into(), format!("{first} to {last}"));
                }
            }
            Event::Replayed { commit } => {
                out.insert("replay_of_commit".into(), commit.to_string());
            }
            Event::ConfigChange {
                rules,
                queries,
                invalid_queries,
            } => display_config_change(rules.as_deref(), queries, invalid_queries, &mut out),
            Event::DestructionRequested { contract, reason } => {
                out.insert("contract".into(), contract.clone());
                out.insert("reason".into(), reason.clone());
            }
            Event::Destroyed(d) => display_destruction(d, &mut out),
            Event::ReceiptsPurged {
                records,
                through_seq,
                head,
                newest_received_on,
            } => {
                out.insert("records".into(), records.to_string());
                out.insert("through_seq".into(), through_seq.to_string());
                out.insert("head".into(), head.clone());
                out.insert("newest_received_on".into(), newest_received_on.to_string());
            }
            Event::Disclosed {
                member_digest,
                receipts,
            } => {
                out.insert("member_digest".into(), member_digest.clone());
                out.insert("receipts".into(), receipts.to_string());
            }
            Event::Retired(r) => display_retirement(r, &mut out),
            Event::Erased(e) => display_erasure(e, &mut out),
        }
        out
    }
}

/// An erasure as a reviewer reads it: counts only.
fn display_erasure(e: &ErasureCounts, out: &mut BTreeMap<String, String>) {
    for (label, value) in [
        ("members_asked", e.members_asked),
        ("members_found", e.members_found),
        ("tombstones", e.tombstones),
        ("files_replaced", e.files_replaced),
    ] {
        out.insert(label.to_string(), value.to_string());
    }
    for (table, rows) in &e.rows_removed {
        out.insert(format!("{table}_rows_removed"), rows.to_string());
    }
    out.insert("requested_by".into(), e.requested_by.clone());
}

/// Files as a reviewer reads them: each with its digest and rows.
fn display_files(files: &[cleanroom_engine::store::DestroyedFile]) -> String {
    files
        .iter()
        .map(|f| format!("{} sha256:{} rows:{}", f.name, f.sha256, f.rows))
        .collect::<Vec<_>>()
        .join("; ")
}

/// A retention as a reviewer reads it: what, under which rule, each file with its digest.
fn display_retirement(r: &Retirement, out: &mut BTreeMap<String, String>) {
    let optional = [
        ("contract", r.contract.clone()),
        ("partner", r.partner.clone()),
        ("key", r.key_id.clone()),
        ("key_version", r.key_version.map(|v| v.to_string())),
        ("through_version", r.through_version.map(|v| v.to_string())),
    ];
    for (label, value) in optional {
        if let Some(value) = value {
            out.insert(label.to_string(), value);
        }
    }
    for (label, value) in [
        ("what", r.what.clone()),
        ("reason", r.reason.clone()),
        ("rule", r.rule.clone()),
        ("requested_by", r.requested_by.clone()),
        ("files", display_files(&r.files)),
        ("written", display_files(&r.written)),
        ("removed_rows", r.removed_rows.to_string()),
        ("stored_answers", r.stored_answers.to_string()),
    ] {
        out.insert(label.to_string(), value);
    }
}

/// A destruction as a reviewer reads it: each file with its digest and rows.
fn display_destruction(d: &Destruction, out: &mut BTreeMap<String, String>) {
    let files: Vec<String> = d
        .files
        .iter()
        .map(|f| format!("{} sha256:{} rows:{}", f.name, f.sha256, f.rows))
        .collect();
    for (label, value) in [
        ("contract", d.contract.clone()),
        ("partner", d.partner.clone()),
        ("reason", d.reason.clone()),
        ("requested_by", d.requested_by.clone()),
        ("key", format!("v{} id {}", d.key_version, d.key_id)),
        ("files", files.join("; ")),
        ("stored_answers", d.stored_answers.to_string()),
    ] {
        out.insert(label.to_string(), value);
    }
}

/// An answer's guard report as a reviewer reads it: what was enforced and what it cost.
fn display_answer(r: &GuardReport, out: &mut BTreeMap<String, String>) {
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

/// A reconciliation as a reviewer reads it: the orphans removed, and each unrecorded write under
/// its commit.
fn display_reconciled(
    orphan_files: &[String],
    unrecorded_writes: u64,
    writes: &[UnrecordedWrite],
    out: &mut BTreeMap<String, String>,
) {
    out.insert("orphan_files".into(), orphan_files.join(", "));
    out.insert("unrecorded_writes".into(), unrecorded_writes.to_string());
    for w in writes {
        out.insert(format!("commit {}", w.commit), w.summary());
    }
}

/// A configuration change as a reviewer reads it: only what changed is shown.
fn display_config_change(
    rules: Option<&str>,
    queries: &[String],
    invalid_queries: &[String],
    out: &mut BTreeMap<String, String>,
) {
    if let Some(r) = rules {
        out.insert("rules".into(), r.to_string());
    }
    if !queries.is_empty() {
        out.insert("queries".into(), queries.join(", "));
    }
    if !invalid_queries.is_empty() {
        out.insert("invalid_queries".into(), invalid_queries.join(", "));
    }
}

/// A partner's accepted list upload, as list allowances count it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Upload {
    /// The partner.
    pub partner: String,
    /// When it was accepted.
    pub at: chrono::DateTime<chrono::Utc>,
}

/// A committed write whose call's record a crash lost, as start-up records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UnrecordedWrite {
    /// Its place in the manifest's log.
    pub commit: u64,
    /// The call that made it.
    pub method: String,
    /// The partner, for a list upload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partner: Option<String>,
    /// Records received and accepted.
    pub records: (u64, u64),
    /// The caller's request id, if it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl UnrecordedWrite {
    /// The write in one line: `<method>[ for <partner>]: <received> received, <accepted> accepted`.
    fn summary(&self) -> String {
        format!(
            "{}{}: {} received, {} accepted",
            self.method,
            self.partner
                .as_ref()
                .map(|p| format!(" for {p}"))
                .unwrap_or_default(),
            self.records.0,
            self.records.1
        )
    }
}

/// One stored record of a keyed chain: of the audit trail (an [`Entry`]), or of another chain
/// kept the same way (the receipt records, [`crate::receipts`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record<E = Entry> {
    /// Position in the chain, from 1.
    pub seq: u64,
    /// The id callers are given: `a-` and 16 hex digits keyed from the chain key and `seq`
    /// (records written before keyed ids read `a-<seq>`).
    pub id: String,
    /// When it was written (RFC 3339).
    pub at: String,
    /// The call (or the chain's own content).
    #[serde(flatten)]
    pub entry: E,
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

    /// The key of another chain kept like the trail (`name`, for example `receipts`): derived
    /// from the trail's, so a record of one chain never verifies in another.
    pub fn derived(&self, name: &str) -> Self {
        Self(cleanroom_core::token::hmac_sha256(
            &self.0,
            format!("chain/{name}/v1").as_bytes(),
        ))
    }

    /// A keyed digest of `value` under this key and `label`, in 16 hex digits: it names one
    /// value (a member id a disclosure was asked for) without revealing it to whoever reads the
    /// trail without the master secret.
    pub fn digest(&self, label: &str, value: &[u8]) -> String {
        let mac = self.mac(&[b"digest/v1", label.as_bytes(), value]);
        mac[..16].to_string()
    }

    fn mac(&self, parts: &[&[u8]]) -> String {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("any key length");
        for part in parts {
            mac.update(part);
        }
        hex::encode(mac.finalize().into_bytes())
    }

    pub(crate) fn record_hash<E: Serialize + Clone>(&self, record: &Record<E>) -> Result<String> {
        let mut unhashed = record.clone();
        unhashed.hash = String::new();
        let body =
            serde_json::to_vec(&unhashed).map_err(|e| Error::Internal(format!("audit: {e}")))?;
        Ok(self.mac(&[b"record/v1", record.prev.as_bytes(), &body]))
    }

    /// The id a caller is given for record `seq`: keyed, so it reveals nothing about how many
    /// calls anyone else made between two of one's own.
    pub(crate) fn record_id(&self, seq: u64) -> String {
        let mac = self.mac(&[b"record-id/v1", &seq.to_le_bytes()]);
        format!("a-{}", &mac[..16])
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
    pub fn check<E>(&self, checkpoint: &Checkpoint, records: &[Record<E>]) -> Result<()> {
        self.check_from(&self.genesis(), checkpoint, records)
    }

    /// The start of a whole chain: no record before the first.
    pub fn genesis(&self) -> Checkpoint {
        self.checkpoint(0, GENESIS)
    }

    /// As [`ChainKey::check`], for records that follow `base` (the signed head of records
    /// purged from the chain's start; [`ChainKey::genesis`] for a whole chain).
    pub fn check_from<E>(
        &self,
        base: &Checkpoint,
        checkpoint: &Checkpoint,
        records: &[Record<E>],
    ) -> Result<()> {
        if self.checkpoint(checkpoint.seq, &checkpoint.head).mac != checkpoint.mac {
            return Err(Error::Internal(
                "audit checkpoint does not verify with this service's key".into(),
            ));
        }
        let at = match checkpoint.seq {
            n if n == base.seq => base.head.as_str(),
            n if n < base.seq => {
                return Err(Error::Internal(format!(
                    "checkpoint at record {n} is older than the purged start {}",
                    base.seq
                )));
            }
            n => match records.get((n - base.seq) as usize - 1) {
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
    /// The file: a failed write is cut back to the last whole record.
    log: AppendLog,
    /// Why the trail takes no more records: a failed sync (after which the kernel may have
    /// dropped what was written). The service fails closed.
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
    follower: OnceLock<Follower>,
}

/// What runs after each durable append: told whether the record matters to the high-water mark.
pub type Follower = Box<dyn Fn(bool) -> Result<()> + Send + Sync>;

/// A trail as start-up found it: verified, not yet changed.
pub struct TrailFile {
    path: PathBuf,
    records: Vec<Record>,
    torn: Option<TornTail>,
}

impl TrailFile {
    /// Its records.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// Its torn last record, which opening cuts.
    pub fn torn(&self) -> Option<&TornTail> {
        self.torn.as_ref()
    }
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

pub(crate) fn write_checkpoint(trail: &Path, checkpoint: &Checkpoint) -> Result<()> {
    let bytes = serde_json::to_vec(checkpoint).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(files::write_atomic(&checkpoint_path(trail), &bytes)?)
}

impl AuditTrail {
    /// Reads the trail at `path` without changing it, verifying the chain and its checkpoint: a
    /// service must not extend a trail that has been tampered with, cut or rewritten. A trail
    /// with records but no checkpoint fails too (the checkpoint was removed). A torn last record
    /// (a crash mid-write) is not a record; opening cuts it.
    pub fn read(path: &Path, key: &ChainKey) -> Result<TrailFile> {
        let (lines, torn) = read_jsonl(path, false)?;
        let records = parse_records(&lines)?;
        verify_records(key, &records)?;
        match read_checkpoint(path)? {
            Some(checkpoint) => key.check(&checkpoint, &records)?,
            None if !records.is_empty() => {
                return Err(Error::Internal(format!(
                    "{} is missing while the trail has {} records",
                    checkpoint_path(path).display(),
                    records.len()
                )));
            }
            None => {}
        }
        Ok(TrailFile {
            path: path.to_path_buf(),
            records,
            torn,
        })
    }

    /// Opens a trail as read: cuts its torn last record, if any (never a permanent outage; the
    /// caller records that it did), rewrites its checkpoint and opens it for appending.
    pub fn open(file: TrailFile, key: ChainKey) -> Result<Self> {
        if let Some(torn) = &file.torn {
            files::cut_torn_tail(torn)?;
        }
        let (seq, hash) = verify_records(&key, &file.records)?;
        let path = file.path;
        write_checkpoint(&path, &key.checkpoint(seq, &hash))?;
        let log = AppendLog::open(&path, seq)?;
        let syncer = log.sync_handle()?;
        Ok(Self {
            path,
            key,
            tail: Mutex::new(Tail {
                seq,
                hash: hash.clone(),
                log,
                broken: None,
            }),
            durable: Mutex::new(Durable {
                seq,
                hash,
                file: syncer,
            }),
            follower: OnceLock::new(),
        })
    }

    /// Sets what runs after every record is durable, before its call is answered (the
    /// high-water mark's update); it is told whether the record itself matters to the mark. A
    /// failure fails the append.
    pub fn set_follower(&self, follower: Follower) {
        let _ = self.follower.set(follower);
    }

    /// Where the trail is kept.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The chain's key, for keyed digests of what the trail must name without revealing.
    pub fn key(&self) -> &ChainKey {
        &self.key
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
        let matters = entry.moves_the_mark();
        let (seq, id) = self.write(entry, at)?;
        self.make_durable(seq)?;
        if let Some(follow) = self.follower.get() {
            follow(matters)?;
        }
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
            id: self.key.record_id(seq),
            at: at.to_rfc3339(),
            entry,
            prev: tail.hash.clone(),
            hash: String::new(),
        };
        record.hash = self.key.record_hash(&record)?;
        let line =
            serde_json::to_vec(&record).map_err(|e| Error::Internal(format!("audit: {e}")))?;
        tail.log.write(&line)?;
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

pub(crate) fn parse_records<E: serde::de::DeserializeOwned>(
    lines: &[String],
) -> Result<Vec<Record<E>>> {
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
    verify_chain(key, &key.genesis(), records)
}

/// Verifies a chain of records that follows `base` (a signed head: [`ChainKey::genesis`] for a
/// whole chain, or the head of records purged from its start) and returns the last sequence
/// number and hash. A base not signed with `key` does not verify.
pub fn verify_chain<E: Serialize + Clone>(
    key: &ChainKey,
    base: &Checkpoint,
    records: &[Record<E>],
) -> Result<(u64, String)> {
    if key.checkpoint(base.seq, &base.head).mac != base.mac {
        return Err(Error::Internal(
            "the chain's purged start does not verify with this service's key".into(),
        ));
    }
    let mut prev = base.head.clone();
    let mut seq = base.seq;
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

    fn open(path: &Path, key: ChainKey) -> Result<AuditTrail> {
        AuditTrail::open(AuditTrail::read(path, &key)?, key)
    }

    fn trail_of(path: &Path, methods: &[&str]) {
        let trail = open(path, key(&[7; 32])).unwrap();
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
        let trail = open(&path, key(&[7; 32])).unwrap();
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

    /// About one double in ten printed shortest (as serde_json writes it) did not parse back to
    /// the same double with serde_json's fast parser: a trail holding one (a charge's ρ, a
    /// parameter) stopped verifying, and the service refused to start on its own trail.
    #[test]
    fn doubles_in_a_record_read_back_exactly_and_the_trail_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let trail = open(&path, key(&[7; 32])).unwrap();
        // Each is printed shortest and parsed back one unit off without exact parsing.
        let doubles = [0.9856906946328695, 0.21291890726713458, 0.0930719618838648];
        for x in doubles {
            let entry = Entry {
                method: "RunQuery".into(),
                outcome: "ok".into(),
                params: Some(serde_json::json!({ "rho": x })),
                ..Default::default()
            };
            trail.append(entry, chrono::Utc::now()).unwrap();
        }
        drop(trail);
        let verified = verify(&path, &key(&[7; 32]), None).unwrap();
        assert_eq!(verified.records, doubles.len() as u64);
        let read = read(&path).unwrap();
        let back: Vec<f64> = read
            .iter()
            .map(|r| r.entry.params.as_ref().unwrap()["rho"].as_f64().unwrap())
            .collect();
        assert_eq!(back, doubles);
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
            open(&path, key(&[7; 32])).is_err(),
            "the service refuses it"
        );
        // Rewritten whole by someone without the key, checkpoint and all.
        std::fs::write(&path, "").unwrap();
        std::fs::remove_file(checkpoint_path(&path)).unwrap();
        let forged = open(&path, key(&[9; 32])).unwrap();
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
