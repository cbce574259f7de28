//! Fuzzing the CSV readers of the tools (`cleanroom ingest`, `upload-list`): a member, purchase,
//! consent or list file of any bytes, or a sample file mutated, is read whole or refused with the
//! one fixed error naming a row, which quotes nothing of the file; a file written from any
//! records reads back as those records, with or without a byte order mark.

use std::path::Path;

use cleanroom_fuzzing::{apply, config, edits, marker};
use cleanroom_proto::v1::{ConsentRecord, CustomerRecord, MemberRecord, PurchaseRecord};
use proptest::prelude::*;

use super::*;

/// Each kind's sample file: its header and first lines, as the sample exports hold them.
const SAMPLES: &[&str] = &[
    "member_id,name,name_kana,email,phone,postal_code,prefecture,address,birth_date,gender\n\
     M0000001,石井　蓮,イシイ　レン,ishii.ren82@example.ne.jp,,587-5481,埼玉県,埼玉県南区栄町3-30-19,1982-09-30,M\n\
     M0000002,田中大翔,タナカヒロト,tanaka.hiroto673@example.co.jp,090-0614-1726,132-2159,愛知県,\"愛知県中央区宮前2-11-20\",1963-02-03,M\n",
    "member_id,purchased_at,sku,brand,manufacturer,category,quantity,amount\n\
     M0000001,2026-02-02T12:47:15+09:00,SCH-118,Sakura Cha,Sakura Foods,beverages,2,356\n\
     M0000001,2026-03-12T17:58:10+09:00,FYG-527,Fuji Yogurt,Fuji Dairy,dairy,2,576\n",
    "member_id,purpose,notice_version,action,at,source,expires_at\n\
     M0000001,appliance_research,2,granted,2025-12-21T15:30:30+09:00,app,\n\
     M0000001,product_insight,3,granted,2025-05-06T17:19:29+09:00,web,\n",
    "email,phone,attribute\n\
     daisuke.takahashi472@example.jp,0309005280,bronze\n\
     ,080-0075-1333,bronze\n",
    "email_token,phone_token,attribute\nv1.AAAA,,gold\n",
];

/// What breaks a CSV file: quoting, separators, line ends, numbers out of range, encodings.
const CSV: &[&str] = &[
    ",",
    ",,",
    "\"",
    "\"\"",
    "\n",
    "\r\n",
    "\r",
    "\u{feff}",
    "\u{0}",
    " ",
    "-1",
    "4294967296",
    "9223372036854775808",
    "1.5",
    "1e3",
    "\u{ff}",
    "東京都",
    "member_id",
    "quantity",
    "amount",
];

fn write(dir: &Path, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join("export.csv");
    std::fs::write(&path, bytes).expect("written");
    path
}

/// Reads `bytes` as each kind's file: read whole, or refused naming a row and nothing else.
fn check_every_kind(bytes: &[u8]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = write(dir.path(), bytes);
    check(read_all::<MemberRecord>(&path))?;
    check(read_all::<PurchaseRecord>(&path))?;
    check(read_all::<ConsentRecord>(&path))?;
    check(read_all::<CustomerRecord>(&path))
}

fn check<T>(read: Result<Vec<T>>) -> Result<(), TestCaseError> {
    if let Err(e) = read {
        let Error::File { message, .. } = &e else {
            return Err(TestCaseError::fail(format!("not a file error: {e}")));
        };
        let row = message
            .strip_prefix("row ")
            .and_then(|m| m.strip_suffix(" does not match the expected columns"));
        prop_assert!(row.is_some_and(|r| r.parse::<u64>().is_ok()), "{message}");
    }
    Ok(())
}

/// A field's text: anything a spreadsheet can hold, the marker among it.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![4 => "(?s).{0,12}", 1 => Just(marker()), 1 => Just(String::new())]
}

fn purchases() -> impl Strategy<Value = Vec<PurchaseRecord>> {
    let record = (
        proptest::collection::vec(text(), 6),
        any::<i64>(),
        any::<i64>(),
    )
        .prop_map(|(t, quantity, amount)| PurchaseRecord {
            member_id: t[0].clone(),
            purchased_at: t[1].clone(),
            sku: t[2].clone(),
            brand: t[3].clone(),
            manufacturer: t[4].clone(),
            category: t[5].clone(),
            quantity,
            amount,
        });
    proptest::collection::vec(record, 0..8)
}

/// `records` as a purchases export writes them, a byte order mark first when `bom`.
fn purchases_csv(records: &[PurchaseRecord], bom: bool) -> Vec<u8> {
    let mut out = if bom {
        "\u{feff}".as_bytes().to_vec()
    } else {
        Vec::new()
    };
    let mut writer = csv::Writer::from_writer(&mut out);
    writer
        .write_record(SAMPLES[1].lines().next().expect("a header").split(','))
        .expect("written");
    for r in records {
        let (q, a) = (r.quantity.to_string(), r.amount.to_string());
        let t = [
            &r.member_id,
            &r.purchased_at,
            &r.sku,
            &r.brand,
            &r.manufacturer,
            &r.category,
        ];
        writer
            .write_record(
                t.into_iter()
                    .map(String::as_str)
                    .chain([q.as_str(), a.as_str()]),
            )
            .expect("written");
    }
    writer.flush().expect("flushed");
    drop(writer);
    out
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn any_bytes_are_read_or_refused_by_row(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        check_every_kind(&bytes)?;
    }

    #[test]
    fn a_sample_file_mutated_is_read_or_refused_by_row(
        sample in proptest::sample::select(SAMPLES),
        edits in edits(CSV, 4),
    ) {
        check_every_kind(apply(sample, &edits).as_bytes())?;
    }

    #[test]
    fn written_records_read_back_as_they_were(records in purchases(), bom in any::<bool>()) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = write(dir.path(), &purchases_csv(&records, bom));
        let read = read_all::<PurchaseRecord>(&path).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(read, records);
    }
}
