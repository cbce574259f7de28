//! The service's shared state: what every handler reads (the configuration in force, the store,
//! the guard, the audit trail, the review state) and the counters of calls refused before they
//! reach a handler. Opening it is start-up's job ([`crate::startup`]); a call's own view of it is
//! its context ([`crate::context::Call`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use cleanroom_core::allowlist::AllowList;
use cleanroom_core::rules::Rules;
use cleanroom_core::token::MasterSecret;
use cleanroom_engine::guard::Guard;
use cleanroom_engine::store::Store;

use crate::audit::{AuditTrail, Entry};
use crate::live::{Live, Reload, Sources, source_fingerprint};
use crate::metrics::{Metrics, Readings, Refused};
use crate::review::ReviewState;
use crate::{Error, Result};

/// Where "now" comes from. Consent, contract expiry and age bands depend on it, so tests and
/// reproducible demos pin it.
pub trait Clock: Send + Sync {
    /// The current instant.
    fn now(&self) -> DateTime<Utc>;
}

/// The wall clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock pinned to one instant.
#[derive(Debug)]
pub struct FixedClock(pub DateTime<Utc>);

impl Clock for FixedClock {
    fn now(&self) -> DateTime<Utc> {
        self.0
    }
}

/// Everything a service needs to start.
pub struct AppConfig {
    /// Data directory (Parquet files, manifest, audit trail).
    pub data_dir: PathBuf,
    /// Validated rules.
    pub rules: Rules,
    /// Loaded allow-list.
    pub allowlist: AllowList,
    /// The retailer's master secret.
    pub secret: MasterSecret,
    /// Source of "now".
    pub clock: Arc<dyn Clock>,
    /// If set, the running service follows validated edits of these files without a restart.
    pub sources: Option<Sources>,
    /// Accept principals in the demo token form (a SHA-256 of a token of unknown strength, such
    /// as the published sample tokens). Only the demo and tests set it.
    pub allow_demo_tokens: bool,
    /// The high-water mark: a file outside the data directory, so that a restore of the
    /// directory from backup is seen at start ([`crate::mark`]).
    pub mark: PathBuf,
    /// Start on a data directory behind its high-water mark (a restore the operator intends),
    /// carrying over what it lacks.
    pub accept_restore: bool,
    /// How questions execute: memory pool, spill directory, plans at once, query threads.
    pub engine: cleanroom_engine::executor::ExecutorConfig,
    /// The key store: each collaboration's random key seed, outside the data directory and its
    /// backups, so that destroying a seed cannot be undone by restoring a backup
    /// ([`cleanroom_core::keys`]).
    pub keys: PathBuf,
}

/// State shared by every handler.
pub struct App {
    pub(crate) live: RwLock<Arc<Live>>,
    pub(crate) sources: Option<Sources>,
    pub(crate) allow_demo_tokens: bool,
    /// Fingerprint of the last source state that failed to load, so a broken edit is recorded
    /// once, not at every poll.
    pub(crate) refused: Mutex<String>,
    /// The data.
    pub store: Store,
    /// The master secret, for keys and pseudonyms.
    pub secret: MasterSecret,
    /// Each collaboration's key seed; with the master secret, its match key.
    pub keys: Arc<cleanroom_core::keys::KeyStore>,
    /// Requests to end a collaboration waiting for legal.
    pub(crate) destruction_requests: crate::requests::Requests,
    /// The retailer's local day the purchases retention last ran on: it runs once a day.
    pub(crate) purchases_swept_on: Mutex<Option<chrono::NaiveDate>>,
    /// The audit trail.
    pub audit: Arc<AuditTrail>,
    /// The records of receipt of partners' lists, kept apart from the data they describe.
    pub receipts: crate::receipts::Receipts,
    /// Source of "now".
    pub clock: Arc<dyn Clock>,
    /// Each principal's recent calls, for the per-minute limit (kept across reloads).
    pub(crate) calls: crate::limit::PerMinute,
    /// Each principal's calls in flight.
    pub(crate) in_flight: Arc<crate::limit::InFlight>,
    /// Writes in flight by request id: a retry never runs beside the write it retries.
    pub(crate) writes_in_flight: Arc<crate::limit::InFlight>,
    /// Calls refused before they reached a handler: never audited, counted and logged coarsely.
    pub(crate) refused_calls: RefusedCalls,
    /// The guard and the state of its defences (budgets, history, list ledger).
    pub guard: Guard,
    /// Approvals and rejections of allow-list versions, and every version seen.
    pub review: ReviewState,
    /// Keeps the high-water mark outside the data directory up to date.
    pub(crate) mark: crate::mark::MarkWriter,
    /// What `/metrics` on the review page's port reports.
    pub metrics: Metrics,
}

/// Calls refused before a handler ran: without valid credentials, or over a principal's limits.
/// They are never written to the audit trail (a flood would fill it); a warning with the running
/// counts is logged at most once a minute.
#[derive(Default)]
pub(crate) struct RefusedCalls {
    unauthenticated: AtomicU64,
    limited: AtomicU64,
    logged: Mutex<Option<Instant>>,
}

/// Why a call was refused before its handler.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Refusal {
    /// No valid credentials.
    Unauthenticated,
    /// Over the principal's rate or in-flight limit.
    Limited,
}

impl RefusedCalls {
    pub(crate) fn count(&self, why: Refusal) {
        let counter = match why {
            Refusal::Unauthenticated => &self.unauthenticated,
            Refusal::Limited => &self.limited,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut logged = self.logged.lock().expect("log lock poisoned");
        if logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
            *logged = Some(Instant::now());
            tracing::warn!(
                unauthenticated = self.unauthenticated.load(Ordering::Relaxed),
                limited = self.limited.load(Ordering::Relaxed),
                "calls refused before a handler ran (not audited)"
            );
        }
    }
}

impl App {
    /// The configuration in force now. Hold the returned value for the whole call.
    pub fn live(&self) -> Arc<Live> {
        self.live.read().expect("config lock poisoned").clone()
    }

    /// Counts a call refused before its handler ran: in the running counts that are logged, and
    /// in the metrics.
    pub(crate) fn refuse(&self, why: Refusal) {
        self.refused_calls.count(why);
        self.metrics.refused(match why {
            Refusal::Unauthenticated => Refused::Unauthenticated,
            Refusal::Limited => Refused::Limited,
        });
    }

    /// The metrics in the Prometheus text format, with what is read rather than counted (each
    /// partner's own spending in its current period, the query queue and memory) read now.
    pub fn scrape(&self) -> Result<String> {
        let live = self.live();
        let now = self.clock.now();
        let spending = live
            .rules
            .partners
            .keys()
            .filter_map(|partner| {
                let (_, contract) = live.rules.contract_of(partner)?;
                // A contract whose guarantee does not hold is refused at every call anyway.
                let spending = self.guard.spending(contract, now).ok()?;
                Some((partner.clone(), spending))
            })
            .collect();
        self.metrics.encode(&Readings {
            load: self.guard.load(),
            spending,
        })
    }

    /// Calls refused without valid credentials since start-up.
    pub fn unauthenticated_calls(&self) -> u64 {
        self.refused_calls.unauthenticated.load(Ordering::Relaxed)
    }

    /// Calls refused over a principal's rate or in-flight limit since start-up.
    pub fn limited_calls(&self) -> u64 {
        self.refused_calls.limited.load(Ordering::Relaxed)
    }

    /// How many calls of `principal` are in flight now (what its concurrency limit counts).
    pub fn calls_in_flight(&self, principal: &str) -> usize {
        self.in_flight.count(principal)
    }

    /// Appends an audit record and returns its id.
    pub fn record(&self, entry: Entry) -> Result<String> {
        self.audit.append(entry, self.clock.now())
    }

    /// Looks at the rules file and the allow-list directory, and if either changed, loads and
    /// validates them and replaces the configuration in force in one step. A change that does not
    /// validate is refused whole: the service keeps running on the previous configuration. Both
    /// outcomes are audit records. Returns what happened.
    pub fn reload(&self) -> Result<Reload> {
        let Some(sources) = &self.sources else {
            return Ok(Reload::Unchanged);
        };
        let fingerprint = source_fingerprint(sources)?;
        let current = self.live();
        if fingerprint == current.fingerprint {
            // Still the refused state, if the last change was refused.
            let refused = *self.refused.lock().expect("reload lock poisoned") == fingerprint;
            return Ok(if refused {
                Reload::Refused
            } else {
                Reload::Unchanged
            });
        }
        let next = match Live::load(sources, fingerprint.clone(), self.allow_demo_tokens) {
            Ok(next) => next,
            Err(e) => {
                let mut refused = self.refused.lock().expect("reload lock poisoned");
                if *refused != fingerprint {
                    *refused = fingerprint;
                    tracing::warn!(error = %e, "configuration change refused; the previous one stays in force");
                    self.record(Entry {
                        principal: "service".into(),
                        method: "ReloadConfig".into(),
                        outcome: format!("refused: {e}"),
                        ..Default::default()
                    })?;
                }
                return Ok(Reload::Refused);
            }
        };
        let change = crate::live::config_change(&current, &next);
        self.review.archive(&next.allowlist, self.clock.now())?;
        // Recorded before it takes effect: a change the trail cannot hold does not happen.
        self.record(Entry {
            principal: "service".into(),
            method: "ReloadConfig".into(),
            outcome: "ok".into(),
            event: Some(change),
            ..Default::default()
        })?;
        *self.live.write().expect("config lock poisoned") = Arc::new(next);
        tracing::info!("configuration reloaded");
        self.refused.lock().expect("reload lock poisoned").clear();
        Ok(Reload::Applied)
    }
}

/// Runs blocking work (hashing, fsync, Parquet) off the async workers, so that one caller's
/// heavy call never stalls the others' calls.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Internal(format!("blocking task: {e}")))?
}
