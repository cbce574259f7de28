//! The service's state and its gRPC server: what every handler shares, and how the server starts
//! (with gRPC reflection and the standard health service) and stops.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::{DateTime, FixedOffset, NaiveDate, Utc};
use cleanroom_core::allowlist::AllowList;
use cleanroom_core::rules::Rules;
use cleanroom_core::token::MasterSecret;
use cleanroom_engine::guard::{Guard, PastCall};
use cleanroom_engine::store::Store;
use cleanroom_proto::v1::admin_service_server::AdminServiceServer;
use cleanroom_proto::v1::legal_service_server::LegalServiceServer;
use cleanroom_proto::v1::partner_service_server::PartnerServiceServer;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::admin::AdminApi;
use crate::audit::{AuditTrail, Entry, Event};
use crate::auth::Authenticator;
use crate::partner::PartnerApi;
use crate::review::LegalApi;
use crate::tls::Tls;
use crate::{Error, Result};

/// The largest gRPC message accepted, in bytes. Uploads stream many messages of this size at most.
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

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

/// Where the rules and the allow-list come from, when the service should follow edits to them.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The rules file.
    pub rules: PathBuf,
    /// The allow-list directory.
    pub queries: PathBuf,
    /// How often to look for changes.
    pub poll: Duration,
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
}

/// The configuration in force: rules, allow-list and the principals they define. It is replaced
/// whole, never edited, so a call sees one consistent configuration from start to end.
pub struct Live {
    /// The rules.
    pub rules: Rules,
    /// The allow-list (valid queries, and the files that failed validation).
    pub allowlist: AllowList,
    /// Bearer tokens to principals, from the rules.
    pub auth: Authenticator,
    /// SHA-256 of the rules' canonical form, for the audit trail.
    pub rules_sha256: String,
    /// What the source files looked like when this was loaded (empty without sources).
    fingerprint: String,
}

impl Live {
    fn new(
        rules: Rules,
        allowlist: AllowList,
        fingerprint: String,
        allow_demo_tokens: bool,
    ) -> Result<Self> {
        Ok(Self {
            auth: Authenticator::new(&rules, allow_demo_tokens)?,
            rules_sha256: hex::encode(Sha256::digest(format!("{rules:?}").as_bytes())),
            rules,
            allowlist,
            fingerprint,
        })
    }
}

/// State shared by every handler.
pub struct App {
    live: RwLock<Arc<Live>>,
    sources: Option<Sources>,
    allow_demo_tokens: bool,
    /// Fingerprint of the last source state that failed to load, so a broken edit is recorded
    /// once, not at every poll.
    refused: Mutex<String>,
    /// The data.
    pub store: Store,
    /// The master secret, for keys and pseudonyms.
    pub secret: MasterSecret,
    /// The audit trail.
    pub audit: AuditTrail,
    /// Source of "now".
    pub clock: Arc<dyn Clock>,
    /// Each principal's recent calls, for the per-minute limit (kept across reloads).
    calls: crate::limit::PerMinute,
    /// Each principal's calls in flight.
    in_flight: Arc<crate::limit::InFlight>,
    /// Calls refused before authentication completed (never audited).
    unauthenticated: std::sync::atomic::AtomicU64,
    /// When the last line about them was logged.
    unauthenticated_logged: Mutex<Option<std::time::Instant>>,
    /// The guard and the state of its defences (budgets, history, list ledger).
    pub guard: cleanroom_engine::guard::Guard,
    /// Approvals and rejections of allow-list versions, and every version seen.
    pub review: crate::review::ReviewState,
}

impl App {
    /// Opens the data directory and the audit trail.
    pub fn new(config: AppConfig) -> Result<Arc<Self>> {
        // The configuration is checked (credentials included) before anything is opened or
        // written: a refused start leaves the data directory as it was.
        let fingerprint = match &config.sources {
            Some(sources) => source_fingerprint(sources)?,
            None => String::new(),
        };
        let live = Live::new(
            config.rules,
            config.allowlist,
            fingerprint,
            config.allow_demo_tokens,
        )?;
        let store = Store::open_for_service(&config.data_dir)?;
        let audit_path = config.data_dir.join("audit.jsonl");
        // Budgets, list allowances and approvals survive restarts: all are in the audit trail.
        let (audit, history, torn_audit) =
            AuditTrail::open(&audit_path, crate::audit::ChainKey::new(&config.secret))?;
        let past: Vec<PastCall> = history
            .iter()
            .filter_map(|r| {
                Some(PastCall {
                    partner: r.entry.partner.clone()?,
                    method: r.entry.method.clone(),
                    at: DateTime::parse_from_rfc3339(&r.at)
                        .ok()?
                        .with_timezone(&Utc),
                    ok: r.entry.outcome == "ok",
                    fresh: match &r.entry.event {
                        Some(Event::Answer(report)) => report.fresh,
                        _ => r
                            .entry
                            .details
                            .as_ref()
                            .and_then(|d| d.get("fresh"))
                            .is_none_or(|f| f == "true"),
                    },
                })
            })
            .collect();
        let guard = Guard::open(&config.data_dir, &config.secret, &past)?;
        require_whole_ledger(&guard, &history)?;
        let review = crate::review::ReviewState::open(&config.data_dir, &history)?;
        reconcile(&store, &audit, &history, config.clock.now())?;
        let torn: Vec<_> = torn_audit
            .into_iter()
            .chain(guard.recovered())
            .chain(review.recovered())
            .collect();
        for tail in torn {
            let file = tail
                .path
                .strip_prefix(&config.data_dir)
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
                config.clock.now(),
            )?;
        }
        review.archive(&live.allowlist, config.clock.now())?;
        Ok(Arc::new(Self {
            live: RwLock::new(Arc::new(live)),
            sources: config.sources,
            allow_demo_tokens: config.allow_demo_tokens,
            refused: Mutex::new(String::new()),
            calls: crate::limit::PerMinute::default(),
            in_flight: Arc::default(),
            unauthenticated: std::sync::atomic::AtomicU64::new(0),
            unauthenticated_logged: Mutex::new(None),
            guard,
            review,
            store,
            secret: config.secret,
            audit,
            clock: config.clock,
        }))
    }

    /// The configuration in force now. Hold the returned value for the whole call.
    pub fn live(&self) -> Arc<Live> {
        self.live.read().expect("config lock poisoned").clone()
    }

    /// Today in the retailer's time zone: contracts expire and ages turn over on local dates.
    pub fn today(&self) -> NaiveDate {
        let offset = self.live().rules.retailer.utc_offset_minutes;
        let offset = FixedOffset::east_opt(offset * 60)
            .unwrap_or_else(|| FixedOffset::east_opt(0).expect("zero offset"));
        self.clock.now().with_timezone(&offset).date_naive()
    }

    /// The caller of `request` under the configuration `live`, within its per-minute limit and
    /// its calls in flight: authentication and the limits are one step, before any work on the
    /// request. The returned principal holds the call's place; handlers keep it to the end.
    pub fn authenticate<T>(
        &self,
        live: &Live,
        request: &tonic::Request<T>,
    ) -> Result<crate::auth::Principal> {
        let principal = live.auth.principal(request)?;
        let limit = live.rules.limits.calls_per_minute as usize;
        self.calls
            .admit(&principal.name, limit, true)
            .map_err(|wait| {
                cleanroom_core::Error::Limit(format!(
                    "rate limit of {limit} calls per minute reached; retry in {wait} s"
                ))
            })?;
        let most = live.rules.limits.concurrent_calls_per_principal as usize;
        let slot = self.in_flight.enter(&principal.name, most).ok_or_else(|| {
            cleanroom_core::Error::Limit(format!(
                "{most} calls of yours are already in flight; retry when one has ended"
            ))
        })?;
        // The place is held for as long as the handler holds the principal.
        Ok(principal.holding(slot))
    }

    /// Calls refused before authentication since start-up.
    pub fn unauthenticated_calls(&self) -> u64 {
        self.unauthenticated
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts one unauthenticated call; logs the running count at most once a minute.
    fn count_unauthenticated(&self) {
        let total = self
            .unauthenticated
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let mut logged = self
            .unauthenticated_logged
            .lock()
            .expect("log lock poisoned");
        if logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
            *logged = Some(std::time::Instant::now());
            tracing::warn!(total, "calls refused before authentication (not audited)");
        }
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
        let loaded = Rules::load(&sources.rules)
            .and_then(|rules| {
                let allowlist = AllowList::scan(&sources.queries, &rules)?;
                Ok((rules, allowlist))
            })
            .map_err(Error::from)
            .and_then(|(rules, allowlist)| {
                Live::new(
                    rules,
                    allowlist,
                    fingerprint.clone(),
                    self.allow_demo_tokens,
                )
            });
        let next = match loaded {
            Ok(loaded) => loaded,
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
        let change = config_change(&current, &next);
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

/// The calls that commit a write to the store, as the audit trail names them.
const WRITES: &[&str] = &[
    "IngestMembers",
    "IngestPurchases",
    "IngestConsent",
    "UploadList",
    "IngestPartnerList",
];

/// Makes the trail account for the data directory: files no manifest named were removed, and a
/// write committed whose record a crash lost (the store commits before the call's record is
/// written) gets a record now. So after any crash no data is without a record.
fn reconcile(
    store: &Store,
    audit: &AuditTrail,
    history: &[crate::audit::Record],
    now: DateTime<Utc>,
) -> Result<()> {
    let recorded = history
        .iter()
        .filter(|r| r.entry.outcome == "ok" && WRITES.contains(&r.entry.method.as_str()))
        .count() as u64;
    let recovered: u64 = history
        .iter()
        .filter_map(|r| match &r.entry.event {
            Some(Event::Reconciled {
                unrecorded_writes, ..
            }) => Some(*unrecorded_writes),
            _ => None,
        })
        .sum();
    let unrecorded_writes = store.commits().saturating_sub(recorded + recovered);
    let orphan_files = store.collected().to_vec();
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
            }),
            ..Default::default()
        },
        now,
    )?;
    Ok(())
}

/// Fails closed when the guard's privacy ledger holds fewer charges than the audit trail records
/// charged answers: the ledger was lost or rolled back, and rebuilding budgets from it would
/// refill them.
fn require_whole_ledger(guard: &Guard, history: &[crate::audit::Record]) -> Result<()> {
    let charged = history
        .iter()
        .filter(|r| matches!(&r.entry.event, Some(Event::Answer(report)) if report.rho_spent > 0.0))
        .count();
    let on_ledger = guard.charges();
    if on_ledger < charged {
        return Err(Error::Internal(format!(
            "guard/ledger.jsonl holds {on_ledger} charges but the audit trail records {charged} \
             charged answers: the ledger is missing or was rolled back; restore it from backup \
             (the service will not start and refill budgets)"
        )));
    }
    Ok(())
}

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// The sources did not change.
    Unchanged,
    /// A new configuration took effect.
    Applied,
    /// The sources changed into something that does not load; the previous configuration stays.
    Refused,
}

/// The health service name that reports whether the configuration on disk is the one in force.
pub const CONFIG_HEALTH: &str = "cleanroom.config";

/// A file's part of the fingerprint: its bytes, or why it cannot be read (read under the same
/// rules as loading: regular files only, bounded, so a FIFO or a symlink cannot stall or redirect
/// the poll).
fn fingerprint_part(path: &std::path::Path) -> Vec<u8> {
    match cleanroom_core::files::read_config_file(path) {
        Ok(text) => text.into_bytes(),
        Err(e) => format!("\0unreadable: {e}").into_bytes(),
    }
}

/// A digest of the rules file and every query file (names and bytes), to notice edits cheaply.
fn source_fingerprint(sources: &Sources) -> Result<String> {
    let io = |e: std::io::Error| Error::Internal(format!("reading configuration: {e}"));
    let mut hasher = Sha256::new();
    hasher.update(fingerprint_part(&sources.rules));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&sources.queries)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    for file in files {
        hasher.update(file.to_string_lossy().as_bytes());
        hasher.update([0]);
        hasher.update(fingerprint_part(&file));
    }
    Ok(hex::encode(hasher.finalize()))
}

/// What a configuration change changed, for its audit record.
fn config_change(old: &Live, new: &Live) -> Event {
    let rules = (old.rules_sha256 != new.rules_sha256)
        .then(|| format!("{} -> {}", &old.rules_sha256[..12], &new.rules_sha256[..12]));
    let hashes = |live: &Live| -> BTreeMap<String, String> {
        live.allowlist
            .iter()
            .map(|q| (q.id.clone(), q.content_sha256.clone()))
            .collect()
    };
    let (before, after) = (hashes(old), hashes(new));
    let mut queries = Vec::new();
    for (id, sha) in &after {
        match before.get(id) {
            None => queries.push(format!("{id} added")),
            Some(old) if old != sha => queries.push(format!("{id} changed")),
            _ => {}
        }
    }
    queries.extend(
        before
            .keys()
            .filter(|id| !after.contains_key(*id))
            .map(|id| format!("{id} removed")),
    );
    let invalid_queries = new
        .allowlist
        .invalid()
        .iter()
        .map(|q| q.id.clone())
        .collect();
    Event::ConfigChange {
        rules,
        queries,
        invalid_queries,
    }
}

/// Serves the API on `listener` (over TLS when `tls` is given) until `shutdown` resolves.
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    tls: Option<Tls>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    // Both reflection versions: grpcurl speaks v1, grpcio's reflection client still v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(cleanroom_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<PartnerServiceServer<PartnerApi>>()
        .await;
    health_reporter
        .set_serving::<AdminServiceServer<AdminApi>>()
        .await;
    health_reporter
        .set_serving::<LegalServiceServer<LegalApi>>()
        .await;

    let partner = PartnerServiceServer::new(PartnerApi::new(Arc::clone(&app)))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(64 * 1024 * 1024);
    let admin = AdminServiceServer::new(AdminApi::new(Arc::clone(&app)))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let legal = LegalServiceServer::new(LegalApi::new(Arc::clone(&app)));
    health_reporter
        .set_service_status(CONFIG_HEALTH, tonic_health::ServingStatus::Serving)
        .await;
    let watcher = app.sources.as_ref().map(|sources| {
        let (app, poll) = (Arc::clone(&app), sources.poll);
        let config_health = health_reporter.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(poll).await;
                let app = Arc::clone(&app);
                let outcome = tokio::task::spawn_blocking(move || app.reload()).await;
                let in_force = match outcome {
                    Ok(Ok(Reload::Applied | Reload::Unchanged)) => true,
                    Ok(Ok(Reload::Refused)) => false,
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "configuration reload failed");
                        false
                    }
                    Err(_) => false,
                };
                let status = if in_force {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                config_health
                    .set_service_status(CONFIG_HEALTH, status)
                    .await;
            }
        })
    });
    let limits = app.live().rules.limits.clone();
    let mut builder = tonic::transport::Server::builder()
        .timeout(Duration::from_secs(u64::from(limits.call_timeout_seconds)))
        .concurrency_limit_per_connection(limits.concurrent_calls_per_connection as usize)
        .max_concurrent_streams(Some(limits.concurrent_calls_per_connection));
    if let Some(tls) = &tls {
        builder = builder
            .tls_config(tls.grpc())
            .map_err(|e| Error::Internal(format!("TLS: {e}")))?;
    }
    let served = builder
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(partner)
        .add_service(admin)
        .add_service(legal)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .map_err(|e| Error::Internal(format!("server: {e}")));
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    served
}

/// A server running in the background: gRPC and the review page.
pub struct Running {
    /// The gRPC address.
    pub addr: SocketAddr,
    /// The review page's address.
    pub review_addr: SocketAddr,
    shutdown: Option<tokio::sync::watch::Sender<bool>>,
    handles: Vec<tokio::task::JoinHandle<Result<()>>>,
}

impl Running {
    /// Stops both servers and waits for them.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        for handle in self.handles.drain(..) {
            handle
                .await
                .map_err(|e| Error::Internal(format!("server task: {e}")))??;
        }
        Ok(())
    }
}

/// Binds `addr` for gRPC and `review_addr` for the review page (port 0 picks a free port) and
/// serves both in the background, in plain text: loopback only.
pub async fn spawn_with_page(
    app: Arc<App>,
    addr: SocketAddr,
    review_addr: SocketAddr,
) -> Result<Running> {
    spawn_with_tls(app, addr, review_addr, None).await
}

/// As [`spawn_with_page`], over TLS on both ports when `tls` is given. Without TLS only loopback
/// addresses are allowed: bearer tokens and raw identifiers travel over these ports.
pub async fn spawn_with_tls(
    app: Arc<App>,
    addr: SocketAddr,
    review_addr: SocketAddr,
    tls: Option<Tls>,
) -> Result<Running> {
    if tls.is_none() {
        for (what, a) in [("gRPC", addr), ("review page", review_addr)] {
            if !a.ip().is_loopback() {
                return Err(Error::Internal(format!(
                    "{what} address {a}: only loopback addresses are allowed without TLS"
                )));
            }
        }
    }
    let listener = bind(addr).await?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Internal(e.to_string()))?;
    let page = bind(review_addr).await?;
    let review_addr = page
        .local_addr()
        .map_err(|e| Error::Internal(e.to_string()))?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let page_task = match &tls {
        Some(tls) => tokio::spawn(crate::page::serve(
            Arc::clone(&app),
            tls.page_listener(page)?,
            stopped(rx.clone()),
        )),
        None => tokio::spawn(crate::page::serve(
            Arc::clone(&app),
            page,
            stopped(rx.clone()),
        )),
    };
    let handles = vec![
        tokio::spawn(serve(app, listener, tls, stopped(rx))),
        page_task,
    ];
    Ok(Running {
        addr,
        review_addr,
        shutdown: Some(tx),
        handles,
    })
}

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Internal(format!("cannot listen on {addr}: {e}")))
}

/// Binds `addr` (use port 0 for any free port) and serves gRPC there and the review page on a
/// free port of the same loopback address, in the background.
pub async fn spawn(app: Arc<App>, addr: SocketAddr) -> Result<Running> {
    spawn_with_page(app, addr, SocketAddr::new(addr.ip(), 0)).await
}

/// Responses that name the audit record written for them.
pub(crate) trait Audited {
    fn set_audit_id(&mut self, id: String);
}

impl App {
    /// Ends a call: writes its audit record, then answers. A result whose audit record cannot be
    /// written is not released.
    pub(crate) fn finish<T: Audited>(
        &self,
        mut entry: Entry,
        result: Result<T>,
    ) -> std::result::Result<tonic::Response<T>, tonic::Status> {
        if entry.principal.is_empty() {
            // Authenticate first, then audit: a caller without valid credentials writes nothing
            // to the trail (it could otherwise fill it, and name any partner); it is counted.
            self.count_unauthenticated();
            let refusal = match result {
                Err(e) => e,
                Ok(_) => Error::Unauthenticated("no principal".into()),
            };
            return Err(crate::status::to_status(&refusal, "unrecorded"));
        }
        entry.outcome = match &result {
            Ok(_) => "ok".to_string(),
            Err(e) => crate::status::outcome(e),
        };
        let recorded = self.record(entry);
        match (result, recorded) {
            (Ok(mut response), Ok(id)) => {
                response.set_audit_id(id);
                Ok(tonic::Response::new(response))
            }
            (Ok(_), Err(e)) => {
                tracing::error!(error = %e, "audit trail write failed; result withheld");
                Err(crate::status::to_status(&e, "unrecorded"))
            }
            (Err(e), Ok(id)) => Err(crate::status::to_status(&e, &id)),
            (Err(e), Err(audit_error)) => {
                tracing::error!(error = %audit_error, "audit trail write failed");
                Err(crate::status::to_status(&e, "unrecorded"))
            }
        }
    }
}
