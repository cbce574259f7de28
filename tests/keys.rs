//! Issue 16, item 1: a collaboration's key can be destroyed, and nothing brings it back: not the
//! master secret, not a restored backup of the data directory.

use std::collections::HashSet;
use std::path::Path;

use cleanroom_core::keys::KeyStore;
use cleanroom_engine::arrow::array::{Array, FixedSizeBinaryArray};
use cleanroom_engine::datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use cleanroom_proto::v1::ListQueriesRequest;
use tonic::Code;

use crate::util::{Harness, as_of, files_of, keys_beside, list_of, sample_dir, test_secret};

/// Every match token stored in `dir`'s member-token files of `contract`.
fn stored_tokens(dir: &Path, contract: &str) -> HashSet<Vec<u8>> {
    let mut macs = HashSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with(&format!("member_tokens-{contract}")) {
            continue;
        }
        let file = std::fs::File::open(&path).unwrap();
        for batch in ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap()
        {
            let batch = batch.unwrap();
            let column = batch.column_by_name("mac").unwrap();
            let mac = column
                .as_any()
                .downcast_ref::<FixedSizeBinaryArray>()
                .unwrap();
            macs.extend((0..mac.len()).map(|i| mac.value(i).to_vec()));
        }
    }
    macs
}

/// The normalized e-mail of a sample member, as someone who knows the member would write it.
fn known_email() -> String {
    let members = cleanroom_client::read_members(&sample_dir().join("members.csv")).unwrap();
    let member = members.iter().find(|m| !m.email.is_empty()).unwrap();
    cleanroom_core::normalize::email(&member.email).unwrap()
}

fn writes_back(files: &std::collections::BTreeMap<std::path::PathBuf, Vec<u8>>, dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    for (path, bytes) in files {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}

/// Every call of Sakura's ended collaboration is refused with the date and the key's id.
async fn refused_with_date(h: &Harness, key_id: &str) {
    let mut partner = h.partner("sakura_foods");
    let upload = cleanroom_client::upload_list(&mut partner, false, list_of(&["M0000001"], "x"));
    let statuses = [
        h.run("sakura_foods", "matched_overlap", &[])
            .await
            .unwrap_err(),
        match upload.await.unwrap_err() {
            cleanroom_client::Error::Status(status) => status,
            other => panic!("not a status: {other}"),
        },
        h.partner("sakura_foods")
            .list_queries(ListQueriesRequest {})
            .await
            .unwrap_err(),
    ];
    for status in statuses {
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        let message = status.message();
        assert!(
            message.contains("destroyed on 2026-11-01") && message.contains(key_id),
            "{message}"
        );
    }
}

/// The test issue 16 names: back up the data directory and the key store, destroy a
/// collaboration, restore the old data directory with today's key store and the master secret.
/// The collaboration stays ended (every call of its partner refused with the date, uncharged),
/// and a known member's e-mail matches none of the restored member tokens, whatever key the
/// master secret can make now. The kept key-store backup still matches it: destruction is of
/// the key store and of its backups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroyed_key_does_not_come_back_with_a_restored_data_directory() {
    let mut h = Harness::start().await;
    let (contract, _) = h.rules.contract_of("sakura_foods").unwrap();
    let contract = contract.to_string();
    h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    h.halt().await;
    let data_backup = files_of(h.data_dir.path());
    let keys_dir = keys_beside(h.data_dir.path());
    let keys_backup = files_of(&keys_dir);
    let h = h.restart_after(|_| {}).await;

    let charges = h.app.guard.charges();
    let tombstone = h.app.keys.destroy(&contract, 1, "manual", as_of()).unwrap();
    refused_with_date(&h, &tombstone.key_id).await;
    assert_eq!(h.app.guard.charges(), charges, "the refusals are free");
    h.run("kumo_denki", "matched_overlap", &[])
        .await
        .expect("the other collaboration goes on");

    let mut h = h;
    h.halt().await;
    writes_back(&data_backup, h.data_dir.path());
    let h = h.start_accepting_restore().await;
    refused_with_date(&h, &tombstone.key_id).await;

    let email = known_email();
    let stored = stored_tokens(h.data_dir.path(), &contract);
    assert!(
        !stored.is_empty(),
        "the restored directory holds the old tokens"
    );
    assert!(h.app.keys.existing_key(&contract, 1).unwrap().is_none());
    assert!(h.app.keys.key(&contract, 1, as_of()).is_err());
    let fresh = tempfile::tempdir().unwrap();
    let remade = KeyStore::open(fresh.path(), test_secret())
        .unwrap()
        .key(&contract, 1, as_of())
        .unwrap();
    assert!(
        !stored.contains(remade.token(&email).mac.as_slice()),
        "the master secret alone re-derives nothing"
    );
    let old = tempfile::tempdir().unwrap();
    let old_keys = old.path().join("keys");
    writes_back(
        &keys_backup
            .iter()
            .map(|(p, b)| (old_keys.join(p.strip_prefix(&keys_dir).unwrap()), b.clone()))
            .collect(),
        &old_keys,
    );
    let backed_up = KeyStore::open(&old_keys, test_secret())
        .unwrap()
        .key(&contract, 1, as_of())
        .unwrap();
    assert!(
        stored.contains(backed_up.token(&email).mac.as_slice()),
        "control: with the key store's old backup the member is found, so the check above can fail"
    );
    h.stop().await;
}

/// The operator's view through the real binary: `export-key` makes a collaboration's key once
/// (the same key every time after), `keys status` lists it by its public id and never prints
/// key material, and a key store inside the data directory is refused.
#[test]
fn export_key_and_keys_status_through_the_binary() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cleanroom.toml");
    let write_config = |extra: &str| {
        let text = format!(
            "data_dir = {:?}\nrules = {:?}\nqueries = {:?}\n{extra}",
            dir.path().join("data").display().to_string(),
            sample_dir().join("rules.toml").display().to_string(),
            crate::util::root().join("queries").display().to_string(),
        );
        std::fs::write(&config, text).unwrap();
    };
    write_config("");
    let cleanroom = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_cleanroom"))
            .args(args)
            .arg("--config")
            .arg(&config)
            .env("CLEANROOM_MASTER_SECRET", "11".repeat(32))
            .output()
            .unwrap()
    };
    let export = || cleanroom(&["export-key", "--contract", "ctr-sakura-2026"]);
    let first = export();
    assert!(first.status.success(), "{first:?}");
    let key = String::from_utf8(first.stdout).unwrap();
    assert!(key.starts_with("v1."), "{key}");
    assert_eq!(String::from_utf8(export().stdout).unwrap(), key);

    let store = dir.path().join("data.keys");
    let mode = std::fs::metadata(&store).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the key store is its owner's only");
    let status = cleanroom(&["keys", "status"]);
    assert!(status.status.success(), "{status:?}");
    let listing = String::from_utf8(status.stdout).unwrap();
    let key_hex = key.trim().split_once('.').unwrap().1;
    assert!(listing.contains("ctr-sakura-2026"), "{listing}");
    assert!(!listing.contains(key_hex), "no key material: {listing}");
    let expected_id = cleanroom_core::keys::key_id(
        &cleanroom_core::token::CollaborationKey::from_export(&key).unwrap(),
    );
    assert!(listing.contains(&expected_id), "{listing}");

    let unknown = cleanroom(&["export-key", "--contract", "ctr-nobody"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no contract `ctr-nobody`"));

    write_config(&format!(
        "key_store = {:?}\n",
        dir.path().join("data/keys").display().to_string()
    ));
    let inside = cleanroom(&["keys", "status"]);
    assert_eq!(inside.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&inside.stderr).contains("is inside data_dir"),
        "{inside:?}"
    );
}
