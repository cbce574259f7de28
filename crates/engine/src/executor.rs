//! Where questions execute, behind one trait ([`PlanExecutor`]): the guard hands over a checked,
//! optimised per-member plan and gets its rows back, then folds, adds noise and releases on the
//! service whatever executed the plan.
//!
//! - On this machine ([`LocalExecutor`], the default): one DataFusion runtime for the whole
//!   service, with a memory pool bounded by configuration (a fair spill pool: an operator that
//!   needs more spills to disk, or waits for another question to finish), a spill directory, a
//!   limit on plans executing at once, and a thread pool of its own, so that calls that only read
//!   stored answers (repeats, listings, uploads) never wait behind a question being computed.
//! - On an Apache Ballista cluster ([`cluster::ClusterExecutor`]), when the settings name a
//!   scheduler: only the member-level aggregate runs there; its rows come back to the guard.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use datafusion::arrow::array::RecordBatch;
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::audience::Audience;
use crate::{Error, Result};

pub mod cluster;

/// Executes the guard's checked per-member plans.
#[async_trait::async_trait]
pub trait PlanExecutor: Send + Sync {
    /// The runtime a question's session is planned in (and, on this machine, executes in).
    fn env(&self) -> Arc<RuntimeEnv>;

    /// Runs `plan` (checked and optimised in `ctx`, over the safe views of `audience`) to the
    /// end and returns its rows.
    async fn collect(
        &self,
        ctx: SessionContext,
        plan: LogicalPlan,
        audience: Arc<Audience>,
    ) -> Result<Vec<RecordBatch>>;

    /// Questions waiting for a place among the plans executing, and plans executing now.
    fn queue(&self) -> Queue;
}

/// How many questions wait for a place among the plans executing, and how many execute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Queue {
    /// Questions waiting for a place.
    pub waiting: usize,
    /// Plans executing now.
    pub running: usize,
}

/// The limit on plans executing at once, which also counts the questions waiting for a place
/// (for the metrics: a queue that grows says the service needs more places or more cores).
pub(crate) struct Gate {
    places: Semaphore,
    size: usize,
    waiting: AtomicUsize,
}

/// One question counted as waiting until it has a place (or gave up waiting).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn count(waiting: &'a AtomicUsize) -> Self {
        waiting.fetch_add(1, Ordering::Relaxed);
        Self(waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Gate {
    /// A gate of `size` places (at least one).
    pub(crate) fn new(size: usize) -> Self {
        let size = size.max(1);
        Self {
            places: Semaphore::new(size),
            size,
            waiting: AtomicUsize::new(0),
        }
    }

    /// A place among the plans executing, once one is free.
    pub(crate) async fn enter(&self) -> Result<SemaphorePermit<'_>> {
        // Dropped when the place is had, or when the caller stops waiting (its call ended).
        let _waiting = Waiting::count(&self.waiting);
        self.places
            .acquire()
            .await
            .map_err(|_| Error::Storage("the query executor is shut down".into()))
    }

    /// The questions waiting and the plans executing now.
    pub(crate) fn queue(&self) -> Queue {
        Queue {
            waiting: self.waiting.load(Ordering::Relaxed),
            running: self.size.saturating_sub(self.places.available_permits()),
        }
    }
}

/// The executor `config` asks for: a Ballista cluster if it names one, this machine otherwise.
pub fn from_config(config: &ExecutorConfig) -> Result<Arc<dyn PlanExecutor>> {
    Ok(match &config.cluster {
        Some(cluster) => Arc::new(cluster::ClusterExecutor::new(cluster, config)?),
        None => Arc::new(LocalExecutor::new(config)?),
    })
}

/// How questions execute, from the service settings.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// The memory every executing question together may hold, in bytes.
    pub memory_bytes: usize,
    /// Where an operator spills what does not fit.
    pub spill_dir: PathBuf,
    /// Questions executing at once; the others wait their turn.
    pub concurrent_queries: usize,
    /// Threads of the query runtime.
    pub threads: usize,
    /// A Ballista cluster to execute on instead of this machine.
    pub cluster: Option<cluster::ClusterConfig>,
}

impl ExecutorConfig {
    /// One gigabyte, a question per core, a thread per core, spilling under `spill_dir`.
    pub fn with_defaults(spill_dir: PathBuf) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            memory_bytes: 1 << 30,
            spill_dir,
            // Each question's plan already runs on every thread: two at once on two cores only
            // split the cores and the memory pool between them (measured with `cleanroom bench`:
            // 64 distinct questions from 8 clients took 28 % longer than from one).
            concurrent_queries: (cores / 2).max(1),
            threads: cores,
            cluster: None,
        }
    }
}

/// The query runtime, shut down in the background when dropped (it may be dropped on an async
/// worker, where a blocking shutdown is not allowed).
struct CpuRuntime(Option<tokio::runtime::Runtime>);

impl Drop for CpuRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Query execution on this machine.
pub struct LocalExecutor {
    env: Arc<RuntimeEnv>,
    cpu: CpuRuntime,
    gate: Gate,
}

/// Removes what an earlier run left in `dir` under names starting with `prefix` (and nothing
/// else): spill files and audience files are never needed again.
pub(crate) fn remove_leftovers(dir: &std::path::Path, prefix: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            let path = entry.path();
            let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
        }
    }
    Ok(())
}

impl LocalExecutor {
    /// The runtime `config` describes. Spill files an earlier run left (DataFusion's
    /// `datafusion-*` directories) are removed.
    pub fn new(config: &ExecutorConfig) -> Result<Self> {
        remove_leftovers(&config.spill_dir, "datafusion-")?;
        let env = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(FairSpillPool::new(config.memory_bytes)))
            .with_temp_file_path(&config.spill_dir)
            .build_arc()?;
        let cpu = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.threads.max(1))
            .thread_name("cleanroom-query")
            .enable_all()
            .build()
            .map_err(|e| Error::Storage(format!("starting the query runtime: {e}")))?;
        Ok(Self {
            env,
            cpu: CpuRuntime(Some(cpu)),
            gate: Gate::new(config.concurrent_queries),
        })
    }

    /// Runs `work` on the query runtime once a place among the plans executing is free.
    async fn run<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let _place = self.gate.enter().await?;
        let runtime = self
            .cpu
            .0
            .as_ref()
            .expect("the query runtime runs until dropped");
        runtime
            .spawn(work)
            .await
            .map_err(|e| Error::Storage(format!("a query task failed: {e}")))?
    }
}

#[async_trait::async_trait]
impl PlanExecutor for LocalExecutor {
    /// The runtime environment every question's session shares (memory pool, spill files).
    fn env(&self) -> Arc<RuntimeEnv> {
        Arc::clone(&self.env)
    }

    async fn collect(
        &self,
        ctx: SessionContext,
        plan: LogicalPlan,
        _audience: Arc<Audience>,
    ) -> Result<Vec<RecordBatch>> {
        self.run(async move { execute(&ctx, &plan).await }).await
    }

    fn queue(&self) -> Queue {
        self.gate.queue()
    }
}

/// Executes a checked plan as it is, without rewriting it again.
async fn execute(ctx: &SessionContext, plan: &LogicalPlan) -> Result<Vec<RecordBatch>> {
    let state = ctx.state();
    let physical = state
        .query_planner()
        .create_physical_plan(plan, &state)
        .await?;
    Ok(datafusion::physical_plan::collect(physical, ctx.task_ctx()).await?)
}
