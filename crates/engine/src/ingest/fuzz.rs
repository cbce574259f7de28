//! Fuzzing the ingests, every record a caller streams in: records of each kind ([`records`]),
//! purchases as Arrow IPC ([`arrow`]), and both through the store's staging area ([`staging`]).
//! Whatever arrives, an ingest counts or refuses each record by a fixed reason that quotes no
//! value, never panics, and a write it refuses leaves the data directory as it was.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use cleanroom_core::keys::KeyStore;
use cleanroom_core::rules::Rules;
use cleanroom_core::token::MasterSecret;
use cleanroom_fuzzing::{apply, edits, marker};
use datafusion::arrow::record_batch::RecordBatch;
use proptest::prelude::*;
use proptest::sample::select;

use super::{IngestReport, Sink, Table};
use crate::{Error, Result};

mod arrow;
mod records;
mod staging;

const RULES: &str = include_str!("../../../../sample_data/rules.toml");

fn rules() -> Rules {
    Rules::parse(RULES).expect("the sample rules load")
}

fn secret() -> MasterSecret {
    MasterSecret::new(vec![9; 32]).expect("32 bytes")
}

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-01T09:00:00+09:00")
        .expect("a time")
        .to_utc()
}

/// A key store of its own for one case, in a directory removed with it.
fn key_store() -> (tempfile::TempDir, Arc<KeyStore>) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let keys = KeyStore::open(&dir.path().join("keys"), secret()).expect("a key store");
    (dir, keys)
}

/// Every reason an ingest gives for a record it skips (or, strict, refuses), beside the
/// identifiers' own ([`cleanroom_fuzzing::IDENTIFIER_REASONS`]).
const REASONS: &[&str] = &[
    "member_id: empty",
    "member_id: duplicate",
    "prefecture: not a Japanese prefecture",
    "purchased_at: not an RFC 3339 timestamp",
    "quantity: missing",
    "quantity: must be positive",
    "amount: missing",
    "amount: must not be negative",
    "category: not in the configured domain",
    "purpose: not configured",
    "action: must be granted or withdrawn",
    "at: not an RFC 3339 timestamp",
    "expires_at: not an RFC 3339 timestamp",
    "notice_version: must be positive",
    "record: invalid",
    "record: mixes raw identifiers and tokens",
    "record: no identifier",
    "attribute: not one of the partner's declared values",
    "token: key version is not one the collaboration accepts now",
    "token: key version differs from the list's first record",
    "token: malformed",
];

/// The batches an ingest hands on, kept to count.
#[derive(Default)]
struct Batches(Vec<(Table, RecordBatch)>);

impl Sink for Batches {
    fn write(&mut self, table: &Table, batch: RecordBatch) -> Result<()> {
        self.0.push((table.clone(), batch));
        Ok(())
    }
}

impl Batches {
    /// Rows written to the tables `of` picks.
    fn rows(&self, of: impl Fn(&Table) -> bool) -> u64 {
        let rows = self
            .0
            .iter()
            .filter(|(t, _)| of(t))
            .map(|(_, b)| b.num_rows());
        rows.sum::<usize>() as u64
    }
}

/// Feeds `chunks` to `ingest` and finishes it, as a stream would.
fn run<I: super::Ingest>(
    mut ingest: I,
    chunks: Vec<Vec<I::Input>>,
    sink: &mut dyn Sink,
) -> Result<IngestReport> {
    for chunk in chunks {
        ingest.push(chunk, sink)?;
    }
    ingest.finish(sink)
}

/// What a lenient ingest of `records` records must report: each one seen, reasons only from
/// [`REASONS`], and each record kept or refused, once when `once` (a member or a customer is
/// kept with one bad identifier of two, and counted for it too).
fn check_lenient(report: &IngestReport, records: usize, once: bool) -> Result<(), TestCaseError> {
    prop_assert_eq!(report.received, records as u64);
    for reason in report.rejected.keys() {
        let known = REASONS.contains(&reason.as_str())
            || cleanroom_fuzzing::IDENTIFIER_REASONS.contains(&reason.as_str());
        prop_assert!(known, "reason {reason:?}");
    }
    let refused: u64 = report.rejected.values().sum();
    if once {
        prop_assert_eq!(report.accepted + refused, records as u64);
    } else {
        prop_assert!(report.accepted <= records as u64);
        prop_assert!(report.accepted + refused >= records as u64);
    }
    Ok(())
}

/// What a strict ingest of the same records must do: succeed exactly as the lenient one when it
/// refused nothing, else refuse the whole stream, naming a record and one of the reasons the
/// lenient one counted, and nothing of the record's values.
fn check_strict(
    strict: Result<IngestReport>,
    lenient: &IngestReport,
    records: usize,
) -> Result<(), TestCaseError> {
    match strict {
        Ok(report) => prop_assert_eq!(&report, lenient),
        Err(Error::Domain(cleanroom_core::Error::Input(message))) => {
            prop_assert!(!lenient.rejected.is_empty(), "refused: {message}");
            let (record, reason) = message
                .strip_prefix("record ")
                .and_then(|m| m.split_once(": "))
                .ok_or_else(|| TestCaseError::fail(format!("not a record's error: {message}")))?;
            let record: usize = record
                .parse()
                .map_err(|_| TestCaseError::fail(message.clone()))?;
            prop_assert!((1..=records).contains(&record), "{message}");
            prop_assert!(lenient.rejected.contains_key(reason), "{message}");
        }
        Err(other) => prop_assert!(false, "not an input error: {other:?}"),
    }
    Ok(())
}

/// A field's text: mostly from `pool` (what exports hold, and their near misses), sometimes
/// one of them mutated, any text, or the marker no error may quote.
fn field(pool: &'static [&'static str]) -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        6 => select(pool).prop_map(str::to_string),
        2 => (select(pool), edits(JUNK, 2)).prop_map(|(text, edits)| apply(text, &edits)),
        1 => "(?s).{0,12}",
        1 => Just(marker()),
    ]
}

/// What mutates a field: separators, spaces, full-width forms, controls.
const JUNK: &[&str] = &[
    " ", "\t", "\n", "\u{0}", "\u{3000}", "-", "+", ":", "T", "Z", ".", "@", "0", "9", "０", "ー",
];

/// Chunks of records as a stream brings them: a few, of any size, some empty.
fn chunks<T: std::fmt::Debug>(
    record: impl Strategy<Value = T> + Clone,
) -> impl Strategy<Value = Vec<Vec<T>>> {
    proptest::collection::vec(proptest::collection::vec(record, 0..10), 0..4)
}
