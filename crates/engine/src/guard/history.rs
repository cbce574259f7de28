//! Each partner's history of released rows, against differencing over time (THREATS 2, 3, 6) and
//! marginal subtraction across responses (THREATS 4).
//!
//! For every row it releases, the guard keeps a [`Fingerprint`] of the member set behind it (an
//! invertible Bloom lookup table over keyed hashes: without the guard's key it reveals nothing
//! about who is in the set, only its size), the row's address (query, cell) and the values
//! released. A new row is then judged against that history:
//! - if an earlier row of the same query and cell had a member set within k − 1 members of this
//!   one, the earlier values are released again: a set that moved by fewer than k members gives
//!   the answer it gave before, so "before and after X's purchase" look the same;
//! - otherwise, if any other earlier row (of any query or cell, or earlier in this response) is
//!   within k − 1 members of it, the row is withheld: subtracting the two would isolate those
//!   members. Identical sets count as near too, so that whether a row is withheld never says
//!   whether two sets are equal or differ by one member;
//! - otherwise it is released fresh.
//!
//! The history also remembers, per query and canonical parameters, every cell ever withheld, and
//! keeps withholding it: a cell suppressed in one response cannot be derived from a later
//! response of the same query in which its complement was released.
//!
//! Stored in `data_dir/guard/<partner>.history.jsonl`, appended and synced before an answer is
//! released.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::Mutex;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use super::fingerprint::Fingerprint;
use crate::{Error, Result};

/// The largest difference the fingerprints measure exactly: k may be at most this plus one.
pub const CAPACITY: usize = cleanroom_core::rules::MAX_K as usize - 1;

/// One released row, as the history keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RowRecord {
    /// Query id.
    pub q: String,
    /// Canonical parameters.
    pub p: String,
    /// Cell index in the query's output domain.
    pub c: usize,
    /// Members behind the row.
    pub n: u64,
    /// The member set's fingerprint, base64.
    pub f: String,
    /// The values released.
    pub v: Vec<i64>,
    /// When (RFC 3339).
    pub at: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Line {
    Row(RowRecord),
    Withheld {
        q: String,
        p: String,
        cells: Vec<usize>,
    },
}

/// What the history says of a candidate row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    /// Nothing close was released before: release it fresh.
    Fresh,
    /// The same query and cell were released before with a member set within k − 1: release
    /// those values again.
    Repeat(Vec<i64>),
    /// Another row (of another query or cell, or earlier in this response) is within k − 1
    /// members of it: withhold it.
    Withhold,
}

/// One partner's history in memory.
pub(crate) struct PartnerHistory {
    rows: Vec<(RowRecord, Fingerprint)>,
    by_size: BTreeMap<u64, Vec<usize>>,
    by_cell: HashMap<(String, usize), Vec<usize>>,
    withheld: HashMap<(String, String), BTreeSet<usize>>,
    file: File,
}

impl PartnerHistory {
    /// Judges a candidate row with member-set fingerprint `fp` under threshold `k`, against the
    /// history and against `pending` rows already accepted in this response.
    pub fn judge(
        &self,
        query: &str,
        cell: usize,
        fp: &Fingerprint,
        k: u32,
        pending: &[Fingerprint],
    ) -> Verdict {
        let close = |other: &Fingerprint| fp.difference(other).filter(|d| *d < u64::from(k));
        if let Some(rows) = self.by_cell.get(&(query.to_string(), cell)) {
            for &i in rows.iter().rev() {
                if close(&self.rows[i].1).is_some() {
                    return Verdict::Repeat(self.rows[i].0.v.clone());
                }
            }
        }
        // Another row within k − 1 members, identical sets included: withholding only the rows
        // that differ by 1 to k − 1 would itself say whether the two sets are equal (whether the
        // target is in one and not the other). Rows of the same query and cell returned above.
        let n = fp.size;
        let low = n.saturating_sub(u64::from(k) - 1);
        let high = n + u64::from(k) - 1;
        let near = |other: &Fingerprint| close(other).is_some();
        let in_history = self
            .by_size
            .range(low..=high)
            .flat_map(|(_, rows)| rows)
            .any(|&i| near(&self.rows[i].1));
        if in_history || pending.iter().any(near) {
            Verdict::Withhold
        } else {
            Verdict::Fresh
        }
    }

    /// Cells withheld before for this query and these parameters.
    pub fn withheld(&self, query: &str, params: &str) -> BTreeSet<usize> {
        self.withheld
            .get(&(query.to_string(), params.to_string()))
            .cloned()
            .unwrap_or_default()
    }

    /// Appends released rows and the cells withheld, synced to disk, then remembers them.
    pub fn record(
        &mut self,
        rows: Vec<(RowRecord, Fingerprint)>,
        query: &str,
        params: &str,
        withheld: BTreeSet<usize>,
    ) -> Result<()> {
        let known = self.withheld(query, params);
        let new_cells: Vec<usize> = withheld.difference(&known).copied().collect();
        let mut bytes = Vec::new();
        for (row, _) in &rows {
            bytes.extend(serde_json::to_vec(&Line::Row(row.clone())).map_err(storage)?);
            bytes.push(b'\n');
        }
        if !new_cells.is_empty() {
            let line = Line::Withheld {
                q: query.to_string(),
                p: params.to_string(),
                cells: new_cells.clone(),
            };
            bytes.extend(serde_json::to_vec(&line).map_err(storage)?);
            bytes.push(b'\n');
        }
        if bytes.is_empty() {
            return Ok(());
        }
        self.file
            .write_all(&bytes)
            .and_then(|_| self.file.sync_data())
            .map_err(storage)?;
        for (row, fp) in rows {
            self.remember(row, fp);
        }
        self.withheld
            .entry((query.to_string(), params.to_string()))
            .or_default()
            .extend(new_cells);
        Ok(())
    }

    fn remember(&mut self, row: RowRecord, fp: Fingerprint) {
        let i = self.rows.len();
        self.by_size.entry(row.n).or_default().push(i);
        self.by_cell
            .entry((row.q.clone(), row.c))
            .or_default()
            .push(i);
        self.rows.push((row, fp));
    }
}

fn storage(e: impl std::fmt::Display) -> Error {
    Error::Storage(format!("guard history: {e}"))
}

/// Every partner's history, loaded on first use.
pub(crate) struct History {
    dir: PathBuf,
    partners: Mutex<HashMap<String, PartnerHistory>>,
}

impl History {
    /// Opens the history directory.
    pub fn open(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir).map_err(storage)?;
        Ok(Self {
            dir,
            partners: Mutex::new(HashMap::new()),
        })
    }

    /// Runs `f` on one partner's history, holding it for the whole call so that judging and
    /// recording one answer cannot interleave with another answer to the same partner.
    pub fn with<R>(
        &self,
        partner: &str,
        f: impl FnOnce(&mut PartnerHistory) -> Result<R>,
    ) -> Result<R> {
        let mut partners = self.partners.lock().expect("history lock poisoned");
        if !partners.contains_key(partner) {
            let loaded = self.load(partner)?;
            partners.insert(partner.to_string(), loaded);
        }
        f(partners.get_mut(partner).expect("just loaded"))
    }

    fn load(&self, partner: &str) -> Result<PartnerHistory> {
        let safe: String = partner
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = self.dir.join(format!("{safe}.history.jsonl"));
        let mut history = PartnerHistory {
            rows: Vec::new(),
            by_size: BTreeMap::new(),
            by_cell: HashMap::new(),
            withheld: HashMap::new(),
            file: OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(storage)?,
        };
        for line in BufReader::new(File::open(&path).map_err(storage)?).lines() {
            let line = line.map_err(storage)?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Line>(&line).map_err(storage)? {
                Line::Row(row) => {
                    let bytes = STANDARD.decode(&row.f).map_err(storage)?;
                    let fp = Fingerprint::from_bytes(&bytes)
                        .ok_or_else(|| storage("a fingerprint does not decode"))?;
                    history.remember(row, fp);
                }
                Line::Withheld { q, p, cells } => {
                    history.withheld.entry((q, p)).or_default().extend(cells);
                }
            }
        }
        Ok(history)
    }
}

/// The record of one released row.
pub(crate) fn row_record(
    query: &str,
    params: &str,
    cell: usize,
    fp: &Fingerprint,
    values: Vec<i64>,
    at: chrono::DateTime<chrono::Utc>,
) -> RowRecord {
    RowRecord {
        q: query.to_string(),
        p: params.to_string(),
        c: cell,
        n: fp.size,
        f: STANDARD.encode(fp.to_bytes()),
        v: values,
        at: at.to_rfc3339(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"history test key";

    fn fp(members: std::ops::Range<i64>) -> Fingerprint {
        Fingerprint::of(KEY, members, CAPACITY)
    }

    #[test]
    fn close_sets_repeat_or_withhold_and_far_sets_are_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let history = History::open(dir.path().to_path_buf()).unwrap();
        let now = chrono::Utc::now();
        history
            .with("p", |h| {
                let first = fp(0..100);
                let row = row_record("q", "a", 3, &first, vec![100], now);
                h.record(vec![(row, first)], "q", "a", BTreeSet::from([1]))
            })
            .unwrap();
        history
            .with("p", |h| {
                // The same cell, one member more: the earlier answer again.
                assert_eq!(
                    h.judge("q", 3, &fp(0..101), 10, &[]),
                    Verdict::Repeat(vec![100])
                );
                // Another query's row one member away: withheld.
                assert_eq!(h.judge("r", 0, &fp(0..101), 10, &[]), Verdict::Withhold);
                // An identical set in another query is withheld too: otherwise withholding would
                // tell "identical" from "one member apart".
                assert_eq!(h.judge("r", 0, &fp(0..100), 10, &[]), Verdict::Withhold);
                // Twenty members away: fresh.
                assert_eq!(h.judge("r", 0, &fp(0..120), 10, &[]), Verdict::Fresh);
                // Close to a row earlier in the same response: withheld.
                assert_eq!(
                    h.judge("r", 0, &fp(500..600), 10, &[fp(500..601)]),
                    Verdict::Withhold
                );
                assert_eq!(h.withheld("q", "a"), BTreeSet::from([1]));
                Ok(())
            })
            .unwrap();
        // A new process reads the same history back.
        let reopened = History::open(dir.path().to_path_buf()).unwrap();
        reopened
            .with("p", |h| {
                assert_eq!(
                    h.judge("q", 3, &fp(0..101), 10, &[]),
                    Verdict::Repeat(vec![100])
                );
                assert_eq!(h.withheld("q", "a"), BTreeSet::from([1]));
                Ok(())
            })
            .unwrap();
    }
}
