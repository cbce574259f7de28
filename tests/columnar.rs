//! Large exports as columns: a purchases export sent as Arrow record batches, read from CSV or from
//! Parquet, stores exactly what the same rows sent as records store; a bad row anywhere cancels
//! the ingest and stores nothing; a chunk the service cannot take gets a precise refusal.

use std::path::Path;
use std::sync::Arc;

use cleanroom_client::{Progress, ingest_purchases, ingest_purchases_file, read_purchases};
use cleanroom_engine::arrow::array::{ArrayRef, Int32Array, Int64Array, RecordBatch, StringArray};
use cleanroom_engine::arrow::compute::cast;
use cleanroom_engine::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use cleanroom_engine::arrow::ipc::writer::StreamWriter;
use cleanroom_engine::arrow::util::display::array_value_to_string;
use cleanroom_engine::datafusion::parquet::arrow::ArrowWriter;
use cleanroom_proto::v1::{
    IngestHeader, IngestPurchasesRequest, IngestSummary, PurchaseChunk, ingest_purchases_request,
};
use tonic::Code;

use crate::util::{Harness, Setup, sample_dir};

async fn empty_service() -> Harness {
    Harness::start_with(Setup {
        load_sample: false,
        ..Setup::default()
    })
    .await
}

fn header() -> IngestHeader {
    IngestHeader {
        source: "columnar-test".into(),
        ..IngestHeader::default()
    }
}

/// Every stored purchase row as text, sorted: what the store holds, whatever its file layout.
fn stored_purchases(h: &Harness) -> Vec<String> {
    let mut rows = Vec::new();
    for file in &h.app.store.snapshot().purchases {
        for batch in file.batches().unwrap() {
            let batch = batch.unwrap();
            for i in 0..batch.num_rows() {
                let cells: Vec<String> = batch
                    .columns()
                    .iter()
                    .map(|c| array_value_to_string(c, i).unwrap())
                    .collect();
                rows.push(cells.join("|"));
            }
        }
    }
    rows.sort();
    rows
}

fn outcome(s: &IngestSummary) -> (u64, u64, Vec<(String, u64)>) {
    let rejected = s.rejected_by_reason.clone().into_iter().collect();
    (s.records_received, s.records_accepted, rejected)
}

/// The sample purchases as a Parquet file with the types an export tool would write: the
/// purchase time as a timestamp with the retailer's offset, the quantity as a 32-bit integer.
fn sample_as_parquet(path: &Path) {
    let records = read_purchases(&sample_dir().join("purchases.csv")).unwrap();
    let text = |f: fn(&cleanroom_proto::v1::PurchaseRecord) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(records.iter().map(f)))
    };
    let times = cast(&text(|r| &r.purchased_at), &timestamp()).unwrap();
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("member_id", text(|r| &r.member_id)),
        ("purchased_at", times),
        ("sku", text(|r| &r.sku)),
        ("brand", text(|r| &r.brand)),
        ("manufacturer", text(|r| &r.manufacturer)),
        ("category", text(|r| &r.category)),
        (
            "quantity",
            Arc::new(Int32Array::from_iter_values(
                records.iter().map(|r| r.quantity as i32),
            )),
        ),
        (
            "amount",
            Arc::new(Int64Array::from_iter_values(
                records.iter().map(|r| r.amount),
            )),
        ),
    ];
    let batch = batch_of(columns);
    let mut writer =
        ArrowWriter::try_new(std::fs::File::create(path).unwrap(), batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

fn timestamp() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("+09:00".into()))
}

fn batch_of(columns: Vec<(&str, ArrayRef)>) -> RecordBatch {
    let fields: Vec<Field> = columns
        .iter()
        .map(|(n, c)| Field::new(*n, c.data_type().clone(), true))
        .collect();
    RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns.into_iter().map(|(_, c)| c).collect(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_as_csv_columns_or_parquet_stores_what_its_records_store() {
    let csv = sample_dir().join("purchases.csv");
    let dir = tempfile::tempdir().unwrap();
    let parquet = dir.path().join("purchases.parquet");
    sample_as_parquet(&parquet);

    let as_records = empty_service().await;
    let records = read_purchases(&csv).unwrap();
    let rows = records.len() as u64;
    let by_records = ingest_purchases(&mut as_records.analyst(), header(), records)
        .await
        .unwrap();

    let mut stored = Vec::new();
    for file in [&csv, &parquet] {
        let h = empty_service().await;
        let progress = Arc::new(Progress::default());
        let summary = ingest_purchases_file(&mut h.analyst(), header(), file, progress.clone())
            .await
            .unwrap();
        assert_eq!(
            outcome(&summary),
            outcome(&by_records),
            "{}",
            file.display()
        );
        assert_eq!(
            progress.records(),
            rows,
            "every row counted for the progress bar"
        );
        stored.push(stored_purchases(&h));
    }
    let expected = stored_purchases(&as_records);
    assert_eq!(expected.len() as u64, by_records.records_accepted);
    assert!(
        stored.iter().all(|s| *s == expected),
        "same rows stored every way"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_row_deep_in_a_columnar_export_cancels_it_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("purchases.csv");
    let mut text =
        String::from("member_id,purchased_at,sku,brand,manufacturer,category,quantity,amount\n");
    for i in 1..=40_000 {
        // Row 35,000 is in the second batch: the first has already been sent when it is read.
        let amount = if i == 35_000 {
            "12x".to_string()
        } else {
            i.to_string()
        };
        text.push_str(&format!(
            "M{i:07},2026-03-01T10:15:00+09:00,SKU-1,Brand,Maker,beverages,1,{amount}\n"
        ));
    }
    std::fs::write(&file, text).unwrap();
    let h = empty_service().await;
    let commits = h.app.store.commits();
    let progress = Arc::new(Progress::default());
    let err = ingest_purchases_file(&mut h.analyst(), header(), &file, progress)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("rows 32769 to 65536"), "{err}");
    assert!(
        err.contains("quantity and amount must be whole numbers"),
        "{err}"
    );
    assert!(!err.contains("12x"), "a value is never echoed: {err}");
    // The service saw the first batch, then the call was cancelled: nothing committed.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(h.app.store.commits(), commits);
    assert!(h.app.store.snapshot().purchases.is_empty());
}

fn ipc(batch: &RecordBatch) -> Vec<u8> {
    let mut out = Vec::new();
    let mut writer = StreamWriter::try_new(&mut out, &batch.schema()).unwrap();
    writer.write(batch).unwrap();
    writer.finish().unwrap();
    drop(writer);
    out
}

async fn send_chunk(h: &Harness, chunk: PurchaseChunk) -> tonic::Status {
    let messages = vec![
        IngestPurchasesRequest {
            kind: Some(ingest_purchases_request::Kind::Header(header())),
        },
        IngestPurchasesRequest {
            kind: Some(ingest_purchases_request::Kind::Chunk(chunk)),
        },
    ];
    h.analyst()
        .ingest_purchases(tokio_stream::iter(messages))
        .await
        .unwrap_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_the_service_cannot_take_is_refused_by_what_is_wrong() {
    let h = empty_service().await;
    let one = |value: &str| -> ArrayRef { Arc::new(StringArray::from(vec![value])) };
    let with_name = batch_of(vec![
        ("member_id", one("M1")),
        ("full_name", one("山田 花子")),
    ]);
    let record = read_purchases(&sample_dir().join("purchases.csv")).unwrap()[0].clone();
    let cases = [
        (
            PurchaseChunk {
                records: vec![],
                arrow_ipc: ipc(&with_name),
            },
            "column `full_name` is not a field",
        ),
        (
            PurchaseChunk {
                records: vec![],
                arrow_ipc: b"plain text".to_vec(),
            },
            "not an Arrow IPC stream",
        ),
        (
            PurchaseChunk {
                records: vec![record],
                arrow_ipc: ipc(&with_name),
            },
            "records or Arrow IPC, not both",
        ),
    ];
    for (chunk, needle) in cases {
        let status = send_chunk(&h, chunk).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains(needle),
            "{status:?} lacks {needle}"
        );
        assert!(!status.message().contains("山田"), "{status:?}");
    }
    assert!(h.app.store.snapshot().purchases.is_empty());
    // A text column where numbers belong is refused by name and type.
    let wrong = batch_of(vec![
        ("member_id", one("M1")),
        ("purchased_at", one("2026-03-01T10:15:00+09:00")),
        ("sku", one("S")),
        ("brand", one("B")),
        ("manufacturer", one("M")),
        ("category", one("beverages")),
        ("quantity", one("one")),
        ("amount", one("100")),
    ]);
    let status = send_chunk(
        &h,
        PurchaseChunk {
            records: vec![],
            arrow_ipc: ipc(&wrong),
        },
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains("column `quantity` must hold whole numbers"),
        "{status:?}"
    );
}
