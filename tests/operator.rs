//! Operator faults played against the service as an operator meets them (THREATS 17, issue 14):
//! a lost or older manifest, a start refused for any reason, audit ids. Every refused start
//! leaves the data directory byte for byte as it was, and names the file and what disagrees.

use cleanroom_client::upload_list;
use cleanroom_proto::v1::IngestHeader;

use crate::util::{Harness, files_of, try_app, year};

/// A manifest removed, or an older one restored alone: the start is refused, naming the
/// manifest, and every data file is still there; with the right manifest back, the service
/// starts with every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_or_older_manifest_stops_the_start_and_deletes_nothing() {
    let h = Harness::start().await;
    let manifest = h.data_dir.path().join("manifest.json");
    let older = std::fs::read(&manifest).unwrap();
    // Acknowledged writes after that manifest: a purchase ingest and a list upload.
    let mut admin = h.analyst();
    let purchases =
        cleanroom_client::read_purchases(&crate::util::sample_dir().join("purchases.csv"))
            .unwrap()
            .into_iter()
            .take(100)
            .collect();
    cleanroom_client::ingest_purchases(&mut admin, IngestHeader::default(), purchases)
        .await
        .unwrap();
    let list = cleanroom_client::read_list(
        &crate::util::sample_dir().join("partner_lists/sakura_foods.csv"),
    )
    .unwrap();
    upload_list(&mut h.partner("sakura_foods"), false, list)
        .await
        .unwrap();
    let answer = h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    let dir = h.shut_down().await;
    let newer = std::fs::read(&manifest).unwrap();

    for (what, damage) in [("missing", None), ("older", Some(&older))] {
        match damage {
            None => std::fs::remove_file(&manifest).unwrap(),
            Some(bytes) => std::fs::write(&manifest, bytes).unwrap(),
        }
        let found = files_of(dir.path());
        let refused = try_app(dir.path())
            .err()
            .unwrap_or_else(|| panic!("a {what} manifest is refused"));
        let message = refused.to_string();
        assert!(message.contains("manifest.json"), "{what}: {message}");
        assert!(message.contains("Nothing was changed"), "{what}: {message}");
        assert_eq!(
            files_of(dir.path()),
            found,
            "{what}: the directory is untouched"
        );
        println!("{what}: {message}");
    }

    std::fs::write(&manifest, &newer).unwrap();
    drop(try_app(dir.path()).expect("the right manifest starts"));
    let h = Harness::restart_on(dir).await;
    let again = h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    assert_eq!(
        again.arrow_ipc, answer.arrow_ipc,
        "the same data, the stored answer"
    );
    assert_eq!(again.list_version, answer.list_version);
    assert!(!again.protection.unwrap().fresh);
    h.stop().await;
}

/// Every reason a start is refused leaves every file of the data directory byte-identical: a
/// cut trail, a trail without its checkpoint, a ledger behind the trail, a broken manifest, a
/// data file the manifest names gone, a directory behind its high-water mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_start_changes_nothing() {
    let h = Harness::start().await;
    h.run("sakura_foods", "repeat_purchase_rate", &year())
        .await
        .unwrap();
    let dir = h.shut_down().await;
    let path = dir.path();
    let whole = files_of(path);
    let restore = || {
        for (file, bytes) in &whole {
            std::fs::write(file, bytes).unwrap();
        }
    };
    let trail = path.join("audit.jsonl");
    let text = std::fs::read_to_string(&trail).unwrap();
    let last_line_cut = text.lines().count() - 1;
    let torn_and_cut: String = text
        .lines()
        .take(last_line_cut)
        .map(|l| format!("{l}\n"))
        .chain(["{\"seq\":".to_string()])
        .collect();
    let data_file = whole
        .keys()
        .find(|f| f.extension().is_some_and(|x| x == "parquet"))
        .unwrap()
        .clone();
    type Damage<'a> = Box<dyn Fn() + 'a>;
    let damages: Vec<(&str, Damage)> = vec![
        (
            "a cut trail with a torn tail",
            Box::new(|| std::fs::write(&trail, &torn_and_cut).unwrap()),
        ),
        (
            "a trail without its checkpoint",
            Box::new(|| std::fs::remove_file(path.join("audit.checkpoint")).unwrap()),
        ),
        (
            "a ledger behind the trail, with a torn tail",
            Box::new(|| std::fs::write(path.join("guard/ledger.jsonl"), "{\"partner\"").unwrap()),
        ),
        (
            "a manifest that is not one",
            Box::new(|| std::fs::write(path.join("manifest.json"), "{").unwrap()),
        ),
        (
            "a data file gone",
            Box::new(|| std::fs::remove_file(&data_file).unwrap()),
        ),
        (
            "an edited high-water mark",
            Box::new(|| {
                let mark = crate::util::mark_beside(path);
                let text = std::fs::read_to_string(&mark).unwrap();
                std::fs::write(&mark, text.replacen("\"commits\": ", "\"commits\": 1", 1)).unwrap();
            }),
        ),
    ];
    let mark = crate::util::mark_beside(path);
    let whole_mark = std::fs::read(&mark).unwrap();
    for (what, damage) in damages {
        damage();
        let found = files_of(path);
        let refused = try_app(path)
            .err()
            .unwrap_or_else(|| panic!("{what}: the start is refused"));
        println!("{what}: {refused}");
        assert_eq!(files_of(path), found, "{what}: a file changed");
        restore();
        std::fs::write(&mark, &whole_mark).unwrap();
    }
    drop(try_app(path).expect("whole again, it starts"));
}

/// Audit ids name a record to the retailer and say nothing to a partner about how many calls
/// others made between two of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_ids_reveal_no_count_of_other_calls() {
    let h = Harness::start().await;
    let first = h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    h.run("kumo_denki", "matched_overlap", &[]).await.unwrap();
    let second = h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    for id in [&first.audit_id, &second.audit_id] {
        assert!(
            id.len() == 18
                && id.starts_with("a-")
                && id[2..].chars().all(|c| c.is_ascii_hexdigit()),
            "{id}"
        );
    }
    assert_ne!(first.audit_id, second.audit_id);
    let records = cleanroom_server::audit::read(&h.data_dir.path().join("audit.jsonl")).unwrap();
    let seq_of = |id: &str| records.iter().find(|r| r.id == id).map(|r| r.seq);
    let (a, b) = (
        seq_of(&first.audit_id).unwrap(),
        seq_of(&second.audit_id).unwrap(),
    );
    assert_eq!(b - a, 2, "the retailer finds both records, one call apart");
    h.stop().await;
}

/// Issue 15, item 3: a question that needs more memory than the query pool has is answered
/// "ask again in a moment" (free: it is paid for), nothing is stored, and the service goes on
/// serving; with memory back, asking again computes it at no further cost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_question_short_of_memory_never_takes_the_service_down() {
    let h = Harness::start_with(crate::util::Setup {
        query_memory: Some(4 * 1024),
        ..Default::default()
    })
    .await;
    let short = h
        .run("sakura_foods", "category_buyers_by_age_band", &year())
        .await
        .unwrap_err();
    assert_eq!(short.code(), tonic::Code::Unavailable, "{short:?}");
    assert!(short.message().contains("ask again"), "{short:?}");
    h.partner("sakura_foods")
        .list_queries(cleanroom_proto::v1::ListQueriesRequest {})
        .await
        .expect("the service goes on serving");
    let used =
        |r: &cleanroom_proto::v1::RunQueryResponse| r.protection.as_ref().unwrap().answers_used;
    let overlap = h.run("sakura_foods", "matched_overlap", &[]).await;
    let before = overlap.as_ref().map(used).ok();
    let h = h.restart_with_query_memory(None).await;
    let answer = h
        .run("sakura_foods", "category_buyers_by_age_band", &year())
        .await
        .expect("with memory back it answers");
    let p = answer.protection.as_ref().unwrap();
    assert_eq!(p.rho_spent, 0.0, "it was paid for when first asked");
    if let Some(before) = before {
        assert_eq!(used(&answer), before, "no second charge");
    }
    h.stop().await;
}
