//! Bad input gets a precise status, and nothing half-ingested stays visible: a refused upload or
//! ingest leaves the previous state exactly as it was.

use cleanroom_client::{ingest_members, upload_list};
use cleanroom_proto::v1::{
    CustomerRecord, DescribeQueryRequest, IngestHeader, ListChunk, ListQueriesRequest,
    MemberRecord, UploadListHeader, UploadListRequest, upload_list_request,
};
use tonic::Code;

use crate::util::{Harness, Setup, date, int, sample_rules, year};

fn code_of(err: cleanroom_client::Error) -> tonic::Status {
    match err {
        cleanroom_client::Error::Status(s) => s,
        other => panic!("not a status: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_queries_and_parameters_get_precise_statuses() {
    let h = Harness::start().await;
    let cases: Vec<(&str, Vec<(&str, _)>, Code, &str)> = vec![
        (
            "no_such_query",
            year(),
            Code::NotFound,
            "not on your allow-list",
        ),
        (
            "category_buyers_by_age_band",
            vec![("start", int(20251101)), ("end", date("2026-11-01"))],
            Code::InvalidArgument,
            "parameter `start`: expected date",
        ),
        (
            "category_buyers_by_age_band",
            vec![("start", date("2023-01-01")), ("end", date("2026-11-01"))],
            Code::InvalidArgument,
            "parameter `start`: out of range",
        ),
        (
            "category_buyers_by_age_band",
            vec![("start", date("2025-13-01")), ("end", date("2026-11-01"))],
            Code::InvalidArgument,
            "YYYY-MM-DD",
        ),
        (
            "category_buyers_by_age_band",
            vec![("end", date("2026-11-01"))],
            Code::InvalidArgument,
            "parameter `start`: missing",
        ),
        (
            "category_buyers_by_age_band",
            vec![("start", date("2026-11-01")), ("end", date("2026-10-01"))],
            Code::InvalidArgument,
            "must come after `start` by at least 28 days",
        ),
        (
            "repeat_purchase_rate",
            vec![("start", date("2026-03-04")), ("end", date("2026-03-20"))],
            Code::InvalidArgument,
            "after snapping the window 2026-03-02..2026-03-23 is 21 days",
        ),
    ];
    for (query, params, code, needle) in cases {
        let status = h.run("sakura_foods", query, &params).await.unwrap_err();
        assert_eq!(status.code(), code, "{query} {params:?}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{query}: {:?} lacks {needle:?}",
            status.message()
        );
    }
    // Dates off the declared unit are not refused: they snap outward to whole months or weeks,
    // and the answer says which window it covers.
    let snapped = h
        .run(
            "sakura_foods",
            "category_buyers_by_age_band",
            &[("start", date("2025-11-15")), ("end", date("2026-10-20"))],
        )
        .await
        .unwrap();
    assert_eq!(snapped.effective_params["start"], "2025-11-01");
    assert_eq!(snapped.effective_params["end"], "2026-11-01");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_contract_is_refused() {
    let mut rules = sample_rules();
    rules.contracts.get_mut("ctr-sakura-2026").unwrap().expires =
        chrono::NaiveDate::from_ymd_opt(2026, 10, 31).unwrap();
    let h = Harness::start_with(Setup {
        rules,
        load_sample: false,
        ..Setup::default()
    })
    .await;
    let status = h
        .run("sakura_foods", "matched_overlap", &[])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status
            .message()
            .contains("contract ctr-sakura-2026 expired on 2026-10-31"),
        "{}",
        status.message()
    );
    let record = CustomerRecord {
        email: "someone@example.jp".into(),
        ..Default::default()
    };
    let err = upload_list(&mut h.partner("sakura_foods"), false, vec![record])
        .await
        .unwrap_err();
    assert_eq!(code_of(err).code(), Code::FailedPrecondition);
    // Nor is the allow-list shown under an expired contract.
    let listed = h
        .partner("sakura_foods")
        .list_queries(ListQueriesRequest {})
        .await
        .unwrap_err();
    let described = h
        .partner("sakura_foods")
        .describe_query(DescribeQueryRequest {
            query_id: "matched_overlap".into(),
        })
        .await
        .unwrap_err();
    for status in [listed, described] {
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "{}",
            status.message()
        );
        assert!(
            status.message().contains("expired on 2026-10-31"),
            "{}",
            status.message()
        );
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_uploads_store_nothing() {
    let mut rules = sample_rules();
    rules.privacy.max_upload_records = 35_000;
    let h = Harness::start_with(Setup {
        rules,
        ..Setup::default()
    })
    .await;
    let before = h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    let record = |email: &str| CustomerRecord {
        email: email.into(),
        attribute: "gold".into(),
        ..Default::default()
    };
    let header = |strict| UploadListRequest {
        kind: Some(upload_list_request::Kind::Header(UploadListHeader {
            strict,
            ..Default::default()
        })),
    };
    let chunk = |records: Vec<CustomerRecord>| UploadListRequest {
        kind: Some(upload_list_request::Kind::Chunk(ListChunk { records })),
    };
    let upload = |messages: Vec<UploadListRequest>| {
        let mut client = h.partner("sakura_foods");
        async move { client.upload_list(tokio_stream::iter(messages)).await }
    };

    let cases: Vec<(Vec<UploadListRequest>, Code, &str)> = vec![
        (
            vec![chunk(vec![record("a@example.jp")])],
            Code::InvalidArgument,
            "start with a header",
        ),
        (
            vec![header(false), header(false)],
            Code::InvalidArgument,
            "second header",
        ),
        (vec![], Code::InvalidArgument, "start with a header"),
        (
            vec![header(false), UploadListRequest { kind: None }],
            Code::InvalidArgument,
            "empty stream message",
        ),
        (
            vec![header(false), chunk(vec![record("not-an-email")])],
            Code::InvalidArgument,
            "no valid record",
        ),
        (
            vec![
                header(true),
                chunk(vec![
                    record("ok@example.jp"),
                    record("secret.person@@example.jp"),
                ]),
            ],
            Code::InvalidArgument,
            "record 2: email: more than one @",
        ),
        (
            vec![
                header(false),
                chunk(vec![CustomerRecord {
                    email: "x@example.jp".into(),
                    attribute: "platinum".into(),
                    ..Default::default()
                }]),
            ],
            Code::InvalidArgument,
            "no valid record",
        ),
        (
            vec![
                header(false),
                chunk(
                    (0..35_001)
                        .map(|i| record(&format!("u{i}@example.jp")))
                        .collect(),
                ),
            ],
            Code::ResourceExhausted,
            "at most 35000 records",
        ),
        // One message over the 8 MiB message limit.
        (
            vec![
                header(false),
                chunk(
                    (0..90_000)
                        .map(|i| record(&format!("{i:0>90}@example.jp")))
                        .collect(),
                ),
            ],
            Code::ResourceExhausted,
            "",
        ),
    ];
    for (messages, code, needle) in cases {
        let status = upload(messages).await.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(
            status.message().contains(needle),
            "{:?} lacks {needle:?}",
            status.message()
        );
        assert!(
            !status.message().contains("secret.person"),
            "echoes an identifier: {}",
            status.message()
        );
    }
    let after = h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    assert_eq!(
        after.list_version, before.list_version,
        "no refused upload became a list version"
    );
    assert_eq!(after.rows, before.rows);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_ingest_with_an_invalid_phone_changes_nothing() {
    let h = Harness::start().await;
    let before = h
        .run("sakura_foods", "category_buyers_by_age_band", &year())
        .await
        .unwrap();
    let mut members =
        cleanroom_client::read_members(&crate::util::sample_dir().join("members.csv")).unwrap();
    members[10].phone = "03-12".into();
    let header = IngestHeader {
        source: "test".into(),
        strict: true,
        ..Default::default()
    };
    let status = code_of(
        ingest_members(&mut h.analyst(), header, members)
            .await
            .unwrap_err(),
    );
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("record 11: phone: too short"),
        "{}",
        status.message()
    );
    let after = h
        .run("sakura_foods", "category_buyers_by_age_band", &year())
        .await
        .unwrap();
    assert_eq!(
        after.rows, before.rows,
        "the refused export did not replace the members"
    );

    // Lenient mode keeps the member, drops only the bad phone, and says why.
    let record = MemberRecord {
        member_id: "M9999999".into(),
        phone: "phone".into(),
        prefecture: "東京都".into(),
        ..Default::default()
    };
    let summary = ingest_members(&mut h.analyst(), IngestHeader::default(), vec![record])
        .await
        .unwrap();
    assert_eq!(summary.records_accepted, 1);
    assert_eq!(summary.rejected_by_reason.get("phone: no digits"), Some(&1));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_analyst_ingests_a_partner_list_on_its_behalf() {
    let h = Harness::start().await;
    let records = cleanroom_client::read_list(
        &crate::util::sample_dir().join("partner_lists/kumo_denki.csv"),
    )
    .unwrap();
    let response = cleanroom_client::ingest_partner_list(
        &mut h.analyst(),
        "kumo_denki",
        false,
        records.clone(),
    )
    .await
    .unwrap();
    assert_eq!(response.list_version, 2, "the sample load made version 1");
    let overlap = h.run("kumo_denki", "matched_overlap", &[]).await.unwrap();
    assert_eq!(overlap.list_version, 2);

    let status = code_of(
        cleanroom_client::ingest_partner_list(
            &mut h.analyst(),
            "no_such_partner",
            false,
            records.clone(),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(status.code(), Code::NotFound);
    let mut partner_as_admin = h
        .conn
        .admin(cleanroom_client::sample::partner_token("sakura_foods"))
        .unwrap();
    let status = code_of(
        cleanroom_client::ingest_partner_list(&mut partner_as_admin, "kumo_denki", false, records)
            .await
            .unwrap_err(),
    );
    assert_eq!(status.code(), Code::PermissionDenied);
    h.stop().await;
}

/// A contract added after the last members ingest has no member tokens, so its list can match
/// nobody: its partner's question is refused before anything is charged (a retailer's ingest
/// decides it, never a member), and asking again stays free until the members are ingested;
/// then (with its list uploaded under the new contract's key) it is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contract_without_member_tokens_is_refused_uncharged() {
    let mut h = Harness::start().await;
    let contract = h.rules.contracts.remove("ctr-sakura-2026").unwrap();
    h.rules.contracts.insert("ctr-sakura-2027".into(), contract);
    let h = h.restart().await;
    let charges = h.app.guard.charges();
    for _ in 0..2 {
        let status = h
            .run("sakura_foods", "matched_overlap", &[])
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(
            status
                .message()
                .contains("not yet computed its members' tokens for this contract"),
            "{}",
            status.message()
        );
    }
    assert_eq!(
        h.app.guard.charges(),
        charges,
        "a refusal before the data is free"
    );
    // The other collaboration's tokens are there: its partner is answered (and charged).
    h.run("kumo_denki", "matched_overlap", &[]).await.unwrap();
    assert_eq!(h.app.guard.charges(), charges + 1);
    // Control: once the members are ingested again, the same question is answered (and charged).
    let members =
        cleanroom_client::read_members(&crate::util::sample_dir().join("members.csv")).unwrap();
    let header = cleanroom_proto::v1::IngestHeader {
        source: "members.csv".into(),
        strict: false,
        request_id: cleanroom_client::new_request_id(),
        tokens_only: false,
    };
    cleanroom_client::ingest_members(&mut h.analyst(), header, members)
        .await
        .unwrap();
    // The list on file was hashed under the old contract's key: the partner uploads it again.
    let list = crate::util::sample_dir().join("partner_lists/sakura_foods.csv");
    let records = cleanroom_client::read_list(&list).unwrap();
    cleanroom_client::upload_list(&mut h.partner("sakura_foods"), false, records)
        .await
        .unwrap();
    h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    assert_eq!(h.app.guard.charges(), charges + 2);
    h.stop().await;
}
