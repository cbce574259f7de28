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
}

fn default_listen() -> String {
    "127.0.0.1:50051".into()
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
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut settings: Settings =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let env = |key: &str| std::env::var(format!("CLEANROOM__{key}")).ok();
        if let Some(v) = env("LISTEN") {
            settings.listen = v;
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
        let addr: std::net::SocketAddr = self
            .listen
            .parse()
            .with_context(|| format!("listen = {:?} is not an address:port", self.listen))?;
        if !addr.ip().is_loopback() {
            // Raw identifiers arrive over this port; without TLS it must stay on loopback.
            bail!("listen = {addr}: only loopback addresses are allowed until TLS is configured");
        }
        Ok(())
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
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        MasterSecret::from_hex(&text).with_context(|| path.display().to_string())
    }

    /// Everything the service needs to start.
    pub fn app_config(&self) -> Result<cleanroom_server::AppConfig> {
        let rules = self.rules()?;
        let allowlist = AllowList::load(&self.queries, &rules)?;
        Ok(cleanroom_server::AppConfig {
            data_dir: self.data_dir.clone(),
            rules,
            allowlist,
            secret: self.master_secret()?,
            clock: Arc::new(cleanroom_server::SystemClock),
        })
    }
}
