//! `cleanroom utility`: how much of the true answer survives each of the guard's defences. A
//! benchmark report, not a test: it generates a larger fictional dataset, serves it under several
//! protection settings, runs every allowed query of every partner through the real gRPC API, and
//! compares each released row with the true, unprotected value of that row (computed directly
//! over the same safe views, for measurement only: nothing of it is released).
//!
//! Reported per setting, partner and query: rows of the domain with at least k true members,
//! rows released, and the median and 90th-percentile relative error of released values, per
//! metric. Utility depends on the data, not on the build, so a debug build gives the same report.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use chrono::{DateTime, NaiveDate, Utc};
use cleanroom_client::{Connection, sample};
use cleanroom_core::allowlist::{AllowList, BoundValue, QueryDef};
use cleanroom_core::consent::Requirement;
use cleanroom_core::rules::Rules;
use cleanroom_core::token::MasterSecret;
use cleanroom_engine::arrow::array::{Array, AsArray};
use cleanroom_engine::arrow::compute::cast;
use cleanroom_engine::arrow::datatypes::{DataType, Int64Type};
use cleanroom_engine::guard;
use cleanroom_engine::store::Store;
use cleanroom_engine::views::SafeViews;
use cleanroom_proto::v1::{DescribeQueryRequest, ListQueriesRequest, RunQueryRequest, value::Kind};

/// One protection setting to measure.
struct Setting {
    name: &'static str,
    apply: fn(&mut Rules),
}

const SETTINGS: &[Setting] = &[
    Setting {
        name: "sample contracts (Sakura ε=8, Kumo ε=4 per 30 days, 20 answers, δ=1e-6)",
        apply: |_| {},
    },
    Setting {
        name: "half the answers per period (each answer twice the budget)",
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
    for setting in SETTINGS {
        eprintln!("measuring: {}", setting.name);
        let mut rules = Rules::load(rules_path)?;
        (setting.apply)(&mut rules);
        rules.validate()?;
        measured.extend(measure(setting.name, rules, queries_dir, data.path(), now).await?);
    }
    Ok(render(members, seed, &measured))
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
    let app = cleanroom_server::App::new(cleanroom_server::AppConfig {
        data_dir: state.path().to_path_buf(),
        rules: rules.clone(),
        allowlist: allowlist.clone(),
        secret: MasterSecret::new(b"utility report secret, not for production".to_vec())?,
        clock: Arc::new(cleanroom_server::FixedClock(now)),
        sources: None,
    })?;
    let server = cleanroom_server::spawn(app, SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let conn = Connection::open(&format!("http://{}", server.addr)).await?;
    sample::approve_all(&conn).await?;
    sample::load(&conn, sample_dir).await?;
    let store = Store::open(state.path())?;
    let snapshot = store.snapshot();
    let mut out = Vec::new();
    for (partner, token) in sample::PARTNERS {
        let mut client = conn.partner(token)?;
        let (contract_id, contract) = rules.contract_of(partner).context("a contract")?;
        let purpose = &rules.purposes[&contract.purpose];
        let requirement = Requirement {
            min_notice_version: purpose.min_notice_version,
            grant_valid_days: purpose.grant_valid_days,
        };
        let views = SafeViews::build(&snapshot, contract_id, contract, &requirement, now)?;
        let queries = client
            .list_queries(ListQueriesRequest {})
            .await?
            .into_inner()
            .queries;
        for summary in queries {
            let query = allowlist.get(&summary.id).context("a listed query")?;
            let description = client
                .describe_query(DescribeQueryRequest {
                    query_id: summary.id.clone(),
                })
                .await?
                .into_inner();
            let params = crate::demo::demo_params(&description);
            let answer = client
                .run_query(RunQueryRequest {
                    query_id: summary.id.clone(),
                    params: params.clone(),
                })
                .await
                .with_context(|| format!("{setting}: {partner} {}", summary.id))?
                .into_inner();
            let truth = true_cells(&views, query, &answer.effective_params, &rules).await?;
            let dims = query.dimensions.len();
            let k = answer.effective_k;
            let mut errors: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            for row in &answer.rows {
                let key: Vec<String> = row.values[..dims].iter().map(text).collect();
                let Some((_, values)) = truth.get(&key) else {
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
            out.push(Measured {
                setting,
                partner: partner.to_string(),
                query: summary.id,
                k,
                cells_at_k: truth.values().filter(|(n, _)| *n >= i64::from(k)).count(),
                released: answer.rows.len(),
                errors,
            });
        }
    }
    server.stop().await?;
    Ok(out)
}

fn text(v: &cleanroom_proto::v1::Value) -> String {
    match &v.kind {
        Some(Kind::StringValue(s)) => s.clone(),
        Some(Kind::IntValue(i)) => i.to_string(),
        Some(Kind::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

/// The true answer of a query over the safe views, with no protection at all: for measurement
/// only. Returns, per row, its members (the value of the query's first metric that counts
/// distinct members, which every metric without a per-member bound must be) and its values.
async fn true_cells(
    views: &SafeViews,
    query: &QueryDef,
    effective: &BTreeMap<String, String>,
    rules: &Rules,
) -> Result<HashMap<Vec<String>, (i64, Vec<i64>)>> {
    use cleanroom_core::allowlist::ParamKind;
    use cleanroom_engine::datafusion::common::{ParamValues, ScalarValue};
    let ctx = views.session()?;
    let params: HashMap<String, ScalarValue> = query
        .params
        .iter()
        .filter_map(|p| {
            let text = effective.get(&p.name)?;
            let value = match p.kind {
                ParamKind::Date => {
                    BoundValue::Date(NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?)
                }
                ParamKind::Int => BoundValue::Int(text.parse().ok()?),
                ParamKind::Enum => BoundValue::Str(text.clone()),
            };
            Some((
                p.name.clone(),
                guard::bind_value(&value, rules.retailer.utc_offset_minutes),
            ))
        })
        .collect();
    let batches = ctx
        .sql(&query.sql)
        .await?
        .with_param_values(ParamValues::from(params))?
        .collect()
        .await?;
    let members_metric = query
        .metrics
        .iter()
        .position(|m| !query.metric_bounds.contains_key(m));
    let dims = query.dimensions.len();
    let mut cells = HashMap::new();
    for batch in batches {
        let columns = (0..batch.num_columns())
            .map(|i| {
                cast(
                    batch.column(i),
                    if i < dims {
                        &DataType::Utf8
                    } else {
                        &DataType::Int64
                    },
                )
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        for row in 0..batch.num_rows() {
            let key: Vec<String> = columns[..dims]
                .iter()
                .map(|c| c.as_string::<i32>().value(row).to_string())
                .collect();
            let values: Vec<i64> = columns[dims..]
                .iter()
                .map(|c| {
                    let c = c.as_primitive::<Int64Type>();
                    if c.is_valid(row) { c.value(row) } else { 0 }
                })
                .collect();
            let members = members_metric.map_or(i64::MAX, |i| values[i]);
            cells.insert(key, (members, values));
        }
    }
    Ok(cells)
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

fn render(members: usize, seed: u64, measured: &[Measured]) -> String {
    let mut out = format!(
        "# Utility report\n\n{members} generated members (seed {seed}); every allowed query of both \
         partners over the last twelve months. \"rows ≥ k\": rows of the output domain with at \
         least k true members; \"released\": rows the partner received; errors are relative to \
         the true, unprotected value (median / 90th percentile).\n\n\
         | setting | partner | query | k | rows ≥ k | released | relative error per metric |\n\
         |---|---|---|---|---|---|---|\n"
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
