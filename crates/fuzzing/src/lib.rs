//! What the fuzz tests of the clean room's parsers share (each parser has a `fuzz` test module
//! beside it, in the crate that has the parser): how many cases to run, near-valid mutations of
//! a sample, and the check that an error is precise and bounded. A dev-dependency only.

use proptest::prelude::*;

/// Cases of a fuzz property: `ci` by default (the whole set stays well under a minute in a
/// debug build). For a longer run, `CLEANROOM_FUZZ_CASES=N` runs N cases of a property that runs
/// [`STANDARD_CASES`] in CI, and the others in proportion (fewer of the costly ones, which plan
/// SQL or write files). Failures are reported, not saved beside the sources: a real one becomes
/// a named unit test.
pub fn config(ci: u32) -> ProptestConfig {
    let cases = std::env::var("CLEANROOM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(ci, |n| {
            let scaled = n.saturating_mul(u64::from(ci)) / u64::from(STANDARD_CASES);
            u32::try_from(scaled.max(1)).unwrap_or(u32::MAX)
        });
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The CI cases of a property of standard cost; `CLEANROOM_FUZZ_CASES` scales from it.
pub const STANDARD_CASES: u32 = 256;

/// A value planted in inputs: an error may quote a short excerpt of it, never all of it.
pub fn marker() -> String {
    MARKER_UNIT.repeat(70)
}

const MARKER_UNIT: &str = "Zq7";

/// The longest error message any parser here may give, whatever the input's size.
pub const MAX_MESSAGE: usize = 1024;

/// Checks that an error message is fit to show: one line, bounded, quoting at most an excerpt
/// of the planted [`marker`] (64 characters: the longest id a rules file may hold).
pub fn precise(message: &str) -> Result<(), TestCaseError> {
    prop_assert!(
        !message.chars().any(char::is_control),
        "a control character in {message:?}"
    );
    prop_assert!(message.len() <= MAX_MESSAGE, "too long: {message:?}");
    prop_assert!(
        !message.contains(&MARKER_UNIT.repeat(22)),
        "echoes the input: {message:?}"
    );
    Ok(())
}

/// One change to a sample file.
#[derive(Debug, Clone)]
pub enum Edit {
    /// Replaces up to `len` bytes at `at` (modulo the text's length) with `text`.
    Splice {
        /// Where, modulo the text's length.
        at: usize,
        /// How many bytes are replaced.
        len: usize,
        /// What replaces them.
        text: String,
    },
    /// Repeats a line.
    DuplicateLine {
        /// Which, modulo the number of lines.
        at: usize,
    },
    /// Replaces what follows the first `=` of a line (a TOML value) with `value`.
    Value {
        /// Which line, modulo the number of lines with a `=`.
        at: usize,
        /// The new value.
        value: String,
    },
}

/// Up to `max` edits, inserting text from `pool` (the syntax and values that matter to the
/// parser), arbitrary text or the [`marker`].
pub fn edits(
    pool: &'static [&'static str],
    max: usize,
) -> impl Strategy<Value = Vec<Edit>> + Clone {
    let text = prop_oneof![
        4 => proptest::sample::select(pool).prop_map(str::to_string),
        1 => ".{0,8}",
        1 => Just(marker()),
    ];
    let edit = prop_oneof![
        3 => (any::<usize>(), 0..24usize, text.clone())
            .prop_map(|(at, len, text)| Edit::Splice { at, len, text }),
        1 => any::<usize>().prop_map(|at| Edit::DuplicateLine { at }),
        3 => (any::<usize>(), text).prop_map(|(at, value)| Edit::Value { at, value }),
    ];
    proptest::collection::vec(edit, 1..=max)
}

/// `base` with `edits` applied in order, every position kept on a character boundary.
pub fn apply(base: &str, edits: &[Edit]) -> String {
    let mut text = base.to_string();
    for edit in edits {
        match edit {
            Edit::Splice { at, len, text: new } => {
                let start = boundary(&text, at % (text.len() + 1));
                let end = boundary(&text, start.saturating_add(*len));
                text.replace_range(start..end, new);
            }
            Edit::DuplicateLine { at } => {
                let lines = lines(&text);
                if let Some(&(start, end)) = lines.get(at % lines.len().max(1)) {
                    let copy = format!("{}\n", &text[start..end]);
                    text.insert_str(start, &copy);
                }
            }
            Edit::Value { at, value } => {
                let lines: Vec<(usize, usize)> = lines(&text)
                    .into_iter()
                    .filter(|&(start, end)| text[start..end].contains('='))
                    .collect();
                if let Some(&(start, end)) = lines.get(at % lines.len().max(1)) {
                    let eq = start + text[start..end].find('=').expect("has =") + 1;
                    text.replace_range(eq..end, &format!(" {value}"));
                }
            }
        }
    }
    text
}

/// Where each line of `text` starts and ends (its newline left out).
fn lines(text: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut start = 0;
    for line in text.split_inclusive('\n') {
        spans.push((start, start + line.trim_end_matches('\n').len()));
        start += line.len();
    }
    spans
}

/// The character boundary at or before `at`, within `text`.
fn boundary(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// Values and syntax of TOML that reach every branch of a deserializer and its checks: every
/// type, the limits of each number type, dates that do not exist, broken quoting.
pub const TOML_POOL: &[&str] = &[
    "\n",
    "=",
    "\"",
    "'",
    "'''",
    "\"\"\"",
    "[",
    "]",
    "[[",
    "]]",
    "{",
    "}",
    ",",
    ".",
    "#",
    "\\",
    "0",
    "1",
    "-1",
    "2",
    "1000",
    "1001",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "-9223372036854775808",
    "99999999999999999999",
    "0.0",
    "-0.0",
    "1e-300",
    "1e308",
    "1e400",
    "nan",
    "inf",
    "-inf",
    "true",
    "false",
    "\"\"",
    "\"x\"",
    "[]",
    "[\"a\", \"a\"]",
    "{}",
    "1979-05-27",
    "1979-05-27T07:32:00Z",
    "07:32:00",
    "2027-02-30",
    "0000-01-01",
    "9999-12-31",
    "\"+262143-12-31\"",
    "\"-262144-01-01\"",
    "\"2027-1-1\"",
    "\"unknown\"",
    "\u{feff}",
    "\u{0}",
    "\r\n",
    "東京都",
    "\u{202e}",
    "[privacy]\n",
    "[[principals]]\n",
    "[contracts.x]\n",
    "[partners.x]\n",
    "[purposes.x]\n",
    "[domains]\n",
    "[limits]\n",
    "[[params]]\n",
    "[[dimensions]]\n",
    "k = 0\n",
    "k_floor = 1\n",
    "epsilon = nan\n",
    "delta = 1.0\n",
    "key_version = 0\n",
    "type = \"date\"\n",
    "type = \"int\"\n",
    "type = \"enum\"\n",
    "granularity = \"week\"\n",
    "after = \"start\"\n",
    "min_window_days = 0\n",
    "domain = \"prefecture\"\n",
    "values = []\n",
    "metric_bounds = { x = 0 }\n",
    "max_rows_per_member = 65\n",
    "role = \"partner\"\n",
    "token_sha256 = \"00\"\n",
];

/// Every reason normalizing an e-mail address or a phone number gives (`cleanroom-core`'s
/// `normalize`): the identifier fuzzers of core and of the ingests accept exactly these.
pub const IDENTIFIER_REASONS: &[&str] = &[
    "email: empty",
    "email: contains whitespace",
    "email: no @",
    "email: more than one @",
    "email: empty local part",
    "email: invalid domain",
    "phone: empty",
    "phone: no digits",
    "phone: invalid character",
    "phone: too short",
    "phone: too long",
    "phone: no country code",
    "phone: invalid country code",
];

/// A query file with the parameter kinds the reviewed ones lack (an int range, a value list),
/// for the query-file and parameter fuzzers.
pub const INT_AND_VALUES_QUERY: &str = r#"
id = "int_and_values"
version = 1
title = "t"
description = "d"
purposes = ["product_insight"]
contract_clause = "c"
partners = ["sakura_foods"]
k = 10
sql = "SELECT COUNT(*) AS n FROM purchases WHERE quantity >= $min_quantity AND brand = $brand"
metrics = ["n"]
[[params]]
name = "min_quantity"
type = "int"
description = "q"
min = -3
max = 40
[[params]]
name = "brand"
type = "enum"
description = "b"
values = ["Sakura Cha", "Kumo Air"]
"#;
