//! Fuzzing what the guard reads of a query file and a request: the SQL of a query (the reviewed
//! queries' SQL mutated, nested deep, or any text) is parsed, planned and checked as loading the
//! allow-list does, and either passes or is refused with a guard error that quotes none of it; a
//! caller's parameter values (any names, types and text; for the reviewed queries and for
//! queries whose date bounds reach the ends of the calendar) are typed and snapped within their
//! declared constraints, or refused with an input error that quotes nothing the caller sent.

use std::collections::BTreeMap;

use chrono::NaiveDate;
use cleanroom_core::allowlist::{ParamKind, QueryDef, bound_date};
use cleanroom_core::rules::Rules;
use cleanroom_fuzzing::{apply, config, edits, marker, precise};
use proptest::prelude::*;
use proptest::sample::select;

use super::params::RawValue;
use crate::Error;

const RULES: &str = include_str!("../../../../sample_data/rules.toml");
const QUERIES: &[&str] = &[
    include_str!("../../../../queries/appliance_buyers_by_owned_model.toml"),
    include_str!("../../../../queries/brand_buyers_by_prefecture.toml"),
    include_str!("../../../../queries/category_buyers_by_age_band.toml"),
    include_str!("../../../../queries/matched_overlap.toml"),
    include_str!("../../../../queries/repeat_purchase_rate.toml"),
];

fn rules() -> Rules {
    Rules::parse(RULES).expect("the sample rules load")
}

fn query(q: usize) -> QueryDef {
    QueryDef::parse(QUERIES[q]).expect("a sample query parses")
}

/// SQL's syntax and the safe views' names: what turns a reviewed query into one the guard must
/// refuse (or another it may accept).
const SQL: &[&str] = &[
    "SELECT ",
    " FROM ",
    " WHERE ",
    " GROUP BY ",
    " HAVING COUNT(*) > 1",
    " ORDER BY 1",
    " LIMIT 1",
    " UNION ALL SELECT 1",
    "(",
    ")",
    ",",
    "*",
    "'",
    "\"",
    "--",
    "/*",
    "*/",
    ";",
    "$start",
    "$end",
    "$brand",
    "$1",
    "$",
    "?",
    "1e999",
    "9223372036854775808",
    "-",
    "/",
    "%",
    "NULL",
    "CAST(",
    " AS ",
    "INT",
    "VARCHAR",
    "INTERVAL '1' DAY",
    "COUNT(",
    "DISTINCT ",
    "SUM(",
    "AVG(",
    "MAX(",
    "m.member_key",
    "p.member_key",
    "members",
    "purchases",
    "consent_events",
    " JOIN ",
    " ON ",
    "CASE WHEN ",
    " THEN ",
    " ELSE ",
    " END",
    "EXISTS (",
    " IN (",
    "WITH x AS (",
    "unnest(",
    "now()",
    "random()",
    "p.amount",
    "m.age_band",
    " OVER ()",
    "Zq7Zq7Zq7Zq7Zq7Zq7",
];

/// Plans and checks `sql` as query `q`'s, for the first partner it is open to.
fn check_sql(q: usize, sql: String) -> Result<(), TestCaseError> {
    let rules = rules();
    let mut def = query(q);
    def.sql = sql;
    let partner = def.partners[0].clone();
    let (_, contract) = rules.contract_of(&partner).expect("a contract");
    match super::check_now(&rules, &def, contract, &partner) {
        Ok(()) => Ok(()),
        Err(Error::Guard(message)) => precise(&message),
        Err(other) => Err(TestCaseError::fail(format!(
            "not a guard refusal: {other:?}"
        ))),
    }
}

/// A reviewed query's SQL, nested `depth` deep in its WHERE clause: in parentheses, or as a
/// chain of additions.
fn nested(q: usize, depth: usize, chain: bool) -> String {
    let sql = query(q).sql;
    let deep = if chain {
        format!("1{} = {}", "+1".repeat(depth), depth + 1)
    } else {
        format!("{}1 = 1{}", "(".repeat(depth), ")".repeat(depth))
    };
    match sql.find("WHERE ") {
        Some(at) => format!("{}WHERE {deep} AND {}", &sql[..at], &sql[at + 6..]),
        None => sql,
    }
}

proptest! {
    // Each case plans a query in a fresh session: fewer of them.
    #![proptest_config(config(48))]

    #[test]
    fn a_reviewed_querys_sql_mutated_passes_or_is_refused_precisely(
        q in 0..QUERIES.len(),
        edits in edits(SQL, 4),
    ) {
        check_sql(q, apply(&query(q).sql, &edits))?;
    }

    #[test]
    fn any_text_as_sql_is_refused_precisely(q in 0..QUERIES.len(), sql in "(?s).{0,64}") {
        check_sql(q, sql)?;
    }

    #[test]
    fn deeply_nested_sql_passes_or_is_refused_precisely(
        q in 0..QUERIES.len(),
        depth in 0..2000usize,
        chain in any::<bool>(),
    ) {
        check_sql(q, nested(q, depth, chain))?;
    }
}

/// Dates a request or a query file might hold: near misses of the format, near the bounds, the
/// ends of the calendar.
const DATES: &[&str] = &[
    "2024-01-01",
    "2024-01-08",
    "2026-02-01",
    "2026-02-15",
    "2027-12-01",
    "2027-12-31",
    "2028-01-01",
    "2028-01-03",
    "2026-02-29",
    "2026-13-01",
    "2026-1-1",
    " 2026-02-01",
    "2026-02-01T00:00:00Z",
    "２０２６-０２-０１",
    "",
    "0001-01-01",
    "0001-01-08",
    "9999-12-31",
    "9999-12-15",
    "+262142-12-31",
    "+262142-12-15",
    "+262143-12-31",
    "-262143-01-01",
    "-262144-01-01",
    "-262144-01-05",
];

/// Text a caller might send as an enum value.
const WORDS: &[&str] = &[
    "Sakura Cha",
    "sakura cha",
    "Sakura Cha ",
    "Kumo Air",
    "東京都",
    "東京",
    "F",
    "20-29",
    "unknown",
    "gold",
    "KA-100",
    "beverages",
    "start",
    "end",
    "",
];

fn text(pool: &'static [&'static str]) -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        4 => select(pool).prop_map(str::to_string),
        1 => (any::<i32>(), 0..14u32, 0..33u32)
            .prop_map(|(y, m, d)| format!("{y:+}-{m:02}-{d:02}")),
        1 => "(?s).{0,16}",
        1 => Just(marker()),
    ]
}

fn raw_value() -> impl Strategy<Value = RawValue> + Clone {
    prop_oneof![
        4 => text(DATES).prop_map(RawValue::Date),
        2 => text(DATES).prop_map(RawValue::Str),
        2 => text(WORDS).prop_map(RawValue::Str),
        1 => any::<i64>().prop_map(RawValue::Int),
        1 => Just(RawValue::Absent),
    ]
}

/// A query with its date bounds replaced by `bounds` (min and max of each date parameter in
/// turn), as an analyst could write it: the reviewed ones, and one with an int and a value list.
fn with_bounds(q: usize, bounds: &[Option<&str>]) -> String {
    let mut text = QUERIES
        .get(q)
        .copied()
        .unwrap_or(INT_AND_VALUES)
        .to_string();
    for (i, bound) in bounds.iter().enumerate() {
        let Some(bound) = bound else { continue };
        let key = if i % 2 == 0 { "\nmin = " } else { "\nmax = " };
        let nth = text.match_indices(key).nth(i / 2).map(|(at, _)| at);
        if let Some(at) = nth {
            let end = text[at + 1..].find('\n').map_or(text.len(), |e| at + 1 + e);
            text.replace_range(at..end, &format!("{key}\"{bound}\""));
        }
    }
    text
}

const INT_AND_VALUES: &str = cleanroom_fuzzing::INT_AND_VALUES_QUERY;

/// A request: which query (with which date bounds), the caller's values for its parameters
/// (each declared one most of the time, now and then a name it does not declare), the partner.
type Request = (QueryDef, BTreeMap<String, RawValue>, &'static str);

/// A value for one parameter: any, or a date near one of the query's own date bounds (where
/// snapping meets the ends of a range, and of the calendar).
#[derive(Debug, Clone)]
enum Value {
    Any(RawValue),
    NearBound(usize, i32),
}

fn request() -> impl Strategy<Value = Request> {
    // Each bound kept or replaced on its own: the end of a window can reach the calendar's end
    // while the rest stays valid.
    let bounds = proptest::collection::vec(proptest::option::weighted(0.3, select(DATES)), 4);
    let value = prop_oneof![
        3 => raw_value().prop_map(Value::Any),
        1 => (any::<usize>(), -40..40i32).prop_map(|(b, days)| Value::NearBound(b, days)),
    ];
    let values = proptest::collection::vec(proptest::option::weighted(0.9, value), 6);
    let extra = proptest::option::weighted(0.1, (text(WORDS), raw_value()));
    let partner = select(&["sakura_foods", "kumo_denki", "nobody"][..]);
    (0..=QUERIES.len(), bounds, values, extra, partner).prop_filter_map(
        "a query whose bounds do not validate",
        |(q, bounds, values, extra, partner)| {
            let def = QueryDef::parse(&with_bounds(q, &bounds)).ok()?;
            def.validate(&rules()).ok()?;
            let dates: Vec<NaiveDate> = def
                .params
                .iter()
                .flat_map(|p| [&p.min, &p.max])
                .filter_map(|b| b.as_ref().and_then(bound_date))
                .collect();
            let near = |b: usize, days: i32| {
                let date = dates.get(b % dates.len().max(1))?;
                let moved = date.checked_add_signed(chrono::Duration::days(days.into()))?;
                Some(RawValue::Date(moved.to_string()))
            };
            let mut raw: BTreeMap<String, RawValue> = def
                .params
                .iter()
                .zip(values)
                .filter_map(|(spec, value)| {
                    let value = match value? {
                        Value::Any(raw) => raw,
                        Value::NearBound(b, days) => near(b, days)?,
                    };
                    Some((spec.name.clone(), value))
                })
                .collect();
            raw.extend(extra);
            Some((def, raw, partner))
        },
    )
}

/// A refusal quotes nothing the caller sent: no value, no name the query does not declare.
fn quotes_nothing_sent(
    def: &QueryDef,
    raw: &BTreeMap<String, RawValue>,
    message: &str,
) -> Result<(), TestCaseError> {
    precise(message)?;
    for (name, value) in raw {
        let text = match value {
            RawValue::Str(s) | RawValue::Date(s) => Some(s),
            _ => None,
        };
        // Text the query itself holds (a bound, a declared name) may be named by the message,
        // and a date once typed (a window's ends after snapping), written as the guard writes it.
        for sent in [Some(name), text].into_iter().flatten().map(|s| s.trim()) {
            let typed =
                NaiveDate::parse_from_str(sent, "%Y-%m-%d").is_ok_and(|d| d.to_string() == sent);
            if sent.len() >= 4 && !typed && !def.source_text.contains(sent) {
                prop_assert!(!message.contains(sent), "echoes {sent:?}: {message}");
            }
        }
    }
    Ok(())
}

/// Types and snaps a request, and checks the outcome: every declared parameter of its type,
/// within its range and allowed values, dates snapped within their range and windows long
/// enough; or a precise input error that quotes nothing the caller sent.
fn check_params((def, raw, partner): Request) -> Result<(), TestCaseError> {
    let rules = rules();
    let outcome = super::params::typed(&def, &raw, &rules, partner)
        .and_then(|typed| super::params::snap(&def, &typed));
    let snapped = match outcome {
        Ok(snapped) => snapped.shown(),
        Err(Error::Domain(cleanroom_core::Error::Input(message))) => {
            return quotes_nothing_sent(&def, &raw, &message);
        }
        Err(other) => {
            return Err(TestCaseError::fail(format!(
                "not an input error: {other:?}"
            )));
        }
    };
    prop_assert_eq!(snapped.len(), def.params.len());
    let date = |name: &str| NaiveDate::parse_from_str(&snapped[name], "%Y-%m-%d").ok();
    for spec in &def.params {
        match spec.kind {
            ParamKind::Date => {
                let d = date(&spec.name).expect("a date");
                prop_assert!(
                    spec.min
                        .as_ref()
                        .and_then(bound_date)
                        .is_none_or(|m| d >= m)
                );
                prop_assert!(
                    spec.max
                        .as_ref()
                        .and_then(bound_date)
                        .is_none_or(|m| d <= m)
                );
                if let (Some(after), Some(days)) = (&spec.after, spec.min_window_days) {
                    let start = date(after).expect("a date");
                    prop_assert!((d - start).num_days() >= i64::from(days));
                }
            }
            ParamKind::Int => {
                let i: i64 = snapped[&spec.name].parse().expect("an int");
                prop_assert!(!matches!(spec.min, Some(toml::Value::Integer(m)) if i < m));
                prop_assert!(!matches!(spec.max, Some(toml::Value::Integer(m)) if i > m));
            }
            ParamKind::Enum => {
                let allowed = def.allowed_values(spec, &rules, partner);
                prop_assert!(allowed.contains(&snapped[&spec.name]));
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn parameter_values_are_typed_and_snapped_within_bounds_or_refused_unquoted(
        request in request()
    ) {
        check_params(request)?;
    }
}

/// Found by the SQL fuzzer: a chain of two thousand additions overflowed the stack of the thread
/// planning it (DataFusion's planner copies an expression recursively), which aborts the
/// process. The guard refuses SQL that long before DataFusion reads it.
#[test]
fn a_chain_of_two_thousand_additions_is_refused_before_planning() {
    let rules = rules();
    let mut def = query(1);
    def.sql = nested(1, 1999, true);
    let (_, contract) = rules.contract_of("sakura_foods").expect("a contract");
    let refused = super::check_now(&rules, &def, contract, "sakura_foods").unwrap_err();
    assert!(
        refused.to_string().contains("the query is too long"),
        "{refused}"
    );
    // The reviewed queries are far from the bound.
    def.sql = nested(1, 400, true);
    assert!(!matches!(
        super::check_now(&rules, &def, contract, "sakura_foods"),
        Err(Error::Guard(m)) if m.contains("too long")
    ));
}
