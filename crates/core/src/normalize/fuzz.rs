//! Fuzzing the normalization of e-mails and phone numbers, which every identifier of an ingest
//! or a partner's list passes through: any text, and the sample files' identifiers mutated
//! (full-width forms, separators, stray characters), either normalize to a canonical form that
//! normalizes to itself, or are rejected with one of the fixed reasons, which quote nothing.

use cleanroom_fuzzing::{apply, config, edits};
use proptest::prelude::*;

use super::*;

/// Every reason [`email`] and [`phone`] give.
const REASONS: &[&str] = cleanroom_fuzzing::IDENTIFIER_REASONS;

/// Identifiers as the sample exports and lists spell them.
const SAMPLES: &[&str] = &[
    "ishii.ren82@example.ne.jp",
    "manabu_murakami933@EXAMPLE.NE.JP",
    "Taro.Yamada+shop@GMail.com",
    "ｔａｒｏ＠ｅｘａｍｐｌｅ．ｊｐ",
    "090-0614-1726",
    "0309005280",
    "080-0075-1333",
    "+81 90 1234 5678",
    "０９０ー１２３４ー５６７８",
    "(03) 1234-5678",
];

/// Pieces that push an identifier across each of the rules.
const POOL: &[&str] = &[
    "@",
    "@@",
    ".",
    "+",
    "-",
    " ",
    "\t",
    "\u{3000}",
    "\u{a0}",
    "\u{200b}",
    "０",
    "９",
    "ー",
    "\u{2212}",
    "(",
    ")",
    "0",
    "81",
    "gmail.com",
    "GMAIL.COM",
    "example.jp",
    "ﬀ",
    "Å",
    "ß",
    "\u{0}",
    "\u{fe0f}",
    "\u{0301}",
    "１２３４５６７８９０１２３４５６",
];

fn check_email(raw: &str) -> std::result::Result<(), TestCaseError> {
    match email(raw) {
        Ok(normalized) => {
            prop_assert_eq!(normalized.matches('@').count(), 1);
            prop_assert!(!normalized.chars().any(char::is_whitespace));
            prop_assert!(!normalized.chars().any(|c| c.is_ascii_uppercase()));
            prop_assert_eq!(email(&normalized), Ok(normalized.clone()));
        }
        Err(reason) => prop_assert!(REASONS.contains(&reason.0), "{}", reason),
    }
    if raw.is_ascii() {
        prop_assert_eq!(
            super::tests::email_ascii_owned(raw.as_bytes()),
            email_reference(raw)
        );
    }
    Ok(())
}

fn check_phone(raw: &str) -> std::result::Result<(), TestCaseError> {
    match phone(raw) {
        Ok(normalized) => {
            let digits = normalized.strip_prefix('+').expect("E.164 starts with +");
            prop_assert!(digits.chars().all(|c| c.is_ascii_digit()));
            prop_assert!((E164_MIN_DIGITS..=E164_MAX_DIGITS).contains(&digits.len()));
            prop_assert!(!digits.starts_with('0'));
            prop_assert_eq!(phone(&normalized), Ok(normalized.clone()));
        }
        Err(reason) => prop_assert!(REASONS.contains(&reason.0), "{}", reason),
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn any_text_normalizes_canonically_or_gets_a_fixed_reason(raw in "(?s).{0,64}") {
        check_email(&raw)?;
        check_phone(&raw)?;
    }

    #[test]
    fn any_ascii_takes_the_fast_path_to_the_same_result(raw in "[\\x00-\\x7f]{0,40}") {
        check_email(&raw)?;
    }

    #[test]
    fn sample_identifiers_mutated_normalize_canonically_or_get_a_fixed_reason(
        sample in proptest::sample::select(SAMPLES),
        edits in edits(POOL, 4),
    ) {
        let raw = apply(sample, &edits);
        check_email(&raw)?;
        check_phone(&raw)?;
    }
}
