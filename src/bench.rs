//! `cleanroom bench --members N`: the service's speed and memory at a retailer's size, measured in
//! one run and reported as ratios against baselines measured in the same run.
//!
//! It generates fictional data (or reuses the data of an earlier run in `--dir`), starts the
//! service in this process on loopback with the sample rules (budgets widened so that a few
//! hundred fresh answers fit), loads the data through the gRPC API as an analyst would, and
//! measures:
//! - ingest throughput of each export, streamed from its file;
//! - a new question (`category_buyers_by_age_band` over one year), first and typical, against raw
//!   DataFusion running the same join and aggregate over the same tables in the same process
//!   (no audience, no guard): the privacy overhead;
//! - an identical repeat (served from the stored answer);
//! - member tokens (normalized e-mail → HMAC-SHA256 token) against a bare HMAC-SHA256 loop;
//! - a collaboration's token file written sealed with its data key against the same rows written
//!   as plain Parquet (what encryption at rest costs a write);
//! - a gRPC load test on loopback at 1, 8 and 32 clients, for repeats and for distinct new
//!   questions: p50 and p99 at the client, answers per second, errors, and the peak resident
//!   memory under the load against the memory after ingest.
//!
//! Timings are taken at the client. It is a measurement, never a pass/fail test; run it on a
//! release build (`cargo run --release -- bench --members 1000000`). `bench/peers.py` runs the
//! same questions in DuckDB and Polars on the same generated files and prints the ratios.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::{DateTime, Months, NaiveDate, Utc};
use cleanroom_client::{Connection, Progress, sample};
use cleanroom_core::allowlist::AllowList;
use cleanroom_core::rules::Rules;
use cleanroom_core::token::MasterSecret;
use cleanroom_engine::executor::ExecutorConfig;
use cleanroom_proto::v1::{
    IngestHeader, ParamValue, RunQueryRequest, UploadListHeader, param_value,
};
use serde::Serialize;

mod sealing;

/// What to measure.
pub struct BenchOptions {
    /// Generated retailer members.
    pub members: usize,
    /// Seed of the generated data.
    pub seed: u64,
    /// Where the generated files and the service's data go (kept, and reused if the files for the
    /// same size and seed are there); a temporary directory without it.
    pub dir: Option<PathBuf>,
    /// Concurrent clients of the load test.
    pub clients: Vec<usize>,
    /// Distinct questions per load level.
    pub questions: usize,
    /// Also write the figures as JSON here (for `bench/peers.py`).
    pub json: Option<PathBuf>,
    /// The query memory pool in MiB, if not the service's default.
    pub memory_mb: Option<usize>,
}

/// The question every timing asks, and the query behind it.
const QUERY: &str = "category_buyers_by_age_band";
const RAW_SQL: &str = "SELECT m.age_band, p.category, COUNT(DISTINCT p.member_key) AS buyers, \
     SUM(p.amount) AS amount_yen FROM purchases p JOIN members m ON p.member_key = m.member_key \
     WHERE p.purchased_at >= $start AND p.purchased_at < $end GROUP BY m.age_band, p.category";

/// The figures of one run.
#[derive(Debug, Default, Serialize)]
pub struct Figures {
    members: usize,
    purchases: usize,
    consent_events: usize,
    as_of: String,
    /// Per export: records and seconds.
    ingest: Vec<(String, u64, f64)>,
    rss_after_ingest_mb: f64,
    /// The service's query memory pool.
    query_memory_mb: u64,
    /// Seconds: the first new question, then the median of the next ones.
    new_first_s: f64,
    new_median_s: f64,
    /// Seconds: raw DataFusion on the same windows, first and median.
    raw_first_s: f64,
    raw_median_s: f64,
    /// The windows asked (start, end), for the peers to ask the same.
    windows: Vec<(String, String)>,
    repeat_median_ms: f64,
    repeat_p99_ms: f64,
    /// Tokens per second: the service's member tokens, and a bare HMAC-SHA256 loop.
    tokens_per_s: f64,
    hmac_per_s: f64,
    sealing: sealing::SealingFigures,
    load: Vec<LoadLevel>,
}

/// One level of the load test.
#[derive(Debug, Serialize)]
struct LoadLevel {
    kind: &'static str,
    clients: usize,
    requests: usize,
    errors: usize,
    p50_ms: f64,
    p99_ms: f64,
    total_s: f64,
    answers_per_s: f64,
    peak_rss_mb: f64,
}

/// New questions asked one after another before the load test (the first is reported apart).
const NEW_QUESTIONS: usize = 7;

/// Runs the benchmark and returns its report as Markdown.
pub async fn run(opts: BenchOptions, queries_dir: &Path, rules_path: &Path) -> Result<String> {
    let as_of = NaiveDate::from_ymd_opt(2026, 11, 1).expect("a date");
    let available = Windows::new(as_of).next.len();
    let needed = NEW_QUESTIONS + opts.questions * opts.clients.len();
    if needed > available {
        anyhow::bail!(
            "the generated year allows {available} distinct windows: at most {} distinct \
             questions per load level with {} load levels",
            (available - NEW_QUESTIONS) / opts.clients.len().max(1),
            opts.clients.len()
        );
    }
    let temporary = tempfile::tempdir()?;
    let dir = opts
        .dir
        .clone()
        .unwrap_or_else(|| temporary.path().to_path_buf());
    let mut figures = Figures {
        as_of: as_of.to_string(),
        ..Default::default()
    };
    let files = generate(&opts, &dir, as_of, &mut figures)?;
    let (server, conn, app) = start_service(&dir, opts.memory_mb, queries_dir, rules_path).await?;
    sample::approve_all(&conn).await?;
    ingest_all(&conn, &files, &mut figures).await?;
    figures.rss_after_ingest_mb = rss_mb("VmRSS");
    figures.query_memory_mb = (engine_config(&dir, opts.memory_mb).memory_bytes >> 20) as u64;
    let mut windows = Windows::new(as_of);
    ask_new_questions(&conn, &mut windows, NEW_QUESTIONS, &mut figures).await?;
    raw_datafusion(&app, &figures.windows.clone(), &mut figures).await?;
    repeats(&conn, &figures.windows[0].clone(), 200, &mut figures).await?;
    tokens_against_hmac(&mut figures);
    figures.sealing = sealing::measure()?;
    let first = figures.windows[0].clone();
    for &clients in &opts.clients {
        for kind in [Load::Repeats, Load::Distinct] {
            let level = load(&conn, clients, opts.questions, kind, &mut windows, &first).await?;
            figures.load.push(level);
        }
    }
    server.stop().await?;
    if let Some(path) = &opts.json {
        std::fs::write(path, serde_json::to_vec_pretty(&figures)?)
            .with_context(|| path.display().to_string())?;
    }
    Ok(render(&opts, &figures))
}

/// The generated exports of one size and seed.
struct Files {
    dir: PathBuf,
}

impl Files {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn generate(
    opts: &BenchOptions,
    dir: &Path,
    as_of: NaiveDate,
    figures: &mut Figures,
) -> Result<Files> {
    let out = dir.join(format!("gen-{}-{}", opts.members, opts.seed));
    let done = out.join("counts.json");
    let counts: (usize, usize, usize) = match std::fs::read(&done) {
        Ok(bytes) => serde_json::from_slice(&bytes)?,
        Err(_) => {
            eprintln!(
                "generating {} members (seed {}) in {}",
                opts.members,
                opts.seed,
                out.display()
            );
            let report = crate::r#gen::generate(&crate::r#gen::GenOptions {
                seed: opts.seed,
                members: opts.members,
                as_of,
                out_dir: out.clone(),
            })?;
            let counts = (report.members, report.purchases, report.consent_events);
            std::fs::write(&done, serde_json::to_vec(&counts)?)?;
            counts
        }
    };
    (figures.members, figures.purchases, figures.consent_events) = counts;
    Ok(Files { dir: out })
}

/// The service on loopback, in this process, on a fresh data directory under `dir`.
/// The service's engine settings: the defaults of `serve`, the memory pool as asked.
fn engine_config(dir: &Path, memory_mb: Option<usize>) -> ExecutorConfig {
    let mut engine = ExecutorConfig::with_defaults(dir.join("data/spill"));
    if let Some(mb) = memory_mb {
        engine.memory_bytes = mb.saturating_mul(1 << 20);
    }
    engine
}

async fn start_service(
    dir: &Path,
    memory_mb: Option<usize>,
    queries_dir: &Path,
    rules_path: &Path,
) -> Result<(
    cleanroom_server::Running,
    Connection,
    Arc<cleanroom_server::App>,
)> {
    let data = dir.join("data");
    let mark = dir.join("high-water-mark.json");
    let _ = std::fs::remove_dir_all(&data);
    let _ = std::fs::remove_file(&mark);
    let _ = std::fs::remove_dir_all(dir.join("keys"));
    let rules = widened(Rules::load(rules_path)?);
    rules.validate()?;
    let allowlist = AllowList::load(queries_dir, &rules)?;
    let now: DateTime<Utc> = DateTime::parse_from_rfc3339(sample::AS_OF)?.into();
    let engine = engine_config(dir, memory_mb);
    let app = cleanroom_server::App::new(cleanroom_server::AppConfig {
        data_dir: data,
        rules,
        allowlist,
        secret: MasterSecret::new(b"benchmark secret, not for production use".to_vec())?,
        clock: Arc::new(cleanroom_server::FixedClock(now)),
        sources: None,
        allow_demo_tokens: true,
        mark,
        accept_restore: false,
        engine,
        keys: dir.join("keys"),
    })?;
    let server =
        cleanroom_server::spawn(Arc::clone(&app), SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let conn = Connection::open(&format!("http://{}", server.addr)).await?;
    Ok((server, conn, app))
}

/// The sample rules with budgets wide enough for a benchmark's few hundred fresh answers: the
/// guard does all its work for each of them, noise included. The per-partner rate and
/// concurrency limits and the list upload caps are widened too, so the load test measures the
/// engine's capacity (its `[engine] concurrent_queries` queue), not the refusals a partner's
/// limits are there to give.
fn widened(mut rules: Rules) -> Rules {
    // Partners' lists of a large run (three quarters of the members) exceed the default cap.
    rules.privacy.max_upload_records = u64::MAX;
    rules.limits.max_stream_bytes = u64::MAX;
    rules.limits.calls_per_minute = 1_000_000;
    rules.limits.concurrent_calls_per_principal = 256;
    rules.limits.concurrent_calls_per_connection = 256;
    for contract in rules.contracts.values_mut() {
        contract.max_queries_per_day = None;
        contract.protection.epsilon = 50.0;
        contract.protection.answers_per_period = 10_000;
        contract.protection.max_list_versions = 100;
    }
    rules
}

async fn ingest_all(conn: &Connection, files: &Files, figures: &mut Figures) -> Result<()> {
    let mut admin = conn.admin(sample::ANALYST_TOKEN)?;
    let header = |source: &str| IngestHeader {
        source: source.into(),
        strict: false,
        request_id: cleanroom_client::new_request_id(),
        tokens_only: false,
    };
    let progress = || Arc::new(Progress::default());
    for name in ["members.csv", "purchases.csv", "consent_events.csv"] {
        let path = files.path(name);
        let started = Instant::now();
        let summary = match name {
            "members.csv" => {
                cleanroom_client::ingest_members_file(&mut admin, header(name), &path, progress())
                    .await?
            }
            "purchases.csv" => {
                cleanroom_client::ingest_purchases_file(&mut admin, header(name), &path, progress())
                    .await?
            }
            _ => {
                cleanroom_client::ingest_consent_file(&mut admin, header(name), &path, progress())
                    .await?
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        eprintln!(
            "ingested {name}: {} records in {seconds:.1} s",
            summary.records_accepted
        );
        figures
            .ingest
            .push((name.into(), summary.records_received, seconds));
    }
    for (partner, token) in sample::PARTNERS {
        let path = files.path(&format!("partner_lists/{partner}.csv"));
        let started = Instant::now();
        let header = UploadListHeader {
            strict: false,
            request_id: cleanroom_client::new_request_id(),
        };
        let response = cleanroom_client::upload_list_file(
            &mut conn.partner(token)?,
            header,
            &path,
            progress(),
        )
        .await?;
        let seconds = started.elapsed().as_secs_f64();
        figures.ingest.push((
            format!("list of {partner}"),
            response.records_received,
            seconds,
        ));
    }
    Ok(())
}

/// Windows of whole months for the question, each asked once: every one holds the generated
/// year of purchases whole (they differ in the empty months around it), so every new question
/// reads and answers one year, as the figures compare.
struct Windows {
    next: Vec<(NaiveDate, NaiveDate)>,
}

impl Windows {
    fn new(as_of: NaiveDate) -> Self {
        let data_starts = as_of - Months::new(12);
        let earliest = NaiveDate::from_ymd_opt(2024, 1, 1).expect("a date");
        let latest = NaiveDate::from_ymd_opt(2028, 1, 1).expect("a date");
        let mut next = Vec::new();
        for later in 0..=15 {
            let end = as_of + Months::new(later);
            for earlier in 0..=23 {
                let start = data_starts - Months::new(earlier);
                if start >= earliest && end <= latest {
                    next.push((start, end));
                }
            }
        }
        next.reverse();
        Self { next }
    }

    fn take(&mut self) -> (String, String) {
        let (from, to) = self.next.pop().expect("enough windows for the benchmark");
        (from.to_string(), to.to_string())
    }
}

fn request(window: &(String, String)) -> RunQueryRequest {
    let date = |d: &str| ParamValue {
        kind: Some(param_value::Kind::DateValue(d.into())),
    };
    RunQueryRequest {
        query_id: QUERY.into(),
        params: [
            ("start".to_string(), date(&window.0)),
            ("end".to_string(), date(&window.1)),
        ]
        .into_iter()
        .collect(),
    }
}

/// Asks one question as Sakura Foods and returns the seconds it took at the client.
async fn ask(conn: &Connection, window: &(String, String)) -> Result<f64> {
    let mut client = conn.partner(sample::partner_token("sakura_foods"))?;
    let started = Instant::now();
    client.run_query(request(window)).await?;
    Ok(started.elapsed().as_secs_f64())
}

async fn ask_new_questions(
    conn: &Connection,
    windows: &mut Windows,
    n: usize,
    figures: &mut Figures,
) -> Result<()> {
    let mut times = Vec::new();
    for _ in 0..n {
        let window = windows.take();
        times.push(ask(conn, &window).await?);
        figures.windows.push(window);
    }
    eprintln!("new questions: {times:.3?} s");
    figures.new_first_s = times[0];
    figures.new_median_s = median(&times[1..]);
    Ok(())
}

/// The same join and aggregate, run by DataFusion directly over the retailer's tables as the
/// store holds them, in this process: no audience, no checks, no noise.
async fn raw_datafusion(
    app: &cleanroom_server::App,
    windows: &[(String, String)],
    figures: &mut Figures,
) -> Result<()> {
    let ctx = cleanroom_engine::measurement::raw_session(&app.store.snapshot())?;
    let offset = app.live().rules.retailer.utc_offset_minutes;
    let mut times = Vec::new();
    for (start, end) in windows {
        let params = cleanroom_engine::measurement::window_params(start, end, offset)?;
        let started = Instant::now();
        let batches = ctx
            .sql(RAW_SQL)
            .await?
            .with_param_values(params)?
            .collect()
            .await?;
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        times.push(started.elapsed().as_secs_f64());
        anyhow::ensure!(rows > 0, "the raw query found nothing in {start} .. {end}");
    }
    eprintln!("raw DataFusion: {times:.3?} s");
    figures.raw_first_s = times[0];
    figures.raw_median_s = median(&times[1..]);
    Ok(())
}

async fn repeats(
    conn: &Connection,
    window: &(String, String),
    n: usize,
    figures: &mut Figures,
) -> Result<()> {
    let mut times = Vec::new();
    for _ in 0..n {
        times.push(ask(conn, window).await? * 1000.0);
    }
    figures.repeat_median_ms = median(&times);
    figures.repeat_p99_ms = percentile(&times, 0.99);
    Ok(())
}

/// Member tokens as the service computes them, against a bare HMAC-SHA256 over the same
/// normalized e-mails with a key of the same length, on one core.
fn tokens_against_hmac(figures: &mut Figures) {
    const N: usize = 300_000;
    let emails: Vec<String> = (0..N).map(|i| format!("member.{i}@example.jp")).collect();
    let secret = MasterSecret::new(vec![7; 32]).expect("a 32-byte secret");
    let key = secret.collaboration_key("bench", 1, &[9; 32]);
    // The baseline is the fastest bare loop: the key's blocks hashed once, its state cloned.
    use hmac::{KeyInit, Mac};
    let keyed = hmac::Hmac::<sha2::Sha256>::new_from_slice(&[7u8; 32]).expect("a 32-byte key");
    let mut sink = 0u8;
    let mut normalized = String::new();
    // Each loop takes a few tens of milliseconds, so one stray pause would decide the ratio:
    // the two alternate, and each keeps its best of several rounds.
    for _ in 0..TOKEN_ROUNDS {
        let started = Instant::now();
        for email in &emails {
            // As the members ingest does: one buffer for every address.
            cleanroom_core::normalize::email_into(email, &mut normalized).expect("a valid e-mail");
            sink ^= key.token(&normalized).mac[0];
        }
        let rate = N as f64 / started.elapsed().as_secs_f64();
        figures.tokens_per_s = figures.tokens_per_s.max(rate);
        let started = Instant::now();
        for email in &emails {
            let mut mac = keyed.clone();
            mac.update(email.as_bytes());
            sink ^= mac.finalize().into_bytes()[0];
        }
        let rate = N as f64 / started.elapsed().as_secs_f64();
        figures.hmac_per_s = figures.hmac_per_s.max(rate);
    }
    std::hint::black_box(sink);
}

/// How many times each of the token loops runs, its best round kept.
const TOKEN_ROUNDS: usize = 5;

#[derive(Clone, Copy)]
enum Load {
    /// Every client asks the one question already answered, again and again.
    Repeats,
    /// Each request is a question not asked before.
    Distinct,
}

/// `requests` calls from `clients` concurrent clients; repeats are four times as many.
async fn load(
    conn: &Connection,
    clients: usize,
    requests: usize,
    kind: Load,
    windows: &mut Windows,
    first: &(String, String),
) -> Result<LoadLevel> {
    let requests = match kind {
        Load::Repeats => requests * 4,
        Load::Distinct => requests,
    };
    let asked: Vec<(String, String)> = match kind {
        Load::Repeats => vec![first.clone(); requests],
        Load::Distinct => (0..requests).map(|_| windows.take()).collect(),
    };
    reset_peak_rss();
    let queue = Arc::new(std::sync::Mutex::new(asked));
    let started = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (queue, conn) = (Arc::clone(&queue), conn.clone());
            tokio::spawn(async move {
                let mut times = Vec::new();
                let mut errors = 0;
                loop {
                    let next = queue.lock().expect("queue lock").pop();
                    let Some(window) = next else { break };
                    match tokio::time::timeout(Duration::from_secs(600), ask(&conn, &window)).await
                    {
                        Ok(Ok(seconds)) => times.push(seconds * 1000.0),
                        Ok(Err(e)) => {
                            errors += 1;
                            eprintln!("load: a question failed: {e}");
                        }
                        Err(_) => {
                            errors += 1;
                            eprintln!("load: a question took longer than 600 s");
                        }
                    }
                }
                (times, errors)
            })
        })
        .collect();
    let mut times = Vec::new();
    let mut errors = 0;
    for worker in workers {
        let (t, e) = worker.await?;
        times.extend(t);
        errors += e;
    }
    let total = started.elapsed().as_secs_f64();
    let level = LoadLevel {
        kind: match kind {
            Load::Repeats => "repeats",
            Load::Distinct => "distinct",
        },
        clients,
        requests,
        errors,
        p50_ms: percentile(&times, 0.5),
        p99_ms: percentile(&times, 0.99),
        total_s: total,
        answers_per_s: times.len() as f64 / total,
        peak_rss_mb: rss_mb("VmHWM"),
    };
    eprintln!("{level:?}");
    Ok(level)
}

fn median(values: &[f64]) -> f64 {
    percentile(values, 0.5)
}

fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank]
}

/// A line of `/proc/self/status` in MB (VmRSS: now; VmHWM: the peak since the last reset).
fn rss_mb(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| {
            let value = l.strip_prefix(field)?.strip_prefix(':')?;
            value.trim().strip_suffix("kB")?.trim().parse::<f64>().ok()
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Resets the peak resident set (Linux: `5` to clear_refs), so each load level reports its own.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn render(opts: &BenchOptions, f: &Figures) -> String {
    let mut out = String::new();
    render_header(&mut out, opts, f);
    render_ingest(&mut out, f);
    render_new_question(&mut out, f);
    render_repeat_and_tokens(&mut out, f);
    render_load(&mut out, f);
    out
}

/// Appends `text` and a newline.
fn line(out: &mut String, text: String) {
    out.push_str(&text);
    out.push('\n');
}

fn render_header(out: &mut String, opts: &BenchOptions, f: &Figures) {
    line(
        out,
        format!(
            "## cleanroom bench --members {} (seed {}): {} members, {} purchases, {} consent events\n",
            opts.members, opts.seed, f.members, f.purchases, f.consent_events
        ),
    );
}

fn render_ingest(out: &mut String, f: &Figures) {
    line(
        out,
        "| ingest (through the CLI's streaming client) | records | seconds | records/s |".into(),
    );
    line(out, "|---|---|---|---|".into());
    for (what, records, seconds) in &f.ingest {
        line(
            out,
            format!(
                "| {what} | {records} | {seconds:.1} | {:.0} |",
                *records as f64 / seconds
            ),
        );
    }
    line(
        out,
        format!(
            "\nresident memory after ingest: {:.0} MB (query memory pool: {} MB)\n",
            f.rss_after_ingest_mb, f.query_memory_mb
        ),
    );
}

fn render_new_question(out: &mut String, f: &Figures) {
    line(
        out,
        "| a new question (one year) | first | median | ratio to raw DataFusion (median) |".into(),
    );
    line(out, "|---|---|---|---|".into());
    line(
        out,
        format!(
            "| the clean room (gRPC, client side) | {:.3} s | {:.3} s | {:.2}× |",
            f.new_first_s,
            f.new_median_s,
            f.new_median_s / f.raw_median_s
        ),
    );
    line(
        out,
        format!(
            "| raw DataFusion, same process, same tables, no privacy | {:.3} s | {:.3} s | 1.00× |",
            f.raw_first_s, f.raw_median_s
        ),
    );
}

fn render_repeat_and_tokens(out: &mut String, f: &Figures) {
    line(
        out,
        format!(
            "\nan identical repeat: median {:.2} ms, p99 {:.2} ms (one client)\n",
            f.repeat_median_ms, f.repeat_p99_ms
        ),
    );
    line(
        out,
        format!(
            "member tokens: {:.0}/s against a bare HMAC-SHA256 loop's {:.0}/s on one core ({:.0} %)\n",
            f.tokens_per_s,
            f.hmac_per_s,
            100.0 * f.tokens_per_s / f.hmac_per_s
        ),
    );
    line(
        out,
        format!(
            "a collaboration's token file ({} rows, written and synced): sealed {:.0} rows/s \
             against plain Parquet's {:.0} rows/s ({:.2}× the time)\n",
            f.sealing.rows,
            f.sealing.sealed_rows_per_s,
            f.sealing.plain_rows_per_s,
            f.sealing.plain_rows_per_s / f.sealing.sealed_rows_per_s
        ),
    );
}

fn render_load(out: &mut String, f: &Figures) {
    line(out, "| load | clients | requests | errors | p50 | p99 | total | answers/s | peak RSS (× after ingest) |".into());
    line(out, "|---|---|---|---|---|---|---|---|---|".into());
    for l in &f.load {
        line(
            out,
            format!(
                "| {} | {} | {} | {} | {:.1} ms | {:.1} ms | {:.1} s | {:.1} | {:.0} MB ({:.1}×) |",
                l.kind,
                l.clients,
                l.requests,
                l.errors,
                l.p50_ms,
                l.p99_ms,
                l.total_s,
                l.answers_per_s,
                l.peak_rss_mb,
                l.peak_rss_mb / f.rss_after_ingest_mb
            ),
        );
    }
}
