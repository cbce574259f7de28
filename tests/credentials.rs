//! Credentials (issue 9, item 2): minted tokens are strong and stored as Argon2id hashes; the
//! published demo tokens and any bare SHA-256 token are refused by `serve` unless it is told the
//! deployment is a demo; failed guesses against one token id are limited.

use std::process::Command;

use cleanroom_core::rules::{PrincipalEntry, Role};
use cleanroom_proto::v1::ListQueriesRequest;
use tonic::Code;

use crate::util::{Harness, Setup, open_upload, root, sample_rules};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minted_token_authenticates_and_guesses_against_it_are_limited() {
    let minted = cleanroom_server::auth::mint_token().unwrap();
    let mut rules = sample_rules();
    rules.principals.push(PrincipalEntry {
        name: "Sakura Foods, minted".into(),
        role: Role::Partner,
        partner: Some("sakura_foods".into()),
        token_id: Some(minted.id.clone()),
        token_hash: Some(minted.hash.clone()),
        token_sha256: None,
        client_cert_sha256: None,
    });
    let h = Harness::start_with(Setup {
        rules,
        ..Default::default()
    })
    .await;
    let list = |token: String| {
        let conn = h.conn.clone();
        async move {
            conn.partner(&token)
                .unwrap()
                .list_queries(ListQueriesRequest {})
                .await
        }
    };
    list(minted.token.clone())
        .await
        .expect("the minted token authenticates");
    // The same id with other secrets: refused, then limited without being checked.
    let guess = format!("cr1.{}.{}", minted.id, "A".repeat(43));
    let mut codes = Vec::new();
    for _ in 0..12 {
        codes.push(list(guess.clone()).await.unwrap_err().code());
    }
    assert!(
        codes[..10].iter().all(|c| *c == Code::Unauthenticated),
        "{codes:?}"
    );
    assert_eq!(codes[11], Code::ResourceExhausted, "{codes:?}");
    // The holder of the real token, already verified, is not locked out by the guesser.
    list(minted.token.clone())
        .await
        .expect("a verified token still works");
    h.stop().await;
}

#[test]
fn serve_refuses_the_published_demo_tokens_unless_told_it_is_a_demo() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_cleanroom"))
        .current_dir(root())
        .args(["serve", "--config", "config/cleanroom.example.toml"])
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("CLEANROOM_MASTER_SECRET", "00".repeat(32))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "serve started with the demo tokens"
    );
    assert!(
        stderr.contains("demo token") && stderr.contains("cleanroom token new"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("audit.jsonl").exists(),
        "nothing was written before the refusal"
    );
}

#[test]
fn token_new_prints_a_token_once_and_a_rules_entry_without_it() {
    let output = Command::new(env!("CARGO_BIN_EXE_cleanroom"))
        .args([
            "token",
            "new",
            "--role",
            "partner",
            "--partner",
            "kumo_denki",
        ])
        .args(["--name", "Kumo Denki research"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let out = String::from_utf8_lossy(&output.stdout);
    let token = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("cr1."))
        .expect("the token is printed");
    let entry = &out[out.find("[[principals]]").unwrap()..];
    let secret = token.rsplit('.').next().unwrap();
    assert!(secret.len() >= 43, "256 bits of secret, base64url");
    assert!(!entry.contains(secret), "the rules entry holds no secret");
    let parsed: toml::Value = toml::from_str(entry).unwrap();
    let p = &parsed["principals"][0];
    assert_eq!(p["partner"].as_str(), Some("kumo_denki"));
    assert!(p["token_hash"].as_str().unwrap().starts_with("$argon2id$"));
    assert!(token.contains(p["token_id"].as_str().unwrap()));

    let refused = Command::new(env!("CARGO_BIN_EXE_cleanroom"))
        .args(["token", "new", "--role", "partner", "--name", "x"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--partner"));
}

/// Authenticate first, then audit (issue 9, item 3): calls without valid credentials, carrying
/// megabytes of caller text and naming a real partner, leave the trail as it was; an
/// authenticated reviewer's filter text reaches the trail bounded and as safe characters only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_calls_write_nothing_and_caller_text_is_bounded() {
    use cleanroom_proto::v1::{ListAuditRequest, RunQueryRequest};
    let h = Harness::start().await;
    let trail = h.data_dir.path().join("audit.jsonl");
    let size = || std::fs::metadata(&trail).unwrap().len();
    let before = size();
    let big = "x".repeat(2 * 1024 * 1024);
    for token in ["not-a-token", "cr1.0000000000000000.guess"] {
        let status = h
            .conn
            .partner(token)
            .unwrap()
            .run_query(RunQueryRequest {
                query_id: big.clone(),
                params: Default::default(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        let status = h
            .conn
            .legal(token)
            .unwrap()
            .list_audit(ListAuditRequest {
                partner: "sakura_foods".into(),
                query_id: big.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    assert_eq!(
        size(),
        before,
        "nothing was written for unauthenticated calls"
    );
    assert_eq!(h.app.unauthenticated_calls(), 4, "each one was counted");

    h.legal()
        .list_audit(ListAuditRequest {
            partner: format!("sakura_foods\n{{\"forged\": true}}{big}"),
            ..Default::default()
        })
        .await
        .expect("a reviewer may read the trail");
    let grown = size() - before;
    assert!(grown < 4096, "one bounded record, {grown} bytes");
    let text = std::fs::read_to_string(&trail).unwrap();
    let last = text.lines().last().unwrap();
    let record: serde_json::Value = serde_json::from_str(last).unwrap();
    let partner = record["partner"].as_str().unwrap();
    assert!(
        partner.len() <= 64
            && partner
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)),
        "{partner}"
    );
    h.stop().await;
}

/// Issue 9, item 3: per-principal rate limits, with the retry time. One principal's flood does
/// not touch another's calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_principal_has_its_own_rate_limit() {
    let mut rules = sample_rules();
    rules.limits.calls_per_minute = 30;
    let h = Harness::start_with(Setup {
        rules,
        ..Default::default()
    })
    .await;
    let sakura = h.partner("sakura_foods");
    let mut answered = 0;
    let refused = loop {
        match sakura.clone().list_queries(ListQueriesRequest {}).await {
            Ok(_) => answered += 1,
            Err(status) => break status,
        }
        assert!(answered <= 30, "the limit never applied");
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("retry in"), "{refused:?}");
    assert!(answered < 30, "the upload counted too: {answered}");
    h.partner("kumo_denki")
        .list_queries(ListQueriesRequest {})
        .await
        .expect("another principal is not limited by Sakura's calls");
    h.stop().await;
}

/// Issue 9, item 5 (streams): a stream that sends its header and then stalls is cut once the
/// call's time limit passes, instead of holding the service's resources open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_stream_is_cut_at_the_call_time_limit() {
    let mut rules = sample_rules();
    rules.limits.call_timeout_seconds = 2;
    let h = Harness::start_with(Setup {
        rules,
        load_sample: false,
        approve: false,
        ..Default::default()
    })
    .await;
    let (tx, stalled) = open_upload().await;
    // The outer limit only keeps a broken build from hanging the suite; the service's own cut
    // comes first.
    let status = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        h.partner("sakura_foods").upload_list(stalled),
    )
    .await
    .expect("the service ends the call")
    .unwrap_err();
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
    drop(tx);
    h.stop().await;
}

/// Issue 9, item 3: each principal has its own limit of calls in flight, over all its
/// connections. A stalled stream of Sakura's holds its one place: Sakura's next call is refused
/// with RESOURCE_EXHAUSTED while Kumo's goes through, and the place returns when the stream ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_principal_has_its_own_calls_in_flight() {
    let mut rules = sample_rules();
    rules.limits.concurrent_calls_per_principal = 1;
    let h = Harness::start_with(Setup {
        rules,
        ..Default::default()
    })
    .await;
    let (tx, stalled) = open_upload().await;
    let mut uploader = h.partner("sakura_foods");
    let upload = tokio::spawn(async move { uploader.upload_list(stalled).await });
    // Sakura's own calls wait until the upload holds the place: one of them in flight when
    // the upload arrives would take the place first, and the upload would be the call refused
    // (this raced on a loaded machine).
    let mut waited = 0;
    while h.app.calls_in_flight("Sakura Foods data team") == 0 {
        assert!(
            !upload.is_finished(),
            "the upload ended: {:?}",
            upload.await
        );
        assert!(waited < 1200, "the upload never reached the service");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        waited += 1;
    }
    let list = || async {
        h.partner("sakura_foods")
            .list_queries(ListQueriesRequest {})
            .await
    };
    let refused = list()
        .await
        .expect_err("the stalled stream's place is held");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(h.app.limited_calls(), 1, "counted as limited, not audited");
    assert_eq!(h.app.unauthenticated_calls(), 0);
    assert!(refused.message().contains("in flight"), "{refused:?}");
    h.partner("kumo_denki")
        .list_queries(ListQueriesRequest {})
        .await
        .expect("another principal is not held up");
    drop(tx);
    let _ = upload.await.unwrap();
    list()
        .await
        .expect("the place is free once the stream ended");
    h.stop().await;
}
