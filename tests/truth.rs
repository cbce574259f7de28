//! Ground truth from the raw sample files, computed without the service: plain Rust over the CSVs,
//! matching by normalized identifier (no HMAC), consent evaluated by hand. The golden and consent
//! tests hold the service's answers against it.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, NaiveDate, Utc};
use cleanroom_core::normalize;
use cleanroom_core::rules::Rules;
use serde::Deserialize;

use crate::util::sample_dir;

#[derive(Deserialize)]
struct MemberRow {
    member_id: String,
    email: String,
    phone: String,
    prefecture: String,
    birth_date: String,
    gender: String,
}

#[derive(Deserialize, Clone)]
pub struct PurchaseRow {
    pub member_id: String,
    pub purchased_at: String,
    pub brand: String,
    pub manufacturer: String,
    pub category: String,
    pub amount: i64,
}

#[derive(Deserialize, Clone)]
pub struct ConsentRow {
    pub member_id: String,
    pub purpose: String,
    pub notice_version: u32,
    pub action: String,
    pub at: String,
    pub expires_at: String,
}

#[derive(Deserialize)]
struct ListRow {
    email: String,
    phone: String,
    attribute: String,
}

/// What the truth knows of one member.
#[derive(Clone, Debug)]
pub struct Member {
    pub age_band: String,
    pub prefecture: String,
    pub gender: String,
}

fn csv<T: for<'de> Deserialize<'de>>(name: &str) -> Vec<T> {
    csv::Reader::from_path(sample_dir().join(name))
        .unwrap()
        .deserialize()
        .map(|r| r.unwrap())
        .collect()
}

fn time(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().into()
}

fn age_band(birth: &str, on: NaiveDate) -> String {
    let Ok(b) = NaiveDate::parse_from_str(birth, "%Y-%m-%d") else {
        return "unknown".into();
    };
    let mut age = on.years_since(b).map(i64::from).unwrap_or(-1);
    if b > on {
        age = -1;
    }
    match age {
        ..0 => "unknown",
        0..20 => "under_20",
        20..30 => "20-29",
        30..40 => "30-39",
        40..50 => "40-49",
        50..60 => "50-59",
        60..70 => "60-69",
        _ => "70_plus",
    }
    .into()
}

/// The raw sample, read once per test.
pub struct Truth {
    pub members: HashMap<String, Member>,
    by_identifier: HashMap<String, String>,
    pub purchases: Vec<PurchaseRow>,
    pub consent: Vec<ConsentRow>,
}

impl Truth {
    pub fn load() -> Self {
        let local_date = crate::util::as_of()
            .with_timezone(&chrono::FixedOffset::east_opt(9 * 3600).unwrap())
            .date_naive();
        let mut members = HashMap::new();
        let mut by_identifier = HashMap::new();
        for m in csv::<MemberRow>("members.csv") {
            for id in [
                normalize::email(&m.email).ok(),
                normalize::phone(&m.phone).ok(),
            ]
            .into_iter()
            .flatten()
            {
                by_identifier.insert(id, m.member_id.clone());
            }
            let gender = match m.gender.as_str() {
                "F" | "M" => m.gender.clone(),
                _ => "other".into(),
            };
            members.insert(
                m.member_id.clone(),
                Member {
                    age_band: age_band(&m.birth_date, local_date),
                    prefecture: m.prefecture.clone(),
                    gender,
                },
            );
        }
        Self {
            members,
            by_identifier,
            purchases: csv("purchases.csv"),
            consent: csv("consent_events.csv"),
        }
    }

    /// Members with at least one identifier that normalizes, so a list can name them.
    pub fn identifiable(&self) -> HashSet<String> {
        self.by_identifier.values().cloned().collect()
    }

    /// Members in the partner's list, with the attribute of the first list record naming them.
    pub fn matched(&self, partner: &str) -> HashMap<String, String> {
        let mut matched = HashMap::new();
        for row in csv::<ListRow>(&format!("partner_lists/{partner}.csv")) {
            for id in [
                normalize::email(&row.email).ok(),
                normalize::phone(&row.phone).ok(),
            ]
            .into_iter()
            .flatten()
            {
                if let Some(member) = self.by_identifier.get(&id) {
                    let attribute = if row.attribute.is_empty() {
                        "unknown".to_string()
                    } else {
                        row.attribute.clone()
                    };
                    matched.entry(member.clone()).or_insert(attribute);
                }
            }
        }
        matched
    }

    /// Members whose consent for `purpose` holds at `now`, with `extra` events added to the log.
    pub fn consented(
        &self,
        rules: &Rules,
        purpose: &str,
        now: DateTime<Utc>,
        extra: &[ConsentRow],
    ) -> HashSet<String> {
        let requirement = &rules.purposes[purpose];
        let mut latest: HashMap<&str, &ConsentRow> = HashMap::new();
        for e in self
            .consent
            .iter()
            .chain(extra)
            .filter(|e| e.purpose == purpose && time(&e.at) <= now)
        {
            let replace = match latest.get(e.member_id.as_str()) {
                None => true,
                Some(cur) => {
                    time(&e.at) > time(&cur.at)
                        || (time(&e.at) == time(&cur.at) && e.action == "withdrawn")
                }
            };
            if replace {
                latest.insert(&e.member_id, e);
            }
        }
        latest
            .into_iter()
            .filter(|(_, e)| {
                e.action == "granted"
                    && e.notice_version >= requirement.min_notice_version
                    && (e.expires_at.is_empty() || time(&e.expires_at) > now)
                    && requirement.grant_valid_days.is_none_or(|days| {
                        now - time(&e.at) <= chrono::Duration::days(i64::from(days))
                    })
            })
            .map(|(m, _)| m.to_string())
            .collect()
    }

    /// The members a partner's queries count: matched and consented, with their attribute.
    pub fn eligible(
        &self,
        rules: &Rules,
        partner: &str,
        extra: &[ConsentRow],
    ) -> HashMap<String, String> {
        let (_, contract) = rules.contract_of(partner).unwrap();
        let consented = self.consented(rules, &contract.purpose, crate::util::as_of(), extra);
        self.matched(partner)
            .into_iter()
            .filter(|(m, _)| consented.contains(m))
            .collect()
    }

    /// Purchases of eligible members in a local-date window.
    pub fn purchases_in<'a>(
        &'a self,
        eligible: &'a HashMap<String, String>,
        start: &str,
        end: &str,
    ) -> impl Iterator<Item = &'a PurchaseRow> + 'a {
        let local = |d: &str| time(&format!("{d}T00:00:00+09:00"));
        let (start, end) = (local(start), local(end));
        self.purchases.iter().filter(move |p| {
            let at = time(&p.purchased_at);
            eligible.contains_key(&p.member_id) && at >= start && at < end
        })
    }
}

/// Cells of a query computed by hand: dimension values to (distinct members, metrics).
pub type Cells = BTreeMap<Vec<String>, (usize, Vec<i64>)>;

/// Builds cells from (dimensions, member, per-row metric contributions): each member's
/// contribution to a metric in a cell is summed, then clamped to the metric's bound (as the
/// query's `metric_bounds` declare; `i64::MAX` for none), then summed over members.
pub fn aggregate<'a>(
    rows: impl Iterator<Item = (Vec<String>, &'a str, Vec<i64>)>,
    bounds: &[i64],
) -> Cells {
    let mut per_member: BTreeMap<(Vec<String>, &str), Vec<i64>> = BTreeMap::new();
    for (key, member, metrics) in rows {
        let sum = per_member
            .entry((key, member))
            .or_insert_with(|| vec![0; metrics.len()]);
        for (s, m) in sum.iter_mut().zip(metrics) {
            *s += m;
        }
    }
    let mut cells = Cells::new();
    for ((key, _), sums) in per_member {
        let cell = cells.entry(key).or_insert_with(|| (0, vec![0; sums.len()]));
        cell.0 += 1;
        for (i, (total, s)) in cell.1.iter_mut().zip(sums).enumerate() {
            let bound = bounds.get(i).copied().unwrap_or(i64::MAX);
            *total += s.clamp(-bound, bound);
        }
    }
    cells
}
