//! The high-water mark: how far this service has got, kept outside the data directory so that a
//! restore from backup, or a data directory rolled back, is seen at the next start (THREATS 17).
//!
//! A restored data directory carries its old privacy ledger and answer store: started as it is,
//! it would give every partner back the budget it spent since the backup, and (with counters for
//! answer keys) replay old noise on new data. The mark remembers what the data directory must at
//! least hold: the audit trail's head, the number of committed writes, and every charge and list
//! upload that can still count (at most [`MAX_WINDOW_DAYS`] old). It is rewritten whenever one of
//! those moves, before the call that moved it is answered, and keyed with the master secret so it
//! cannot be edited or forged without it.
//!
//! At start-up a data directory behind its mark is refused, with what differs and how to go on.
//! Started with `--accept-restore`, the service carries the charges and uploads the directory
//! lacks over into it (budgets are never refilled) and records the restore in the audit trail.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};
use cleanroom_core::files;
use cleanroom_core::rules::MAX_WINDOW_DAYS;
use cleanroom_core::token::MasterSecret;
use cleanroom_engine::guard::Spend;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::audit::{ChainEnd, Record, Upload};
use crate::{Error, Result};

/// What the data directory must at least hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mark {
    /// Records in the audit trail when the mark was written.
    pub trail_seq: u64,
    /// The hash of that last record.
    pub trail_head: String,
    /// Writes committed to the store.
    pub commits: u64,
    /// Every charge on the privacy ledger that can still count.
    pub charges: Vec<Spend>,
    /// Every list upload that can still count against an allowance.
    pub uploads: Vec<Upload>,
    /// Records of receipt ever appended (purged ones included) when the mark was written: the
    /// law keeps them three years, so a restore that loses some is named, never silent. Left
    /// out of a mark with none, so a mark written before receipts were marked still verifies.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub receipts: u64,
    /// The hash of the last of them.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub receipts_head: String,
    /// Every member erased, by the keyed digest its tombstone holds (never the pseudonym), with
    /// the instant of the erasure (microseconds): a restore that lost an erasure would bring the
    /// members back, so it is seen, and an accepted restore erases them again. Left out of a mark
    /// with none, so older marks still verify.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub erased: BTreeMap<i64, i64>,
    /// When it was written.
    pub written_at: DateTime<Utc>,
    /// HMAC-SHA256 over the rest, keyed from the master secret.
    #[serde(default)]
    mac: String,
}

/// The mark's key, derived from the master secret.
#[derive(Clone)]
pub struct MarkKey([u8; 32]);

impl MarkKey {
    /// The mark key of a master secret.
    pub fn new(secret: &MasterSecret) -> Self {
        Self(secret.guard_key("high-water-mark"))
    }

    fn mac(&self, mark: &Mark) -> Result<String> {
        let mut unsigned = mark.clone();
        unsigned.mac = String::new();
        let body = serde_json::to_vec(&unsigned).map_err(|e| Error::Internal(e.to_string()))?;
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("any key length");
        mac.update(b"high-water-mark/v1");
        mac.update(&body);
        Ok(hex::encode(mac.finalize().into_bytes()))
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Mark {
    /// The mark of a service's state: charges and uploads older than any window are left out.
    pub fn of(
        trail: ChainEnd,
        commits: u64,
        charges: Vec<Spend>,
        uploads: Vec<Upload>,
        receipts: ChainEnd,
        erased: BTreeMap<i64, i64>,
        now: DateTime<Utc>,
    ) -> Self {
        let horizon = now - Duration::days(i64::from(MAX_WINDOW_DAYS) + 1);
        Self {
            trail_seq: trail.0,
            trail_head: trail.1,
            commits,
            charges: charges.into_iter().filter(|c| c.at > horizon).collect(),
            uploads: uploads.into_iter().filter(|u| u.at > horizon).collect(),
            receipts: receipts.0,
            receipts_head: receipts.1,
            erased,
            written_at: now,
            mac: String::new(),
        }
    }

    /// Reads the mark at `path`: `None` if there is none; an error if it does not verify with
    /// this service's key (edited, or another service's).
    pub fn read(path: &Path, key: &MarkKey) -> Result<Option<Self>> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::Internal(format!("{}: {e}", path.display()))),
        };
        let mark: Mark = serde_json::from_slice(&bytes).map_err(|e| {
            Error::Refused(format!(
                "{}: not a high-water mark (line {}, column {})",
                path.display(),
                e.line(),
                e.column()
            ))
        })?;
        if key.mac(&mark)? != mark.mac {
            return Err(Error::Refused(format!(
                "{}: the high-water mark does not verify with this master secret: it was edited, \
                 or belongs to another service; put back the mark this service wrote",
                path.display()
            )));
        }
        Ok(Some(mark))
    }

    /// Writes the mark whole (temporary file, sync, rename, directory sync), signed.
    pub fn write(mut self, path: &Path, key: &MarkKey) -> Result<()> {
        self.mac = key.mac(&self)?;
        let bytes = serde_json::to_vec_pretty(&self).map_err(|e| Error::Internal(e.to_string()))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::Internal(format!("{}: {e}", dir.display())))?;
        }
        Ok(files::write_atomic(path, &bytes)?)
    }

    /// How the data directory falls short of this mark, if it does: read from its trail, its
    /// manifest's commit count, its ledger's charges, its list uploads and where its records of
    /// receipt end.
    pub fn shortfall(
        &self,
        trail: &[Record],
        commits: u64,
        charges: &[Spend],
        uploads: &[Upload],
        receipts: &ChainEnd,
        erased: &BTreeMap<i64, i64>,
    ) -> Option<Shortfall> {
        let mut reasons = Vec::new();
        let lost_receipts = self.receipts_lost(receipts, &mut reasons);
        let missing_erasures: BTreeMap<i64, i64> = self
            .erased
            .iter()
            .filter(|(digest, _)| !erased.contains_key(digest))
            .map(|(digest, at)| (*digest, *at))
            .collect();
        if !missing_erasures.is_empty() {
            reasons.push(format!(
                "it lacks the erasure of {} members the mark records",
                missing_erasures.len()
            ));
        }
        let trail_seq = trail.len() as u64;
        if trail_seq < self.trail_seq {
            reasons.push(format!(
                "its audit trail has {trail_seq} records, the mark {}",
                self.trail_seq
            ));
        } else if self.trail_seq > 0 && trail[self.trail_seq as usize - 1].hash != self.trail_head {
            reasons.push(format!(
                "its audit trail differs from the mark's at record {}",
                self.trail_seq
            ));
        }
        if commits < self.commits {
            reasons.push(format!(
                "its manifest counts {commits} committed writes, the mark {}",
                self.commits
            ));
        }
        let held: BTreeSet<(&str, DateTime<Utc>, &str)> = charges
            .iter()
            .map(|c| (c.partner.as_str(), c.at, c.key.as_str()))
            .collect();
        let missing_charges: Vec<Spend> = self
            .charges
            .iter()
            .filter(|c| !held.contains(&(c.partner.as_str(), c.at, c.key.as_str())))
            .cloned()
            .collect();
        if !missing_charges.is_empty() {
            reasons.push(format!(
                "its privacy ledger lacks {} charges the mark holds",
                missing_charges.len()
            ));
        }
        let held: BTreeSet<&Upload> = uploads.iter().collect();
        let missing_uploads: Vec<Upload> = self
            .uploads
            .iter()
            .filter(|u| !held.contains(u))
            .cloned()
            .collect();
        if !missing_uploads.is_empty() {
            reasons.push(format!(
                "it lacks {} list uploads the mark holds",
                missing_uploads.len()
            ));
        }
        (!reasons.is_empty()).then_some(Shortfall {
            reasons,
            missing_charges,
            missing_uploads,
            lost_receipts,
            missing_erasures,
        })
    }

    /// The records of receipt the mark counts and the directory lacks (as positions), naming
    /// the difference in `reasons`; also when the directory's last record is not the mark's.
    fn receipts_lost(
        &self,
        (held, head): &ChainEnd,
        reasons: &mut Vec<String>,
    ) -> Option<(u64, u64)> {
        if *held < self.receipts {
            reasons.push(format!(
                "its records of receipt end at record {held}, the mark's at {}",
                self.receipts
            ));
            return Some((held + 1, self.receipts));
        }
        if *held == self.receipts && self.receipts > 0 && *head != self.receipts_head {
            reasons.push(format!(
                "its records of receipt differ from the mark's at record {held}"
            ));
        }
        None
    }
}

/// How a data directory falls short of the high-water mark.
#[derive(Debug, Clone)]
pub struct Shortfall {
    /// What differs, in words.
    pub reasons: Vec<String>,
    /// Charges the mark holds and the directory's ledger lacks: carried over on an accepted
    /// restore.
    pub missing_charges: Vec<Spend>,
    /// List uploads the mark holds and the directory lacks: carried over too.
    pub missing_uploads: Vec<Upload>,
    /// The records of receipt (first and last position) the directory lacks. They cannot be
    /// carried over (the mark holds none of their content): an accepted restore names them.
    pub lost_receipts: Option<(u64, u64)>,
    /// Erasures the mark records and the directory lacks (member digest, instant): an accepted
    /// restore erases those members again, so no erased member comes back.
    pub missing_erasures: BTreeMap<i64, i64>,
}

impl Shortfall {
    /// The refusal, naming the mark, what differs and how to go on.
    pub fn refusal(&self, mark: &Path) -> String {
        format!(
            "the data directory is behind what this service has already done, as its high-water \
             mark {} records: {}. It was restored from a backup or rolled back. Started as it is, \
             it would give partners back privacy budget they spent since (and forget approvals \
             and writes made since). Nothing was changed. To go on from this data directory, \
             start once with --accept-restore: the {} charges and {} list uploads it lacks are \
             carried over from the mark (budgets are not refilled){} and the restore is \
             recorded in the audit trail. Otherwise put back the newest data directory{}",
            mark.display(),
            self.reasons.join("; "),
            self.missing_charges.len(),
            self.missing_uploads.len(),
            self.erasures_advice(),
            self.receipts_advice()
        )
    }

    /// What the refusal says of lost erasures, if any were lost.
    fn erasures_advice(&self) -> String {
        match self.missing_erasures.len() {
            0 => String::new(),
            n => format!(", the {n} members whose erasure it lacks are erased again"),
        }
    }

    /// What the refusal says of lost records of receipt, if any were lost.
    fn receipts_advice(&self) -> String {
        match self.lost_receipts {
            Some((first, last)) => format!(
                ". Records of receipt {first} to {last} (which the law keeps three years) are \
                 not in this directory and cannot be rebuilt: before accepting, put back a newer \
                 copy of {} and its checkpoint if you have one; an accepted restore names them \
                 as lost in the audit trail",
                crate::receipts::FILE
            ),
            None => String::new(),
        }
    }
}

/// Keeps the mark up to date while the service runs.
pub struct MarkWriter {
    path: PathBuf,
    key: MarkKey,
    /// What the last mark written held, besides the trail's head: a new mark is written when
    /// this changes, or when a record that matters (a decision, a configuration change) is added.
    last: Mutex<(u64, usize, usize, u64, usize)>,
}

impl MarkWriter {
    /// A writer of the mark at `path`.
    pub fn new(path: PathBuf, key: MarkKey) -> Self {
        Self {
            path,
            key,
            last: Mutex::new((u64::MAX, usize::MAX, usize::MAX, u64::MAX, usize::MAX)),
        }
    }

    /// Where the mark is kept.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `mark` if it holds more than the last one written, or `always`.
    pub fn update(&self, mark: Mark, always: bool) -> Result<()> {
        let mut last = self.last.lock().expect("mark lock poisoned");
        let now = (
            mark.commits,
            mark.charges.len(),
            mark.uploads.len(),
            mark.receipts,
            mark.erased.len(),
        );
        if !always && *last == now {
            return Ok(());
        }
        mark.write(&self.path, &self.key)?;
        *last = now;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> MarkKey {
        MarkKey::new(&MasterSecret::new(vec![7; 32]).unwrap())
    }

    fn spend(key: &str, at: DateTime<Utc>) -> Spend {
        Spend::new("p".into(), at, 0.1, key.into())
    }

    #[test]
    fn a_mark_round_trips_and_an_edited_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mark.json");
        let now = Utc::now();
        let old = now - Duration::days(400);
        let mark = Mark::of(
            (3, "h".into()),
            2,
            vec![spend("a", now), spend("old", old)],
            vec![],
            (0, String::new()),
            BTreeMap::from([(-7, 1_000), (42, 2_000)]),
            now,
        );
        assert_eq!(
            mark.charges.len(),
            1,
            "charges beyond every window are left out"
        );
        mark.clone().write(&path, &key()).unwrap();
        let read = Mark::read(&path, &key()).unwrap().unwrap();
        assert_eq!(read.charges, mark.charges);
        assert_eq!(read.erased, mark.erased);
        let edited = std::fs::read_to_string(&path)
            .unwrap()
            .replace("\"commits\": 2", "\"commits\": 1");
        std::fs::write(&path, edited).unwrap();
        assert!(Mark::read(&path, &key()).is_err());
        assert!(
            Mark::read(&dir.path().join("none"), &key())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_directory_behind_its_mark_falls_short_and_one_ahead_does_not() {
        let now = Utc::now();
        let charges = vec![spend("a", now), spend("b", now)];
        let receipts = (4, "r4".to_string());
        let mark = Mark::of(
            (0, String::new()),
            2,
            charges.clone(),
            vec![],
            receipts.clone(),
            BTreeMap::new(),
            now,
        );
        assert!(
            mark.shortfall(&[], 2, &charges, &[], &receipts, &BTreeMap::new())
                .is_none()
        );
        let more = vec![spend("a", now), spend("b", now), spend("c", now)];
        let later = (5, "r5".to_string());
        assert!(
            mark.shortfall(&[], 3, &more, &[], &later, &BTreeMap::new())
                .is_none(),
            "ahead is fine"
        );
        let short = mark
            .shortfall(
                &[],
                1,
                &charges[..1],
                &[],
                &(2, "r2".into()),
                &BTreeMap::new(),
            )
            .unwrap();
        assert_eq!(short.missing_charges, vec![spend("b", now)]);
        assert_eq!(short.lost_receipts, Some((3, 4)));
        assert_eq!(short.reasons.len(), 3, "{:?}", short.reasons);
        assert!(
            short
                .refusal(Path::new("m"))
                .contains("Records of receipt 3 to 4")
        );
    }

    #[test]
    fn an_erasure_the_directory_lacks_falls_short_and_is_named() {
        let now = Utc::now();
        let erased = BTreeMap::from([(1, 10), (2, 20)]);
        let mark = Mark::of(
            (0, String::new()),
            2,
            vec![],
            vec![],
            (0, String::new()),
            erased,
            now,
        );
        let none = (0, String::new());
        let held = BTreeMap::from([(1, 10), (2, 20), (3, 30)]);
        assert!(mark.shortfall(&[], 2, &[], &[], &none, &held).is_none());
        let short = mark
            .shortfall(&[], 2, &[], &[], &none, &BTreeMap::from([(1, 10)]))
            .unwrap();
        assert_eq!(short.missing_erasures, BTreeMap::from([(2, 20)]));
        assert!(
            short
                .refusal(Path::new("m"))
                .contains("1 members whose erasure it lacks are erased again")
        );
    }

    #[test]
    fn records_of_receipt_rolled_back_alone_fall_short() {
        let now = Utc::now();
        let mark = Mark::of(
            (0, String::new()),
            2,
            vec![],
            vec![],
            (4, "r4".into()),
            BTreeMap::new(),
            now,
        );
        // Everything else as the mark has it: only the records of receipt are older, or
        // another chain of the same length.
        let short = mark
            .shortfall(&[], 2, &[], &[], &(3, "r3".into()), &BTreeMap::new())
            .unwrap();
        assert_eq!(short.lost_receipts, Some((4, 4)));
        let other = mark
            .shortfall(&[], 2, &[], &[], &(4, "x4".into()), &BTreeMap::new())
            .unwrap();
        assert_eq!(other.lost_receipts, None);
        assert_eq!(other.reasons.len(), 1, "{:?}", other.reasons);
    }

    #[test]
    fn a_mark_without_records_of_receipt_reads_as_before_they_were_marked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mark.json");
        let now = Utc::now();
        Mark::of(
            (1, "h".into()),
            1,
            vec![],
            vec![],
            (0, String::new()),
            BTreeMap::new(),
            now,
        )
        .write(&path, &key())
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("receipts"), "{text}");
        assert_eq!(Mark::read(&path, &key()).unwrap().unwrap().receipts, 0);
    }
}
