//! `cleanroom cluster`: an Apache Ballista scheduler and executors on this machine's loopback, to
//! try the service's cluster mode (`[engine] cluster`) and to test it. A cluster across machines
//! runs Ballista's own `ballista-scheduler` and `ballista-executor` (version 55): the plans the
//! service sends hold only DataFusion's standard nodes, so they need nothing of ours.

use anyhow::{Context, Result};
use ballista_core::serde::BallistaCodec;
use ballista_core::serde::protobuf::scheduler_grpc_client::SchedulerGrpcClient;

/// Starts a scheduler and `executors` executors (each with `slots` task slots) on loopback and
/// prints the scheduler's address, then serves until interrupted.
pub async fn run(executors: usize, slots: usize) -> Result<()> {
    let scheduler = ballista_scheduler::standalone::new_standalone_scheduler()
        .await
        .context("starting the Ballista scheduler")?;
    let url = format!("http://127.0.0.1:{}", scheduler.port());
    for _ in 0..executors {
        let client = connect(&url).await?;
        ballista_executor::new_standalone_executor(client, slots, BallistaCodec::default())
            .await
            .context("starting a Ballista executor")?;
    }
    // One line a script (or a test) can read: the value for `[engine] cluster`.
    println!("scheduler df://127.0.0.1:{}", scheduler.port());
    eprintln!("{executors} executor(s) with {slots} task slot(s) each; Ctrl-C stops the cluster");
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}

/// A client of the scheduler just started (it may take a moment to accept connections).
async fn connect(url: &str) -> Result<SchedulerGrpcClient<tonic::transport::Channel>> {
    let mut tries = 0;
    loop {
        match SchedulerGrpcClient::connect(url.to_string()).await {
            Ok(client) => return Ok(client),
            Err(e) if tries >= 50 => {
                return Err(e).with_context(|| format!("connecting to the scheduler at {url}"));
            }
            Err(_) => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}
