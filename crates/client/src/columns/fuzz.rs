//! Fuzzing the columnar readers of a purchases export (`cleanroom ingest --kind purchases`): a
//! CSV or Parquet file of any bytes, or a sample mutated, is read into Arrow IPC chunks or
//! refused with one of the fixed errors, which quote nothing of the file; the chunks of a CSV
//! file written from any rows hold those rows.

use std::io::Cursor;

use arrow::array::{Array, AsArray};
use arrow::datatypes::Int64Type;
use arrow::ipc::reader::StreamReader;
use cleanroom_fuzzing::{apply, config, edits, marker, precise};
use proptest::prelude::*;

use super::*;

const SAMPLE: &str = "member_id,purchased_at,sku,brand,manufacturer,category,quantity,amount\n\
     M0000001,2026-02-02T12:47:15+09:00,SCH-118,Sakura Cha,Sakura Foods,beverages,2,356\n\
     M0000001,2026-03-12T17:58:10+09:00,FYG-527,\"Fuji, Yogurt\",Fuji Dairy,dairy,2,576\n";

const CSV: &[&str] = &[
    ",",
    "\"",
    "\n",
    "\r\n",
    "\u{feff}",
    "\u{0}",
    " ",
    "-1",
    "9223372036854775808",
    "1.5",
    "member_id",
    "quantity",
    "amount",
    "full_name",
    "東京都",
];

/// Every error a file may get, by how it begins.
const ERRORS: &[&str] = &[
    "the first row is not a CSV header",
    "the file has no column `",
    "the file has two columns `",
    "rows ",
    "not a CSV file: ",
    "not a Parquet file",
    "cannot read the Parquet file",
    "a row group is damaged",
    "the Parquet file is damaged",
    "column `",
];

/// Reads `bytes` as a purchases export named `name`: the chunks it sends, or a fixed error.
fn read(name: &str, bytes: &[u8]) -> std::result::Result<Vec<Vec<u8>>, TestCaseError> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).expect("written");
    let file = FileRead {
        path: &path,
        columns: &PURCHASE_COLUMNS,
    };
    let (messages, mut sent) = mpsc::channel(1024);
    let progress = Progress::default();
    let read = if is_parquet(&path) {
        file.parquet(|ipc| ipc, &messages, &progress)
    } else {
        file.csv(|ipc| ipc, &messages, &progress)
    };
    drop(messages);
    let mut chunks = Vec::new();
    while let Ok(chunk) = sent.try_recv() {
        chunks.push(chunk);
    }
    match read {
        Ok(()) => Ok(chunks),
        Err(Error::File { message, .. }) => {
            precise(&message)?;
            prop_assert!(ERRORS.iter().any(|e| message.starts_with(e)), "{message}");
            Ok(Vec::new())
        }
        Err(other) => Err(TestCaseError::fail(format!("not a file error: {other}"))),
    }
}

/// The rows of the chunks, as text (a missing value reads as empty, as the service reads it).
fn rows_of(chunks: &[Vec<u8>]) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for chunk in chunks {
        for batch in StreamReader::try_new(Cursor::new(chunk), None).expect("a stream") {
            let batch = batch.expect("a batch");
            for i in 0..batch.num_rows() {
                let row = (0..8).map(|c| {
                    let column = batch.column(c);
                    if column.is_null(i) {
                        String::new()
                    } else if c >= 6 {
                        column.as_primitive::<Int64Type>().value(i).to_string()
                    } else {
                        column.as_string::<i32>().value(i).to_string()
                    }
                });
                rows.push(row.collect());
            }
        }
    }
    rows
}

/// Rows of a purchases export: text of any kind, whole numbers of any size.
fn rows() -> impl Strategy<Value = Vec<Vec<String>>> {
    let text = prop_oneof![4 => "(?s).{0,12}", 1 => Just(marker())];
    let row = (
        proptest::collection::vec(text, 6),
        any::<i64>(),
        any::<i64>(),
    )
        .prop_map(|(mut t, q, a)| {
            t.extend([q.to_string(), a.to_string()]);
            t
        });
    proptest::collection::vec(row, 0..8)
}

fn csv_of(rows: &[Vec<String>]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut writer = csv::Writer::from_writer(&mut out);
    writer
        .write_record(PURCHASE_COLUMNS.iter().map(|c| c.name))
        .expect("written");
    for row in rows {
        writer.write_record(row).expect("written");
    }
    writer.flush().expect("flushed");
    drop(writer);
    out
}

/// `rows` as a Parquet export: text columns and 64-bit integers.
fn parquet_of(rows: &[Vec<String>]) -> Vec<u8> {
    use arrow::array::{ArrayRef, Int64Array, StringArray};
    let columns: Vec<ArrayRef> = (0..8)
        .map(|c| -> ArrayRef {
            let values = rows.iter().map(|r| r[c].clone());
            if c >= 6 {
                Arc::new(Int64Array::from_iter_values(
                    values.map(|v| v.parse().expect("whole")),
                ))
            } else {
                Arc::new(StringArray::from_iter_values(values))
            }
        })
        .collect();
    let fields: Vec<Field> = PURCHASE_COLUMNS
        .iter()
        .zip(&columns)
        .map(|(c, a)| Field::new(c.name, a.data_type().clone(), false))
        .collect();
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).expect("a batch");
    let mut out = Vec::new();
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), None).expect("a writer");
    writer.write(&batch).expect("written");
    writer.close().expect("closed");
    out
}

/// Damage to a file: a flipped bit, an overwritten byte, a cut.
fn damaged(mut bytes: Vec<u8>, damage: &[(usize, u8, bool)]) -> Vec<u8> {
    for &(at, value, cut) in damage {
        let at = at % bytes.len().max(1);
        if cut {
            bytes.truncate(at);
        } else if let Some(b) = bytes.get_mut(at) {
            *b ^= value;
        }
    }
    bytes
}

/// Found by the Parquet fuzzer: one byte of the Arrow schema a Parquet file embeds, changed,
/// made Arrow's schema decoder panic ("Int type with bit width of 4 ... not supported") and the
/// tool with it; one in a column's name was quoted raw in the error, control character and all.
/// Every single changed byte of a small file is read, or refused precisely.
#[test]
fn every_single_changed_byte_of_a_parquet_file_is_read_or_refused() {
    let valid = parquet_of(&[]);
    for at in 0..valid.len() {
        let outcome = read("p.parquet", &damaged(valid.clone(), &[(at, 19, false)]));
        assert!(outcome.is_ok(), "byte {at}: {outcome:?}");
    }
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn a_damaged_parquet_file_is_read_or_refused_precisely(
        rows in rows(),
        damage in proptest::collection::vec((any::<usize>(), 1..=255u8, proptest::bool::weighted(0.1)), 1..4),
    ) {
        let rows: Vec<Vec<String>> = rows.into_iter().collect();
        let valid = parquet_of(&rows);
        prop_assert_eq!(rows_of(&read("p.parquet", &valid)?), rows);
        read("p.parquet", &damaged(valid, &damage))?;
    }

    #[test]
    fn any_bytes_as_csv_or_parquet_are_read_or_refused_precisely(
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
        parquet in any::<bool>(),
    ) {
        read(if parquet { "p.parquet" } else { "p.csv" }, &bytes)?;
    }

    #[test]
    fn a_sample_csv_mutated_is_read_or_refused_precisely(edits in edits(CSV, 4)) {
        read("p.csv", apply(SAMPLE, &edits).as_bytes())?;
    }

    #[test]
    fn the_chunks_of_a_csv_file_hold_its_rows(rows in rows()) {
        let chunks = read("p.csv", &csv_of(&rows))?;
        // An empty field is a missing value either way.
        prop_assert_eq!(rows_of(&chunks), rows);
    }
}
