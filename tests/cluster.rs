//! The same checked plans on an Apache Ballista cluster: a scheduler and two executors on loopback
//! (`cleanroom cluster`), and every allowed query answered both ways, in process and on the
//! cluster, over the same data, with identical answers. The guard stays on the service either
//! way; only the per-member aggregate runs on the cluster.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use tonic::Code;

use crate::golden::cases;
use crate::truth::Truth;
use crate::util::{Harness, Setup, date, text};

/// A loopback cluster started with the real binary, stopped when dropped.
struct Cluster {
    child: Child,
    scheduler: String,
}

impl Cluster {
    fn start() -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cleanroom"))
            .args(["cluster", "--executors", "2"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("cleanroom cluster starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let scheduler = loop {
            let line = lines
                .next()
                .expect("cleanroom cluster prints its scheduler before anything else")
                .expect("readable stdout");
            if let Some(url) = line.strip_prefix("scheduler ") {
                break url.to_string();
            }
        };
        Self { child, scheduler }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_allowed_query_answers_the_same_on_a_ballista_cluster() {
    let cluster = Cluster::start();
    let local = Harness::start().await;
    let remote = Harness::start_with(Setup {
        cluster: Some(cluster.scheduler.clone()),
        ..Setup::default()
    })
    .await;
    let truth = Truth::load();
    for case in cases(&truth, &local) {
        let label = format!("{} as {}", case.query, case.partner);
        let mut here = local
            .run(case.partner, case.query, &case.params)
            .await
            .unwrap_or_else(|s| panic!("{label} in process: {s}"));
        let mut there = remote
            .run(case.partner, case.query, &case.params)
            .await
            .unwrap_or_else(|s| panic!("{label} on the cluster: {s}"));
        assert!(!here.rows.is_empty(), "{label}: the sample releases rows");
        // Everything but the time each took (coarse on purpose) must be the same.
        (here.elapsed_ms, there.elapsed_ms) = (0, 0);
        assert!(there == here, "{label}: the cluster's answer differs");
    }

    // The questions did go to the cluster: with it stopped, a new question is answered "ask
    // again" (a cluster that is down says nothing about the data, so nothing is stored), while a
    // stored answer is still served.
    drop(cluster);
    let new_window = [
        ("brand", text("Sakura Cha")),
        ("start", date("2025-12-01")),
        ("end", date("2026-11-01")),
    ];
    let refused = remote
        .run("sakura_foods", "brand_buyers_by_prefecture", &new_window)
        .await
        .expect_err("no cluster, no new answer");
    assert_eq!(refused.code(), Code::Unavailable, "{}", refused.message());
    assert!(
        refused.message().contains("ask again"),
        "{}",
        refused.message()
    );
    let case = cases(&truth, &local).remove(0);
    remote
        .run(case.partner, case.query, &case.params)
        .await
        .expect("a stored answer needs no cluster");
    local.stop().await;
    remote.stop().await;
}
