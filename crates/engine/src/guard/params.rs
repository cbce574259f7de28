//! A question's parameters, typed and checked once, on one path: [`typed`] takes the values the
//! caller sent (declared names only, each of its declared type, within its range, from its fixed
//! list), and [`snap`] applies the privacy rules against trackers (THREATS 3): dates snap to the
//! whole weeks or months the query declares and windows are at least as long as its metadata
//! says. The result is the query's canonical parameters: two requests that snap to the same
//! values are the same question, get the same answer and the same sticky noise. [`Snapped`] is
//! made only here, and the guard runs only on it, so no value reaches a plan unchecked; binding a
//! checked value to its placeholder ([`bind_value`]) decides nothing.
//!
//! No refusal echoes a value or a name the caller sent: a caller could put anything in them.

use std::collections::{BTreeMap, HashMap};

use chrono::{NaiveDate, NaiveTime};
use cleanroom_core::allowlist::{
    BoundValue, Granularity, ParamKind, ParamSpec, QueryDef, bound_date,
};
use cleanroom_core::rules::Rules;
use datafusion::common::ScalarValue;

use crate::Result;

/// A parameter value as the caller sent it, before any check: the server turns the wire's
/// values into these, and nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawValue {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
    /// A date string.
    Date(String),
    /// A parameter named with no value.
    Absent,
}

impl RawValue {
    fn kind_name(&self) -> &'static str {
        match self {
            RawValue::Str(_) => "a string",
            RawValue::Int(_) => "an integer",
            RawValue::Date(_) => "a date",
            RawValue::Absent => "no value",
        }
    }
}

/// Every declared parameter of a query, of its declared type, within its declared range and
/// allowed values: not yet snapped. Only [`typed`] makes one.
#[derive(Debug, Clone, PartialEq)]
pub struct Typed(BTreeMap<String, BoundValue>);

impl Typed {
    /// The values as text, for the audit trail.
    pub fn shown(&self) -> BTreeMap<String, String> {
        shown(&self.0)
    }
}

/// A query's canonical parameters: typed, snapped, windows checked. Only [`snap`] makes one.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapped(BTreeMap<String, BoundValue>);

impl Snapped {
    /// The values as text, as the answer states them and the audit trail keeps them.
    pub fn shown(&self) -> BTreeMap<String, String> {
        shown(&self.0)
    }

    /// Canonical text of the values: equal questions have equal keys.
    pub(super) fn key(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";")
    }

    /// The values bound to their placeholders.
    pub(super) fn literals(&self, utc_offset_minutes: i32) -> HashMap<String, ScalarValue> {
        literals(&self.0, utc_offset_minutes)
    }
}

fn shown(params: &BTreeMap<String, BoundValue>) -> BTreeMap<String, String> {
    params
        .iter()
        .map(|(k, v)| (k.clone(), v.to_string()))
        .collect()
}

fn invalid(name: &str, message: &str) -> crate::Error {
    cleanroom_core::Error::Input(format!("parameter `{name}`: {message}")).into()
}

/// Types the caller's values against the query's declared parameters. Every declared parameter
/// must be present with a value, no other name is accepted, and each value must be of its
/// declared type, within its declared range, and (for enums) one of the values allowed to
/// `partner`.
pub fn typed(
    query: &QueryDef,
    raw: &BTreeMap<String, RawValue>,
    rules: &Rules,
    partner: &str,
) -> Result<Typed> {
    if let Some((name, _)) = raw.iter().find(|(_, v)| **v == RawValue::Absent) {
        // Named only by the query's own spelling: the caller's text is never echoed.
        let message = match query.params.iter().find(|p| &p.name == name) {
            Some(spec) => format!("parameter `{}`: no value", spec.name),
            None => format!(
                "query {} got a parameter it does not declare, with no value",
                query.id
            ),
        };
        return Err(cleanroom_core::Error::Input(message).into());
    }
    if raw
        .keys()
        .any(|k| !query.params.iter().any(|p| &p.name == k))
    {
        let declared: Vec<&str> = query.params.iter().map(|p| p.name.as_str()).collect();
        return Err(cleanroom_core::Error::Input(format!(
            "query {} got a parameter it does not declare; its parameters are: {}",
            query.id,
            declared.join(", ")
        ))
        .into());
    }
    let mut typed = BTreeMap::new();
    for spec in &query.params {
        let Some(value) = raw.get(&spec.name) else {
            return Err(invalid(&spec.name, "missing"));
        };
        let value = type_one(query, spec, value, rules, partner)?;
        typed.insert(spec.name.clone(), value);
    }
    Ok(Typed(typed))
}

/// One value of its declared type, in its declared range and allowed values.
fn type_one(
    query: &QueryDef,
    spec: &ParamSpec,
    value: &RawValue,
    rules: &Rules,
    partner: &str,
) -> Result<BoundValue> {
    match (spec.kind, value) {
        (ParamKind::Date, RawValue::Date(text) | RawValue::Str(text)) => {
            let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") else {
                return Err(invalid(&spec.name, "expected a date as YYYY-MM-DD"));
            };
            let (min, max) = date_range(spec);
            if min.is_some_and(|m| date < m) || max.is_some_and(|m| date > m) {
                return Err(invalid(
                    &spec.name,
                    &format!("out of range {}..={}", text_of(min), text_of(max)),
                ));
            }
            Ok(BoundValue::Date(date))
        }
        (ParamKind::Int, RawValue::Int(i)) => {
            let in_range = |bound: &Option<toml::Value>, ok: fn(i64, i64) -> bool| match bound {
                Some(toml::Value::Integer(b)) => ok(*i, *b),
                _ => true,
            };
            if !in_range(&spec.min, |v, b| v >= b) || !in_range(&spec.max, |v, b| v <= b) {
                return Err(invalid(&spec.name, "out of range"));
            }
            Ok(BoundValue::Int(*i))
        }
        (ParamKind::Enum, RawValue::Str(s)) => {
            if !query.allowed_values(spec, rules, partner).contains(s) {
                return Err(invalid(
                    &spec.name,
                    "not one of the allowed values (see DescribeQuery)",
                ));
            }
            Ok(BoundValue::Str(s.clone()))
        }
        (kind, other) => Err(invalid(
            &spec.name,
            &format!("expected {}, got {}", kind.as_str(), other.kind_name()),
        )),
    }
}

/// A date parameter's declared range.
fn date_range(spec: &ParamSpec) -> (Option<NaiveDate>, Option<NaiveDate>) {
    let bound = |value: &Option<toml::Value>| value.as_ref().and_then(bound_date);
    (bound(&spec.min), bound(&spec.max))
}

fn text_of(date: Option<NaiveDate>) -> String {
    date.map(|d| d.to_string()).unwrap_or_default()
}

/// Snaps typed parameters to the query's declared granularity and checks the windows they form.
/// A window's start (a date no other parameter comes after) snaps back to the boundary on or
/// before it; its end (a date with `after`) snaps forward to the boundary on or after it, so the
/// snapped window always covers the asked one, and must still lie within the declared range.
pub fn snap(query: &QueryDef, typed: &Typed) -> Result<Snapped> {
    let mut out = typed.0.clone();
    for spec in &query.params {
        if let Some(BoundValue::Date(date)) = out.get_mut(&spec.name) {
            *date = snap_date(spec, *date)?;
        }
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
                &format!(
                    "must come after `{after}` by at least {needed} days; after snapping the \
                     window {start}..{end} is {days} days"
                ),
            ));
        }
    }
    Ok(Snapped(out))
}

/// One date snapped to its unit (down for a window's start, up for its end), within its range.
fn snap_date(spec: &ParamSpec, date: NaiveDate) -> Result<NaiveDate> {
    let unit = spec.granularity.unwrap_or(Granularity::Day);
    let snapped = if spec.after.is_some() {
        unit.ceil(date)
    } else {
        unit.floor(date)
    };
    let (min, max) = date_range(spec);
    if min.is_some_and(|m| snapped < m) || max.is_some_and(|m| snapped > m) {
        return Err(invalid(
            &spec.name,
            &format!(
                "snaps to {snapped} (whole {}s), outside {}..={}",
                unit.as_str(),
                text_of(min),
                text_of(max)
            ),
        ));
    }
    Ok(snapped)
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

/// Values as the literals bound to their placeholders: a question's snapped parameters, or the
/// example values a plan is checked with before any request.
pub(super) fn literals(
    params: &BTreeMap<String, BoundValue>,
    utc_offset_minutes: i32,
) -> HashMap<String, ScalarValue> {
    params
        .iter()
        .map(|(k, v)| (k.clone(), bind_value(v, utc_offset_minutes)))
        .collect()
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

    fn raw(start: &str, end: &str) -> BTreeMap<String, RawValue> {
        BTreeMap::from([
            ("start".into(), RawValue::Date(start.into())),
            ("end".into(), RawValue::Date(end.into())),
        ])
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

    fn checked(start: &str, end: &str) -> Result<Snapped> {
        let q = query();
        snap(&q, &typed(&q, &raw(start, end), &rules(), "x")?)
    }

    fn refusal(raw: &BTreeMap<String, RawValue>) -> String {
        typed(&query(), raw, &rules(), "x").unwrap_err().to_string()
    }

    #[test]
    fn a_one_day_tracker_snaps_to_the_same_window() {
        // Days 1..10 and 1..9 of a window (Wednesday starts): both snap to whole weeks.
        let a = checked("2026-03-04", "2026-04-13").unwrap();
        let b = checked("2026-03-04", "2026-04-12").unwrap();
        assert_eq!(a, b);
        assert_eq!(a, Snapped(dates("2026-03-02", "2026-04-13")));
    }

    #[test]
    fn short_windows_are_refused_after_snapping() {
        let err = checked("2026-03-02", "2026-03-23").unwrap_err().to_string();
        assert!(err.contains("at least 28 days"), "{err}");
    }

    #[test]
    fn refusals_name_only_the_querys_own_spelling() {
        let mut absent = raw("2026-03-02", "2026-06-01");
        absent.insert("start".into(), RawValue::Absent);
        assert!(refusal(&absent).contains("parameter `start`: no value"));
        let mut stranger = raw("2026-03-02", "2026-06-01");
        stranger.insert("<script>".into(), RawValue::Absent);
        let err = refusal(&stranger);
        assert!(err.contains("does not declare, with no value"), "{err}");
        stranger.insert("<script>".into(), RawValue::Int(1));
        let err = refusal(&stranger);
        assert!(err.contains("its parameters are: start, end"), "{err}");
        assert!(!err.contains("script"), "{err}");
        let mut wrong = raw("2026-03-02", "2026-06-01");
        wrong.insert("start".into(), RawValue::Int(20260302));
        let err = refusal(&wrong);
        assert!(err.contains("expected date, got an integer"), "{err}");
        wrong.remove("start");
        assert!(refusal(&wrong).contains("parameter `start`: missing"));
        assert!(refusal(&raw("2023-01-01", "2026-06-01")).contains("out of range"));
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
}
