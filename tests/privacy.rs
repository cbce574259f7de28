//! The guard against a partner that knows k − 1 members of the cell it targets (THREATS 1–7 and
//! 13–15, and the findings of issue 8), played over gRPC against the running service.
//!
//! The target is the sample's M0004001 (的場 花子: consenting, 30–39, bought pet food once in the
//! week of 2026-06-08, on no partner's list). Every answer is differentially private, so no test
//! can ask for identical answers with and without her; instead each statistical test runs the
//! attack many times, half with her and half without (each trial a new list version, so a fresh,
//! charged answer with fresh noise), and checks the attacker's hit rates against the bound that
//! (ε, δ)-DP puts on any decision rule:
//!
//!   TPR ≤ e^ε · FPR + δ   and   1 − FPR ≤ e^ε · (1 − TPR) + δ,
//!
//! with ε and δ the per-answer guarantee the service reports, plus three standard deviations of
//! sampling error. Each test also asserts the attack is real: the exact counts behind it differ
//! by the target, so without the noise the same decision rule would be right every time.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use cleanroom_client::upload_list;
use cleanroom_core::rules::Rules;
use cleanroom_proto::v1::{CustomerRecord, ParamValue, RunQueryResponse};
use tonic::Code;

use crate::truth::Truth;
use crate::util::{
    Harness, Setup, Template, as_of, cells, date, files_of, list_of, relaxed_lists, sample_rules,
    setup_with_templates, text,
};

/// The sample's target member.
const TARGET: &str = "M0004001";

fn local(day: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(&format!("{day}T00:00:00+09:00"))
        .unwrap()
        .into()
}

/// What the attacker knows: members it can name who consent to Sakura's purpose, and everyone's
/// purchases (its staff, its loyalty data, ...).
struct Knowledge {
    truth: Truth,
    consenting: Vec<String>,
}

impl Knowledge {
    fn load() -> Self {
        let truth = Truth::load();
        let rules = sample_rules();
        let consented = truth.consented(&rules, "product_insight", as_of(), &[]);
        let identifiable = truth.identifiable();
        let mut consenting: Vec<String> = consented
            .into_iter()
            .filter(|m| identifiable.contains(m) && m != TARGET)
            .collect();
        consenting.sort();
        Self { truth, consenting }
    }

    /// Members who bought in `category` in [start, end) (local dates).
    fn buyers(&self, category: &str, start: &str, end: &str) -> HashSet<String> {
        let (start, end) = (local(start), local(end));
        self.truth
            .purchases
            .iter()
            .filter(|p| p.category == category)
            .filter(|p| {
                let at: DateTime<Utc> = DateTime::parse_from_rfc3339(&p.purchased_at)
                    .unwrap()
                    .into();
                at >= start && at < end
            })
            .map(|p| p.member_id.clone())
            .collect()
    }

    /// `n` known members who bought pet food in the year, and `m` who never did.
    fn companions(&self, n: usize, m: usize) -> (Vec<String>, Vec<String>) {
        let pet = self.buyers("pet", "2025-11-03", "2026-11-02");
        let ever = self.buyers("pet", "2000-01-01", "2100-01-01");
        let buyers: Vec<String> = self
            .consenting
            .iter()
            .filter(|x| pet.contains(*x))
            .take(n)
            .cloned()
            .collect();
        let others: Vec<String> = self
            .consenting
            .iter()
            .filter(|x| !ever.contains(*x))
            .take(m)
            .cloned()
            .collect();
        assert_eq!((buyers.len(), others.len()), (n, m), "enough known members");
        (buyers, others)
    }
}

fn ids(members: &[String]) -> Vec<&str> {
    members.iter().map(String::as_str).collect()
}

/// Records naming nobody the retailer knows (reserved example domain).
fn fakes(n: usize, tag: &str) -> Vec<CustomerRecord> {
    (0..n)
        .map(|i| CustomerRecord {
            email: format!("nobody.{tag}.{i}@example.org"),
            attribute: "bronze".into(),
            ..Default::default()
        })
        .collect()
}

async fn upload(h: &Harness, records: Vec<CustomerRecord>) -> u32 {
    upload_list(&mut h.partner("sakura_foods"), false, records)
        .await
        .expect("upload accepted")
        .list_version
}

fn year() -> Vec<(&'static str, ParamValue)> {
    vec![("start", date("2025-11-03")), ("end", date("2026-11-02"))]
}

/// Rules for the statistical trials: a hundred fresh answers, each about (3, 1e-8)-DP on its own,
/// noise small enough that 100 known buyers clear the threshold.
fn trial_rules() -> Rules {
    let mut rules = relaxed_lists(sample_rules());
    for contract in rules.contracts.values_mut() {
        contract.protection.epsilon = 40.0;
        contract.protection.answers_per_period = 100;
    }
    rules
}

/// Hit counts of an attacker's decision rule over trials with and without the target.
#[derive(Debug, Default)]
struct Tally {
    with_target: usize,
    said_present_with: usize,
    without_target: usize,
    said_present_without: usize,
}

impl Tally {
    fn add(&mut self, present: bool, guess: bool) {
        if present {
            self.with_target += 1;
            self.said_present_with += usize::from(guess);
        } else {
            self.without_target += 1;
            self.said_present_without += usize::from(guess);
        }
    }

    /// Asserts the (ε, δ)-DP hypothesis-testing bound, with 3σ of sampling error on each rate.
    fn assert_within(&self, epsilon: f64, delta: f64, what: &str) {
        let tpr = self.said_present_with as f64 / self.with_target as f64;
        let fpr = self.said_present_without as f64 / self.without_target as f64;
        let slack = 3.0 * (0.25 / self.with_target as f64).sqrt()
            + 3.0 * (0.25 / self.without_target as f64).sqrt();
        let e = epsilon.exp();
        println!(
            "{what}: TPR {tpr:.3}, FPR {fpr:.3} over {}+{} trials; ε = {epsilon:.3}, slack {slack:.3}",
            self.with_target, self.without_target
        );
        assert!(
            tpr <= e * fpr + delta + slack,
            "{what}: TPR {tpr} FPR {fpr}"
        );
        assert!(
            1.0 - fpr <= e * (1.0 - tpr) + delta + slack,
            "{what}: TPR {tpr} FPR {fpr}"
        );
    }
}

/// The pet row of a by-category answer: (released, noisy buyers).
fn pet(response: &RunQueryResponse) -> Option<i64> {
    cells(response, 1)
        .get(&vec!["pet".to_string()])
        .map(|v| v[0])
}

/// THREATS 1, 2 and 13 (findings 1–3): list padding and list differencing with k − 1 known pet
/// buyers next to the target, padded past the minimum audience with known non-buyers. Two
/// decision rules are played: "the pet row is released" (the boundary of k) and, with 60 known
/// buyers so the row is always released, "the count is above 100" (one member's difference).
/// Each trial uploads a new list version, so each answer is fresh and charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn padding_and_differencing_with_k_minus_one_companions_stay_within_the_dp_bound() {
    let known = Knowledge::load();
    let h = Harness::start_with(Setup {
        rules: trial_rules(),
        ..Default::default()
    })
    .await;
    let k = 10;
    let bought: HashSet<String> = known.buyers("pet", "2025-11-03", "2026-11-02");
    assert!(
        bought.contains(TARGET),
        "the target bought pet food in the window"
    );
    let (many, padding) = known.companions(100, 220);
    let few = many[..k - 1].to_vec();
    let mut boundary = Tally::default();
    let mut one_member = Tally::default();
    let (mut epsilon, mut delta) = (0.0, 0.0);
    let boundary_trials = 16;
    for trial in 0..boundary_trials + 24 {
        let present = trial % 2 == 0;
        let companions = if trial < boundary_trials { &few } else { &many };
        let mut members: Vec<String> = companions.clone();
        members.extend(padding.iter().cloned());
        if present {
            members.push(TARGET.into());
        }
        let mut records = list_of(&ids(&members), "gold");
        // A record naming nobody keeps every list version distinct, so every answer is fresh.
        records.extend(fakes(1, &format!("trial{trial}")));
        upload(&h, records).await;
        let answer = h
            .run("sakura_foods", "repeat_purchase_rate", &year())
            .await
            .expect("answered");
        let protection = answer.protection.clone().unwrap();
        assert!(
            protection.fresh && protection.epsilon_spent > 0.0,
            "charged"
        );
        (epsilon, delta) = (protection.epsilon_spent, protection.delta_spent);
        let row = pet(&answer);
        if trial < boundary_trials {
            boundary.add(present, row.is_some());
        } else {
            let row = row.expect("100 buyers clear the threshold");
            one_member.add(present, row > 100);
        }
    }
    boundary.assert_within(epsilon, delta, "k − 1 companions, row released?");
    one_member.assert_within(epsilon, delta, "100 companions, count above 100?");
    h.stop().await;
}

/// THREATS 14 (finding 4): the same member set asked over many windows. Every window is a fresh
/// answer and is charged; the period's budget ends the series, and answers already paid for are
/// still served, free and identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fresh_window_is_charged_until_the_budget_ends() {
    let h = Harness::start().await;
    let budget = h.rules.contracts["ctr-sakura-2026"]
        .protection
        .answers_per_period;
    let week = |w: i64| {
        let start = local("2025-11-03") + chrono::Duration::weeks(w);
        let end = start + chrono::Duration::weeks(5);
        let day = |t: DateTime<Utc>| {
            t.with_timezone(&chrono::FixedOffset::east_opt(9 * 3600).unwrap())
                .date_naive()
                .to_string()
        };
        vec![("start", date(&day(start))), ("end", date(&day(end)))]
    };
    let mut first = None;
    for w in 0..i64::from(budget) {
        let answer = h
            .run("sakura_foods", "repeat_purchase_rate", &week(w))
            .await
            .expect("within budget");
        let p = answer.protection.clone().unwrap();
        assert!(p.fresh && p.epsilon_spent > 0.0, "window {w} is charged");
        assert_eq!(p.answers_used, w as u32 + 1);
        first.get_or_insert(answer);
    }
    let refused = h
        .run(
            "sakura_foods",
            "repeat_purchase_rate",
            &week(i64::from(budget)),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("budget returns from"),
        "{refused:?}"
    );
    let again = h
        .run("sakura_foods", "repeat_purchase_rate", &week(0))
        .await
        .expect("a paid answer is served after the budget is spent");
    let first = first.unwrap();
    assert_eq!(again.arrow_ipc, first.arrow_ipc);
    assert_eq!(again.rows, first.rows);
    let p = again.protection.unwrap();
    assert!(!p.fresh && p.epsilon_spent == 0.0 && p.rho_spent == 0.0);
    h.stop().await;
}

/// THREATS 5 (finding 5): a question asked again gets its own earlier answer, byte for byte,
/// whatever was asked in between and across a restart, at no cost. Semantically equal variants
/// (dates that snap to the same month) are the same question.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_question_asked_again_gets_its_own_earlier_answer() {
    let h = Harness::start().await;
    let window = |start: &str, end: &str| {
        vec![
            ("brand", text("Sakura Senbei")),
            ("start", date(start)),
            ("end", date(end)),
        ]
    };
    let query = "brand_buyers_by_prefecture";
    let w3 = h
        .run("sakura_foods", query, &window("2025-11-01", "2026-11-01"))
        .await
        .unwrap();
    let w2 = h
        .run("sakura_foods", query, &window("2025-12-01", "2026-11-01"))
        .await
        .unwrap();
    assert!(w2.protection.as_ref().unwrap().fresh);
    let w3_again = h
        .run("sakura_foods", query, &window("2025-11-05", "2026-10-20"))
        .await
        .unwrap();
    assert_eq!(
        w3_again.arrow_ipc, w3.arrow_ipc,
        "snapped to the same months: same answer"
    );
    assert!(!w3_again.protection.as_ref().unwrap().fresh);
    let h = h.restart().await;
    let after = h
        .run("sakura_foods", query, &window("2025-11-01", "2026-11-01"))
        .await
        .unwrap();
    assert_eq!(
        after.arrow_ipc, w3.arrow_ipc,
        "the store survives a restart"
    );
    assert_eq!(after.rows, w3.rows);
    assert_eq!(after.protection.as_ref().unwrap().epsilon_spent, 0.0);
    let w2_after = h
        .run("sakura_foods", query, &window("2025-12-01", "2026-11-01"))
        .await
        .unwrap();
    assert_eq!(w2_after.arrow_ipc, w2.arrow_ipc);
    h.stop().await;
}

/// Finding 6 and THREATS 15: the audience check is charged like an answer, its refusal repeats
/// free and identical, and nothing at upload time depends on who matched. A list of the target
/// plus k − 1 known members, and the same list without her, are both accepted and both answer as
/// their own version; whether an answer is fresh depends only on the version, never on her.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audience_checks_and_uploads_decide_nothing_for_free() {
    let known = Knowledge::load();
    let h = Harness::start_with(Setup {
        rules: relaxed_lists(sample_rules()),
        ..Default::default()
    })
    .await;
    let (buyers, _) = known.companions(9, 0);
    let mut with_target = buyers.clone();
    with_target.push(TARGET.into());
    for (list, tag) in [(buyers.clone(), "without"), (with_target, "with")] {
        let version = upload(&h, list_of(&ids(&list), "gold")).await;
        let refused = h
            .run("sakura_foods", "matched_overlap", &[])
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            Code::FailedPrecondition,
            "{tag}: {refused:?}"
        );
        assert!(refused.message().contains("minimum"), "{tag}: {refused:?}");
        let again = h
            .run("sakura_foods", "matched_overlap", &[])
            .await
            .unwrap_err();
        assert_eq!(
            again.message(),
            refused.message(),
            "{tag}: the refusal repeats"
        );
        let overlap_after = h
            .run(
                "sakura_foods",
                "brand_buyers_by_prefecture",
                &[
                    ("brand", text("Sakura Senbei")),
                    ("start", date("2025-11-01")),
                    ("end", date("2026-11-01")),
                ],
            )
            .await
            .unwrap_err();
        assert_eq!(overlap_after.code(), Code::FailedPrecondition);
        assert!(version > 1, "{tag}: accepted as a new version");
    }
    // The sample list answers as itself afterwards: the latest version, never an earlier one.
    let sample = cleanroom_client::read_list(
        &crate::util::sample_dir().join("partner_lists/sakura_foods.csv"),
    )
    .unwrap();
    let version = upload(&h, sample).await;
    let answer = h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
    assert_eq!(answer.list_version, version);
    let p = answer.protection.unwrap();
    // Two refusals and this answer were charged: the refusals were fresh questions too.
    assert_eq!(p.answers_used, 5, "{p:?}");
    h.stop().await;
}

/// THREATS 6: a purchase that lands after an answer makes the next answer a new one (new data
/// version): it is charged, never a free repeat that could differ only through her.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_data_is_a_new_charged_answer() {
    let h = Harness::start().await;
    let before = h
        .run("sakura_foods", "repeat_purchase_rate", &year())
        .await
        .unwrap();
    cleanroom_client::ingest_purchases(
        &mut h.analyst(),
        cleanroom_proto::v1::IngestHeader::default(),
        vec![cleanroom_proto::v1::PurchaseRecord {
            member_id: TARGET.into(),
            purchased_at: "2026-10-20T10:00:00+09:00".into(),
            sku: "PET-1".into(),
            brand: "Other".into(),
            manufacturer: "Other".into(),
            category: "pet".into(),
            quantity: 1,
            amount: 500,
        }],
    )
    .await
    .expect("purchase ingested");
    let after = h
        .run("sakura_foods", "repeat_purchase_rate", &year())
        .await
        .unwrap();
    let (b, a) = (before.protection.unwrap(), after.protection.unwrap());
    assert!(
        b.fresh && a.fresh,
        "the new data version is a fresh, charged answer"
    );
    assert_eq!(a.answers_used, b.answers_used + 1);
    h.stop().await;
}

/// Finding 6 at its boundary: a list of exactly `min_audience` − 1 known consenting members, with
/// the target or with a record naming nobody. Without noise "answered" would say whether she is
/// on the retailer's side of the list every time (TPR 1, FPR 0). The audience check is its own
/// discrete Gaussian mechanism with its share of the answer's ρ, so the attacker's rates must lie
/// within the (ε, δ) that share alone gives, derived here from the configuration (the whole
/// answer's bound, which the response states, is looser still).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audience_check_at_its_minimum_stays_within_its_own_dp_bound() {
    let known = Knowledge::load();
    let rules = trial_rules();
    let protection = &rules.contracts["ctr-sakura-2026"].protection;
    let minimum = protection.min_audience as usize;
    let guarantee = protection.guarantee().unwrap();
    let rho = guarantee.split(0).audience;
    let delta = guarantee.answer_delta;
    let epsilon = cleanroom_core::accounting::cdp_epsilon(rho, delta);
    let h = Harness::start_with(Setup {
        rules,
        ..Default::default()
    })
    .await;
    let companions = &known.consenting[..minimum - 1];
    let mut tally = Tally::default();
    for trial in 0..40 {
        let present = trial % 2 == 0;
        let mut records = list_of(&ids(companions), "gold");
        if present {
            records.extend(list_of(&[TARGET], "gold"));
        }
        records.extend(fakes(1, &format!("audience{trial}")));
        upload(&h, records).await;
        let answered = match h.run("sakura_foods", "matched_overlap", &[]).await {
            Ok(answer) => {
                assert!(answer.protection.unwrap().fresh, "trial {trial} is charged");
                true
            }
            Err(refused) => {
                assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
                assert!(refused.message().contains("minimum"), "{refused:?}");
                false
            }
        };
        tally.add(present, answered);
    }
    tally.assert_within(epsilon, delta, "minimum audience − 1 companions, answered?");
    h.stop().await;
}

/// The answer store (finding 5, THREATS 5): within one retailer day a member's consent can lapse
/// (a grant's expiry, or its validity running out) without any ingest, so the data an answer key
/// names can change under it. A repeat must then be the stored answer, free and identical: were
/// it recomputed, its keyed noise would be the same and the difference would be exactly that one
/// member, for nothing. The test finds such an instant in the sample (Kumo Denki's purpose has
/// grants valid for 730 days, which lapse at any time of day; fixed expiries fall at local
/// midnight, where the day in the key changes anyway), asks just before it, and asks again just
/// after, the same day.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_day_repeat_is_the_stored_answer_even_when_a_consent_lapses_in_between() {
    let truth = Truth::load();
    let rules = sample_rules();
    let purpose = &rules.contracts["ctr-kumo-2026"].purpose;
    let valid_days = rules.purposes[purpose.as_str()].grant_valid_days;
    let matched = truth.matched("kumo_denki");
    let audience = |at: DateTime<Utc>| {
        let consented = truth.consented(&rules, purpose, at, &[]);
        matched.keys().filter(|m| consented.contains(*m)).count()
    };
    let jst = chrono::FixedOffset::east_opt(9 * 3600).unwrap();
    let time = |s: &str| -> DateTime<Utc> { DateTime::parse_from_rfc3339(s).unwrap().into() };
    let mut lapses: Vec<DateTime<Utc>> = truth
        .consent
        .iter()
        .filter(|e| {
            &e.purpose == purpose && e.action == "granted" && matched.contains_key(&e.member_id)
        })
        .flat_map(|e| {
            let expiry = (!e.expires_at.is_empty()).then(|| time(&e.expires_at));
            let validity = valid_days.map(|d| time(&e.at) + chrono::Duration::days(i64::from(d)));
            expiry.into_iter().chain(validity)
        })
        .filter(|t| *t > as_of())
        .collect();
    lapses.sort();
    let minute = chrono::Duration::minutes(1);
    let lapse = lapses
        .into_iter()
        .find(|t| {
            let (before, after) = (*t - minute, *t + minute);
            before.with_timezone(&jst).date_naive() == after.with_timezone(&jst).date_naive()
                && audience(before) != audience(after)
        })
        .expect("the sample has a consent that lapses within a day");
    let (before, after) = (lapse - minute, lapse + minute);

    let h = Harness::start().await.restart_at(before).await;
    let first = h.run("kumo_denki", "matched_overlap", &[]).await.unwrap();
    assert!(first.protection.as_ref().unwrap().fresh);
    let h = h.restart_at(after).await;
    let again = h.run("kumo_denki", "matched_overlap", &[]).await.unwrap();
    println!(
        "consent lapse at {lapse}: audience {} -> {}",
        audience(before),
        audience(after)
    );
    assert_eq!(
        again.arrow_ipc, first.arrow_ipc,
        "the stored answer, not a recomputation"
    );
    assert_eq!(again.rows, first.rows);
    assert!(!again.protection.unwrap().fresh, "and free");
    h.stop().await;
}

/// Contribution bounding: one member who spends fifty million yen in a category moves that
/// cell's released sum by at most the metric's bound (plus the two answers' noise), not by what
/// she spent. Precise rules keep the noise far below the amount, so without the clamp the jump
/// would show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_big_spender_moves_a_sum_by_at_most_the_metric_bound() {
    let truth = Truth::load();
    let h = Harness::start_with(Setup {
        rules: crate::util::precise_rules(),
        ..Default::default()
    })
    .await;
    let query = "category_buyers_by_age_band";
    let window = || vec![("start", date("2025-11-01")), ("end", date("2026-11-01"))];
    let before = h.run("sakura_foods", query, &window()).await.unwrap();
    let eligible = truth.eligible(&h.rules, "sakura_foods", &[]);
    let mut candidates: Vec<&String> = eligible.keys().collect();
    candidates.sort();
    let spender = candidates[0].clone();
    let cell = vec![
        truth.members[&spender].age_band.clone(),
        "snacks".to_string(),
    ];
    let released_before = cells(&before, 2).get(&cell).map(|v| v[1]);
    let spent: i64 = 50_000_000;
    cleanroom_client::ingest_purchases(
        &mut h.analyst(),
        cleanroom_proto::v1::IngestHeader::default(),
        vec![cleanroom_proto::v1::PurchaseRecord {
            member_id: spender.clone(),
            purchased_at: "2026-10-20T10:00:00+09:00".into(),
            sku: "SNK-BIG".into(),
            brand: "Other".into(),
            manufacturer: "Other".into(),
            category: "snacks".into(),
            quantity: 1,
            amount: spent,
        }],
    )
    .await
    .expect("purchase ingested");
    let after = h.run("sakura_foods", query, &window()).await.unwrap();
    let (Some(sum_before), Some(sum_after)) =
        (released_before, cells(&after, 2).get(&cell).map(|v| v[1]))
    else {
        panic!("the spender's cell {cell:?} is released before and after");
    };
    let interval =
        |r: &RunQueryResponse| r.protection.as_ref().unwrap().interval95["amount_yen"] as i64;
    let slack = 6_000 + interval(&before) + interval(&after);
    println!("{cell:?}: {sum_before} -> {sum_after} (slack {slack}, spent {spent})");
    assert!(slack < spent / 10, "the test can tell a clamp from none");
    assert!(
        (sum_after - sum_before).abs() <= slack,
        "one member moved the sum by {}",
        sum_after - sum_before
    );
    h.stop().await;
}

/// THREATS 16: a condition whose evaluation fails only on the target's row, through a cast
/// DataFusion adds itself (type coercion of a CASE, a time compared with text, an IN list,
/// COALESCE). Were it approved, the answer would be an error with her in the list and rows
/// without her, whatever the charge. Each variant is refused by `queries lint` and by the review
/// (shown as refused, its approval refused), and the service answers the same with the target in
/// the list and without her.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_condition_that_fails_on_one_row_is_refused_before_approval() {
    const HER_ROW: &str =
        "m.prefecture = '鳥取県' AND p.category = 'pet' AND p.amount = 2480 THEN m.prefecture";
    let sql = |condition: String| -> &'static str {
        Box::leak(
            format!(
                "SELECT p.category, COUNT(DISTINCT p.member_key) AS buyers FROM purchases p \
                 JOIN members m ON p.member_key = m.member_key WHERE {condition} GROUP BY p.category"
            )
            .into_boxed_str(),
        )
    };
    let variants = [
        (
            "t_case_cast",
            sql(format!("p.amount <> CASE WHEN {HER_ROW} ELSE '-1' END")),
        ),
        (
            "t_time_vs_text",
            sql(format!(
                "p.purchased_at > CASE WHEN {HER_ROW} ELSE '2000-01-01' END"
            )),
        ),
        (
            "t_in_list",
            sql(format!(
                "p.amount IN (p.amount, CASE WHEN {HER_ROW} ELSE '0' END)"
            )),
        ),
        (
            "t_coalesce",
            sql(format!("COALESCE(p.amount, CASE WHEN {HER_ROW} END) >= 0")),
        ),
    ];
    let templates: Vec<Template> = variants
        .iter()
        .map(|(id, sql)| Template {
            id,
            sql,
            dimensions: &[("category", "category")],
            metrics: &["buyers"],
        })
        .collect();
    let (setup, dir) = setup_with_templates(&templates);

    let (clean, lint) = crate::lint::lint(dir.path());
    assert!(!clean, "lint must refuse them:\n{lint}");
    for (id, _) in &variants {
        assert!(
            lint.lines()
                .any(|l| l.contains(&format!("{id}.toml:")) && l.contains("cannot-fail-on-data")),
            "lint does not refuse {id}:\n{lint}"
        );
    }

    let known = Knowledge::load();
    let h = Harness::start_with(Setup {
        rules: relaxed_lists(setup.rules.clone()),
        ..setup
    })
    .await;
    let (buyers, _) = known.companions(9, 0);
    let mut with_target = buyers.clone();
    with_target.push(TARGET.into());
    for (id, _) in &variants {
        crate::attacks::refused_by_guard(&h, id, id).await;
    }
    let mut outcomes = Vec::new();
    for list in [with_target, buyers] {
        upload(&h, list_of(&ids(&list), "gold")).await;
        let mut world = Vec::new();
        for (id, _) in &variants {
            let status = h.run("sakura_foods", id, &year()).await.unwrap_err();
            world.push((status.code(), status.message().to_string()));
        }
        outcomes.push(world);
    }
    assert_eq!(
        outcomes[0], outcomes[1],
        "the target's world looks the same"
    );
    h.stop().await;
}

/// THREATS 17, the restore of issue 14 (B): the operator keeps a backup of the data directory;
/// Sakura uploads a list of 1,000 known members and asks three questions; the backup is restored
/// the same day; Sakura uploads the same list plus the target (the same version number again)
/// and asks the same three questions. Were answers keyed by counters, every cell without her
/// would repeat and every cell with her would be one higher, with the budget back to where the
/// backup left it. The restored directory is refused at start, changing nothing; accepted
/// explicitly, every answer over the new list is fresh noise and the budget goes on from where
/// it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_from_backup_replays_no_noise_and_refills_no_budget() {
    let known = Knowledge::load();
    let mut h = Harness::start_with(Setup {
        rules: relaxed_lists(sample_rules()),
        ..Default::default()
    })
    .await;
    h.halt().await;
    let backup = files_of(h.data_dir.path());
    let h = h.restart_after(|_| {}).await;

    let list: Vec<String> = known.consenting.iter().take(1000).cloned().collect();
    let questions: [(&str, Vec<(&str, ParamValue)>); 3] = [
        ("category_buyers_by_age_band", year()),
        ("repeat_purchase_rate", year()),
        ("matched_overlap", vec![]),
    ];
    let version = upload(&h, list_of(&ids(&list), "gold")).await;
    let before = ask_fresh(&h, &questions).await;
    let used = before[2].protection.as_ref().unwrap().answers_used;

    let mut h = h;
    h.halt().await;
    let dir = h.data_dir.path().to_path_buf();
    std::fs::remove_dir_all(&dir).unwrap();
    for (path, bytes) in &backup {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    let restored = files_of(&dir);
    let refused = crate::util::try_app(&dir)
        .err()
        .expect("a restored data directory is refused");
    let message = refused.to_string();
    assert!(
        message.contains("high-water mark") && message.contains("--accept-restore"),
        "{message}"
    );
    assert_eq!(
        files_of(&dir),
        restored,
        "the refused start changed nothing"
    );

    let h = h.start_accepting_restore().await;
    let mut with_target = list.clone();
    with_target.push(TARGET.into());
    assert_eq!(
        upload(&h, list_of(&ids(&with_target), "gold")).await,
        version,
        "the same version number again"
    );
    let after = ask_fresh(&h, &questions).await;
    assert_eq!(
        after[2].protection.as_ref().unwrap().answers_used,
        used + 3,
        "the budget goes on from where it was"
    );
    for ((query, _), (old, new)) in questions.iter().zip(before.iter().zip(&after)) {
        // Each metric has its interval column; the rest are dimensions.
        let intervals = old
            .columns
            .iter()
            .filter(|c| c.name.ends_with("_ci95"))
            .count();
        let dims = old.columns.len() - 2 * intervals;
        let (old, new) = (cells(old, dims), cells(new, dims));
        let replayed = old
            .iter()
            .filter(|(cell, v)| {
                new.get(*cell)
                    .is_some_and(|n| n[0] - v[0] == 0 || n[0] - v[0] == 1)
            })
            .count();
        println!(
            "{query}: {replayed} of {} cells within +1 of before",
            old.len()
        );
        assert!(
            replayed < old.len(),
            "{query}: the noise was replayed on the new data"
        );
    }
    h.stop().await;
}

/// Asks each question as Sakura; each must be answered fresh.
async fn ask_fresh(
    h: &Harness,
    questions: &[(&str, Vec<(&str, ParamValue)>)],
) -> Vec<RunQueryResponse> {
    let mut answers = Vec::new();
    for (query, params) in questions {
        let answer = h.run("sakura_foods", query, params).await.unwrap();
        assert!(
            answer.protection.as_ref().unwrap().fresh,
            "{query} is fresh"
        );
        answers.push(answer);
    }
    answers
}
