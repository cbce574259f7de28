//! THREATS 1–7 played against the running service by an approved partner (Sakura Foods, or Kumo
//! Denki for differential privacy) that knows members' e-mails and purchases and wants one fact
//! about the sample's target member, M0004001 (的場 花子: consenting, 30–39, lives in 鳥取県, bought
//! pet food once in the week of 2026-06-08 and Sakura Senbei once, on no partner's list).
//!
//! Deterministic defences are checked by running the attack on the target and on a control
//! member for whom the fact is false: the answers must be identical (or both refused the same
//! way). Noise-based defences are checked statistically: the attack is run many times, and the
//! attacker's success rate must stay under a bound computed from the contract's configuration;
//! the same attack without the defence is run too, to show the attack is real.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use chrono::{DateTime, Utc};
use cleanroom_client::{ingest_purchases, upload_list};
use cleanroom_proto::v1::{
    CustomerRecord, IngestHeader, ParamValue, PurchaseRecord, RunQueryResponse,
};
use tonic::Code;

use crate::truth::Truth;
use crate::util::{
    BY_GENDER, Harness, Setup, TOTAL, Template, as_of, cells, date, exact_rules, list_of,
    relaxed_lists, sample_rules, setup_with_templates, text, year,
};

/// The sample's target member.
const TARGET: &str = "M0004001";

fn local(day: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(&format!("{day}T00:00:00+09:00"))
        .unwrap()
        .into()
}

/// What the attacker knows: members it can name (valid e-mail or phone) who consent to Sakura's
/// purpose, and everyone's purchases (its staff, its loyalty data, ...).
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

    fn age_band(&self, member: &str) -> &str {
        &self.truth.members[member].age_band
    }
}

fn ids(members: &[String]) -> Vec<&str> {
    members.iter().map(String::as_str).collect()
}

/// Records naming nobody the retailer knows (reserved example domain), to pad a list.
fn fakes(n: usize, tag: &str) -> Vec<CustomerRecord> {
    (0..n)
        .map(|i| CustomerRecord {
            email: format!("nobody.{tag}.{i}@example.org"),
            attribute: "bronze".into(),
            ..Default::default()
        })
        .collect()
}

async fn upload(
    h: &Harness,
    records: Vec<CustomerRecord>,
) -> Result<cleanroom_proto::v1::UploadListResponse, tonic::Status> {
    upload_list(&mut h.partner("sakura_foods"), false, records)
        .await
        .map_err(|e| match e {
            cleanroom_client::Error::Status(s) => s,
            other => panic!("upload failed outside gRPC: {other}"),
        })
}

async fn sample_list() -> Vec<CustomerRecord> {
    cleanroom_client::read_list(&crate::util::sample_dir().join("partner_lists/sakura_foods.csv"))
        .unwrap()
}

/// The released rows, with everything a partner could compare.
fn visible(r: &RunQueryResponse) -> (Vec<cleanroom_proto::v1::Row>, u64, Vec<u8>) {
    (r.rows.clone(), r.suppressed_rows, r.arrow_ipc.clone())
}

fn window(start: &str, end: &str) -> Vec<(&'static str, ParamValue)> {
    vec![("start", date(start)), ("end", date(end))]
}

/// THREATS 1, naive form: the target plus k − 1 known buyers. Refused, and refused the same way
/// whether the target bought or not; re-uploads are limited in number and must change enough.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_padding_with_k_minus_one_known_members_is_refused_alike() {
    let known = Knowledge::load();
    let pet = known.buyers("pet", "2025-11-01", "2026-11-01");
    assert!(pet.contains(TARGET), "the sample's target bought pet food");
    let band = known.age_band(TARGET).to_string();
    let accomplices: Vec<String> = known
        .consenting
        .iter()
        .filter(|m| pet.contains(*m) && known.age_band(m) == band)
        .take(9)
        .cloned()
        .collect();
    let control = known
        .consenting
        .iter()
        .find(|m| !pet.contains(*m) && known.age_band(m) == band)
        .unwrap()
        .clone();

    let mut answers = Vec::new();
    for target in [TARGET.to_string(), control] {
        let h = Harness::start().await;
        let mut members = accomplices.clone();
        members.push(target);
        upload(&h, list_of(&ids(&members), "gold")).await.unwrap();
        let status = h
            .run("sakura_foods", "category_buyers_by_age_band", &year())
            .await
            .unwrap_err();
        answers.push((status.code(), status.message().to_string()));
        if answers.len() == 1 {
            // Re-uploads: a one-record change is refused, and only four versions a month pass.
            let mut one_more = members.clone();
            let extra = known
                .consenting
                .iter()
                .find(|m| !members.contains(m))
                .unwrap();
            one_more.push(extra.clone());
            let status = upload(&h, list_of(&ids(&one_more), "gold"))
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
            assert!(
                status.message().contains("at least 50"),
                "{}",
                status.message()
            );
            for round in 0..2 {
                let fresh = &known.consenting[100 * round..100 * round + 60];
                upload(&h, list_of(&ids(fresh), "gold")).await.unwrap();
            }
            let status = upload(&h, list_of(&ids(&known.consenting[300..360]), "gold"))
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            assert!(
                status.message().contains("limited to 4 per 30 days"),
                "{}",
                status.message()
            );
        }
        h.stop().await;
    }
    assert_eq!(answers[0].0, Code::FailedPrecondition, "{:?}", answers[0]);
    assert!(
        answers[0].1.contains("audience is below"),
        "{:?}",
        answers[0]
    );
    assert_eq!(
        answers[0], answers[1],
        "the refusal tells the target from the control"
    );
}

/// Runs the padded list-padding attack `trials` times against one service: each trial uploads
/// a target, 9 fresh known pet buyers and 220 known non-buyers, and asks for buyers by category
/// over its own weekly window. Returns (buyer targets detected, non-buyer targets "detected").
async fn padded_attack(h: &Harness, known: &Knowledge, trials: usize) -> (usize, usize) {
    // Every trial's window (trial t starts t weeks after 2025-11-03) contains this span, so its
    // pet buyers are pet buyers in every window.
    let pet = known.buyers("pet", "2026-04-13", "2026-10-26");
    let any_pet = known.buyers("pet", "2025-01-01", "2027-01-01");
    let mut buyers = known.consenting.iter().filter(|m| pet.contains(*m));
    let padding: Vec<String> = known
        .consenting
        .iter()
        .filter(|m| !any_pet.contains(*m))
        .take(220)
        .cloned()
        .collect();
    let mut non_buyers = known
        .consenting
        .iter()
        .filter(|m| !any_pet.contains(*m))
        .skip(220);
    let (mut detected, mut false_alarms) = (0, 0);
    for trial in 0..trials {
        let bought = trial % 2 == 0;
        let mut members: Vec<String> = buyers.by_ref().take(9).cloned().collect();
        assert_eq!(
            members.len(),
            9,
            "enough known pet buyers for {trials} trials"
        );
        let target = if trial == 0 {
            TARGET.to_string()
        } else if bought {
            buyers.next().unwrap().clone()
        } else {
            non_buyers.next().unwrap().clone()
        };
        members.push(target);
        members.extend(padding.iter().cloned());
        upload(h, list_of(&ids(&members), "gold")).await.unwrap();
        // A window of its own per trial, so each answer is a fresh question.
        let start = (local("2025-11-03") + chrono::Duration::weeks(trial as i64))
            .with_timezone(&chrono::FixedOffset::east_opt(9 * 3600).unwrap())
            .date_naive()
            .to_string();
        let answer = h
            .run(
                "sakura_foods",
                "repeat_purchase_rate",
                &window(&start, "2026-11-02"),
            )
            .await
            .unwrap();
        let released = cells(&answer, 1).contains_key(&vec!["pet".to_string()]);
        match (bought, released) {
            (true, true) => detected += 1,
            (false, true) => false_alarms += 1,
            _ => {}
        }
    }
    (detected, false_alarms)
}

/// THREATS 1, padded past the minimum audience with 220 known non-buyers: only the noisy
/// threshold stands between the attacker and the answer. The target's row holds k members if
/// she bought and k − 1 if not; it is released only if k + noise ≥ k + margin.
///
/// Bound: with sticky discrete Laplace noise of scale b = `noise_scale` and margin m, a row of
/// exactly k members is released with probability p = P(noise ≥ m) = e^(−m/b) / (1 + e^(−1/b))
/// (0.099 for the sample's b = 1, m = 2); a row of k − 1 never is. So the attacker detects at
/// most a fraction p of the buyers (plus sampling error, 3 standard deviations here) and never
/// mistakes a non-buyer. Without the noisy threshold (noise off) the same attack detects every
/// buyer: the attack is real.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_padding_past_the_minimum_meets_a_noisy_threshold() {
    let known = Knowledge::load();
    let trials = 24;
    let buyer_trials = trials / 2;

    let without = Harness::start_with(Setup {
        rules: relaxed_lists(exact_rules()),
        ..Setup::default()
    })
    .await;
    let (detected, false_alarms) = padded_attack(&without, &known, trials).await;
    without.stop().await;
    assert_eq!(
        (detected, false_alarms),
        (buyer_trials, 0),
        "without noise the attack finds every buyer"
    );

    let rules = relaxed_lists(sample_rules());
    let protection = &rules.contracts["ctr-sakura-2026"].protection;
    let (b, m) = (
        protection.noise_scale,
        f64::from(protection.threshold_margin),
    );
    let p = (-m / b).exp() / (1.0 + (-1.0 / b).exp());
    let bound = p + 3.0 * (p * (1.0 - p) / buyer_trials as f64).sqrt();
    let with = Harness::start_with(Setup {
        rules,
        ..Setup::default()
    })
    .await;
    let (detected, false_alarms) = padded_attack(&with, &known, trials).await;
    with.stop().await;
    assert_eq!(false_alarms, 0, "a row of k − 1 members is never released");
    let rate = detected as f64 / buyer_trials as f64;
    println!(
        "padded list attack: {detected} of {buyer_trials} buyers found with the noisy threshold \
         (bound {bound:.3}, p = {p:.3}); {buyer_trials} of {buyer_trials} without"
    );
    assert!(
        rate <= bound,
        "the attacker found {detected} of {buyer_trials} buyers ({rate:.2}); bound {bound:.2} (p = {p:.3})"
    );
}

/// A list that includes the target and enough other changes not to be frozen: what an attacker
/// must upload before it can ask anything about her.
fn list_with(target: &str, known: &Knowledge, base: &[CustomerRecord]) -> Vec<CustomerRecord> {
    let mut records = base.to_vec();
    let newcomers: Vec<String> = known.consenting.iter().rev().take(80).cloned().collect();
    records.extend(list_of(&ids(&newcomers), "silver"));
    records.extend(list_of(&[target], "silver"));
    records
}

/// THREATS 2: Q(L), then Q(L ∪ {X}) grouped by category. Adding one record is refused; adding
/// the target with 49 fake records is accepted but answered as L. The target and a control who
/// bought nothing give the same answers, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_differencing_is_answered_as_the_earlier_list() {
    let known = Knowledge::load();
    let listed = known.truth.matched("sakura_foods");
    let pet = known.buyers("pet", "2025-01-01", "2027-01-01");
    let control = known
        .consenting
        .iter()
        .find(|m| known.age_band(m) == "30-39" && !pet.contains(*m) && !listed.contains_key(*m))
        .unwrap()
        .clone();
    assert!(!listed.contains_key(TARGET), "the target is on no list");
    let base = sample_list().await;
    let mut outcomes = Vec::new();
    for who in [TARGET.to_string(), control] {
        let h = Harness::start().await;
        let before = h
            .run("sakura_foods", "category_buyers_by_age_band", &year())
            .await
            .unwrap();
        let mut plus_one = base.clone();
        plus_one.extend(list_of(&[who.as_str()], "bronze"));
        let status = upload(&h, plus_one.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        plus_one.extend(fakes(49, "pad"));
        upload(&h, plus_one).await.unwrap();
        let after = h
            .run("sakura_foods", "category_buyers_by_age_band", &year())
            .await
            .unwrap();
        assert_eq!(visible(&before), visible(&after), "{who}: the answer moved");
        let overlap = h.run("sakura_foods", "matched_overlap", &[]).await.unwrap();
        outcomes.push((visible(&after), visible(&overlap)));
        h.stop().await;
    }
    assert_eq!(
        outcomes[0], outcomes[1],
        "the target's answers differ from the control's"
    );
}

const PET_BUYERS_BY_GENDER: Template = Template {
    id: "test_pet_buyers_by_gender",
    sql: "SELECT m.gender, COUNT(DISTINCT m.member_key) AS members FROM members m \
          JOIN purchases p ON m.member_key = p.member_key WHERE p.category = 'pet' GROUP BY m.gender",
    dimensions: &[("gender", "gender")],
    metrics: &["members"],
};

/// THREATS 2 across two queries: members by gender, then pet buyers by gender, over a list of
/// known pet buyers plus the target. If she bought pet food the two `F` rows hold the same
/// members, else they differ by her alone. The second row is within k − 1 members of the first
/// either way, so it is withheld either way: the target and a control who never bought pet food
/// get the same answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differencing_two_queries_isolates_no_one() {
    let known = Knowledge::load();
    let pet = known.buyers("pet", "2000-01-01", "2100-01-01");
    assert!(pet.contains(TARGET));
    let gender = |m: &String| known.truth.members[m].gender.clone();
    let women: Vec<String> = known
        .consenting
        .iter()
        .filter(|m| pet.contains(*m) && gender(m) == "F")
        .cloned()
        .collect();
    let men: Vec<String> = known
        .consenting
        .iter()
        .filter(|m| pet.contains(*m) && gender(m) == "M")
        .take(40)
        .cloned()
        .collect();
    let control = known
        .consenting
        .iter()
        .find(|m| !pet.contains(*m) && gender(m) == "F")
        .unwrap()
        .clone();
    let mut outcomes = Vec::new();
    for who in [TARGET.to_string(), control] {
        let (setup, _dir) = setup_with_templates(&[BY_GENDER, PET_BUYERS_BY_GENDER]);
        let h = Harness::start_with(setup).await;
        let mut members = women.clone();
        members.extend(men.iter().cloned());
        members.push(who.clone());
        upload(&h, list_of(&ids(&members), "gold")).await.unwrap();
        let everyone = h.run("sakura_foods", BY_GENDER.id, &[]).await.unwrap();
        assert!(
            cells(&everyone, 1).contains_key(&vec!["F".to_string()]),
            "the first row is released"
        );
        let buyers = h
            .run("sakura_foods", PET_BUYERS_BY_GENDER.id, &[])
            .await
            .unwrap();
        outcomes.push((visible(&buyers).0, buyers.suppressed_rows));
        h.stop().await;
    }
    assert_eq!(
        outcomes[0], outcomes[1],
        "the pet buyers' answer tells the target from the control"
    );
}

/// THREATS 3: trackers. Days 1–10 minus days 1–9 snap to the same month: the same question and
/// the same answer. Weeks 1–5 minus weeks 1–4 are both long enough to ask, but any row whose
/// members differ by 1 to k − 1 between the two windows repeats the earlier answer or is
/// withheld. Set-valued choices exist only as fixed values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameter_trackers_learn_nothing() {
    let known = Knowledge::load();
    let h = Harness::start().await;
    upload(&h, list_with(TARGET, &known, &sample_list().await))
        .await
        .unwrap();

    let ten = h
        .run(
            "sakura_foods",
            "category_buyers_by_age_band",
            &window("2026-06-01", "2026-06-11"),
        )
        .await
        .unwrap();
    let nine = h
        .run(
            "sakura_foods",
            "category_buyers_by_age_band",
            &window("2026-06-01", "2026-06-10"),
        )
        .await
        .unwrap();
    assert_eq!(ten.effective_params, nine.effective_params);
    assert_eq!(ten.effective_params["end"], "2026-07-01");
    assert_eq!(visible(&ten), visible(&nine));

    // Five weeks minus four: the target's pet purchase falls in the fifth.
    let four = h
        .run(
            "sakura_foods",
            "repeat_purchase_rate",
            &window("2026-05-11", "2026-06-08"),
        )
        .await
        .unwrap();
    let five = h
        .run(
            "sakura_foods",
            "repeat_purchase_rate",
            &window("2026-05-11", "2026-06-15"),
        )
        .await
        .unwrap();
    let (four, five) = (cells(&four, 1), cells(&five, 1));
    let listed = known.truth.eligible(&h.rules, "sakura_foods", &[]);
    let mut checked = 0;
    for category in h.rules.domains["category"].clone() {
        let in_window = |start: &str, end: &str| -> BTreeSet<String> {
            known
                .buyers(&category, start, end)
                .into_iter()
                .filter(|m| listed.contains_key(m) || m == TARGET)
                .collect()
        };
        let moved = in_window("2026-05-11", "2026-06-15")
            .symmetric_difference(&in_window("2026-05-11", "2026-06-08"))
            .count();
        let key = vec![category.clone()];
        if (1..10).contains(&moved) {
            checked += 1;
            match (four.get(&key), five.get(&key)) {
                (Some(a), Some(b)) => assert_eq!(a, b, "{category}: {moved} buyers isolated"),
                (_, None) => {}
                (None, Some(b)) => panic!("{category}: withheld, then released {b:?}"),
            }
        }
    }
    assert!(
        checked > 0,
        "some category moved by fewer than k buyers: the tracker was tried"
    );

    let status = h
        .run(
            "sakura_foods",
            "brand_buyers_by_prefecture",
            &[
                ("brand", text("Sakura Cha,Sakura Senbei")),
                ("start", date("2025-11-01")),
                ("end", date("2026-11-01")),
            ],
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    h.stop().await;
}

/// THREATS 4 across responses: a cell withheld in one answer stays withheld in later answers to
/// the same question, with its complement, so a total minus a later answer cannot recover it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suppressed_cells_stay_suppressed_across_responses() {
    let known = Knowledge::load();
    let (mut setup, _dir) = setup_with_templates(&[TOTAL, BY_GENDER]);
    setup.rules = relaxed_lists(exact_rules());
    for contract in setup.rules.contracts.values_mut() {
        contract
            .queries
            .extend(["test_total".to_string(), "test_by_gender".to_string()]);
    }
    let h = Harness::start_with(setup).await;
    let gender = |m: &String| known.truth.members[m].gender.clone();
    let mut members: Vec<String> = known
        .consenting
        .iter()
        .filter(|m| gender(m) != "other")
        .take(400)
        .cloned()
        .collect();
    let others: Vec<String> = known
        .consenting
        .iter()
        .filter(|m| gender(m) == "other")
        .take(15)
        .cloned()
        .collect();
    assert_eq!(others.len(), 15);
    members.extend(others[..3].iter().cloned());
    upload(&h, list_of(&ids(&members), "gold")).await.unwrap();
    let first = h.run("sakura_foods", "test_by_gender", &[]).await.unwrap();
    let withheld_first: BTreeSet<String> = ["F", "M", "other"]
        .iter()
        .map(|g| g.to_string())
        .filter(|g| !cells(&first, 1).contains_key(&vec![g.clone()]))
        .collect();
    assert!(
        withheld_first.contains("other") && withheld_first.len() == 2,
        "{withheld_first:?}"
    );

    // Twelve more `other` members: the cell now has 15, above k. It stays withheld, and so does
    // its complement: the attacker's later total minus released cells still covers both.
    members.extend(others[3..].iter().cloned());
    upload(&h, list_of(&ids(&members), "gold")).await.unwrap();
    let second = h.run("sakura_foods", "test_by_gender", &[]).await.unwrap();
    let released = cells(&second, 1);
    for cell in &withheld_first {
        assert!(
            !released.contains_key(&vec![cell.clone()]),
            "{cell} came back"
        );
    }
    let total = cells(&h.run("sakura_foods", "test_total", &[]).await.unwrap(), 0)[&vec![]][0];
    let residual = total - released.values().map(|m| m[0]).sum::<i64>();
    assert!(
        residual >= i64::from(second.effective_k),
        "residual {residual}"
    );
    h.stop().await;
}

/// THREATS 5: averaging. Repeats and semantically equal variants get the same answer, so the
/// average of many answers is one answer. Bound: with sticky noise of scale b, a released count
/// equals the truth with probability P(noise = 0) = tanh(1/(2b)) (0.46 for b = 1), however many
/// times it is asked; without noise it always does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn averaging_repeats_gains_nothing() {
    let truth = Truth::load();
    let exactly_right = |h: &Harness, answers: &[RunQueryResponse]| -> (usize, usize) {
        let eligible = truth.eligible(&h.rules, "sakura_foods", &[]);
        let mut buyers: BTreeMap<Vec<String>, HashSet<&str>> = BTreeMap::new();
        for p in truth.purchases_in(&eligible, "2025-11-01", "2026-11-01") {
            buyers
                .entry(vec![
                    truth.members[&p.member_id].age_band.clone(),
                    p.category.clone(),
                ])
                .or_default()
                .insert(&p.member_id);
        }
        // The attacker's estimate of each cell: the mean of every answer, rounded.
        let mut sums: BTreeMap<Vec<String>, (i64, i64)> = BTreeMap::new();
        for answer in answers {
            for (key, metrics) in cells(answer, 2) {
                let entry = sums.entry(key).or_default();
                entry.0 += metrics[0];
                entry.1 += 1;
            }
        }
        let right = sums
            .iter()
            .filter(|(key, (sum, n))| {
                let estimate = (*sum as f64 / *n as f64).round() as usize;
                estimate == buyers[*key].len()
            })
            .count();
        (right, sums.len())
    };
    let variants = [
        ("2025-11-01", "2026-11-01"),
        ("2025-11-15", "2026-10-20"),
        ("2025-11-30", "2026-10-02"),
    ];
    let mut rates = Vec::new();
    for rules in [exact_rules(), sample_rules()] {
        let h = Harness::start_with(Setup {
            rules,
            ..Setup::default()
        })
        .await;
        let mut answers = Vec::new();
        for round in 0..12 {
            let (start, end) = variants[round % variants.len()];
            answers.push(
                h.run(
                    "sakura_foods",
                    "category_buyers_by_age_band",
                    &window(start, end),
                )
                .await
                .unwrap(),
            );
        }
        for answer in &answers[1..] {
            assert_eq!(
                answer.rows, answers[0].rows,
                "a repeat or a variant got another answer"
            );
        }
        let (right, total) = exactly_right(&h, &answers);
        rates.push((right as f64 / total as f64, total));
        h.stop().await;
    }
    let (without, _) = rates[0];
    assert_eq!(
        without, 1.0,
        "without noise every count is exact: averaging is not even needed"
    );
    let (with, cells_released) = rates[1];
    println!(
        "averaging: {:.3} of {cells_released} averaged counts exact with sticky noise, {without:.3} without",
        with
    );
    let b = sample_rules().contracts["ctr-sakura-2026"]
        .protection
        .noise_scale;
    let p = (1.0 / (2.0 * b)).tanh();
    let bound = p + 3.0 * (p * (1.0 - p) / cells_released as f64).sqrt();
    assert!(
        with <= bound,
        "{with:.2} of the averaged counts are exact; bound {bound:.2} (p = {p:.2})"
    );
}

/// THREATS 6: the same question before and after the target's purchase lands. The rows her
/// purchase moves differ by one member and repeat their earlier answer: before and after look
/// the same, for her and for a control whose purchase never happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_over_time_cannot_isolate_a_new_purchase() {
    let known = Knowledge::load();
    let mut outcomes = Vec::new();
    for buys in [true, false] {
        let h = Harness::start().await;
        upload(&h, list_with(TARGET, &known, &sample_list().await))
            .await
            .unwrap();
        let before = h
            .run("sakura_foods", "category_buyers_by_age_band", &year())
            .await
            .unwrap();
        // Her purchase would land in a row the partner sees: 30–39 × beverages is released.
        let row = vec!["30-39".to_string(), "beverages".to_string()];
        assert!(
            cells(&before, 2).contains_key(&row),
            "the row she would move is released"
        );
        // The retailer's next export: the target buys green tea, or someone else buys household
        // goods (the control: her purchase never happens).
        let (brand, manufacturer, category) = if buys {
            ("Sakura Cha", "Sakura Foods", "beverages")
        } else {
            ("Nami Wash", "Nami Household", "household")
        };
        let purchase = PurchaseRecord {
            member_id: if buys { TARGET } else { "M0000001" }.into(),
            purchased_at: "2026-10-20T18:30:00+09:00".into(),
            sku: "SCH-118".into(),
            brand: brand.into(),
            manufacturer: manufacturer.into(),
            category: category.into(),
            quantity: 1,
            amount: 178,
        };
        let summary = ingest_purchases(
            &mut h.analyst(),
            IngestHeader {
                source: "daily-export".into(),
                strict: true,
            },
            vec![purchase],
        )
        .await
        .unwrap();
        assert_eq!(summary.records_accepted, 1);
        let after = h
            .run("sakura_foods", "category_buyers_by_age_band", &year())
            .await
            .unwrap();
        assert_eq!(visible(&before), visible(&after), "buys = {buys}");
        outcomes.push(visible(&after));
        h.stop().await;
    }
    assert_eq!(outcomes[0], outcomes[1]);
}

/// THREATS 7: reconstruction needs many overlapping answers; a differential-privacy contract
/// spends ε on each new answer and refuses once the period's budget is spent (repeats of an
/// answer already paid for cost nothing). The daily answer budget is tested in `attacks`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconstruction_runs_out_of_privacy_budget() {
    let h = Harness::start().await;
    let dp = sample_rules().contracts["ctr-kumo-2026"]
        .protection
        .dp
        .clone()
        .unwrap();
    let answers = (dp.epsilon_budget / dp.epsilon_per_query).round() as usize;
    let run = |month: usize| {
        let start = format!("2025-{:02}-01", 1 + month);
        let h = &h;
        async move {
            h.run(
                "kumo_denki",
                "appliance_buyers_by_owned_model",
                &window(&start, "2026-11-01"),
            )
            .await
        }
    };
    let first = run(0).await.unwrap();
    let protection = first.protection.clone().unwrap();
    assert_eq!(protection.mode, "dp");
    assert_eq!(protection.epsilon_spent, dp.epsilon_per_query);
    let repeat = run(0).await.unwrap();
    assert_eq!(
        repeat.rows, first.rows,
        "an identical repeat is answered from cache"
    );
    assert_eq!(repeat.protection.unwrap().epsilon_spent, 0.0);
    let mut remaining = protection.epsilon_remaining;
    for month in 1..answers {
        let answer = run(month).await.unwrap();
        let spent = answer.protection.unwrap();
        assert!(spent.epsilon_remaining < remaining);
        remaining = spent.epsilon_remaining;
    }
    assert!(remaining.abs() < 1e-9, "the budget is spent: {remaining}");
    let status = run(answers).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("privacy budget spent"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("budget returns from"),
        "{}",
        status.message()
    );
    // What was already paid for can still be read again.
    assert_eq!(run(0).await.unwrap().rows, first.rows);
    h.stop().await;
}
