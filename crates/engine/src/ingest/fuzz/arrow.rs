//! Purchases as Arrow IPC, as `cleanroom ingest` sends a CSV or Parquet export (and as any client
//! could): any bytes, and valid streams of every column type the ingest takes, truncated, with
//! bits flipped and lengths overwritten by the ends of their ranges, or compressed.

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, Int8Array, Int16Array, Int32Array, Int64Array, LargeStringArray, StringArray,
    StringViewArray, UInt8Array, UInt32Array, UInt64Array,
};
use datafusion::arrow::datatypes::{Field, Schema};
use datafusion::arrow::ipc::CompressionType;
use datafusion::arrow::ipc::writer::{IpcWriteOptions, StreamWriter};
use proptest::prelude::*;

use super::*;
use crate::ingest::{Ingest, PurchasesIngest};

const FIELDS: [&str; 8] = [
    "member_id",
    "purchased_at",
    "sku",
    "brand",
    "manufacturer",
    "category",
    "quantity",
    "amount",
];

/// Every refusal `push_arrow` gives a chunk, by how it begins (a column is named from the
/// sender's schema, as an excerpt).
const REFUSALS: &[&str] = &[
    "a chunk is not an Arrow IPC stream",
    "a chunk's Arrow IPC stream is damaged",
    "a chunk's Arrow IPC stream is compressed",
    "a chunk may decode to at most ",
    "a chunk has no column `",
    "column `",
];

/// One purchase: its six text fields and its two numbers (None: null).
pub(super) type Row = (Vec<Option<String>>, [Option<i64>; 2]);

/// A text column of any string type Arrow has, from `values` (None: null).
fn text_column(values: Vec<Option<String>>, kind: u8) -> ArrayRef {
    match kind % 3 {
        0 => Arc::new(StringArray::from(values)),
        1 => Arc::new(LargeStringArray::from(values)),
        _ => Arc::new(StringViewArray::from(values)),
    }
}

/// A whole-number column of one of Arrow's integer types, from `values` (cast as that type
/// casts them: an export's numbers, whatever their width).
fn whole_column(values: Vec<Option<i64>>, kind: u8) -> ArrayRef {
    let values = values.into_iter();
    match kind % 7 {
        0 => Arc::new(Int64Array::from_iter(values)),
        1 => Arc::new(Int32Array::from_iter(values.map(|v| v.map(|v| v as i32)))),
        2 => Arc::new(Int16Array::from_iter(values.map(|v| v.map(|v| v as i16)))),
        3 => Arc::new(Int8Array::from_iter(values.map(|v| v.map(|v| v as i8)))),
        4 => Arc::new(UInt64Array::from_iter(values.map(|v| v.map(|v| v as u64)))),
        5 => Arc::new(UInt32Array::from_iter(values.map(|v| v.map(|v| v as u32)))),
        _ => Arc::new(UInt8Array::from_iter(values.map(|v| v.map(|v| v as u8)))),
    }
}

/// One purchases chunk as Arrow IPC: `rows` rows, each column of the type `kinds` picks,
/// compressed as `compression` says (0: not at all).
pub(super) fn ipc(rows: &[Row], kinds: [u8; 8], compression: u8) -> Vec<u8> {
    named_ipc(rows, kinds, compression, &FIELDS.map(str::to_string))
}

/// [`ipc`] with its columns named `names`.
fn named_ipc(rows: &[Row], kinds: [u8; 8], compression: u8, names: &[String; 8]) -> Vec<u8> {
    let columns: Vec<ArrayRef> = (0..8)
        .map(|c| match c {
            6 | 7 => whole_column(rows.iter().map(|r| r.1[c - 6]).collect(), kinds[c]),
            _ => text_column(rows.iter().map(|r| r.0[c].clone()).collect(), kinds[c]),
        })
        .collect();
    let fields: Vec<Field> = names
        .iter()
        .zip(&columns)
        .map(|(name, column)| Field::new(name, column.data_type().clone(), true))
        .collect();
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).expect("a batch");
    let compression = match compression % 3 {
        0 => None,
        1 => Some(CompressionType::LZ4_FRAME),
        _ => Some(CompressionType::ZSTD),
    };
    let options = IpcWriteOptions::default()
        .try_with_compression(compression)
        .expect("compression is built in");
    let mut out = Vec::new();
    let mut writer =
        StreamWriter::try_new_with_options(&mut out, &batch.schema(), options).expect("a writer");
    writer.write(&batch).expect("written");
    writer.finish().expect("finished");
    drop(writer);
    out
}

/// Rows of a chunk: each text field `None` (null) now and then.
pub(super) fn rows() -> impl Strategy<Value = Vec<Row>> {
    let text = proptest::collection::vec(proptest::option::weighted(0.95, field(TEXTS)), 6);
    let whole = prop_oneof![-2..6i64, any::<i64>()];
    let wholes = [
        proptest::option::weighted(0.95, whole.clone()),
        proptest::option::weighted(0.95, whole),
    ];
    proptest::collection::vec((text, wholes), 0..12)
}

const TEXTS: &[&str] = &[
    "M0000001",
    "2026-02-02T12:47:15+09:00",
    "SCH-118",
    "Sakura Cha",
    "beverages",
    "",
];

/// Names a client might give a column: the record's own, near misses, what an export holds.
const FIELD_NAMES: &[&str] = &[
    "member_id",
    "Member_ID",
    "member_id ",
    "email",
    "full_name",
    "氏名",
    "",
    "amount\n",
];

/// A change to a valid stream's bytes.
#[derive(Debug, Clone)]
pub(super) enum Damage {
    /// Cut after `at` bytes.
    Truncate(usize),
    /// Flip bit `bit` of the byte at `at`.
    Flip(usize, u8),
    /// Overwrite the 8 (or 4) bytes at `at`, aligned, with a value at the end of its range:
    /// lengths and offsets the decoder reads.
    Word(usize, i64),
    Half(usize, i32),
    /// Append bytes.
    Append(Vec<u8>),
}

pub(super) fn damage() -> impl Strategy<Value = Vec<Damage>> {
    let extreme64 = prop_oneof![
        Just(i64::MAX),
        Just(i64::MIN),
        Just(-1i64),
        Just(1 << 40),
        Just(1 << 31),
        Just(0),
        any::<i64>()
    ];
    let extreme32 = prop_oneof![
        Just(i32::MAX),
        Just(i32::MIN),
        Just(-1i32),
        Just(0),
        any::<i32>()
    ];
    let one = prop_oneof![
        any::<usize>().prop_map(Damage::Truncate),
        (any::<usize>(), 0..8u8).prop_map(|(at, bit)| Damage::Flip(at, bit)),
        (any::<usize>(), extreme64).prop_map(|(at, v)| Damage::Word(at, v)),
        (any::<usize>(), extreme32).prop_map(|(at, v)| Damage::Half(at, v)),
        proptest::collection::vec(any::<u8>(), 1..16).prop_map(Damage::Append),
    ];
    proptest::collection::vec(one, 1..4)
}

pub(super) fn apply_damage(mut bytes: Vec<u8>, damage: &[Damage]) -> Vec<u8> {
    for d in damage {
        let len = bytes.len().max(1);
        match d {
            Damage::Truncate(at) => bytes.truncate(at % len),
            Damage::Flip(at, bit) => {
                if let Some(b) = bytes.get_mut(at % len) {
                    *b ^= 1 << bit;
                }
            }
            Damage::Word(at, v) => overwrite(&mut bytes, *at, &v.to_le_bytes()),
            Damage::Half(at, v) => overwrite(&mut bytes, *at, &v.to_le_bytes()),
            Damage::Append(more) => bytes.extend_from_slice(more),
        }
    }
    bytes
}

/// Writes `word` over the bytes at an aligned position picked by `at`, if it fits.
fn overwrite(bytes: &mut [u8], at: usize, word: &[u8]) {
    let slots = bytes.len() / word.len();
    if slots > 0 {
        let start = (at % slots) * word.len();
        bytes[start..start + word.len()].copy_from_slice(word);
    }
}

/// Feeds one chunk to a purchases ingest: it is taken, or refused with an input error that
/// begins as one of [`REFUSALS`] and is fit to show.
fn check_chunk(ipc: &[u8]) -> Result<Option<IngestReport>, TestCaseError> {
    let mut ingest = PurchasesIngest::new(&rules(), &secret(), false);
    let mut sink = Batches::default();
    match ingest.push_arrow(ipc, &mut sink) {
        Ok(()) => Ok(Some(ingest.finish(&mut sink).expect("finishes"))),
        Err(Error::Domain(cleanroom_core::Error::Input(message))) => {
            cleanroom_fuzzing::precise(&message)?;
            prop_assert!(REFUSALS.iter().any(|r| message.starts_with(r)), "{message}");
            Ok(None)
        }
        Err(other) => Err(TestCaseError::fail(format!(
            "not an input error: {other:?}"
        ))),
    }
}

proptest! {
    #![proptest_config(cleanroom_fuzzing::config(256))]

    #[test]
    fn any_bytes_are_a_chunk_or_refused_precisely(
        bytes in proptest::collection::vec(any::<u8>(), 0..512)
    ) {
        check_chunk(&bytes)?;
    }

    #[test]
    fn a_valid_chunk_is_taken_row_by_row(rows in rows(), kinds in any::<[u8; 8]>()) {
        let report = check_chunk(&ipc(&rows, kinds, 0))?.expect("a valid chunk is taken");
        check_lenient(&report, rows.len(), true)?;
    }

    #[test]
    fn a_chunk_with_columns_of_any_name_is_taken_or_refused_precisely(
        rows in rows(),
        kinds in any::<[u8; 8]>(),
        renamed in proptest::collection::vec((0..8usize, field(FIELD_NAMES)), 1..3),
    ) {
        let mut names = FIELDS.map(str::to_string);
        for (column, name) in renamed {
            names[column] = name;
        }
        check_chunk(&named_ipc(&rows, kinds, 0, &names))?;
    }

    #[test]
    fn a_damaged_chunk_is_taken_or_refused_precisely(
        rows in rows(),
        kinds in any::<[u8; 8]>(),
        compression in any::<u8>(),
        damage in damage(),
    ) {
        check_chunk(&apply_damage(ipc(&rows, kinds, compression), &damage))?;
    }
}
