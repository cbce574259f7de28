//! Service settings, loaded in layers: defaults, then the TOML file, then `CLEANROOM__<KEY>`
//! environment variables, then command-line flags, then validation. The master secret never sits
//! in the file itself: it comes from `CLEANROOM_MASTER_SECRET` or a key file the file points to.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use cleanroom_core::allowlist::AllowList;
use cleanroom_core::rules::Rules;
use cleanroom_core::token::MasterSecret;
use serde::Deserialize;

/// The service's settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// gRPC listen address.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// The review page's listen address.
    #[serde(default = "default_review_listen")]
    pub review_listen: String,
    /// How often the service looks for edits of the rules and the allow-list, in seconds.
    #[serde(default = "default_reload_seconds")]
    pub reload_seconds: u64,
    /// Data directory.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Rules file.
    pub rules: PathBuf,
    /// Allow-list directory.
    #[serde(default = "default_queries")]
    pub queries: PathBuf,
    /// File holding the hex master secret, when `CLEANROOM_MASTER_SECRET` is not set.
    #[serde(default)]
    pub master_secret_file: Option<PathBuf>,
    /// TLS on both ports; without it, both stay on loopback.
    #[serde(default)]
    pub tls: Option<TlsSettings>,
    /// The high-water mark: a file outside the data directory (and outside its backups) that
    /// records how far the service has got, so a restored data directory is seen at start.
    /// Default: `<data_dir>.high-water-mark.json`, beside the data directory.
    #[serde(default)]
    pub high_water_mark: Option<PathBuf>,
    /// The key store: each collaboration's random key seed, kept outside the data directory and
    /// backed up apart from it (a destroyed key must not come back with a restored data
    /// directory). Default: `<data_dir>.keys`, beside the data directory.
    #[serde(default)]
    pub key_store: Option<PathBuf>,
    /// How questions execute.
    #[serde(default)]
    pub engine: EngineSettings,
}

/// The `[engine]` table: what query execution may use.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSettings {
    /// The memory every executing question together may hold, in MiB (default 1024).
    #[serde(default)]
    pub memory_mb: Option<usize>,
    /// Where a question spills what does not fit (default `<data_dir>/spill`).
    #[serde(default)]
    pub spill_dir: Option<PathBuf>,
    /// Questions executing at once (default: half the cores, at least one); the others wait
    /// their turn.
    #[serde(default)]
    pub concurrent_queries: Option<usize>,
    /// Threads executing questions (default: one per core).
    #[serde(default)]
    pub threads: Option<usize>,
    /// An Apache Ballista scheduler (`df://host:port`) to execute questions on instead of this
    /// machine. Its executors must see the data directory at the same path.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Where the service writes each question's audience for the cluster to read, on the same
    /// shared path (default `<data_dir>/cluster`).
    #[serde(default)]
    pub cluster_dir: Option<PathBuf>,
}

/// The `[tls]` table: PEM files for the server's certificate chain and key, and optionally the CA
/// whose client certificates identify partners (mutual TLS).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// The server's certificate chain.
    pub cert_file: PathBuf,
    /// The server's private key.
    pub key_file: PathBuf,
    /// CA certificates for client certificates.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

fn default_listen() -> String {
    "127.0.0.1:50051".into()
}

fn default_review_listen() -> String {
    "127.0.0.1:50052".into()
}

fn default_reload_seconds() -> u64 {
    2
}

fn default_data_dir() -> PathBuf {
    "data".into()
}

fn default_queries() -> PathBuf {
    "queries".into()
}

impl Settings {
    /// Loads the file, applies environment and flag overrides, and validates.
    pub fn load(path: &Path, listen: Option<String>, data_dir: Option<PathBuf>) -> Result<Self> {
        let text = cleanroom_core::files::read_config_file(path)?;
        let mut settings: Settings = toml::from_str(&text).map_err(|e| {
            cleanroom_core::files::in_file(path, cleanroom_core::files::toml_error(&text, &e))
        })?;
        let env = |key: &str| std::env::var(format!("CLEANROOM__{key}")).ok();
        if let Some(v) = env("LISTEN") {
            settings.listen = v;
        }
        if let Some(v) = env("REVIEW_LISTEN") {
            settings.review_listen = v;
        }
        if let Some(v) = env("RELOAD_SECONDS") {
            settings.reload_seconds = v
                .parse()
                .with_context(|| format!("CLEANROOM__RELOAD_SECONDS={v:?} is not a number"))?;
        }
        if let Some(v) = env("DATA_DIR") {
            settings.data_dir = v.into();
        }
        if let Some(v) = env("RULES") {
            settings.rules = v.into();
        }
        if let Some(v) = env("QUERIES") {
            settings.queries = v.into();
        }
        if let Some(v) = env("HIGH_WATER_MARK") {
            settings.high_water_mark = Some(v.into());
        }
        if let Some(v) = listen {
            settings.listen = v;
        }
        if let Some(v) = data_dir {
            settings.data_dir = v;
        }
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<()> {
        for (key, value) in [
            ("listen", &self.listen),
            ("review_listen", &self.review_listen),
        ] {
            let addr: std::net::SocketAddr = value
                .parse()
                .with_context(|| format!("{key} = {value:?} is not an address:port"))?;
            if self.tls.is_none() && !addr.ip().is_loopback() {
                // Raw identifiers and bearer tokens arrive over these ports; without TLS they
                // must stay on loopback.
                bail!(
                    "{key} = {addr}: only loopback addresses are allowed without TLS (add a [tls] \
                     table with cert_file and key_file)"
                );
            }
        }
        if self.reload_seconds == 0 {
            bail!("reload_seconds must be at least 1");
        }
        let e = &self.engine;
        if e.memory_mb == Some(0) || e.concurrent_queries == Some(0) || e.threads == Some(0) {
            bail!("[engine]: memory_mb, concurrent_queries and threads must be at least 1");
        }
        if let Some(cluster) = &e.cluster {
            // Ballista's own form of a scheduler's address; anything else would fail only at the
            // first question.
            let host = cluster.strip_prefix("df://").filter(|rest| {
                rest.rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            });
            if host.is_none() {
                bail!(
                    "[engine] cluster = {cluster:?}: expected a Ballista scheduler as df://host:port"
                );
            }
        }
        if e.cluster_dir.is_some() && e.cluster.is_none() {
            bail!("[engine] cluster_dir is set without a cluster to share it with");
        }
        if self.key_store().starts_with(&self.data_dir) {
            bail!(
                "key_store = {:?} is inside data_dir: keys must be kept (and backed up) apart from \
                 the data directory, or restoring a backup would bring destroyed keys back",
                self.key_store().display().to_string()
            );
        }
        let mark = self.high_water_mark();
        if mark.starts_with(&self.data_dir) {
            bail!(
                "high_water_mark = {:?} is inside data_dir: the mark must be kept outside the data \
                 directory (and its backups) to see a restore of it",
                mark.display().to_string()
            );
        }
        Ok(())
    }

    /// The TLS material, read and checked, if `[tls]` is configured.
    pub fn tls(&self) -> Result<Option<cleanroom_server::tls::Tls>> {
        let Some(t) = &self.tls else {
            return Ok(None);
        };
        let files = cleanroom_server::tls::TlsFiles {
            cert: t.cert_file.clone(),
            key: t.key_file.clone(),
            client_ca: t.client_ca_file.clone(),
        };
        Ok(Some(cleanroom_server::tls::Tls::load(&files)?))
    }

    /// The review page's address.
    pub fn review_addr(&self) -> Result<std::net::SocketAddr> {
        Ok(self.review_listen.parse()?)
    }

    /// The validated rules.
    pub fn rules(&self) -> Result<Rules> {
        Ok(Rules::load(&self.rules)?)
    }

    /// The master secret, from the environment or the key file.
    pub fn master_secret(&self) -> Result<MasterSecret> {
        if let Ok(hex) = std::env::var("CLEANROOM_MASTER_SECRET") {
            return MasterSecret::from_hex(&hex).context("CLEANROOM_MASTER_SECRET");
        }
        let Some(path) = &self.master_secret_file else {
            bail!("no master secret: set CLEANROOM_MASTER_SECRET (hex) or master_secret_file");
        };
        let text = cleanroom_core::files::read_config_file(path)?;
        MasterSecret::from_hex(&text).with_context(|| path.display().to_string())
    }

    /// Where the high-water mark is kept: as set, or beside the data directory.
    pub fn high_water_mark(&self) -> PathBuf {
        self.high_water_mark
            .clone()
            .unwrap_or_else(|| self.beside_data_dir("high-water-mark.json"))
    }

    /// The key store's directory, the default filled in.
    pub fn key_store(&self) -> PathBuf {
        self.key_store
            .clone()
            .unwrap_or_else(|| self.beside_data_dir("keys"))
    }

    /// The key store, opened (made if there is none yet).
    pub fn open_key_store(&self) -> Result<Arc<cleanroom_core::keys::KeyStore>> {
        let dir = self.key_store();
        cleanroom_core::keys::KeyStore::open(&dir, self.master_secret()?)
            .with_context(|| format!("opening the key store {}", dir.display()))
    }

    /// The key store as it is, for checks that must change nothing.
    pub fn inspect_key_store(&self) -> Result<cleanroom_core::keys::KeyStore> {
        let dir = self.key_store();
        cleanroom_core::keys::KeyStore::inspect(&dir, self.master_secret()?)
            .with_context(|| format!("reading the key store {}", dir.display()))
    }

    /// `<data_dir>.<ending>`, beside the data directory.
    fn beside_data_dir(&self, ending: &str) -> PathBuf {
        let name = self
            .data_dir
            .file_name()
            .map_or_else(|| "data".into(), |n| n.to_string_lossy().into_owned());
        self.data_dir.with_file_name(format!("{name}.{ending}"))
    }

    /// Everything the service needs to start.
    /// With `allow_demo_tokens`, principals in the demo token form are accepted; with
    /// `accept_restore`, a data directory behind its high-water mark.
    pub fn app_config(
        &self,
        allow_demo_tokens: bool,
        accept_restore: bool,
    ) -> Result<cleanroom_server::AppConfig> {
        let rules = self.rules()?;
        // Broken query files do not stop the service: they are shown to reviewers as invalid and
        // never run. `cleanroom queries lint` says what is wrong with them.
        let allowlist = AllowList::scan(&self.queries, &rules)?;
        for bad in allowlist.invalid() {
            eprintln!(
                "warning: {} does not load: {}",
                bad.path.display(),
                bad.reason
            );
        }
        Ok(cleanroom_server::AppConfig {
            data_dir: self.data_dir.clone(),
            rules,
            allowlist,
            secret: self.master_secret()?,
            clock: Arc::new(cleanroom_server::SystemClock),
            sources: Some(cleanroom_server::Sources {
                rules: self.rules.clone(),
                queries: self.queries.clone(),
                poll: std::time::Duration::from_secs(self.reload_seconds),
            }),
            allow_demo_tokens,
            mark: self.high_water_mark(),
            accept_restore,
            engine: self.engine_config(),
            keys: self.key_store(),
        })
    }

    /// The query execution the `[engine]` table asks for, defaults filled in.
    pub fn engine_config(&self) -> cleanroom_engine::executor::ExecutorConfig {
        let e = &self.engine;
        let spill = e
            .spill_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("spill"));
        let mut config = cleanroom_engine::executor::ExecutorConfig::with_defaults(spill);
        if let Some(mb) = e.memory_mb {
            config.memory_bytes = mb.saturating_mul(1 << 20);
        }
        if let Some(n) = e.concurrent_queries {
            config.concurrent_queries = n;
        }
        if let Some(n) = e.threads {
            config.threads = n;
        }
        config.cluster =
            e.cluster.clone().map(
                |scheduler| cleanroom_engine::executor::cluster::ClusterConfig {
                    scheduler,
                    shared_dir: e
                        .cluster_dir
                        .clone()
                        .unwrap_or_else(|| self.data_dir.join("cluster")),
                },
            );
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Settings> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("cleanroom.toml");
        std::fs::write(&path, text)?;
        Settings::load(&path, None, None)
    }

    #[test]
    fn a_public_address_needs_tls() {
        let public = "rules = \"r.toml\"\nlisten = \"0.0.0.0:50051\"\n";
        let refused = load(public).unwrap_err().to_string();
        assert!(
            refused.contains("only loopback addresses are allowed without TLS"),
            "{refused}"
        );
        let with_tls = format!("{public}[tls]\ncert_file = \"s.pem\"\nkey_file = \"s.key\"\n");
        let settings = load(&with_tls).unwrap();
        assert_eq!(settings.listen, "0.0.0.0:50051");
        assert!(settings.tls.unwrap().client_ca_file.is_none());
    }

    #[test]
    fn a_cluster_must_be_a_ballista_scheduler_address() {
        let with = |engine: &str| load(&format!("rules = \"r.toml\"\n[engine]\n{engine}\n"));
        let refused = with("cluster = \"http://scheduler:50050\"").unwrap_err();
        assert!(refused.to_string().contains("df://host:port"), "{refused}");
        let refused = with("cluster_dir = \"shared\"").unwrap_err();
        assert!(
            refused.to_string().contains("without a cluster"),
            "{refused}"
        );
        let settings = with("cluster = \"df://10.0.0.5:50050\"").unwrap();
        let cluster = settings.engine_config().cluster.expect("a cluster");
        assert_eq!(cluster.scheduler, "df://10.0.0.5:50050");
        assert_eq!(cluster.shared_dir, settings.data_dir.join("cluster"));
    }

    #[test]
    fn the_example_configuration_loads() {
        let root = std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo test sets it");
        let example = Path::new(&root).join("config/cleanroom.example.toml");
        let settings = Settings::load(&example, None, None).unwrap();
        assert!(
            settings.tls.is_none(),
            "the example serves loopback without TLS"
        );
    }
}
