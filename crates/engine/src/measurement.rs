//! Exact, unprotected answers, for measuring what the guard costs in accuracy on generated data
//! (`cleanroom utility`). Compiled only with the `measurement` feature, which the service crate
//! does not enable: in the service, the guard is the only way to a query result, and the safe
//! views stay private to this crate.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, NaiveDate, Utc};
use cleanroom_core::allowlist::{BoundValue, ParamKind, QueryDef};
use cleanroom_core::consent::Requirement;
use cleanroom_core::rules::Rules;
use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int64Type};
use datafusion::common::{ParamValues, ScalarValue};

use crate::Result;
use crate::audience::{AudienceOf, Audiences};
use crate::guard::bind_value;
use crate::store::Snapshot;
use crate::views::{self, SafeViews};

/// Each row's dimension values (as text) and its exact metric values (null as 0).
pub type ExactCells = HashMap<Vec<String>, Vec<i64>>;

/// The exact answer of `query` for `partner`'s current list and consenting audience at `now`,
/// with the snapped parameters `effective` (as the guard reported them): no noise, no k, no
/// contribution bounds.
pub async fn exact_answer(
    snapshot: &Snapshot,
    rules: &Rules,
    partner: &str,
    query: &QueryDef,
    effective: &BTreeMap<String, String>,
    now: DateTime<Utc>,
) -> Result<ExactCells> {
    let views = audience_views(snapshot, rules, partner, now).await?;
    let params = bound_params(query, effective, rules.retailer.utc_offset_minutes);
    let batches = views
        .session()?
        .sql(&query.sql)
        .await?
        .with_param_values(ParamValues::from(params))?
        .collect()
        .await?;
    let dims = query.dimensions.len();
    let mut cells = HashMap::new();
    for batch in batches {
        let columns = (0..batch.num_columns())
            .map(|i| {
                let to = if i < dims {
                    DataType::Utf8
                } else {
                    DataType::Int64
                };
                cast(batch.column(i), &to)
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        for row in 0..batch.num_rows() {
            let key = columns[..dims]
                .iter()
                .map(|c| c.as_string::<i32>().value(row).to_string())
                .collect();
            let values = columns[dims..]
                .iter()
                .map(|c| {
                    let c = c.as_primitive::<Int64Type>();
                    if c.is_valid(row) { c.value(row) } else { 0 }
                })
                .collect();
            cells.insert(key, values);
        }
    }
    Ok(cells)
}

/// The partner's matched, consenting audience as safe views (computed as the guard computes it).
async fn audience_views(
    snapshot: &Snapshot,
    rules: &Rules,
    partner: &str,
    now: DateTime<Utc>,
) -> Result<SafeViews> {
    let missing = |what: &str| cleanroom_core::Error::Precondition(format!("{partner}: no {what}"));
    let (contract_id, contract) = rules
        .contract_of(partner)
        .ok_or_else(|| missing("contract"))?;
    let purpose = rules
        .purposes
        .get(&contract.purpose)
        .ok_or_else(|| missing("purpose"))?;
    let list = snapshot.lists.get(partner).ok_or_else(|| missing("list"))?;
    let requirement = Requirement {
        min_notice_version: purpose.min_notice_version,
        grant_valid_days: purpose.grant_valid_days,
    };
    let snapshot = std::sync::Arc::new(snapshot.clone());
    let audience = Audiences::default()
        .audience(AudienceOf {
            snapshot: &snapshot,
            contract_id,
            list,
            purpose: &contract.purpose,
            requirement,
            now,
        })
        .await?;
    SafeViews::of(&snapshot, audience)
}

/// The snapped parameters as the literals bound to the query's placeholders.
fn bound_params(
    query: &QueryDef,
    effective: &BTreeMap<String, String>,
    utc_offset_minutes: i32,
) -> HashMap<String, ScalarValue> {
    query
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
            Some((p.name.clone(), bind_value(&value, utc_offset_minutes)))
        })
        .collect()
}

/// A DataFusion session over the retailer's whole tables as the store holds them (`members`
/// with every member, `purchases`, read from the same files, the same way): for the benchmark's
/// baseline, the same join and aggregate as a query with no audience, no guard and no noise.
pub fn raw_session(snapshot: &Snapshot) -> Result<datafusion::prelude::SessionContext> {
    let ctx = datafusion::prelude::SessionContext::new();
    let members = views::paths(&snapshot.members);
    let purchases = views::paths(&snapshot.purchases);
    ctx.register_table(
        "members",
        views::file_table(crate::tables::members::schema(), &members)?,
    )?;
    ctx.register_table(
        "purchases",
        views::file_table(crate::tables::purchases::schema(), &purchases)?,
    )?;
    Ok(ctx)
}

/// The values of `$start` and `$end` for a window of local dates.
pub fn window_params(start: &str, end: &str, utc_offset_minutes: i32) -> Result<ParamValues> {
    let date = |text: &str| {
        NaiveDate::parse_from_str(text, "%Y-%m-%d").map_err(|_| {
            crate::Error::Domain(cleanroom_core::Error::Input(format!("not a date: {text}")))
        })
    };
    let values: std::collections::HashMap<String, ScalarValue> = [
        (
            "start",
            bind_value(&BoundValue::Date(date(start)?), utc_offset_minutes),
        ),
        (
            "end",
            bind_value(&BoundValue::Date(date(end)?), utc_offset_minutes),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Ok(ParamValues::from(values))
}
