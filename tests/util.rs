//! The test harness: a service loaded with the sample data, on loopback, with a pinned clock and a
//! fixed master secret so that outputs are reproducible.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cleanroom_client::pki::ThrowawayPki;
use cleanroom_client::{AdminClient, Connection, PartnerClient, sample};
use cleanroom_core::allowlist::AllowList;
use cleanroom_core::rules::Rules;
use cleanroom_core::token::MasterSecret;
use cleanroom_engine::executor::ExecutorConfig;
use cleanroom_engine::executor::cluster::ClusterConfig;
use cleanroom_proto::v1::{
    ParamValue, RunQueryRequest, RunQueryResponse, param_value, value::Kind,
};
use cleanroom_server::{App, AppConfig, FixedClock, Running, Sources};
use tempfile::TempDir;
use tonic::Status;

/// The repository root, read when the test runs: a test binary reused from a build directory
/// shared with another clone must read this clone's files.
pub fn root() -> PathBuf {
    PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR"),
    )
}

pub fn sample_dir() -> PathBuf {
    root().join("sample_data")
}

/// Copies the sample partners' signed declarations into `dir`, beside a copy of the sample rules
/// written there (the rules name them relative to the rules file).
pub fn copy_declarations(dir: &Path) {
    let to = dir.join("declarations");
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(sample_dir().join("declarations")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
}

pub fn sample_rules() -> Rules {
    Rules::load(&sample_dir().join("rules.toml")).expect("sample rules load")
}

/// The sample rules with a generous guarantee (ε = 50 per period over 200 answers), so released
/// values sit close to the ground truth (their 95 % intervals are a few members wide) and a test
/// can ask many questions. The noise is still there: no setting turns it off.
pub fn precise_rules() -> Rules {
    let mut rules = sample_rules();
    for contract in rules.contracts.values_mut() {
        contract.protection.epsilon = 50.0;
        contract.protection.answers_per_period = 200;
    }
    rules
}

/// Rules for tests that upload many lists to probe something other than the list allowance.
pub fn relaxed_lists(mut rules: Rules) -> Rules {
    for contract in rules.contracts.values_mut() {
        contract.protection.max_list_versions = 1000;
    }
    rules
}

/// A RunQuery request for `query` with `params`.
pub fn request(query: &str, params: &[(&str, ParamValue)]) -> RunQueryRequest {
    RunQueryRequest {
        query_id: query.into(),
        params: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    }
}

/// A service's state over the sample rules and allow-list, not serving, in `data_dir`.
pub fn bare_app(data_dir: &Path) -> Arc<App> {
    try_app(data_dir).unwrap()
}

/// As [`bare_app`], or why the service would not start there.
pub fn try_app(data_dir: &Path) -> Result<Arc<App>, cleanroom_server::Error> {
    try_app_with(data_dir, false)
}

/// As [`try_app`], accepting a data directory behind its high-water mark if `accept_restore`.
pub fn try_app_with(
    data_dir: &Path,
    accept_restore: bool,
) -> Result<Arc<App>, cleanroom_server::Error> {
    let rules = sample_rules();
    let allowlist = AllowList::load(&root().join("queries"), &rules).expect("allow-list loads");
    App::new(AppConfig {
        data_dir: data_dir.to_path_buf(),
        rules,
        allowlist,
        secret: test_secret(),
        clock: Arc::new(FixedClock(as_of())),
        sources: None,
        allow_demo_tokens: true,
        mark: mark_beside(data_dir),
        accept_restore,
        engine: ExecutorConfig::with_defaults(data_dir.join("spill")),
        keys: keys_beside(data_dir),
    })
}

/// Every file under `dir` and its bytes: what a refused start must leave exactly as it was.
pub fn files_of(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

/// The high-water mark of a test's data directory: beside it, outside it, as `serve` keeps it.
pub fn mark_beside(data_dir: &Path) -> PathBuf {
    data_dir.with_file_name("high-water-mark.json")
}

/// The key store of a test's data directory: beside it, outside it, as `serve` keeps it. The
/// sample's collaborations get fixed seeds, written in the store's own file form, so that member
/// tokens (and the noise keyed by the data they are part of) come out the same on every run; a
/// key the store already holds or destroyed is left as it is.
pub fn keys_beside(data_dir: &Path) -> PathBuf {
    use sha2::Digest as _;
    let dir = data_dir.with_file_name("keys");
    std::fs::create_dir_all(&dir).unwrap();
    for (contract, c) in &sample_rules().contracts {
        let stem = format!("{contract}.v{}", c.key_version);
        let seed = dir.join(format!("{stem}.seed"));
        if seed.exists() || dir.join(format!("{stem}.destroyed")).exists() {
            continue;
        }
        let bytes = sha2::Sha256::digest(format!("cleanroom test seed {stem}").as_bytes());
        let file = serde_json::json!({
            "contract": contract,
            "version": c.key_version,
            "created": as_of(),
            "seed": hex::encode(bytes),
        });
        std::fs::write(seed, serde_json::to_vec_pretty(&file).unwrap()).unwrap();
    }
    dir
}

/// A test's data directory, `data` inside a temporary directory that also holds its high-water
/// mark (outside the data directory, as in a deployment); both are removed when it drops.
pub struct DataDir {
    _root: TempDir,
    data: PathBuf,
}

impl DataDir {
    pub fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        Self { _root: root, data }
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.data
    }
}

/// The instant the sample data was exported; the harness pins the service's clock to it.
pub fn as_of() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(sample::AS_OF)
        .unwrap()
        .into()
}

/// A fixed test secret: pseudonyms and tokens come out the same on every run.
pub fn test_secret() -> MasterSecret {
    MasterSecret::new(b"cleanroom integration test secret, 32+ bytes".to_vec()).unwrap()
}

/// A running service and a connection to it.
pub struct Harness {
    pub conn: Connection,
    /// The running service's state (for its counters; tests act through the gRPC API).
    pub app: Arc<App>,
    pub rules: Rules,
    pub data_dir: DataDir,
    queries: PathBuf,
    sources: Option<Sources>,
    tls: Option<ThrowawayPki>,
    /// The query memory pool, if not the default.
    query_memory: Option<usize>,
    /// The Ballista scheduler questions execute on, if any.
    cluster: Option<String>,
    server: Option<Running>,
}

/// How to start a harness.
pub struct Setup {
    pub rules: Rules,
    pub queries: PathBuf,
    pub load_sample: bool,
    /// Approve every query as the sample's legal reviewer once the service is up.
    pub approve: bool,
    /// Follow edits of these files, as `cleanroom serve` does.
    pub sources: Option<Sources>,
    /// Serve both ports over TLS with this CA's server certificate (client certificates from it
    /// accepted); the harness connects trusting the CA, presenting the first client certificate
    /// the CA issued, if any.
    pub tls: Option<ThrowawayPki>,
    /// The memory every executing question together may hold, in bytes, if not the default.
    pub query_memory: Option<usize>,
    /// Execute questions on this Ballista scheduler (`df://host:port`) instead of in process.
    pub cluster: Option<String>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            rules: sample_rules(),
            queries: root().join("queries"),
            load_sample: true,
            approve: true,
            sources: None,
            tls: None,
            query_memory: None,
            cluster: None,
        }
    }
}

impl Harness {
    /// The sample service, fully loaded.
    pub async fn start() -> Self {
        Self::start_with(Setup::default()).await
    }

    pub async fn start_with(setup: Setup) -> Self {
        setup.rules.validate().expect("test rules are valid");
        let data_dir = DataDir::new();
        let (server, conn, app) = Self::serve(
            &setup.rules,
            &setup.queries,
            setup.sources.clone(),
            setup.tls.as_ref(),
            data_dir.path(),
            as_of(),
            false,
            setup.query_memory,
            setup.cluster.clone(),
        )
        .await;
        if setup.approve {
            sample::approve_all(&conn)
                .await
                .expect("the sample legal reviewer approves the allow-list");
        }
        if setup.load_sample {
            sample::load(&conn, &sample_dir())
                .await
                .expect("sample data loads");
        }
        Self {
            conn,
            app,
            rules: setup.rules,
            data_dir,
            queries: setup.queries,
            sources: setup.sources,
            tls: setup.tls,
            query_memory: setup.query_memory,
            cluster: setup.cluster,
            server: Some(server),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn serve(
        rules: &Rules,
        queries: &Path,
        sources: Option<Sources>,
        tls: Option<&ThrowawayPki>,
        data_dir: &Path,
        now: chrono::DateTime<chrono::Utc>,
        accept_restore: bool,
        query_memory: Option<usize>,
        cluster: Option<String>,
    ) -> (Running, Connection, Arc<App>) {
        let mut engine = ExecutorConfig::with_defaults(data_dir.join("spill"));
        if let Some(bytes) = query_memory {
            engine.memory_bytes = bytes;
        }
        engine.cluster = cluster.map(|scheduler| ClusterConfig {
            scheduler,
            shared_dir: data_dir.join("cluster"),
        });
        let allowlist = AllowList::load(queries, rules).expect("allow-list loads");
        let app = App::new(AppConfig {
            data_dir: data_dir.to_path_buf(),
            rules: rules.clone(),
            allowlist,
            secret: test_secret(),
            clock: Arc::new(FixedClock(now)),
            sources,
            allow_demo_tokens: true,
            mark: mark_beside(data_dir),
            accept_restore,
            engine,
            keys: keys_beside(data_dir),
        })
        .unwrap();
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let Some(pki) = tls else {
            let server = cleanroom_server::spawn(Arc::clone(&app), any)
                .await
                .unwrap();
            let conn = Connection::open(&format!("http://{}", server.addr))
                .await
                .unwrap();
            return (server, conn, app);
        };
        let server_tls = cleanroom_server::tls::Tls::from_pem(
            pki.server.cert_pem.as_bytes(),
            pki.server.key_pem.as_bytes(),
            Some(pki.ca_pem.as_bytes()),
        )
        .unwrap();
        let server = cleanroom_server::spawn_with_tls(Arc::clone(&app), any, any, Some(server_tls))
            .await
            .unwrap();
        let first = pki.clients.first().map(|(name, _)| name.as_str());
        let conn =
            Connection::open_tls(&format!("https://{}", server.addr), &pki.client_tls(first))
                .await
                .unwrap();
        (server, conn, app)
    }

    /// A service with the sample rules and allow-list started on an existing data directory.
    pub async fn restart_on(data_dir: DataDir) -> Self {
        let setup = Setup::default();
        let (server, conn, app) = Self::serve(
            &setup.rules,
            &setup.queries,
            None,
            None,
            data_dir.path(),
            as_of(),
            false,
            None,
            None,
        )
        .await;
        Self {
            conn,
            app,
            rules: setup.rules,
            data_dir,
            queries: setup.queries,
            sources: None,
            tls: None,
            query_memory: None,
            cluster: None,
            server: Some(server),
        }
    }

    /// Stops the service and starts a new one on the same data directory, as after a restart.
    pub async fn restart(self) -> Self {
        self.restart_at(as_of()).await
    }

    /// Restarts with the clock pinned to another instant.
    pub async fn restart_at(self, now: chrono::DateTime<chrono::Utc>) -> Self {
        self.relaunch(now, |_| {}, false).await
    }

    /// Stops the service, lets `damage` act on its data directory, and starts it again at `now`
    /// (accepting a directory behind its high-water mark if `accept_restore`).
    async fn relaunch(
        mut self,
        now: chrono::DateTime<chrono::Utc>,
        damage: impl FnOnce(&Path),
        accept_restore: bool,
    ) -> Self {
        if let Some(server) = self.server.take() {
            server.stop().await.unwrap();
        }
        damage(self.data_dir.path());
        let (server, conn, app) = Self::serve(
            &self.rules,
            &self.queries,
            self.sources.clone(),
            self.tls.as_ref(),
            self.data_dir.path(),
            now,
            accept_restore,
            self.query_memory,
            self.cluster.clone(),
        )
        .await;
        self.server = Some(server);
        self.conn = conn;
        self.app = app;
        self
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.as_ref().unwrap().addr
    }

    pub fn review_addr(&self) -> SocketAddr {
        self.server.as_ref().unwrap().review_addr
    }

    pub fn legal(&self) -> cleanroom_client::LegalClient {
        self.conn.legal(sample::LEGAL_TOKEN).unwrap()
    }

    pub fn partner(&self, partner: &str) -> PartnerClient {
        self.conn.partner(sample::partner_token(partner)).unwrap()
    }

    pub fn analyst(&self) -> AdminClient {
        self.conn.admin(sample::ANALYST_TOKEN).unwrap()
    }

    pub async fn run(
        &self,
        partner: &str,
        query: &str,
        params: &[(&str, ParamValue)],
    ) -> Result<RunQueryResponse, Status> {
        self.partner(partner)
            .run_query(request(query, params))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await.unwrap();
        }
    }

    /// Stops the service, lets `damage` act on its data directory (as a crash or an intruder
    /// would), and starts it again there.
    pub async fn restart_after(self, damage: impl FnOnce(&Path)) -> Self {
        self.relaunch(as_of(), damage, false).await
    }

    /// [`Harness::restart_after`] with the clock pinned to `now`.
    pub async fn restart_at_after(
        self,
        now: chrono::DateTime<chrono::Utc>,
        damage: impl FnOnce(&Path),
    ) -> Self {
        self.relaunch(now, damage, false).await
    }

    /// Starts the service again on its data directory, accepting that it is behind its
    /// high-water mark (`serve --accept-restore`). The service must be stopped.
    pub async fn start_accepting_restore(self) -> Self {
        self.relaunch(as_of(), |_| {}, true).await
    }

    /// Restarts with another query memory pool (`None`: the default).
    pub async fn restart_with_query_memory(mut self, bytes: Option<usize>) -> Self {
        self.query_memory = bytes;
        self.relaunch(as_of(), |_| {}, false).await
    }

    /// Stops the service, keeping the harness (and its data directory) for a restart.
    pub async fn halt(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await.unwrap();
        }
    }

    /// Stops the service and hands over its data directory.
    pub async fn shut_down(mut self) -> DataDir {
        self.server.take().unwrap().stop().await.unwrap();
        self.data_dir
    }
}

pub fn date(s: &str) -> ParamValue {
    ParamValue {
        kind: Some(param_value::Kind::DateValue(s.into())),
    }
}

pub fn text(s: &str) -> ParamValue {
    ParamValue {
        kind: Some(param_value::Kind::StringValue(s.into())),
    }
}

pub fn int(i: i64) -> ParamValue {
    ParamValue {
        kind: Some(param_value::Kind::IntValue(i)),
    }
}

/// The sample's last twelve months, on month boundaries.
pub fn year() -> Vec<(&'static str, ParamValue)> {
    vec![("start", date("2025-11-01")), ("end", date("2026-11-01"))]
}

/// A response's rows as dimension strings and integer metrics (the metrics' 95 % half-width
/// columns left out; see [`intervals`]).
pub fn cells(response: &RunQueryResponse, dims: usize) -> BTreeMap<Vec<String>, Vec<i64>> {
    let metrics = response
        .columns
        .iter()
        .filter(|c| !c.name.ends_with("_ci95"))
        .count();
    response
        .rows
        .iter()
        .map(|row| {
            let key = row.values[..dims]
                .iter()
                .map(|v| match &v.kind {
                    Some(Kind::StringValue(s)) => s.clone(),
                    other => panic!("dimension is not a string: {other:?}"),
                })
                .collect();
            let metrics = row.values[dims..metrics]
                .iter()
                .map(|v| match &v.kind {
                    Some(Kind::IntValue(i)) => *i,
                    other => panic!("metric is not an integer: {other:?}"),
                })
                .collect();
            (key, metrics)
        })
        .collect()
}

/// Reads a whole file of the repository as text.
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// An extra allow-list entry for a test: what a careless or hostile template could say.
pub struct Template {
    pub id: &'static str,
    pub sql: &'static str,
    pub dimensions: &'static [(&'static str, &'static str)],
    pub metrics: &'static [&'static str],
}

/// The members of the partner's audience, in one row.
pub const TOTAL: Template = Template {
    id: "test_total",
    sql: "SELECT COUNT(DISTINCT m.member_key) AS members FROM members m",
    dimensions: &[],
    metrics: &["members"],
};

/// The members of the partner's audience by gender.
pub const BY_GENDER: Template = Template {
    id: "test_by_gender",
    sql: "SELECT m.gender, COUNT(DISTINCT m.member_key) AS members FROM members m GROUP BY m.gender",
    dimensions: &[("gender", "gender")],
    metrics: &["members"],
};

/// The sample setup plus extra templates, open to both sample partners.
pub fn setup_with_templates(templates: &[Template]) -> (Setup, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(root().join("queries")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let mut rules = sample_rules();
    for t in templates {
        let metrics: Vec<String> = t.metrics.iter().map(|m| format!("{m:?}")).collect();
        let mut text = format!(
            "id = {:?}\nversion = 1\ntitle = \"test\"\ndescription = \"test template\"\n\
             purposes = [\"product_insight\", \"appliance_research\"]\ncontract_clause = \"test\"\n\
             partners = [\"sakura_foods\", \"kumo_denki\"]\nk = 10\nsql = '''{}'''\nmetrics = [{}]\n",
            t.id,
            t.sql,
            metrics.join(", ")
        );
        for (name, domain) in t.dimensions {
            text.push_str(&format!(
                "\n[[dimensions]]\nname = {name:?}\ndomain = {domain:?}\n"
            ));
        }
        std::fs::write(dir.path().join(format!("{}.toml", t.id)), text).unwrap();
        for contract in rules.contracts.values_mut() {
            contract.queries.push(t.id.to_string());
        }
    }
    (
        Setup {
            rules,
            queries: dir.path().to_path_buf(),
            ..Default::default()
        },
        dir,
    )
}

/// Raw list records for sample members, as an attacker who knows their emails would write them.
pub fn list_of(members: &[&str], attribute: &str) -> Vec<cleanroom_proto::v1::CustomerRecord> {
    let wanted: std::collections::HashSet<&str> = members.iter().copied().collect();
    let rows = cleanroom_client::read_members(&sample_dir().join("members.csv")).unwrap();
    let records: Vec<_> = rows
        .into_iter()
        .filter(|m| wanted.contains(m.member_id.as_str()))
        .map(|m| cleanroom_proto::v1::CustomerRecord {
            email: m.email,
            phone: m.phone,
            attribute: attribute.into(),
            ..Default::default()
        })
        .collect();
    assert_eq!(records.len(), wanted.len(), "every member is in the sample");
    records
}

/// A partner's upload stream that the test feeds by hand: the header is sent, chunks follow as
/// the test sends them through the returned sender, and the stream ends when the sender drops
/// (until then it stalls).
pub async fn open_upload() -> (
    tokio::sync::mpsc::Sender<cleanroom_proto::v1::UploadListRequest>,
    tokio_stream::wrappers::ReceiverStream<cleanroom_proto::v1::UploadListRequest>,
) {
    use cleanroom_proto::v1::{UploadListHeader, UploadListRequest, upload_list_request};
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(UploadListRequest {
        kind: Some(upload_list_request::Kind::Header(UploadListHeader {
            strict: false,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    (tx, tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// The rows of the data file `name` of `data_dir`, a batch at a time; a file the manifest says
/// is sealed is opened with its collaboration's data key, from the key store beside the data
/// directory (where the harness or the settings keep it).
pub fn data_file_batches(
    data_dir: &Path,
    name: &str,
) -> Vec<cleanroom_engine::arrow::record_batch::RecordBatch> {
    use cleanroom_engine::datafusion::parquet::arrow::arrow_reader::{
        ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
    };
    use cleanroom_engine::datafusion::parquet::encryption::decrypt::FileDecryptionProperties;
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data_dir.join("manifest.json")).unwrap()).unwrap();
    let mut options = ArrowReaderOptions::new();
    if let Some(key) = manifest.get("keys").and_then(|keys| keys.get(name)) {
        // The harness keeps it in `keys`, the settings' default is `<data dir>.keys`.
        let harness = data_dir.with_file_name("keys");
        let settings = data_dir.with_extension("keys");
        let dir = if harness.is_dir() { harness } else { settings };
        let keys = cleanroom_core::keys::KeyStore::inspect(&dir, test_secret()).unwrap();
        let contract = key["contract"].as_str().unwrap();
        let version = u32::try_from(key["version"].as_u64().unwrap()).unwrap();
        let data_key = keys.data_key(contract, version).unwrap();
        let decryption = FileDecryptionProperties::builder(data_key.bytes().to_vec())
            .build()
            .unwrap();
        options = options.with_file_decryption_properties(decryption);
    }
    let file = std::fs::File::open(data_dir.join(name)).unwrap();
    ParquetRecordBatchReaderBuilder::try_new_with_options(file, options)
        .unwrap()
        .build()
        .unwrap()
        .map(Result::unwrap)
        .collect()
}
