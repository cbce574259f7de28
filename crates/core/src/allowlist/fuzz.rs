//! Fuzzing the allow-list's query files: any text, and the reviewed files mutated, either load
//! as queries that hold every promise of [`QueryDef::validate`], or are refused with a precise
//! config error. (A caller's parameter values are fuzzed where they are typed, in the engine's
//! `guard::params`.)

use std::sync::OnceLock;

use cleanroom_fuzzing::{TOML_POOL, apply, config, edits, precise};
use proptest::prelude::*;

use super::*;

const RULES: &str = include_str!("../../../../sample_data/rules.toml");

/// The reviewed query files, and one with the parameter kinds they lack (an int, a value list).
const QUERIES: &[&str] = &[
    include_str!("../../../../queries/appliance_buyers_by_owned_model.toml"),
    include_str!("../../../../queries/brand_buyers_by_prefecture.toml"),
    include_str!("../../../../queries/category_buyers_by_age_band.toml"),
    include_str!("../../../../queries/matched_overlap.toml"),
    include_str!("../../../../queries/repeat_purchase_rate.toml"),
    cleanroom_fuzzing::INT_AND_VALUES_QUERY,
];

fn rules() -> &'static Rules {
    static PARSED: OnceLock<Rules> = OnceLock::new();
    PARSED.get_or_init(|| Rules::parse(RULES).expect("the sample rules load"))
}

fn queries() -> &'static [QueryDef] {
    static PARSED: OnceLock<Vec<QueryDef>> = OnceLock::new();
    PARSED.get_or_init(|| {
        QUERIES
            .iter()
            .map(|text| {
                let def = QueryDef::parse(text).expect("a sample query parses");
                def.validate(rules()).expect("a sample query is valid");
                def
            })
            .collect()
    })
}

/// Parses and validates `text` as a query file and checks the outcome.
fn check_file(text: &str) -> std::result::Result<(), TestCaseError> {
    let outcome = QueryDef::parse(text).and_then(|def| def.validate(rules()).map(|()| def));
    match outcome {
        Ok(def) => holds(&def),
        Err(Error::Config(message)) => precise(&message),
        Err(other) => Err(TestCaseError::fail(format!(
            "not a config error: {other:?}"
        ))),
    }
}

/// What validation promises of a query it accepts: its content hash is a function of its text,
/// and every parameter admits a value (a range not empty and, for dates, inside years 1 to 9999
/// where snapping cannot overflow; a value list not empty for every partner the query is open
/// to), so the guard's example values are its own.
fn holds(def: &QueryDef) -> std::result::Result<(), TestCaseError> {
    let again = QueryDef::parse(&def.source_text).expect("parsed once");
    prop_assert_eq!(&again.content_sha256, &def.content_sha256);
    prop_assert!(!def.metrics.is_empty() && def.k >= rules().privacy.k_floor);
    for spec in &def.params {
        match (spec.kind, &spec.min, &spec.max) {
            (ParamKind::Date, Some(min), Some(max)) => {
                let (min, max) = (bound_date(min), bound_date(max));
                let years =
                    NaiveDate::from_ymd_opt(1, 1, 1)..=NaiveDate::from_ymd_opt(9999, 12, 31);
                prop_assert!(years.contains(&min) && years.contains(&max), "{spec:?}");
                prop_assert!(
                    min.zip(max).is_some_and(|(min, max)| min <= max),
                    "{spec:?}"
                );
            }
            (ParamKind::Int, Some(toml::Value::Integer(min)), Some(toml::Value::Integer(max))) => {
                prop_assert!(min <= max, "{spec:?}");
            }
            (ParamKind::Enum, _, _) => {
                for partner in &def.partners {
                    prop_assert!(!def.allowed_values(spec, rules(), partner).is_empty());
                }
            }
            _ => prop_assert!(false, "a parameter without its constraints: {spec:?}"),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn any_text_is_a_valid_query_or_a_precise_error(text in "(?s).{0,512}") {
        check_file(&text)?;
    }

    #[test]
    fn a_query_file_mutated_is_a_valid_query_or_a_precise_error(
        q in 0..QUERIES.len(),
        edits in edits(TOML_POOL, 6),
    ) {
        check_file(&apply(QUERIES[q], &edits))?;
    }
}

/// The mutations above start from files that load.
#[test]
fn the_reviewed_queries_hold_what_validation_promises() {
    for def in queries() {
        holds(def).unwrap_or_else(|e| panic!("{}: {e}", def.id));
    }
}
