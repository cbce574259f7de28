//! Parameter granularity, against trackers (THREATS 3): dates snap to the whole weeks or months a
//! query declares, windows are at least as long as its metadata says, and set-like choices come
//! only from fixed lists. The result is the query's canonical parameters: two requests that snap
//! to the same values are the same question, get the same answer and the same sticky noise.

use std::collections::BTreeMap;

use chrono::NaiveDate;
use cleanroom_core::allowlist::{BoundValue, ParamKind, QueryDef, bound_date};
use cleanroom_core::rules::Rules;

use crate::Result;

fn invalid(name: &str, message: String) -> crate::Error {
    cleanroom_core::Error::Input(format!("parameter `{name}`: {message}")).into()
}

fn date_bound(value: &Option<toml::Value>) -> Option<NaiveDate> {
    value.as_ref().and_then(bound_date)
}

/// Snaps typed parameters to the query's declared granularity and checks the windows they form.
/// A window's start (a date no other parameter comes after) snaps back to the boundary on or
/// before it; its end (a date with `after`) snaps forward to the boundary on or after it, so the
/// snapped window always covers the asked one. Enum values are checked against their fixed list
/// once more: the guard does not rely on the caller of [`canonical`] having done it.
pub fn canonical(
    query: &QueryDef,
    bound: &BTreeMap<String, BoundValue>,
    rules: &Rules,
    partner: &str,
) -> Result<BTreeMap<String, BoundValue>> {
    let mut out = BTreeMap::new();
    for spec in &query.params {
        let Some(value) = bound.get(&spec.name) else {
            return Err(invalid(&spec.name, "missing".into()));
        };
        let value = match (spec.kind, value) {
            (ParamKind::Date, BoundValue::Date(date)) => {
                let unit = spec
                    .granularity
                    .unwrap_or(cleanroom_core::allowlist::Granularity::Day);
                let snapped = if spec.after.is_some() {
                    unit.ceil(*date)
                } else {
                    unit.floor(*date)
                };
                let (min, max) = (date_bound(&spec.min), date_bound(&spec.max));
                if min.is_some_and(|m| snapped < m) || max.is_some_and(|m| snapped > m) {
                    return Err(invalid(
                        &spec.name,
                        format!(
                            "snaps to {snapped} (whole {}s), outside {}..={}",
                            unit.as_str(),
                            min.map(|d| d.to_string()).unwrap_or_default(),
                            max.map(|d| d.to_string()).unwrap_or_default()
                        ),
                    ));
                }
                BoundValue::Date(snapped)
            }
            (ParamKind::Enum, BoundValue::Str(s)) => {
                if !query.allowed_values(spec, rules, partner).contains(s) {
                    return Err(invalid(
                        &spec.name,
                        "not one of the allowed values (see DescribeQuery)".into(),
                    ));
                }
                value.clone()
            }
            (ParamKind::Int, BoundValue::Int(_)) => value.clone(),
            _ => return Err(invalid(&spec.name, "has the wrong type".into())),
        };
        out.insert(spec.name.clone(), value);
    }
    for spec in &query.params {
        let Some(after) = &spec.after else { continue };
        let (Some(BoundValue::Date(end)), Some(BoundValue::Date(start))) =
            (out.get(&spec.name), out.get(after))
        else {
            continue;
        };
        let days = (*end - *start).num_days();
        let needed = i64::from(spec.min_window_days.unwrap_or(1).max(1));
        if days < needed {
            return Err(invalid(
                &spec.name,
                format!(
                    "must come after `{after}` by at least {needed} days; after snapping the \
                     window {start}..{end} is {days} days"
                ),
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query() -> QueryDef {
        QueryDef::parse(
            r#"
id = "q"
version = 1
title = "t"
description = "d"
purposes = ["p"]
contract_clause = "c"
partners = []
k = 10
sql = "SELECT 1 WHERE $start < $end"
metrics = ["n"]
[[params]]
name = "start"
type = "date"
description = "s"
min = "2024-01-01"
max = "2027-12-31"
granularity = "week"
[[params]]
name = "end"
type = "date"
description = "e"
min = "2024-01-01"
max = "2027-12-31"
granularity = "week"
after = "start"
min_window_days = 28
"#,
        )
        .unwrap()
    }

    fn dates(start: &str, end: &str) -> BTreeMap<String, BoundValue> {
        let d = |s: &str| BoundValue::Date(NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap());
        BTreeMap::from([("start".into(), d(start)), ("end".into(), d(end))])
    }

    fn rules() -> Rules {
        Rules::parse(
            r#"
[privacy]
k_floor = 5
[purposes.p]
description = "d"
min_notice_version = 1
[partners]
[contracts]
"#,
        )
        .unwrap()
    }

    #[test]
    fn a_one_day_tracker_snaps_to_the_same_window() {
        let q = query();
        // Days 1..10 and 1..9 of a window (Wednesday starts): both snap to whole weeks.
        let a = canonical(&q, &dates("2026-03-04", "2026-04-13"), &rules(), "x").unwrap();
        let b = canonical(&q, &dates("2026-03-04", "2026-04-12"), &rules(), "x").unwrap();
        assert_eq!(a, b);
        assert_eq!(a, dates("2026-03-02", "2026-04-13"));
    }

    #[test]
    fn short_windows_are_refused_after_snapping() {
        let err = canonical(&query(), &dates("2026-03-02", "2026-03-23"), &rules(), "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least 28 days"), "{err}");
    }
}
