//! A member's erasure in the store: every retailer table file that holds one of the members
//! (the member table, each collaboration's member tokens, the purchases files, the consent files)
//! is rewritten without their rows, and the erasure tombstones are rewritten with theirs, in one
//! commit of the manifest. A crash leaves the old state or the new one, never half: the files
//! written are staged (synced, renamed into place) before the commit, and the files replaced are
//! removed after it (or at the next start, as files no manifest names).
//!
//! Partners' lists are not touched: they hold the partner's tokens, not the retailer's members,
//! and an erased member's own tokens go from the member tokens, so no list can match them again.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use cleanroom_core::token::MemberDigestKey;
use datafusion::arrow::array::{
    Array, BooleanArray, Int64Array, StringArray, StringBuilder, TimestampMicrosecondBuilder,
};
use datafusion::arrow::compute::{filter_record_batch, not};
use datafusion::arrow::record_batch::RecordBatch;
use sha2::{Digest, Sha256};

use super::{CommitRecord, Manifest, Produced, Staging, Store, TableFile, WriteFacts, file_safe};
use crate::ingest::{Sink, Table};
use crate::{Error, Result, tables};

/// The method an erasure is committed and recorded under.
pub const ERASE_MEMBERS: &str = "EraseMembers";

/// What an erasure is asked to remove.
pub struct ErasureAsk<'a> {
    /// The members' pseudonyms.
    pub members: &'a HashSet<i64>,
    /// The key of the tombstones' member digests.
    pub digests: &'a MemberDigestKey,
    /// The purposes the rules configure: every one gets a tombstone, with any other purpose the
    /// member's removed consent events name.
    pub purposes: &'a [String],
    /// When: consent events up to this instant are refused for the members from now on.
    pub at: DateTime<Utc>,
    /// Tombstones to put back as they were, by member digest, with the instant of their erasure
    /// (microseconds), each for every configured purpose: erasures a restore from backup lost,
    /// which the high-water mark remembers, including members no table holds any more.
    pub restored: &'a BTreeMap<i64, i64>,
    /// Called once every file is staged, before the commit (crash tests pause here).
    pub before_commit: &'a dyn Fn(),
}

/// What an erasure removed, in counts only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Erased {
    /// Members of those asked that the member table held.
    pub members_found: u64,
    /// Rows removed, by table (`members`, `member_tokens`, `purchases`, `consent`).
    pub rows_removed: BTreeMap<String, u64>,
    /// Tombstones written (one per member asked and purpose).
    pub tombstones: u64,
    /// Data files replaced or removed.
    pub files_replaced: u64,
}

/// One file the erasure changes: replaced by `staging` (its rows without the members'), or
/// removed when nothing is left and the table may lose the file.
struct FilePlan {
    name: String,
    table: Table,
    staging: Option<Staging>,
}

/// The retailer's files as the erasure read them: a write committed since makes it start again.
#[derive(PartialEq)]
struct Read {
    members: Option<String>,
    member_tokens: BTreeMap<String, String>,
    purchases: Vec<String>,
    consent: Vec<String>,
    erasures: Option<String>,
}

impl Read {
    fn of(manifest: &Manifest) -> Self {
        Self {
            members: manifest.members.clone(),
            member_tokens: manifest.member_tokens.clone(),
            purchases: manifest.purchases.clone(),
            consent: manifest.consent.clone(),
            erasures: manifest.erasures.clone(),
        }
    }
}

impl Store {
    /// Erases `ask.members` from every retailer table, in one commit, and writes their
    /// tombstones. Returns the commit and what it removed (counts only).
    pub fn commit_erasure(
        &self,
        ask: &ErasureAsk<'_>,
        facts: WriteFacts,
    ) -> Result<(CommitRecord, Erased)> {
        let before = self.writer.lock().expect("writer lock poisoned").clone();
        let read = Read::of(&before);
        let mut erased = Erased::default();
        let mut purposes: BTreeMap<i64, BTreeSet<String>> = BTreeMap::new();
        let mut plans = Vec::new();
        let files = self.retailer_files(&read)?;
        for (name, table, kind) in files {
            let mut note = |removed: &RecordBatch| {
                if kind == "consent" {
                    note_purposes(removed, &mut purposes);
                }
            };
            let keep_empty = matches!(table, Table::Members | Table::MemberTokens(_));
            let Some((plan, removed)) =
                self.erasure_plan(&name, table, ask.members, keep_empty, &mut note)?
            else {
                continue;
            };
            *erased.rows_removed.entry(kind.to_string()).or_default() += removed;
            if kind == "members" {
                erased.members_found = removed;
            }
            plans.push(plan);
        }
        erased.files_replaced = plans.len() as u64;
        let (tombstones, written) = self.tombstones(&read, ask, &purposes)?;
        erased.tombstones = written;
        (ask.before_commit)();
        let record = self.commit(facts, |manifest, place| {
            if Read::of(manifest) != read {
                return Err(cleanroom_core::Error::Busy(
                    "a write was committed while the erasure read the tables; erase again".into(),
                )
                .into());
            }
            let mut digests = BTreeMap::new();
            for plan in plans {
                if let Some((name, digest)) = replace(manifest, plan, place)? {
                    digests.insert(name, digest);
                }
            }
            let mut tombstones = tombstones;
            manifest.erasures = Some(place("erasures", tombstones.table(&Table::Erasures)?)?);
            if erased.rows_removed.contains_key("consent") {
                manifest.consent_chain = consent_chain(manifest, &digests)?;
            }
            Ok(Produced {
                consent_snapshot_id: Some(manifest.consent_snapshot_id()),
                ..Produced::default()
            })
        })?;
        let now_erased = erased_in(self.snapshot().erasures.as_ref())?;
        *self.erased.lock().expect("erased lock poisoned") = now_erased;
        Ok((record, erased))
    }

    /// Every retailer table file, with its table and its kind's name.
    fn retailer_files(&self, read: &Read) -> Result<Vec<(String, Table, &'static str)>> {
        let mut files = Vec::new();
        if let Some(name) = &read.members {
            files.push((name.clone(), Table::Members, "members"));
        }
        for (contract, name) in &read.member_tokens {
            let table = Table::MemberTokens(contract.clone());
            files.push((name.clone(), table, "member_tokens"));
        }
        for name in &read.purchases {
            let month = super::retention::month_of(name).ok_or_else(|| {
                Error::Storage(format!(
                    "{name}: not a purchases file name (purchases-YYYY-MM-n.parquet)"
                ))
            })?;
            let table = Table::Purchases(month.to_string());
            files.push((name.clone(), table, "purchases"));
        }
        for name in &read.consent {
            files.push((name.clone(), Table::Consent, "consent"));
        }
        Ok(files)
    }

    /// What the erasure does to one file: nothing (`None`) when it holds none of `members`' rows,
    /// else the file of the rows kept (none at all: no file, unless `keep_empty`) and how many
    /// rows it removes. `removed` sees the removed rows. Every table keys its rows by the member's
    /// pseudonym in its first column (`member_key`, or `owner` of member tokens).
    fn erasure_plan(
        &self,
        name: &str,
        table: Table,
        members: &HashSet<i64>,
        keep_empty: bool,
        removed: &mut dyn FnMut(&RecordBatch),
    ) -> Result<Option<(FilePlan, u64)>> {
        let (file, mut staging) = self.rewrite_of(name, &table)?;
        let (mut gone, mut kept) = (0u64, 0u64);
        let mut schema = None;
        for batch in file.batches()? {
            let batch = batch?;
            schema.get_or_insert_with(|| batch.schema());
            let keys = tables::member_keys(&batch)
                .ok_or_else(|| Error::Storage(format!("{name}: its first column is no key")))?;
            let erase: BooleanArray = keys
                .iter()
                .map(|k| k.map(|k| members.contains(&k)))
                .collect();
            let leaving = filter_record_batch(&batch, &erase)?;
            let staying = filter_record_batch(&batch, &not(&erase)?)?;
            gone += leaving.num_rows() as u64;
            kept += staying.num_rows() as u64;
            if leaving.num_rows() > 0 {
                removed(&leaving);
            }
            if staying.num_rows() > 0 {
                staging.write(&table, staying)?;
            }
        }
        if gone == 0 {
            return Ok(None);
        }
        if kept == 0 && keep_empty {
            let schema = schema.expect("a file with removed rows has a batch");
            staging.write(&table, RecordBatch::new_empty(schema))?;
        }
        let staging = if kept > 0 || keep_empty {
            staging.close()?;
            Some(staging)
        } else {
            None
        };
        let plan = FilePlan {
            name: name.to_string(),
            table,
            staging,
        };
        Ok(Some((plan, gone)))
    }

    /// The tombstones after this erasure, staged: those kept before and, for every member asked,
    /// one per purpose (the rules' and those of their removed events), at the erasure's time. A
    /// member erased again keeps one tombstone per purpose, at the later erasure. Returns the
    /// staging and how many tombstones this erasure wrote.
    fn tombstones(
        &self,
        read: &Read,
        ask: &ErasureAsk<'_>,
        purposes: &BTreeMap<i64, BTreeSet<String>>,
    ) -> Result<(Staging, u64)> {
        let mut all: BTreeMap<(i64, String), i64> = BTreeMap::new();
        if let Some(name) = &read.erasures {
            let (file, _) = self.rewrite_of(name, &Table::Erasures)?;
            for (digest, purpose, at) in tombstone_rows(&file)? {
                all.insert((digest, purpose), at);
            }
        }
        let at = ask.at.timestamp_micros();
        let mut written = 0;
        for member in ask.members {
            let own = purposes.get(member).into_iter().flatten();
            let every: BTreeSet<&String> = ask.purposes.iter().chain(own).collect();
            for purpose in every {
                all.insert((ask.digests.digest(*member), purpose.clone()), at);
                written += 1;
            }
        }
        for (digest, at) in ask.restored {
            for purpose in ask.purposes {
                all.insert((*digest, purpose.clone()), *at);
                written += 1;
            }
        }
        let mut staging = self.staging();
        let mut digests = datafusion::arrow::array::Int64Builder::new();
        let mut names = StringBuilder::new();
        let mut times = TimestampMicrosecondBuilder::new().with_timezone("UTC");
        for ((digest, purpose), at) in all {
            digests.append_value(digest);
            names.append_value(purpose);
            times.append_value(at);
        }
        let batch = RecordBatch::try_new(
            tables::erasures::schema(),
            vec![
                Arc::new(digests.finish()),
                Arc::new(names.finish()),
                Arc::new(times.finish()),
            ],
        )?;
        staging.write(&Table::Erasures, batch)?;
        staging.close()?;
        Ok((staging, written))
    }
}

impl Store {
    /// The members erased so far, by member digest, with the instant (microseconds) of their
    /// latest erasure: what the high-water mark keeps, so that a restore from backup that lost an
    /// erasure is seen and the erasure done again.
    pub fn erased(&self) -> BTreeMap<i64, i64> {
        self.erased.lock().expect("erased lock poisoned").clone()
    }

    /// The pseudonyms, in any retailer table (members, purchases, consent), whose member digest
    /// under `digests` is one of `wanted`: the members of erasures a restore lost.
    pub fn members_with_digests(
        &self,
        wanted: &BTreeMap<i64, i64>,
        digests: &MemberDigestKey,
    ) -> Result<HashSet<i64>> {
        let snapshot = self.snapshot();
        let mut found = HashSet::new();
        let files = snapshot
            .members
            .iter()
            .chain(&snapshot.purchases)
            .chain(&snapshot.consent);
        for file in files {
            for batch in file.batches()? {
                let batch = batch?;
                let keys = tables::member_keys(&batch)
                    .ok_or_else(|| Error::Storage("a retailer table without its key".into()))?;
                for key in keys.values().iter() {
                    if !found.contains(key) && wanted.contains_key(&digests.digest(*key)) {
                        found.insert(*key);
                    }
                }
            }
        }
        Ok(found)
    }
}

/// The members a tombstones file names, by digest, with the instant of their latest erasure.
pub(super) fn erased_in(tombstones: Option<&TableFile>) -> Result<BTreeMap<i64, i64>> {
    let mut erased = BTreeMap::new();
    if let Some(file) = tombstones {
        for (digest, _, at) in tombstone_rows(file)? {
            let latest = erased.entry(digest).or_insert(at);
            *latest = (*latest).max(at);
        }
    }
    Ok(erased)
}

/// The running SHA-256 over the consent files' digests, in ingest order, as consent ingests
/// extend it: files an erasure rewrote change the consent log's content, so its chain (and the
/// consent snapshot id) is computed anew. `placed` holds the digests of files placed by this
/// commit, which the manifest records only once it is committed.
fn consent_chain(manifest: &Manifest, placed: &BTreeMap<String, [u8; 32]>) -> Result<String> {
    let mut chain = String::new();
    for file in &manifest.consent {
        let digest = match placed.get(file) {
            Some(digest) => digest.to_vec(),
            None => hex::decode(manifest.digest(file))
                .map_err(|_| Error::Storage(format!("{file}: no digest in the manifest")))?,
        };
        let mut next = Sha256::new();
        next.update(chain.as_bytes());
        next.update(digest);
        chain = hex::encode(next.finalize());
    }
    Ok(chain)
}

/// Puts a file's replacement in its place in the manifest (or removes it). Returns the file
/// placed, with its SHA-256.
fn replace(
    manifest: &mut Manifest,
    mut plan: FilePlan,
    place: &mut super::Placer<'_>,
) -> Result<Option<(String, [u8; 32])>> {
    let mut written = None;
    if let Some(staging) = plan.staging.as_mut() {
        let stem = match &plan.table {
            Table::Members => "members".to_string(),
            Table::MemberTokens(contract) => format!("member_tokens-{}", file_safe(contract)),
            Table::Purchases(month) => format!("purchases-{}", file_safe(month)),
            _ => "consent".to_string(),
        };
        let staged = staging.table(&plan.table)?;
        let digest = staged.digest;
        written = Some((place(&stem, staged)?, digest));
    }
    let placed = written.as_ref().map(|(name, _)| name.clone());
    let name = plan.name;
    match plan.table {
        Table::Members => manifest.members = placed,
        Table::MemberTokens(contract) => match placed {
            Some(file) => {
                manifest.member_tokens.insert(contract, file);
            }
            None => {
                manifest.member_tokens.remove(&contract);
            }
        },
        Table::Purchases(_) => swap(&mut manifest.purchases, &name, placed)?,
        _ => swap(&mut manifest.consent, &name, placed)?,
    }
    Ok(written)
}

/// Replaces `name` in `files` by `placed`, keeping its place (or removes it).
fn swap(files: &mut Vec<String>, name: &str, placed: Option<String>) -> Result<()> {
    let at = files
        .iter()
        .position(|f| f == name)
        .ok_or_else(|| Error::Storage(format!("{name} is gone")))?;
    match placed {
        Some(file) => files[at] = file,
        None => {
            files.remove(at);
        }
    }
    Ok(())
}

/// Notes, per member, the purposes of their removed consent events.
fn note_purposes(removed: &RecordBatch, purposes: &mut BTreeMap<i64, BTreeSet<String>>) {
    let keys = removed
        .column(tables::consent::MEMBER_KEY)
        .as_any()
        .downcast_ref::<Int64Array>();
    let names = removed
        .column(tables::consent::PURPOSE)
        .as_any()
        .downcast_ref::<StringArray>();
    let (Some(keys), Some(names)) = (keys, names) else {
        return;
    };
    for (key, purpose) in keys.iter().zip(names.iter()) {
        if let (Some(key), Some(purpose)) = (key, purpose) {
            purposes.entry(key).or_default().insert(purpose.to_string());
        }
    }
}

/// The rows of an erasure tombstones file (`tables::erasures`): member digest, purpose, erased at
/// (microseconds since the epoch).
pub fn tombstone_rows(file: &TableFile) -> Result<Vec<(i64, String, i64)>> {
    use datafusion::arrow::array::TimestampMicrosecondArray;
    let mut rows = Vec::new();
    for batch in file.batches()? {
        let batch = batch?;
        let bad = || Error::Storage("the erasure tombstones have an unexpected schema".into());
        let digests = batch
            .column(tables::erasures::MEMBER_DIGEST)
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(bad)?;
        let purposes = batch
            .column(tables::erasures::PURPOSE)
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(bad)?;
        let times = batch
            .column(tables::erasures::ERASED_AT)
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .ok_or_else(bad)?;
        for i in 0..batch.num_rows() {
            rows.push((
                digests.value(i),
                purposes.value(i).to_string(),
                times.value(i),
            ));
        }
    }
    Ok(rows)
}
