//! Issue 16, item 6: rotation with an overlap. Raising a contract's key version keeps the old
//! version's lists matching for `key_overlap_days` (lists of either version are accepted, a
//! members ingest computes tokens under both); at the end of the overlap the sweep destroys the
//! old key, its member tokens and its list versions, with a typed audit record, and from then on
//! the old version is refused, uncharged, naming the day. A question whose list's key version
//! has no member tokens yet is refused before anything is charged.

use std::collections::BTreeSet;
use std::path::Path;

use chrono::{DateTime, Days, Utc};
use cleanroom_core::consent::Requirement;
use cleanroom_core::token::CollaborationKey;
use cleanroom_engine::arrow::array::{Array, UInt32Array};
use cleanroom_proto::v1::{CustomerRecord, IngestHeader};
use cleanroom_server::audit::{Event, Retirement};
use tonic::Code;

use crate::util::{Harness, Setup, as_of, keys_beside, sample_dir, test_secret};

const SAKURA: &str = "ctr-sakura-2026";

fn days_later(days: u64) -> DateTime<Utc> {
    as_of() + Days::new(days)
}

/// The sample rules with Sakura's contract edited.
fn setup(edit: impl FnOnce(&mut cleanroom_core::rules::Contract)) -> Setup {
    let mut rules = crate::util::sample_rules();
    edit(rules.contracts.get_mut(SAKURA).unwrap());
    Setup {
        rules,
        ..Setup::default()
    }
}

/// Moves Sakura's contract to key version 2 and restarts the service at `at`, as a rules change
/// and a restart (or a reload) would.
async fn rotate(mut h: Harness, at: DateTime<Utc>) -> Harness {
    h.rules.contracts.get_mut(SAKURA).unwrap().key_version = 2;
    h.restart_at(at).await
}

/// The data files of `dir` whose names start with `prefix`, sorted.
fn files_named(dir: &Path, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix) && n.ends_with(".parquet"))
        .collect();
    names.sort();
    names
}

/// The key versions of every token in Sakura's member-token files.
fn token_versions(data: &Path) -> BTreeSet<u32> {
    let mut versions = BTreeSet::new();
    for name in files_named(data, "member_tokens-ctr-sakura") {
        for batch in crate::util::data_file_batches(data, &name) {
            let column = batch.column_by_name("key_version").unwrap();
            let column = column.as_any().downcast_ref::<UInt32Array>().unwrap();
            versions.extend((0..column.len()).map(|i| column.value(i)));
        }
    }
    versions
}

/// Consenting members of Sakura's purpose in its current list, counted exactly by the engine
/// (what every answer's audience starts from); `None` without a list.
fn matched(h: &Harness) -> Option<usize> {
    let contract = &h.rules.contracts[SAKURA];
    let purpose = &h.rules.purposes[&contract.purpose];
    let requirement = Requirement {
        min_notice_version: purpose.min_notice_version,
        grant_valid_days: purpose.grant_valid_days,
    };
    let snapshot = h.app.store.snapshot();
    cleanroom_engine::consent_counts(&snapshot, SAKURA, contract, &requirement, as_of())
        .unwrap()
        .1
}

/// Sakura's sample list as `cleanroom prep` makes it under `key`: tokens, no raw identifier.
fn prepped(key: &CollaborationKey) -> Vec<CustomerRecord> {
    let raw =
        cleanroom_client::read_list(&sample_dir().join("partner_lists/sakura_foods.csv")).unwrap();
    raw.into_iter()
        .map(|r| CustomerRecord {
            email_token: cleanroom_core::normalize::email(&r.email)
                .map(|e| key.token(&e).to_string())
                .unwrap_or_default(),
            phone_token: cleanroom_core::normalize::phone(&r.phone)
                .map(|p| key.token(&p).to_string())
                .unwrap_or_default(),
            attribute: r.attribute,
            ..Default::default()
        })
        .filter(|r| !r.email_token.is_empty() || !r.phone_token.is_empty())
        .collect()
}

async fn upload(h: &Harness, records: Vec<CustomerRecord>) -> Result<u32, tonic::Status> {
    let mut partner = h.partner("sakura_foods");
    match cleanroom_client::upload_list(&mut partner, false, records).await {
        Ok(response) => Ok(response.list_version),
        Err(cleanroom_client::Error::Status(status)) => Err(status),
        Err(other) => panic!("not a status: {other}"),
    }
}

async fn upload_raw(h: &Harness) -> Result<u32, tonic::Status> {
    let records =
        cleanroom_client::read_list(&sample_dir().join("partner_lists/sakura_foods.csv")).unwrap();
    upload(h, records).await
}

async fn ingest_members(h: &Harness) {
    let members = cleanroom_client::read_members(&sample_dir().join("members.csv")).unwrap();
    send_members(h, members, false).await.unwrap();
}

/// Sends `members` as a members ingest, in full or (`tokens_only`) for the missing tokens.
async fn send_members(
    h: &Harness,
    members: Vec<cleanroom_proto::v1::MemberRecord>,
    tokens_only: bool,
) -> Result<(), tonic::Status> {
    let header = IngestHeader {
        source: "members.csv".into(),
        strict: false,
        request_id: cleanroom_client::new_request_id(),
        tokens_only,
    };
    match cleanroom_client::ingest_members(&mut h.analyst(), header, members).await {
        Ok(_) => Ok(()),
        Err(cleanroom_client::Error::Status(status)) => Err(status),
        Err(other) => panic!("not a status: {other}"),
    }
}

/// The key versions Sakura's current list is under.
fn list_key_versions(h: &Harness) -> BTreeSet<u32> {
    h.app.store.snapshot().lists["sakura_foods"]
        .key_versions
        .clone()
}

/// When the key store made Sakura's key `version`.
fn key_created(h: &Harness, version: u32) -> DateTime<Utc> {
    h.app
        .keys
        .status()
        .unwrap()
        .into_iter()
        .find(|k| k.contract == SAKURA && k.version == version)
        .unwrap()
        .created
}

/// The trail verifies; its rotation records, in order.
fn rotation_records(data: &Path) -> Vec<Retirement> {
    let trail = data.join("audit.jsonl");
    let key = cleanroom_server::audit::ChainKey::new(&test_secret());
    cleanroom_server::audit::verify(&trail, &key, None).expect("the trail verifies");
    cleanroom_server::audit::read(&trail)
        .unwrap()
        .into_iter()
        .filter_map(|r| match r.entry.event {
            Some(Event::Retired(retired)) if retired.reason == "rotation" => {
                assert_eq!(r.entry.method, "Sweep");
                Some(*retired)
            }
            _ => None,
        })
        .collect()
}

fn ledger(h: &Harness) -> Vec<u8> {
    std::fs::read(cleanroom_engine::guard::Guard::ledger_path(
        h.data_dir.path(),
    ))
    .unwrap()
}

/// The test issue 16 names: during a rotation overlap the old list still matches, and after it
/// the old key is gone. Sakura keeps three list versions and a 7-day overlap; its key moves to
/// version 2 an hour after the sample's export (the same local day, so a repeated question is
/// the stored answer), so version 1 is destroyed 7 days later (a restart on day 5 does not move
/// that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_the_overlap_the_old_list_still_matches_and_after_it_the_old_key_is_gone() {
    let h = Harness::start_with(setup(|c| {
        c.key_overlap_days = 7;
        c.retention.keep_versions = 3;
    }))
    .await;
    let data = h.data_dir.path().to_path_buf();
    let keys_dir = keys_beside(&data);
    let before = h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    let matched_before = matched(&h).unwrap();
    assert!(matched_before > 0);
    let old_key = h.app.keys.existing_key(SAKURA, 1).unwrap().unwrap();

    let rotated = as_of() + chrono::Duration::hours(1);
    let h = rotate(h, rotated).await;
    assert_eq!(key_created(&h, 2), rotated, "the overlap's anchor");
    let again = h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    assert_eq!(again.rows, before.rows, "the same answer over the old list");
    assert!(
        !again.protection.as_ref().unwrap().fresh,
        "served as stored: nothing charged again"
    );

    // A list prepared under the old key is still received, and matches the old member tokens.
    assert_eq!(upload(&h, prepped(&old_key)).await.unwrap(), 2);
    assert_eq!(list_key_versions(&h), BTreeSet::from([1]));
    assert_eq!(matched(&h), Some(matched_before));
    // The members ingest during the overlap computes tokens under both versions.
    ingest_members(&h).await;
    assert_eq!(token_versions(&data), BTreeSet::from([1, 2]));
    assert_eq!(matched(&h), Some(matched_before));
    let fresh = h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    assert!(
        fresh.protection.as_ref().unwrap().fresh,
        "new member tokens: a fresh answer over the old list"
    );
    // A new-version list (raw identifiers are hashed under the current key) works too.
    assert_eq!(upload_raw(&h).await.unwrap(), 3);
    assert_eq!(list_key_versions(&h), BTreeSet::from([2]));
    assert_eq!(matched(&h), Some(matched_before));
    h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    // Once the partner is on the new version, an old-version list is refused.
    let back = upload(&h, prepped(&old_key)).await.unwrap_err();
    assert_eq!(back.code(), Code::FailedPrecondition, "{back:?}");
    assert!(back.message().contains("under key version 2"), "{back:?}");

    // A restart during the overlap does not extend it.
    let h = h.restart_at(days_later(5)).await;
    assert_eq!(key_created(&h, 2), rotated);
    assert!(keys_dir.join(format!("{SAKURA}.v1.seed")).exists());
    assert_eq!(files_named(&data, "list-sakura_foods").len(), 3);
    let ended = rotated + chrono::Duration::days(7);
    let h = h.restart_at(ended - chrono::Duration::seconds(1)).await;
    assert!(
        h.app.keys.tombstone(SAKURA, 1).unwrap().is_none(),
        "not yet"
    );
    let h = h.restart_at(ended).await;
    let lists_left = files_named(&data, "list-sakura_foods");
    assert_eq!(lists_left.len(), 1, "{lists_left:?}");

    assert!(!keys_dir.join(format!("{SAKURA}.v1.seed")).exists());
    let tombstone = h.app.keys.tombstone(SAKURA, 1).unwrap().unwrap();
    assert_eq!(tombstone.reason, "rotation");
    assert_eq!(tombstone.destroyed, ended);
    assert!(h.app.keys.existing_key(SAKURA, 2).unwrap().is_some());
    assert_eq!(token_versions(&data), BTreeSet::from([2]));
    let records = rotation_records(&data);
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(record.key_version, Some(1));
    assert_eq!(record.key_id.as_deref(), Some(tombstone.key_id.as_str()));
    assert_eq!(
        record.through_version,
        Some(2),
        "lists 1 and 2 were under v1"
    );
    assert_eq!(record.files.len(), 3, "the member tokens and two lists");
    for file in &record.files {
        assert!(!data.join(&file.name).exists(), "{} is gone", file.name);
    }
    assert_eq!(record.written.len(), 1, "the v2 member tokens, rewritten");
    assert!(data.join(&record.written[0].name).exists());
    assert!(record.removed_rows > 0);

    let charges = h.app.guard.charges();
    let ledger_before = ledger(&h);
    let refused = upload(&h, prepped(&old_key)).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("destroyed on 2026-11-08")
            && refused.message().contains("rotation overlap"),
        "{refused:?}"
    );
    assert_eq!(ledger(&h), ledger_before, "the refusal charges nothing");
    assert_eq!(h.app.guard.charges(), charges);
    // Control: the partner's new-version list answers on.
    assert_eq!(matched(&h), Some(matched_before));
    h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    h.stop().await;
}

/// Without an overlap the old version goes at the first sweep after the rotation. A partner left
/// with only an old-version list is refused, uncharged, naming the day; a new-version list is
/// refused, uncharged, until the members are ingested again, and then answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_overlap_the_old_version_goes_at_once_and_new_tokens_wait_for_an_ingest() {
    let h = Harness::start_with(setup(|_| {})).await;
    let data = h.data_dir.path().to_path_buf();
    h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    let h = rotate(h, days_later(1)).await;
    assert_eq!(
        h.app.keys.tombstone(SAKURA, 1).unwrap().unwrap().reason,
        "rotation"
    );
    assert!(files_named(&data, "list-sakura_foods").is_empty());
    assert!(token_versions(&data).is_empty());
    assert_eq!(rotation_records(&data).len(), 1);

    let ledger_before = ledger(&h);
    let charges = h.app.guard.charges();
    let refused = h
        .run("sakura_foods", "matched_overlap", &[])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("destroyed on 2026-11-02 with key version 1"),
        "{refused:?}"
    );

    assert_eq!(upload_raw(&h).await.unwrap(), 2);
    for _ in 0..2 {
        let refused = h
            .run("sakura_foods", "matched_overlap", &[])
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert!(
            refused
                .message()
                .contains("not yet computed its members' tokens"),
            "{refused:?}"
        );
    }
    assert_eq!(h.app.guard.charges(), charges, "the refusals are free");
    assert_eq!(ledger(&h), ledger_before, "the ledger is unchanged");

    // Control: after a members ingest the same question is answered, and charged.
    ingest_members(&h).await;
    assert_eq!(token_versions(&data), BTreeSet::from([2]));
    let answer = h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    assert!(answer.protection.as_ref().unwrap().fresh);
    assert_eq!(h.app.guard.charges(), charges + 1);
    assert_ne!(ledger(&h), ledger_before);
    // The other collaboration was never touched.
    assert!(h.app.keys.tombstone("ctr-kumo-2026", 1).unwrap().is_none());
    h.run("kumo_denki", "matched_overlap", &[]).await.unwrap();
    h.stop().await;
}

/// The manifest's member table file and Kumo Denki's member-token file.
fn member_files(data: &Path) -> (String, String) {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("manifest.json")).unwrap()).unwrap();
    let name = |v: &serde_json::Value| v.as_str().unwrap().to_string();
    (
        name(&manifest["members"]),
        name(&manifest["member_tokens"]["ctr-kumo-2026"]),
    )
}

/// Issue 16, item 6: after a rotation without an overlap, a tokens-only ingest of the same
/// export computes Sakura's tokens under the new key and nothing else: the member table and
/// Kumo Denki's tokens are the same files, and Sakura's question over a new-version list is
/// answered. An export with a member missing is refused by name and changes nothing; with no
/// collaboration lacking tokens there is nothing to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokens_only_ingest_computes_the_missing_tokens_and_nothing_else() {
    let h = Harness::start_with(setup(|_| {})).await;
    let data = h.data_dir.path().to_path_buf();
    let h = rotate(h, days_later(1)).await;
    assert!(token_versions(&data).is_empty());
    assert_eq!(upload_raw(&h).await.unwrap(), 2);
    let (members_before, kumo_before) = member_files(&data);

    let mut members = cleanroom_client::read_members(&sample_dir().join("members.csv")).unwrap();
    let last = members.pop().unwrap();
    let manifest_before = std::fs::read(data.join("manifest.json")).unwrap();
    let refused = send_members(&h, members.clone(), true).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("lacks 1 of its members"),
        "{refused:?}"
    );
    assert!(!refused.message().contains(&last.member_id), "{refused:?}");
    assert_eq!(
        std::fs::read(data.join("manifest.json")).unwrap(),
        manifest_before
    );

    members.push(last);
    send_members(&h, members.clone(), true).await.unwrap();
    let (members_after, kumo_after) = member_files(&data);
    assert_eq!(
        members_after, members_before,
        "the member table is not rewritten"
    );
    assert_eq!(
        kumo_after, kumo_before,
        "the other collaboration's tokens stay"
    );
    assert_eq!(token_versions(&data), BTreeSet::from([2]));
    let answer = h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    assert!(answer.protection.as_ref().unwrap().fresh);

    let nothing = send_members(&h, members, true).await.unwrap_err();
    assert_eq!(nothing.code(), Code::FailedPrecondition, "{nothing:?}");
    assert!(
        nothing.message().contains("nothing to compute"),
        "{nothing:?}"
    );
    h.stop().await;
}

/// `key_overlap_days` out of its range is refused by name when the rules load.
#[test]
fn an_overlap_out_of_range_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    crate::util::copy_declarations(dir.path());
    let text = std::fs::read_to_string(sample_dir().join("rules.toml"))
        .unwrap()
        .replace(
            "key_version = 1\n",
            "key_version = 1\nkey_overlap_days = 91\n",
        );
    let path = dir.path().join("rules.toml");
    std::fs::write(&path, text).unwrap();
    let err = cleanroom_core::rules::Rules::load(&path).unwrap_err();
    assert!(
        err.to_string()
            .contains("contracts.ctr-kumo-2026.key_overlap_days must be between 0 and 90"),
        "{err}"
    );
}

/// Sakura's rules moved to key version 2 with a 7-day overlap, written beside the sample
/// partners' declarations in `dir`.
fn rotated_rules(dir: &Path) -> std::path::PathBuf {
    crate::util::copy_declarations(dir);
    let text = std::fs::read_to_string(sample_dir().join("rules.toml"))
        .unwrap()
        .replacen(
            "key_version = 1\n",
            "key_version = 2\nkey_overlap_days = 7\n",
            1,
        );
    let path = dir.join("rules.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `rules validate` with the data directory says what the rotation does and warns that the
/// members have no tokens under the new version yet; the other contract is not warned of.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_validate_warns_of_a_key_version_without_member_tokens() {
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proposed = rotated_rules(dir.path());
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_cleanroom"))
        .current_dir(crate::util::root())
        .args(["rules", "validate", "--rules"])
        .arg(&proposed)
        .arg("--data-dir")
        .arg(h.data_dir.path())
        .args(["--as-of", "2026-11-01T12:00:00+09:00"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{output:?}");
    assert!(
        out.contains("match key version 1 -> 2: version 1 stays usable for 7 days"),
        "{out}"
    );
    assert!(
        out.contains(
            "warning: ctr-sakura-2026: no member tokens under key version 2 yet (the members \
             were last ingested under v1)"
        ),
        "{out}"
    );
    assert!(!out.contains("warning: ctr-kumo-2026"), "{out}");
    h.stop().await;
}

/// `keys status` shows both versions during the overlap, the old one with the day it is due to
/// be destroyed, and never key material.
#[test]
fn keys_status_shows_both_versions_and_when_the_old_one_goes() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cleanroom.toml");
    let write_config = |rules: &Path| {
        let text = format!(
            "data_dir = {:?}\nrules = {:?}\nqueries = {:?}\n",
            dir.path().join("data").display().to_string(),
            rules.display().to_string(),
            crate::util::root().join("queries").display().to_string(),
        );
        std::fs::write(&config, text).unwrap();
    };
    let cleanroom = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_cleanroom"))
            .args(args)
            .arg("--config")
            .arg(&config)
            .env("CLEANROOM_MASTER_SECRET", "11".repeat(32))
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    write_config(&sample_dir().join("rules.toml"));
    let v1 = cleanroom(&["export-key", "--contract", SAKURA]);
    assert!(v1.starts_with("v1."), "{v1}");
    let listing = cleanroom(&["keys", "status"]);
    assert!(!listing.contains("due "), "no rotation yet: {listing}");

    let rules_dir = tempfile::tempdir().unwrap();
    write_config(&rotated_rules(rules_dir.path()));
    let before = Utc::now();
    let v2 = cleanroom(&["export-key", "--contract", SAKURA]);
    assert!(v2.starts_with("v2."), "{v2}");
    let listing = cleanroom(&["keys", "status"]);
    let line = |version: &str| {
        listing
            .lines()
            .find(|l| l.contains(SAKURA) && l.contains(&format!(" {version} ")))
            .unwrap_or_else(|| panic!("{listing}"))
            .to_string()
    };
    let old = line("1");
    let due = (before + chrono::Duration::days(7))
        .date_naive()
        .to_string();
    assert!(
        old.contains(&format!("due {due}")) && old.contains("rotation (key_overlap_days = 7)"),
        "{listing}"
    );
    assert!(!line("2").contains("due "), "{listing}");
    for key in [&v1, &v2] {
        let hex = key.trim().split_once('.').unwrap().1;
        assert!(!listing.contains(hex), "no key material: {listing}");
    }
}
