//! Nothing half-written: a purchases stream of good and bad chunks (records, Arrow IPC, damaged
//! Arrow IPC), strict or not, finished or abandoned, fed through the store's staging area as the
//! service feeds it. A stream that fails, is abandoned or keeps no record leaves the data
//! directory byte for byte as it was; one that commits adds exactly its rows, and leaves no
//! file the manifest does not name.

use std::collections::BTreeMap;
use std::path::Path;

use proptest::prelude::*;

use super::arrow::{apply_damage, damage, ipc, rows};
use super::records::purchase;
use super::*;
use crate::ingest::{Ingest, PurchaseInput, PurchasesIngest};
use crate::store::{Found, Store, WriteFacts};

/// One message of a purchases stream.
#[derive(Debug, Clone)]
enum Chunk {
    Records(Vec<PurchaseInput>),
    Arrow(Vec<u8>),
}

fn chunk() -> impl Strategy<Value = Chunk> {
    let arrow = (
        rows(),
        any::<[u8; 8]>(),
        proptest::option::weighted(0.3, damage()),
    )
        .prop_map(|(rows, kinds, damage)| {
            let valid = ipc(&rows, kinds, 0);
            Chunk::Arrow(damage.map_or(valid.clone(), |d| apply_damage(valid, &d)))
        });
    prop_oneof![
        proptest::collection::vec(purchase(), 0..8).prop_map(Chunk::Records),
        arrow,
    ]
}

/// Every file of the data directory and its bytes.
fn contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("the data directory")
        .map(|e| {
            let path = e.expect("an entry").path();
            let name = path
                .file_name()
                .expect("a name")
                .to_string_lossy()
                .into_owned();
            (name, std::fs::read(&path).expect("a file"))
        })
        .collect()
}

fn purchase_rows(store: &Store) -> u64 {
    let files = &store.snapshot().purchases;
    files.iter().map(|f| f.rows().expect("rows")).sum()
}

/// A store with one purchases ingest committed, as a running service has.
fn store_with_purchases(dir: &Path) -> Store {
    let store = Store::open(dir).expect("a store");
    let mut staging = store.staging();
    let mut ingest = PurchasesIngest::new(&rules(), &secret(), true);
    let good = PurchaseInput {
        member_id: "M0000001".into(),
        purchased_at: "2026-02-02T12:47:15+09:00".into(),
        category: "beverages".into(),
        quantity: 1,
        amount: 100,
        ..PurchaseInput::default()
    };
    ingest
        .push(vec![good], &mut staging)
        .expect("a good record");
    let report = ingest.finish(&mut staging).expect("finished");
    store
        .commit_purchases(staging, facts(report))
        .expect("committed");
    store
}

fn facts(report: IngestReport) -> WriteFacts {
    WriteFacts {
        at: now(),
        method: "IngestPurchases".into(),
        partner: None,
        request_id: None,
        report,
    }
}

/// Feeds `chunks` through a staging area as the service does, and commits what it kept unless
/// the stream is `abandoned`. Returns the records it committed, if it committed.
fn feed(store: &Store, chunks: Vec<Chunk>, strict: bool, abandoned: bool) -> Option<u64> {
    let mut staging = store.staging();
    let mut ingest = PurchasesIngest::new(&rules(), &secret(), strict);
    for chunk in chunks {
        let fed = match chunk {
            Chunk::Records(records) => ingest.push(records, &mut staging),
            Chunk::Arrow(ipc) => ingest.push_arrow(&ipc, &mut staging),
        };
        // The stream fails: its staging area is dropped, as the service drops it.
        fed.ok()?;
    }
    let report = ingest.finish(&mut staging).ok()?;
    staging.close().ok()?;
    // The service refuses an ingest with no valid record before it commits.
    if abandoned || report.accepted == 0 {
        return None;
    }
    let accepted = report.accepted;
    store
        .commit_purchases(staging, facts(report))
        .expect("a staged ingest commits");
    Some(accepted)
}

proptest! {
    // Each case writes, syncs and commits Parquet files: fewer of them.
    #![proptest_config(cleanroom_fuzzing::config(48))]

    #[test]
    fn a_stream_commits_whole_or_leaves_the_data_directory_as_it_was(
        chunks in proptest::collection::vec(chunk(), 0..4),
        strict in any::<bool>(),
        abandoned in proptest::bool::weighted(0.2),
    ) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = store_with_purchases(dir.path());
        let (before, rows, commits) = (contents(dir.path()), purchase_rows(&store), store.commits());
        match feed(&store, chunks, strict, abandoned) {
            None => {
                prop_assert_eq!(contents(dir.path()), before);
                prop_assert_eq!(store.commits(), commits);
            }
            Some(accepted) => {
                prop_assert_eq!(purchase_rows(&store), rows + accepted);
                prop_assert_eq!(store.commits(), commits + 1);
            }
        }
        // What a restart would find: every file named by the manifest, and nothing else.
        let found = Found::read(dir.path()).expect("readable");
        prop_assert!(found.refusal().is_none() && found.orphans().is_empty());
    }
}
