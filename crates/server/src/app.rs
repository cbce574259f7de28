//! The service's state and its gRPC server: what every handler shares, and how the server starts
//! (with gRPC reflection and the standard health service) and stops.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, FixedOffset, NaiveDate, Utc};
use cleanroom_core::allowlist::AllowList;
use cleanroom_core::rules::Rules;
use cleanroom_core::token::MasterSecret;
use cleanroom_engine::store::Store;
use cleanroom_proto::v1::admin_service_server::AdminServiceServer;
use cleanroom_proto::v1::partner_service_server::PartnerServiceServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;

use crate::admin::AdminApi;
use crate::audit::{AuditTrail, Entry};
use crate::auth::Authenticator;
use crate::partner::PartnerApi;
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
}

/// State shared by every handler.
pub struct App {
    /// The rules in force.
    pub rules: Rules,
    /// The allow-list in force.
    pub allowlist: AllowList,
    /// The data.
    pub store: Store,
    /// The master secret, for keys and pseudonyms.
    pub secret: MasterSecret,
    /// The audit trail.
    pub audit: AuditTrail,
    /// Source of "now".
    pub clock: Arc<dyn Clock>,
    /// Bearer tokens to principals.
    pub auth: Authenticator,
    /// Answers each partner received recently, for query budgets.
    pub budgets: cleanroom_engine::guard::Budgets,
}

impl App {
    /// Opens the data directory and the audit trail.
    pub fn new(config: AppConfig) -> Result<Arc<Self>> {
        let store = Store::open(&config.data_dir)?;
        let audit_path = config.data_dir.join("audit.jsonl");
        // Budgets survive restarts: every answer released is in the audit trail.
        let (audit, answered) = AuditTrail::open(&audit_path)?;
        let budgets =
            cleanroom_engine::guard::Budgets::from_history(answered.into_iter().filter_map(|r| {
                let released = r.entry.method == "RunQuery" && r.entry.outcome == "ok";
                let at = DateTime::parse_from_rfc3339(&r.at)
                    .ok()?
                    .with_timezone(&Utc);
                released.then_some((r.entry.partner?, at))
            }));
        Ok(Arc::new(Self {
            budgets,
            auth: Authenticator::new(&config.rules),
            rules: config.rules,
            allowlist: config.allowlist,
            store,
            secret: config.secret,
            audit,
            clock: config.clock,
        }))
    }

    /// Today in the retailer's time zone: contracts expire and ages turn over on local dates.
    pub fn today(&self) -> NaiveDate {
        let offset = FixedOffset::east_opt(self.rules.retailer.utc_offset_minutes * 60)
            .unwrap_or_else(|| FixedOffset::east_opt(0).expect("zero offset"));
        self.clock.now().with_timezone(&offset).date_naive()
    }

    /// Appends an audit record and returns its id.
    pub fn record(&self, entry: Entry) -> Result<String> {
        self.audit.append(entry, self.clock.now())
    }
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
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

    let partner = PartnerServiceServer::new(PartnerApi::new(Arc::clone(&app)))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(64 * 1024 * 1024);
    let admin =
        AdminServiceServer::new(AdminApi::new(app)).max_decoding_message_size(MAX_MESSAGE_BYTES);
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(partner)
        .add_service(admin)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .map_err(|e| Error::Internal(format!("server: {e}")))
}

/// A server running in the background.
pub struct Running {
    /// The address it listens on.
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<Result<()>>,
}

impl Running {
    /// Stops the server and waits for it.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.handle
            .await
            .map_err(|e| Error::Internal(format!("server task: {e}")))?
    }
}

/// Binds `addr` (use port 0 for any free port) and serves in the background.
pub async fn spawn(app: Arc<App>, addr: SocketAddr) -> Result<Running> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Internal(format!("cannot listen on {addr}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Internal(e.to_string()))?;
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(serve(app, listener, async {
        let _ = rx.await;
    }));
    Ok(Running {
        addr,
        shutdown: Some(tx),
        handle,
    })
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
            entry.principal = "unauthenticated".to_string();
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
