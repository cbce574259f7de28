//! Idempotent writes (THREATS 17, issue 14, item 5): a write can commit while its client sees
//! only a broken connection. The connection is cut after the last chunk of an ingest and of an
//! upload, at many delays across the commit window, and the write is sent again with the same
//! request id: the rows are there exactly once and each list version is used once.

use std::net::SocketAddr;
use std::time::Duration;

use cleanroom_client::{Connection, sample};
use cleanroom_proto::v1::{
    CustomerRecord, IngestHeader, IngestPurchasesRequest, ListChunk, PurchaseChunk, PurchaseRecord,
    UploadListHeader, UploadListRequest, ingest_purchases_request, upload_list_request,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::util::{Harness, Setup, relaxed_lists, sample_rules};

/// A TCP proxy in front of the service whose open connections can all be cut at once, as a
/// network that breaks under a client.
struct Proxy {
    addr: SocketAddr,
    cut: watch::Sender<u64>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, _) = watch::channel(0u64);
        let cuts = cut.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut cut = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self { addr, cut }
    }

    /// Drops every connection open now.
    fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    async fn connect(&self) -> Connection {
        Connection::open(&format!("http://{}", self.addr))
            .await
            .unwrap()
    }
}

fn purchases(n: usize, tag: usize) -> Vec<PurchaseRecord> {
    (0..n)
        .map(|i| PurchaseRecord {
            member_id: format!("M{:07}", 1 + i % 4000),
            purchased_at: "2026-10-20T10:00:00+09:00".into(),
            sku: format!("SKU-{tag}-{i}"),
            brand: "Other".into(),
            manufacturer: "Other".into(),
            category: "snacks".into(),
            quantity: 1,
            amount: 100,
        })
        .collect()
}

fn list(n: usize, tag: usize) -> Vec<CustomerRecord> {
    (0..n)
        .map(|i| CustomerRecord {
            email: format!("nobody.{tag}.{i}@example.org"),
            attribute: "bronze".into(),
            ..Default::default()
        })
        .collect()
}

/// When to cut a write's connection once its last chunk is sent.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// After a delay: whether the write committed, and whether its answer came back, is up to
    /// the timing.
    After(Duration),
    /// As soon as the store holds the commit: committed, and (almost always) unanswered.
    WhenCommitted,
}

impl Cut {
    async fn wait(self, h: &Harness, request_id: &str) {
        match self {
            Cut::After(delay) => tokio::time::sleep(delay).await,
            Cut::WhenCommitted => {
                for _ in 0..20_000 {
                    let log = h.app.store.log();
                    if log
                        .iter()
                        .any(|c| c.request_id.as_deref() == Some(request_id))
                    {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                panic!("the write never committed");
            }
        }
    }
}

fn cuts() -> Vec<Cut> {
    DELAYS_MS
        .iter()
        .map(|ms| Cut::After(Duration::from_millis(*ms)))
        .chain([Cut::WhenCommitted])
        .collect()
}

/// Sends a purchase ingest through `proxy`, all of it, and cuts the connection as `cut` says
/// once its last chunk is sent. Returns whether the client got an answer.
async fn ingest_then_cut(
    h: &Harness,
    proxy: &Proxy,
    header: IngestHeader,
    records: Vec<PurchaseRecord>,
    cut: Cut,
) -> bool {
    let id = header.request_id.clone();
    let conn = proxy.connect().await;
    let mut admin = conn.admin(sample::ANALYST_TOKEN).unwrap();
    let mut messages = vec![IngestPurchasesRequest {
        kind: Some(ingest_purchases_request::Kind::Header(header)),
    }];
    for chunk in records.chunks(cleanroom_client::CHUNK_RECORDS) {
        messages.push(IngestPurchasesRequest {
            kind: Some(ingest_purchases_request::Kind::Chunk(PurchaseChunk {
                records: chunk.to_vec(),
                arrow_ipc: Vec::new(),
            })),
        });
    }
    let call =
        tokio::spawn(async move { admin.ingest_purchases(tokio_stream::iter(messages)).await });
    cut.wait(h, &id).await;
    proxy.cut();
    call.await.unwrap().is_ok()
}

async fn upload_then_cut(
    h: &Harness,
    proxy: &Proxy,
    header: UploadListHeader,
    records: Vec<CustomerRecord>,
    cut: Cut,
) -> bool {
    let id = header.request_id.clone();
    let conn = proxy.connect().await;
    let mut partner = conn.partner(sample::partner_token("sakura_foods")).unwrap();
    let mut messages = vec![UploadListRequest {
        kind: Some(upload_list_request::Kind::Header(header)),
    }];
    for chunk in records.chunks(cleanroom_client::CHUNK_RECORDS) {
        messages.push(UploadListRequest {
            kind: Some(upload_list_request::Kind::Chunk(ListChunk {
                records: chunk.to_vec(),
            })),
        });
    }
    let call = tokio::spawn(async move { partner.upload_list(tokio_stream::iter(messages)).await });
    cut.wait(h, &id).await;
    proxy.cut();
    call.await.unwrap().is_ok()
}

fn purchase_rows(h: &Harness) -> usize {
    h.app
        .store
        .snapshot()
        .purchases
        .iter()
        .map(|f| f.rows().unwrap() as usize)
        .sum()
}

const DELAYS_MS: &[u64] = &[0, 2, 5, 10, 20, 40, 80, 150, 300, 600];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_cut_after_its_last_chunk_and_retried_is_stored_exactly_once() {
    let h = Harness::start_with(Setup {
        rules: relaxed_lists(sample_rules()),
        ..Default::default()
    })
    .await;
    let proxy = Proxy::start(h.addr()).await;
    const ROWS: usize = 20_000;
    let mut expected_rows = purchase_rows(&h);
    let mut outcomes = Outcomes::default();
    for (i, cut) in cuts().into_iter().enumerate() {
        let id = cleanroom_client::new_request_id();
        let header = IngestHeader {
            source: format!("retry-{i}"),
            strict: false,
            request_id: id.clone(),
            tokens_only: false,
        };
        let records = purchases(ROWS, i);
        let first = ingest_then_cut(&h, &proxy, header.clone(), records.clone(), cut).await;
        let (summary, _) = cleanroom_client::retrying(20, Duration::from_millis(100), || {
            let (conn, header, records) = (h.conn.clone(), header.clone(), records.clone());
            async move {
                let mut admin = conn.admin(sample::ANALYST_TOKEN)?;
                cleanroom_client::ingest_purchases(&mut admin, header, records).await
            }
        })
        .await
        .unwrap_or_else(|(e, _)| panic!("the retry after {cut:?}: {e}"));
        outcomes.count(cut, first, summary.already_committed);
        assert_eq!(summary.records_accepted, ROWS as u64);
        expected_rows += ROWS;
        assert_eq!(
            purchase_rows(&h),
            expected_rows,
            "{cut:?}: the rows exactly once"
        );
        let log = h.app.store.log();
        let commits = log.iter().filter(|c| c.request_id.as_deref() == Some(&id));
        assert_eq!(commits.count(), 1, "{cut:?}: one commit under the id");
    }
    println!("ingests: {outcomes:?}");

    let mut version = h
        .run("sakura_foods", "matched_overlap", &[])
        .await
        .unwrap()
        .list_version;
    let mut outcomes = Outcomes::default();
    for (i, cut) in cuts().into_iter().enumerate() {
        let header = UploadListHeader {
            strict: false,
            request_id: cleanroom_client::new_request_id(),
        };
        let records = list(20_000, i);
        let first = upload_then_cut(&h, &proxy, header.clone(), records.clone(), cut).await;
        let (response, _) = cleanroom_client::retrying(20, Duration::from_millis(100), || {
            let (conn, header, records) = (h.conn.clone(), header.clone(), records.clone());
            async move {
                let mut partner = conn.partner(sample::partner_token("sakura_foods"))?;
                cleanroom_client::upload_list_as(&mut partner, header, records).await
            }
        })
        .await
        .unwrap_or_else(|(e, _)| panic!("the retry after {cut:?}: {e}"));
        outcomes.count(cut, first, response.already_committed);
        version += 1;
        assert_eq!(
            response.list_version, version,
            "{cut:?}: the version used once"
        );
    }
    println!("uploads: {outcomes:?}");
    h.stop().await;
}

/// How the first sends of a write ended, as its retry found them.
#[derive(Debug, Default)]
struct Outcomes {
    /// Cut before it committed: the retry wrote it.
    not_committed: u32,
    /// Committed, but the client saw only the broken connection: the retry answered the
    /// original result.
    committed_unanswered: u32,
    /// Answered before the cut.
    answered: u32,
}

impl Outcomes {
    fn count(&mut self, cut: Cut, answered: bool, already_committed: bool) {
        match (answered, already_committed) {
            (true, true) => self.answered += 1,
            (false, true) => self.committed_unanswered += 1,
            (false, false) => self.not_committed += 1,
            (true, false) => panic!("{cut:?}: answered, yet the retry wrote it again"),
        }
        if let Cut::WhenCommitted = cut {
            assert!(
                already_committed,
                "cut once committed: the retry replays it"
            );
        }
    }
}

/// The command line retries a write whose connection broke with the same request id, and says
/// whether it committed; given the id of a write that committed, it reports it and stores
/// nothing new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_says_whether_a_write_committed() {
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("purchases.csv");
    std::fs::write(
        &file,
        "member_id,purchased_at,sku,brand,manufacturer,category,quantity,amount\n\
         M0000001,2026-10-20T10:00:00+09:00,SKU-X,Other,Other,snacks,1,100\n",
    )
    .unwrap();
    let ingest = |addr: String, id: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_cleanroom"))
            .args(["ingest", "--kind", "purchases", "--file"])
            .arg(&file)
            .args(["--addr", &addr, "--request-id", id])
            .env("CLEANROOM_TOKEN", sample::ANALYST_TOKEN)
            .output()
            .unwrap()
    };
    let rows = purchase_rows(&h);
    let addr = format!("http://{}", h.addr());
    let first = ingest(addr.clone(), "cli-retry-1");
    let out = String::from_utf8_lossy(&first.stdout).into_owned();
    assert!(
        first.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(out.contains("committed (request id cli-retry-1)"), "{out}");
    let again = ingest(addr, "cli-retry-1");
    let out = String::from_utf8_lossy(&again.stdout).into_owned();
    assert!(again.status.success(), "{out}");
    assert!(out.contains("committed by an earlier attempt"), "{out}");
    assert_eq!(purchase_rows(&h), rows + 1, "stored once");

    // Nothing listening: every attempt fails to connect, and the command says the outcome is
    // not known and how to find out.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let nowhere = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let lost = ingest(nowhere, "cli-retry-2");
    let err = String::from_utf8_lossy(&lost.stderr).into_owned();
    assert!(!lost.status.success());
    assert!(
        err.contains("--request-id cli-retry-2") || err.contains("cannot connect"),
        "{err}"
    );
    h.stop().await;
}
