//! The metrics endpoint on the review page's port: the series move with the calls made (a fresh
//! answer, the same question stored, refusals, an upload), only the legal and analyst roles read
//! them, and no member id, e-mail, token or parameter value the test used ever appears in them.

use std::collections::BTreeMap;

use cleanroom_client::upload_list;
use cleanroom_proto::v1::ListQueriesRequest;
use cleanroom_server::metrics::METHODS;
use tonic::Code;

use crate::util::{Harness, list_of, year};

/// One HTTP/1.1 GET on the review page's port: status, headers (lower-cased names) and body.
pub async fn get(
    addr: std::net::SocketAddr,
    path: &str,
    token: Option<&str>,
) -> (u16, BTreeMap<String, String>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let authorization = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{authorization}Connection: close\r\n\r\n"
    );
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8(response).expect("the response is text");
    let (head, body) = text.split_once("\r\n\r\n").expect("a whole response");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

/// A scrape with `token`, which must succeed.
async fn scrape(h: &Harness, token: &str) -> String {
    let (status, headers, body) = get(h.review_addr(), "/metrics", Some(token)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        headers.get("content-type").map(String::as_str),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    body
}

/// The value of one series (`name{labels}` exactly as the scrape writes it), 0 if absent.
fn value(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Every `key="value"` label pair of the scrape.
fn labels(scrape: &str) -> Vec<(String, String)> {
    scrape
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| Some(line.split_once('{')?.1.split_once('}')?.0))
        .flat_map(|pairs| pairs.split("\","))
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            Some((key.to_string(), value.trim_matches('"').to_string()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_calls_answers_refusals_and_uploads_for_reviewers_only() {
    let h = Harness::start().await;
    let before = scrape(&h, "demo-legal-token").await;
    let query = "category_buyers_by_age_band";

    let fresh = h.run("sakura_foods", query, &year()).await.unwrap();
    assert!(fresh.protection.unwrap().fresh);
    let stored = h.run("sakura_foods", query, &year()).await.unwrap();
    assert!(!stored.protection.unwrap().fresh);
    let hidden = h.run("sakura_foods", "no_such_query", &year()).await;
    assert_eq!(hidden.unwrap_err().code(), Code::NotFound);
    let stranger = h
        .conn
        .partner("not-a-token-of-anyone")
        .unwrap()
        .list_queries(ListQueriesRequest {})
        .await;
    assert_eq!(stranger.unwrap_err().code(), Code::Unauthenticated);
    let members = ["M0000001", "M0000002", "M0000003"];
    let list = list_of(&members, "gold");
    let (emails, phones): (Vec<String>, Vec<String>) = list
        .iter()
        .map(|r| (r.email.clone(), r.phone.clone()))
        .unzip();
    upload_list(&mut h.partner("sakura_foods"), false, list)
        .await
        .unwrap();

    let after = scrape(&h, "demo-legal-token").await;
    let moved = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(
        moved(r#"cleanroom_calls_total{method="RunQuery",code="OK"}"#),
        2.0
    );
    assert_eq!(
        moved(r#"cleanroom_calls_total{method="RunQuery",code="NOT_FOUND"}"#),
        1.0
    );
    assert_eq!(
        moved(r#"cleanroom_calls_total{method="UploadList",code="OK"}"#),
        1.0
    );
    assert_eq!(
        moved(r#"cleanroom_refused_calls_total{reason="not_visible"}"#),
        1.0
    );
    assert_eq!(
        moved(r#"cleanroom_refused_calls_total{reason="unauthenticated"}"#),
        1.0
    );
    assert_eq!(
        moved(r#"cleanroom_answer_seconds_count{kind="fresh"}"#),
        1.0
    );
    assert_eq!(
        moved(r#"cleanroom_answer_seconds_count{kind="stored"}"#),
        1.0
    );
    assert!(moved(r#"cleanroom_stream_bytes_total{method="UploadList"}"#) > 0.0);
    assert_eq!(
        moved(r#"cleanroom_ingest_rows_total{table="partner_lists"}"#),
        members.len() as f64
    );
    let budget = r#"cleanroom_privacy_budget_used{partner="sakura_foods"}"#;
    assert_eq!(value(&before, budget), 0.0, "nothing was asked before");
    assert!(value(&after, budget) > 0.0 && value(&after, budget) < 1.0);
    assert_eq!(
        value(
            &after,
            r#"cleanroom_privacy_answers_used{partner="sakura_foods"}"#
        ),
        1.0,
        "the stored answer cost nothing"
    );
    assert_eq!(
        value(
            &after,
            r#"cleanroom_privacy_budget_used{partner="kumo_denki"}"#
        ),
        0.0
    );
    assert_eq!(value(&after, "cleanroom_queries_waiting"), 0.0);
    assert_eq!(value(&after, "cleanroom_queries_running"), 0.0);
    assert_eq!(
        value(&after, "cleanroom_query_memory_limit_bytes"),
        (1u64 << 30) as f64
    );
    assert!(after.contains("cleanroom_query_memory_bytes "));

    // Nothing that could name a member, and no credential or parameter value, is in a series;
    // every label value comes from a fixed set.
    let secrets = members
        .iter()
        .map(|m| m.to_string())
        .chain(emails)
        .chain(phones.into_iter().filter(|p| !p.is_empty()))
        .chain(
            [
                "demo-legal-token",
                "demo-sakura-token",
                "demo-analyst-token",
                "not-a-token-of-anyone",
                "2025-11-01",
                "2026-11-01",
                "no_such_query",
                query,
            ]
            .map(String::from),
        );
    for secret in secrets {
        assert!(!after.contains(&secret), "the scrape names {secret:?}");
    }
    let partners: Vec<&String> = h.rules.partners.keys().collect();
    for (key, value) in labels(&after) {
        let fixed = match key.as_str() {
            "method" => value == "other" || METHODS.contains(&value.as_str()),
            "partner" => partners.contains(&&value),
            "le" => value == "+Inf" || value.parse::<f64>().is_ok(),
            "code" | "reason" | "kind" | "table" => {
                value.chars().all(|c| c.is_ascii_alphabetic() || c == '_')
            }
            _ => false,
        };
        assert!(fixed, "label {key}={value:?} is not from a fixed set");
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_for_legal_and_analysts_not_partners_or_strangers() {
    let h = Harness::start().await;
    scrape(&h, "demo-legal-token").await;
    scrape(&h, "demo-analyst-token").await;
    let page = h.review_addr();
    let (status, _, body) = get(page, "/metrics", Some("demo-sakura-token")).await;
    assert_eq!(status, 403, "{body}");
    assert!(!body.contains("cleanroom_"), "{body}");
    let (status, _, body) = get(page, "/metrics", None).await;
    assert_eq!(status, 401, "{body}");
    let (status, _, _) = get(page, "/metrics", Some("not-a-token-of-anyone")).await;
    assert_eq!(status, 401);
    h.stop().await;
}
