//! Issue 9, items 5 and 6: uploads and ingests are read as they arrive (each chunk checked,
//! hashed and staged before the stream ends), bounded in bytes and in silence, leave nothing when
//! they break, and one partner's upload in flight never holds up another partner's calls.

use std::path::Path;
use std::time::Duration;

use cleanroom_proto::v1::{
    CustomerRecord, IngestPartnerListRequest, ListChunk, PartnerListHeader, UploadListRequest,
    ingest_partner_list_request, upload_list_request,
};
use tokio::sync::mpsc::Sender;
use tonic::Code;

use crate::util::*;

/// Records the ingest writes out as one staged batch (`cleanroom_engine::ingest::BATCH_ROWS`):
/// more than this and the first batch is on disk before the stream ends.
const BATCH_ROWS: usize = cleanroom_engine::ingest::BATCH_ROWS;

/// Generated customers: e-mail addresses no member has.
fn customers(from: usize, count: usize) -> Vec<CustomerRecord> {
    (from..from + count)
        .map(|i| CustomerRecord {
            email: format!("stream.customer{i}@example.com"),
            ..Default::default()
        })
        .collect()
}

/// Sends `count` customers in chunks of 2,000.
async fn send_customers(tx: &Sender<UploadListRequest>, count: usize) {
    for from in (0..count).step_by(2000) {
        let records = customers(from, 2000.min(count - from));
        let chunk = UploadListRequest {
            kind: Some(upload_list_request::Kind::Chunk(ListChunk { records })),
        };
        tx.send(chunk).await.expect("the upload is still open");
    }
}

/// The staged (uncommitted) files in a data directory, with their sizes.
fn staged_files(dir: &Path) -> Vec<(String, u64)> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let size = e.metadata().map(|m| m.len()).unwrap_or(0);
            (name, size)
        })
        .filter(|(name, _)| name.starts_with("staging-"))
        .collect()
}

/// Waits (polling, up to a minute) until `done` holds.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..600 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("waited a minute for: {what}");
}

/// Sakura's list files in the data directory (one per committed version).
fn list_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("list-sakura_foods")
        })
        .count()
}

/// Sakura's upload of `BATCH_ROWS + 4000` customers, left open once its first batch is hashed
/// and staged on disk: the sender keeps the stream open, dropping it ends the upload.
async fn upload_in_flight(
    h: &Harness,
) -> (
    Sender<UploadListRequest>,
    tokio::task::JoinHandle<
        Result<tonic::Response<cleanroom_proto::v1::UploadListResponse>, tonic::Status>,
    >,
) {
    let dir = h.data_dir.path().to_path_buf();
    let (tx, stream) = open_upload().await;
    let mut uploader = h.partner("sakura_foods");
    let upload = tokio::spawn(async move { uploader.upload_list(stream).await });
    send_customers(&tx, BATCH_ROWS + 4000).await;
    eventually("the upload's first batch staged", || {
        staged_files(&dir).iter().any(|(_, size)| *size > 1_000_000)
    })
    .await;
    (tx, upload)
}

/// A stream's records are hashed and written to a staged file while the stream is still open,
/// not buffered until its end; a stream that breaks leaves no file and no list version behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_is_staged_as_it_arrives_and_a_broken_one_leaves_nothing() {
    let h = Harness::start_with(Setup {
        rules: relaxed_lists(sample_rules()),
        ..Default::default()
    })
    .await;
    let dir = h.data_dir.path().to_path_buf();
    let lists_before = list_files(&dir);
    let (tx, upload) = upload_in_flight(&h).await;
    assert_eq!(list_files(&dir), lists_before, "nothing is committed yet");
    // The client goes away mid-stream: the call is reset, not ended.
    upload.abort();
    eventually("the broken upload's staged file removed", || {
        staged_files(&dir).is_empty()
    })
    .await;
    drop(tx);
    assert_eq!(list_files(&dir), lists_before, "no version was stored");
    let after = h.restart().await;
    let audit = cleanroom_server::audit::read(&after.data_dir.path().join("audit.jsonl")).unwrap();
    assert!(
        !audit.iter().any(|r| r.entry.method == "Reconcile"),
        "no file was left for the restart to collect"
    );
    after.stop().await;
}

/// A stream is refused once it carries more bytes than `limits.max_stream_bytes`, whatever its
/// record count, and nothing of it is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_over_its_byte_limit_is_refused_and_stores_nothing() {
    let mut rules = relaxed_lists(sample_rules());
    rules.limits.max_stream_bytes = 100_000;
    let h = Harness::start_with(Setup {
        rules,
        load_sample: false,
        approve: false,
        ..Default::default()
    })
    .await;
    let dir = h.data_dir.path().to_path_buf();
    let lists_before = list_files(&dir);
    let status =
        cleanroom_client::upload_list(&mut h.partner("sakura_foods"), false, customers(0, 5000))
            .await
            .unwrap_err();
    let cleanroom_client::Error::Status(status) = status else {
        panic!("a gRPC status: {status}");
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("at most 100000 bytes"),
        "{status:?}"
    );
    eventually("no staged file", || staged_files(&dir).is_empty()).await;
    assert_eq!(list_files(&dir), lists_before);
    // Within the limit, the same partner's upload goes through.
    cleanroom_client::upload_list(&mut h.partner("sakura_foods"), false, customers(0, 500))
        .await
        .expect("a small upload is accepted");
    assert_eq!(list_files(&dir), lists_before + 1);
    h.stop().await;
}

/// A stream that goes silent for longer than `limits.stream_idle_seconds` is cut with
/// DEADLINE_EXCEEDED, long before the call's own time limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_stream_is_cut_at_its_idle_limit() {
    let mut rules = sample_rules();
    rules.limits.stream_idle_seconds = 1;
    let h = Harness::start_with(Setup {
        rules,
        load_sample: false,
        approve: false,
        ..Default::default()
    })
    .await;
    let (tx, stream) = open_upload().await;
    send_customers(&tx, 2000).await;
    let status = tokio::time::timeout(
        Duration::from_secs(60),
        h.partner("sakura_foods").upload_list(stream),
    )
    .await
    .expect("the service cuts the stream")
    .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("sent nothing for 1 s"),
        "{status:?}"
    );
    drop(tx);
    h.stop().await;
}

/// While Sakura's upload is in flight (its first batch already hashed and staged), Kumo uploads
/// a list and runs a query, and the analyst ingests consent: nothing one caller's stream holds
/// makes another wait. Sakura's upload then ends and is stored whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_partners_upload_in_flight_holds_up_no_one_else() {
    let h = Harness::start_with(Setup {
        rules: relaxed_lists(precise_rules()),
        ..Default::default()
    })
    .await;
    let dir = h.data_dir.path().to_path_buf();
    let (tx, upload) = upload_in_flight(&h).await;
    // A limit only so that a regression fails instead of hanging the suite.
    let bounded = Duration::from_secs(120);
    let kumo_list =
        cleanroom_client::read_list(&sample_dir().join("partner_lists/kumo_denki.csv")).unwrap();
    tokio::time::timeout(
        bounded,
        cleanroom_client::upload_list(&mut h.partner("kumo_denki"), false, kumo_list),
    )
    .await
    .expect("Kumo's upload is not held up")
    .expect("Kumo's upload is accepted");
    let answer = tokio::time::timeout(bounded, h.run("kumo_denki", "matched_overlap", &[]))
        .await
        .expect("Kumo's query is not held up")
        .expect("Kumo's query answers");
    assert_eq!(answer.list_version, 2);
    let consent = cleanroom_client::read_consent(&sample_dir().join("consent_events.csv")).unwrap();
    tokio::time::timeout(
        bounded,
        cleanroom_client::ingest_consent(&mut h.analyst(), Default::default(), consent),
    )
    .await
    .expect("the analyst's ingest is not held up")
    .expect("the consent ingest is accepted");
    drop(tx);
    let stored = upload
        .await
        .unwrap()
        .expect("Sakura's upload is stored")
        .into_inner();
    assert_eq!(stored.records_received as usize, BATCH_ROWS + 4000);
    assert_eq!(stored.records_accepted, stored.records_received);
    assert_eq!(stored.list_version, 2);
    assert!(
        staged_files(&dir).is_empty(),
        "the staged file was committed"
    );
    h.stop().await;
}

/// Item 5: the list allowance is decided on the header, before any record is read or hashed. With
/// Sakura's one version a window already used, an upload that sends its header and then nothing
/// is refused at once with the time the next upload is possible; had the service waited for the
/// records, the stream's silence would have ended it as DEADLINE_EXCEEDED instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_over_the_allowance_is_refused_before_any_record_is_read() {
    let mut rules = sample_rules();
    rules.limits.stream_idle_seconds = 20;
    for contract in rules.contracts.values_mut() {
        contract.protection.max_list_versions = 1;
    }
    let h = Harness::start_with(Setup {
        rules,
        ..Default::default()
    })
    .await;
    let (tx, stream) = open_upload().await;
    let status = tokio::time::timeout(
        Duration::from_secs(60),
        h.partner("sakura_foods").upload_list(stream),
    )
    .await
    .expect("the service answers")
    .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("the next upload is possible at"),
        "{status:?}"
    );
    drop(tx);
    // The analyst's upload on Sakura's behalf meets the same allowance, on its header.
    let (tx, stream) = tokio::sync::mpsc::channel(1);
    tx.send(IngestPartnerListRequest {
        kind: Some(ingest_partner_list_request::Kind::Header(
            PartnerListHeader {
                partner_id: "sakura_foods".into(),
                strict: false,
                ..Default::default()
            },
        )),
    })
    .await
    .unwrap();
    let status = tokio::time::timeout(
        Duration::from_secs(60),
        h.analyst()
            .ingest_partner_list(tokio_stream::wrappers::ReceiverStream::new(stream)),
    )
    .await
    .expect("the service answers")
    .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    drop(tx);
    h.stop().await;
}

/// Item 6: the server time an answer reports is rounded up to 250 ms, so it shows little of the
/// data's size or of other callers' load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_server_time_is_coarse() {
    let h = Harness::start_with(Setup {
        rules: precise_rules(),
        ..Default::default()
    })
    .await;
    let mut reported = Vec::new();
    for (partner, query) in [
        ("sakura_foods", "matched_overlap"),
        ("kumo_denki", "matched_overlap"),
        ("sakura_foods", "category_buyers_by_age_band"),
    ] {
        let params = if query == "matched_overlap" {
            Vec::new()
        } else {
            year()
        };
        let answer = h.run(partner, query, &params).await.unwrap();
        reported.push(answer.elapsed_ms);
    }
    assert!(
        reported.iter().all(|ms| *ms > 0 && ms % 250 == 0),
        "{reported:?}"
    );
    h.stop().await;
}
