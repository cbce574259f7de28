//! Crash safety under `kill -9` (issue 9, item 8): the real `cleanroom serve` binary is killed
//! during a members ingest, a purchases ingest, a list upload and a query, then started again on
//! the same data directory. Each time: it starts (a torn record is cut, never an outage), the
//! keyed audit trail and its checkpoint verify, the earlier answers are served whole, and no
//! budget is refilled. Where in its work each kill lands is up to the scheduler; the checks hold
//! wherever it does.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cleanroom_client::{Connection, sample};
use cleanroom_proto::v1::{IngestHeader, ListQueriesRequest, RunQueryResponse};

use crate::util::{root, sample_dir, test_secret};

/// The master secret the served process uses (the tests' fixed one).
fn secret_hex() -> String {
    hex::encode(b"cleanroom integration test secret, 32+ bytes")
}

/// A `cleanroom serve` process on loopback, killed when dropped (a failing test leaves none).
struct Served {
    child: Option<Child>,
    addr: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn write_config(dir: &Path) -> PathBuf {
    let config = dir.join("cleanroom.toml");
    let text = format!(
        "listen = \"127.0.0.1:0\"\nreview_listen = \"127.0.0.1:0\"\nreload_seconds = 60\n\
         data_dir = {:?}\nrules = {:?}\nqueries = {:?}\n",
        dir.join("data").display().to_string(),
        sample_dir().join("rules.toml").display().to_string(),
        root().join("queries").display().to_string(),
    );
    std::fs::write(&config, text).unwrap();
    config
}

fn serve(config: &Path) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cleanroom"))
        .args(["serve", "--allow-demo-tokens", "--config"])
        .arg(config)
        .env("CLEANROOM_MASTER_SECRET", secret_hex())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    while std::time::Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            if let Some(addr) = line.strip_prefix("cleanroom serving gRPC on ") {
                return Served {
                    child: Some(child),
                    addr: addr.trim().to_string(),
                };
            }
            seen.push(line);
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("serve exited with {status}: {}", seen.join("\n"));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("serve did not come up: {}", seen.join("\n"));
}

impl Served {
    async fn conn(&self) -> Connection {
        Connection::open(&self.addr).await.unwrap()
    }

    /// `kill -9`.
    fn kill(mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

async fn overlap(conn: &Connection) -> RunQueryResponse {
    conn.partner(sample::partner_token("sakura_foods"))
        .unwrap()
        .run_query(crate::util::request("matched_overlap", &[]))
        .await
        .expect("the service answers after the restart")
        .into_inner()
}

/// After a kill: the restarted service verifies, answers, and has refilled nothing. After a cut
/// write, nothing of it is visible: the data version is unchanged, so the overlap is the very
/// answer stored before.
async fn check_restart(
    config: &Path,
    data: &Path,
    answers_used: &mut u32,
    what: &str,
    unchanged: Option<&RunQueryResponse>,
) -> Served {
    let served = serve(config);
    let key = cleanroom_server::audit::ChainKey::new(&test_secret());
    cleanroom_server::audit::verify(&data.join("audit.jsonl"), &key, None)
        .unwrap_or_else(|e| panic!("{what}: the trail does not verify: {e}"));
    let conn = served.conn().await;
    conn.partner(sample::partner_token("kumo_denki"))
        .unwrap()
        .list_queries(ListQueriesRequest {})
        .await
        .unwrap_or_else(|e| panic!("{what}: {e:?}"));
    let answer = overlap(&conn).await;
    if let Some(before) = unchanged {
        assert_eq!(
            answer.arrow_ipc, before.arrow_ipc,
            "{what}: a cut write is not visible"
        );
        assert_eq!(answer.list_version, before.list_version, "{what}");
    }
    let used = answer.protection.unwrap().answers_used;
    assert!(
        used >= *answers_used,
        "{what}: answers used fell from {answers_used} to {used}"
    );
    *answers_used = used;
    served
}

fn many_members(copies: usize) -> Vec<cleanroom_proto::v1::MemberRecord> {
    let members = cleanroom_client::read_members(&sample_dir().join("members.csv")).unwrap();
    (0..copies)
        .flat_map(|copy| {
            members.iter().map(move |m| {
                let mut m = m.clone();
                if copy > 0 {
                    m.member_id = format!("{}C{copy}", m.member_id);
                    m.email = format!("copy{copy}.{}", m.email);
                    m.phone = String::new();
                }
                m
            })
        })
        .collect()
}

fn many_list_records(n: usize) -> Vec<cleanroom_proto::v1::CustomerRecord> {
    (0..n)
        .map(|i| cleanroom_proto::v1::CustomerRecord {
            email: format!("nobody.{i}@example.org"),
            attribute: "bronze".into(),
            ..Default::default()
        })
        .collect()
}

fn many_purchases(n: usize) -> Vec<cleanroom_proto::v1::PurchaseRecord> {
    (0..n)
        .map(|i| cleanroom_proto::v1::PurchaseRecord {
            member_id: format!("M{:07}", 1 + i % 4000),
            purchased_at: "2026-10-20T10:00:00+09:00".into(),
            sku: format!("SKU-{i}"),
            brand: "Other".into(),
            manufacturer: "Other".into(),
            category: "snacks".into(),
            quantity: 1,
            amount: 100,
        })
        .collect()
}

/// Starts `work`, kills the server after `after`, and waits for `work` to end either way;
/// prints and returns whether the work finished before the kill.
async fn kill_during<F, T, E>(what: &str, served: Served, after: Duration, work: F) -> bool
where
    F: std::future::Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: std::fmt::Debug + Send + 'static,
{
    let task = tokio::spawn(work);
    tokio::time::sleep(after).await;
    served.kill();
    match task.await.unwrap() {
        Ok(_) => {
            println!("{what}: finished before the kill");
            true
        }
        Err(e) => {
            println!("{what}: cut by the kill ({e:?})");
            false
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_minus_nine_during_writes_leaves_a_whole_state() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let data = dir.path().join("data");
    let served = serve(&config);
    let conn = served.conn().await;
    sample::approve_all(&conn).await.unwrap();
    sample::load(&conn, &sample_dir()).await.unwrap();
    let first = overlap(&conn).await;
    let mut used = first.protection.as_ref().unwrap().answers_used;

    let header = IngestHeader::default();
    let c = conn.clone();
    let finished = kill_during(
        "members ingest",
        served,
        Duration::from_millis(400),
        async move {
            let mut admin = c.admin(sample::ANALYST_TOKEN).unwrap();
            cleanroom_client::ingest_members(&mut admin, header, many_members(40)).await
        },
    )
    .await;
    let served = check_restart(
        &config,
        &data,
        &mut used,
        "members ingest",
        (!finished).then_some(&first),
    )
    .await;

    let c = served.conn().await;
    let finished = kill_during(
        "purchases ingest",
        served,
        Duration::from_millis(300),
        async move {
            let mut admin = c.admin(sample::ANALYST_TOKEN).unwrap();
            cleanroom_client::ingest_purchases(
                &mut admin,
                IngestHeader::default(),
                many_purchases(300_000),
            )
            .await
        },
    )
    .await;
    let served = check_restart(
        &config,
        &data,
        &mut used,
        "purchases ingest",
        (!finished).then_some(&first),
    )
    .await;

    let c = served.conn().await;
    let finished = kill_during(
        "list upload",
        served,
        Duration::from_millis(300),
        async move {
            let mut partner = c.partner(sample::partner_token("sakura_foods")).unwrap();
            cleanroom_client::upload_list(&mut partner, false, many_list_records(300_000)).await
        },
    )
    .await;
    let served = check_restart(
        &config,
        &data,
        &mut used,
        "list upload",
        (!finished).then_some(&first),
    )
    .await;

    let c = served.conn().await;
    kill_during("query", served, Duration::from_millis(30), async move {
        c.partner(sample::partner_token("sakura_foods"))
            .unwrap()
            .run_query(crate::util::request(
                "category_buyers_by_age_band",
                &crate::util::year(),
            ))
            .await
    })
    .await;
    let served = check_restart(&config, &data, &mut used, "query", None).await;
    served.kill();
    let records = cleanroom_server::audit::read(&data.join("audit.jsonl")).unwrap();
    let recovered = records
        .iter()
        .filter(|r| r.entry.method == "RecoverTornRecord")
        .count();
    println!(
        "{} audit records, {recovered} torn records recovered",
        records.len()
    );
}
