//! Questions executed on an Apache Ballista cluster. The guard stays on the service: it plans and
//! checks the question, and only the member-level aggregate (the checked per-member plan) goes to
//! the cluster, whose rows come back to the guard to be folded, noised and released.
//!
//! The cluster reads the retailer's committed Parquet files where the service wrote them, so the
//! data directory must be at the same path on the scheduler and every executor (a shared mount).
//! The question's audience goes there too, as a Parquet file of member keys and partner
//! attributes (the same pseudonyms the tables already hold, never an identifier), written once per
//! audience and removed when no recent question uses it.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::{ExecutorConfig, Gate, PlanExecutor, Queue, remove_leftovers};
use crate::Result;
use crate::audience::{Audience, KEPT};
use crate::views::{audience_schema, with_standard_scans};
use ballista::prelude::SessionContextExt;
use datafusion::arrow::array::{Int64Array, RecordBatch, StringArray};
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::logical_expr::LogicalPlan;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::prelude::SessionContext;
use sha2::{Digest, Sha256};

/// The `[engine.cluster]` settings.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The Ballista scheduler, as `df://host:port`.
    pub scheduler: String,
    /// A directory the scheduler and every executor see at the same path, for audience files.
    pub shared_dir: PathBuf,
}

/// Audience files start with this; any left by an earlier run are removed at start.
const AUDIENCE_PREFIX: &str = "audience-";

/// Executes per-member plans on a Ballista cluster.
pub struct ClusterExecutor {
    config: ClusterConfig,
    gate: Gate,
    /// The audience files of recent questions, newest last.
    recent: Mutex<VecDeque<Arc<AudienceFile>>>,
}

impl ClusterExecutor {
    /// An executor for the cluster `cluster` names (connections are made per question, so a
    /// scheduler that is down fails that question, not the service's start).
    pub fn new(cluster: &ClusterConfig, config: &ExecutorConfig) -> Result<Self> {
        remove_leftovers(&cluster.shared_dir, AUDIENCE_PREFIX)?;
        Ok(Self {
            config: cluster.clone(),
            gate: Gate::new(config.concurrent_queries),
            recent: Mutex::new(VecDeque::new()),
        })
    }

    /// Whether the scheduler accepts connections. A cluster that cannot be reached says nothing
    /// about the data: the question is answered "ask again" and nothing is stored, where a job
    /// that fails on the cluster gets the guard's one fixed refusal like any failed execution.
    async fn reachable(&self) -> Result<()> {
        let address = self
            .config
            .scheduler
            .trim_start_matches("df://")
            .to_string();
        let connect = tokio::net::TcpStream::connect(address);
        match tokio::time::timeout(std::time::Duration::from_secs(5), connect).await {
            Ok(Ok(_)) => Ok(()),
            _ => {
                tracing::warn!(scheduler = %self.config.scheduler, "the Ballista scheduler cannot be reached");
                Err(cleanroom_core::Error::Busy(
                    "the query cluster cannot be reached now; ask again in a moment (it is paid \
                     for: asking again costs nothing)"
                        .into(),
                )
                .into())
            }
        }
    }

    /// The file holding `audience`, written if no recent question wrote it.
    fn audience_file(&self, audience: &Audience) -> Result<Arc<AudienceFile>> {
        let digest = audience_digest(audience);
        let mut recent = self.recent.lock().expect("audience files lock");
        if let Some(at) = recent.iter().position(|f| f.digest == digest) {
            let file = recent.remove(at).expect("found");
            recent.push_back(Arc::clone(&file));
            return Ok(file);
        }
        let file = Arc::new(AudienceFile::write(
            &self.config.shared_dir,
            digest,
            audience,
        )?);
        recent.push_back(Arc::clone(&file));
        while recent.len() > KEPT {
            // A question still executing over it holds its own reference; the file goes with it.
            recent.pop_front();
        }
        Ok(file)
    }
}

#[async_trait::async_trait]
impl PlanExecutor for ClusterExecutor {
    /// Planning only: the cluster's executors hold the memory of execution.
    fn env(&self) -> Arc<RuntimeEnv> {
        Arc::new(RuntimeEnv::default())
    }

    async fn collect(
        &self,
        ctx: SessionContext,
        plan: LogicalPlan,
        audience: Arc<Audience>,
    ) -> Result<Vec<RecordBatch>> {
        let _place = self.gate.enter().await?;
        self.reachable().await?;
        let file = self.audience_file(&audience)?;
        let plan = with_standard_scans(plan, &file.path)?;
        let remote = SessionContext::remote_with_state(&self.config.scheduler, ctx.state()).await?;
        let batches = remote.execute_logical_plan(plan).await?.collect().await?;
        drop(file);
        Ok(batches)
    }

    fn queue(&self) -> Queue {
        self.gate.queue()
    }
}

/// One audience, written for the cluster to read; removed when dropped.
struct AudienceFile {
    digest: String,
    path: PathBuf,
}

impl AudienceFile {
    /// Writes `audience` under `dir` (to a temporary name first, so a reader never sees half).
    fn write(dir: &std::path::Path, digest: String, audience: &Audience) -> Result<Self> {
        let path = dir.join(format!("{AUDIENCE_PREFIX}{digest}.parquet"));
        let partial = dir.join(format!("{AUDIENCE_PREFIX}{digest}.partial"));
        let (keys, attributes): (Vec<i64>, Vec<&str>) = audience.members().unzip();
        let batch = RecordBatch::try_new(
            audience_schema(),
            vec![
                Arc::new(Int64Array::from(keys)),
                Arc::new(StringArray::from(attributes)),
            ],
        )?;
        let written = (|| -> Result<()> {
            let file = std::fs::File::create(&partial)?;
            let mut writer = ArrowWriter::try_new(file, batch.schema(), None)?;
            writer.write(&batch)?;
            writer.close()?;
            Ok(std::fs::rename(&partial, &path)?)
        })();
        if let Err(e) = written {
            // A full disk leaves no half-written file behind.
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        Ok(Self { digest, path })
    }
}

impl Drop for AudienceFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A digest of an audience's content (members and attributes, in key order), naming its file.
fn audience_digest(audience: &Audience) -> String {
    let mut members: Vec<(i64, &str)> = audience.members().collect();
    members.sort_unstable();
    let mut hash = Sha256::new();
    for (key, attribute) in members {
        hash.update(key.to_le_bytes());
        hash.update((attribute.len() as u64).to_le_bytes());
        hash.update(attribute.as_bytes());
    }
    hex::encode(&hash.finalize()[..16])
}
