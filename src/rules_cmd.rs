//! `cleanroom rules validate`: a dry run of a rules change. It validates the proposed rules (and
//! the allow-list against them) and says what the change would do compared with the rules in
//! force: which queries become unrunnable, which partners lose or gain access to which queries,
//! whose effective k moves, and how many members each collaboration's consent filter admits
//! before and after. Nothing is written; a running service picks the file up only once it is
//! moved into place, and refuses it whole if it does not validate.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use cleanroom_core::allowlist::AllowList;
use cleanroom_core::consent::Requirement;
use cleanroom_core::rules::Rules;
use cleanroom_engine::store::Store;

/// Who may run what: (partner, query) pairs whose query is valid, open to the partner, on its
/// contract, and whose contract is in force on `now`.
fn access(rules: &Rules, allowlist: &AllowList, now: DateTime<Utc>) -> BTreeSet<(String, String)> {
    let today = rules.retailer.today(now);
    let mut pairs = BTreeSet::new();
    for query in allowlist.iter() {
        for partner in &query.partners {
            let Some((_, contract)) = rules.contract_of(partner) else {
                continue;
            };
            let serves = query.purposes.contains(&contract.purpose);
            if contract.queries.contains(&query.id) && contract.expires >= today && serves {
                pairs.insert((partner.clone(), query.id.clone()));
            }
        }
    }
    pairs
}

fn requirement(rules: &Rules, purpose: &str) -> Option<Requirement> {
    rules.purposes.get(purpose).map(|p| Requirement {
        min_notice_version: p.min_notice_version,
        grant_valid_days: p.grant_valid_days,
    })
}

/// Validates `proposed` and describes its effect against `current`. Returns the report, or the
/// reason the proposed rules are invalid.
pub fn validate(
    current: &Path,
    proposed: &Path,
    queries: &Path,
    data_dir: Option<&Path>,
    now: DateTime<Utc>,
) -> Result<String> {
    let old = Rules::load(current).context("the rules in force")?;
    let new = Rules::load(proposed).context("the proposed rules")?;
    let old_list = AllowList::scan(queries, &old)?;
    let new_list = AllowList::scan(queries, &new)?;
    let mut out = String::new();
    writeln!(
        out,
        "{}: valid; effect compared with {} on {}:",
        proposed.display(),
        current.display(),
        new.retailer.today(now)
    )?;

    let mut settings = Vec::new();
    if old.privacy.k_floor != new.privacy.k_floor {
        settings.push(format!(
            "k floor {} -> {}",
            old.privacy.k_floor, new.privacy.k_floor
        ));
    }
    for (id, p) in &new.purposes {
        match old.purposes.get(id) {
            None => settings.push(format!("purpose {id} added")),
            Some(o) if o.min_notice_version != p.min_notice_version => settings.push(format!(
                "purpose {id}: notice version {} -> {}",
                o.min_notice_version, p.min_notice_version
            )),
            Some(o) if o.grant_valid_days != p.grant_valid_days => settings.push(format!(
                "purpose {id}: grants valid for {:?} -> {:?} days",
                o.grant_valid_days, p.grant_valid_days
            )),
            _ => {}
        }
    }
    for (id, c) in &new.contracts {
        match old.contracts.get(id) {
            None => settings.push(format!("contract {id} added (partner {})", c.partner)),
            Some(o) => {
                let mut changes = Vec::new();
                if o.k != c.k {
                    changes.push(format!("k {} -> {}", o.k, c.k));
                }
                if o.expires != c.expires {
                    changes.push(format!("expires {} -> {}", o.expires, c.expires));
                }
                if o.purpose != c.purpose {
                    changes.push(format!("purpose {} -> {}", o.purpose, c.purpose));
                }
                if o.key_version != c.key_version {
                    changes.push(format!(
                        "match key version {} -> {} (the partner must upload its list again)",
                        o.key_version, c.key_version
                    ));
                }
                if o.max_queries_per_day != c.max_queries_per_day {
                    changes.push(format!(
                        "answers per day {:?} -> {:?}",
                        o.max_queries_per_day, c.max_queries_per_day
                    ));
                }
                if o.protection != c.protection {
                    changes.push(format!(
                        "protection {:?} -> {:?}",
                        o.protection, c.protection
                    ));
                }
                if !changes.is_empty() {
                    settings.push(format!("contract {id}: {}", changes.join("; ")));
                }
            }
        }
    }
    for id in old
        .contracts
        .keys()
        .filter(|id| !new.contracts.contains_key(*id))
    {
        settings.push(format!("contract {id} removed"));
    }
    let (old_sensitive, new_sensitive) =
        (old.sensitive_column_names(), new.sensitive_column_names());
    for column in new_sensitive.difference(&old_sensitive) {
        settings.push(format!("column {column} now tagged sensitive"));
    }
    for column in old_sensitive.difference(&new_sensitive) {
        settings.push(format!("column {column} no longer tagged sensitive"));
    }
    let principals = |r: &Rules| -> BTreeSet<String> {
        r.principals
            .iter()
            .map(|p| format!("{} ({})", p.name, p.role.as_str()))
            .collect()
    };
    for p in principals(&new).difference(&principals(&old)) {
        settings.push(format!("principal {p} added"));
    }
    for p in principals(&old).difference(&principals(&new)) {
        settings.push(format!("principal {p} removed"));
    }
    section(&mut out, "settings", settings)?;

    let (before, after) = (access(&old, &old_list, now), access(&new, &new_list, now));
    let runnable = |pairs: &BTreeSet<(String, String)>| -> BTreeSet<String> {
        pairs.iter().map(|(_, q)| q.clone()).collect()
    };
    let mut unrunnable: Vec<String> = runnable(&before)
        .difference(&runnable(&after))
        .map(|q| {
            let why = new_list
                .invalid()
                .iter()
                .find(|bad| &bad.id == q)
                .map(|bad| format!("no longer valid: {}", bad.reason))
                .unwrap_or_else(|| "no partner's contract allows it any more".to_string());
            format!("{q}: {why}")
        })
        .collect();
    unrunnable.sort();
    section(&mut out, "queries that become unrunnable", unrunnable)?;
    section(
        &mut out,
        "access lost",
        before
            .difference(&after)
            .map(|(p, q)| format!("{p} loses {q}"))
            .collect(),
    )?;
    section(
        &mut out,
        "access gained",
        after
            .difference(&before)
            .map(|(p, q)| format!("{p} gains {q}"))
            .collect(),
    )?;
    let mut k_changes = Vec::new();
    for (partner, query_id) in before.intersection(&after) {
        let (Some(oq), Some(nq)) = (old_list.get(query_id), new_list.get(query_id)) else {
            continue;
        };
        let (Some((_, oc)), Some((_, nc))) = (old.contract_of(partner), new.contract_of(partner))
        else {
            continue;
        };
        let (ok, nk) = (old.effective_k(oc, oq.k), new.effective_k(nc, nq.k));
        if ok != nk {
            k_changes.push(format!("{query_id} for {partner}: k {ok} -> {nk}"));
        }
    }
    section(&mut out, "effective k", k_changes)?;

    let mut consent = Vec::new();
    match data_dir {
        None => {
            consent.push("(give --data-dir to count the members each consent filter admits)".into())
        }
        Some(dir) => {
            let store = Store::open(dir)
                .with_context(|| format!("opening data directory {}", dir.display()))?;
            let snapshot = store.snapshot();
            let ids: BTreeSet<&String> = old.contracts.keys().chain(new.contracts.keys()).collect();
            for id in ids {
                let count = |rules: &Rules| -> Result<Option<(usize, Option<usize>)>> {
                    let Some(contract) = rules.contracts.get(id) else {
                        return Ok(None);
                    };
                    let Some(requirement) = requirement(rules, &contract.purpose) else {
                        return Ok(None);
                    };
                    let counts = cleanroom_engine::consent_counts(
                        &snapshot,
                        id,
                        contract,
                        &requirement,
                        now,
                    )
                    .context("reading a partner's list")?;
                    Ok(Some(counts))
                };
                let show = |c: Option<(usize, Option<usize>)>| match c {
                    None => "no contract".to_string(),
                    Some((all, None)) => format!("{all} consenting, no list yet"),
                    Some((all, Some(listed))) => {
                        format!("{all} consenting, {listed} of them in the partner's list")
                    }
                };
                let (b, a) = (count(&old)?, count(&new)?);
                let marker = if b == a { "unchanged" } else { "changes" };
                consent.push(format!("{id}: {} -> {} ({marker})", show(b), show(a)));
            }
            consent.extend(missing_tokens(&snapshot, &new));
        }
    }
    section(&mut out, "consent filter", consent)?;
    Ok(out)
}

/// Contracts whose members have no tokens yet (added since the last members ingest): their
/// partners' questions are refused, uncharged, until the members are ingested again.
fn missing_tokens(snapshot: &cleanroom_engine::store::Snapshot, rules: &Rules) -> Vec<String> {
    rules
        .contracts
        .keys()
        .filter(|id| !snapshot.member_tokens.contains_key(*id))
        .map(|id| {
            format!(
                "{id}: no member tokens yet; ingest the members again before its partner's \
                 questions can be answered (they are refused, uncharged, until then)"
            )
        })
        .collect()
}

fn section(out: &mut String, title: &str, lines: Vec<String>) -> Result<()> {
    writeln!(out, "{title}:")?;
    if lines.is_empty() {
        writeln!(out, "  none")?;
    }
    for line in lines {
        writeln!(out, "  {line}")?;
    }
    Ok(())
}
