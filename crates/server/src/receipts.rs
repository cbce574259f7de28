//! Records of receipt (APPI Art. 30(3); which items, to be checked against the official text of
//! the Enforcement Rules): one record per accepted list version, with the date, the provider and
//! how it acquired the data (its declaration), the items received, the members concerned (by a
//! keyed digest of their pseudonym, [`member_digest`]: never an identifier, nor the engine's
//! pseudonym), the contract and the consent basis.
//!
//! Why a digest of its own: the law asks these records to be kept three years whatever else
//! happens, a member's erasure included, while an erased member's pseudonym (the key every table
//! joins on) must be in no file. The digest is under its own key derived from the master secret,
//! so it matches nothing in the tables; disclosure computes it from the member id asked for.
//!
//! They are kept apart from the data a collaboration's destruction removes (`receipts.jsonl`
//! in the data directory, named by no manifest), because the law asks the retailer to keep them
//! for years after the data itself is gone: [`KEEP_DAYS`] after the day of receipt, whatever the
//! retention rules say, then purged with an audit record.
//!
//! They are a keyed hash chain kept exactly as the audit trail is kept ([`crate::audit`]'s
//! [`Record`], [`ChainKey`] and checkpoint), under a key derived from the trail's. A purge cuts
//! records from the start of the chain; the signed head of what was cut (`receipts.base`) is
//! where verification starts, so a record removed any other way, or a base not signed with the
//! key, does not verify.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, NaiveDate, Utc};
use cleanroom_core::files::{self, AppendLog, TornTail, read_jsonl};
use serde::{Deserialize, Serialize};

use crate::audit::{self, ChainKey, Checkpoint, Record};
use crate::{Error, Result};

/// Days a record of receipt is kept after its day of receipt: three years, a leap day included
/// (the Enforcement Rules' period for records of receipt, to be checked against the official
/// text; the longest of the periods they set).
pub const KEEP_DAYS: u64 = 1096;

/// The file of the records, in the data directory.
pub const FILE: &str = "receipts.jsonl";

/// Who provided the data, as its declaration names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provider {
    /// Its legal name.
    pub legal_name: String,
    /// Its address.
    pub address: String,
    /// Its representative.
    pub representative: String,
}

/// One record of receipt: one accepted version of a partner's list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    /// The day of receipt (the retailer's local date).
    pub received_on: NaiveDate,
    /// The partner (its id in the rules).
    pub partner: String,
    /// The provider, as its declaration names it.
    pub provider: Provider,
    /// How the provider acquired the data, as it declared.
    pub acquisition: String,
    /// The basis of the provision (for example `consent`).
    pub basis: String,
    /// The signed declaration (relative to the rules file) and its SHA-256.
    pub declaration_document: String,
    /// The declaration's SHA-256.
    pub declaration_sha256: String,
    /// The declaration's last day.
    pub declaration_valid_until: NaiveDate,
    /// The contract (collaboration) the data was received under.
    pub contract: String,
    /// The contract clause that allows the use.
    pub clause: String,
    /// The purpose the members consented to, which only consenting members are counted for.
    pub purpose: String,
    /// The items received, in words.
    pub items: Vec<String>,
    /// The list version stored.
    pub list_version: u32,
    /// The store's commit of it.
    pub commit: u64,
    /// Records received and accepted.
    pub records: (u64, u64),
    /// The retailer's members the list named (matched), by [`member_digest`], ascending.
    pub members: Vec<i64>,
}

impl Receipt {
    /// The last day it is kept.
    pub fn keep_until(&self) -> NaiveDate {
        self.received_on + chrono::Days::new(KEEP_DAYS)
    }

    /// Whether it names the member whose [`member_digest`] is `member`.
    pub fn names(&self, member: i64) -> bool {
        self.members.binary_search(&member).is_ok()
    }
}

/// What a purge removed.
#[derive(Debug, Clone, PartialEq)]
pub struct Purged {
    /// Records removed.
    pub records: u64,
    /// The last removed record's position and hash: where the chain now starts.
    pub base: Checkpoint,
    /// The newest day of receipt removed.
    pub newest_received_on: NaiveDate,
}

/// The open chain: where the next record goes.
struct Tail {
    log: AppendLog,
    base: Checkpoint,
    seq: u64,
    hash: String,
}

/// The records of receipt of a data directory, open for appending.
pub struct Receipts {
    path: PathBuf,
    key: ChainKey,
    tail: Mutex<Tail>,
    /// Where the chain ends, apart from `tail`: the high-water mark reads it while a purge,
    /// holding `tail`, appends its audit record (which rewrites the mark).
    end: Mutex<audit::ChainEnd>,
    /// Held from a list's commit to its record, so uploads are recorded one at a time.
    uploads: tokio::sync::Mutex<()>,
}

/// Where the signed start of a purged chain is kept.
fn base_path(path: &Path) -> PathBuf {
    path.with_extension("base")
}

/// How a record of receipt names the member with pseudonym `pseudonym` (module docs).
pub fn member_digest(secret: &cleanroom_core::token::MasterSecret, pseudonym: i64) -> i64 {
    secret.member_digest_key("receipts").digest(pseudonym)
}

/// The key of the receipts' chain, from the audit trail's.
pub fn chain_key(audit: &ChainKey) -> ChainKey {
    audit.derived("receipts")
}

/// What a read of the records found.
struct Read {
    /// Where the chain starts: the signed head of the records purged before it.
    base: Checkpoint,
    records: Vec<Record<Receipt>>,
    /// A torn last record (a write cut by a crash): not a record; opening cuts it.
    torn: Option<TornTail>,
}

/// The records of `path` after its purged start, verified against the chain key, the purged
/// start and the checkpoint. Records at or before the start are a purge a crash cut short (the
/// start is written first): the record at the start must be the one it names.
fn read_verified(path: &Path, key: &ChainKey) -> Result<Read> {
    let (lines, torn) = read_jsonl(path, false)?;
    let mut records: Vec<Record<Receipt>> = audit::parse_records(&lines)?;
    let base = match std::fs::read(base_path(path)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| Error::Internal(format!("{}: {e}", base_path(path).display())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => key.genesis(),
        Err(e) => return Err(Error::Internal(format!("{}: {e}", path.display()))),
    };
    if let Some(at_base) = records.iter().find(|r| r.seq == base.seq)
        && at_base.hash != base.head
    {
        return Err(Error::Internal(format!(
            "{}: record {} differs from the purged start",
            path.display(),
            base.seq
        )));
    }
    records.retain(|r| r.seq > base.seq);
    audit::verify_chain(key, &base, &records)
        .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
    match audit::read_checkpoint(path)? {
        Some(checkpoint) => key.check_from(&base, &checkpoint, &records)?,
        None if !records.is_empty() => {
            return Err(Error::Internal(format!(
                "{} is missing while {} holds records",
                audit::checkpoint_path(path).display(),
                path.display()
            )));
        }
        None => {}
    }
    Ok(Read {
        base,
        records,
        torn,
    })
}

/// Verifies the records of receipt in `data_dir` without changing them; returns how many there
/// are and the position the chain starts after (records purged before it).
pub fn verify(data_dir: &Path, audit_key: &ChainKey) -> Result<(usize, u64)> {
    let read = read_verified(&data_dir.join(FILE), &chain_key(audit_key))?;
    Ok((read.records.len(), read.base.seq))
}

/// Where the verified records of receipt in `data_dir` end: how many were ever appended (purged
/// ones included) and the last one's hash, as the high-water mark counts them.
pub fn end(data_dir: &Path, audit_key: &ChainKey) -> Result<audit::ChainEnd> {
    let read = read_verified(&data_dir.join(FILE), &chain_key(audit_key))?;
    Ok(read
        .records
        .last()
        .map_or((read.base.seq, read.base.head.clone()), |r| {
            (r.seq, r.hash.clone())
        }))
}

/// Reads the verified records of receipt in `data_dir`, oldest first.
pub fn read(data_dir: &Path, audit_key: &ChainKey) -> Result<Vec<Record<Receipt>>> {
    Ok(read_verified(&data_dir.join(FILE), &chain_key(audit_key))?.records)
}

impl Receipts {
    /// Opens the records of `data_dir`, verifying them, and finishes a purge a crash cut short.
    /// A torn last record (a crash mid-write) is cut and returned, for the caller to record.
    pub fn open(data_dir: &Path, audit_key: &ChainKey) -> Result<(Self, Option<TornTail>)> {
        let path = data_dir.join(FILE);
        let key = chain_key(audit_key);
        let Read {
            base,
            records,
            torn,
        } = read_verified(&path, &key)?;
        if let Some(torn) = &torn {
            files::cut_torn_tail(torn)?;
        }
        let (seq, hash) = records
            .last()
            .map_or((base.seq, base.head.clone()), |r| (r.seq, r.hash.clone()));
        rewrite(&path, &records)?;
        audit::write_checkpoint(&path, &key.checkpoint(seq, &hash))?;
        let log = AppendLog::open(&path, records.len() as u64)?;
        let receipts = Self {
            path,
            key,
            end: Mutex::new((seq, hash.clone())),
            tail: Mutex::new(Tail {
                log,
                base,
                seq,
                hash,
            }),
            uploads: tokio::sync::Mutex::new(()),
        };
        Ok((receipts, torn))
    }

    /// Where the records end: how many were ever appended and the last one's hash.
    pub fn end(&self) -> audit::ChainEnd {
        self.end.lock().expect("receipts lock poisoned").clone()
    }

    /// Holds uploads back while one list is stored and its record written.
    pub async fn hold(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.uploads.lock().await
    }

    /// Appends one record and returns its id once it and its checkpoint are on disk. Blocking.
    pub fn append(&self, receipt: Receipt, at: DateTime<Utc>) -> Result<String> {
        let mut tail = self.tail.lock().expect("receipts lock poisoned");
        let seq = tail.seq + 1;
        let mut record = Record {
            seq,
            id: self.key.record_id(seq).replacen("a-", "r-", 1),
            at: at.to_rfc3339(),
            entry: receipt,
            prev: tail.hash.clone(),
            hash: String::new(),
        };
        record.hash = self.key.record_hash(&record)?;
        let line = serde_json::to_vec(&record).map_err(|e| Error::Internal(e.to_string()))?;
        tail.log.append(&line)?;
        // The record is on disk: the chain goes on from it even if its checkpoint cannot be
        // written (a checkpoint behind the chain verifies), or the next record would repeat its
        // place in the chain.
        tail.seq = seq;
        *self.end.lock().expect("receipts lock poisoned") = (seq, record.hash.clone());
        tail.hash = record.hash.clone();
        audit::write_checkpoint(&self.path, &self.key.checkpoint(seq, &record.hash))?;
        Ok(record.id)
    }

    /// Every record kept, oldest first, verified.
    pub fn records(&self) -> Result<Vec<Record<Receipt>>> {
        Ok(self.records_after_purge()?.1)
    }

    /// Every record kept, oldest first, verified, after the position of the last purged record
    /// (0 if none was purged).
    pub fn records_after_purge(&self) -> Result<(u64, Vec<Record<Receipt>>)> {
        let _tail = self.tail.lock().expect("receipts lock poisoned");
        let read = read_verified(&self.path, &self.key)?;
        Ok((read.base.seq, read.records))
    }

    /// Removes the records whose keeping ended before `today` (the retailer's local date): the
    /// start of the chain, up to the first record still kept. The new start is written (signed)
    /// before the file is rewritten without them, so a crash between the two is finished at the
    /// next open. `record` is told what will be removed before anything is (the audit record: a
    /// purge the trail cannot hold does not happen). Returns what it removed, if anything.
    pub fn purge(
        &self,
        today: NaiveDate,
        record: impl FnOnce(&Purged) -> Result<()>,
    ) -> Result<Option<Purged>> {
        let mut tail = self.tail.lock().expect("receipts lock poisoned");
        let records = read_verified(&self.path, &self.key)?.records;
        let ended = records
            .iter()
            .take_while(|r| r.entry.keep_until() < today)
            .count();
        let Some(last) = ended.checked_sub(1).map(|i| &records[i]) else {
            return Ok(None);
        };
        let base = self.key.checkpoint(last.seq, &last.hash);
        let purged = Purged {
            records: (last.seq - tail.base.seq),
            base: base.clone(),
            newest_received_on: last.entry.received_on,
        };
        record(&purged)?;
        let bytes = serde_json::to_vec(&base).map_err(|e| Error::Internal(e.to_string()))?;
        files::write_atomic(&base_path(&self.path), &bytes)?;
        rewrite(&self.path, &records[ended..])?;
        tail.log = AppendLog::open(&self.path, (records.len() - ended) as u64)?;
        tail.base = base;
        Ok(Some(purged))
    }
}

/// Writes `records` as the whole file, atomically (unchanged if it already holds exactly them).
fn rewrite(path: &Path, records: &[Record<Receipt>]) -> Result<()> {
    let mut bytes = Vec::new();
    for record in records {
        bytes.extend(serde_json::to_vec(record).map_err(|e| Error::Internal(e.to_string()))?);
        bytes.push(b'\n');
    }
    let same = std::fs::read(path).is_ok_and(|old| old == bytes);
    if same || (records.is_empty() && !path.exists()) {
        return Ok(());
    }
    Ok(files::write_atomic(path, &bytes)?)
}
