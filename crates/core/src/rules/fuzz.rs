//! Fuzzing the rules file: any text, TOML assembled from its own syntax, and the sample file
//! mutated either load as rules that hold every promise of [`Rules::validate`], or are refused
//! with a precise config error.

use cleanroom_fuzzing::{TOML_POOL, apply, config, edits, precise};
use proptest::prelude::*;

use super::*;

const SAMPLE: &str = include_str!("../../../../sample_data/rules.toml");

/// Parses `text` as a rules file and checks the outcome.
fn check(text: &str) -> std::result::Result<(), TestCaseError> {
    match Rules::parse(text) {
        Ok(rules) => holds(&rules),
        Err(Error::Config(message)) => precise(&message),
        Err(other) => Err(TestCaseError::fail(format!(
            "not a config error: {other:?}"
        ))),
    }
}

/// What validation promises of the rules it accepts.
fn holds(rules: &Rules) -> std::result::Result<(), TestCaseError> {
    prop_assert!(rules.validate().is_ok());
    prop_assert!((2..=MAX_K).contains(&rules.privacy.k_floor));
    let mut partners = BTreeSet::new();
    for contract in rules.contracts.values() {
        prop_assert!(rules.partners.contains_key(&contract.partner));
        prop_assert!(rules.purposes.contains_key(&contract.purpose));
        prop_assert!(partners.insert(&contract.partner), "two contracts");
        prop_assert!(contract.protection.guarantee().is_ok());
        let k = rules.effective_k(contract, 0);
        prop_assert!(contract.protection.min_audience >= 5 * k);
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn any_text_is_valid_rules_or_a_precise_error(text in "(?s).{0,512}") {
        check(&text)?;
    }

    #[test]
    fn toml_of_its_own_syntax_is_valid_rules_or_a_precise_error(
        parts in proptest::collection::vec(proptest::sample::select(TOML_POOL), 0..48)
    ) {
        check(&parts.concat())?;
    }

    #[test]
    fn the_sample_mutated_is_valid_rules_or_a_precise_error(edits in edits(TOML_POOL, 6)) {
        check(&apply(SAMPLE, &edits))?;
    }
}

proptest! {
    // Each case writes a file: fewer of them.
    #![proptest_config(config(64))]

    #[test]
    fn any_bytes_in_the_file_are_valid_rules_or_a_precise_error(
        bytes in proptest::collection::vec(any::<u8>(), 0..512)
    ) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("rules.toml");
        std::fs::write(&path, &bytes).expect("written");
        match Rules::load(&path) {
            Ok(rules) => holds(&rules)?,
            Err(Error::Config(message)) => precise(&message)?,
            Err(other) => prop_assert!(false, "not a config error: {other:?}"),
        }
    }
}
