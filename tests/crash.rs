//! Crash safety (issue 9, items 7 and 8): a write cut short leaves a torn last record in an
//! append-only file; the service drops it, records that it did, and serves on, with budgets as
//! they were. A privacy ledger that is lost or rolled back behind the audit trail stops the start
//! (fail closed) instead of refilling budgets.

use std::io::Write;
use std::path::Path;

use crate::util::{DataDir, Harness, try_app, year};

fn append_torn(path: &Path, bytes: &[u8]) {
    let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_last_records_are_dropped_and_recorded_never_an_outage() {
    let h = Harness::start().await;
    let first = h
        .run("sakura_foods", "repeat_purchase_rate", &year())
        .await
        .unwrap();
    let used = first.protection.as_ref().unwrap().answers_used;
    let h = h
        .restart_after(|dir| {
            append_torn(&dir.join("audit.jsonl"), b"{\"seq\":99999,\"id\":\"a-");
            append_torn(&dir.join("guard/ledger.jsonl"), b"{\"partner\":\"sakura_fo");
            append_torn(&dir.join("allowlist/versions.jsonl"), b"{\"id\":");
        })
        .await;
    let again = h
        .run("sakura_foods", "repeat_purchase_rate", &year())
        .await
        .expect("the service serves after the torn records");
    assert_eq!(
        again.arrow_ipc, first.arrow_ipc,
        "the earlier answer, whole"
    );
    let p = again.protection.unwrap();
    assert!(!p.fresh);
    assert_eq!(
        p.answers_used, used,
        "budgets are as they were, not refilled"
    );

    let trail = h.data_dir.path().join("audit.jsonl");
    let key = cleanroom_server::audit::ChainKey::new(&crate::util::test_secret());
    let verified = cleanroom_server::audit::verify(&trail, &key, None).expect("the trail verifies");
    assert!(verified.torn.is_none(), "the torn record was cut");
    let records = cleanroom_server::audit::read(&trail).unwrap();
    let recovered: Vec<String> = records
        .iter()
        .filter(|r| r.entry.method == "RecoverTornRecord")
        .filter_map(|r| match &r.entry.event {
            Some(cleanroom_server::audit::Event::Recovered { file, .. }) => Some(file.clone()),
            _ => None,
        })
        .collect();
    for file in [
        "audit.jsonl",
        "guard/ledger.jsonl",
        "allowlist/versions.jsonl",
    ] {
        assert!(
            recovered.iter().any(|f| f == file),
            "{file} not recorded: {recovered:?}"
        );
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_or_rolled_back_ledger_fails_closed() {
    let h = Harness::start().await;
    h.run("sakura_foods", "repeat_purchase_rate", &year())
        .await
        .unwrap();
    h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    let dir = h.shut_down().await;
    let ledger = dir.path().join("guard/ledger.jsonl");
    let whole = std::fs::read_to_string(&ledger).unwrap();

    // Rolled back by one charge.
    let first_line = whole.lines().next().unwrap();
    std::fs::write(&ledger, format!("{first_line}\n")).unwrap();
    let refused = try_app(dir.path())
        .err()
        .expect("a rolled-back ledger is refused");
    assert!(refused.to_string().contains("ledger"), "{refused}");
    // Lost.
    std::fs::remove_file(&ledger).unwrap();
    let refused = try_app(dir.path())
        .err()
        .expect("a missing ledger is refused");
    assert!(refused.to_string().contains("rolled back"), "{refused}");
    // Restored: the service starts.
    std::fs::write(&ledger, whole).unwrap();
    try_app(dir.path()).expect("the restored ledger starts");
}

#[test]
fn a_corrupt_complete_record_is_not_guessed_at() {
    let dir = DataDir::new();
    let app = try_app(dir.path()).unwrap();
    drop(app);
    let trail = dir.path().join("audit.jsonl");
    append_torn(&trail, b"{not a record}\n");
    let refused = try_app(dir.path())
        .err()
        .expect("a corrupt record is refused");
    assert!(refused.to_string().contains("audit record"), "{refused}");
}

/// Issue 9, finding "the audit trail can be cut": truncating its tail, or rewriting it whole
/// without the master secret, stops the service from starting on it; `verify-audit` prints a
/// signed checkpoint, and a trail rolled back behind a checkpoint kept elsewhere fails it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_cannot_be_cut_or_rewritten_unnoticed() {
    let h = Harness::start().await;
    h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    let dir = h.shut_down().await;
    let trail = dir.path().join("audit.jsonl");
    let checkpoint = cleanroom_server::audit::checkpoint_path(&trail);
    let (whole, whole_checkpoint) = (
        std::fs::read(&trail).unwrap(),
        std::fs::read(&checkpoint).unwrap(),
    );
    let verify_cli = |kept: Option<&Path>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cleanroom"));
        cmd.args(["verify-audit", "--data-dir"]).arg(dir.path());
        if let Some(kept) = kept {
            cmd.arg("--checkpoint").arg(kept);
        }
        cmd.env(
            "CLEANROOM_MASTER_SECRET",
            hex::encode(b"cleanroom integration test secret, 32+ bytes"),
        )
        .output()
        .unwrap()
    };
    let out = verify_cli(None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let kept_line = stdout.lines().last().unwrap();
    let kept = dir.path().join("kept-elsewhere.json");
    std::fs::write(&kept, kept_line).unwrap();

    // The tail cut by one record.
    let text = String::from_utf8(whole.clone()).unwrap();
    let cut: String = text
        .lines()
        .take(text.lines().count() - 1)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&trail, &cut).unwrap();
    let refused = try_app(dir.path()).err().expect("a cut trail is refused");
    assert!(
        refused.to_string().contains("fewer than its checkpoint"),
        "{refused}"
    );
    assert!(!verify_cli(None).status.success());

    // Cut, and the checkpoint removed too.
    std::fs::remove_file(&checkpoint).unwrap();
    let refused = try_app(dir.path())
        .err()
        .expect("a trail without its checkpoint is refused");
    assert!(refused.to_string().contains("missing"), "{refused}");

    // Rolled back consistently (an older trail and its checkpoint): only the kept checkpoint
    // tells.
    std::fs::write(&trail, &whole).unwrap();
    std::fs::write(&checkpoint, &whole_checkpoint).unwrap();
    let app = try_app(dir.path()).expect("the whole trail starts");
    app.record(cleanroom_server::audit::Entry {
        principal: "service".into(),
        method: "Later".into(),
        outcome: "ok".into(),
        ..Default::default()
    })
    .unwrap();
    drop(app);
    let out = verify_cli(None);
    let later = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap()
        .to_string();
    std::fs::write(&kept, later).unwrap();
    std::fs::write(&trail, &whole).unwrap();
    std::fs::write(&checkpoint, &whole_checkpoint).unwrap();
    assert!(
        verify_cli(None).status.success(),
        "consistent with its own checkpoint"
    );
    let out = verify_cli(Some(&kept));
    assert!(
        !out.status.success(),
        "the kept checkpoint catches the rollback"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("fewer than its checkpoint"));
}

/// Issue 9, item 8, and issue 14, item 6: a write and its record. The store commits a write
/// before its call's audit record is written, so a crash between the two leaves data the trail
/// does not account for, and a crash before the commit leaves a data file no manifest names. At
/// start-up both are reconciled, once: the file is removed, and the commit gets a record naming
/// the call, the partner and its records. Temporary files a stop left are removed without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_reconciles_unrecorded_writes_and_orphan_files() {
    let h = Harness::start().await;
    let dir = h.shut_down().await;
    // As a crash would leave them: a data file written but never committed, a committed list
    // upload (in the manifest's log) whose call record never made it to the trail, and the
    // temporary files of writes cut short.
    let orphan = dir.path().join("purchases-999999.parquet");
    std::fs::write(&orphan, b"PAR1 half-written").unwrap();
    let temporaries = [
        dir.path().join("audit.checkpoint.1-0.tmp"),
        dir.path().join("staging-1-0.tmp"),
        dir.path()
            .join("guard/answers/c2FrdXJhX2Zvb2Rz/abc.json.1-0.tmp"),
        dir.path().join("allowlist/versions.jsonl.1-0.tmp"),
    ];
    for tmp in &temporaries {
        std::fs::create_dir_all(tmp.parent().unwrap()).unwrap();
        std::fs::write(tmp, b"half").unwrap();
    }
    let manifest_path = dir.path().join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let commits = manifest["commits"]
        .as_u64()
        .expect("the manifest counts commits");
    manifest["commits"] = (commits + 1).into();
    manifest["log"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "seq": commits + 1, "at": "2026-11-01T00:00:00Z", "method": "UploadList",
            "partner": "kumo_denki", "received": 7, "accepted": 6, "files": []
        }));
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();

    drop(try_app(dir.path()).expect("the service starts"));
    assert!(!orphan.exists(), "the orphan file is collected");
    for tmp in &temporaries {
        assert!(!tmp.exists(), "{} is collected", tmp.display());
    }
    let trail = dir.path().join("audit.jsonl");
    let reconciled = |records: &[cleanroom_server::audit::Record]| {
        records
            .iter()
            .filter_map(|r| match &r.entry.event {
                Some(cleanroom_server::audit::Event::Reconciled {
                    orphan_files,
                    unrecorded_writes,
                    writes,
                }) => Some((orphan_files.clone(), *unrecorded_writes, writes.clone())),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let found = reconciled(&cleanroom_server::audit::read(&trail).unwrap());
    assert_eq!(found.len(), 1, "one record accounts for both: {found:?}");
    let (orphans, unrecorded, writes) = &found[0];
    assert_eq!(orphans, &vec!["purchases-999999.parquet".to_string()]);
    assert_eq!(*unrecorded, 1);
    assert_eq!(
        writes,
        &vec![cleanroom_server::audit::UnrecordedWrite {
            commit: commits + 1,
            method: "UploadList".into(),
            partner: Some("kumo_denki".into()),
            records: (7, 6),
            request_id: None,
        }],
        "the write is named"
    );
    drop(try_app(dir.path()).expect("and starts again"));
    let again = reconciled(&cleanroom_server::audit::read(&trail).unwrap());
    assert_eq!(again.len(), 1, "reconciled once, not at every start");
}
