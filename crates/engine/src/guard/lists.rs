//! List controls, against list padding (THREATS 1) and list differencing (THREATS 2).
//!
//! - A partner may upload at most `max_list_versions` list versions per `list_window_days`.
//! - A new version must differ from every earlier version by at least `min_list_change` records
//!   (tokens). The partner knows its own records, so this refusal tells it nothing about the
//!   retailer's members.
//! - A version whose *matched members* differ from an earlier version's by fewer than
//!   `min_list_change` (compared after sticky noise) is frozen to that earlier version: queries
//!   answer as if the earlier list were current. Adding the target, or the target plus a few fake
//!   records, changes nothing, and the upload's response is the same whether it was frozen or not.
//! - At query time, the matched and consenting audience must reach `min_audience`, compared
//!   after sticky noise, so that a list of the target plus k − 1 known members is refused, and
//!   the refusal does not tell whether the target matched.
//!
//! Every version of a list is kept by the store; `data_dir/guard/lists.jsonl` records which
//! version each upload is answered as, so any result can be traced to the list behind it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;

use chrono::{DateTime, Duration, Utc};
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::UInt32Type;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Which list version an upload is answered as.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Effective {
    partner: String,
    version: u32,
    effective: u32,
}

/// Upload times and frozen versions, per partner.
pub(crate) struct Lists {
    path: PathBuf,
    uploads: HashMap<String, VecDeque<DateTime<Utc>>>,
    effective: HashMap<(String, u32), u32>,
}

fn storage(e: impl std::fmt::Display) -> Error {
    Error::Storage(format!("guard list ledger: {e}"))
}

impl Lists {
    /// Opens the ledger; `uploads` are earlier accepted uploads (partner, time), from the audit
    /// trail.
    pub fn open(
        path: PathBuf,
        uploads: impl IntoIterator<Item = (String, DateTime<Utc>)>,
    ) -> Result<Self> {
        let mut effective = HashMap::new();
        if path.exists() {
            for line in std::fs::read_to_string(&path).map_err(storage)?.lines() {
                if line.trim().is_empty() {
                    continue;
                }
                let e: Effective = serde_json::from_str(line).map_err(storage)?;
                effective.insert((e.partner, e.version), e.effective);
            }
        }
        let mut by_partner: HashMap<String, VecDeque<DateTime<Utc>>> = HashMap::new();
        for (partner, at) in uploads {
            by_partner.entry(partner).or_default().push_back(at);
        }
        for times in by_partner.values_mut() {
            times.make_contiguous().sort();
        }
        Ok(Self {
            path,
            uploads: by_partner,
            effective,
        })
    }

    /// Refuses an upload beyond the partner's allowance, with the time the next one is possible.
    pub fn check_allowance(
        &mut self,
        partner: &str,
        max_versions: u32,
        window_days: u32,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let times = self.uploads.entry(partner.to_string()).or_default();
        let window = Duration::days(i64::from(window_days));
        while times.front().is_some_and(|t| *t + window <= now) {
            times.pop_front();
        }
        if times.len() >= max_versions as usize {
            let next = times.front().map(|t| *t + window).unwrap_or(now);
            return Err(cleanroom_core::Error::Limit(format!(
                "list uploads are limited to {max_versions} per {window_days} days; the next \
                 upload is possible at {}",
                next.to_rfc3339()
            ))
            .into());
        }
        Ok(())
    }

    /// Which version queries of `version` are answered with. A version the ledger does not know
    /// (an upload whose record failed, or a data directory older than the ledger) is answered as
    /// the latest version before it that the ledger knows, so that an unrecorded upload never
    /// escapes the freeze.
    pub fn effective(&self, partner: &str, version: u32) -> u32 {
        (1..=version)
            .rev()
            .find_map(|v| self.effective.get(&(partner.to_string(), v)).copied())
            .unwrap_or(version)
    }

    /// Records an accepted upload and the version it is answered as, synced to disk.
    pub fn record(
        &mut self,
        partner: &str,
        version: u32,
        effective: u32,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let line = serde_json::to_vec(&Effective {
            partner: partner.to_string(),
            version,
            effective,
        })
        .map_err(storage)?;
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(storage)?;
        file.write_all(&line)
            .and_then(|_| file.write_all(b"\n"))
            .and_then(|_| file.sync_data())
            .map_err(storage)?;
        self.effective
            .insert((partner.to_string(), version), effective);
        self.uploads
            .entry(partner.to_string())
            .or_default()
            .push_back(now);
        Ok(())
    }
}

/// The distinct records of a list: (key version, HMAC) pairs.
pub(crate) fn tokens(list: &RecordBatch) -> HashSet<(u32, Vec<u8>)> {
    let versions = list.column(1).as_primitive::<UInt32Type>();
    let macs = list.column(2).as_fixed_size_binary();
    (0..list.num_rows())
        .filter(|i| macs.is_valid(*i))
        .map(|i| (versions.value(i), macs.value(i).to_vec()))
        .collect()
}

/// The size of the symmetric difference of two sets.
pub(crate) fn symmetric_difference<T: Eq + std::hash::Hash>(
    a: &HashSet<T>,
    b: &HashSet<T>,
) -> usize {
    a.symmetric_difference(b).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unrecorded_versions_answer_as_the_last_recorded_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lists.jsonl");
        let now = Utc::now();
        let mut lists = Lists::open(path.clone(), []).unwrap();
        lists.record("p", 1, 1, now).unwrap();
        lists.record("p", 2, 1, now).unwrap();
        lists.record("p", 3, 3, now).unwrap();
        assert_eq!(lists.effective("p", 2), 1);
        assert_eq!(lists.effective("p", 3), 3);
        assert_eq!(lists.effective("p", 5), 3);
        let reopened = Lists::open(path, []).unwrap();
        assert_eq!(reopened.effective("p", 2), 1);
        assert!(lists.check_allowance("p", 3, 30, now).is_err());
        assert!(lists.check_allowance("p", 4, 30, now).is_ok());
        assert!(
            lists
                .check_allowance("p", 3, 30, now + Duration::days(31))
                .is_ok()
        );
    }
}
