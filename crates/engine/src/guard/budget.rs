//! The partner's ledger: every fresh answer it received, with the privacy (ρ, zero-concentrated
//! DP) it spent. Both of the partner's limits are read from it: answers per rolling 24 hours, and
//! ρ over the contract's period.
//!
//! The ledger is the guard's own file, `data_dir/guard/ledger.jsonl`: a charge is appended and
//! synced to disk *before* the answer is computed, so neither a failed execution nor a crash gives
//! budget back, and a restart rebuilds both limits from what was charged. A charge is keyed by the
//! answer it pays for; asking the same question of the same data again finds the key and costs
//! nothing. The key names the question and digests of the data it read, so whether an answer is
//! a repeat says nothing about any member the partner does not already know.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use cleanroom_core::files::{self, AppendLog, TornTail};

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The window the daily answer limit counts over.
const ANSWER_WINDOW_HOURS: i64 = 24;

/// One charge of ρ, as the ledger file keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spend {
    /// The partner charged.
    pub partner: String,
    /// When.
    pub at: DateTime<Utc>,
    /// ρ charged.
    pub rho: f64,
    /// The answer paid for.
    pub key: String,
    /// Reserved in memory, not yet on disk: it counts against the budget, but a repeat of its
    /// answer is not free until it is persisted.
    #[serde(skip)]
    pending: bool,
}

impl Spend {
    /// A charge as the ledger would record it (for charges carried over from elsewhere).
    pub fn new(partner: String, at: DateTime<Utc>, rho: f64, key: String) -> Self {
        Self {
            partner,
            at,
            rho,
            key,
            pending: false,
        }
    }
}

/// The ledger file as found, read without changing anything: its charges, and the torn last
/// record a crash left, if any.
#[derive(Debug)]
pub struct LedgerFile {
    path: PathBuf,
    spends: Vec<Spend>,
    torn: Option<TornTail>,
}

impl LedgerFile {
    /// Reads `path` (a missing file is an empty ledger). Any unreadable record but a torn last
    /// one fails, naming the file and the line: a ledger is never guessed at.
    pub fn read(path: PathBuf) -> Result<Self> {
        let (lines, torn) = files::read_jsonl(&path, false)?;
        let spends = files::parse_jsonl(&path, &lines)?;
        Ok(Self { path, spends, torn })
    }

    /// The charges on record.
    pub fn spends(&self) -> &[Spend] {
        &self.spends
    }

    /// The torn last record, which opening the ledger cuts.
    pub fn torn(&self) -> Option<&TornTail> {
        self.torn.as_ref()
    }
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

/// What a partner's contract allows, for one charge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Terms {
    /// ρ of one fresh answer.
    pub rho: f64,
    /// ρ of the whole period.
    pub budget: f64,
    /// The period, in days.
    pub period_days: u32,
    /// Fresh answers allowed per rolling 24 hours, if limited.
    pub per_day: Option<u32>,
}

impl Terms {
    fn period(&self) -> Duration {
        Duration::days(i64::from(self.period_days))
    }
}

/// What the ledger decided for one question.
enum Decision {
    /// Already paid for in the period: free.
    Repeat(Charge),
    /// A fresh answer the limits allow: ρ already used in the period, and when its oldest charge
    /// leaves it.
    Fresh {
        used: f64,
        resets_at: Option<DateTime<Utc>>,
    },
}

/// Decides a question against a partner's charges: a repeat, a fresh answer within both limits,
/// or a refusal. Both limits depend only on the partner's own spending, never on the data.
fn decide(entries: &[Spend], key: &str, terms: &Terms, now: DateTime<Utc>) -> Result<Decision> {
    let period = terms.period();
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
        return Ok(Decision::Repeat(Charge {
            rho_spent: 0.0,
            rho_used: used,
            resets_at,
        }));
    }
    if let Some(limit) = terms.per_day {
        let window = Duration::hours(ANSWER_WINDOW_HOURS);
        let today: Vec<&&Spend> = live.iter().filter(|s| s.at + window > now).collect();
        if today.len() >= limit as usize {
            let next = today.iter().map(|s| s.at + window).min().unwrap_or(now);
            return Err(cleanroom_core::Error::Limit(format!(
                "query budget of {limit} answers per 24 hours is spent; the next answer is \
                 possible at {}",
                next.to_rfc3339()
            ))
            .into());
        }
    }
    // A relative tolerance keeps forty equal shares within the budget they divide.
    if used + terms.rho > terms.budget * (1.0 + 1e-9) {
        return Err(cleanroom_core::Error::Limit(format!(
            "privacy budget for this period is spent ({} of {} fresh answers' worth used); \
             answers already received are still served; budget returns from {}",
            (used / terms.rho).round(),
            (terms.budget / terms.rho).round(),
            resets_at.unwrap_or(now).to_rfc3339()
        ))
        .into());
    }
    Ok(Decision::Fresh { used, resets_at })
}

/// ρ each partner spent, persisted.
pub struct RhoLedger {
    spent: Mutex<HashMap<String, Vec<Spend>>>,
    log: Mutex<AppendLog>,
    /// The torn last record cut at open, if any (for the audit trail).
    torn: Option<TornTail>,
}

impl RhoLedger {
    /// Opens a ledger as read: its torn last record, if any, is cut (its call never got past the
    /// charge, so nothing was answered for it), and the file is opened for appending.
    pub fn open(file: LedgerFile) -> Result<Self> {
        if let Some(torn) = &file.torn {
            files::cut_torn_tail(torn)?;
        }
        let log = AppendLog::open(&file.path, file.spends.len() as u64)?;
        let mut spent: HashMap<String, Vec<Spend>> = HashMap::new();
        for spend in file.spends {
            spent.entry(spend.partner.clone()).or_default().push(spend);
        }
        Ok(Self {
            spent: Mutex::new(spent),
            log: Mutex::new(log),
            torn: file.torn,
        })
    }

    /// The torn last charge cut at open, if there was one.
    pub fn torn(&self) -> Option<&TornTail> {
        self.torn.as_ref()
    }

    /// Every charge on record, oldest first per partner.
    pub fn spends(&self) -> Vec<Spend> {
        let spent = self.spent.lock().expect("ledger lock poisoned");
        let mut all: Vec<Spend> = spent
            .values()
            .flatten()
            .filter(|s| !s.pending)
            .cloned()
            .collect();
        all.sort_by_key(|a| a.at);
        all
    }

    /// Appends charges made elsewhere (carried over from the high-water mark after a restore),
    /// so that a restored ledger never spends them again.
    pub fn carry(&self, spends: &[Spend]) -> Result<()> {
        for spend in spends {
            self.persist(spend)?;
            self.spent
                .lock()
                .expect("ledger lock poisoned")
                .entry(spend.partner.clone())
                .or_default()
                .push(spend.clone());
        }
        Ok(())
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

    /// Charges one fresh answer `key` on the partner's `terms`, unless it was paid for within the
    /// period: refused if today's answers or the period's ρ are spent (with the time the next
    /// answer is possible). The charge is on disk before this returns.
    pub fn charge(
        &self,
        partner: &str,
        key: &str,
        terms: &Terms,
        now: DateTime<Utc>,
    ) -> Result<Charge> {
        // The decision and the reservation are one step under the lock, so parallel calls cannot
        // overspend; the lock is released before the fsync, so one partner's disk write holds up
        // no one. A reservation counts at once. If it cannot be persisted, the append is cut back
        // and the reservation released; only a ledger whose file is in an unknown state keeps it
        // (fail closed).
        let spend = Spend::new(partner.to_string(), now, terms.rho, key.to_string());
        let (used, resets_at) = {
            let mut spent = self.spent.lock().expect("ledger lock poisoned");
            let entries = spent.entry(partner.to_string()).or_default();
            match decide(entries, key, terms, now)? {
                Decision::Repeat(charge) => return Ok(charge),
                Decision::Fresh { used, resets_at } => {
                    entries.push(Spend {
                        pending: true,
                        ..spend.clone()
                    });
                    (used, resets_at)
                }
            }
        };
        let persisted = self.persist(&spend);
        self.settle(&spend, persisted.is_ok());
        persisted?;
        Ok(Charge {
            rho_spent: terms.rho,
            rho_used: used + terms.rho,
            resets_at: resets_at.or(Some(now + terms.period())),
        })
    }

    /// Settles the reservation of `spend`: kept once written; released if the write failed and
    /// was cut back; kept if the file's state is unknown.
    fn settle(&self, spend: &Spend, written: bool) {
        let broken = !written && self.log.lock().expect("ledger lock poisoned").is_broken();
        let mut spent = self.spent.lock().expect("ledger lock poisoned");
        let Some(entries) = spent.get_mut(&spend.partner) else {
            return;
        };
        let reserved = entries
            .iter()
            .rposition(|s| s.pending && s.key == spend.key && s.at == spend.at);
        match reserved {
            Some(at) if written => entries[at].pending = false,
            Some(at) if !broken => {
                entries.remove(at);
            }
            _ => {}
        }
    }

    fn persist(&self, spend: &Spend) -> Result<()> {
        let line = serde_json::to_vec(spend)
            .map_err(|e| Error::Storage(format!("privacy ledger: {e}")))?;
        self.log
            .lock()
            .expect("ledger lock poisoned")
            .append(&line)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terms(per_day: Option<u32>) -> Terms {
        Terms {
            rho: 0.1,
            budget: 0.25,
            period_days: 30,
            per_day,
        }
    }

    fn open(path: &std::path::Path) -> RhoLedger {
        RhoLedger::open(LedgerFile::read(path.to_path_buf()).unwrap()).unwrap()
    }

    #[test]
    fn repeats_are_free_the_budget_holds_and_charges_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let ledger = open(&path);
        let now = Utc::now();
        let charge = |l: &RhoLedger, key: &str, at| l.charge("p", key, &terms(None), at);
        assert_eq!(charge(&ledger, "a", now).unwrap().rho_spent, 0.1);
        assert_eq!(charge(&ledger, "a", now).unwrap().rho_spent, 0.0);
        assert!(ledger.paid("p", "a", 30, now));
        assert!(!ledger.paid("q", "a", 30, now), "partners are separate");
        assert!((charge(&ledger, "b", now).unwrap().rho_used - 0.2).abs() < 1e-12);
        assert!(charge(&ledger, "c", now).is_err());
        let reopened = open(&path);
        assert!(
            charge(&reopened, "c", now).is_err(),
            "a restart refills nothing"
        );
        assert!(charge(&reopened, "c", now + Duration::days(31)).is_ok());
    }

    #[test]
    fn a_charge_that_cannot_be_persisted_or_cut_back_fails_closed() {
        // Every write to /dev/full fails, and it cannot be cut back (not a regular file): what is
        // on disk is unknown, so the reservation stays.
        let ledger = RhoLedger::open(LedgerFile {
            path: "/dev/full".into(),
            spends: Vec::new(),
            torn: None,
        })
        .unwrap();
        let now = Utc::now();
        let failed = ledger.charge("p", "a", &terms(None), now).unwrap_err();
        assert!(failed.to_string().contains("/dev/full: line 1"), "{failed}");
        let repeat = ledger.charge("p", "a", &terms(None), now).unwrap_err();
        assert!(
            repeat.to_string().contains("being answered"),
            "not a free repeat"
        );
        assert!(
            (ledger.usage("p", 30, now).0 - 0.1).abs() < 1e-12,
            "and it still counts"
        );
    }

    /// The daily limit is read from the ledger itself, so a restart (or a crash between a charge
    /// and its answer's record) refills nothing.
    #[test]
    fn the_daily_answer_count_is_read_from_the_charges() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let ledger = open(&path);
        let now = Utc::now();
        let one_a_day = Terms {
            budget: 10.0,
            ..terms(Some(1))
        };
        ledger.charge("p", "a", &one_a_day, now).unwrap();
        let refused = ledger.charge("p", "b", &one_a_day, now).unwrap_err();
        assert!(refused.to_string().contains("per 24 hours"), "{refused}");
        assert_eq!(
            ledger.charge("p", "a", &one_a_day, now).unwrap().rho_spent,
            0.0,
            "a repeat is not a fresh answer"
        );
        let reopened = open(&path);
        assert!(reopened.charge("p", "b", &one_a_day, now).is_err());
        let tomorrow = now + Duration::hours(25);
        assert!(reopened.charge("p", "b", &one_a_day, tomorrow).is_ok());
    }
}
