//! Legal review and live rules, through the running service: approvals bound to content hashes
//! (over gRPC and the review page's HTTP API), rules and allow-list edits picked up without a
//! restart (and refused whole when invalid), and `cleanroom rules validate` as a dry run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cleanroom_proto::v1::{
    ApproveQueryRequest, DescribeQueryRequest, ListAllowListRequest, ListAuditRequest,
    ListQueriesRequest, QueryReview, RejectQueryRequest,
};
use cleanroom_server::Sources;
use tonic::Code;

use crate::util::{Harness, Setup, root, sample_rules, year};

/// A copy of the sample rules and the allow-list in a temporary directory, which the service
/// follows as `cleanroom serve` follows its configured files.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("queries")).unwrap();
        for entry in std::fs::read_dir(root().join("queries")).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(
                &path,
                dir.path().join("queries").join(path.file_name().unwrap()),
            )
            .unwrap();
        }
        std::fs::copy(
            root().join("sample_data/rules.toml"),
            dir.path().join("rules.toml"),
        )
        .unwrap();
        Self { dir }
    }

    fn rules(&self) -> PathBuf {
        self.dir.path().join("rules.toml")
    }

    fn query(&self, id: &str) -> PathBuf {
        self.dir.path().join("queries").join(format!("{id}.toml"))
    }

    fn queries(&self) -> PathBuf {
        self.dir.path().join("queries")
    }

    fn setup(&self) -> Setup {
        Setup {
            rules: sample_rules(),
            queries: self.queries(),
            sources: Some(Sources {
                rules: self.rules(),
                queries: self.queries(),
                poll: Duration::from_millis(100),
            }),
            ..Setup::default()
        }
    }

    fn edit(&self, path: &Path, from: &str, to: &str) {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.contains(from), "{} lacks {from:?}", path.display());
        std::fs::write(path, text.replacen(from, to, 1)).unwrap();
    }
}

async fn review_of(h: &Harness, id: &str) -> QueryReview {
    h.legal()
        .list_allow_list(ListAllowListRequest {})
        .await
        .unwrap()
        .into_inner()
        .queries
        .into_iter()
        .find(|q| q.id == id)
        .unwrap_or_else(|| panic!("{id} is not in the allow-list"))
}

/// The approval state of `id` as Sakura Foods reads it in ListQueries.
async fn approval_word(h: &Harness, id: &str) -> String {
    h.partner("sakura_foods")
        .list_queries(ListQueriesRequest {})
        .await
        .unwrap()
        .into_inner()
        .queries
        .into_iter()
        .find(|q| q.id == id)
        .unwrap()
        .approval
}

/// Polls until `done` holds (the service looks for edits every 100 ms in these tests).
async fn eventually<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_query_is_refused_until_legal_approves_it_again() {
    let files = Files::new();
    let h = Harness::start_with(files.setup()).await;
    let id = "category_buyers_by_age_band";
    h.run("sakura_foods", id, &year()).await.unwrap();
    let approved = review_of(&h, id).await;
    assert_eq!(approved.state, "approved");
    // The reviewer reads the guarantee each partner's contract buys beside its terms, the same
    // (epsilon, delta) the partner's answers state.
    let sakura = approved
        .partners
        .iter()
        .find(|p| p.id == "sakura_foods")
        .expect("Sakura runs this query");
    let answer = h.run("sakura_foods", id, &year()).await.unwrap();
    let protection = answer.protection.expect("protection is reported");
    assert_eq!(
        (
            sakura.period_epsilon,
            sakura.period_delta,
            sakura.period_days
        ),
        (
            protection.period_epsilon,
            protection.period_delta,
            protection.period_days
        )
    );
    assert_eq!(sakura.answers_per_period, protection.answers_per_period);
    assert_eq!(sakura.rows_per_member, protection.rows_per_member);
    assert!(sakura.answer_epsilon > 0.0 && sakura.answer_epsilon < sakura.period_epsilon);

    files.edit(&files.query(id), "k = 10", "k = 12");
    eventually("the edit is picked up", || async {
        review_of(&h, id).await.state == "changed"
    })
    .await;

    // Over gRPC: the partner is refused, with the query and its state named.
    let status = h.run("sakura_foods", id, &year()).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains(id) && status.message().contains("its approval is pending"),
        "{}",
        status.message()
    );
    assert_eq!(
        approval_word(&h, id).await,
        "pending",
        "a fixed word, nothing of the review"
    );

    // The reviewer sees what changed, in the metadata and nowhere else.
    let changed = review_of(&h, id).await;
    assert_eq!(
        changed.approved_sha256.as_deref(),
        Some(approved.content_sha256.as_str())
    );
    let diff = changed
        .diff
        .clone()
        .expect("a diff against the approved version");
    let lines = |op: &str| -> Vec<String> {
        diff.metadata
            .iter()
            .filter(|l| l.op == op)
            .map(|l| l.text.clone())
            .collect()
    };
    assert_eq!(lines("delete"), ["k: 10"]);
    assert_eq!(lines("insert"), ["k: 12"]);
    assert!(diff.sql.iter().all(|l| l.op == "equal"));
    assert_eq!(changed.history.len(), 2, "both versions are kept");

    // Only the legal role may approve, and only the content it read.
    let approve = |sha: &str| ApproveQueryRequest {
        query_id: id.into(),
        content_sha256: sha.into(),
        expires: None,
        note: "re-reviewed".into(),
    };
    let partner_legal = h
        .conn
        .legal(cleanroom_client::sample::partner_token("sakura_foods"))
        .unwrap();
    let status = partner_legal
        .clone()
        .approve_query(approve(&changed.content_sha256))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let analyst = h
        .conn
        .legal(cleanroom_client::sample::ANALYST_TOKEN)
        .unwrap();
    let status = analyst
        .clone()
        .approve_query(approve(&changed.content_sha256))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = h
        .legal()
        .approve_query(approve(&approved.content_sha256))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "stale content");
    assert!(h.run("sakura_foods", id, &year()).await.is_err());

    let decision = h
        .legal()
        .approve_query(approve(&changed.content_sha256))
        .await
        .unwrap()
        .into_inner();
    assert!(decision.audit_id.starts_with("a-"));
    let ran = h.run("sakura_foods", id, &year()).await.unwrap();
    assert_eq!(ran.effective_k, 12);

    // Approval lives in the audit trail: it survives a restart.
    let h = h.restart().await;
    assert_eq!(review_of(&h, id).await.state, "approved");
    let audit = h
        .legal()
        .list_audit(ListAuditRequest {
            query_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(audit.chain_intact);
    assert!(
        audit
            .records
            .iter()
            .any(|r| r.method == "ApproveQuery" && r.principal == "Legal reviewer")
    );
    assert!(
        audit
            .records
            .iter()
            .any(|r| r.method == "ApproveQuery" && r.outcome.starts_with("PermissionDenied")),
        "refused approvals are recorded too"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_and_expired_approvals_stop_a_query() {
    let h = Harness::start().await;
    let id = "matched_overlap";
    let current = review_of(&h, id).await;
    let reject = |reason: &str| RejectQueryRequest {
        query_id: id.into(),
        content_sha256: current.content_sha256.clone(),
        reason: reason.into(),
    };
    let status = h.legal().reject_query(reject("  ")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    h.legal()
        .reject_query(reject("the overlap by attribute is not in the contract"))
        .await
        .unwrap();
    let status = h.run("sakura_foods", id, &[]).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    // The partner reads one fixed word: neither the reviewer nor the reason.
    assert!(
        status.message().ends_with("its approval is withdrawn")
            && !status.message().contains("Legal reviewer")
            && !status.message().contains("overlap by attribute"),
        "{}",
        status.message()
    );
    assert_eq!(approval_word(&h, id).await, "withdrawn");

    // An approval with a past last day is refused; one that ends today holds today only.
    let approve = |expires: &str| ApproveQueryRequest {
        query_id: id.into(),
        content_sha256: current.content_sha256.clone(),
        expires: Some(expires.into()),
        note: String::new(),
    };
    let status = h
        .legal()
        .approve_query(approve("2026-10-31"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    h.legal()
        .approve_query(approve("2026-11-01"))
        .await
        .unwrap();
    h.run("sakura_foods", id, &[]).await.unwrap();
    let h = h
        .restart_at(crate::util::as_of() + chrono::Duration::days(1))
        .await;
    let status = h.run("sakura_foods", id, &[]).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().ends_with("its approval is withdrawn"),
        "{}",
        status.message()
    );
    assert_eq!(review_of(&h, id).await.state, "expired");
    h.stop().await;
}

/// Sends one HTTP/1.1 request to the review page and returns the status and body.
async fn http(addr: std::net::SocketAddr, request: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

fn get(path: &str, token: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
}

fn post(path: &str, token: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_review_page_reads_for_reviewers_and_approves_for_legal_only() {
    let h = Harness::start_with(Setup {
        load_sample: false,
        approve: false,
        ..Setup::default()
    })
    .await;
    let page = h.review_addr();
    let (status, body) = http(page, &get("/", "")).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("allow-list"),
        "the page itself needs no token"
    );

    let (status, _) = http(page, &get("/api/allowlist", "nobody")).await;
    assert_eq!(status, 401);
    let (status, body) = http(page, &get("/api/allowlist", "demo-sakura-token")).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = http(page, &get("/api/allowlist", "demo-analyst-token")).await;
    assert_eq!(status, 200, "{body}");
    let review: serde_json::Value = serde_json::from_str(&body).unwrap();
    let query = review["queries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["id"] == "matched_overlap")
        .unwrap()
        .clone();
    assert_eq!(query["state"], "pending");
    let sha = query["content_sha256"].as_str().unwrap();
    let body = format!(r#"{{"content_sha256": "{sha}"}}"#);
    let path = "/api/queries/matched_overlap/approve";

    for token in ["demo-sakura-token", "demo-analyst-token"] {
        let (status, answer) = http(page, &post(path, token, &body)).await;
        assert_eq!(status, 403, "{token}: {answer}");
    }
    assert!(h.run("sakura_foods", "matched_overlap", &[]).await.is_err());
    let (status, answer) = http(page, &post(path, "demo-legal-token", "not json")).await;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = http(page, &post(path, "demo-legal-token", &body)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(review_of(&h, "matched_overlap").await.state, "approved");

    let (status, body) = http(
        page,
        &get("/api/audit?query=matched_overlap", "demo-legal-token"),
    )
    .await;
    assert_eq!(status, 200);
    let audit: serde_json::Value = serde_json::from_str(&body).unwrap();
    let methods: Vec<&str> = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["method"].as_str().unwrap())
        .collect();
    assert!(methods.contains(&"ApproveQuery"), "{methods:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_changes_apply_live_and_invalid_ones_are_refused_whole() {
    let files = Files::new();
    let h = Harness::start_with(files.setup()).await;
    let describe = |h: &Harness| {
        let mut client = h.partner("sakura_foods");
        async move {
            client
                .describe_query(DescribeQueryRequest {
                    query_id: "category_buyers_by_age_band".into(),
                })
                .await
                .map(|r| r.into_inner().effective_k)
        }
    };
    assert_eq!(describe(&h).await.unwrap(), 10);

    // A valid change takes effect without a restart.
    files.edit(
        &files.rules(),
        "k = 10\n# Last day in force",
        "k = 20\n# Last day in force",
    );
    eventually("the new k is in force", || async {
        describe(&h).await.ok() == Some(20)
    })
    .await;
    let ran = h
        .run("sakura_foods", "category_buyers_by_age_band", &year())
        .await
        .unwrap();
    assert_eq!(ran.effective_k, 20);

    // An invalid one is refused whole: the service keeps running on the previous rules.
    files.edit(
        &files.rules(),
        "purpose = \"product_insight\"",
        "purpose = \"no_such_purpose\"",
    );
    let audit = || {
        let mut legal = h.legal();
        async move {
            legal
                .list_audit(ListAuditRequest::default())
                .await
                .unwrap()
                .into_inner()
                .records
        }
    };
    eventually("the refusal is recorded", || async {
        audit()
            .await
            .iter()
            .any(|r| r.method == "ReloadConfig" && r.outcome.contains("unknown purpose"))
    })
    .await;
    assert_eq!(describe(&h).await.unwrap(), 20);
    h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();

    // Fixing it, and taking a query off the contract, applies both at once.
    files.edit(
        &files.rules(),
        "purpose = \"no_such_purpose\"",
        "purpose = \"product_insight\"",
    );
    files.edit(
        &files.rules(),
        "\"matched_overlap\", \"repeat_purchase_rate\"]",
        "\"repeat_purchase_rate\"]",
    );
    eventually("the query leaves the contract", || async {
        h.run("sakura_foods", "matched_overlap", &[])
            .await
            .is_err_and(|s| s.code() == Code::NotFound)
    })
    .await;
    let records = audit().await;
    let applied = records
        .iter()
        .filter(|r| r.method == "ReloadConfig" && r.outcome == "ok")
        .count();
    assert_eq!(applied, 2, "each applied change is one audit record");
    h.stop().await;
}

fn validate(args: &[&str]) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_cleanroom"))
        .current_dir(root())
        .args(["rules", "validate"])
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_validate_says_what_a_change_would_do() {
    // A data directory with the sample loaded, for the consent counts.
    let h = Harness::start().await;
    let files = Files::new();
    files.edit(
        &files.rules(),
        "min_notice_version = 3",
        "min_notice_version = 4",
    );
    files.edit(
        &files.rules(),
        "queries = [\"appliance_buyers_by_owned_model\", \"matched_overlap\", \"category_buyers_by_age_band\"]",
        "queries = [\"appliance_buyers_by_owned_model\", \"category_buyers_by_age_band\"]",
    );
    let data_dir = h.data_dir.path().to_str().unwrap().to_string();
    let proposed = files.rules();
    let (ok, out) = validate(&[
        "--rules",
        proposed.to_str().unwrap(),
        "--data-dir",
        &data_dir,
        "--as-of",
        "2026-11-01T12:00:00+09:00",
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("purpose product_insight: notice version 3 -> 4"),
        "{out}"
    );
    assert!(out.contains("kumo_denki loses matched_overlap"), "{out}");
    // Nobody has consented to notice 4 yet: Sakura's consent filter now admits no one.
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("ctr-sakura-2026:"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("-> 0 consenting") && line.contains("(changes)"),
        "{line}"
    );
    let kumo = out
        .lines()
        .find(|l| l.trim_start().starts_with("ctr-kumo-2026:"))
        .unwrap();
    assert!(kumo.contains("(unchanged)"), "{kumo}");

    // A contract added since the members were ingested has no member tokens yet: named.
    files.edit(
        &files.rules(),
        "[contracts.ctr-kumo-2026]",
        "[contracts.ctr-kumo-2027]",
    );
    files.edit(
        &files.rules(),
        "[contracts.ctr-kumo-2026.protection]",
        "[contracts.ctr-kumo-2027.protection]",
    );
    let (ok, out) = validate(&[
        "--rules",
        proposed.to_str().unwrap(),
        "--data-dir",
        &data_dir,
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("ctr-kumo-2027: no member tokens yet; ingest the members again"),
        "{out}"
    );
    assert!(!out.contains("ctr-sakura-2026: no member tokens"), "{out}");

    files.edit(&files.rules(), "k_floor = 10", "k_floor = 1");
    let (ok, out) = validate(&["--rules", proposed.to_str().unwrap()]);
    assert!(!ok, "an invalid proposal fails");
    assert!(out.contains("k_floor must be between 2 and 1000"), "{out}");
    h.stop().await;
}

/// The service's health: whether the configuration on disk is the one in force.
async fn config_health(h: &Harness) -> i32 {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", h.addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: cleanroom_server::CONFIG_HEALTH.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

/// Issue 9, finding "a query file can read any file": a symlink in `queries/` to a file holding a
/// secret, and a FIFO, are refused as files (never followed, never read, never quoted), and a
/// reload still completes: a token revoked in the rules stops working. A rules edit that does not
/// load is reported by the health service until it is fixed, by position, never by content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_files_are_regular_files_only_and_a_reload_cannot_stall() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let files = Files::new();
    let h = Harness::start_with(files.setup()).await;
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("environ");
    std::fs::write(
        &secret,
        "CLEANROOM_MASTER_SECRET=deadbeefcafebabe00112233\n",
    )
    .unwrap();
    std::os::unix::fs::symlink(&secret, files.queries().join("leak.toml")).unwrap();
    let fifo = files.queries().join("stall.toml");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo");

    let kumo = cleanroom_client::sample::partner_token("kumo_denki");
    let revoked = cleanroom_server::auth::token_sha256("revoked");
    files.edit(
        &files.rules(),
        &cleanroom_server::auth::token_sha256(kumo),
        &revoked,
    );
    eventually("the revocation takes effect despite the FIFO", || async {
        h.run("kumo_denki", "matched_overlap", &[])
            .await
            .is_err_and(|s| s.code() == Code::Unauthenticated)
    })
    .await;

    let page = h
        .legal()
        .list_allow_list(ListAllowListRequest {})
        .await
        .unwrap()
        .into_inner();
    for id in ["leak", "stall"] {
        let q = page
            .queries
            .iter()
            .find(|q| q.id == id)
            .expect("listed as invalid");
        assert_eq!(q.state, "invalid");
        assert!(
            q.state_detail.contains("not a regular file"),
            "{}",
            q.state_detail
        );
    }
    assert!(
        !format!("{page:?}").contains("deadbeefcafebabe"),
        "the secret never shows"
    );
    assert_eq!(config_health(&h).await, ServingStatus::Serving as i32);

    // A rules edit that does not parse: refused, reported, never quoted.
    files.edit(
        &files.rules(),
        "[retailer]",
        "[retailer\nleaked_value = \"s3cr3t-in-rules\"",
    );
    let mut health = 0;
    for _ in 0..100 {
        health = config_health(&h).await;
        if health == ServingStatus::NotServing as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        health,
        ServingStatus::NotServing as i32,
        "a refused reload shows in health"
    );
    let trail = std::fs::read_to_string(h.data_dir.path().join("audit.jsonl")).unwrap();
    let refusal = trail
        .lines()
        .rfind(|l| l.contains("ReloadConfig") && l.contains("refused"))
        .expect("the refusal is recorded");
    assert!(!refusal.contains("s3cr3t-in-rules"), "{refusal}");
    assert!(
        refusal.contains("rules.toml:"),
        "names the file and position: {refusal}"
    );
    files.edit(
        &files.rules(),
        "[retailer\nleaked_value = \"s3cr3t-in-rules\"",
        "[retailer]",
    );
    eventually("health recovers once the rules load", || async {
        config_health(&h).await == ServingStatus::Serving as i32
    })
    .await;
    h.stop().await;
}
