//! `cleanroom utility`: how much of the true answer survives each of the guard's defences. A
//! benchmark report, not a test: it generates a larger fictional dataset, serves it under several
//! protection settings, runs every allowed query of every partner through the real gRPC API, and
//! compares each released row with the true, unprotected value of that row (computed directly
//! over the same safe views, for measurement only: nothing of it is released).
//!
//! Reported per setting, partner and query: rows of the domain with at least k true members,
//! rows released, and the median and 90th-percentile relative error of released values, per
//! metric. Utility depends on the data, not on the build, so a debug build gives the same report.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use chrono::{DateTime, NaiveDate, Utc};
use cleanroom_client::{Connection, PartnerClient, sample};
use cleanroom_core::allowlist::{AllowList, QueryDef};
use cleanroom_core::rules::Rules;
use cleanroom_core::token::MasterSecret;
use cleanroom_engine::measurement::{ExactCells, exact_answer};
use cleanroom_engine::store::{Snapshot, Store};
use cleanroom_proto::v1::{
    DescribeQueryRequest, ListQueriesRequest, RunQueryRequest, RunQueryResponse, value::Kind,
};

/// One protection setting to measure.
struct Setting {
    name: &'static str,
    apply: fn(&mut Rules),
}

const SETTINGS: &[Setting] = &[
    Setting {
        name: "the contracts as configured",
        apply: |_| {},
    },
    Setting {
        name: "half the answers per period (each answer twice the ρ)",
        apply: |rules| {
            for c in rules.contracts.values_mut() {
                c.protection.answers_per_period = (c.protection.answers_per_period / 2).max(1);
            }
        },
    },
];

/// One measured answer.
struct Measured {
    setting: &'static str,
    partner: String,
    query: String,
    k: u32,
    cells_at_k: usize,
    released: usize,
    /// Per metric: relative errors of released values.
    errors: BTreeMap<String, Vec<f64>>,
}

/// Runs the report on `members` generated members and returns it as Markdown.
pub async fn run(
    members: usize,
    seed: u64,
    queries_dir: &Path,
    rules_path: &Path,
) -> Result<String> {
    let as_of = NaiveDate::from_ymd_opt(2026, 11, 1).expect("a date");
    let data = tempfile::tempdir()?;
    let report = crate::r#gen::generate(&crate::r#gen::GenOptions {
        seed,
        members,
        as_of,
        out_dir: data.path().to_path_buf(),
    })?;
    eprintln!(
        "generated {} members, {} purchases, {} consent events",
        report.members, report.purchases, report.consent_events
    );
    let now: DateTime<Utc> = DateTime::parse_from_rfc3339(sample::AS_OF)?.into();
    let mut measured = Vec::new();
    let mut terms = Vec::new();
    for setting in SETTINGS {
        eprintln!("measuring: {}", setting.name);
        let mut rules = Rules::load(rules_path)?;
        (setting.apply)(&mut rules);
        rules.validate()?;
        terms.push((setting.name, contract_terms(&rules)));
        measured.extend(measure(setting.name, rules, queries_dir, data.path(), now).await?);
    }
    Ok(render(members, seed, &terms, &measured))
}

async fn measure(
    setting: &'static str,
    rules: Rules,
    queries_dir: &Path,
    sample_dir: &Path,
    now: DateTime<Utc>,
) -> Result<Vec<Measured>> {
    let allowlist = AllowList::load(queries_dir, &rules)?;
    let state = tempfile::tempdir()?;
    let app = cleanroom_server::App::new(app_config(&rules, &allowlist, state.path(), now)?)?;
    // The lists are sealed with their collaborations' keys: read them with the app's key store.
    let keys: Arc<dyn cleanroom_engine::store::DataKeys> = app.keys.clone();
    let server = cleanroom_server::spawn(app, SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let conn = Connection::open(&format!("http://{}", server.addr)).await?;
    sample::approve_all(&conn).await?;
    sample::load(&conn, sample_dir).await?;
    let store = Store::open_with_keys(&state.path().join("data"), keys)?;
    let snapshot = store.snapshot();
    let run = Run {
        setting,
        rules: &rules,
        allowlist: &allowlist,
        snapshot: &snapshot,
        now,
    };
    let mut out = Vec::new();
    for (partner, token) in sample::PARTNERS {
        let mut client = conn.partner(token)?;
        out.extend(measure_partner(&run, partner, &mut client).await?);
    }
    server.stop().await?;
    Ok(out)
}

/// What every answer of one setting is measured against.
struct Run<'a> {
    setting: &'static str,
    rules: &'a Rules,
    allowlist: &'a AllowList,
    snapshot: &'a Snapshot,
    now: DateTime<Utc>,
}

/// The server's configuration for one setting, its state under `state`.
fn app_config(
    rules: &Rules,
    allowlist: &AllowList,
    state: &Path,
    now: DateTime<Utc>,
) -> Result<cleanroom_server::AppConfig> {
    Ok(cleanroom_server::AppConfig {
        data_dir: state.join("data"),
        rules: rules.clone(),
        allowlist: allowlist.clone(),
        secret: MasterSecret::new(b"utility report secret, not for production".to_vec())?,
        clock: Arc::new(cleanroom_server::FixedClock(now)),
        sources: None,
        allow_demo_tokens: true,
        mark: state.join("high-water-mark.json"),
        accept_restore: false,
        engine: cleanroom_engine::executor::ExecutorConfig::with_defaults(state.join("data/spill")),
        keys: state.join("keys"),
    })
}

/// Runs every query `partner` may ask and measures each answer.
async fn measure_partner(
    run: &Run<'_>,
    partner: &str,
    client: &mut PartnerClient,
) -> Result<Vec<Measured>> {
    let queries = client
        .list_queries(ListQueriesRequest {})
        .await?
        .into_inner()
        .queries;
    let mut out = Vec::new();
    for summary in queries {
        out.push(measure_query(run, partner, client, summary.id).await?);
    }
    Ok(out)
}

/// Asks one query with demo parameters and compares its answer with the true cells.
async fn measure_query(
    run: &Run<'_>,
    partner: &str,
    client: &mut PartnerClient,
    query_id: String,
) -> Result<Measured> {
    let query = run.allowlist.get(&query_id).context("a listed query")?;
    let description = client
        .describe_query(DescribeQueryRequest {
            query_id: query_id.clone(),
        })
        .await?
        .into_inner();
    let params = crate::demo::demo_params(&description);
    let answer = client
        .run_query(RunQueryRequest {
            query_id: query_id.clone(),
            params: params.clone(),
        })
        .await
        .with_context(|| format!("{}: {partner} {}", run.setting, query_id))?
        .into_inner();
    let truth = exact_answer(
        run.snapshot,
        run.rules,
        partner,
        query,
        &answer.effective_params,
        run.now,
    )
    .await?;
    let errors = relative_errors(query, &answer, &truth);
    Ok(Measured {
        setting: run.setting,
        partner: partner.to_string(),
        query: query_id,
        k: answer.effective_k,
        cells_at_k: cells_at_k(query, &truth, answer.effective_k),
        released: answer.rows.len(),
        errors,
    })
}

/// True cells with at least `k` members.
fn cells_at_k(query: &QueryDef, truth: &ExactCells, k: u32) -> usize {
    // A row's members: its first metric that counts distinct members (every metric
    // without a per-member bound does).
    let members_metric = query
        .metrics
        .iter()
        .position(|m| !query.metric_bounds.contains_key(m));
    let members = |values: &Vec<i64>| members_metric.map_or(i64::MAX, |i| values[i]);
    truth
        .values()
        .filter(|v| members(v) >= i64::from(k))
        .count()
}

/// Per metric: the relative error of each released value whose row is in `truth` and whose true
/// value is not zero.
fn relative_errors(
    query: &QueryDef,
    answer: &RunQueryResponse,
    truth: &ExactCells,
) -> BTreeMap<String, Vec<f64>> {
    let dims = query.dimensions.len();
    let mut errors: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for row in &answer.rows {
        let key: Vec<String> = row.values[..dims].iter().map(text).collect();
        let Some(values) = truth.get(&key) else {
            continue;
        };
        for (i, metric) in query.metrics.iter().enumerate() {
            let released = match row.values[dims + i].kind {
                Some(Kind::IntValue(v)) => v as f64,
                Some(Kind::DoubleValue(v)) => v,
                _ => continue,
            };
            let true_value = values[i] as f64;
            if true_value != 0.0 {
                errors
                    .entry(metric.clone())
                    .or_default()
                    .push(((released - true_value) / true_value).abs());
            }
        }
    }
    errors
}

fn text(v: &cleanroom_proto::v1::Value) -> String {
    match &v.kind {
        Some(Kind::StringValue(s)) => s.clone(),
        Some(Kind::IntValue(i)) => i.to_string(),
        Some(Kind::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

/// Median and 90th percentile.
fn quantiles(values: &mut [f64]) -> (f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.9))
}

/// Each contract's guarantee, as a line of the report.
fn contract_terms(rules: &Rules) -> String {
    rules
        .contracts
        .values()
        .map(|c| {
            let p = &c.protection;
            format!(
                "{}: (ε = {}, δ = {:e}) per {} days over {} answers",
                c.partner, p.epsilon, p.delta, p.period_days, p.answers_per_period
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn render(members: usize, seed: u64, terms: &[(&str, String)], measured: &[Measured]) -> String {
    let mut out = format!(
        "# Utility report\n\n{members} generated members (seed {seed}); every allowed query of both \
         partners over the last twelve months. \"rows ≥ k\": rows of the output domain with at \
         least k true members; \"released\": rows the partner received; errors are relative to \
         the true, unprotected value (median / 90th percentile).\n\n"
    );
    for (name, terms) in terms {
        let rows = measured.iter().filter(|m| m.setting == *name);
        let (at_k, released) = rows.fold((0, 0), |(a, r), m| (a + m.cells_at_k, r + m.released));
        out.push_str(&format!(
            "- {name}: {terms}. Rows released: {released} of {at_k} with ≥ k true members \
             ({:.0} %).\n",
            100.0 * released as f64 / at_k.max(1) as f64
        ));
    }
    out.push_str(
        "\n| setting | partner | query | k | rows ≥ k | released | relative error per metric |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for m in measured {
        let errors: Vec<String> = m
            .errors
            .iter()
            .map(|(metric, e)| {
                let mut e = e.clone();
                let (median, p90) = quantiles(&mut e);
                format!("{metric} {:.1}% / {:.1}%", 100.0 * median, 100.0 * p90)
            })
            .collect();
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            m.setting,
            m.partner,
            m.query,
            m.k,
            m.cells_at_k,
            m.released,
            if errors.is_empty() {
                "-".to_string()
            } else {
                errors.join("; ")
            }
        ));
    }
    out
}
