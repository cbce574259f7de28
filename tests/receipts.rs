//! Issue 16, items 4 and 5: records of receipt (APPI Art. 30) and disclosure to a member (Art.
//! 33(5)). No list is received from a partner without a current declaration; every accepted list
//! version writes a record naming the members it matched by a keyed digest of their pseudonyms;
//! the records outlive the list's destruction and are purged three years and a day later; a legal
//! reviewer discloses to a member what was received about them, and the trail never holds the
//! member's id.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cleanroom_client::sample;
use cleanroom_proto::v1::{
    DiscloseMemberRequest, ListReceiptsRequest, MemberDisclosure, ReceiptsPage,
};
use cleanroom_server::audit::{ChainKey, Event};
use tonic::Code;

use crate::truth::Truth;
use crate::util::{
    Harness, Setup, as_of, files_of, list_of, mark_beside, relaxed_lists, sample_rules,
    test_secret, try_app,
};

/// Noon, the retailer's local time, `days` after the sample's export date.
fn days_later(days: u64) -> chrono::DateTime<chrono::Utc> {
    as_of() + chrono::Duration::days(days as i64)
}

async fn receipts(h: &Harness) -> ReceiptsPage {
    h.legal()
        .list_receipts(ListReceiptsRequest::default())
        .await
        .unwrap()
        .into_inner()
}

async fn disclose(
    h: &Harness,
    token: &str,
    member: &str,
) -> Result<MemberDisclosure, tonic::Status> {
    h.conn
        .legal(token)
        .unwrap()
        .disclose_member(DiscloseMemberRequest {
            member_id: member.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The data directory's files, the audit trail and its checkpoint aside (a refusal is recorded).
fn data_files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    files_of(dir)
        .into_iter()
        .filter(|(p, _)| {
            let name = p.file_name().unwrap().to_string_lossy();
            !name.starts_with("audit.")
        })
        .collect()
}

/// Uploads a list of sample members as `partner` and returns the status, if refused.
async fn upload(h: &Harness, partner: &str) -> Option<tonic::Status> {
    let mut client = h.partner(partner);
    let attribute = if partner == "kumo_denki" {
        "KK-10"
    } else {
        "gold"
    };
    let records = list_of(&["M0000001", "M0000002", "M0000003"], attribute);
    match cleanroom_client::upload_list(&mut client, false, records).await {
        Ok(_) => None,
        Err(cleanroom_client::Error::Status(status)) => Some(status),
        Err(other) => panic!("not a status: {other}"),
    }
}

/// An upload without a current declaration is refused FAILED_PRECONDITION with the reason,
/// before any record is read: nothing staged, written or counted against the list allowance.
/// Missing, out of date (the day after `valid_until`, in the retailer's local date) and a changed
/// document are each refused; the partner whose declaration is current is received (the control).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_without_a_current_declaration_is_refused_with_nothing_staged() {
    let today = sample_rules().retailer.today(as_of());
    let mut rules = relaxed_lists(sample_rules());
    rules.partners.get_mut("sakura_foods").unwrap().declaration = None;
    let kumo = rules.partners.get_mut("kumo_denki").unwrap();
    kumo.declaration.as_mut().unwrap().valid_until = today;
    let h = Harness::start_with(Setup {
        rules,
        load_sample: false,
        ..Default::default()
    })
    .await;
    let before = data_files(h.data_dir.path());
    let status = upload(&h, "sakura_foods").await.expect("refused");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("no current declaration") && status.message().contains("missing"),
        "{}",
        status.message()
    );
    assert_eq!(
        data_files(h.data_dir.path()),
        before,
        "nothing staged or written"
    );
    assert!(receipts(&h).await.receipts.is_empty());

    // Valid through its last day: received, with its record.
    let received = upload(&h, "kumo_denki").await;
    assert!(received.is_none(), "current on its last day: {received:?}");
    let page = receipts(&h).await;
    assert_eq!(page.receipts.len(), 1);
    assert_eq!(page.receipts[0].partner, "kumo_denki");
    let h = h.restart_at(days_later(1)).await;
    let status = upload(&h, "kumo_denki").await.expect("out of date");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("out of date"),
        "{}",
        status.message()
    );
    h.stop().await;
}

/// A declaration whose document no longer has the SHA-256 the rules hold is refused too, and
/// `rules validate` says so for each partner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_declaration_document_refuses_the_upload() {
    let dir = tempfile::tempdir().unwrap();
    let rules_path = dir.path().join("rules.toml");
    std::fs::copy(crate::util::sample_dir().join("rules.toml"), &rules_path).unwrap();
    crate::util::copy_declarations(dir.path());
    let document = dir.path().join("declarations/sakura_foods.txt");
    let signed = std::fs::read(&document).unwrap();
    std::fs::write(&document, [signed.as_slice(), b"(edited)"].concat()).unwrap();
    let rules = cleanroom_core::rules::Rules::load(&rules_path).unwrap();
    let h = Harness::start_with(Setup {
        rules: relaxed_lists(rules),
        load_sample: false,
        ..Default::default()
    })
    .await;
    let status = upload(&h, "sakura_foods").await.expect("refused");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("document changed"),
        "{}",
        status.message()
    );
    let received = upload(&h, "kumo_denki").await;
    assert!(received.is_none(), "Kumo's is unchanged: {received:?}");
    h.stop().await;

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cleanroom"))
        .args(["rules", "validate", "--as-of", "2026-11-01T12:00:00+09:00"])
        .arg("--current")
        .arg(crate::util::sample_dir().join("rules.toml"))
        .arg("--rules")
        .arg(&rules_path)
        .arg("--queries")
        .arg(crate::util::root().join("queries"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("partner sakura_foods: declaration document changed")
            && text.contains("its uploads are refused")
            && text.contains("partner kumo_denki: declaration current until 2027-06-30"),
        "{text}"
    );
}

/// Each accepted list version writes one record of receipt with the items the Enforcement Rules
/// name, and the members it names are exactly the members the sample CSVs match (computed from the
/// raw files, apart from the service), by the receipts' keyed digest of their pseudonyms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_names_the_members_the_sample_lists_match() {
    let h = Harness::start().await;
    let truth = Truth::load();
    let pseudonyms = test_secret().pseudonym_key();
    let key = ChainKey::new(&test_secret());
    let records = cleanroom_server::receipts::read(h.data_dir.path(), &key).unwrap();
    assert_eq!(records.len(), 2, "one per sample list");
    for partner in ["sakura_foods", "kumo_denki"] {
        let record = records.iter().find(|r| r.entry.partner == partner).unwrap();
        let mut expected: Vec<i64> = truth
            .matched(partner)
            .keys()
            .map(|m| {
                cleanroom_server::receipts::member_digest(&test_secret(), pseudonyms.pseudonym(m))
            })
            .collect();
        expected.sort_unstable();
        assert!(!expected.is_empty());
        assert_eq!(record.entry.members, expected, "{partner}");
        // Named by their receipts digest, never by the engine's pseudonym (which an erasure
        // removes from every file, while these records stay).
        for m in truth.matched(partner).keys() {
            assert!(!record.entry.members.contains(&pseudonyms.pseudonym(m)));
        }
        let r = &record.entry;
        assert_eq!(r.basis, "consent");
        assert_eq!(r.received_on, h.rules.retailer.today(as_of()));
        assert!(
            r.provider
                .legal_name
                .contains(if partner == "sakura_foods" {
                    "Sakura"
                } else {
                    "Kumo"
                })
        );
        assert_eq!(
            r.declaration_sha256,
            h.rules.partners[partner]
                .declaration
                .as_ref()
                .unwrap()
                .sha256
        );
        assert_eq!(r.list_version, 1);
    }
    // The control: the two lists name different members.
    assert_ne!(records[0].entry.members, records[1].entry.members);
    let text = std::fs::read_to_string(h.data_dir.path().join("receipts.jsonl")).unwrap();
    for m in truth.matched("sakura_foods").keys() {
        assert!(!text.contains(m.as_str()), "no member id on disk");
    }
    let page = receipts(&h).await;
    assert_eq!(page.receipts.len(), 2);
    assert_eq!(page.declarations.len(), 2);
    assert!(page.declarations.iter().all(|d| d.status == "current"));
    let status = h
        .conn
        .legal(sample::partner_token("sakura_foods"))
        .unwrap()
        .list_receipts(ListReceiptsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    h.stop().await;
}

/// The records survive the collaboration's destruction (and a member on its list is disclosed
/// from them), are kept through the 1096th day after receipt, and are gone the day after, with an
/// audit record; what is left verifies, and an edited record does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_outlive_the_list_and_are_purged_three_years_and_a_day_later() {
    let h = Harness::start().await;
    let (contract, _) = h.rules.contract_of("sakura_foods").unwrap();
    let contract = contract.to_string();
    end(&h, &contract).await;
    let page = receipts(&h).await;
    assert_eq!(page.receipts.len(), 2, "the destruction keeps the records");
    assert!(page.receipts.iter().any(|r| r.contract == contract));

    let data = h.data_dir.path().to_path_buf();
    let key = ChainKey::new(&test_secret());
    let h = h.restart_at(days_later(1096)).await;
    assert_eq!(
        receipts(&h).await.receipts.len(),
        2,
        "kept through day 1096"
    );
    // The control: an edited record does not verify.
    let file = data.join("receipts.jsonl");
    let kept = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        kept.replacen("\"basis\":\"consent\"", "\"basis\":\"contract\"", 1),
    )
    .unwrap();
    let broken = cleanroom_server::receipts::verify(&data, &key).unwrap_err();
    assert!(
        broken.to_string().contains("broken at record 1"),
        "{broken}"
    );
    std::fs::write(&file, kept).unwrap();
    let unpurged: Vec<(PathBuf, Vec<u8>)> = ["receipts.jsonl", "receipts.checkpoint"]
        .into_iter()
        .map(|name| (data.join(name), std::fs::read(data.join(name)).unwrap()))
        .collect();
    let h = h.restart_at(days_later(1097)).await;
    let page = receipts(&h).await;
    assert!(page.receipts.is_empty(), "gone three years and a day later");
    assert_eq!(page.purged_through, 2);
    let purges = || {
        let trail = cleanroom_server::audit::read(&data.join("audit.jsonl")).unwrap();
        trail
            .iter()
            .filter_map(|r| match &r.entry.event {
                Some(Event::ReceiptsPurged { records, .. }) => Some(*records),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(purges(), [2], "one audit record of the purge");
    // A crash that cut the purge after its audit record (the record comes first): the records
    // are still there at the next start, which purges them without recording it a second time.
    let h = h
        .restart_at_after(days_later(1097), |_| {
            for (path, bytes) in &unpurged {
                std::fs::write(path, bytes).unwrap();
            }
            std::fs::remove_file(data.join("receipts.base")).unwrap();
        })
        .await;
    assert!(receipts(&h).await.receipts.is_empty(), "purged again");
    assert_eq!(purges(), [2], "still one audit record of the purge");
    assert_eq!(
        cleanroom_server::receipts::verify(&data, &key).unwrap(),
        (0, 2)
    );
    h.stop().await;
}

/// Asks an analyst to end `contract` and confirms it as the legal reviewer.
async fn end(h: &Harness, contract: &str) {
    h.analyst()
        .request_destruction(cleanroom_proto::v1::RequestDestructionRequest {
            contract_id: contract.into(),
            reason: "test".into(),
        })
        .await
        .unwrap();
    h.legal()
        .confirm_destruction(cleanroom_proto::v1::ConfirmDestructionRequest {
            contract_id: contract.into(),
        })
        .await
        .unwrap();
}

/// A member on Sakura Foods' list is disclosed after the list was destroyed: the record naming
/// them, their consent timeline, the period matched and consenting (ended by the destruction)
/// and the destruction, in Japanese and English. A member on no list gets an empty answer; a
/// partner's token and the analyst's are refused; the trail holds a keyed digest, never the id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_is_disclosed_after_the_list_is_destroyed() {
    let h = Harness::start().await;
    let truth = Truth::load();
    let (contract, sakura) = h.rules.contract_of("sakura_foods").unwrap();
    let (contract, purpose) = (contract.to_string(), sakura.purpose.clone());
    let eligible = truth.eligible(&h.rules, "sakura_foods", &[]);
    let mut on_list: Vec<&String> = eligible.keys().collect();
    on_list.sort();
    let member = on_list[0].clone();
    // A day later, so the member was on the list for a day before it was destroyed.
    let h = h.restart_at(days_later(1)).await;
    end(&h, &contract).await;

    let d = disclose(&h, sample::LEGAL_TOKEN, &member).await.unwrap();
    let sakura_receipts: Vec<_> = d
        .receipts
        .iter()
        .filter(|r| r.contract == contract)
        .collect();
    assert_eq!(sakura_receipts.len(), 1, "{:?}", d.receipts);
    let on_kumo = truth.matched("kumo_denki").contains_key(&member);
    assert_eq!(d.receipts.len(), 1 + usize::from(on_kumo));
    let expected_consent = truth
        .consent
        .iter()
        .filter(|c| c.member_id == member)
        .count();
    assert_eq!(d.consent.len(), expected_consent);
    assert_eq!(d.destructions.len(), 1);
    assert_eq!(d.destructions[0].contract, contract);
    let period = d
        .periods
        .iter()
        .find(|p| p.contract == contract)
        .expect("a period");
    assert_eq!(period.purpose, purpose);
    assert_eq!(
        period.until, d.destructions[0].destroyed_at,
        "ended by the destruction"
    );
    assert!(d.text_ja.contains("受領記録") && d.text_en.contains("Record of receipt"));
    assert!(!d.audit_id.is_empty());

    let (on_sakura, on_kumo_list) = (truth.matched("sakura_foods"), truth.matched("kumo_denki"));
    let nobody = truth
        .members
        .keys()
        .filter(|m| !on_sakura.contains_key(*m) && !on_kumo_list.contains_key(*m))
        .min()
        .unwrap()
        .clone();
    let empty = disclose(&h, sample::LEGAL_TOKEN, &nobody).await.unwrap();
    assert!(empty.receipts.is_empty() && empty.consent.is_empty() && empty.periods.is_empty());
    assert!(empty.destructions.is_empty());
    assert!(empty.text_en.contains("No record of receipt"));

    let partner = disclose(&h, sample::partner_token("sakura_foods"), &member)
        .await
        .unwrap_err();
    assert_eq!(partner.code(), Code::PermissionDenied, "{partner:?}");
    let analyst = disclose(&h, sample::ANALYST_TOKEN, &member)
        .await
        .unwrap_err();
    assert_eq!(analyst.code(), Code::PermissionDenied, "{analyst:?}");
    let blank = disclose(&h, sample::LEGAL_TOKEN, " ").await.unwrap_err();
    assert_eq!(blank.code(), Code::InvalidArgument);

    let trail = std::fs::read_to_string(h.data_dir.path().join("audit.jsonl")).unwrap();
    assert!(
        !trail.contains(&member) && !trail.contains(&nobody),
        "no member id in the trail"
    );
    let digests: Vec<(String, u64)> =
        cleanroom_server::audit::read(&h.data_dir.path().join("audit.jsonl"))
            .unwrap()
            .into_iter()
            .filter_map(|r| match r.entry.event {
                Some(Event::Disclosed {
                    member_digest,
                    receipts,
                }) => Some((member_digest, receipts)),
                _ => None,
            })
            .collect();
    assert_eq!(
        digests.len(),
        2,
        "the two answered disclosures: {digests:?}"
    );
    assert_eq!(digests[0].1, 1 + u64::from(on_kumo));
    assert_ne!(
        digests[0].0, digests[1].0,
        "each member has their own digest"
    );
    h.stop().await;
}

/// A crash between a list's commit and its record of receipt (the commit comes first) is
/// finished at the next start: the record is written then, naming the same members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_a_crash_cut_short_is_written_at_the_next_start() {
    let h = Harness::start_with(Setup {
        rules: relaxed_lists(sample_rules()),
        ..Default::default()
    })
    .await;
    let data = h.data_dir.path().to_path_buf();
    // A crash between the list's commit and its record also comes before the high-water mark
    // counts the record: the mark goes back with the records.
    let before_upload: Vec<(PathBuf, Vec<u8>)> = [
        data.join("receipts.jsonl"),
        data.join("receipts.checkpoint"),
        mark_beside(&data),
    ]
    .into_iter()
    .map(|path| {
        let bytes = std::fs::read(&path).unwrap();
        (path, bytes)
    })
    .collect();
    assert!(upload(&h, "sakura_foods").await.is_none());
    let key = ChainKey::new(&test_secret());
    let written = cleanroom_server::receipts::read(&data, &key).unwrap();
    assert_eq!(written.len(), 3);
    let h = h
        .restart_after(|_| {
            for (path, bytes) in &before_upload {
                std::fs::write(path, bytes).unwrap();
            }
            // And the crash cut the record's write itself: a torn last line.
            let mut torn = before_upload[0].1.clone();
            torn.extend_from_slice(b"{\"seq\":3,\"id\":\"r-");
            std::fs::write(&before_upload[0].0, torn).unwrap();
        })
        .await;
    let records = cleanroom_server::receipts::read(&data, &key).unwrap();
    assert_eq!(records.len(), 3, "the lost record is written again");
    let trail = cleanroom_server::audit::read(&data.join("audit.jsonl")).unwrap();
    assert!(
        trail.iter().any(|r| matches!(&r.entry.event,
            Some(Event::Recovered { file, .. }) if file == "receipts.jsonl")),
        "the cut is recorded"
    );
    let (lost, again) = (&written[2].entry, &records[2].entry);
    assert_eq!(
        (again.partner.as_str(), again.list_version),
        ("sakura_foods", 2)
    );
    assert_eq!(again.members, lost.members);
    assert_eq!(again.commit, lost.commit);
    let h = h.restart().await;
    assert_eq!(receipts(&h).await.receipts.len(), 3, "and only once");
    h.stop().await;
}

/// Records of receipt rolled back on their own (an older copy of the file and its checkpoint put
/// back, everything else as the service left it) are seen at the next start: the high-water mark
/// counts them. The start is refused, naming the records the directory lacks and changing nothing;
/// accepted, the restore names them in the trail, and the record of the list still current is
/// written again from the list. Control: the same restart without the rollback starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_receipt_rolled_back_are_refused_and_named_when_accepted() {
    let h = Harness::start_with(Setup {
        rules: relaxed_lists(sample_rules()),
        ..Default::default()
    })
    .await;
    let data = h.data_dir.path().to_path_buf();
    let older: Vec<(PathBuf, Vec<u8>)> = ["receipts.jsonl", "receipts.checkpoint"]
        .iter()
        .map(|name| (data.join(name), std::fs::read(data.join(name)).unwrap()))
        .collect();
    let kept = receipts(&h).await.receipts.len();
    assert!(upload(&h, "sakura_foods").await.is_none());
    let key = ChainKey::new(&test_secret());
    let written = cleanroom_server::receipts::read(&data, &key).unwrap();
    assert_eq!(written.len(), kept + 1);
    let mut h = h.restart().await;
    h.halt().await;

    for (path, bytes) in &older {
        std::fs::write(path, bytes).unwrap();
    }
    let rolled_back = files_of(&data);
    let message = try_app(&data).err().expect("refused").to_string();
    let lost = kept + 1;
    assert!(
        message.contains(&format!(
            "its records of receipt end at record {kept}, the mark's at {lost}"
        )) && message.contains(&format!("Records of receipt {lost} to {lost}")),
        "{message}"
    );
    assert_eq!(
        files_of(&data),
        rolled_back,
        "the refused start changed nothing"
    );

    let h = h.start_accepting_restore().await;
    let trail = cleanroom_server::audit::read(&data.join("audit.jsonl")).unwrap();
    let named = trail.iter().find_map(|r| match &r.entry.event {
        Some(Event::RestoreAccepted { lost_receipts, .. }) => Some(*lost_receipts),
        _ => None,
    });
    assert_eq!(named, Some(Some((lost as u64, lost as u64))));
    let again = cleanroom_server::receipts::read(&data, &key).unwrap();
    assert_eq!(
        again.len(),
        lost,
        "the current list's record is written again"
    );
    assert_eq!(again[kept].entry.members, written[kept].entry.members);
    h.stop().await;
}

/// The legal reviewer's exports: the review page's JSON and CSV (refused to a partner's token),
/// `cleanroom receipts --csv` from the data directory, `cleanroom disclose` through the service
/// in Japanese and English, and `verify-audit`, which checks the records' chain too and fails
/// once a record is edited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_the_cli_export_verify_and_disclose_the_records() {
    let h = Harness::start().await;
    let page = h.review_addr();
    let (status, headers, csv) =
        crate::metrics::get(page, "/api/receipts.csv", Some(sample::LEGAL_TOKEN)).await;
    assert_eq!(status, 200, "{csv}");
    assert!(headers["content-type"].starts_with("text/csv"));
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert_eq!(lines[0], cleanroom_server::disclosure::CSV_HEADER);
    assert!(lines[1..].iter().any(|l| l.contains("Sakura Foods K.K.")));
    let (status, _, json) =
        crate::metrics::get(page, "/api/receipts", Some(sample::LEGAL_TOKEN)).await;
    assert_eq!(status, 200);
    assert!(
        json.contains("\"status\":\"current\"") && json.contains("declarations/sakura_foods.txt")
    );
    let partner_token = sample::partner_token("sakura_foods");
    let (status, _, _) = crate::metrics::get(page, "/api/receipts.csv", Some(partner_token)).await;
    assert_eq!(status, 403, "a partner's token is refused");

    let data = h.data_dir.path().to_path_buf();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cleanroom.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nrules = {:?}\nqueries = {:?}\nkey_store = {:?}\n",
            data.display().to_string(),
            crate::util::sample_dir()
                .join("rules.toml")
                .display()
                .to_string(),
            crate::util::root().join("queries").display().to_string(),
            crate::util::keys_beside(&data).display().to_string(),
        ),
    )
    .unwrap();
    let secret_hex = hex::encode(b"cleanroom integration test secret, 32+ bytes");
    let cleanroom = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_cleanroom"))
            .args(args)
            .env("CLEANROOM_MASTER_SECRET", &secret_hex)
            .env("CLEANROOM_TOKEN", sample::LEGAL_TOKEN)
            .output()
            .unwrap()
    };
    let (config, out) = (
        config.display().to_string(),
        dir.path().join("receipts.csv"),
    );
    let exported = cleanroom(&[
        "receipts",
        "--config",
        &config,
        "--csv",
        &out.display().to_string(),
    ]);
    assert!(exported.status.success(), "{exported:?}");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        csv,
        "the same records as the page"
    );

    let member = {
        let matched = Truth::load().matched("sakura_foods");
        matched.keys().min().unwrap().clone()
    };
    let addr = format!("http://{}", h.addr());
    let told = cleanroom(&["disclose", "--addr", &addr, "--member-id", &member]);
    let text = String::from_utf8_lossy(&told.stdout);
    assert!(told.status.success(), "{told:?}");
    assert!(
        text.contains("[日本語]")
            && text.contains("受領記録")
            && text.contains("Record of receipt"),
        "{text}"
    );

    let data_arg = data.display().to_string();
    let verify = || cleanroom(&["verify-audit", "--data-dir", &data_arg, "--config", &config]);
    let verified = verify();
    assert!(verified.status.success(), "{verified:?}");
    assert!(
        String::from_utf8_lossy(&verified.stdout).contains("2 records of receipt, keyed chain")
    );
    let file = data.join("receipts.jsonl");
    let kept = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        kept.replacen("\"list_version\":1", "\"list_version\":7", 1),
    )
    .unwrap();
    let refused = verify();
    assert!(
        !refused.status.success(),
        "an edited record fails verify-audit"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("receipts.jsonl"),
        "{refused:?}"
    );
    std::fs::write(&file, kept).unwrap();
    h.stop().await;
}
