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

use crate::util::{copy_declarations, root, sample_dir, test_secret};

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
    write_config_with(
        dir,
        &sample_dir().join("rules.toml"),
        &root().join("queries"),
        60,
    )
}

/// A service configuration in `dir` (data in `dir/data`, the high-water mark beside it).
fn write_config_with(dir: &Path, rules: &Path, queries: &Path, reload_seconds: u32) -> PathBuf {
    let config = dir.join("cleanroom.toml");
    let text = format!(
        "listen = \"127.0.0.1:0\"\nreview_listen = \"127.0.0.1:0\"\n\
         reload_seconds = {reload_seconds}\ndata_dir = {:?}\nrules = {:?}\nqueries = {:?}\n",
        dir.join("data").display().to_string(),
        rules.display().to_string(),
        queries.display().to_string(),
    );
    std::fs::write(&config, text).unwrap();
    config
}

/// Starts `cleanroom serve`. It runs with SIGXFSZ ignored (set by the shell that execs it, and
/// inherited), as a service on a full disk sees it: a file-size limit then makes writes fail with
/// an error instead of killing the process.
fn serve(config: &Path) -> Served {
    serve_logging(config, &[], "warn").0
}

/// [`serve`] with more arguments and a log filter, and the lines of its standard error that
/// follow the start (until it exits).
fn serve_logging(
    config: &Path,
    args: &[&str],
    rust_log: &str,
) -> (Served, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new("sh")
        .args(["-c", "trap '' XFSZ; exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_cleanroom"))
        .args(["serve", "--allow-demo-tokens", "--config"])
        .arg(config)
        .args(args)
        .env("CLEANROOM_MASTER_SECRET", secret_hex())
        .env("RUST_LOG", rust_log)
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
                let served = Served {
                    child: Some(child),
                    addr: addr.trim().to_string(),
                };
                return (served, rx);
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

    /// Limits the size of every file the service writes to `bytes` (the soft limit only, so it
    /// can be lifted again), or lifts the limit: how a full disk looks to the service.
    fn limit_file_size(&self, bytes: Option<u64>) {
        let pid = self.child.as_ref().expect("running").id();
        let limit = bytes.map_or("unlimited".to_string(), |b| b.to_string());
        let status = Command::new("prlimit")
            .arg(format!("--pid={pid}"))
            .arg(format!("--fsize={limit}:"))
            .status()
            .expect("prlimit (util-linux) runs");
        assert!(status.success(), "prlimit --fsize={limit}: failed");
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

/// The size of a file of the data directory.
fn size(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

fn weekly(start: &str) -> Vec<(&'static str, cleanroom_proto::v1::ParamValue)> {
    vec![
        ("start", crate::util::date(start)),
        ("end", crate::util::date("2026-11-02")),
    ]
}

async fn repeat_rate(conn: &Connection, start: &str) -> Result<RunQueryResponse, tonic::Status> {
    conn.partner(sample::partner_token("sakura_foods"))
        .unwrap()
        .run_query(crate::util::request("repeat_purchase_rate", &weekly(start)))
        .await
        .map(|r| r.into_inner())
}

/// Waits up to 30 s for `ready`.
async fn eventually<F, Fut>(what: &str, mut ready: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..60 {
        if ready().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("{what}: not within 30 s");
}

async fn listed_for_review(conn: &Connection, id: &str) -> bool {
    conn.legal(sample::LEGAL_TOKEN)
        .unwrap()
        .list_allow_list(cleanroom_proto::v1::ListAllowListRequest {})
        .await
        .is_ok_and(|r| r.into_inner().queries.iter().any(|q| q.id == id))
}

/// Issue 14, item 3: a full disk during an append, for each JSONL file the service appends to
/// (the privacy ledger, the query archive's index, the audit trail). The file size is limited
/// just past the file's end (the service ignoring SIGXFSZ, as a full disk looks to it), the
/// service is made to append to it, the limit is lifted, it is made to append again, and then it
/// is killed with -9 and started: it starts, the trail verifies, and nothing charged is refilled.
/// A question whose charge failed is not "being answered now" afterwards, and was not charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_at_every_append_is_cut_back_and_the_service_starts_again() {
    let dir = tempfile::tempdir().unwrap();
    let queries = dir.path().join("queries");
    std::fs::create_dir(&queries).unwrap();
    for entry in std::fs::read_dir(root().join("queries")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, queries.join(path.file_name().unwrap())).unwrap();
    }
    let config = write_config_with(dir.path(), &sample_dir().join("rules.toml"), &queries, 1);
    let data = dir.path().join("data");
    let served = serve(&config);
    let conn = served.conn().await;
    sample::approve_all(&conn).await.unwrap();
    sample::load(&conn, &sample_dir()).await.unwrap();
    let mut used = overlap(&conn).await.protection.unwrap().answers_used;

    // The privacy ledger: a fresh question's charge cannot be written.
    served.limit_file_size(Some(size(&data.join("guard/ledger.jsonl")) + 20));
    let failed = repeat_rate(&conn, "2025-11-03").await.unwrap_err();
    assert_eq!(failed.code(), tonic::Code::Internal, "{failed:?}");
    served.limit_file_size(None);
    let answer = repeat_rate(&conn, "2025-11-03")
        .await
        .expect("answered once space is back, not 'being answered now'");
    let p = answer.protection.unwrap();
    assert!(p.fresh);
    assert_eq!(
        p.answers_used,
        used + 1,
        "the failed charge was not charged"
    );
    used = p.answers_used;
    served.kill();
    let served = check_restart(&config, &data, &mut used, "ledger", None).await;
    let conn = served.conn().await;

    // The query archive's index: a new query file arrives while the disk is full.
    served.limit_file_size(Some(size(&data.join("allowlist/versions.jsonl")) + 20));
    let added = crate::util::TOTAL;
    std::fs::write(
        queries.join(format!("{}.toml", added.id)),
        format!(
            "id = {:?}\nversion = 1\ntitle = \"t\"\ndescription = \"d\"\n\
             purposes = [\"product_insight\"]\ncontract_clause = \"c\"\n\
             partners = [\"sakura_foods\"]\nk = 10\nsql = '''{}'''\nmetrics = [\"members\"]\n",
            added.id, added.sql
        ),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !listed_for_review(&conn, added.id).await,
        "a reload whose archive could not be written does not take effect"
    );
    served.limit_file_size(None);
    eventually("the new query is archived and in force", || {
        listed_for_review(&conn, added.id)
    })
    .await;
    served.kill();
    let served = check_restart(&config, &data, &mut used, "query archive", None).await;
    let conn = served.conn().await;

    // The audit trail: a call's record cannot be written.
    served.limit_file_size(Some(size(&data.join("audit.jsonl")) + 20));
    let failed = repeat_rate(&conn, "2025-11-03").await.unwrap_err();
    assert_eq!(failed.code(), tonic::Code::Internal, "{failed:?}");
    served.limit_file_size(None);
    let again = repeat_rate(&conn, "2025-11-03").await.unwrap();
    assert!(!again.protection.unwrap().fresh, "still the stored answer");
    served.kill();
    let served = check_restart(&config, &data, &mut used, "audit trail", None).await;
    for file in [
        "guard/ledger.jsonl",
        "allowlist/versions.jsonl",
        "audit.jsonl",
    ] {
        let (_, torn) = cleanroom_core::files::read_jsonl(&data.join(file), false).unwrap();
        assert!(torn.is_none(), "{file} ends with a whole record");
    }
    served.kill();
}

/// Issue 14, item 4: a partner limited to 12 answers a day asks distinct fresh questions eight
/// at a time, and the service is killed with -9 during the burst, twice. The daily count is
/// rebuilt from what was charged, so across the kills the partner never receives answers to
/// more than 12 distinct questions in the day: a question charged before a kill but answered
/// after it is one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_a_burst_never_refills_the_daily_answer_count() {
    const LIMIT: usize = 12;
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    let sample_rules = std::fs::read_to_string(sample_dir().join("rules.toml")).unwrap();
    let limited = sample_rules.replacen(
        "max_queries_per_day = 500",
        &format!("max_queries_per_day = {LIMIT}"),
        1,
    );
    assert_ne!(limited, sample_rules, "Sakura's contract comes first");
    std::fs::write(&rules, limited).unwrap();
    copy_declarations(dir.path());
    let config = write_config_with(dir.path(), &rules, &root().join("queries"), 60);
    let mut served = serve(&config);
    let conn = served.conn().await;
    sample::approve_all(&conn).await.unwrap();
    sample::load(&conn, &sample_dir()).await.unwrap();

    let monday = chrono::NaiveDate::from_ymd_opt(2025, 6, 2).unwrap();
    let starts: Vec<String> = (0..24)
        .map(|week| (monday + chrono::Duration::weeks(week)).to_string())
        .collect();
    let mut answered: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    for (round, wait) in [(0, 250), (1, 600)] {
        let conn = served.conn().await;
        let burst: Vec<_> = starts[round * 8..round * 8 + 8]
            .iter()
            .map(|start| {
                let (conn, start) = (conn.clone(), start.clone());
                tokio::spawn(async move { (start.clone(), repeat_rate(&conn, &start).await) })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(wait)).await;
        served.kill();
        for task in burst {
            let (start, result) = task.await.unwrap();
            if result.is_ok() {
                answered.insert(start);
            }
        }
        println!("round {round}: {} answered so far", answered.len());
        served = serve(&config);
    }
    // After the kills: every question asked again, then new ones until the day's answers end.
    let conn = served.conn().await;
    for start in &starts {
        match repeat_rate(&conn, start).await {
            Ok(_) => {
                answered.insert(start.clone());
            }
            Err(status) => assert_eq!(
                status.code(),
                tonic::Code::ResourceExhausted,
                "{start}: {status:?}"
            ),
        }
    }
    println!("{} distinct questions answered in the day", answered.len());
    assert!(
        answered.len() <= LIMIT,
        "{} distinct answers against a limit of {LIMIT}",
        answered.len()
    );
    served.kill();
}

/// `--log-format json`: every log record is one JSON object on its own line (for a log
/// collector), the status lines stay text, and no record names a member: the target member's
/// e-mail and member id appear in none, though the whole sample passed through the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_and_name_no_member() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let (served, lines) = serve_logging(&config, &["--log-format", "json"], "info");
    sample::load(&served.conn().await, &sample_dir())
        .await
        .unwrap();
    drop(served);
    let lines: Vec<String> = lines.iter().collect();
    let mut records = 0;
    for line in &lines {
        if line.starts_with("review page on ") {
            continue;
        }
        let record: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log record ({e}): {line}"));
        assert!(record["level"].is_string(), "{line}");
        assert!(record["fields"]["message"].is_string(), "{line}");
        records += 1;
        for identifier in [
            "Hanako.Matoba@example.jp",
            "hanako.matoba@example.jp",
            "M0004001",
        ] {
            assert!(!line.contains(identifier), "{line}");
        }
    }
    assert!(records > 0, "the sample's load logs at info: {lines:?}");
}

/// The files of `dir` (recursively) named `name`.
fn found_named(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(found_named(&path, name));
        } else if path.file_name().is_some_and(|n| n == name) {
            found.push(path);
        }
    }
    found
}

/// A service over the sample, in `dir`, with its own copy of the sample rules (reloaded every
/// 60 seconds), that has answered one question and was then killed: what a test of a
/// collaboration's end changes the rules of and kills again.
struct Collaborating {
    rules: PathBuf,
    sample_rules: String,
    config: PathBuf,
    data: PathBuf,
}

async fn collaborating(dir: &Path) -> Collaborating {
    let rules = dir.join("rules.toml");
    let sample_rules = std::fs::read_to_string(sample_dir().join("rules.toml")).unwrap();
    std::fs::write(&rules, &sample_rules).unwrap();
    copy_declarations(dir);
    let config = write_config_with(dir, &rules, &root().join("queries"), 60);
    let served = serve(&config);
    let conn = served.conn().await;
    sample::approve_all(&conn).await.unwrap();
    sample::load(&conn, &sample_dir()).await.unwrap();
    overlap(&conn).await;
    served.kill();
    Collaborating {
        rules,
        sample_rules,
        config,
        data: dir.join("data"),
    }
}

/// The data files of Sakura Foods' collaboration: its member tokens and list versions.
fn sakura_data(data: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("member_tokens-ctr-sakura") || n.starts_with("list-sakura_foods"))
        .collect();
    names.sort();
    names
}

/// Starts `cleanroom serve` told to pause at `point` (`faults::PAUSE_AT`), waits until it says it
/// has, and kills it with SIGKILL there.
fn kill_at_pause(config: &Path, point: &str, during: impl FnOnce(&str)) {
    let mut during = Some(during);
    let mut child = Command::new(env!("CARGO_BIN_EXE_cleanroom"))
        .args(["serve", "--allow-demo-tokens", "--config"])
        .arg(config)
        .env("CLEANROOM_MASTER_SECRET", secret_hex())
        .env(cleanroom_server::faults::PAUSE_AT, point)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let paused = format!("cleanroom paused at {point}");
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while std::time::Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            if let Some(addr) = line.strip_prefix("cleanroom serving gRPC on ") {
                let during = during.take().expect("serves once");
                during(addr.trim());
            } else if line.starts_with(&paused) {
                child.kill().unwrap();
                child.wait().unwrap();
                return;
            }
            seen.push(line);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("never paused at {point}: {}", seen.join("\n"));
}

/// Issue 16, item 3: `kill -9` at each step of a destruction (after its commit, after its stored
/// answers, after its key), then a start: the destruction is complete (files, stored answers,
/// key seed), the partner is refused, the trail verifies and holds the destruction's one typed
/// record (files, hashes, rows, reason, key id), and the privacy ledger is byte for byte what it
/// was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_minus_nine_during_a_destruction_and_the_next_start_completes_it() {
    for point in [
        "end:committed",
        "end:answers-forgotten",
        "end:keys-destroyed",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let Collaborating {
            rules,
            sample_rules,
            config,
            data,
        } = collaborating(dir.path()).await;
        assert_eq!(sakura_data(&data).len(), 2);
        assert!(!found_named(dir.path(), "ctr-sakura-2026.v1.seed").is_empty());
        let ledger = std::fs::read(data.join("guard/ledger.jsonl")).unwrap();

        // The contract ended 30 days ago; with its 14 days of grace it is due.
        let ended = chrono::Utc::now().date_naive() - chrono::Days::new(30);
        let expired = sample_rules.replacen(
            "expires = \"2027-03-31\"",
            &format!("expires = \"{ended}\""),
            1,
        );
        assert_ne!(expired, sample_rules, "Sakura's contract expiry is edited");
        std::fs::write(&rules, expired).unwrap();
        kill_at_pause(&config, point, |_| {
            panic!("{point}: served before the destruction")
        });

        let served = serve(&config);
        assert!(
            sakura_data(&data).is_empty(),
            "{point}: {:?}",
            sakura_data(&data)
        );
        assert!(
            found_named(dir.path(), "ctr-sakura-2026.v1.seed").is_empty(),
            "{point}: the key seed is destroyed"
        );
        let answers = data.join("guard/answers").join("c2FrdXJhX2Zvb2Rz");
        assert!(!answers.exists(), "{point}: stored answers destroyed");
        let refused = served
            .conn()
            .await
            .partner(sample::partner_token("sakura_foods"))
            .unwrap()
            .run_query(crate::util::request("matched_overlap", &[]))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{point}");
        assert_eq!(
            std::fs::read(data.join("guard/ledger.jsonl")).unwrap(),
            ledger,
            "{point}: the ledger is unchanged"
        );
        let key = cleanroom_server::audit::ChainKey::new(&test_secret());
        cleanroom_server::audit::verify(&data.join("audit.jsonl"), &key, None)
            .unwrap_or_else(|e| panic!("{point}: the trail does not verify: {e}"));
        // Every step's crash leaves the typed record, written at the start when the crash came
        // before it: the files with their hashes and rows, the reason, the destroyed key's id.
        let records = cleanroom_server::audit::read(&data.join("audit.jsonl")).unwrap();
        let proofs: Vec<_> = records
            .iter()
            .filter_map(|r| match &r.entry.event {
                Some(cleanroom_server::audit::Event::Destroyed(d)) => Some(d),
                _ => None,
            })
            .collect();
        assert_eq!(proofs.len(), 1, "{point}: one destruction record");
        let proof = proofs[0];
        assert_eq!(
            (proof.contract.as_str(), proof.reason.as_str()),
            ("ctr-sakura-2026", "expiry"),
            "{point}"
        );
        assert_eq!(proof.files.len(), 2, "{point}: {proof:?}");
        assert!(
            proof
                .files
                .iter()
                .all(|f| f.sha256.len() == 64 && f.rows > 0),
            "{point}: {proof:?}"
        );
        assert_ne!(proof.key_id, "never made", "{point}");
        println!("{point}: killed there, completed at the next start");
        served.kill();
    }
}

/// Issue 16, items 2 and 3: `kill -9` after a list retention's commit (a second upload
/// destroying the first version), then a start: the stored answers over the destroyed version
/// are destroyed too, the new version answers, the trail verifies and the ledger is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_minus_nine_during_a_list_retention_and_the_next_start_completes_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let data = dir.path().join("data");
    let served = serve(&config);
    let conn = served.conn().await;
    sample::approve_all(&conn).await.unwrap();
    sample::load(&conn, &sample_dir()).await.unwrap();
    assert_eq!(overlap(&conn).await.list_version, 1);
    served.kill();
    let answers = data.join("guard/answers").join("c2FrdXJhX2Zvb2Rz");
    assert_eq!(std::fs::read_dir(&answers).unwrap().count(), 1);
    let first = sakura_data(&data);

    kill_at_pause(&config, "lists:committed", |addr| {
        let addr = addr.to_string();
        // The upload runs on its own thread: the pause holds its answer back until the kill.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async move {
                let conn = Connection::open(&addr).await.unwrap();
                let records = cleanroom_client::read_list(
                    &sample_dir().join("partner_lists/sakura_foods.csv"),
                )
                .unwrap();
                let mut partner = conn.partner(sample::partner_token("sakura_foods")).unwrap();
                let _ = cleanroom_client::upload_list(&mut partner, false, records).await;
            });
        });
    });
    let ledger = std::fs::read(data.join("guard/ledger.jsonl")).unwrap();
    let served = serve(&config);
    let now = sakura_data(&data);
    assert_eq!(now.len(), 2, "member tokens and one list version: {now:?}");
    assert!(
        first
            .iter()
            .any(|f| f.starts_with("list-") && !now.contains(f)),
        "version 1 is gone"
    );
    assert_eq!(
        std::fs::read_dir(&answers).map_or(0, |d| d.count()),
        0,
        "the answer over version 1 is destroyed at the start"
    );
    assert_eq!(overlap(&served.conn().await).await.list_version, 2);
    let key = cleanroom_server::audit::ChainKey::new(&test_secret());
    cleanroom_server::audit::verify(&data.join("audit.jsonl"), &key, None)
        .expect("the trail verifies");
    let after = std::fs::read(data.join("guard/ledger.jsonl")).unwrap();
    assert!(after.starts_with(&ledger), "nothing charged before is gone");
    served.kill();
}

/// Issue 16, item 7: `kill -9` during a member's erasure, once with every file staged and once
/// right after its commit, then a start: the erasure is all there or not at all (both members'
/// rows and pseudonyms in no file, or every row still there), no staged or replaced file is left
/// beside the manifest's, and the trail verifies, recording the commit a crash cut from its call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_minus_nine_during_an_erasure_leaves_all_or_nothing() {
    let truth = crate::truth::Truth::load();
    let (on_list, on_none) = crate::erasure::two_members(&truth);
    let ids = vec![on_list, on_none];
    let key = test_secret().pseudonym_key();
    let pseudonyms: Vec<i64> = ids.iter().map(|id| key.pseudonym(id)).collect();
    for (point, erased) in [("erase:staged", false), ("erase:committed", true)] {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path());
        let data = dir.path().join("data");
        let served = serve(&config);
        let conn = served.conn().await;
        sample::approve_all(&conn).await.unwrap();
        sample::load(&conn, &sample_dir()).await.unwrap();
        served.kill();
        assert!(!crate::erasure::traces(&data, &ids, &pseudonyms).is_empty());

        let asked = ids.clone();
        kill_at_pause(&config, point, move |addr| {
            let addr = addr.to_string();
            // The erasure runs on its own thread: the pause holds its answer back until the kill.
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Runtime::new().unwrap();
                runtime.block_on(async move {
                    let conn = Connection::open(&addr).await.unwrap();
                    let request = cleanroom_proto::v1::EraseMembersRequest {
                        member_ids: asked,
                        request_id: String::new(),
                    };
                    let _ = conn
                        .admin(sample::ANALYST_TOKEN)
                        .unwrap()
                        .erase_members(request)
                        .await;
                });
            });
        });
        let served = serve(&config);
        overlap(&served.conn().await).await;
        let found = crate::erasure::traces(&data, &ids, &pseudonyms);
        assert_eq!(found.is_empty(), erased, "{point}: {found:?}");
        let store = cleanroom_engine::store::Store::open(&data).unwrap();
        let members = store.snapshot().members.as_ref().unwrap().rows().unwrap();
        let all = truth.members.len() as u64;
        assert_eq!(members, if erased { all - 2 } else { all }, "{point}");
        let found = cleanroom_engine::store::Found::read(&data).unwrap();
        assert!(found.orphans().is_empty(), "{point}: {:?}", found.orphans());
        let stray: Vec<String> = std::fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("staging-"))
            .collect();
        assert!(stray.is_empty(), "{point}: {stray:?}");
        let key = cleanroom_server::audit::ChainKey::new(&test_secret());
        cleanroom_server::audit::verify(&data.join("audit.jsonl"), &key, None)
            .unwrap_or_else(|e| panic!("{point}: the trail does not verify: {e}"));
        let records = cleanroom_server::audit::read(&data.join("audit.jsonl")).unwrap();
        let reconciled = records.iter().any(|r| match &r.entry.event {
            Some(cleanroom_server::audit::Event::Reconciled { writes, .. }) => {
                writes.iter().any(|w| w.method == "EraseMembers")
            }
            _ => false,
        });
        assert_eq!(reconciled, erased, "{point}: the trail records the commit");
        println!("{point}: killed there; erased: {erased}");
        served.kill();
    }
}

/// Issue 16, item 6: `kill -9` at each step of a rotation's end (after its commit, after the old
/// key's destruction), then a start: the old version is gone (its member tokens, its list, its
/// key seed, a tombstone left), the partner is refused, the trail verifies and records it, and
/// the privacy ledger is byte for byte what it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_minus_nine_during_a_rotations_end_and_the_next_start_completes_it() {
    for point in ["rotation:committed", "rotation:key-destroyed"] {
        let dir = tempfile::tempdir().unwrap();
        let Collaborating {
            rules,
            sample_rules,
            config,
            data,
        } = collaborating(dir.path()).await;
        assert_eq!(sakura_data(&data).len(), 2);
        let ledger = std::fs::read(data.join("guard/ledger.jsonl")).unwrap();

        // Sakura's key moves to version 2 with no overlap: version 1 ends at the first sweep.
        let rotated = sample_rules.replacen(
            "key_version = 1\n",
            "key_version = 2\nkey_overlap_days = 0\n",
            1,
        );
        std::fs::write(&rules, rotated).unwrap();
        kill_at_pause(&config, point, |_| {
            panic!("{point}: served before the rotation's end")
        });

        let served = serve(&config);
        assert!(
            sakura_data(&data).is_empty(),
            "{point}: {:?}",
            sakura_data(&data)
        );
        assert!(
            found_named(dir.path(), "ctr-sakura-2026.v1.seed").is_empty(),
            "{point}: the old key seed is destroyed"
        );
        assert_eq!(
            found_named(dir.path(), "ctr-sakura-2026.v1.destroyed").len(),
            1,
            "{point}: its tombstone is there"
        );
        assert_eq!(found_named(dir.path(), "ctr-sakura-2026.v2.seed").len(), 1);
        let refused = served
            .conn()
            .await
            .partner(sample::partner_token("sakura_foods"))
            .unwrap()
            .run_query(crate::util::request("matched_overlap", &[]))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{point}");
        assert!(
            refused.message().contains("with key version 1"),
            "{point}: {refused:?}"
        );
        assert_eq!(
            std::fs::read(data.join("guard/ledger.jsonl")).unwrap(),
            ledger,
            "{point}: the ledger is unchanged"
        );
        let key = cleanroom_server::audit::ChainKey::new(&test_secret());
        cleanroom_server::audit::verify(&data.join("audit.jsonl"), &key, None)
            .unwrap_or_else(|e| panic!("{point}: the trail does not verify: {e}"));
        let records = cleanroom_server::audit::read(&data.join("audit.jsonl")).unwrap();
        let recorded = records.iter().any(|r| match &r.entry.event {
            Some(cleanroom_server::audit::Event::Retired(r)) => r.key_version == Some(1),
            Some(cleanroom_server::audit::Event::Reconciled { writes, .. }) => {
                writes.iter().any(|w| w.method == "Sweep")
            }
            _ => false,
        });
        assert!(recorded, "{point}: the trail records the rotation's end");
        println!("{point}: killed there, completed at the next start");
        served.kill();
    }
}

/// A full disk at the append of a list's record of receipt (issue 16, item 4): the list's commit
/// comes first and goes through, the record cannot be written, and the upload fails. Its retry
/// under the same request id, once space is back, is answered with the version stored and
/// writes the record; a start after `kill -9` finds nothing missing and writes no second one.
/// The file-size limit is set just past the records' end, after enough uploads that the records
/// are larger than every other file an upload writes (the new list file, the manifest, the
/// high-water mark), so the record's append is the write that fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_at_a_record_of_receipt_is_finished_by_the_retry() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    let sample_rules = std::fs::read_to_string(sample_dir().join("rules.toml")).unwrap();
    let relaxed = sample_rules.replace("max_list_versions = 4", "max_list_versions = 1000");
    assert_ne!(relaxed, sample_rules);
    std::fs::write(&rules, relaxed).unwrap();
    copy_declarations(dir.path());
    let config = write_config_with(dir.path(), &rules, &root().join("queries"), 60);
    let data = dir.path().join("data");
    let served = serve(&config);
    let conn = served.conn().await;
    sample::approve_all(&conn).await.unwrap();
    sample::load(&conn, &sample_dir()).await.unwrap();
    let key = cleanroom_server::audit::ChainKey::new(&test_secret());
    let receipts = || cleanroom_server::receipts::read(&data, &key).unwrap();
    let list =
        cleanroom_client::read_list(&sample_dir().join("partner_lists/sakura_foods.csv")).unwrap();
    let upload = |request_id: &str| {
        let (conn, records) = (conn.clone(), list.clone());
        let header = cleanroom_proto::v1::UploadListHeader {
            strict: false,
            request_id: request_id.to_string(),
        };
        async move {
            let mut sakura = conn.partner(sample::partner_token("sakura_foods")).unwrap();
            cleanroom_client::upload_list_as(&mut sakura, header, records).await
        }
    };
    let mut uploads = 0;
    while size(&data.join(cleanroom_server::receipts::FILE)) <= written_by_an_upload(&data) {
        upload(&cleanroom_client::new_request_id()).await.unwrap();
        uploads += 1;
        assert!(uploads < 40, "the records never outgrew the other files");
    }
    let before = receipts();
    let stored = upload_version(&data);

    served.limit_file_size(Some(
        size(&data.join(cleanroom_server::receipts::FILE)) + 20,
    ));
    let id = cleanroom_client::new_request_id();
    let failed = upload(&id)
        .await
        .expect_err("the record of receipt cannot be written");
    served.limit_file_size(None);
    println!("the upload on a full disk: {failed}");
    assert_eq!(
        upload_version(&data),
        stored + 1,
        "the list's commit went through"
    );
    assert_eq!(receipts().len(), before.len(), "and its record did not");

    let retried = upload(&id).await.expect("the retry is answered");
    assert!(retried.already_committed, "{retried:?}");
    assert_eq!(retried.list_version, stored + 1);
    let after = receipts();
    assert_eq!(after.len(), before.len() + 1, "the retry wrote the record");
    let written = &after.last().unwrap().entry;
    assert_eq!(
        (written.partner.as_str(), written.list_version),
        ("sakura_foods", stored + 1)
    );
    assert_eq!(written.members, before.last().unwrap().entry.members);
    served.kill();
    let served = serve(&config);
    overlap(&served.conn().await).await;
    assert_eq!(
        receipts().len(),
        after.len(),
        "no second record at the next start"
    );
    cleanroom_server::receipts::verify(&data, &key).unwrap();
    served.kill();
}

/// The largest file a list upload writes whole: its list file (as large as the last one), the
/// manifest and the high-water mark beside the data directory (all but the mark in `data`).
fn written_by_an_upload(data: &Path) -> u64 {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("manifest.json")).unwrap()).unwrap();
    let last_list = manifest["lists"]["sakura_foods"]
        .as_array()
        .and_then(|versions| versions.last())
        .and_then(|file| file.as_str())
        .map_or(0, |file| size(&data.join(file)));
    // Where `serve` keeps it by default: `<data_dir>.high-water-mark.json`.
    let mark = data.with_file_name("data.high-water-mark.json");
    last_list
        .max(size(&data.join("manifest.json")))
        .max(size(&mark))
}

/// Sakura's newest list version, as the manifest counts them.
fn upload_version(data: &Path) -> u32 {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("manifest.json")).unwrap()).unwrap();
    let held = manifest["lists"]["sakura_foods"]
        .as_array()
        .map_or(0, |versions| versions.len());
    let dropped = manifest["lists_dropped"]["sakura_foods"]
        .as_u64()
        .unwrap_or(0);
    (held as u64 + dropped) as u32
}
