//! Issue 16, item 7: a member's erasure. An analyst erases members by member id
//! (AdminService.EraseMembers, `cleanroom erase`): their rows leave every table file, in one
//! commit; afterwards neither their member id nor their pseudonym is in any file of the data
//! directory (Parquet read back value by value, every other file byte by byte), while a
//! withdrawal tombstone keeps an old consent export from bringing them back. The audit record
//! holds counts only, stored answers over the old data are not served again, and no budget is
//! refilled.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use cleanroom_client::sample;
use cleanroom_core::token::MasterSecret;
use cleanroom_engine::arrow::array::{Array, Int64Array, StringArray};
use cleanroom_engine::ingest::consent::ERASED;
use cleanroom_engine::store::Snapshot;
use cleanroom_proto::v1::{
    ConsentRecord, DiscloseMemberRequest, EraseMembersRequest, ErasureSummary, IngestHeader,
    ListAuditRequest,
};
use cleanroom_server::audit::{ChainKey, ErasureCounts, Event};
use tonic::Code;

use crate::truth::Truth;
use crate::util::{Harness, as_of, data_file_batches, files_of, test_secret};

/// Where `ids` or their `pseudonyms` appear under `dir`: Parquet files read back through the
/// Parquet reader (every 64-bit integer and every string, as pages are compressed), and every file
/// as raw bytes (the id's text; the pseudonym in decimal and as 8 bytes in either byte order).
pub fn traces(dir: &Path, ids: &[String], pseudonyms: &[i64]) -> Vec<String> {
    let mut found = Vec::new();
    for (path, bytes) in files_of(dir) {
        let name = path.display().to_string();
        let mut needles: Vec<(String, Vec<u8>)> = Vec::new();
        for id in ids {
            needles.push((format!("member id {id}"), id.as_bytes().to_vec()));
        }
        for p in pseudonyms {
            needles.push((format!("pseudonym {p}"), p.to_string().into_bytes()));
            needles.push((format!("pseudonym {p} (BE)"), p.to_be_bytes().to_vec()));
            needles.push((format!("pseudonym {p} (LE)"), p.to_le_bytes().to_vec()));
        }
        for (what, needle) in needles {
            if bytes.windows(needle.len()).any(|w| w == needle.as_slice()) {
                found.push(format!("{name}: {what} in its bytes"));
            }
        }
        if name.ends_with(".parquet") {
            found.extend(parquet_traces(&path, ids, pseudonyms));
        }
    }
    found
}

/// The values of a Parquet file that are one of `ids` or `pseudonyms`.
fn parquet_traces(path: &Path, ids: &[String], pseudonyms: &[i64]) -> Vec<String> {
    let mut found = Vec::new();
    let (dir, name) = (path.parent().unwrap(), path.file_name().unwrap());
    for batch in data_file_batches(dir, &name.to_string_lossy()) {
        for (at, column) in batch.columns().iter().enumerate() {
            let field = batch.schema().field(at).name().clone();
            if let Some(values) = column.as_any().downcast_ref::<Int64Array>() {
                for v in values.iter().flatten() {
                    if pseudonyms.contains(&v) {
                        found.push(format!("{}: pseudonym {v} in {field}", path.display()));
                    }
                }
            }
            if let Some(values) = column.as_any().downcast_ref::<StringArray>() {
                for v in values.iter().flatten() {
                    if ids.iter().any(|id| id == v) {
                        found.push(format!("{}: member id {v} in {field}", path.display()));
                    }
                }
            }
        }
    }
    found
}

/// Two members to erase, chosen from the raw sample: the first on Sakura Foods' list and the
/// first on no list, each with purchases and consent events.
pub fn two_members(truth: &Truth) -> (String, String) {
    let sakura = truth.matched("sakura_foods");
    let kumo = truth.matched("kumo_denki");
    let active = |m: &String| {
        truth.purchases.iter().any(|p| &p.member_id == m)
            && truth.consent.iter().any(|c| &c.member_id == m)
    };
    let mut ids: Vec<&String> = truth.members.keys().collect();
    ids.sort();
    let on_list = ids
        .iter()
        .find(|m| sakura.contains_key(**m) && active(m))
        .unwrap();
    let on_none = ids
        .iter()
        .find(|m| !sakura.contains_key(**m) && !kumo.contains_key(**m) && active(m))
        .unwrap();
    ((*on_list).clone(), (*on_none).clone())
}

fn pseudonyms_of(secret: &MasterSecret, ids: &[String]) -> Vec<i64> {
    let key = secret.pseudonym_key();
    ids.iter().map(|id| key.pseudonym(id)).collect()
}

/// Rows of every file of each retailer table in `snapshot`.
fn table_rows(snapshot: &Snapshot) -> BTreeMap<&'static str, u64> {
    let sum = |files: &mut dyn Iterator<Item = &cleanroom_engine::store::TableFile>| -> u64 {
        files.map(|f| f.rows().unwrap()).sum()
    };
    BTreeMap::from([
        ("members", sum(&mut snapshot.members.iter())),
        ("member_tokens", sum(&mut snapshot.member_tokens.values())),
        ("purchases", sum(&mut snapshot.purchases.iter())),
        ("consent", sum(&mut snapshot.consent.iter())),
    ])
}

async fn erase(h: &Harness, ids: &[String]) -> Result<ErasureSummary, tonic::Status> {
    h.analyst()
        .erase_members(EraseMembersRequest {
            member_ids: ids.to_vec(),
            request_id: String::new(),
        })
        .await
        .map(|r| r.into_inner())
}

/// The trail verifies; its erasure records.
fn erasures(data: &Path) -> Vec<ErasureCounts> {
    let trail = data.join("audit.jsonl");
    cleanroom_server::audit::verify(&trail, &ChainKey::new(&test_secret()), None)
        .expect("the trail verifies");
    cleanroom_server::audit::read(&trail)
        .unwrap()
        .into_iter()
        .filter_map(|r| match r.entry.event {
            Some(Event::Erased(e)) if r.entry.outcome == "ok" => Some(*e),
            _ => None,
        })
        .collect()
}

/// Erases Sakura Foods' first matched member and a member on no list: before, the scan finds
/// both (the control); after, neither the ids nor the pseudonyms are in any file. Each table
/// loses exactly the rows the raw sample gives them, Sakura's matched audience loses one member,
/// the stored answer over the old data is not served again, the budget is not refilled, and the
/// one audit record holds counts only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_member_is_in_no_file_and_the_counts_fall_by_their_rows() {
    let h = Harness::start().await;
    let truth = Truth::load();
    let (on_list, on_none) = two_members(&truth);
    let ids = vec![on_list.clone(), on_none.clone()];
    let pseudonyms = pseudonyms_of(&test_secret(), &ids);
    let data = h.data_dir.path().to_path_buf();

    let found = traces(&data, &ids, &pseudonyms);
    assert!(
        found
            .iter()
            .any(|f| f.contains("members-") && f.contains("member_key")),
        "the control: the scan finds them before the erasure: {found:?}"
    );
    let before = h.app.store.snapshot();
    let rows_before = table_rows(&before);
    let audience = |s: &Snapshot| {
        cleanroom_engine::member::list_members(s, "ctr-sakura-2026", "sakura_foods")
            .unwrap()
            .unwrap()
            .1
    };
    let matched_before = audience(&before);
    assert_eq!(matched_before.len(), truth.matched("sakura_foods").len());
    assert!(matched_before.contains(&pseudonyms[0]));
    drop(before);
    let first = h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    let used = first.protection.as_ref().unwrap().answers_used;
    let repeat = h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    assert!(
        !repeat.protection.unwrap().fresh,
        "a repeat is served again"
    );

    let summary = erase(&h, &ids).await.expect("the analyst erases");

    let found = traces(&data, &ids, &pseudonyms);
    assert!(found.is_empty(), "after the erasure: {found:?}");
    let expected_purchases = truth
        .purchases
        .iter()
        .filter(|p| ids.contains(&p.member_id))
        .count() as u64;
    let expected_consent = truth
        .consent
        .iter()
        .filter(|c| ids.contains(&c.member_id))
        .count() as u64;
    assert!(expected_purchases > 0 && expected_consent > 0);
    let after = h.app.store.snapshot();
    let rows_after = table_rows(&after);
    let fell = |table: &str| rows_before[table] - rows_after[table];
    assert_eq!(
        (summary.members_asked, summary.members_found),
        (2, 2),
        "{summary:?}"
    );
    assert_eq!((fell("members"), summary.member_rows), (2, 2));
    assert_eq!(fell("purchases"), expected_purchases);
    assert_eq!(summary.purchase_rows, expected_purchases);
    assert_eq!(fell("consent"), expected_consent);
    assert_eq!(summary.consent_rows, expected_consent);
    assert!(summary.member_token_rows > 0);
    assert_eq!(fell("member_tokens"), summary.member_token_rows);
    let purposes = h.rules.purposes.len() as u64;
    assert!(summary.tombstones >= 2 * purposes, "{summary:?}");
    let matched_after = audience(&after);
    assert_eq!(matched_after.len(), matched_before.len() - 1);
    assert!(!matched_after.contains(&pseudonyms[0]));
    drop(after);

    let again = h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    let protection = again.protection.unwrap();
    assert!(
        protection.fresh,
        "the answer over the old data is not served"
    );
    assert_eq!(protection.answers_used, used + 1, "no budget was refilled");

    let records = erasures(&data);
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!((record.members_asked, record.members_found), (2, 2));
    assert_eq!(record.rows_removed["purchases"], expected_purchases);
    assert_eq!(record.requested_by, "Retailer analyst");
    // The record of receipt naming the matched member stays (kept three years by law), and
    // disclosure still finds it from the member id; their consent events are gone.
    let disclosed = h
        .legal()
        .disclose_member(DiscloseMemberRequest {
            member_id: on_list.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(disclosed.receipts.len(), 1, "the record of receipt stays");
    assert!(
        disclosed.consent.is_empty(),
        "their consent events are erased"
    );
    // The review page's trail shows it, counts only.
    let page = h
        .legal()
        .list_audit(ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    let shown = page
        .records
        .iter()
        .find(|r| r.method == "EraseMembers")
        .expect("the trail lists the erasure");
    assert_eq!(shown.details["members_found"], "2");
    assert_eq!(
        shown.details["purchases_rows_removed"],
        expected_purchases.to_string()
    );
    h.stop().await;
}

/// A consent export re-ingested after the erasure brings none of the erased member's events
/// from before it back (each is counted under its reason), while another member's event and the
/// erased member's own grant made after the erasure are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_consent_export_does_not_bring_an_erased_member_back() {
    let h = Harness::start().await;
    let truth = Truth::load();
    let (erased, kept) = two_members(&truth);
    erase(&h, std::slice::from_ref(&erased)).await.unwrap();
    let record = |c: &crate::truth::ConsentRow| ConsentRecord {
        member_id: c.member_id.clone(),
        purpose: c.purpose.clone(),
        notice_version: c.notice_version,
        action: c.action.clone(),
        at: c.at.clone(),
        source: "web".into(),
        expires_at: c.expires_at.clone(),
    };
    let old: Vec<ConsentRecord> = truth
        .consent
        .iter()
        .filter(|c| c.member_id == erased || c.member_id == kept)
        .map(record)
        .collect();
    let erased_events = truth
        .consent
        .iter()
        .filter(|c| c.member_id == erased)
        .count() as u64;
    let mut analyst = h.analyst();
    let summary = cleanroom_client::ingest_consent(&mut analyst, IngestHeader::default(), old)
        .await
        .unwrap();
    assert_eq!(summary.rejected_by_reason.get(ERASED), Some(&erased_events));
    assert_eq!(
        summary.records_accepted,
        summary.records_received - erased_events
    );
    let member = test_secret().pseudonym_key().pseudonym(&erased);
    let events = |h: &Harness| {
        cleanroom_engine::member::consent_events(&h.app.store.snapshot(), member).unwrap()
    };
    assert!(events(&h).is_empty(), "no old event of theirs is back");

    // The control: a grant the member gives after the erasure counts.
    let purpose = h.rules.purposes.keys().next().unwrap().clone();
    let later = ConsentRecord {
        member_id: erased.clone(),
        purpose,
        notice_version: 1,
        action: "granted".into(),
        at: (as_of() + chrono::Duration::hours(1)).to_rfc3339(),
        source: "app".into(),
        expires_at: String::new(),
    };
    let summary =
        cleanroom_client::ingest_consent(&mut analyst, IngestHeader::default(), vec![later])
            .await
            .unwrap();
    assert_eq!(summary.records_accepted, 1, "{summary:?}");
    assert_eq!(events(&h).len(), 1);
    h.stop().await;
}

/// Partners and legal reviewers are refused PERMISSION_DENIED; no id, a blank id, an over-long
/// id and too many ids get INVALID_ARGUMENT naming the problem (never the id); the data files
/// are untouched by every refusal. `cleanroom erase` refuses a bad file before calling, with a
/// non-zero exit, and prints the counts of a good one (an unknown id is counted, not an error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_change_nothing_and_the_command_checks_its_file() {
    let h = Harness::start().await;
    let data = h.data_dir.path().to_path_buf();
    let data_files = || {
        files_of(&data)
            .into_iter()
            .filter(|(p, _)| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                name.ends_with(".parquet") || name == "manifest.json"
            })
            .collect::<BTreeMap<_, _>>()
    };
    let before = data_files();
    let member = vec!["M0000001".to_string()];
    let request = || EraseMembersRequest {
        member_ids: member.clone(),
        ..Default::default()
    };
    let partner = h
        .conn
        .admin(sample::partner_token("sakura_foods"))
        .unwrap()
        .erase_members(request())
        .await
        .unwrap_err();
    assert_eq!(partner.code(), Code::PermissionDenied, "{partner:?}");
    let legal = h
        .conn
        .admin(sample::LEGAL_TOKEN)
        .unwrap()
        .erase_members(request())
        .await
        .unwrap_err();
    assert_eq!(legal.code(), Code::PermissionDenied, "{legal:?}");
    let too_many: Vec<String> = (0..=cleanroom_server::erasure::MAX_MEMBERS)
        .map(|i| format!("X{i}"))
        .collect();
    for (ids, reason) in [
        (vec![], "no member id"),
        (vec!["M0000001".into(), "  ".into()], "member_ids[1]: blank"),
        (vec!["Z".repeat(257)], "member_ids[0]: longer than 256"),
        (too_many, "at most 10000 member ids"),
    ] {
        let status = erase(&h, &ids).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{reason}");
        assert!(status.message().contains(reason), "{}", status.message());
        assert!(!status.message().contains("M0000001"));
    }
    assert_eq!(data_files(), before, "no refusal changed a data file");
    assert!(erasures(&data).is_empty());
    assert_eq!(
        cleanroom_client::MAX_ERASE_MEMBERS,
        cleanroom_server::erasure::MAX_MEMBERS
    );

    let dir = tempfile::tempdir().unwrap();
    let run = |content: &str| {
        let file = dir.path().join("members.txt");
        std::fs::write(&file, content).unwrap();
        Command::new(env!("CARGO_BIN_EXE_cleanroom"))
            .args([
                "erase",
                "--addr",
                &format!("http://{}", h.addr()),
                "--members",
            ])
            .arg(&file)
            .env("CLEANROOM_TOKEN", sample::ANALYST_TOKEN)
            .output()
            .unwrap()
    };
    for (content, reason) in [
        ("", "no member id: the file is empty"),
        ("M0000001\n\nM0000002\n", "line 2: blank member id"),
    ] {
        let out = run(content);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(reason), "{stderr}");
        assert!(!stderr.contains("M0000001"), "{stderr}");
    }
    assert_eq!(data_files(), before, "a refused file erased no one");
    let out = run("NOT-A-MEMBER\n");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("erased 0 of 1 members asked"), "{stdout}");
    assert!(stdout.contains("purchases 0, consent 0"), "{stdout}");
    assert_eq!(erasures(&data).len(), 1);
    h.stop().await;
}

/// A restore from a backup taken before an erasure would bring the erased members back. The
/// high-water mark remembers each erasure by its tombstone's digest: a start on the restored
/// directory is refused naming the erasure, and a restore accepted with `--accept-restore`
/// erases the members again, and puts their tombstones back, before any call is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_a_restore_lost_is_done_again_when_the_restore_is_accepted() {
    let mut h = Harness::start().await;
    let truth = Truth::load();
    let (on_list, on_none) = two_members(&truth);
    let ids = vec![on_list, on_none];
    let pseudonyms = pseudonyms_of(&test_secret(), &ids);
    let data = h.data_dir.path().to_path_buf();
    h.halt().await;
    let backup = files_of(&data);
    let mut h = h.restart_after(|_| {}).await;
    erase(&h, &ids).await.expect("the analyst erases");
    assert!(traces(&data, &ids, &pseudonyms).is_empty());
    h.halt().await;

    std::fs::remove_dir_all(&data).unwrap();
    for (path, bytes) in &backup {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    assert!(
        !traces(&data, &ids, &pseudonyms).is_empty(),
        "the control: the backup holds the members"
    );
    let refused = crate::util::try_app(&data)
        .err()
        .expect("a directory that lost an erasure is refused");
    let message = refused.to_string();
    assert!(
        message.contains("it lacks the erasure of 2 members the mark records")
            && message.contains("the 2 members whose erasure it lacks are erased again"),
        "{message}"
    );
    assert!(
        ids.iter().all(|id| !message.contains(id.as_str())),
        "{message}"
    );

    let h = h.start_accepting_restore().await;
    let found = traces(&data, &ids, &pseudonyms);
    assert!(found.is_empty(), "after the accepted restore: {found:?}");
    let again = erasures(&data);
    let last = again.last().expect("the erasure done again is recorded");
    assert_eq!((last.members_asked, last.members_found), (2, 2), "{last:?}");
    assert!(last.requested_by.contains("accepted restore"), "{last:?}");
    let tombstones = h.app.store.erased();
    let digests = test_secret().member_digest_key("erasure");
    assert!(
        pseudonyms
            .iter()
            .all(|p| tombstones.contains_key(&digests.digest(*p))),
        "the tombstones are back"
    );
    h.stop().await;
}

/// A client that retries: an erasure sent again under its request id (its answer lost, say) is
/// answered with the original counts, marked already committed, and erases nothing again (no
/// new commit, no second erasure record, the tombstones as they were). A malformed request id is
/// refused before anything is read. The control: without a request id the same erasure runs
/// again, as a new commit that finds nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_retried_under_its_request_id_is_answered_and_not_done_twice() {
    let h = Harness::start().await;
    let truth = Truth::load();
    let (on_list, on_none) = two_members(&truth);
    let ids = vec![on_list, on_none];
    let request = EraseMembersRequest {
        member_ids: ids.clone(),
        request_id: "erase-2026-12-05".into(),
    };
    let malformed = EraseMembersRequest {
        request_id: "not an id".into(),
        ..request.clone()
    };
    let refused = h.analyst().erase_members(malformed).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(erasures(h.data_dir.path()).is_empty());

    let first = h
        .analyst()
        .erase_members(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.members_found, 2, "{first:?}");
    let (commits, tombstones) = (h.app.store.commits(), h.app.store.erased());
    let again = h
        .analyst()
        .erase_members(request)
        .await
        .unwrap()
        .into_inner();
    assert!(again.already_committed && !first.already_committed);
    let counts = |s: &ErasureSummary| {
        (
            s.members_asked,
            s.members_found,
            s.member_rows,
            s.member_token_rows,
            s.purchase_rows,
            s.consent_rows,
            s.tombstones,
            s.files_replaced,
            s.commit,
        )
    };
    assert_eq!(counts(&again), counts(&first));
    assert_eq!(h.app.store.commits(), commits, "nothing committed again");
    assert_eq!(
        h.app.store.erased(),
        tombstones,
        "the tombstones as they were"
    );
    assert_eq!(erasures(h.data_dir.path()).len(), 1);

    let unnamed = erase(&h, &ids).await.unwrap();
    assert!(!unnamed.already_committed);
    assert_eq!(unnamed.members_found, 0);
    assert_eq!(h.app.store.commits(), commits + 1);
    assert_eq!(erasures(h.data_dir.path()).len(), 2);
    h.stop().await;
}
