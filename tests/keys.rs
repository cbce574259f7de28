//! Issue 16, item 1: a collaboration's key can be destroyed, and nothing brings it back: not the
//! master secret, not a restored backup of the data directory.

use std::collections::HashSet;
use std::path::Path;

use std::sync::Arc;

use cleanroom_core::keys::KeyStore;
use cleanroom_core::token::DataKey;
use cleanroom_engine::arrow::array::{Array, FixedSizeBinaryArray};
use cleanroom_engine::datafusion::parquet::arrow::arrow_reader::{
    ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use cleanroom_engine::datafusion::parquet::encryption::decrypt::FileDecryptionProperties;
use cleanroom_engine::guard::answers::Answers;
use cleanroom_proto::v1::ListQueriesRequest;
use tonic::Code;

use crate::util::{Harness, as_of, files_of, keys_beside, list_of, sample_dir, test_secret};

/// Every match token in `dir`'s sealed files whose names start with one of `stems` (member
/// tokens of a collaboration, versions of its partner's list), opened with `key`; the error of
/// the first file that does not open.
fn sealed_tokens(
    dir: &Path,
    stems: &[String],
    key: Option<&DataKey>,
) -> Result<HashSet<Vec<u8>>, String> {
    let mut macs = HashSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !stems.iter().any(|stem| name.starts_with(stem.as_str())) {
            continue;
        }
        let mut options = ArrowReaderOptions::new();
        if let Some(key) = key {
            let decryption = FileDecryptionProperties::builder(key.bytes().to_vec())
                .build()
                .unwrap();
            options = options.with_file_decryption_properties(decryption);
        }
        let file = std::fs::File::open(&path).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new_with_options(file, options)
            .and_then(|b| b.build())
            .map_err(|e| format!("{name}: {e}"))?;
        for batch in reader {
            let batch = batch.map_err(|e| format!("{name}: {e}"))?;
            let column = batch.column_by_name("mac").unwrap();
            let mac = column
                .as_any()
                .downcast_ref::<FixedSizeBinaryArray>()
                .unwrap();
            macs.extend((0..mac.len()).map(|i| mac.value(i).to_vec()));
        }
    }
    Ok(macs)
}

/// Opens every stored answer of `partner` in `data_dir` with data keys from `keys`: how many
/// opened, and how many were refused.
fn open_answers(data_dir: &Path, partner: &str, keys: Arc<KeyStore>) -> (usize, usize) {
    let answers = Answers::open(data_dir.join("guard/answers"), keys).unwrap();
    let (mut opened, mut refused) = (0, 0);
    for entry in std::fs::read_dir(answers_dir(data_dir, partner)).unwrap() {
        let path = entry.unwrap().path();
        let stored = std::fs::read_to_string(&path).unwrap();
        assert!(
            stored.contains("\"sealed\"") && !stored.contains("outcome"),
            "an answer stored in the clear: {}",
            path.display()
        );
        let key = path.file_stem().unwrap().to_string_lossy().into_owned();
        match answers.get(partner, &key) {
            Ok(Some(_)) => opened += 1,
            _ => refused += 1,
        }
    }
    (opened, refused)
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
/// The collaboration stays ended (every call of its partner refused with the date, uncharged).
/// None of its member tokens, list versions or stored answers in the restored directory can be
/// read: not with today's key store, not with a key the master secret makes now; so a known
/// member's e-mail matches nothing. The kept key-store backup still opens them all and finds the
/// member: destruction is of the key store and of its backups.
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

    let dir = h.data_dir.path();
    let stems = [
        format!("member_tokens-{contract}-"),
        "list-sakura_foods-".to_string(),
    ];
    let email = known_email();
    assert!(
        h.app.keys.data_key(&contract, 1).is_err(),
        "today's key store"
    );
    assert!(h.app.keys.existing_key(&contract, 1).unwrap().is_none());
    assert!(h.app.keys.key(&contract, 1, as_of()).is_err());
    assert!(
        sealed_tokens(dir, &stems, None).is_err(),
        "read with no key"
    );
    let fresh = tempfile::tempdir().unwrap();
    let remade = KeyStore::open(fresh.path(), test_secret()).unwrap();
    let remade_key = remade.key(&contract, 1, as_of()).unwrap();
    let remade_data = remade.data_key(&contract, 1).unwrap();
    assert!(
        sealed_tokens(dir, &stems, Some(&remade_data)).is_err(),
        "the master secret alone opens nothing"
    );
    assert_eq!(open_answers(dir, "sakura_foods", remade).0, 0);

    let old = tempfile::tempdir().unwrap();
    let old_keys = old.path().join("keys");
    writes_back(
        &keys_backup
            .iter()
            .map(|(p, b)| (old_keys.join(p.strip_prefix(&keys_dir).unwrap()), b.clone()))
            .collect(),
        &old_keys,
    );
    let backed_up = KeyStore::open(&old_keys, test_secret()).unwrap();
    let stored = sealed_tokens(
        dir,
        &stems,
        Some(&backed_up.data_key(&contract, 1).unwrap()),
    )
    .expect("control: the key store's old backup opens the restored files");
    let old_key = backed_up.key(&contract, 1, as_of()).unwrap();
    assert!(
        stored.contains(old_key.token(&email).mac.as_slice()),
        "control: with the key store's old backup the member is found, so the checks above can fail"
    );
    assert!(!stored.contains(remade_key.token(&email).mac.as_slice()));
    let (opened, refused) = open_answers(dir, "sakura_foods", backed_up);
    assert!(
        opened > 0 && refused == 0,
        "control: {opened} opened, {refused} refused"
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

/// The answers directory of a partner in the guard's store (the partner id, base64url).
fn answers_dir(data_dir: &Path, partner: &str) -> std::path::PathBuf {
    use base64::Engine as _;
    let name = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(partner);
    data_dir.join("guard/answers").join(name)
}

async fn request_end(h: &Harness, contract: &str, reason: &str) -> Result<(), tonic::Status> {
    h.analyst()
        .request_destruction(cleanroom_proto::v1::RequestDestructionRequest {
            contract_id: contract.into(),
            reason: reason.into(),
        })
        .await
        .map(|_| ())
}

async fn confirm_end(
    h: &Harness,
    token: &str,
    contract: &str,
) -> Result<cleanroom_proto::v1::DestructionStatus, tonic::Status> {
    h.conn
        .legal(token)
        .unwrap()
        .confirm_destruction(cleanroom_proto::v1::ConfirmDestructionRequest {
            contract_id: contract.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Issue 16, item 3: an analyst asks, a legal reviewer confirms, and the collaboration's lists,
/// member tokens, stored answers and key are destroyed, each file named with its SHA-256 and rows
/// in the answer and in one audit record; the partner is refused with the date, uncharged; the
/// other collaboration goes on; after a restart nothing comes back and the trail verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmed_destruction_removes_the_collaboration_and_proves_it() {
    use cleanroom_client::sample;
    let h = Harness::start().await;
    let (contract, _) = h.rules.contract_of("sakura_foods").unwrap();
    let contract = contract.to_string();
    h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    let answers = answers_dir(h.data_dir.path(), "sakura_foods");
    assert!(answers.exists(), "a stored answer to destroy");

    let refused = confirm_end(&h, sample::LEGAL_TOKEN, &contract)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("no pending request"),
        "{refused:?}"
    );
    let refused = request_end(&h, &contract, "  ").await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    let refused = request_end(&h, "ctr-nobody", "x").await.unwrap_err();
    assert_eq!(refused.code(), Code::NotFound, "{refused:?}");
    request_end(&h, &contract, "the campaign was cancelled")
        .await
        .unwrap();
    request_end(&h, &contract, "the campaign was cancelled")
        .await
        .expect("a request sent again is answered with the one waiting");
    h.run("sakura_foods", "matched_overlap", &[])
        .await
        .expect("nothing changes until legal confirms");
    let refused = confirm_end(&h, sample::ANALYST_TOKEN, &contract)
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Code::PermissionDenied,
        "the analyst cannot confirm"
    );

    let charges = h.app.guard.charges();
    let done = confirm_end(&h, sample::LEGAL_TOKEN, &contract)
        .await
        .unwrap();
    assert_eq!(done.state, "destroyed");
    assert_eq!(done.reason, "the campaign was cancelled");
    assert!(done.stored_answers >= 1);
    assert!(done.key_id.len() == 16, "{done:?}");
    assert!(
        done.files
            .iter()
            .any(|f| f.name.starts_with("member_tokens-"))
            && done
                .files
                .iter()
                .any(|f| !f.name.starts_with("member_tokens-")),
        "its member tokens and its list: {done:?}"
    );
    for file in &done.files {
        assert!(file.rows > 0 && file.sha256.len() == 64, "{file:?}");
        assert!(
            !h.data_dir.path().join(&file.name).exists(),
            "{} is gone",
            file.name
        );
    }
    assert!(!answers.exists(), "its stored answers are gone");
    refused_with_date(&h, &done.key_id).await;
    assert_eq!(h.app.guard.charges(), charges, "nothing was charged");
    h.run("kumo_denki", "matched_overlap", &[]).await.unwrap();

    // The confirmation sent again, as a client whose answer was lost does: answered with the
    // destruction that happened, and nothing is destroyed or recorded as destroyed again.
    let again = confirm_end(&h, sample::LEGAL_TOKEN, &contract)
        .await
        .expect("a confirmation sent again is answered");
    assert_eq!(
        (again.state.as_str(), &again.reason, &again.key_id),
        ("destroyed", &done.reason, &done.key_id)
    );
    assert_eq!(again.files, done.files);
    assert_eq!(again.stored_answers, done.stored_answers);
    assert_eq!(again.confirmed_by, done.confirmed_by);
    assert!(!again.destroyed_at.is_empty());

    let audit = h
        .legal()
        .list_audit(cleanroom_proto::v1::ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    let proofs: Vec<_> = audit
        .records
        .iter()
        .filter(|r| r.method == "ConfirmDestruction" && r.details.contains_key("files"))
        .collect();
    assert_eq!(proofs.len(), 1, "one destruction recorded: {proofs:?}");
    let requests = audit
        .records
        .iter()
        .filter(|r| r.method == "RequestDestruction" && r.details.contains_key("reason"))
        .count();
    assert_eq!(
        requests, 1,
        "the request sent again is not a second request"
    );
    let proof = proofs[0];
    for file in &done.files {
        assert!(proof.details["files"].contains(&file.sha256), "{proof:?}");
    }
    assert!(proof.details["key"].contains(&done.key_id));

    let h = h.restart().await;
    refused_with_date(&h, &done.key_id).await;
    for file in &done.files {
        assert!(!h.data_dir.path().join(&file.name).exists());
    }
    let trail = h.data_dir.path().join("audit.jsonl");
    let key = cleanroom_server::audit::ChainKey::new(&test_secret());
    cleanroom_server::audit::verify(&trail, &key, None).expect("the trail verifies");
    h.stop().await;
}

/// A destruction cut by a crash after its commit (its stored answers and key still there) is
/// finished at the next start, not left half done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destruction_cut_after_its_commit_is_finished_at_the_next_start() {
    use cleanroom_client::sample;
    let mut h = Harness::start().await;
    let (contract, _) = h.rules.contract_of("sakura_foods").unwrap();
    let contract = contract.to_string();
    h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    let keys_dir = keys_beside(h.data_dir.path());
    let answers = answers_dir(h.data_dir.path(), "sakura_foods");
    let (kept_keys, kept_answers) = (files_of(&keys_dir), files_of(&answers));
    request_end(&h, &contract, "cut short").await.unwrap();
    confirm_end(&h, sample::LEGAL_TOKEN, &contract)
        .await
        .unwrap();
    h.halt().await;
    // As the directory and key store were when the crash came: committed, nothing else done.
    writes_back(&kept_keys, &keys_dir);
    writes_back(&kept_answers, &answers);
    assert!(keys_dir.join(format!("{contract}.v1.seed")).exists());
    let h = h.restart_after(|_| {}).await;
    assert!(
        !answers.exists(),
        "the stored answers were destroyed at start"
    );
    assert!(!keys_dir.join(format!("{contract}.v1.seed")).exists());
    let tombstone = h.app.keys.tombstone(&contract, 1).unwrap().expect("ended");
    refused_with_date(&h, &tombstone.key_id).await;
    h.stop().await;
}

/// The legal reviewer's proof, through the real binary: `destruction-certificate` prints the
/// same signed statement every time, naming each destroyed file and the key; `verify-audit`
/// passes, and fails once a destroyed file or a destroyed key's seed is put back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_and_verify_audit_prove_the_destruction() {
    use cleanroom_client::sample;
    let h = Harness::start().await;
    let (contract, _) = h.rules.contract_of("sakura_foods").unwrap();
    let contract = contract.to_string();
    let data = h.data_dir.path().to_path_buf();
    let keys_dir = keys_beside(&data);
    let (data_before, keys_before) = (files_of(&data), files_of(&keys_dir));
    request_end(&h, &contract, "ended early").await.unwrap();
    let done = confirm_end(&h, sample::LEGAL_TOKEN, &contract)
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cleanroom.toml");
    let text = format!(
        "data_dir = {:?}\nrules = {:?}\nqueries = {:?}\nkey_store = {:?}\n",
        data.display().to_string(),
        sample_dir().join("rules.toml").display().to_string(),
        crate::util::root().join("queries").display().to_string(),
        keys_dir.display().to_string(),
    );
    std::fs::write(&config, text).unwrap();
    let secret_hex: String = b"cleanroom integration test secret, 32+ bytes"
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let cleanroom = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_cleanroom"))
            .args(args)
            .env("CLEANROOM_MASTER_SECRET", &secret_hex)
            .output()
            .unwrap()
    };
    let config = config.display().to_string();
    let certify = || {
        cleanroom(&[
            "destruction-certificate",
            "--config",
            &config,
            "--contract",
            &contract,
        ])
    };
    let first = certify();
    assert!(first.status.success(), "{first:?}");
    let text = String::from_utf8(first.stdout).unwrap();
    assert_eq!(
        String::from_utf8(certify().stdout).unwrap(),
        text,
        "the same text again"
    );
    assert!(text.contains("Certificate of destruction") && text.contains("データ消去証明書"));
    assert!(text.contains(&done.key_id) && text.contains("signature"));
    for file in &done.files {
        assert!(text.contains(&file.sha256), "{text}");
    }
    let data_arg = data.display().to_string();
    let verify = || cleanroom(&["verify-audit", "--data-dir", &data_arg, "--config", &config]);
    let verified = verify();
    assert!(verified.status.success(), "{verified:?}");
    assert!(String::from_utf8_lossy(&verified.stdout).contains("nothing they destroyed is back"));

    let file = data.join(&done.files[0].name);
    std::fs::write(&file, &data_before[&file]).unwrap();
    let refused = verify();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is in the data directory again"));
    assert!(
        !certify().status.success(),
        "no certificate while a destroyed file is back"
    );
    std::fs::remove_file(&file).unwrap();

    let seed = keys_dir.join(format!("{contract}.v1.seed"));
    std::fs::write(&seed, &keys_before[&seed]).unwrap();
    let refused = verify();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("beside its tombstone"),
        "{refused:?}"
    );
    h.stop().await;
}

/// Noon in the retailer's time zone (+09:00) on `day`.
fn local_noon(day: chrono::NaiveDate) -> chrono::DateTime<chrono::Utc> {
    day.and_hms_opt(3, 0, 0).unwrap().and_utc()
}

/// The data files of Sakura Foods' collaboration: its member tokens and its list versions.
fn sakura_files(data: &Path) -> Vec<String> {
    std::fs::read_dir(data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("member_tokens-ctr-sakura") || n.starts_with("list-sakura_foods"))
        .collect()
}

/// Issue 16, item 2: on the last day of a contract's grace period nothing is destroyed; the day
/// after, the start's sweep destroys its lists, member tokens, stored answers and key, with one
/// `Sweep` record; the partner is refused, the privacy ledger is unchanged, the other
/// collaboration is untouched and the trail verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contract_past_its_expiry_and_grace_is_destroyed_by_the_sweep() {
    let mut rules = crate::util::sample_rules();
    let (contract, _) = rules.contract_of("sakura_foods").unwrap();
    let contract = contract.to_string();
    rules
        .contracts
        .get_mut(&contract)
        .unwrap()
        .retention
        .grace_days = 7;
    let expires = rules.contracts[&contract].expires;
    let h = Harness::start_with(crate::util::Setup {
        rules,
        ..Default::default()
    })
    .await;
    h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    let data = h.data_dir.path().to_path_buf();
    let before = sakura_files(&data);
    assert_eq!(before.len(), 2, "{before:?}");
    let charges = h.app.guard.charges();

    let h = h
        .restart_at(local_noon(expires + chrono::Days::new(7)))
        .await;
    assert_eq!(
        sakura_files(&data),
        before,
        "kept through the last day of grace"
    );
    assert!(h.app.keys.tombstone(&contract, 1).unwrap().is_none());

    let h = h
        .restart_at(local_noon(expires + chrono::Days::new(8)))
        .await;
    assert!(sakura_files(&data).is_empty(), "{:?}", sakura_files(&data));
    assert!(!answers_dir(&data, "sakura_foods").exists());
    let tombstone = h
        .app
        .keys
        .tombstone(&contract, 1)
        .unwrap()
        .expect("destroyed");
    assert_eq!(tombstone.reason, "expiry");
    let status = h
        .run("sakura_foods", "matched_overlap", &[])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(h.app.guard.charges(), charges, "the ledger is as it was");
    assert!(
        h.app.keys.tombstone("ctr-kumo-2026", 1).unwrap().is_none(),
        "Kumo's contract runs on"
    );
    let trail = data.join("audit.jsonl");
    let key = cleanroom_server::audit::ChainKey::new(&test_secret());
    cleanroom_server::audit::verify(&trail, &key, None).expect("the trail verifies");
    let records = cleanroom_server::audit::read(&trail).unwrap();
    let sweeps: Vec<_> = records
        .iter()
        .filter(|r| r.entry.method == "Sweep")
        .collect();
    assert_eq!(sweeps.len(), 1, "one record of the destruction");
    h.stop().await;
}
