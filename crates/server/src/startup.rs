//! Start-up wiring: opening the service's state from its data directory (verifying and
//! reconciling what a crash may have left), and serving gRPC (with reflection, health and the
//! authentication layer) and the review page, until told to stop.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use cleanroom_proto::v1::admin_service_server::AdminServiceServer;
use cleanroom_proto::v1::legal_service_server::LegalServiceServer;
use cleanroom_proto::v1::partner_service_server::PartnerServiceServer;
use tokio::net::TcpListener;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::HealthReporter;
use tonic_reflection::server::{v1 as reflection_v1, v1alpha as reflection_v1alpha};

use crate::admin::AdminApi;
use crate::audit::Upload;
use crate::layer::Authenticated;
use crate::legal::LegalApi;
use crate::live::{Live, Reload, source_fingerprint};
use crate::mark::{Mark, MarkKey, MarkWriter};
use crate::partner::PartnerApi;
use crate::recovery::{self, Found};
use crate::state::{App, AppConfig, RefusedCalls};
use crate::tls::Tls;
use crate::{Error, Result};

/// The largest gRPC message accepted, in bytes. Uploads stream many messages of this size at most.
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

/// The health service name that reports whether the configuration on disk is the one in force.
pub const CONFIG_HEALTH: &str = "cleanroom.config";

impl App {
    /// Opens the service's state: checks the configuration, then reads the data directory, its
    /// trail and ledger and the high-water mark and decides whether to start, and only then
    /// repairs what a crash left (module `recovery`). A refused start changes nothing.
    pub fn new(config: AppConfig) -> Result<Arc<Self>> {
        // The configuration is checked (credentials included) before anything is opened or
        // written: a refused start leaves the data directory as it was.
        let fingerprint = match &config.sources {
            Some(sources) => source_fingerprint(sources)?,
            None => String::new(),
        };
        let live = Live::new(
            config.rules.clone(),
            config.allowlist.clone(),
            fingerprint,
            config.allow_demo_tokens,
        )?;
        let keys = cleanroom_core::keys::KeyStore::open(&config.keys, config.secret.clone())?;
        let found = Found::read(&config)?;
        let destruction_requests = crate::requests::Requests::from_history(found.history());
        let destructions_recorded = crate::ending::recorded_destructions(found.history());
        let plan = found.decide(config.accept_restore)?;
        // Tampered records of receipt refuse the start before anything is repaired.
        let chain = crate::audit::ChainKey::new(&config.secret);
        crate::receipts::verify(&config.data_dir, &chain)?;
        let opened = recovery::repair(found, plan, &config, &keys)?;
        let (receipts, torn) = crate::receipts::Receipts::open(&config.data_dir, &chain)?;
        if let Some(torn) = torn {
            recovery::record_torn(&opened.audit, &config.data_dir, &torn, config.clock.now())?;
        }
        opened.review.archive(&live.allowlist, config.clock.now())?;
        let app = Arc::new(Self {
            live: RwLock::new(Arc::new(live)),
            sources: config.sources,
            allow_demo_tokens: config.allow_demo_tokens,
            refused: Mutex::new(String::new()),
            calls: crate::limit::PerMinute::default(),
            in_flight: Arc::default(),
            writes_in_flight: Arc::default(),
            refused_calls: RefusedCalls::default(),
            metrics: crate::metrics::Metrics::new(),
            guard: opened.guard,
            review: opened.review,
            store: opened.store,
            mark: MarkWriter::new(config.mark, MarkKey::new(&config.secret)),
            secret: config.secret,
            keys,
            destruction_requests,
            receipts,
            purchases_swept_on: std::sync::Mutex::new(None),
            audit: Arc::new(opened.audit),
            clock: config.clock,
        });
        let log = app.store.log();
        crate::ending::finish_cut(&app, &log, &destructions_recorded, app.clock.now())?;
        crate::receiving::record_missing(&app)?;
        crate::retention::finish_cut(&app, &app.store.log())?;
        app.follow_with_mark()?;
        crate::ending::sweep(&app)?;
        crate::retention::sweep(&app)?;
        crate::rotation::sweep(&app)?;
        Ok(app)
    }

    /// Keeps the high-water mark up to date from now on (after every record that moves it,
    /// before its call is answered), starting with one written now.
    fn follow_with_mark(self: &Arc<Self>) -> Result<()> {
        self.mark.update(self.mark_now(), true)?;
        let app = Arc::downgrade(self);
        self.audit
            .set_follower(Box::new(move |matters| match app.upgrade() {
                Some(app) => app.mark.update(app.mark_now(), matters),
                None => Ok(()),
            }));
        Ok(())
    }

    /// The high-water mark of the service's state now.
    fn mark_now(&self) -> Mark {
        let head = self.audit.checkpoint();
        let uploads = self
            .guard
            .uploads()
            .into_iter()
            .map(|(partner, at)| Upload { partner, at })
            .collect();
        Mark::of(
            (head.seq, head.head),
            self.store.commits(),
            self.guard.spends(),
            uploads,
            self.receipts.end(),
            self.store.erased(),
            self.clock.now(),
        )
    }
}

/// Serves the API on `listener` (over TLS when `tls` is given) until `shutdown` resolves.
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    tls: Option<Tls>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let (reflection_v1, reflection_v1alpha) = reflection_services()?;
    let (health_reporter, health) = health_service().await;
    // Every call to the clean room's own services is authenticated before it reaches them.
    let partner = partner_service(&app);
    let admin = admin_service(&app);
    let legal = legal_service(&app);
    health_reporter
        .set_service_status(CONFIG_HEALTH, tonic_health::ServingStatus::Serving)
        .await;
    let watcher = app
        .sources
        .as_ref()
        .map(|sources| watch_config(Arc::clone(&app), sources.poll, health_reporter.clone()));
    let preparer = tokio::spawn(prepare_audiences(Arc::clone(&app)));
    let sweeper = sweep_every_minute(Arc::clone(&app));
    let mut builder = server_builder(&app, tls.as_ref())?;
    let served = builder
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(partner)
        .add_service(admin)
        .add_service(legal)
        .serve_with_incoming_shutdown(without_nagle(listener), shutdown)
        .await
        .map_err(|e| Error::Internal(format!("server: {e}")));
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    preparer.abort();
    sweeper.abort();
    served
}

/// The reflection services, over the clean room's API and health.
fn reflection_services() -> Result<(
    reflection_v1::ServerReflectionServer<impl reflection_v1::ServerReflection>,
    reflection_v1alpha::ServerReflectionServer<impl reflection_v1alpha::ServerReflection>,
)> {
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
    Ok((reflection_v1, reflection_v1alpha))
}

/// The health service, with the clean room's three services reported serving.
async fn health_service() -> (HealthReporter, HealthServer<impl Health>) {
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
    (health_reporter, health)
}

/// The partner service, behind the authentication layer.
fn partner_service(app: &Arc<App>) -> Authenticated<PartnerServiceServer<PartnerApi>> {
    let partner = PartnerServiceServer::new(PartnerApi::new(Arc::clone(app)))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(64 * 1024 * 1024);
    Authenticated::new(Arc::clone(app), partner)
}

/// The admin service, behind the authentication layer.
fn admin_service(app: &Arc<App>) -> Authenticated<AdminServiceServer<AdminApi>> {
    let admin = AdminServiceServer::new(AdminApi::new(Arc::clone(app)))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    Authenticated::new(Arc::clone(app), admin)
}

/// The legal service, behind the authentication layer.
fn legal_service(app: &Arc<App>) -> Authenticated<LegalServiceServer<LegalApi>> {
    Authenticated::new(
        Arc::clone(app),
        LegalServiceServer::new(LegalApi::new(Arc::clone(app))),
    )
}

/// Destroys expired collaborations as their retention ends (`ending::sweep`), what the
/// retention rules no longer keep (`retention::sweep`) and key versions whose rotation overlap
/// ended (`rotation::sweep`): checked every minute, so within a minute
/// of the retailer's local midnight, of a reload that changes a contract, and of the end of an
/// answer that held a superseded list version. A failed sweep is logged and tried again; it
/// never stops the service.
fn sweep_every_minute(app: Arc<App>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
            let app = Arc::clone(&app);
            let sweep = move || {
                crate::ending::sweep(&app)?;
                crate::retention::sweep(&app)?;
                crate::rotation::sweep(&app)
            };
            match tokio::task::spawn_blocking(sweep).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "retention sweep failed"),
                Err(e) => tracing::error!(error = %e, "retention sweep panicked"),
            }
        }
    })
}

/// Reloads the configuration every `poll`, reporting under [`CONFIG_HEALTH`] whether the
/// configuration on disk is the one in force.
fn watch_config(
    app: Arc<App>,
    poll: Duration,
    config_health: HealthReporter,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(poll).await;
            let app = Arc::clone(&app);
            let outcome = tokio::task::spawn_blocking(move || reload_and_end_removed(&app)).await;
            let status = if config_in_force(outcome) {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            config_health
                .set_service_status(CONFIG_HEALTH, status)
                .await;
        }
    })
}

/// Reloads the configuration, ends the collaborations whose contracts the new rules removed
/// (`retention::end_removed`) and anchors (or, with no overlap, ends) the rotations it starts
/// (`rotation::sweep`); a failure there is logged, and the reload stands.
fn reload_and_end_removed(app: &App) -> Result<Reload> {
    let before = app.live();
    let outcome = app.reload()?;
    if outcome == Reload::Applied {
        if let Err(e) = crate::retention::end_removed(app, &before.rules) {
            tracing::error!(error = %e, "ending the collaborations a reload removed failed");
        }
        if let Err(e) = crate::rotation::sweep(app) {
            tracing::error!(error = %e, "the rotation sweep after a reload failed");
        }
    }
    Ok(outcome)
}

/// Whether a reload's outcome leaves the configuration on disk in force.
fn config_in_force(outcome: std::result::Result<Result<Reload>, tokio::task::JoinError>) -> bool {
    match outcome {
        Ok(Ok(Reload::Applied | Reload::Unchanged)) => true,
        Ok(Ok(Reload::Refused)) => false,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "configuration reload failed");
            false
        }
        Err(_) => false,
    }
}

/// The gRPC server, within the configured limits, over TLS when `tls` is given.
fn server_builder(app: &App, tls: Option<&Tls>) -> Result<tonic::transport::Server> {
    let limits = app.live().rules.limits.clone();
    let mut builder = tonic::transport::Server::builder()
        .timeout(Duration::from_secs(u64::from(limits.call_timeout_seconds)))
        .concurrency_limit_per_connection(limits.concurrent_calls_per_connection as usize)
        .max_concurrent_streams(Some(limits.concurrent_calls_per_connection));
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls.grpc())
            .map_err(|e| Error::Internal(format!("TLS: {e}")))?;
    }
    Ok(builder)
}

/// How often the store is looked at for a new commit whose audiences to compute ahead.
const PREPARE_POLL: Duration = Duration::from_millis(250);

/// Keeps the audiences of the current lists computed ahead of questions: once at start and after
/// every commit (an upload, an ingest), so a partner's first question after one does not wait
/// for the list's matching and the consent log's reading.
async fn prepare_audiences(app: Arc<App>) {
    let mut prepared = None;
    loop {
        let commits = app.store.commits();
        if prepared != Some(commits) {
            prepared = Some(commits);
            let (snapshot, live) = (app.store.snapshot(), app.live());
            if let Err(e) = app.guard.prepare(&snapshot, &live.rules).await {
                tracing::warn!(error = %e, "computing audiences ahead failed; questions will compute them");
            }
        }
        tokio::time::sleep(PREPARE_POLL).await;
    }
}

/// Accepted connections with Nagle's algorithm off: a small response (a stored
/// answer) would otherwise wait for the client's delayed acknowledgement, about
/// 40 ms, instead of leaving at once.
fn without_nagle(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
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
