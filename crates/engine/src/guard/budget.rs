//! The partner's ledgers: how many answers it receives per rolling day, and how much privacy
//! (ρ, zero-concentrated DP) its fresh answers spent over the contract's period.
//!
//! The ρ ledger is the guard's own file, `data_dir/guard/ledger.jsonl`: a charge is appended and
//! synced to disk *before* the answer is computed, so neither a failed execution nor a crash gives
//! budget back. A charge is keyed by the answer it pays for; asking the same question of the same
//! data again finds the key and costs nothing. The key names the question and the data's version
//! (counters of ingests and uploads, never their content), so whether an answer is a repeat says
//! nothing about any member.

use std::collections::{HashMap, VecDeque};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The window the answer budget counts over.
const ANSWER_WINDOW_HOURS: i64 = 24;

/// Answers each partner received over the last 24 hours.
#[derive(Debug, Default)]
pub struct Budgets {
    answered: Mutex<HashMap<String, VecDeque<DateTime<Utc>>>>,
}

impl Budgets {
    /// Rebuilds the ledger from earlier answers (partner, time).
    pub fn from_history(history: impl IntoIterator<Item = (String, DateTime<Utc>)>) -> Self {
        let mut answered: HashMap<String, VecDeque<DateTime<Utc>>> = HashMap::new();
        for (partner, at) in history {
            answered.entry(partner).or_default().push_back(at);
        }
        for times in answered.values_mut() {
            times.make_contiguous().sort();
        }
        Self {
            answered: Mutex::new(answered),
        }
    }

    /// Takes one answer from the partner's budget, or refuses with the time the next answer
    /// becomes possible. Checking and taking is one step, so parallel calls cannot overspend.
    pub fn take(&self, partner: &str, limit: Option<u32>, now: DateTime<Utc>) -> Result<()> {
        let mut answered = self.answered.lock().expect("budget lock poisoned");
        let times = answered.entry(partner.to_string()).or_default();
        let Some(limit) = limit else {
            times.push_back(now);
            return Ok(());
        };
        let window = Duration::hours(ANSWER_WINDOW_HOURS);
        while times.front().is_some_and(|t| *t + window <= now) {
            times.pop_front();
        }
        if times.len() >= limit as usize {
            let reset = times.front().map(|t| *t + window).unwrap_or(now);
            return Err(cleanroom_core::Error::Limit(format!(
                "query budget of {limit} answers per 24 hours is spent; the next answer is possible at {}",
                reset.to_rfc3339()
            ))
            .into());
        }
        times.push_back(now);
        Ok(())
    }

    /// Returns an answer taken at `now` that was not given after all.
    pub fn give_back(&self, partner: &str, now: DateTime<Utc>) {
        let mut answered = self.answered.lock().expect("budget lock poisoned");
        if let Some(times) = answered.get_mut(partner)
            && let Some(at) = times.iter().rposition(|t| *t == now)
        {
            times.remove(at);
        }
    }
}

/// One charge of ρ, as the ledger file keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Spend {
    partner: String,
    at: DateTime<Utc>,
    rho: f64,
    /// The answer paid for.
    key: String,
    /// Reserved in memory, not yet on disk: it counts against the budget, but a repeat of its
    /// answer is not free until it is persisted.
    #[serde(skip)]
    pending: bool,
}

/// What an answer cost and what it left.
#[derive(Debug, Clone, PartialEq)]
pub struct Charge {
    /// ρ this answer spent: 0 when it was already paid for.
    pub rho_spent: f64,
    /// ρ spent in the period, this answer included.
    pub rho_used: f64,
    /// When the oldest spending in the period stops counting.
    pub resets_at: Option<DateTime<Utc>>,
}

/// ρ each partner spent, persisted.
#[derive(Debug)]
pub struct RhoLedger {
    path: PathBuf,
    spent: Mutex<HashMap<String, Vec<Spend>>>,
    torn: Option<cleanroom_core::files::TornTail>,
}

fn storage(e: impl std::fmt::Display) -> Error {
    Error::Storage(format!("privacy ledger: {e}"))
}

impl RhoLedger {
    /// Opens the ledger file (or starts an empty one). A torn last charge (a crash during its
    /// append) is cut: its call never got past the charge, so nothing was answered for it. Any
    /// other unreadable line fails the open: a ledger is never guessed at.
    pub fn open(path: PathBuf) -> Result<Self> {
        let mut spent: HashMap<String, Vec<Spend>> = HashMap::new();
        let (lines, torn) = cleanroom_core::files::read_jsonl(&path, true).map_err(storage)?;
        for line in lines {
            let spend: Spend = serde_json::from_str(&line).map_err(storage)?;
            spent.entry(spend.partner.clone()).or_default().push(spend);
        }
        Ok(Self {
            path,
            spent: Mutex::new(spent),
            torn,
        })
    }

    /// The torn last charge cut at open, if there was one.
    pub fn torn(&self) -> Option<&cleanroom_core::files::TornTail> {
        self.torn.as_ref()
    }

    /// Every charge on record, for checking the ledger against the audit trail.
    pub fn charges(&self) -> usize {
        self.spent
            .lock()
            .expect("ledger lock poisoned")
            .values()
            .map(Vec::len)
            .sum()
    }

    /// Whether the answer `key` was paid for within the period.
    pub fn paid(&self, partner: &str, key: &str, period_days: u32, now: DateTime<Utc>) -> bool {
        let period = Duration::days(i64::from(period_days));
        self.spent
            .lock()
            .expect("ledger lock poisoned")
            .get(partner)
            .is_some_and(|s| s.iter().any(|s| s.key == key && s.at + period > now))
    }

    /// ρ spent in the period and when its oldest charge leaves it.
    pub fn usage(
        &self,
        partner: &str,
        period_days: u32,
        now: DateTime<Utc>,
    ) -> (f64, Option<DateTime<Utc>>) {
        let period = Duration::days(i64::from(period_days));
        let spent = self.spent.lock().expect("ledger lock poisoned");
        let live = spent
            .get(partner)
            .into_iter()
            .flatten()
            .filter(|s| s.at + period > now);
        live.fold((0.0, None), |(used, first), s| {
            let ends = s.at + period;
            (
                used + s.rho,
                Some(first.map_or(ends, |f: DateTime<Utc>| f.min(ends))),
            )
        })
    }

    /// Charges `rho` for the answer `key`, unless it was paid for within the period; refuses with
    /// the time budget returns if the period's budget cannot cover it. The charge is on disk
    /// before this returns.
    pub fn charge(
        &self,
        partner: &str,
        key: &str,
        rho: f64,
        budget: f64,
        period_days: u32,
        now: DateTime<Utc>,
    ) -> Result<Charge> {
        let period = Duration::days(i64::from(period_days));
        let spend = Spend {
            partner: partner.to_string(),
            at: now,
            rho,
            key: key.to_string(),
            pending: true,
        };
        // The decision and the reservation are one step under the lock, so parallel calls cannot
        // overspend; the lock is released before the fsync, so one partner's disk write holds up
        // no one. A reservation counts at once; if it cannot be persisted the call fails and the
        // reservation stays (fail closed).
        let (used, resets_at) = {
            let mut spent = self.spent.lock().expect("ledger lock poisoned");
            let entries = spent.entry(partner.to_string()).or_default();
            let live: Vec<&Spend> = entries.iter().filter(|s| s.at + period > now).collect();
            let used: f64 = live.iter().map(|s| s.rho).sum();
            let resets_at = live.iter().map(|s| s.at + period).min();
            if live.iter().any(|s| s.key == key && s.pending) {
                // Only this partner's own identical question, asked in parallel, gets here.
                return Err(cleanroom_core::Error::Limit(
                    "the same question is being answered now; ask again in a moment".into(),
                )
                .into());
            }
            if live.iter().any(|s| s.key == key) {
                return Ok(Charge {
                    rho_spent: 0.0,
                    rho_used: used,
                    resets_at,
                });
            }
            // A relative tolerance keeps forty equal shares within the budget they divide.
            if used + rho > budget * (1.0 + 1e-9) {
                return Err(cleanroom_core::Error::Limit(format!(
                    "privacy budget for this period is spent ({} of {} fresh answers' worth \
                     used); answers already received are still served; budget returns from {}",
                    (used / rho).round(),
                    (budget / rho).round(),
                    resets_at.unwrap_or(now).to_rfc3339()
                ))
                .into());
            }
            entries.push(spend.clone());
            (used, resets_at)
        };
        self.append(&spend)?;
        if let Some(persisted) = self
            .spent
            .lock()
            .expect("ledger lock poisoned")
            .get_mut(partner)
            .and_then(|entries| entries.iter_mut().rfind(|s| s.key == spend.key))
        {
            persisted.pending = false;
        }
        Ok(Charge {
            rho_spent: rho,
            rho_used: used + rho,
            resets_at: resets_at.or(Some(now + period)),
        })
    }

    fn append(&self, spend: &Spend) -> Result<()> {
        let line = serde_json::to_vec(spend).map_err(storage)?;
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(storage)?;
        file.write_all(&line)
            .and_then(|_| file.write_all(b"\n"))
            .and_then(|_| file.sync_data())
            .map_err(storage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_free_the_budget_holds_and_charges_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let ledger = RhoLedger::open(path.clone()).unwrap();
        let now = Utc::now();
        let charge = |l: &RhoLedger, key: &str, at| l.charge("p", key, 0.1, 0.25, 30, at);
        assert_eq!(charge(&ledger, "a", now).unwrap().rho_spent, 0.1);
        assert_eq!(charge(&ledger, "a", now).unwrap().rho_spent, 0.0);
        assert!(ledger.paid("p", "a", 30, now));
        assert!(!ledger.paid("q", "a", 30, now), "partners are separate");
        assert!((charge(&ledger, "b", now).unwrap().rho_used - 0.2).abs() < 1e-12);
        assert!(charge(&ledger, "c", now).is_err());
        let reopened = RhoLedger::open(path).unwrap();
        assert!(
            charge(&reopened, "c", now).is_err(),
            "a restart refills nothing"
        );
        assert!(charge(&reopened, "c", now + Duration::days(31)).is_ok());
    }

    #[test]
    fn a_charge_that_cannot_be_persisted_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        // A path whose parent does not exist: every append fails.
        let ledger = RhoLedger::open(dir.path().join("missing/ledger.jsonl")).unwrap();
        let now = Utc::now();
        assert!(ledger.charge("p", "a", 0.1, 0.25, 30, now).is_err());
        let repeat = ledger.charge("p", "a", 0.1, 0.25, 30, now).unwrap_err();
        assert!(
            repeat.to_string().contains("being answered"),
            "not a free repeat"
        );
        assert!(
            (ledger.usage("p", 30, now).0 - 0.1).abs() < 1e-12,
            "and it still counts"
        );
    }

    #[test]
    fn the_daily_answer_count_is_enforced() {
        let budgets = Budgets::default();
        let now = Utc::now();
        budgets.take("p", Some(1), now).unwrap();
        assert!(budgets.take("p", Some(1), now).is_err());
        budgets.give_back("p", now);
        budgets.take("p", Some(1), now).unwrap();
        assert!(budgets.take("p", Some(1), now).is_err());
        assert!(
            budgets
                .take("p", Some(1), now + Duration::hours(25))
                .is_ok()
        );
    }
}
