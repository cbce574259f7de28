//! The guard: the one place where the clean room's privacy rules are enforced. Query templates
//! cannot switch any of it off: it works on the DataFusion `LogicalPlan` of every query and on the
//! partner's history, whatever the template says.
//!
//! [`Guard::run`] is the only function that releases query results. In order, it:
//! 1. snaps the parameters to the query's declared granularity and minimum window
//!    ([`params`], THREATS 3);
//! 2. picks the partner's effective list (a list that changed by fewer than `min_list_change`
//!    matched members answers as the earlier one) and refuses an audience below the contract's
//!    noisy minimum ([`lists`], THREATS 1 and 2);
//! 3. takes one answer from the partner's daily budget ([`budget`], THREATS 7);
//! 4. plans the SQL against a session holding only the safe views and checks the plan
//!    ([`plan`], THREATS 8);
//! 5. computes every output value member by member, clamping each member's contribution to the
//!    query's declared bounds (and, under DP, to a number of rows per member);
//! 6. releases under the contract's mode:
//!    - `noise`: hard k, a noisy threshold above k, the difference check and frozen rows over the
//!      partner's history ([`history`], THREATS 2, 3, 6), sticky noise on every value (THREATS 5),
//!      and complementary suppression within the response and across its repeats (THREATS 4);
//!    - `dp`: (ε, δ)-differential privacy with the member as the unit: exact discrete Laplace
//!      noise ([`noise`]), a noisy threshold that lets a row below k through with probability at
//!      most δ, and ε charged to the partner's budget (repeats of an answer already paid are free).
//!
//! Withheld rows are reported only as a count over the full output domain, and every decision
//! about a row below k is the same whether it had no member or k − 1, so a suppressed row never
//! tells 0 from a few (THREATS 11).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use cleanroom_core::allowlist::{BoundValue, QueryDef};
use cleanroom_core::consent::Requirement;
use cleanroom_core::rules::{Contract, Protection, Rules};
use cleanroom_core::token::MasterSecret;
use datafusion::arrow::array::{Array, ArrayRef, AsArray, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema};
use datafusion::common::{ParamValues, ScalarValue};
use datafusion::prelude::SessionContext;
use sha2::{Digest, Sha256};

use crate::store::{Snapshot, Store};
use crate::views::{self, SafeViews};
use crate::{Error, Result};

pub mod budget;
pub mod fingerprint;
mod history;
mod lists;
pub mod noise;
pub mod params;
mod plan;

pub use budget::{Budgets, Charge, EpsilonLedger};
use fingerprint::Fingerprint;
use history::{History, Verdict};
use lists::Lists;
use noise::Scale;

/// The largest output domain (product of the dimensions' domain sizes) the guard will enumerate.
const MAX_DOMAIN_CELLS: usize = 1_000_000;

/// What the guard enforces for one query run.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Minimum distinct members behind every released row.
    pub k: u32,
    /// Output dimensions, in order, each with every value it may take.
    pub dimensions: Vec<(String, Vec<String>)>,
    /// Output metric columns, in order after the dimensions.
    pub metrics: Vec<String>,
    /// The most one member may add to each metric in one row (metrics that count distinct
    /// members need none).
    pub metric_bounds: BTreeMap<String, u64>,
    /// Column names no query may touch.
    pub sensitive_columns: BTreeSet<String>,
}

impl Policy {
    /// The policy of one allow-listed query run by one partner under its contract: the effective
    /// k, the dimensions' domains as that partner sees them, and the rules' sensitive columns.
    pub fn for_query(rules: &Rules, query: &QueryDef, contract: &Contract, partner: &str) -> Self {
        Self {
            k: rules.effective_k(contract, query.k),
            dimensions: query
                .dimensions
                .iter()
                .map(|d| {
                    (
                        d.name.clone(),
                        rules.domain(&d.domain, partner).unwrap_or_default(),
                    )
                })
                .collect(),
            metrics: query.metrics.clone(),
            metric_bounds: query.metric_bounds.clone(),
            sensitive_columns: rules.sensitive_column_names(),
        }
    }

    fn output_columns(&self) -> Vec<String> {
        self.dimensions
            .iter()
            .map(|(name, _)| name.clone())
            .chain(self.metrics.iter().cloned())
            .collect()
    }
}

/// An earlier call, as the audit trail remembers it: the guard rebuilds its budgets and list
/// allowances from these, so a restart refills nothing.
#[derive(Debug, Clone)]
pub struct PastCall {
    /// The partner concerned.
    pub partner: String,
    /// The RPC method.
    pub method: String,
    /// When.
    pub at: DateTime<Utc>,
    /// Whether it succeeded.
    pub ok: bool,
    /// Its details (ε spent, answer key).
    pub details: BTreeMap<String, String>,
}

/// A query to answer.
pub struct QueryRequest<'a> {
    /// The rules in force.
    pub rules: &'a Rules,
    /// The allow-listed query.
    pub query: &'a QueryDef,
    /// The partner asking.
    pub partner: &'a str,
    /// Its contract's id.
    pub contract_id: &'a str,
    /// Typed parameters, not yet snapped.
    pub params: &'a BTreeMap<String, BoundValue>,
    /// The data.
    pub snapshot: &'a Snapshot,
    /// Where earlier list versions are kept.
    pub store: &'a Store,
    /// Now.
    pub now: DateTime<Utc>,
}

/// How an answer was protected, for the partner.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProtectionReport {
    /// `noise`, `dp` or `none`.
    pub mode: String,
    /// Per metric: the scale of the discrete Laplace noise on each released value.
    pub noise_scale: BTreeMap<String, f64>,
    /// Per metric: the most one member may add to one row.
    pub per_member_bound: BTreeMap<String, u64>,
    /// A row's noisy member count must reach this to be released.
    pub release_threshold: f64,
    /// ε spent by this answer (DP).
    pub epsilon_spent: f64,
    /// ε left in the period (DP).
    pub epsilon_remaining: f64,
    /// δ (DP).
    pub delta: f64,
    /// When the oldest ε spending leaves the period (DP).
    pub budget_resets_at: Option<DateTime<Utc>>,
    /// The most rows one member is counted in (DP).
    pub max_groups_per_member: u32,
}

/// The released part of a query's answer.
#[derive(Debug)]
pub struct Answer {
    /// Released rows, in domain order, with the declared output columns only.
    pub batch: RecordBatch,
    /// The parameters after snapping.
    pub params: BTreeMap<String, BoundValue>,
    /// Cells of the output domain not released, for whatever reason.
    pub suppressed_rows: u64,
    /// The consent state the answer reflects.
    pub consent_snapshot_id: String,
    /// The partner's latest list version (the version actually used is in the audit details).
    pub list_version: u32,
    /// How the answer was protected.
    pub protection: ProtectionReport,
    /// Facts for the retailer's audit trail only; they must not reach the partner.
    pub audit: BTreeMap<String, String>,
}

/// A new version of a partner's list, to be admitted and stored.
pub struct ListUpload<'a> {
    /// The partner.
    pub partner: &'a str,
    /// Its contract's id.
    pub contract_id: &'a str,
    /// Its contract.
    pub contract: &'a Contract,
    /// The hashed list (`ingest::tokens_schema` rows).
    pub tokens: RecordBatch,
    /// The data, to match the list against.
    pub snapshot: &'a Snapshot,
    /// Where lists are kept.
    pub store: &'a Store,
    /// Now.
    pub now: DateTime<Utc>,
}

/// The guard and the state its defences keep.
pub struct Guard {
    noise_key: [u8; 32],
    fingerprint_key: [u8; 32],
    answers: Budgets,
    epsilon: EpsilonLedger,
    history: History,
    lists: Mutex<Lists>,
}

/// Turns a checked parameter into the literal bound to its placeholder. Dates mean local midnight
/// at the retailer's UTC offset.
pub fn bind_value(value: &BoundValue, utc_offset_minutes: i32) -> ScalarValue {
    match value {
        BoundValue::Date(date) => {
            let micros = local_midnight_micros(*date, utc_offset_minutes);
            ScalarValue::TimestampMicrosecond(Some(micros), Some("UTC".into()))
        }
        BoundValue::Int(i) => ScalarValue::Int64(Some(*i)),
        BoundValue::Str(s) => ScalarValue::Utf8(Some(s.clone())),
    }
}

fn local_midnight_micros(date: NaiveDate, utc_offset_minutes: i32) -> i64 {
    let midnight = date.and_time(NaiveTime::MIN).and_utc().timestamp_micros();
    midnight - i64::from(utc_offset_minutes) * 60_000_000
}

/// Plans and checks a query without running it, as `queries lint` and the server's start-up do.
pub async fn check(ctx: &SessionContext, sql: &str, policy: &Policy) -> Result<()> {
    let plan = plan::plan_sql(ctx, sql).await?;
    plan::check_plan(&plan, policy).map(|_| ())
}

/// A decimal scale as an exact fraction (thousandths), or `None` for zero.
fn scale_of(value: f64) -> Option<Scale> {
    let millis = (value * 1000.0).round();
    if !(1.0..1e15).contains(&millis) {
        return None;
    }
    Scale::new(millis as u64, 1000)
}

/// A sticky draw of discrete Laplace noise: the same key and parts give the same draw.
fn sticky(key: &[u8], parts: &[&[u8]], scale: Option<Scale>) -> i64 {
    match scale {
        Some(scale) => noise::discrete_laplace(&mut noise::seeded_rng(key, parts), scale),
        None => 0,
    }
}

/// A digest of a member set (sorted keys), to seed noise that changes when the set changes.
fn member_digest<'a>(members: impl IntoIterator<Item = &'a i64>) -> [u8; 32] {
    let mut sorted: Vec<i64> = members.into_iter().copied().collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut hasher = Sha256::new();
    for m in sorted {
        hasher.update(m.to_le_bytes());
    }
    hasher.finalize().into()
}

/// Canonical text of snapped parameters: equal questions have equal keys.
fn params_key(params: &BTreeMap<String, BoundValue>) -> String {
    params
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(";")
}

/// Which cells of the domain are released, their values, and how they were protected.
type Release = (Vec<bool>, Vec<Option<Vec<i64>>>, ProtectionReport);

/// The output of the per-member plan folded into cells of the output domain.
struct Cells {
    /// Domain size of each dimension.
    sizes: Vec<usize>,
    /// Cells with at least one member: their members and summed, clamped metric values.
    cells: HashMap<usize, CellData>,
    /// Result rows whose dimension values fall outside the declared domain (dropped).
    out_of_domain_rows: u64,
}

#[derive(Default)]
struct CellData {
    members: Vec<i64>,
    values: Vec<i64>,
}

impl Cells {
    fn count(&self) -> usize {
        self.sizes.iter().product()
    }

    fn size(&self, cell: usize) -> usize {
        self.cells.get(&cell).map_or(0, |c| c.members.len())
    }
}

impl Guard {
    /// Opens the guard's state in `data_dir/guard`, with keys derived from the master secret and
    /// budgets rebuilt from earlier calls.
    pub fn open(data_dir: &Path, secret: &MasterSecret, past: &[PastCall]) -> Result<Self> {
        let dir = data_dir.join("guard");
        let ok = |methods: &'static [&'static str]| {
            past.iter()
                .filter(move |c| c.ok && methods.contains(&c.method.as_str()))
        };
        let answers = Budgets::from_history(ok(&["RunQuery"]).map(|c| (c.partner.clone(), c.at)));
        let epsilon = EpsilonLedger::from_history(ok(&["RunQuery"]).filter_map(|c| {
            let spent: f64 = c.details.get("epsilon_spent")?.parse().ok()?;
            let key = c.details.get("answer_key")?.clone();
            (spent > 0.0).then(|| (c.partner.clone(), c.at, spent, key))
        }));
        let history = History::open(dir.clone())?;
        let lists = Lists::open(
            dir.join("lists.jsonl"),
            ok(&["UploadList", "IngestPartnerList"]).map(|c| (c.partner.clone(), c.at)),
        )?;
        Ok(Self {
            noise_key: secret.guard_key("noise"),
            fingerprint_key: secret.guard_key("fingerprint"),
            answers,
            epsilon,
            history,
            lists: Mutex::new(lists),
        })
    }

    /// Admits and stores a new version of a partner's list: within the upload allowance, and
    /// changed enough from every earlier version. Decides which version queries answer it as.
    /// Returns the new version number.
    pub fn store_list(&self, upload: ListUpload<'_>) -> Result<u32> {
        let protection = &upload.contract.protection;
        let mut lists = self.lists.lock().expect("list ledger lock poisoned");
        lists.check_allowance(
            upload.partner,
            protection.max_list_versions,
            protection.list_window_days,
            upload.now,
        )?;
        let earlier = upload.store.list_versions(upload.partner)?;
        let new_tokens = lists::tokens(&upload.tokens);
        let min_change = protection.min_list_change as usize;
        for (i, old) in earlier.iter().enumerate() {
            let changed = lists::symmetric_difference(&new_tokens, &lists::tokens(old));
            if changed > 0 && changed < min_change {
                return Err(cleanroom_core::Error::Precondition(format!(
                    "the new list differs from version {} by {changed} records; a new version \
                     must add or remove at least {min_change} (or repeat it unchanged)",
                    i + 1
                ))
                .into());
            }
        }
        let key_versions = |list: &RecordBatch| -> BTreeSet<u32> {
            lists::tokens(list).into_iter().map(|(v, _)| v).collect()
        };
        let matched_set = |list: &RecordBatch| -> HashSet<i64> {
            views::matched_members(upload.snapshot, upload.contract_id, list)
                .into_keys()
                .collect()
        };
        let new_matched = matched_set(&upload.tokens);
        let new_digest = member_digest(&new_matched);
        let audience_scale = scale_of(protection.audience_noise);
        let mut frozen = None;
        for version in (1..=earlier.len() as u32).rev() {
            let effective = lists.effective(upload.partner, version);
            let Some(old) = earlier.get(effective as usize - 1) else {
                continue;
            };
            // A list under another match key cannot stand in for this one.
            if key_versions(old) != key_versions(&upload.tokens) {
                continue;
            }
            let old_matched = matched_set(old);
            let changed = new_matched.symmetric_difference(&old_matched).count() as i64;
            let noise = sticky(
                &self.noise_key,
                &[
                    b"list-freeze",
                    upload.partner.as_bytes(),
                    &new_digest,
                    &member_digest(&old_matched),
                ],
                audience_scale,
            );
            if changed + noise < i64::from(protection.min_list_change) {
                frozen = Some(effective);
                break;
            }
        }
        let version = upload.store.append_list(upload.partner, upload.tokens)?;
        lists.record(
            upload.partner,
            version,
            frozen.unwrap_or(version),
            upload.now,
        )?;
        Ok(version)
    }

    /// Answers one query. This is the only function that releases query results.
    pub async fn run(&self, request: QueryRequest<'_>) -> Result<Answer> {
        let rules = request.rules;
        let contract = rules.contracts.get(request.contract_id).ok_or_else(|| {
            cleanroom_core::Error::Precondition("the partner has no contract".into())
        })?;
        let protection = &contract.protection;
        let params = params::canonical(request.query, request.params, rules, request.partner)?;
        let Some(list) = request.snapshot.lists.get(request.partner) else {
            return Err(cleanroom_core::Error::Precondition(
                "no customer list uploaded yet: call UploadList first".into(),
            )
            .into());
        };
        let effective_version = self
            .lists
            .lock()
            .expect("list ledger lock poisoned")
            .effective(request.partner, list.version);
        let tokens = if effective_version == list.version {
            Arc::clone(&list.tokens)
        } else {
            request
                .store
                .list_versions(request.partner)?
                .get(effective_version as usize - 1)
                .cloned()
                .ok_or_else(|| Error::Storage("an earlier list version is missing".into()))?
        };
        let purpose = rules.purposes.get(&contract.purpose).ok_or_else(|| {
            cleanroom_core::Error::Precondition("the contract's purpose is not configured".into())
        })?;
        let requirement = Requirement {
            min_notice_version: purpose.min_notice_version,
            grant_valid_days: purpose.grant_valid_days,
        };
        let matched = views::matched_members(request.snapshot, request.contract_id, &tokens);
        let eligible = views::consented(
            request.snapshot,
            &matched,
            &contract.purpose,
            &requirement,
            request.now,
        );
        let audience_noise = sticky(
            &self.noise_key,
            &[
                b"audience",
                request.partner.as_bytes(),
                &member_digest(&eligible),
            ],
            scale_of(protection.audience_noise),
        );
        if eligible.len() as i64 + audience_noise < i64::from(protection.min_audience) {
            return Err(cleanroom_core::Error::Precondition(format!(
                "your list's matched, consenting audience is below this contract's minimum of \
                 about {} members; no query answers until a larger list is uploaded",
                protection.min_audience
            ))
            .into());
        }

        self.answers
            .take(request.partner, contract.max_queries_per_day, request.now)?;
        let mut audit = BTreeMap::from([(
            "effective_list_version".to_string(),
            effective_version.to_string(),
        )]);
        let answered = self
            .answer(
                &request,
                contract,
                &params,
                &matched,
                &eligible,
                effective_version,
                &mut audit,
            )
            .await;
        let (batch, suppressed_rows, report) = match answered {
            Ok(answer) => answer,
            Err(e) => {
                self.answers.give_back(request.partner, request.now);
                return Err(e);
            }
        };
        Ok(Answer {
            batch,
            params,
            suppressed_rows,
            consent_snapshot_id: request.snapshot.consent_snapshot_id.clone(),
            list_version: list.version,
            protection: report,
            audit,
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn answer(
        &self,
        request: &QueryRequest<'_>,
        contract: &Contract,
        params: &BTreeMap<String, BoundValue>,
        matched: &HashMap<i64, Option<String>>,
        eligible: &HashSet<i64>,
        effective_version: u32,
        audit: &mut BTreeMap<String, String>,
    ) -> Result<(RecordBatch, u64, ProtectionReport)> {
        let rules = request.rules;
        let query = request.query;
        let policy = Policy::for_query(rules, query, contract, request.partner);
        let dp = contract.protection.dp.as_ref();
        let key = params_key(params);
        let answer_key = hex::encode(Sha256::digest(
            format!(
                "{}|{}|{}|{}|{}|{}",
                request.partner,
                query.id,
                query.content_sha256,
                key,
                request.snapshot.data_version,
                effective_version
            )
            .as_bytes(),
        ));
        if let Some(dp) = dp {
            // Refuse before computing anything if the answer cannot be paid for.
            self.epsilon
                .charge(request.partner, &answer_key, dp, request.now, true)?;
        }

        let views = SafeViews::of_audience(request.snapshot, matched, eligible, effective_version)?;
        let ctx = views.session()?;
        let plan = plan::plan_sql(&ctx, &query.sql).await?;
        let values: HashMap<String, ScalarValue> = params
            .iter()
            .map(|(k, v)| (k.clone(), bind_value(v, rules.retailer.utc_offset_minutes)))
            .collect();
        let plan = plan
            .with_param_values(ParamValues::from(values))
            .map_err(|_| {
                Error::Guard("the query's parameters do not match its placeholders".into())
            })?;
        let shape = plan::check_plan(&plan, &policy)?;
        let per_member = plan::per_member_plan(&shape)?;
        let batches = ctx
            .execute_logical_plan(per_member)
            .await?
            .collect()
            .await?;
        let groups_cap = dp.map(|d| d.max_groups_per_member);
        let cells = self.fold(&batches, &shape, &policy, groups_cap, &answer_key)?;
        audit.insert(
            "out_of_domain_rows".into(),
            cells.out_of_domain_rows.to_string(),
        );
        let bounds: Vec<u64> = shape.metrics.iter().map(|m| m.bound).collect();
        let counts: Vec<bool> = shape.metrics.iter().map(|m| m.count).collect();
        let per_member_bound = policy
            .metrics
            .iter()
            .cloned()
            .zip(bounds.iter().copied())
            .collect();

        let (released, values, mut report) = match dp {
            Some(dp) => {
                let (released, values, report) =
                    self.release_dp(&cells, &policy, dp, &bounds, &counts, &answer_key);
                let charge =
                    self.epsilon
                        .charge(request.partner, &answer_key, dp, request.now, false)?;
                audit.insert("epsilon_spent".into(), charge.spent.to_string());
                audit.insert("answer_key".into(), answer_key.clone());
                let report = ProtectionReport {
                    epsilon_spent: charge.spent,
                    epsilon_remaining: charge.remaining,
                    budget_resets_at: charge.resets_at,
                    ..report
                };
                (released, values, report)
            }
            None => self.release_noisy(
                &cells,
                &policy,
                &contract.protection,
                &bounds,
                &counts,
                request,
                &key,
                audit,
            )?,
        };
        report.per_member_bound = per_member_bound;
        let suppressed = released.iter().filter(|r| !**r).count() as u64;
        let batch = output_batch(&policy, &cells.sizes, &released, &values)?;
        Ok((batch, suppressed, report))
    }

    /// Folds the per-member rows into cells of the output domain. Each member's contribution to
    /// a metric in a row is clamped to the metric's bound; under DP, a member counts in at most
    /// `groups_cap` rows, chosen by a keyed hash so the choice is stable and unguessable.
    fn fold(
        &self,
        batches: &[RecordBatch],
        shape: &plan::Shape,
        policy: &Policy,
        groups_cap: Option<u32>,
        answer_key: &str,
    ) -> Result<Cells> {
        let sizes: Vec<usize> = policy.dimensions.iter().map(|(_, d)| d.len()).collect();
        sizes
            .iter()
            .try_fold(1usize, |acc, s| acc.checked_mul(*s))
            .filter(|c| *c <= MAX_DOMAIN_CELLS)
            .ok_or_else(|| Error::Guard("the output domain is too large to protect".into()))?;
        let positions: Vec<HashMap<&str, usize>> = policy
            .dimensions
            .iter()
            .map(|(_, domain)| {
                domain
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (v.as_str(), i))
                    .collect()
            })
            .collect();
        let groups = shape.aggregate.group_expr.len();
        let mut per_member: HashMap<i64, Vec<(usize, Vec<i64>)>> = HashMap::new();
        let mut out_of_domain_rows = 0u64;
        for batch in batches {
            let dims = shape
                .dimension_groups
                .iter()
                .map(|g| cast(batch.column(*g), &DataType::Utf8))
                .collect::<std::result::Result<Vec<ArrayRef>, _>>()?;
            let members = cast(batch.column(groups), &DataType::Int64)?;
            let members = members.as_primitive::<Int64Type>();
            let metrics = shape
                .metrics
                .iter()
                .map(|m| cast(batch.column(groups + 1 + m.aggregate), &DataType::Int64))
                .collect::<std::result::Result<Vec<ArrayRef>, _>>()?;
            'rows: for row in 0..batch.num_rows() {
                let mut cell = 0usize;
                for (d, text) in dims.iter().enumerate() {
                    let text = text.as_string::<i32>();
                    let position = text
                        .is_valid(row)
                        .then(|| positions[d].get(text.value(row)))
                        .flatten();
                    let Some(position) = position else {
                        out_of_domain_rows += 1;
                        continue 'rows;
                    };
                    cell = cell * sizes[d] + position;
                }
                if !members.is_valid(row) {
                    continue;
                }
                let values = metrics
                    .iter()
                    .zip(&shape.metrics)
                    .map(|(column, m)| {
                        let column = column.as_primitive::<Int64Type>();
                        let value = if column.is_valid(row) {
                            column.value(row)
                        } else {
                            0
                        };
                        let bound = i64::try_from(m.bound).unwrap_or(i64::MAX);
                        value.clamp(-bound, bound)
                    })
                    .collect();
                per_member
                    .entry(members.value(row))
                    .or_default()
                    .push((cell, values));
            }
        }
        let mut cells: HashMap<usize, CellData> = HashMap::new();
        for (member, mut rows) in per_member {
            if let Some(cap) = groups_cap
                && rows.len() > cap as usize
            {
                rows.sort_by_key(|(cell, _)| {
                    let mut h = Sha256::new();
                    h.update(self.noise_key);
                    h.update(answer_key.as_bytes());
                    h.update(member.to_le_bytes());
                    h.update(cell.to_le_bytes());
                    h.finalize()
                });
                rows.truncate(cap as usize);
            }
            for (cell, values) in rows {
                let data = cells.entry(cell).or_default();
                if data.values.is_empty() {
                    data.values = vec![0; values.len()];
                }
                // Two result rows of one member in one cell (values that map to the same domain
                // value) still make one member.
                if data.members.last() != Some(&member) {
                    data.members.push(member);
                }
                for (total, v) in data.values.iter_mut().zip(values) {
                    *total = total.saturating_add(v);
                }
            }
        }
        Ok(Cells {
            sizes,
            cells,
            out_of_domain_rows,
        })
    }

    /// Releases under sticky noise: hard k, a noisy threshold, the partner's history, sticky
    /// noise on values, complementary suppression.
    #[allow(clippy::too_many_arguments)]
    fn release_noisy(
        &self,
        cells: &Cells,
        policy: &Policy,
        protection: &Protection,
        bounds: &[u64],
        counts: &[bool],
        request: &QueryRequest<'_>,
        params_key: &str,
        audit: &mut BTreeMap<String, String>,
    ) -> Result<Release> {
        let k = i64::from(policy.k);
        let total = cells.count();
        let threshold_scale = scale_of(protection.noise_scale);
        let margin = if threshold_scale.is_some() {
            i64::from(protection.threshold_margin)
        } else {
            0
        };
        let value_scales: Vec<Option<Scale>> = bounds
            .iter()
            .map(|b| scale_of(protection.noise_scale * *b as f64))
            .collect();
        let query = request.query.id.as_str();
        let partner = request.partner.as_bytes();
        let mut released = vec![false; total];
        let mut needs_cover = vec![false; total];
        let mut covers = vec![false; total];
        let mut values: Vec<Option<Vec<i64>>> = vec![None; total];
        let mut fresh: Vec<(usize, Fingerprint)> = Vec::new();
        let mut tally: BTreeMap<&str, u64> = BTreeMap::new();
        self.history.with(request.partner, |history| {
            let withheld_before = history.withheld(query, params_key);
            let mut pending: Vec<Fingerprint> = Vec::new();
            for cell in 0..total {
                let size = cells.size(cell) as i64;
                if size < k {
                    needs_cover[cell] = true;
                    continue;
                }
                if withheld_before.contains(&cell) {
                    covers[cell] = true;
                    *tally.entry("withheld_before").or_default() += 1;
                    continue;
                }
                let data = &cells.cells[&cell];
                let digest = member_digest(&data.members);
                let cell_bytes = (cell as u64).to_le_bytes();
                let threshold_noise = sticky(
                    &self.noise_key,
                    &[
                        b"threshold",
                        partner,
                        query.as_bytes(),
                        params_key.as_bytes(),
                        &cell_bytes,
                        &digest,
                    ],
                    threshold_scale,
                );
                if size + threshold_noise < k + margin {
                    covers[cell] = true;
                    *tally.entry("noisy_threshold_withheld").or_default() += 1;
                    continue;
                }
                let fp = Fingerprint::of(
                    &self.fingerprint_key,
                    data.members.iter().copied(),
                    history::CAPACITY,
                );
                match history.judge(query, cell, &fp, policy.k, &pending) {
                    Verdict::Repeat(old) => {
                        released[cell] = true;
                        values[cell] = Some(old);
                        *tally.entry("repeated_rows").or_default() += 1;
                    }
                    Verdict::Withhold => {
                        needs_cover[cell] = true;
                        *tally.entry("difference_withheld").or_default() += 1;
                    }
                    Verdict::Fresh => {
                        let noisy = data
                            .values
                            .iter()
                            .enumerate()
                            .map(|(m, v)| {
                                let metric = policy.metrics[m].as_bytes();
                                let noise = sticky(
                                    &self.noise_key,
                                    &[
                                        b"value",
                                        partner,
                                        query.as_bytes(),
                                        params_key.as_bytes(),
                                        &cell_bytes,
                                        metric,
                                        &digest,
                                    ],
                                    value_scales[m],
                                );
                                let v = v.saturating_add(noise);
                                if counts[m] { v.max(0) } else { v }
                            })
                            .collect();
                        released[cell] = true;
                        values[cell] = Some(noisy);
                        pending.push(fp.clone());
                        fresh.push((cell, fp));
                    }
                }
            }
            let weight: Vec<usize> = (0..total).map(|c| cells.size(c)).collect();
            let before = released.iter().filter(|r| **r).count();
            complementary_suppression(
                &cells.sizes,
                &needs_cover,
                &mut covers,
                &mut released,
                &weight,
            );
            tally.insert(
                "complementary_withheld",
                (before - released.iter().filter(|r| **r).count()) as u64,
            );
            let rows = fresh
                .into_iter()
                .filter(|(cell, _)| released[*cell])
                .map(|(cell, fp)| {
                    let row = history::row_record(
                        query,
                        params_key,
                        cell,
                        &fp,
                        values[cell].clone().unwrap_or_default(),
                        request.now,
                    );
                    (row, fp)
                })
                .collect();
            let withheld: BTreeSet<usize> = (0..total).filter(|c| !released[*c]).collect();
            history.record(rows, query, params_key, withheld)
        })?;
        for (name, count) in tally {
            audit.insert(name.to_string(), count.to_string());
        }
        let report = ProtectionReport {
            mode: if threshold_scale.is_some() {
                "noise"
            } else {
                "none"
            }
            .into(),
            noise_scale: policy
                .metrics
                .iter()
                .zip(&value_scales)
                .filter_map(|(m, s)| s.map(|s| (m.clone(), s.num as f64 / s.den as f64)))
                .collect(),
            release_threshold: (k + margin) as f64,
            ..Default::default()
        };
        Ok((released, values, report))
    }

    /// Releases under differential privacy: discrete Laplace noise on the member count and every
    /// metric, calibrated to the contribution bounds, and a noisy threshold that passes a row
    /// below k with probability at most δ. The hard k on the true count stays as the contract's
    /// promise. Noise is seeded by the answer key, so an identical repeat on the same data gets
    /// the same answer (and costs nothing).
    fn release_dp(
        &self,
        cells: &Cells,
        policy: &Policy,
        dp: &cleanroom_core::rules::DpSettings,
        bounds: &[u64],
        counts: &[bool],
        answer_key: &str,
    ) -> Release {
        let k = i64::from(policy.k);
        let total = cells.count();
        // ε is shared evenly between the metrics and the member count used for thresholding.
        let shares = bounds.len() as u64 + 1;
        let epsilon_millis = ((dp.epsilon_per_query * 1000.0).round() as u64).max(1);
        let groups = u64::from(dp.max_groups_per_member);
        let count_scale = Scale::new(groups * shares * 1000, epsilon_millis).expect("positive");
        let value_scales: Vec<Scale> = bounds
            .iter()
            .map(|b| Scale::new(groups * b * shares * 1000, epsilon_millis).expect("positive"))
            .collect();
        // The smallest margin τ with P(noise ≥ τ) ≤ δ: a row of k − 1 members passes k + τ only
        // if its noise reaches τ + 1.
        let tau = (0..)
            .find(|t| noise::tail_probability(count_scale, *t) <= dp.delta)
            .unwrap_or(0);
        let mut released = vec![false; total];
        let mut values: Vec<Option<Vec<i64>>> = vec![None; total];
        for cell in 0..total {
            let Some(data) = cells.cells.get(&cell) else {
                continue;
            };
            let size = data.members.len() as i64;
            let cell_bytes = (cell as u64).to_le_bytes();
            let noisy_count = size
                + sticky(
                    &self.noise_key,
                    &[b"dp-count", answer_key.as_bytes(), &cell_bytes],
                    Some(count_scale),
                );
            if size < k || noisy_count < k + tau {
                continue;
            }
            released[cell] = true;
            values[cell] = Some(
                data.values
                    .iter()
                    .enumerate()
                    .map(|(m, v)| {
                        let noise = sticky(
                            &self.noise_key,
                            &[
                                b"dp-value",
                                answer_key.as_bytes(),
                                &cell_bytes,
                                policy.metrics[m].as_bytes(),
                            ],
                            Some(value_scales[m]),
                        );
                        let v = v.saturating_add(noise);
                        if counts[m] { v.max(0) } else { v }
                    })
                    .collect(),
            );
        }
        let report = ProtectionReport {
            mode: "dp".into(),
            noise_scale: policy
                .metrics
                .iter()
                .zip(&value_scales)
                .map(|(m, s)| (m.clone(), s.num as f64 / s.den as f64))
                .collect(),
            release_threshold: (k + tau) as f64,
            delta: dp.delta,
            max_groups_per_member: dp.max_groups_per_member,
            ..Default::default()
        };
        (released, values, report)
    }
}

/// The released rows as a batch: dimension values from the domain, metric values as released.
fn output_batch(
    policy: &Policy,
    sizes: &[usize],
    released: &[bool],
    values: &[Option<Vec<i64>>],
) -> Result<RecordBatch> {
    let cells: Vec<usize> = (0..released.len()).filter(|c| released[*c]).collect();
    let mut fields = Vec::new();
    let mut columns: Vec<ArrayRef> = Vec::new();
    for (d, (name, domain)) in policy.dimensions.iter().enumerate() {
        let stride: usize = sizes[d + 1..].iter().product();
        let column: StringArray = cells
            .iter()
            .map(|c| Some(domain[(c / stride) % sizes[d]].clone()))
            .collect();
        fields.push(Field::new(name, DataType::Utf8, false));
        columns.push(Arc::new(column));
    }
    for (m, name) in policy.metrics.iter().enumerate() {
        let column: Int64Array = cells
            .iter()
            .map(|c| values[*c].as_ref().map(|v| v[m]))
            .collect();
        fields.push(Field::new(name, DataType::Int64, true));
        columns.push(Arc::new(column));
    }
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns,
    )?)
}

/// Complementary suppression along every dimension. For each line of the grid (all cells that
/// share every coordinate but one): if it withholds a cell that needs cover (fewer than k members,
/// or withheld by the difference check) and no withheld cell that gives cover (at least k members),
/// the released cell with the fewest members is withheld too and gives cover from then on. A
/// line's total minus its released cells then sums a group of at least k members that cannot be
/// split back into the small cells.
///
/// The rule looks only at which cells are below k, never at how far below: a cell with no member
/// and a cell with k − 1 lead to the same decisions.
fn complementary_suppression(
    sizes: &[usize],
    needs_cover: &[bool],
    covers: &mut [bool],
    released: &mut [bool],
    weight: &[usize],
) {
    let cells = released.len();
    loop {
        let mut changed = false;
        for (d, &size) in sizes.iter().enumerate() {
            let stride: usize = sizes[d + 1..].iter().product();
            for base in (0..cells).filter(|c| (c / stride).is_multiple_of(size)) {
                let line = (0..size).map(|j| base + j * stride);
                let exposed = line.clone().any(|c| !released[c] && needs_cover[c]);
                let covered = line.clone().any(|c| !released[c] && covers[c]);
                if exposed
                    && !covered
                    && let Some(c) = line
                        .filter(|c| released[*c])
                        .min_by_key(|c| (weight[*c], *c))
                {
                    released[c] = false;
                    covers[c] = true;
                    changed = true;
                }
            }
        }
        if !changed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn suppress(sizes: &[usize], counts: &[usize], k: usize) -> Vec<bool> {
        let mut released: Vec<bool> = counts.iter().map(|c| *c >= k).collect();
        let needs: Vec<bool> = counts.iter().map(|c| *c < k).collect();
        let mut covers = vec![false; counts.len()];
        complementary_suppression(sizes, &needs, &mut covers, &mut released, counts);
        released
    }

    #[test]
    fn one_small_cell_takes_the_smallest_released_cell_with_it() {
        assert_eq!(
            suppress(&[4], &[3, 50, 12, 40], 10),
            [false, true, false, true]
        );
    }

    #[test]
    fn zero_and_small_cells_lead_to_the_same_decisions() {
        let decide = |small: usize| suppress(&[3, 3], &[small, 50, 12, 40, 0, 33, 80, 45, 61], 10);
        let with_zero = decide(0);
        assert!(with_zero.iter().any(|r| *r), "something is still released");
        for small in 1..10 {
            assert_eq!(decide(small), with_zero, "small = {small}");
        }
    }

    #[test]
    fn a_withheld_cell_of_k_or_more_already_covers_its_line() {
        let mut released = vec![false, true, false, true];
        let needs = vec![true, false, false, false];
        let mut covers = vec![false, false, true, false];
        complementary_suppression(&[4], &needs, &mut covers, &mut released, &[3, 50, 20, 40]);
        assert_eq!(released, [false, true, false, true]);
    }

    #[test]
    fn dates_bind_as_local_midnight() {
        let date = NaiveDate::from_ymd_opt(2026, 4, 1).unwrap();
        let ScalarValue::TimestampMicrosecond(Some(micros), _) =
            bind_value(&BoundValue::Date(date), 540)
        else {
            panic!("not a timestamp");
        };
        let utc = chrono::DateTime::from_timestamp_micros(micros).unwrap();
        assert_eq!(utc.to_rfc3339(), "2026-03-31T15:00:00+00:00");
    }

    #[test]
    fn scales_are_exact_thousandths() {
        assert_eq!(scale_of(2.5), Scale::new(5, 2));
        assert_eq!(scale_of(0.0), None);
        assert_eq!(scale_of(-1.0), None);
    }
}
