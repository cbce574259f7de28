//! Budgets against reconstruction (THREATS 7): how many answers each partner receives per rolling
//! day, and, under a differential-privacy contract, how much ε it spends per period. Both ledgers
//! are rebuilt from the audit trail at start-up, so a restart refills nothing.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};
use cleanroom_core::rules::DpSettings;

use crate::Result;

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
    /// becomes possible. Checking and taking is one step, so parallel calls cannot overspend;
    /// [`Budgets::give_back`] returns it if no answer is released after all.
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

    /// Returns an answer taken by [`Budgets::take`] that was not released.
    pub fn give_back(&self, partner: &str, now: DateTime<Utc>) {
        let mut answered = self.answered.lock().expect("budget lock poisoned");
        if let Some(times) = answered.get_mut(partner)
            && let Some(position) = times.iter().rposition(|t| *t == now)
        {
            times.remove(position);
        }
    }
}

/// One spending of ε.
#[derive(Debug, Clone)]
struct Spend {
    at: DateTime<Utc>,
    epsilon: f64,
    /// What was answered: the same key answered again in the period costs nothing.
    key: String,
}

/// What charging an answer cost and left.
#[derive(Debug, Clone, PartialEq)]
pub struct Charge {
    /// ε this answer spent: 0 when it repeats an answer already paid for in the period.
    pub spent: f64,
    /// ε left in the period after it.
    pub remaining: f64,
    /// When the oldest spending in the period stops counting.
    pub resets_at: Option<DateTime<Utc>>,
}

/// ε each partner spent, for contracts under differential privacy.
#[derive(Debug, Default)]
pub struct EpsilonLedger {
    spent: Mutex<HashMap<String, Vec<Spend>>>,
}

impl EpsilonLedger {
    /// Rebuilds the ledger from earlier answers (partner, time, ε, key).
    pub fn from_history(
        history: impl IntoIterator<Item = (String, DateTime<Utc>, f64, String)>,
    ) -> Self {
        let mut spent: HashMap<String, Vec<Spend>> = HashMap::new();
        for (partner, at, epsilon, key) in history {
            spent
                .entry(partner)
                .or_default()
                .push(Spend { at, epsilon, key });
        }
        Self {
            spent: Mutex::new(spent),
        }
    }

    /// Charges `epsilon` for the answer `key`, unless the same answer was paid for within the
    /// period; refuses with the time budget returns if the period's budget cannot cover it.
    /// With `dry_run`, only checks.
    pub fn charge(
        &self,
        partner: &str,
        key: &str,
        dp: &DpSettings,
        now: DateTime<Utc>,
        dry_run: bool,
    ) -> Result<Charge> {
        let (epsilon, budget, period_days) = (
            dp.epsilon_per_query,
            dp.epsilon_budget,
            dp.budget_period_days,
        );
        let mut spent = self.spent.lock().expect("ledger lock poisoned");
        let entries = spent.entry(partner.to_string()).or_default();
        let period = Duration::days(i64::from(period_days));
        entries.retain(|s| s.at + period > now);
        let used: f64 = entries.iter().map(|s| s.epsilon).sum();
        let resets_at = entries.iter().map(|s| s.at + period).min();
        if entries.iter().any(|s| s.key == key) {
            return Ok(Charge {
                spent: 0.0,
                remaining: (budget - used).max(0.0),
                resets_at,
            });
        }
        // A small tolerance keeps ten spends of 0.1 within a budget of 1.0.
        if used + epsilon > budget + 1e-9 {
            return Err(cleanroom_core::Error::Limit(format!(
                "privacy budget spent: ε {used:.3} of {budget:.3} used in the last {period_days} days, \
                 this answer needs {epsilon:.3}; budget returns from {}",
                resets_at.unwrap_or(now).to_rfc3339()
            ))
            .into());
        }
        if !dry_run {
            entries.push(Spend {
                at: now,
                epsilon,
                key: key.to_string(),
            });
        }
        Ok(Charge {
            spent: epsilon,
            remaining: (budget - used - epsilon).max(0.0),
            resets_at: resets_at.or(Some(now + period)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_free_and_the_budget_is_enforced() {
        let ledger = EpsilonLedger::default();
        let now = Utc::now();
        let dp = DpSettings {
            epsilon_per_query: 1.0,
            epsilon_budget: 2.5,
            budget_period_days: 30,
            delta: 1e-6,
            max_groups_per_member: 1,
        };
        let charge = |key: &str| ledger.charge("p", key, &dp, now, false);
        assert_eq!(charge("a").unwrap().spent, 1.0);
        assert_eq!(charge("a").unwrap().spent, 0.0);
        assert_eq!(charge("b").unwrap().remaining, 0.5);
        assert!(charge("c").is_err());
        let later = now + Duration::days(31);
        assert!(ledger.charge("p", "c", &dp, later, false).is_ok());
    }

    #[test]
    fn a_taken_answer_can_be_given_back() {
        let budgets = Budgets::default();
        let now = Utc::now();
        budgets.take("p", Some(1), now).unwrap();
        assert!(budgets.take("p", Some(1), now).is_err());
        budgets.give_back("p", now);
        assert!(budgets.take("p", Some(1), now).is_ok());
    }
}
