//! Where questions execute: one DataFusion runtime for the whole service, with a memory pool
//! bounded by configuration (a fair spill pool: an operator that needs more spills to disk, or
//! waits for another question to finish), a spill directory, a limit on plans executing at once,
//! and a thread pool of its own, so that calls that only read stored answers (repeats, listings,
//! uploads) never wait behind a question being computed.

use std::path::PathBuf;
use std::sync::Arc;

use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use tokio::sync::Semaphore;

use crate::{Error, Result};

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

/// The service's query execution.
pub struct Executor {
    env: Arc<RuntimeEnv>,
    cpu: CpuRuntime,
    gate: Semaphore,
}

impl Executor {
    /// The runtime `config` describes. Spill files an earlier run left (DataFusion's
    /// `datafusion-*` directories; nothing else in the directory is touched) are removed: they
    /// are never needed again.
    pub fn new(config: &ExecutorConfig) -> Result<Self> {
        std::fs::create_dir_all(&config.spill_dir)?;
        for entry in std::fs::read_dir(&config.spill_dir)? {
            let entry = entry?;
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with("datafusion-")
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
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
            gate: Semaphore::new(config.concurrent_queries.max(1)),
        })
    }

    /// The runtime environment every question's session shares (memory pool, spill files).
    pub fn env(&self) -> Arc<RuntimeEnv> {
        Arc::clone(&self.env)
    }

    /// Runs `work` on the query runtime once a place among the plans executing is free.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let _place = self
            .gate
            .acquire()
            .await
            .map_err(|_| Error::Storage("the query runtime is shut down".into()))?;
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
