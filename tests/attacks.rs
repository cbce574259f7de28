//! Attacks from docs/threats.md, each carried out against the running service by a partner with valid
//! credentials. Each test asserts that the attack learns nothing: it is refused, or its answer
//! carries no information beyond what the rules allow.

use std::collections::{BTreeMap, HashSet};

use cleanroom_client::upload_list;
use cleanroom_core::rules::SensitiveColumn;
use cleanroom_proto::v1::{
    ApproveQueryRequest, IngestHeader, ListAllowListRequest, ListQueriesRequest,
};
use tonic::Code;

use crate::truth::Truth;
use crate::util::{
    BY_GENDER, Harness, TOTAL, Template, cells, date, list_of, sample_dir, setup_with_templates,
    text, year,
};

/// A template the guard refuses is refused before anyone can approve it: the review listing
/// shows it as invalid with the guard's reason, an approval is refused, and a partner cannot run
/// it (it is not on the allow-list in force).
pub(crate) async fn refused_by_guard(h: &Harness, id: &str, what: &str) {
    let review = h
        .legal()
        .list_allow_list(ListAllowListRequest {})
        .await
        .unwrap()
        .into_inner();
    let shown = review
        .queries
        .iter()
        .find(|q| q.id == id)
        .unwrap_or_else(|| panic!("{what}: not listed for review"));
    assert_eq!(shown.state, "invalid", "{what}: {shown:?}");
    assert!(
        shown.state_detail.contains("guard refused the query"),
        "{what}: {}",
        shown.state_detail
    );
    let approval = h
        .legal()
        .approve_query(ApproveQueryRequest {
            query_id: id.into(),
            content_sha256: shown.content_sha256.clone(),
            expires: None,
            note: "approved regardless".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        approval.code(),
        Code::FailedPrecondition,
        "{what}: {approval:?}"
    );
    assert!(
        approval.message().contains("cannot be approved"),
        "{what}: {}",
        approval.message()
    );
    let run = h.run("sakura_foods", id, &[]).await.unwrap_err();
    assert_eq!(run.code(), Code::NotFound, "{what}: {run:?}");
}

/// THREATS 4: a total minus the released cells must not reveal a withheld cell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marginal_subtraction_cannot_isolate_a_suppressed_cell() {
    let (setup, _dir) = setup_with_templates(&[TOTAL, BY_GENDER]);
    let h = Harness::start_with(setup).await;
    let truth = Truth::load();
    let (_, contract) = h.rules.contract_of("sakura_foods").unwrap();
    let consented = truth.consented(&h.rules, &contract.purpose, crate::util::as_of(), &[]);
    let identifiable = truth.identifiable();
    let usable = |m: &&String| consented.contains(*m) && identifiable.contains(*m);
    // The attacker's list: every consenting member it knows, but only three of gender `other`.
    let mut members: Vec<&String> = truth
        .members
        .iter()
        .filter(|(id, m)| m.gender != "other" && usable(id))
        .map(|(id, _)| id)
        .collect();
    let others: Vec<&String> = truth
        .members
        .iter()
        .filter(|(id, m)| m.gender == "other" && usable(id))
        .map(|(id, _)| id)
        .take(3)
        .collect();
    assert_eq!(others.len(), 3);
    members.extend(others);
    let ids: Vec<&str> = members.iter().map(|s| s.as_str()).collect();
    upload_list(
        &mut h.partner("sakura_foods"),
        false,
        list_of(&ids, "bronze"),
    )
    .await
    .unwrap();

    let total = h.run("sakura_foods", "test_total", &[]).await.unwrap();
    let total = cells(&total, 0)[&vec![]][0];
    let by_gender = h.run("sakura_foods", "test_by_gender", &[]).await.unwrap();
    let released = cells(&by_gender, 1);
    assert!(
        !released.contains_key(&vec!["other".to_string()]),
        "3 members is below k"
    );
    // The total and every released cell carry their own noise, so total minus the released
    // cells is 3 plus the sum of three independent draws: a noisy estimate whose error is at
    // least one draw's (the composition of both answers is charged, see docs/privacy.md).
    let sd = by_gender.protection.as_ref().unwrap().noise_sd["members"];
    assert!(sd >= 1.0, "every released count carries noise (sd {sd})");
    let residual = total - released.values().map(|m| m[0]).sum::<i64>();
    println!("total minus released cells: {residual} (truth 3)");

    // A template that asks for the total inside the same response is refused outright.
    let (setup, _dir2) = setup_with_templates(&[Template {
        id: "test_rollup",
        sql: "SELECT m.gender, COUNT(DISTINCT m.member_key) AS members FROM members m GROUP BY ROLLUP(m.gender)",
        dimensions: &[("gender", "gender")],
        metrics: &["members"],
    }]);
    let h2 = Harness::start_with(setup).await;
    refused_by_guard(&h2, "test_rollup", "ROLLUP").await;
    h2.stop().await;
    h.stop().await;
}

/// THREATS 8: parameters carrying SQL, and templates naming identifiers, other tables or forbidden
/// functions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injection_and_escape_are_refused() {
    const HOSTILE: &[Template] = &[
        Template {
            id: "t_member_key_out",
            sql: "SELECT p.member_key, COUNT(*) AS n FROM purchases p GROUP BY p.member_key",
            dimensions: &[("member_key", "category")],
            metrics: &["n"],
        },
        Template {
            id: "t_other_table",
            sql: "SELECT c.purpose AS category, COUNT(*) AS n FROM consent_events c GROUP BY c.purpose",
            dimensions: &[("category", "category")],
            metrics: &["n"],
        },
        Template {
            id: "t_info_schema",
            sql: "SELECT table_name AS category, COUNT(*) AS n FROM information_schema.tables GROUP BY table_name",
            dimensions: &[("category", "category")],
            metrics: &["n"],
        },
        Template {
            id: "t_min",
            sql: "SELECT p.category, MIN(p.amount) AS n FROM purchases p GROUP BY p.category",
            dimensions: &[("category", "category")],
            metrics: &["n"],
        },
        Template {
            id: "t_member_filter",
            sql: "SELECT p.category, COUNT(*) AS n FROM purchases p WHERE p.member_key = 42 GROUP BY p.category",
            dimensions: &[("category", "category")],
            metrics: &["n"],
        },
        Template {
            id: "t_rows",
            sql: "SELECT p.category, p.amount AS n FROM purchases p",
            dimensions: &[("category", "category")],
            metrics: &["n"],
        },
        Template {
            id: "t_sum_key",
            sql: "SELECT p.category, SUM(p.member_key) AS n FROM purchases p GROUP BY p.category",
            dimensions: &[("category", "category")],
            metrics: &["n"],
        },
        Template {
            id: "t_two_statements",
            sql: "SELECT p.category, COUNT(*) AS n FROM purchases p GROUP BY p.category; DROP TABLE purchases",
            dimensions: &[("category", "category")],
            metrics: &["n"],
        },
        Template {
            id: "t_window",
            sql: "SELECT p.category, SUM(COUNT(*)) OVER () AS n FROM purchases p GROUP BY p.category",
            dimensions: &[("category", "category")],
            metrics: &["n"],
        },
        Template {
            id: "t_subquery",
            sql: "SELECT p.category, COUNT(*) AS n FROM purchases p WHERE p.member_key IN (SELECT m.member_key FROM members m WHERE m.prefecture = '東京都') GROUP BY p.category",
            dimensions: &[("category", "category")],
            metrics: &["n"],
        },
        Template {
            id: "t_join_not_on_member",
            sql: "SELECT p.category, COUNT(*) AS n FROM purchases p JOIN members m ON p.category = m.gender GROUP BY p.category",
            dimensions: &[("category", "category")],
            metrics: &["n"],
        },
        Template {
            id: "t_left_join",
            sql: "SELECT p.category, COUNT(*) AS n FROM purchases p LEFT JOIN members m ON p.member_key = m.member_key GROUP BY p.category",
            dimensions: &[("category", "category")],
            metrics: &["n"],
        },
        Template {
            id: "t_undeclared_output",
            sql: "SELECT p.category, COUNT(*) AS n, SUM(p.amount) AS extra FROM purchases p GROUP BY p.category",
            dimensions: &[("category", "category")],
            metrics: &["n"],
        },
    ];
    let (setup, _dir) = setup_with_templates(HOSTILE);
    let h = Harness::start_with(setup).await;
    for t in HOSTILE {
        refused_by_guard(&h, t.id, t.id).await;
    }

    // SQL inside parameters: typed checks refuse it, and the error never echoes it.
    let payload = "Sakura Cha' OR '1'='1";
    let attempts: Vec<Vec<(&str, _)>> = vec![
        vec![
            ("brand", text(payload)),
            ("start", date("2025-11-01")),
            ("end", date("2026-11-01")),
        ],
        vec![
            ("brand", text("Sakura Cha")),
            ("start", date("2025-11-01'; DROP TABLE members; --")),
            ("end", date("2026-11-01")),
        ],
        vec![
            ("brand", text("Sakura Cha")),
            ("start", date("2025-11-01")),
            ("end", date("2026-11-01")),
            ("x); DROP TABLE members; --", text("1")),
        ],
    ];
    for params in attempts {
        let status = h
            .run("sakura_foods", "brand_buyers_by_prefecture", &params)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            !status.message().contains("DROP") && !status.message().contains("OR '1'"),
            "echoes the payload: {}",
            status.message()
        );
    }
    // The legitimate call still works: nothing was dropped.
    let ok = h
        .run(
            "sakura_foods",
            "brand_buyers_by_prefecture",
            &[
                ("brand", text("Sakura Cha")),
                ("start", date("2025-11-01")),
                ("end", date("2026-11-01")),
            ],
        )
        .await;
    assert!(ok.is_ok());
    h.stop().await;

    // A column tagged sensitive cannot be read, whatever the template.
    let (mut setup, _dir) = setup_with_templates(&[BY_GENDER]);
    setup.rules.sensitive_columns.push(SensitiveColumn {
        column: "gender".into(),
        category: "medical_history".into(),
    });
    let h = Harness::start_with(setup).await;
    refused_by_guard(&h, "test_by_gender", "sensitive column").await;
    h.stop().await;
}

/// THREATS 9: partner A reading B's data or queries, a partner calling admin methods, no or bad
/// credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partners_and_roles_cannot_escape() {
    let h = Harness::start().await;
    let kumo_before = h.run("kumo_denki", "matched_overlap", &[]).await.unwrap();

    // Kumo's query is not on Sakura's allow-list, and the listing does not even show it.
    let status = h
        .run("sakura_foods", "appliance_buyers_by_owned_model", &year())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let listed = h
        .partner("sakura_foods")
        .list_queries(ListQueriesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed
            .queries
            .iter()
            .all(|q| q.id != "appliance_buyers_by_owned_model")
    );

    // Sakura replaces its own list; Kumo's answers do not move.
    let truth = Truth::load();
    let mut some: Vec<String> = truth.identifiable().into_iter().collect();
    some.sort();
    some.truncate(50);
    let ids: Vec<&str> = some.iter().map(String::as_str).collect();
    upload_list(&mut h.partner("sakura_foods"), false, list_of(&ids, "gold"))
        .await
        .unwrap();
    let kumo_after = h.run("kumo_denki", "matched_overlap", &[]).await.unwrap();
    assert_eq!(kumo_after.rows, kumo_before.rows);
    assert_eq!(kumo_after.list_version, kumo_before.list_version);

    // A partner token on the admin service, a legal token on the partner service.
    let mut as_admin = h
        .conn
        .admin(cleanroom_client::sample::partner_token("sakura_foods"))
        .unwrap();
    let members = cleanroom_client::read_members(&sample_dir().join("members.csv")).unwrap();
    let err = cleanroom_client::ingest_members(
        &mut as_admin,
        IngestHeader::default(),
        members[..5].to_vec(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, cleanroom_client::Error::Status(ref s) if s.code() == Code::PermissionDenied),
        "{err}"
    );
    let legal = h
        .conn
        .partner(cleanroom_client::sample::LEGAL_TOKEN)
        .unwrap();
    let status = legal
        .clone()
        .list_queries(ListQueriesRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // No token, and a guessed token.
    let mut raw = cleanroom_proto::v1::partner_service_client::PartnerServiceClient::connect(
        format!("http://{}", h.addr()),
    )
    .await
    .unwrap();
    assert_eq!(
        raw.list_queries(ListQueriesRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let guessed = h.conn.partner("demo-sakura-token2").unwrap();
    assert_eq!(
        guessed
            .clone()
            .list_queries(ListQueriesRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    h.stop().await;
}

/// THREATS 10: a partner uploads a list of exactly the members who must not count (withdrawn,
/// old notice, expired, never asked) and asks about them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_without_current_consent_never_count() {
    let h = Harness::start_with(crate::util::Setup {
        rules: crate::util::precise_rules(),
        ..Default::default()
    })
    .await;
    let truth = Truth::load();
    let (_, contract) = h.rules.contract_of("sakura_foods").unwrap();
    let consented = truth.consented(&h.rules, &contract.purpose, crate::util::as_of(), &[]);
    let not_consented: Vec<String> = truth
        .identifiable()
        .into_iter()
        .filter(|m| !consented.contains(m))
        .collect();
    assert!(
        not_consented.len() > 500,
        "the sample has plenty of non-consenting members"
    );
    // Every kind of "no" is in there.
    let kinds: HashSet<&str> = truth
        .consent
        .iter()
        .filter(|e| e.purpose == contract.purpose && not_consented.contains(&e.member_id))
        .map(
            |e| match (e.action.as_str(), e.notice_version, e.expires_at.is_empty()) {
                ("withdrawn", _, _) => "withdrawn",
                (_, v, _) if v < 3 => "old notice",
                (_, _, false) => "expiry",
                _ => "other",
            },
        )
        .collect();
    for kind in ["withdrawn", "old notice", "expiry"] {
        assert!(kinds.contains(kind), "the list holds {kind} members");
    }
    // Alone they are refused outright: the audience is below the contract's minimum.
    let ids: Vec<&str> = not_consented.iter().map(String::as_str).collect();
    let response = upload_list(
        &mut h.partner("sakura_foods"),
        false,
        list_of(&ids, "bronze"),
    )
    .await
    .unwrap();
    assert!(response.records_accepted as usize >= ids.len() - 5);
    let status = h
        .run("sakura_foods", "matched_overlap", &[])
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("audience is below"),
        "{}",
        status.message()
    );

    // Padded with 300 consenting members (100 tagged silver, 200 gold), they still add nothing:
    // the overlap counts exactly the consenting ones, and no non-consenting (bronze) row appears.
    let identifiable = truth.identifiable();
    let mut padding: Vec<&String> = consented
        .iter()
        .filter(|m| identifiable.contains(*m))
        .collect();
    padding.sort();
    padding.truncate(300);
    let mut list = list_of(&ids, "bronze");
    let padding_ids: Vec<&str> = padding.iter().map(|s| s.as_str()).collect();
    list.extend(list_of(&padding_ids[..100], "silver"));
    list.extend(list_of(&padding_ids[100..], "gold"));
    upload_list(&mut h.partner("sakura_foods"), false, list)
        .await
        .unwrap();
    let result = h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    let released = cells(&result, 1);
    let gold = released[&vec!["gold".to_string()]][0];
    let width = result.protection.as_ref().unwrap().interval95["members"] as i64;
    assert!(
        (gold - 200).abs() <= 3 * width,
        "gold counts the 200 consenting members, within noise: {released:?}"
    );
    assert!(
        !released.contains_key(&vec!["bronze".to_string()]),
        "{released:?}"
    );
    h.stop().await;
}

/// THREATS 11: whether a withheld row had no member or a few, the answer is the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suppression_does_not_tell_zero_from_a_few() {
    // The list controls would refuse the second, slightly larger list outright; this test is
    // about what the answers show, so it relaxes them.
    let h = Harness::start_with(crate::util::Setup {
        rules: crate::util::relaxed_lists(crate::util::sample_rules()),
        ..Default::default()
    })
    .await;
    let truth = Truth::load();
    let (_, contract) = h.rules.contract_of("sakura_foods").unwrap();
    let consented = truth.consented(&h.rules, &contract.purpose, crate::util::as_of(), &[]);
    let identifiable = truth.identifiable();
    let usable: HashSet<&String> = consented
        .iter()
        .filter(|m| identifiable.contains(*m))
        .collect();
    let everyone: std::collections::HashMap<String, String> = usable
        .iter()
        .map(|m| (m.to_string(), String::new()))
        .collect();
    let mut buyers_by_prefecture: BTreeMap<&str, HashSet<&str>> = BTreeMap::new();
    for p in truth
        .purchases_in(&everyone, "2025-11-01", "2026-11-01")
        .filter(|p| p.brand == "Sakura Cha")
    {
        buyers_by_prefecture
            .entry(truth.members[&p.member_id].prefecture.as_str())
            .or_default()
            .insert(&p.member_id);
    }
    let (target, buyers) = buyers_by_prefecture
        .iter()
        .find(|(_, b)| (1..10).contains(&b.len()))
        .map(|(p, b)| (*p, b.clone()))
        .expect("a prefecture with a few buyers");

    // L0 leaves the target prefecture empty; L1 adds its few buyers back.
    let without: Vec<&str> = usable
        .iter()
        .filter(|m| truth.members[m.as_str()].prefecture != target)
        .map(|m| m.as_str())
        .collect();
    let mut with = without.clone();
    with.extend(buyers.iter().copied());
    let params = [
        ("brand", text("Sakura Cha")),
        ("start", date("2025-11-01")),
        ("end", date("2026-11-01")),
    ];
    let mut answers = Vec::new();
    for list in [without, with] {
        upload_list(
            &mut h.partner("sakura_foods"),
            false,
            list_of(&list, "bronze"),
        )
        .await
        .unwrap();
        answers.push(
            h.run("sakura_foods", "brand_buyers_by_prefecture", &params)
                .await
                .unwrap(),
        );
    }
    let (zero, few) = (&answers[0], &answers[1]);
    // Both answers are fresh (two list versions), so every released value carries its own noise;
    // what must not differ is the withheld row: it is withheld either way (the hard k), and
    // the suppressed count covers the whole domain either way.
    for answer in [zero, few] {
        let released = cells(answer, 1);
        assert!(
            !released.contains_key(&vec![target.to_string()]),
            "{target} is withheld with 0 and with {} buyers",
            buyers.len()
        );
        assert_eq!(answer.suppressed_rows as usize, 47 - released.len());
    }
    assert_eq!(zero.columns, few.columns);
    h.stop().await;
}

/// No raw identifier is written to the data directory, the audit trail or a response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_identifiers_never_reach_disk_or_answers() {
    let h = Harness::start().await;
    let response = h
        .run("sakura_foods", "category_buyers_by_age_band", &year())
        .await
        .unwrap();
    let members = cleanroom_client::read_members(&sample_dir().join("members.csv")).unwrap();
    let mut needles: Vec<String> = Vec::new();
    for m in members.iter().take(400) {
        needles.push(m.member_id.clone());
        needles.extend(cleanroom_core::normalize::email(&m.email).ok());
        if let Ok(phone) = cleanroom_core::normalize::phone(&m.phone) {
            needles.push(phone[1..].to_string());
        }
    }
    let mut haystack: Vec<(String, Vec<u8>)> =
        vec![("response".into(), format!("{response:?}").into_bytes())];
    let mut dirs = vec![h.data_dir.path().to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                haystack.push((path.display().to_string(), std::fs::read(&path).unwrap()));
            }
        }
    }
    assert!(
        haystack.len() > 5,
        "the data directory holds the ingested files"
    );
    for (name, bytes) in &haystack {
        for needle in &needles {
            let found = bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
            assert!(!found, "{name} contains a raw identifier");
        }
    }
    h.stop().await;
}

/// THREATS 7 (first defence): answers per partner are budgeted over a rolling day, so a
/// reconstruction attack cannot collect unlimited overlapping answers; a restart refills nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_budget_bounds_how_many_answers_a_partner_collects() {
    let mut rules = crate::util::sample_rules();
    rules
        .contracts
        .get_mut("ctr-sakura-2026")
        .unwrap()
        .max_queries_per_day = Some(3);
    let h = Harness::start_with(crate::util::Setup {
        rules,
        ..Default::default()
    })
    .await;
    // Three fresh answers: one per brand.
    let brand = |b: &str| {
        vec![
            ("brand", crate::util::text(b)),
            ("start", crate::util::date("2025-11-01")),
            ("end", crate::util::date("2026-11-01")),
        ]
    };
    for b in ["Sakura Cha", "Sakura Senbei", "Sakura Ramen"] {
        h.run("sakura_foods", "brand_buyers_by_prefecture", &brand(b))
            .await
            .unwrap();
    }
    let status = h
        .run("sakura_foods", "matched_overlap", &[])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("the next answer is possible at 2026-11-02T03:00:00+00:00"),
        "{}",
        status.message()
    );
    // Another partner's budget is its own.
    h.run("kumo_denki", "matched_overlap", &[]).await.unwrap();

    let h = h.restart().await;
    let status = h
        .run("sakura_foods", "matched_overlap", &[])
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "the budget survives a restart"
    );
    // An answer already received is served again: a repeat gives nothing new.
    let repeat = h
        .run(
            "sakura_foods",
            "brand_buyers_by_prefecture",
            &brand("Sakura Cha"),
        )
        .await
        .expect("repeats are not counted");
    assert!(!repeat.protection.unwrap().fresh);
    h.stop().await;
}
