//! Issue 16, items 2 and 3: the retention rules at work while collaborations run. A new upload
//! destroys the list version the contract no longer keeps (once no answer reads it), a list older
//! than its contract keeps one is destroyed and the partner refused with the date until it
//! uploads again, purchases older than the retailer keeps them leave the purchases files, and a
//! reload that removes a contract ends its collaboration. Each destruction is one `Sweep` audit
//! record naming every file by SHA-256 and rows; the trail verifies and no budget is refilled.

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Days, Utc};
use cleanroom_server::audit::{Event, Retirement};
use sha2::{Digest, Sha256};
use tonic::Code;

use crate::util::{Harness, Setup, as_of, date, root, sample_dir, sample_rules, test_secret};

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

fn sakura_lists(data: &Path) -> Vec<String> {
    files_named(data, "list-sakura_foods")
}

/// How many answers of `partner` the guard stores.
fn stored_answers(data: &Path, partner: &str) -> usize {
    use base64::Engine as _;
    let name = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(partner);
    std::fs::read_dir(data.join("guard/answers").join(name)).map_or(0, |d| d.count())
}

fn sha256_of(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// The trail verifies; its retention records, in order.
fn retirements(data: &Path) -> Vec<Retirement> {
    let trail = data.join("audit.jsonl");
    let key = cleanroom_server::audit::ChainKey::new(&test_secret());
    cleanroom_server::audit::verify(&trail, &key, None).expect("the trail verifies");
    cleanroom_server::audit::read(&trail)
        .unwrap()
        .into_iter()
        .filter_map(|r| match r.entry.event {
            Some(Event::Retired(retired)) => {
                assert_eq!(r.entry.method, "Sweep");
                assert_eq!(r.entry.principal, "retention rules");
                Some(*retired)
            }
            _ => None,
        })
        .collect()
}

/// Sakura Foods uploads its sample list again: a new version.
async fn upload_again(h: &Harness) -> u32 {
    let records =
        cleanroom_client::read_list(&sample_dir().join("partner_lists/sakura_foods.csv")).unwrap();
    let mut partner = h.partner("sakura_foods");
    cleanroom_client::upload_list(&mut partner, false, records)
        .await
        .expect("the upload is accepted")
        .list_version
}

fn with_retention(edit: impl FnOnce(&mut cleanroom_core::rules::Contract)) -> Setup {
    let mut rules = sample_rules();
    edit(rules.contracts.get_mut("ctr-sakura-2026").unwrap());
    Setup {
        rules,
        ..Setup::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_upload_destroys_the_first_when_one_version_is_kept() {
    let h = Harness::start().await;
    let data = h.data_dir.path().to_path_buf();
    let first = h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    assert_eq!(first.list_version, 1);
    assert_eq!(stored_answers(&data, "sakura_foods"), 1);
    let v1 = sakura_lists(&data);
    assert_eq!(v1.len(), 1, "{v1:?}");
    let v1_sha = sha256_of(&data.join(&v1[0]));
    let tokens = files_named(&data, "member_tokens-ctr-sakura");
    assert_eq!(tokens.len(), 1);
    let charges = h.app.guard.charges();

    assert_eq!(upload_again(&h).await, 2);
    let v2 = sakura_lists(&data);
    assert_eq!(v2.len(), 1, "only the new version is kept: {v2:?}");
    assert_ne!(v2, v1);
    assert_eq!(
        stored_answers(&data, "sakura_foods"),
        0,
        "the answer over version 1 went with it"
    );
    assert_eq!(
        files_named(&data, "member_tokens-ctr-sakura"),
        tokens,
        "member tokens are kept"
    );
    assert!(
        h.app
            .keys
            .tombstone("ctr-sakura-2026", 1)
            .unwrap()
            .is_none()
    );
    let retired = retirements(&data);
    assert_eq!(retired.len(), 1, "{retired:?}");
    let r = &retired[0];
    assert_eq!(
        (r.what.as_str(), r.reason.as_str(), r.rule.as_str()),
        ("list versions", "retention", "keep_versions = 1")
    );
    assert_eq!(r.contract.as_deref(), Some("ctr-sakura-2026"));
    assert_eq!(r.through_version, Some(1));
    assert_eq!(r.stored_answers, 1);
    assert!(r.key_id.is_some(), "names the collaboration's key");
    assert_eq!(r.files.len(), 1);
    assert_eq!((&r.files[0].name, &r.files[0].sha256), (&v1[0], &v1_sha));
    assert!(r.files[0].rows > 0);
    assert_eq!(
        h.app.guard.charges(),
        charges,
        "nothing refilled, nothing charged"
    );

    let again = h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    assert_eq!(again.list_version, 2, "answers read the new version");
    // Kumo's list is another partner's: untouched.
    assert_eq!(files_named(&data, "list-kumo_denki").len(), 1);
    h.stop().await;
}

/// Versions beyond `keep_versions` go, the kept ones stay (the control: with 2 kept, the second
/// upload destroys nothing); a version an answer is being computed over waits (here longer than
/// an upload waits for it), and the next sweep (here the start's) destroys it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_versions_stay_and_a_version_being_read_waits_for_the_next_sweep() {
    let h = Harness::start_with(with_retention(|c| c.retention.keep_versions = 2)).await;
    let data = h.data_dir.path().to_path_buf();
    let v1 = sakura_lists(&data);
    // An answer being computed over version 1 holds the snapshot that names it.
    let reading = h.app.store.snapshot();
    assert_eq!(reading.lists["sakura_foods"].version, 1);
    assert_eq!(upload_again(&h).await, 2);
    assert_eq!(sakura_lists(&data).len(), 2, "two versions kept");
    assert!(retirements(&data).is_empty(), "nothing destroyed");

    assert_eq!(upload_again(&h).await, 3);
    let held = sakura_lists(&data);
    assert_eq!(held.len(), 3, "version 1 is being read: kept for now");
    assert!(retirements(&data).is_empty());
    drop(reading);

    let h = h.restart().await;
    let kept = sakura_lists(&data);
    assert_eq!(
        kept,
        held[1..].to_vec(),
        "version 1 destroyed, 2 and 3 kept"
    );
    assert!(!kept.contains(&v1[0]));
    let retired = retirements(&data);
    assert_eq!(retired.len(), 1);
    assert_eq!(retired[0].through_version, Some(1));
    assert_eq!(retired[0].rule, "keep_versions = 2");
    let answer = h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    assert_eq!(answer.list_version, 3);

    let h = h.restart().await;
    assert_eq!(
        retirements(&data).len(),
        1,
        "a sweep with nothing due writes nothing"
    );
    h.stop().await;
}

/// Noon in the retailer's time zone (+09:00), `days` after the sample's export day.
fn days_later(days: u64) -> DateTime<Utc> {
    as_of() + Days::new(days)
}

/// Issue 16, item 2: a list is kept `max_list_days` after its upload. The sample's list is
/// uploaded on 2026-11-01: kept through 2026-11-30, destroyed by the sweep on 2026-12-01. The
/// partner is then refused with the date, uncharged, until it uploads a new list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_older_than_its_maximum_days_is_destroyed_and_refused_until_a_new_upload() {
    let h = Harness::start_with(with_retention(|c| c.retention.max_list_days = Some(30))).await;
    let data = h.data_dir.path().to_path_buf();
    h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    let list = sakura_lists(&data);
    let tokens = files_named(&data, "member_tokens-ctr-sakura");

    let h = h.restart_at(days_later(29)).await;
    assert_eq!(sakura_lists(&data), list, "kept on its 30th day");
    h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    let charges = h.app.guard.charges();

    let h = h.restart_at(days_later(30)).await;
    assert!(sakura_lists(&data).is_empty(), "{:?}", sakura_lists(&data));
    assert_eq!(stored_answers(&data, "sakura_foods"), 0);
    assert_eq!(files_named(&data, "member_tokens-ctr-sakura"), tokens);
    assert!(
        h.app
            .keys
            .tombstone("ctr-sakura-2026", 1)
            .unwrap()
            .is_none()
    );
    let retired = retirements(&data);
    assert_eq!(retired.len(), 1);
    assert_eq!(retired[0].rule, "max_list_days = 30");
    assert_eq!(retired[0].files[0].name, list[0]);
    for _ in 0..2 {
        let refused = h
            .run("sakura_foods", "matched_overlap", &[])
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert!(
            refused.message().contains("destroyed on 2026-12-01"),
            "{refused:?}"
        );
    }
    assert_eq!(
        h.app.guard.charges(),
        charges,
        "the refusals are not charged"
    );
    // Kumo's contract keeps its lists as long as it likes.
    h.run("kumo_denki", "matched_overlap", &[]).await.unwrap();

    assert_eq!(upload_again(&h).await, 2);
    let answer = h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    assert_eq!(answer.list_version, 2, "answered again over the new list");
    h.stop().await;
}

/// Every purchase in `data`'s purchases files, as instants (microseconds, UTC).
fn purchase_instants(h: &Harness) -> Vec<i64> {
    use cleanroom_engine::arrow::array::{Array, TimestampMicrosecondArray};
    let mut at = Vec::new();
    for file in &h.app.store.snapshot().purchases {
        for batch in file.batches().unwrap() {
            let batch = batch.unwrap();
            let column = batch.column_by_name("purchased_at").unwrap();
            let column = column
                .as_any()
                .downcast_ref::<TimestampMicrosecondArray>()
                .unwrap();
            at.extend((0..column.len()).map(|i| column.value(i)));
        }
    }
    at
}

/// Issue 16, item 2: purchases older than `[retention] purchases_days` are removed from the
/// purchases files by the start's sweep, with one record of counts and file hashes; an answer
/// over the old months then finds no buyers, while the kept months answer as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purchases_older_than_the_global_limit_are_removed_by_the_sweep() {
    let window = [("start", date("2025-11-01")), ("end", date("2026-04-01"))];
    let query = "category_buyers_by_age_band";
    let mut h = Harness::start().await;
    let data = h.data_dir.path().to_path_buf();
    let before = h.run("sakura_foods", query, &window).await.unwrap();
    assert!(!before.rows.is_empty(), "the old months have buyers before");
    let all = purchase_instants(&h);
    // 180 days before 2026-11-01: purchases before 2026-05-05 (local) go.
    let kept_from = chrono::DateTime::parse_from_rfc3339("2026-05-05T00:00:00+09:00")
        .unwrap()
        .timestamp_micros();
    let old = all.iter().filter(|t| **t < kept_from).count();
    assert!(old > 0 && old < all.len(), "the sample spans the cut");

    h.rules.retention.purchases_days = Some(180);
    let h = h.restart().await;
    let left = purchase_instants(&h);
    assert_eq!(
        left.len(),
        all.len() - old,
        "exactly the old purchases went"
    );
    assert!(left.iter().all(|t| *t >= kept_from));
    let retired = retirements(&data);
    assert_eq!(retired.len(), 1, "{retired:?}");
    let r = &retired[0];
    assert_eq!(r.what, "purchases");
    assert_eq!(r.rule, "purchases_days = 180 (kept from 2026-05-05)");
    assert_eq!(r.removed_rows, u64::try_from(old).unwrap());
    let removed: u64 = r.files.iter().map(|f| f.rows).sum();
    let written: u64 = r.written.iter().map(|f| f.rows).sum();
    assert_eq!(removed - written, r.removed_rows, "rows add up");
    for file in &r.files {
        assert!(!data.join(&file.name).exists(), "{} is gone", file.name);
    }
    for file in &r.written {
        assert_eq!(sha256_of(&data.join(&file.name)), file.sha256);
    }

    let after = h.run("sakura_foods", query, &window).await.unwrap();
    assert!(after.rows.is_empty(), "no buyers left in the old months");
    let recent = [("start", date("2026-06-01")), ("end", date("2026-11-01"))];
    let kept = h.run("sakura_foods", query, &recent).await.unwrap();
    assert!(!kept.rows.is_empty(), "the kept months still answer");

    let h = h.restart().await;
    assert_eq!(
        retirements(&data).len(),
        1,
        "nothing more is due: nothing written"
    );
    h.stop().await;
}

/// A copy of the sample rules and queries the service follows, as in the live-rules tests.
struct Sources {
    dir: tempfile::TempDir,
}

impl Sources {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let queries = dir.path().join("queries");
        std::fs::create_dir(&queries).unwrap();
        for entry in std::fs::read_dir(root().join("queries")).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, queries.join(path.file_name().unwrap())).unwrap();
        }
        std::fs::copy(
            sample_dir().join("rules.toml"),
            dir.path().join("rules.toml"),
        )
        .unwrap();
        Self { dir }
    }

    fn setup(&self) -> Setup {
        Setup {
            queries: self.dir.path().join("queries"),
            sources: Some(cleanroom_server::Sources {
                rules: self.dir.path().join("rules.toml"),
                queries: self.dir.path().join("queries"),
                poll: Duration::from_millis(100),
            }),
            ..Setup::default()
        }
    }

    /// Removes Kumo Denki's contract (its tables) from the rules file.
    fn remove_kumo_contract(&self) {
        let path = self.dir.path().join("rules.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let mut kept = Vec::new();
        let mut skipping = false;
        for line in text.lines() {
            if line.starts_with('[') {
                skipping = line.starts_with("[contracts.ctr-kumo-2026");
            }
            if !skipping {
                kept.push(line);
            }
        }
        assert!(kept.len() < text.lines().count());
        std::fs::write(&path, kept.join("\n")).unwrap();
    }
}

/// Issue 16, item 2: a reload that removes a contract ends its collaboration at once (files,
/// stored answers, key; one `Sweep` record, reason `removed from the rules`); the other runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_removes_a_contract_ends_its_collaboration() {
    let sources = Sources::new();
    let h = Harness::start_with(sources.setup()).await;
    let data = h.data_dir.path().to_path_buf();
    h.run("kumo_denki", "matched_overlap", &[]).await.unwrap();
    assert_eq!(files_named(&data, "list-kumo_denki").len(), 1);
    assert_eq!(files_named(&data, "member_tokens-ctr-kumo").len(), 1);
    let charges = h.app.guard.charges();

    sources.remove_kumo_contract();
    // The end is finished when its audit record is written: the key's tombstone comes just
    // before it, so waiting for the tombstone alone raced the record on a loaded machine.
    let destroyed_records = || {
        let records = cleanroom_server::audit::read(&data.join("audit.jsonl")).unwrap();
        records
            .into_iter()
            .filter_map(|r| match r.entry.event {
                Some(Event::Destroyed(d)) => Some(d),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let mut ended = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !destroyed_records().is_empty() {
            ended = true;
            break;
        }
    }
    assert!(ended, "the reload ended Kumo's collaboration");
    let tombstone = h.app.keys.tombstone("ctr-kumo-2026", 1).unwrap().unwrap();
    assert_eq!(tombstone.reason, "removed from the rules");
    assert!(files_named(&data, "list-kumo_denki").is_empty());
    assert!(files_named(&data, "member_tokens-ctr-kumo").is_empty());
    assert_eq!(stored_answers(&data, "kumo_denki"), 0);
    assert_eq!(h.app.guard.charges(), charges);
    let destroyed = destroyed_records();
    assert_eq!(destroyed.len(), 1);
    assert_eq!(destroyed[0].contract, "ctr-kumo-2026");
    assert_eq!(destroyed[0].reason, "removed from the rules");
    assert!(retirements(&data).is_empty());
    // Sakura's collaboration runs on.
    assert!(
        h.app
            .keys
            .tombstone("ctr-sakura-2026", 1)
            .unwrap()
            .is_none()
    );
    h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    assert_eq!(sakura_lists(&data).len(), 1);
    h.stop().await;
}

fn validate(rules: &Path) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_cleanroom"))
        .current_dir(root())
        .args(["rules", "validate", "--rules"])
        .arg(rules)
        .args(["--as-of", "2026-11-01T12:00:00+09:00"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// `rules validate` prints every date the retention rules set, and names a value out of range.
#[test]
fn rules_validate_prints_each_destruction_date_and_refuses_values_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    let sample = std::fs::read_to_string(sample_dir().join("rules.toml")).unwrap();
    let edited = sample.replacen(
        "grace_days = 14",
        "grace_days = 14\nkeep_versions = 2\nmax_list_days = 30",
        1,
    );
    assert_ne!(edited, sample);
    std::fs::write(
        &rules,
        format!("{edited}\n[retention]\npurchases_days = 730\n"),
    )
    .unwrap();
    let (ok, out) = validate(&rules);
    assert!(ok, "{out}");
    for line in [
        "contract ctr-sakura-2026: in force until 2027-03-31, destroyed on 2027-04-15 (14 days of grace)",
        "contract ctr-sakura-2026: 2 list version(s) kept, an older one destroyed once a newer upload leaves it behind; a list is kept 30 days (one uploaded today is destroyed on 2026-12-01)",
        "contract ctr-kumo-2026: 1 list version(s) kept",
        "purchases: kept 730 days; today's sweep removes those before 2024-11-01",
    ] {
        assert!(out.contains(line), "{line}\n{out}");
    }
    assert!(
        out.contains("list versions kept 1 -> 2, longest a list is kept None -> Some(30) days"),
        "{out}"
    );

    std::fs::write(
        &rules,
        edited.replacen("keep_versions = 2", "keep_versions = 0", 1),
    )
    .unwrap();
    let (ok, out) = validate(&rules);
    assert!(!ok, "{out}");
    assert!(
        out.contains("contracts.ctr-sakura-2026.retention.keep_versions must be between 1 and 12"),
        "{out}"
    );
}
