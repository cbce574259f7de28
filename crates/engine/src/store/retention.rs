//! What the retention rules destroy in the store: list versions beyond those a contract keeps or
//! older than it keeps a list, and purchases older than the retailer keeps them. Each is one
//! commit of the manifest, like every write: the files it no longer names are removed after it
//! (or at the next start, if a crash comes first).

use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use datafusion::arrow::array::{Array, BooleanArray, TimestampMicrosecondArray};
use datafusion::arrow::compute::filter_record_batch;

use super::{CommitRecord, DestroyedFile, Produced, Snapshot, Staging, Store, WriteFacts};
use super::{Manifest, file_safe};
use crate::ingest::{Sink, Table};
use crate::tables::purchases::PURCHASED_AT;
use crate::{Error, Result};

/// The method the service's own destructions are committed and recorded under.
pub const SWEEP: &str = "Sweep";

/// One stored version of a partner's list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListVersion {
    /// Its number.
    pub version: u32,
    /// Its file in the data directory.
    pub file: String,
    /// When its upload was committed, from the manifest's log.
    pub uploaded: Option<DateTime<Utc>>,
    /// An answer is being computed over it now: it is not destroyed until that ends.
    pub in_use: bool,
}

/// What a purchases retention removed: every file it replaced or removed and every file it wrote
/// in their place, each by name, SHA-256 and rows (never a row's content).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PurchasesRemoved {
    /// Purchases made before local midnight of this day were removed.
    pub kept_from: NaiveDate,
    /// Purchase rows removed.
    pub removed_rows: u64,
    /// The files removed (whole, or rewritten without the old rows).
    pub removed: Vec<DestroyedFile>,
    /// The files written in place of those that kept some rows.
    pub written: Vec<DestroyedFile>,
}

impl CommitRecord {
    /// For a commit of [`Store::commit_list_retention`]: the partner and the newest list version
    /// it destroyed (every older one is gone too).
    pub fn retired_lists(&self) -> Option<(&str, u32)> {
        if self.method != SWEEP || self.ended.is_some() {
            return None;
        }
        Some((self.partner.as_deref()?, self.list_version?))
    }
}

/// One purchases file the retention changes: removed whole, or replaced by `staging`.
struct PurchasesPlan {
    name: String,
    month: String,
    staging: Option<Staging>,
    rows: u64,
    kept: u64,
}

impl Store {
    /// Every stored version of `partner`'s list, oldest first.
    pub fn list_versions(&self, partner: &str) -> Vec<ListVersion> {
        let manifest = self.writer.lock().expect("writer lock poisoned").clone();
        let files = manifest.lists.get(partner).cloned().unwrap_or_default();
        let first = manifest.lists_dropped.get(partner).copied().unwrap_or(0) + 1;
        let readers = self.snapshots_being_read();
        files
            .into_iter()
            .enumerate()
            .map(|(at, file)| {
                let path = self.dir.join(&file);
                let in_use = readers.iter().any(|s| {
                    s.lists
                        .get(partner)
                        .is_some_and(|list| list.file.path == path)
                });
                let uploaded = manifest
                    .log
                    .iter()
                    .rfind(|c| c.files.contains(&file))
                    .map(|c| c.at);
                ListVersion {
                    version: first + u32::try_from(at).unwrap_or(u32::MAX),
                    file,
                    uploaded,
                    in_use,
                }
            })
            .collect()
    }

    /// Snapshots someone holds besides the store: replaced ones still alive, and the current one
    /// while a reader holds it.
    fn snapshots_being_read(&self) -> Vec<Arc<Snapshot>> {
        let mut readers: Vec<Arc<Snapshot>> = self
            .replaced
            .lock()
            .expect("replaced lock poisoned")
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect();
        let current = self.snapshot();
        // Two references are the store's and the one just taken.
        if Arc::strong_count(&current) > 2 {
            readers.push(current);
        }
        readers
    }

    /// Destroys `partner`'s list versions up to and including `through`, in one commit, unless
    /// an answer is being computed over one of them (`None`: try again later). With
    /// `destroyed_on`, the partner's questions are refused naming that day until it uploads a
    /// new list, if no version is left. Returns the commit and each file destroyed.
    pub fn commit_list_retention(
        &self,
        partner: &str,
        through: u32,
        destroyed_on: Option<NaiveDate>,
        facts: WriteFacts,
    ) -> Result<Option<(CommitRecord, Vec<DestroyedFile>)>> {
        let doomed: Vec<ListVersion> = self
            .list_versions(partner)
            .into_iter()
            .filter(|v| v.version <= through)
            .collect();
        if doomed.is_empty() || doomed.iter().any(|v| v.in_use) {
            return Ok(None);
        }
        let mut destroyed = Vec::new();
        let record = self.commit(facts, |manifest, _| {
            let files = manifest.lists.entry(partner.to_string()).or_default();
            let gone: Vec<String> = files.drain(..doomed.len().min(files.len())).collect();
            let left = files.len();
            *manifest
                .lists_dropped
                .entry(partner.to_string())
                .or_default() += u32::try_from(gone.len()).unwrap_or(u32::MAX);
            if let (Some(day), 0) = (destroyed_on, left) {
                manifest.lists_destroyed.insert(partner.to_string(), day);
            }
            for name in gone {
                destroyed.push(self.destroyed_file(manifest, name)?);
            }
            Ok(Produced {
                list_version: Some(through),
                ..Produced::default()
            })
        })?;
        Ok(Some((record, destroyed)))
    }

    /// A file about to be destroyed, by name, SHA-256 and rows.
    pub(super) fn destroyed_file(
        &self,
        manifest: &Manifest,
        name: String,
    ) -> Result<DestroyedFile> {
        let rows = self.table_file(manifest, &name).rows()?;
        let sha256 = manifest.digest(&name).to_string();
        Ok(DestroyedFile { name, sha256, rows })
    }

    /// Removes every purchase made before `kept_from` (local midnight of `kept_from_day`) from
    /// the purchases files, in one commit: a file of only older purchases is removed, a file of
    /// both is replaced by one of the purchases kept. Months that begin on or after the day are
    /// not read. `None` when nothing is older: nothing is written.
    pub fn commit_purchase_retention(
        &self,
        kept_from: DateTime<Utc>,
        kept_from_day: NaiveDate,
        facts: WriteFacts,
    ) -> Result<Option<(CommitRecord, PurchasesRemoved)>> {
        let before = self.writer.lock().expect("writer lock poisoned").clone();
        let mut plans = Vec::new();
        for name in &before.purchases {
            if let Some(plan) = self.purchases_plan(name, kept_from, kept_from_day)? {
                plans.push(plan);
            }
        }
        if plans.is_empty() {
            return Ok(None);
        }
        let mut removed = PurchasesRemoved {
            kept_from: kept_from_day,
            ..PurchasesRemoved::default()
        };
        for plan in &plans {
            removed.removed_rows += plan.rows - plan.kept;
            removed
                .removed
                .push(self.destroyed_file(&before, plan.name.clone())?);
        }
        let kept: Vec<u64> = plans
            .iter()
            .filter(|p| p.staging.is_some())
            .map(|p| p.kept)
            .collect();
        let record = self.commit(facts, |manifest, place| {
            for mut plan in plans {
                let at = manifest
                    .purchases
                    .iter()
                    .position(|f| *f == plan.name)
                    .ok_or_else(|| Error::Storage(format!("{} is gone", plan.name)))?;
                match plan.staging.as_mut() {
                    Some(staging) => {
                        let staged = staging.table(&Table::Purchases(plan.month.clone()))?;
                        let stem = format!("purchases-{}", file_safe(&plan.month));
                        manifest.purchases[at] = place(&stem, staged)?;
                    }
                    None => {
                        manifest.purchases.remove(at);
                    }
                }
            }
            Ok(Produced::default())
        })?;
        let after = self.writer.lock().expect("writer lock poisoned").clone();
        removed.written = record
            .files
            .iter()
            .zip(kept)
            .map(|(name, rows)| DestroyedFile {
                name: name.clone(),
                sha256: after.digest(name).to_string(),
                rows,
            })
            .collect();
        Ok(Some((record, removed)))
    }

    /// What the purchases retention does to one file: nothing (`None`) when it holds no purchase
    /// before `kept_from`, else remove it or write the purchases it keeps to a new file.
    fn purchases_plan(
        &self,
        name: &str,
        kept_from: DateTime<Utc>,
        kept_from_day: NaiveDate,
    ) -> Result<Option<PurchasesPlan>> {
        let Some(month) = month_of(name) else {
            return Err(Error::Storage(format!(
                "{name}: not a purchases file name (purchases-YYYY-MM-n.parquet)"
            )));
        };
        let first_day = NaiveDate::parse_from_str(&format!("{month}-01"), "%Y-%m-%d")
            .map_err(|_| Error::Storage(format!("{name}: no month in its name")))?;
        if first_day >= kept_from_day {
            return Ok(None);
        }
        let (file, _) = self.rewrite_of(name, &Table::Purchases(month.to_string()))?;
        let rows = file.rows()?;
        let next_month = first_day
            .checked_add_months(chrono::Months::new(1))
            .unwrap_or(NaiveDate::MAX);
        let mut plan = PurchasesPlan {
            name: name.to_string(),
            month: month.to_string(),
            staging: None,
            rows,
            kept: 0,
        };
        if next_month <= kept_from_day {
            return Ok(Some(plan));
        }
        let mut staging = self.staging();
        let table = Table::Purchases(plan.month.clone());
        let cutoff = kept_from.timestamp_micros();
        for batch in file.batches()? {
            let batch = batch?;
            let at = batch
                .column(PURCHASED_AT)
                .as_any()
                .downcast_ref::<TimestampMicrosecondArray>()
                .ok_or_else(|| {
                    Error::Storage(format!("{name}: purchased_at is not a timestamp"))
                })?;
            let keep: BooleanArray = at.iter().map(|t| t.map(|t| t >= cutoff)).collect();
            let kept = filter_record_batch(&batch, &keep)?;
            plan.kept += u64::try_from(kept.num_rows()).unwrap_or(u64::MAX);
            if kept.num_rows() > 0 {
                staging.write(&table, kept)?;
            }
        }
        if plan.kept == rows {
            return Ok(None);
        }
        if plan.kept > 0 {
            staging.close()?;
            plan.staging = Some(staging);
        }
        Ok(Some(plan))
    }
}

/// The month (`YYYY-MM`) of a purchases file's name (`purchases-YYYY-MM-n.parquet`).
pub(super) fn month_of(name: &str) -> Option<&str> {
    name.strip_prefix("purchases-")?.get(..7)
}
