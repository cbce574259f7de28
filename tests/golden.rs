//! Every allowed query, run over gRPC on the sample data, against two references: the ground
//! truth computed by hand from the raw files (exactly, with noise off; within the stated noise
//! scale, with the sample's protections on), and a golden file of the released output under the
//! sample's rules (`CLEANROOM_BLESS=1 cargo test golden` rewrites it after a reviewed change).

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;

use cleanroom_proto::v1::{ParamValue, RunQueryResponse, param_value, value::Kind};

use crate::truth::{Cells, Truth, aggregate};
use crate::util::{Harness, Setup, cells, date, precise_rules, read, root, text, year};

/// One query run of the golden set.
pub(crate) struct Case {
    pub partner: &'static str,
    pub query: &'static str,
    pub params: Vec<(&'static str, ParamValue)>,
    domain_cells: usize,
    expected: Cells,
}

/// Every allowed query of the sample, with parameters, and its answer computed from the raw files.
pub(crate) fn cases(truth: &Truth, h: &Harness) -> Vec<Case> {
    let rules = &h.rules;
    let sakura = truth.eligible(rules, "sakura_foods", &[]);
    let kumo = truth.eligible(rules, "kumo_denki", &[]);
    let member = |id: &str| &truth.members[id];
    let categories = rules.domains["category"].len();
    let by_age_and_category = |eligible| {
        aggregate(
            truth
                .purchases_in(eligible, "2025-11-01", "2026-11-01")
                .map(|p| {
                    (
                        vec![member(&p.member_id).age_band.clone(), p.category.clone()],
                        p.member_id.as_str(),
                        vec![p.amount],
                    )
                }),
            &[6_000],
        )
        .into_iter()
        .map(|(k, (n, m))| (k, (n, vec![n as i64, m[0]])))
        .collect()
    };
    let repeat: Cells = {
        let mut lines: BTreeMap<(String, &str), i64> = BTreeMap::new();
        for p in truth.purchases_in(&sakura, "2025-11-03", "2026-10-26") {
            *lines
                .entry((p.category.clone(), p.member_id.as_str()))
                .or_default() += 1;
        }
        let mut cells: BTreeMap<Vec<String>, (HashSet<&str>, i64)> = BTreeMap::new();
        for ((category, member), n) in lines {
            let cell = cells.entry(vec![category]).or_default();
            cell.0.insert(member);
            cell.1 += i64::from(n >= 2);
        }
        cells
            .into_iter()
            .map(|(k, (set, rep))| (k, (set.len(), vec![set.len() as i64, rep])))
            .collect()
    };
    vec![
        Case {
            partner: "sakura_foods",
            query: "category_buyers_by_age_band",
            params: year(),
            domain_cells: 8 * categories,
            expected: by_age_and_category(&sakura),
        },
        Case {
            partner: "kumo_denki",
            query: "category_buyers_by_age_band",
            params: year(),
            domain_cells: 8 * categories,
            expected: by_age_and_category(&kumo),
        },
        Case {
            partner: "sakura_foods",
            query: "brand_buyers_by_prefecture",
            params: vec![
                ("brand", text("Sakura Cha")),
                ("start", date("2025-11-01")),
                ("end", date("2026-11-01")),
            ],
            domain_cells: 47,
            expected: aggregate(
                truth
                    .purchases_in(&sakura, "2025-11-01", "2026-11-01")
                    .filter(|p| p.brand == "Sakura Cha")
                    .map(|p| {
                        (
                            vec![member(&p.member_id).prefecture.clone()],
                            p.member_id.as_str(),
                            vec![1],
                        )
                    }),
                &[5],
            )
            .into_iter()
            .map(|(k, (n, m))| (k, (n, vec![n as i64, m[0]])))
            .collect(),
        },
        Case {
            partner: "sakura_foods",
            query: "matched_overlap",
            params: vec![],
            domain_cells: 4,
            expected: aggregate(
                sakura
                    .iter()
                    .map(|(m, attr)| (vec![attr.clone()], m.as_str(), vec![])),
                &[],
            )
            .into_iter()
            .map(|(k, (n, _))| (k, (n, vec![n as i64])))
            .collect(),
        },
        Case {
            partner: "kumo_denki",
            query: "matched_overlap",
            params: vec![],
            domain_cells: 4,
            expected: aggregate(
                kumo.iter()
                    .map(|(m, attr)| (vec![attr.clone()], m.as_str(), vec![])),
                &[],
            )
            .into_iter()
            .map(|(k, (n, _))| (k, (n, vec![n as i64])))
            .collect(),
        },
        Case {
            partner: "sakura_foods",
            query: "repeat_purchase_rate",
            params: vec![("start", date("2025-11-03")), ("end", date("2026-10-26"))],
            domain_cells: categories,
            expected: repeat,
        },
        Case {
            partner: "kumo_denki",
            query: "appliance_buyers_by_owned_model",
            params: year(),
            domain_cells: 4 * 3,
            expected: aggregate(
                truth
                    .purchases_in(&kumo, "2025-11-01", "2026-11-01")
                    .filter(|p| p.manufacturer == "Kumo Denki")
                    .map(|p| {
                        (
                            vec![
                                kumo[&p.member_id].clone(),
                                member(&p.member_id).gender.clone(),
                            ],
                            p.member_id.as_str(),
                            vec![p.amount],
                        )
                    }),
                &[30_000],
            )
            .into_iter()
            .map(|(k, (n, m))| (k, (n, vec![n as i64, m[0]])))
            .collect(),
        },
    ]
}

fn render(case: &Case, response: &RunQueryResponse) -> String {
    let mut out = String::new();
    let params: Vec<String> = case
        .params
        .iter()
        .map(|(k, v)| match &v.kind {
            Some(param_value::Kind::StringValue(s) | param_value::Kind::DateValue(s)) => {
                format!("{k}={s}")
            }
            Some(param_value::Kind::IntValue(i)) => format!("{k}={i}"),
            None => k.to_string(),
        })
        .collect();
    writeln!(
        out,
        "# {} as {} ({})",
        case.query,
        case.partner,
        params.join(", ")
    )
    .unwrap();
    writeln!(
        out,
        "# k = {}, released {}, suppressed {}",
        response.effective_k,
        response.rows.len(),
        response.suppressed_rows
    )
    .unwrap();
    let protection = response.protection.clone().unwrap_or_default();
    let intervals: Vec<String> = protection
        .interval95
        .iter()
        .map(|(m, w)| format!("{m} ±{w}"))
        .collect();
    writeln!(
        out,
        "# protection {}: release threshold {}, 95% intervals {}, ε {:.3} of ε {} per {} days",
        protection.mode,
        protection.release_threshold,
        intervals.join(", "),
        protection.epsilon_spent,
        protection.period_epsilon,
        protection.period_days
    )
    .unwrap();
    let header: Vec<&str> = response.columns.iter().map(|c| c.name.as_str()).collect();
    writeln!(out, "{}", header.join("\t")).unwrap();
    for row in &response.rows {
        let values: Vec<String> = row
            .values
            .iter()
            .map(|v| match &v.kind {
                Some(Kind::StringValue(s)) => s.clone(),
                Some(Kind::IntValue(i)) => i.to_string(),
                Some(Kind::DoubleValue(d)) => format!("{d}"),
                _ => "NULL".into(),
            })
            .collect();
        writeln!(out, "{}", values.join("\t")).unwrap();
    }
    out
}

/// The number of dimension columns of a case's response.
fn dimensions(case: &Case, response: &RunQueryResponse) -> usize {
    response
        .columns
        .iter()
        .filter(|c| !c.name.ends_with("_ci95"))
        .count()
        - case
            .expected
            .values()
            .next()
            .map(|(_, m)| m.len())
            .unwrap_or(1)
}

/// Under a generous guarantee, released values sit within their stated 95 % intervals of the
/// truth (after the declared per-member clamps) at least 90 % of the time, every released row has
/// at least k members, every row below k is withheld, and the withheld count covers the whole
/// domain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precise_answers_lie_within_their_stated_intervals() {
    let h = Harness::start_with(Setup {
        rules: precise_rules(),
        ..Setup::default()
    })
    .await;
    let truth = Truth::load();
    let (mut values, mut inside) = (0usize, 0usize);
    for case in cases(&truth, &h) {
        let response = h
            .run(case.partner, case.query, &case.params)
            .await
            .unwrap_or_else(|s| panic!("{}: {s}", case.query));
        let k = response.effective_k as usize;
        let dims = dimensions(&case, &response);
        let released = cells(&response, dims);
        let label = format!("{} as {}", case.query, case.partner);
        let protection = response.protection.clone().unwrap();
        assert_eq!(protection.mode, "dp", "{label}");
        for (key, metrics) in &released {
            let (members, expected) = case
                .expected
                .get(key)
                .unwrap_or_else(|| panic!("{label}: released {key:?} has no member"));
            assert!(
                *members >= k,
                "{label}: released {key:?} with {members} < k = {k} members"
            );
            for (i, (got, want)) in metrics.iter().zip(expected).enumerate() {
                let name = &response.columns[dims + i].name;
                let width = protection.interval95[name] as i64;
                values += 1;
                let hit = (got - want).abs() <= width;
                if !hit {
                    println!("outside: {label} {key:?} {name} = {got}, truth {want}, ±{width}");
                }
                inside += usize::from(hit);
            }
        }
        for (key, (members, _)) in &case.expected {
            if *members < k {
                assert!(
                    !released.contains_key(key),
                    "{label}: {key:?} has {members} < k members but was released"
                );
            }
        }
        assert_eq!(
            response.suppressed_rows as usize,
            case.domain_cells - released.len(),
            "{label}: suppressed count"
        );
        assert!(
            !released.is_empty(),
            "{label}: the sample should release something"
        );
    }
    let share = inside as f64 / values as f64;
    println!("{inside} of {values} released values within their 95% interval ({share:.3})");
    assert!(
        share >= 0.9,
        "{inside} of {values} within their 95% intervals"
    );
    h.stop().await;
}

/// Under the sample's own rules the answers are exactly the golden files (the noise is keyed, so a
/// fixed secret gives fixed answers), every released row has at least k members, and every value
/// lies within three times its 95 % half-width of the truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_allowed_query_matches_its_golden_file() {
    let h = Harness::start().await;
    let truth = Truth::load();
    let bless = std::env::var_os("CLEANROOM_BLESS").is_some();
    for case in cases(&truth, &h) {
        let response = h
            .run(case.partner, case.query, &case.params)
            .await
            .unwrap_or_else(|s| panic!("{}: {s}", case.query));
        let k = response.effective_k as usize;
        let dims = dimensions(&case, &response);
        let released = cells(&response, dims);
        let label = format!("{} as {}", case.query, case.partner);
        let protection = response.protection.clone().unwrap();
        assert_eq!(protection.mode, "dp", "{label}");
        for (key, metrics) in &released {
            let (members, expected) = case
                .expected
                .get(key)
                .unwrap_or_else(|| panic!("{label}: released {key:?} has no member"));
            assert!(
                *members >= k,
                "{label}: released {key:?} with {members} < k"
            );
            for (i, (got, want)) in metrics.iter().zip(expected).enumerate() {
                let name = &response.columns[dims + i].name;
                let width = protection.interval95[name] as i64;
                assert!(
                    (got - want).abs() <= 3 * width,
                    "{label}: {key:?} {name} = {got}, truth {want}, 95% half-width {width}"
                );
            }
        }
        assert_eq!(
            response.suppressed_rows as usize,
            case.domain_cells - released.len(),
            "{label}: suppressed count"
        );

        let path = root()
            .join("tests/golden")
            .join(format!("{}.{}.tsv", case.partner, case.query));
        let rendered = render(&case, &response);
        if bless {
            std::fs::write(&path, &rendered).unwrap();
        } else {
            assert_eq!(
                rendered,
                read(&path),
                "{label}: differs from {} (CLEANROOM_BLESS=1 rewrites it)",
                path.display()
            );
        }
    }
    h.stop().await;
}
