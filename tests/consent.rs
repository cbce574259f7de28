//! Consent evaluated at query time, checked over gRPC: a withdrawal counts at the next query, a
//! grant of an old notice version or an expired grant never counts, and a current grant does.

use cleanroom_client::ingest_consent;
use cleanroom_proto::v1::{ConsentRecord, IngestHeader, RunQueryResponse};

use crate::truth::Truth;
use crate::util::{Harness, as_of, cells};

fn event(
    member: &str,
    version: u32,
    action: &str,
    minutes_ago: i64,
    expires_at: &str,
) -> ConsentRecord {
    ConsentRecord {
        member_id: member.into(),
        purpose: "product_insight".into(),
        notice_version: version,
        action: action.into(),
        at: (as_of() - chrono::Duration::minutes(minutes_ago)).to_rfc3339(),
        source: "test".into(),
        expires_at: expires_at.into(),
    }
}

async fn overlap(h: &Harness) -> RunQueryResponse {
    h.run("sakura_foods", "matched_overlap", &[]).await.unwrap()
}

fn count(response: &RunQueryResponse, attribute: &str) -> Option<i64> {
    cells(response, 1)
        .get(&vec![attribute.to_string()])
        .map(|m| m[0])
}

async fn ingest(h: &Harness, events: Vec<ConsentRecord>) -> String {
    ingest_consent(
        &mut h.analyst(),
        IngestHeader {
            source: "test".into(),
            strict: true,
        },
        events,
    )
    .await
    .unwrap()
    .consent_snapshot_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawal_counts_at_the_next_query() {
    let h = Harness::start().await;
    let truth = Truth::load();
    let eligible = truth.eligible(&h.rules, "sakura_foods", &[]);
    let before = overlap(&h).await;
    let bronze = count(&before, "bronze").expect("bronze is released on the sample");
    let member = eligible
        .iter()
        .find(|(_, a)| *a == "bronze")
        .map(|(m, _)| m.clone())
        .unwrap();

    let snapshot = ingest(&h, vec![event(&member, 3, "withdrawn", 1, "")]).await;
    let after = overlap(&h).await;
    assert_ne!(after.consent_snapshot_id, before.consent_snapshot_id);
    assert_eq!(
        after.consent_snapshot_id, snapshot,
        "the result names the snapshot it used"
    );
    assert_eq!(
        count(&after, "bronze"),
        Some(bronze - 1),
        "the withdrawn member no longer counts"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_notice_versions_and_expired_grants_never_count() {
    let h = Harness::start().await;
    let truth = Truth::load();
    let matched = truth.matched("sakura_foods");
    let eligible = truth.eligible(&h.rules, "sakura_foods", &[]);
    let outsider = matched
        .iter()
        .find(|(m, a)| *a == "bronze" && !eligible.contains_key(*m))
        .map(|(m, _)| m.clone())
        .expect("a matched bronze member without current consent");
    let counted = eligible
        .iter()
        .find(|(_, a)| *a == "bronze")
        .map(|(m, _)| m.clone())
        .unwrap();
    let base = count(&overlap(&h).await, "bronze").unwrap();

    // A fresh grant of an old notice: the outsider stays out, and the counted member's newer
    // old-notice grant replaces their current one, so they drop out.
    ingest(
        &h,
        vec![
            event(&outsider, 2, "granted", 5, ""),
            event(&counted, 2, "granted", 5, ""),
        ],
    )
    .await;
    assert_eq!(count(&overlap(&h).await, "bronze"), Some(base - 1));

    // A current grant that has already expired counts as no grant.
    let expired = (as_of() - chrono::Duration::minutes(1)).to_rfc3339();
    ingest(&h, vec![event(&outsider, 3, "granted", 4, &expired)]).await;
    assert_eq!(count(&overlap(&h).await, "bronze"), Some(base - 1));

    // A current, unexpired grant does count: the test can see a member come in.
    ingest(
        &h,
        vec![
            event(&outsider, 3, "granted", 3, ""),
            event(&counted, 3, "granted", 3, ""),
        ],
    )
    .await;
    assert_eq!(count(&overlap(&h).await, "bronze"), Some(base + 1));

    // Events dated after "now" are not in force yet.
    let future = ConsentRecord {
        at: (as_of() + chrono::Duration::days(1)).to_rfc3339(),
        ..event(&counted, 3, "withdrawn", 0, "")
    };
    ingest(&h, vec![future]).await;
    assert_eq!(count(&overlap(&h).await, "bronze"), Some(base + 1));
    h.stop().await;
}
