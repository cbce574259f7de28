//! Counting events per key over a sliding minute: the per-principal call limit and the failed
//! guesses per token id.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const MINUTE: Duration = Duration::from_secs(60);

/// Events of the last minute, per key.
#[derive(Debug, Default)]
pub(crate) struct PerMinute(Mutex<HashMap<String, VecDeque<Instant>>>);

impl PerMinute {
    /// Whether `key` had fewer than `limit` events in the last minute; if so and `record`, this
    /// one is counted (checking and counting are one step). Otherwise the seconds until the
    /// oldest leaves the window.
    pub fn admit(&self, key: &str, limit: usize, record: bool) -> Result<(), u64> {
        let mut events = self.0.lock().expect("limit lock poisoned");
        let recent = events.entry(key.to_string()).or_default();
        while recent.front().is_some_and(|t| t.elapsed() >= MINUTE) {
            recent.pop_front();
        }
        if recent.len() >= limit {
            let wait = MINUTE.saturating_sub(recent.front().map_or(MINUTE, |t| t.elapsed()));
            return Err(wait.as_secs().max(1));
        }
        if record {
            recent.push_back(Instant::now());
        }
        Ok(())
    }

    /// Counts one event for `key`.
    pub fn record(&self, key: &str) {
        self.0
            .lock()
            .expect("limit lock poisoned")
            .entry(key.to_string())
            .or_default()
            .push_back(Instant::now());
    }
}

/// Calls in flight, per key.
#[derive(Debug, Default)]
pub(crate) struct InFlight(Mutex<HashMap<String, usize>>);

/// One call in flight; leaving it (dropping) frees its place.
#[derive(Debug)]
pub struct CallSlot {
    owner: std::sync::Arc<InFlight>,
    key: String,
}

impl InFlight {
    /// How many calls of `key` are in flight now.
    pub fn count(&self, key: &str) -> usize {
        let counts = self.0.lock().expect("limit lock poisoned");
        counts.get(key).copied().unwrap_or(0)
    }

    /// A place for one more call of `key`, if it has fewer than `limit` in flight.
    pub fn enter(self: &std::sync::Arc<Self>, key: &str, limit: usize) -> Option<CallSlot> {
        let mut counts = self.0.lock().expect("limit lock poisoned");
        let count = counts.entry(key.to_string()).or_default();
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(CallSlot {
            owner: std::sync::Arc::clone(self),
            key: key.to_string(),
        })
    }
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        let mut counts = self.owner.0.lock().expect("limit lock poisoned");
        if let Some(count) = counts.get_mut(&self.key) {
            *count = count.saturating_sub(1);
        }
    }
}
