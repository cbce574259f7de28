//! Start-up checks first and repairs after (THREATS 17). Everything the data directory holds is
//! read and checked against itself, against the audit trail and against the high-water mark kept
//! outside it ([`Found`], [`Found::decide`]) before anything is changed: a start that is refused
//! leaves every file as it found it, so the operator can still repair the directory, and the
//! refusal names the file, what disagrees and how to recover. Only then are torn tails cut,
//! temporary and orphaned files collected and the checkpoint rewritten ([`repair`]).
//!
//! A file that a committed write in the trail names is never deleted: a manifest missing while
//! data files exist, one that counts fewer commits than the trail records, or one that disagrees
//! with the trail about a commit, stops the start instead.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use cleanroom_core::files::{self, TornTail};
use cleanroom_core::keys::KeyStore;
use cleanroom_engine::guard::{Guard, LedgerFile};
use cleanroom_engine::ingest::IngestReport;
use cleanroom_engine::store::{
    self, CommitRecord, DataKeys, ERASE_MEMBERS, ErasureAsk, Store, WriteFacts,
};

use crate::audit::{
    AuditTrail, ChainKey, Entry, ErasureCounts, Event, Record, TrailFile, UnrecordedWrite, Upload,
};
use crate::mark::{Mark, MarkKey, Shortfall};
use crate::review::{IndexFile, ReviewState};
use crate::state::AppConfig;
use crate::{Error, Result};

/// The calls that commit a write to the store, as the audit trail names them.
pub(crate) const WRITES: &[&str] = &[
    "IngestMembers",
    "IngestPurchases",
    "IngestConsent",
    "UploadList",
    "IngestPartnerList",
];

/// What the data directory (and the mark beside it) held at start, read without changing it.
pub(crate) struct Found {
    data_dir: PathBuf,
    store: store::Found,
    trail: TrailFile,
    ledger: LedgerFile,
    index: IndexFile,
    temporaries: Vec<PathBuf>,
    /// Where its records of receipt end.
    receipts: crate::audit::ChainEnd,
    mark: Option<Mark>,
    mark_path: PathBuf,
}

/// What start-up decided to repair.
pub(crate) struct Plan {
    /// Committed writes whose records a crash lost.
    unrecorded: Vec<UnrecordedWrite>,
    /// Such writes from before the manifest kept a log: counted only.
    legacy_unrecorded: u64,
    /// An accepted restore: what the directory lacks of the mark.
    restore: Option<Shortfall>,
}

/// The service's state, opened and repaired.
pub(crate) struct Opened {
    pub store: Store,
    pub audit: AuditTrail,
    pub guard: Guard,
    pub review: ReviewState,
}

impl Found {
    /// The audit trail's records as found.
    pub fn history(&self) -> &[crate::audit::Record] {
        self.trail.records()
    }

    /// Reads the data directory, its audit trail (verified), privacy ledger and archive index,
    /// the temporary files a crash left, and the high-water mark (verified with the secret).
    pub fn read(config: &AppConfig) -> Result<Self> {
        let data_dir = config.data_dir.clone();
        let key = ChainKey::new(&config.secret);
        Ok(Self {
            store: store::Found::read(&data_dir)?,
            trail: AuditTrail::read(&data_dir.join("audit.jsonl"), &key)?,
            ledger: LedgerFile::read(Guard::ledger_path(&data_dir))?,
            index: ReviewState::read_index(&data_dir)?,
            temporaries: temporaries(&data_dir)?,
            receipts: crate::receipts::end(&data_dir, &key)?,
            mark: Mark::read(&config.mark, &MarkKey::new(&config.secret))?,
            mark_path: config.mark.clone(),
            data_dir,
        })
    }

    /// Decides whether the service may start on what was found, and what to repair. Refuses,
    /// changing nothing, when the store and the trail disagree, the ledger is behind the trail,
    /// or the directory is behind its high-water mark (unless `accept_restore`).
    pub fn decide(&self, accept_restore: bool) -> Result<Plan> {
        if let Some(why) = self.store.refusal() {
            return Err(Error::Refused(why));
        }
        let history = self.trail.records();
        let writes = TrailWrites::of(history);
        self.require_manifest_as_far_as(&writes)?;
        require_whole_ledger(&self.ledger, history)?;
        let restore = match &self.mark {
            Some(mark) => mark.shortfall(
                history,
                self.store.commits(),
                self.ledger.spends(),
                &self.uploads(),
                &self.receipts,
                &self.store.erased()?,
            ),
            None => None,
        };
        if let Some(short) = &restore
            && !accept_restore
        {
            return Err(Error::Refused(short.refusal(&self.mark_path)));
        }
        let unrecorded = self
            .store
            .log()
            .iter()
            .filter(|c| !writes.commits.contains(&c.seq))
            .map(unrecorded_write)
            .collect();
        let before_log = self.store.commits() - self.store.log().len() as u64;
        Ok(Plan {
            unrecorded,
            legacy_unrecorded: before_log.saturating_sub(writes.uncounted),
            restore,
        })
    }

    /// Refuses a manifest that is behind the trail or disagrees with it: the trail records a
    /// commit the manifest does not count, names different files for one, or names a file the
    /// manifest neither holds nor replaced.
    fn require_manifest_as_far_as(&self, writes: &TrailWrites) -> Result<()> {
        let manifest = self.data_dir.join("manifest.json");
        let commits = self.store.commits();
        let recorded = writes.commits.len() as u64 + writes.uncounted;
        let last = writes.commits.last().copied().unwrap_or(0);
        if last > commits || recorded > commits {
            return Err(Error::Refused(format!(
                "{} counts {commits} committed writes but the audit trail records {} (the last \
                 numbered {last}): the manifest is older than the trail, or was lost. Put back \
                 the manifest.json that goes with this trail (from the newest backup, or restore \
                 the whole data directory from one backup). Nothing was changed, and no data \
                 file was deleted",
                manifest.display(),
                recorded.max(last)
            )));
        }
        for (seq, named) in &writes.files {
            let logged = self.store.log().iter().find(|c| c.seq == *seq);
            if logged.is_some_and(|c| &c.files != named) {
                return Err(Error::Refused(format!(
                    "{}: commit {seq} is not the write the audit trail records as commit {seq}: \
                     the manifest belongs to another history. Put back the manifest.json that \
                     goes with this trail. Nothing was changed",
                    manifest.display()
                )));
            }
        }
        let replaced = self.store.replaced();
        let named: BTreeSet<&String> = writes.files.iter().flat_map(|(_, f)| f).collect();
        if let Some(file) = self
            .store
            .orphans()
            .iter()
            .find(|f| named.contains(f) && !replaced.contains(f.as_str()))
        {
            return Err(Error::Refused(format!(
                "{} does not name {file}, which a committed write in the audit trail placed: \
                 the manifest is older than the trail. Put back the manifest.json that goes \
                 with this trail. Nothing was changed, and no data file was deleted",
                manifest.display()
            )));
        }
        Ok(())
    }

    /// The partners' accepted list uploads: the manifest's log, uploads from before it kept one
    /// (as the trail records them), and uploads carried over by accepted restores.
    fn uploads(&self) -> Vec<Upload> {
        uploads(self.store.log(), self.trail.records())
    }
}

/// The partners' accepted list uploads, for the list allowances: from the store's log, plus
/// uploads from before the log (as the trail records them) and those carried over by restores.
pub(crate) fn uploads(log: &[CommitRecord], history: &[Record]) -> Vec<Upload> {
    let logged = log
        .iter()
        .filter(|c| c.list_version.is_some())
        .filter_map(|c| {
            Some(Upload {
                partner: c.partner.clone()?,
                at: c.at,
            })
        });
    let legacy = history
        .iter()
        .filter(|r| r.entry.outcome == "ok" && r.entry.commit.is_none())
        .filter(|r| matches!(r.entry.method.as_str(), "UploadList" | "IngestPartnerList"))
        .filter_map(|r| {
            Some(Upload {
                partner: r.entry.partner.clone()?,
                at: DateTime::parse_from_rfc3339(&r.at)
                    .ok()?
                    .with_timezone(&Utc),
            })
        });
    let carried = history.iter().flat_map(|r| match &r.entry.event {
        Some(Event::RestoreAccepted {
            carried_uploads, ..
        }) => carried_uploads.clone(),
        _ => Vec::new(),
    });
    let mut all: Vec<Upload> = logged.chain(legacy).chain(carried).collect();
    all.sort();
    all.dedup();
    all
}

/// What the trail records of committed writes.
struct TrailWrites {
    /// Commits the trail accounts for: writes recorded with their commit, and commits
    /// reconciled by name.
    commits: BTreeSet<u64>,
    /// Writes recorded, or reconciled, without a commit number (trails from before commits
    /// were numbered).
    uncounted: u64,
    /// The files each numbered commit placed, as the trail records them.
    files: Vec<(u64, Vec<String>)>,
}

impl TrailWrites {
    fn of(history: &[Record]) -> Self {
        let mut writes = Self {
            commits: BTreeSet::new(),
            uncounted: 0,
            files: Vec::new(),
        };
        for record in history {
            let entry = &record.entry;
            match &entry.event {
                Some(Event::Reconciled {
                    writes: named,
                    unrecorded_writes,
                    ..
                }) => {
                    writes.commits.extend(named.iter().map(|w| w.commit));
                    if named.is_empty() {
                        writes.uncounted += unrecorded_writes;
                    }
                }
                _ if entry.outcome == "ok" && WRITES.contains(&entry.method.as_str()) => {
                    match entry.commit {
                        Some(seq) => {
                            writes.commits.insert(seq);
                            if let Some(files) = &entry.files {
                                writes.files.push((seq, files.clone()));
                            }
                        }
                        None => writes.uncounted += 1,
                    }
                }
                _ => {}
            }
        }
        writes
    }
}

fn unrecorded_write(commit: &CommitRecord) -> UnrecordedWrite {
    UnrecordedWrite {
        commit: commit.seq,
        method: commit.method.clone(),
        partner: commit.partner.clone(),
        records: (commit.received, commit.accepted),
        request_id: commit.request_id.clone(),
    }
}

/// Fails closed when the privacy ledger holds fewer charges than the audit trail records charged
/// answers: the ledger was lost or rolled back, and rebuilding budgets from it would refill them.
fn require_whole_ledger(ledger: &LedgerFile, history: &[Record]) -> Result<()> {
    let charged = history
        .iter()
        .filter(|r| matches!(&r.entry.event, Some(Event::Answer(report)) if report.rho_spent > 0.0))
        .count();
    let on_ledger = ledger.spends().len();
    if on_ledger < charged {
        return Err(Error::Refused(format!(
            "guard/ledger.jsonl holds {on_ledger} charges but the audit trail records {charged} \
             charged answers: the ledger is missing or was rolled back; restore it from the \
             backup that goes with this trail (the service will not start and refill budgets). \
             Nothing was changed"
        )));
    }
    Ok(())
}

/// The temporary files of a data directory: files being written when the service stopped (every
/// one ends in `.tmp`; stored answers of older versions began with `.tmp`).
fn temporaries(data_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut dirs = vec![(data_dir.to_path_buf(), 0)];
    while let Some((dir, depth)) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::Internal(format!("{}: {e}", dir.display()))),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::Internal(format!("{}: {e}", dir.display())))?;
            let kind = entry
                .file_type()
                .map_err(|e| Error::Internal(format!("{}: {e}", dir.display())))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if kind.is_dir() && depth < 3 {
                dirs.push((entry.path(), depth + 1));
            } else if kind.is_file()
                && (name.ends_with(files::TEMPORARY_SUFFIX) || name.starts_with(".tmp"))
            {
                found.push(entry.path());
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Carries out what start-up decided: collects temporary files (no record: they never held
/// anything committed), opens the trail (cutting a torn last record and rewriting the
/// checkpoint), the store (removing orphaned data files), the guard and the review archive, then
/// records every repair in the trail: torn records, orphans and unrecorded writes (by name), an
/// accepted restore with what it carried over.
/// A collaboration's files and stored answers are sealed and opened with data keys from `keys`.
pub(crate) fn repair(
    found: Found,
    plan: Plan,
    config: &AppConfig,
    keys: &Arc<KeyStore>,
) -> Result<Opened> {
    let now = config.clock.now();
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| Error::Internal(format!("{}: {e}", config.data_dir.display())))?;
    for tmp in &found.temporaries {
        std::fs::remove_file(tmp)
            .map_err(|e| Error::Internal(format!("{}: {e}", tmp.display())))?;
        tracing::info!(file = %tmp.display(), "removed a temporary file a stop left");
    }
    let uploads = found.uploads();
    let orphan_files = found.store.orphans().to_vec();
    let torn: Vec<TornTail> = [
        found.trail.torn().cloned(),
        found.ledger.torn().cloned(),
        found.index.torn().cloned(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let history = found.trail.records().to_vec();
    let audit = AuditTrail::open(found.trail, ChainKey::new(&config.secret))?;
    let store = Store::open_found(found.store, Arc::clone(keys) as Arc<dyn DataKeys>)?;
    let guard = Guard::open(
        &config.data_dir,
        &config.secret,
        found.ledger,
        uploads.into_iter().map(|u| (u.partner, u.at)),
        &config.engine,
        Arc::clone(keys) as Arc<dyn DataKeys>,
    )?;
    let review = ReviewState::open(&config.data_dir, found.index, &history)?;
    for tail in torn {
        record_torn(&audit, &config.data_dir, &tail, now)?;
    }
    reconcile(&audit, orphan_files, &plan, now)?;
    if let Some(short) = plan.restore {
        erase_again(&audit, &store, config, &short.missing_erasures, now)?;
        carry_over(&audit, &guard, short, now)?;
    }
    Ok(Opened {
        store,
        audit,
        guard,
        review,
    })
}

pub(crate) fn record_torn(
    audit: &AuditTrail,
    data_dir: &Path,
    tail: &TornTail,
    now: DateTime<Utc>,
) -> Result<()> {
    let file = tail
        .path
        .strip_prefix(data_dir)
        .unwrap_or(&tail.path)
        .display()
        .to_string();
    tracing::warn!(%file, bytes = tail.dropped_bytes, "dropped a torn last record");
    audit.append(
        Entry {
            principal: "service".into(),
            method: "RecoverTornRecord".into(),
            outcome: "ok".into(),
            event: Some(Event::Recovered {
                file,
                dropped_bytes: tail.dropped_bytes,
            }),
            ..Default::default()
        },
        now,
    )?;
    Ok(())
}

/// Makes the trail account for the data directory: data files no manifest named were removed,
/// and writes committed whose records a crash lost (the store commits before the call's record
/// is written) are recorded now, each by name. So after any crash no data is without a record.
fn reconcile(
    audit: &AuditTrail,
    orphan_files: Vec<String>,
    plan: &Plan,
    now: DateTime<Utc>,
) -> Result<()> {
    let unrecorded_writes = plan.unrecorded.len() as u64 + plan.legacy_unrecorded;
    if unrecorded_writes == 0 && orphan_files.is_empty() {
        return Ok(());
    }
    tracing::warn!(
        unrecorded_writes,
        orphans = orphan_files.len(),
        "data directory reconciled with the audit trail"
    );
    audit.append(
        Entry {
            principal: "service".into(),
            method: "Reconcile".into(),
            outcome: "ok".into(),
            event: Some(Event::Reconciled {
                orphan_files,
                unrecorded_writes,
                writes: plan.unrecorded.clone(),
            }),
            ..Default::default()
        },
        now,
    )?;
    Ok(())
}

/// An accepted restore: the charges and list uploads the mark holds and the restored directory
/// lacks are carried over, so the restore refills no budget, and the trail records it.
/// Erases again the members of the erasures an accepted restore lost (the high-water mark keeps
/// them by digest), in one commit with its audit record, before any call is served: no erased
/// member comes back with a backup. Their tombstones are put back as they were, so an old
/// consent export still brings none of them back.
fn erase_again(
    audit: &AuditTrail,
    store: &Store,
    config: &AppConfig,
    missing: &BTreeMap<i64, i64>,
    now: DateTime<Utc>,
) -> Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    let digests = config.secret.member_digest_key("erasure");
    let members = store.members_with_digests(missing, &digests)?;
    let purposes: Vec<String> = config.rules.purposes.keys().cloned().collect();
    let report = IngestReport {
        received: missing.len() as u64,
        accepted: members.len() as u64,
        ..IngestReport::default()
    };
    let facts = WriteFacts {
        at: now,
        method: ERASE_MEMBERS.into(),
        partner: None,
        request_id: None,
        report,
    };
    let ask = ErasureAsk {
        members: &members,
        digests: &digests,
        purposes: &purposes,
        at: now,
        restored: missing,
        before_commit: &|| {},
    };
    let (record, erased) = store.commit_erasure(&ask, facts)?;
    tracing::warn!(
        members = missing.len(),
        "erasures a restore lost were done again"
    );
    let mut entry = Entry {
        principal: "service".into(),
        method: ERASE_MEMBERS.into(),
        outcome: "ok".into(),
        event: Some(Event::Erased(Box::new(ErasureCounts {
            members_asked: missing.len() as u64,
            members_found: erased.members_found,
            rows_removed: erased.rows_removed,
            tombstones: erased.tombstones,
            files_replaced: erased.files_replaced,
            requested_by: "service (erasures an accepted restore lost)".into(),
        }))),
        ..Default::default()
    };
    entry.committed(&record);
    audit.append(entry, now)?;
    Ok(())
}

fn carry_over(
    audit: &AuditTrail,
    guard: &Guard,
    short: Shortfall,
    now: DateTime<Utc>,
) -> Result<()> {
    tracing::warn!(reasons = ?short.reasons, "a restore from backup was accepted");
    guard.carry(&short.missing_charges)?;
    guard.carry_uploads(
        short
            .missing_uploads
            .iter()
            .map(|u| (u.partner.clone(), u.at)),
    );
    audit.append(
        Entry {
            principal: "service".into(),
            method: "AcceptRestore".into(),
            outcome: "ok".into(),
            event: Some(Event::RestoreAccepted {
                reasons: short.reasons,
                carried_charges: short.missing_charges.len() as u64,
                carried_uploads: short.missing_uploads,
                lost_receipts: short.lost_receipts,
            }),
            ..Default::default()
        },
        now,
    )?;
    Ok(())
}
