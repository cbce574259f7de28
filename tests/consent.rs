//! Consent evaluated at query time, checked over gRPC against the ground truth (THREATS 10): a
//! withdrawal counts at the next query, a grant of an old notice version or an expired grant
//! never counts, and a current grant does.

use cleanroom_client::ingest_consent;
use cleanroom_proto::v1::{ConsentRecord, IngestHeader, RunQueryResponse};

use crate::truth::Truth;
use crate::util::{Harness, Setup, as_of, cells, precise_rules};

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

/// How far two noisy counts of the same row may be apart and still be called equal: both carry
/// discrete Gaussian noise (sd about 2 under the precise rules), and the groups that move are
/// 40 members, far beyond it.
const TOLERANCE: i64 = 12;

fn assert_near(got: Option<i64>, want: i64) {
    let got = got.expect("the row is released");
    assert!(
        (got - want).abs() <= TOLERANCE,
        "got {got}, expected about {want}"
    );
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
            ..Default::default()
        },
        events,
    )
    .await
    .unwrap()
    .consent_snapshot_id
}

/// How many members each test moves at once. The guard answers a row whose member set moved by
/// fewer than k as it did before (a single withdrawal must not be visible to a partner), so the
/// tests move a group of k + 2 members and expect the count to move by exactly that much.
const GROUP: usize = 40;

/// A service whose answers carry no noise, so counts can be compared exactly.
async fn exact() -> Harness {
    Harness::start_with(Setup {
        rules: precise_rules(),
        ..Setup::default()
    })
    .await
}

fn bronze<'a>(members: impl Iterator<Item = (&'a String, &'a String)>) -> Vec<String> {
    let mut ids: Vec<String> = members
        .filter(|(_, a)| *a == "bronze")
        .map(|(m, _)| m.clone())
        .collect();
    ids.sort();
    ids.truncate(GROUP);
    assert_eq!(ids.len(), GROUP, "the sample has enough bronze members");
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawal_counts_at_the_next_query() {
    let h = exact().await;
    let truth = Truth::load();
    let eligible = truth.eligible(&h.rules, "sakura_foods", &[]);
    let before = overlap(&h).await;
    let base = count(&before, "bronze").expect("bronze is released on the sample");
    let group = bronze(eligible.iter());

    let events = group
        .iter()
        .map(|m| event(m, 3, "withdrawn", 1, ""))
        .collect();
    let snapshot = ingest(&h, events).await;
    let after = overlap(&h).await;
    assert_ne!(after.consent_snapshot_id, before.consent_snapshot_id);
    assert_eq!(
        after.consent_snapshot_id, snapshot,
        "the result names the snapshot it used"
    );
    // The withdrawn members no longer count.
    assert_near(count(&after, "bronze"), base - GROUP as i64);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_notice_versions_and_expired_grants_never_count() {
    let h = exact().await;
    let truth = Truth::load();
    let matched = truth.matched("sakura_foods");
    let eligible = truth.eligible(&h.rules, "sakura_foods", &[]);
    let outsiders = bronze(matched.iter().filter(|(m, _)| !eligible.contains_key(*m)));
    let counted = bronze(eligible.iter());
    let base = count(&overlap(&h).await, "bronze").unwrap();
    let n = GROUP as i64;
    let events = |who: &[String], version, action: &str, minutes_ago, expires: &str| -> Vec<_> {
        who.iter()
            .map(|m| event(m, version, action, minutes_ago, expires))
            .collect()
    };

    // Fresh grants of an old notice: the outsiders stay out, and the counted members' newer
    // old-notice grants replace their current ones, so they drop out.
    let mut old_notice = events(&outsiders, 2, "granted", 5, "");
    old_notice.extend(events(&counted, 2, "granted", 5, ""));
    ingest(&h, old_notice).await;
    assert_near(count(&overlap(&h).await, "bronze"), base - n);

    // Current grants that have already expired count as no grant.
    let expired = (as_of() - chrono::Duration::minutes(1)).to_rfc3339();
    ingest(&h, events(&outsiders, 3, "granted", 4, &expired)).await;
    assert_near(count(&overlap(&h).await, "bronze"), base - n);

    // Current, unexpired grants do count: the test can see members come in.
    let mut current = events(&outsiders, 3, "granted", 3, "");
    current.extend(events(&counted, 3, "granted", 3, ""));
    ingest(&h, current).await;
    assert_near(count(&overlap(&h).await, "bronze"), base + n);

    // Events dated after "now" are not in force yet.
    let future: Vec<ConsentRecord> = events(&counted, 3, "withdrawn", 0, "")
        .into_iter()
        .map(|e| ConsentRecord {
            at: (as_of() + chrono::Duration::days(1)).to_rfc3339(),
            ..e
        })
        .collect();
    ingest(&h, future).await;
    assert_near(count(&overlap(&h).await, "bronze"), base + n);
    h.stop().await;
}
