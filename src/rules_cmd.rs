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
use cleanroom_core::rules::{Contract, Rules};
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

/// A data directory to count members in, and the key store its partners' lists are sealed with
/// (without one, the lists are not read).
pub struct DataDir<'a> {
    /// The data directory.
    pub dir: &'a Path,
    /// Its key store, from the service's settings.
    pub keys: Option<std::sync::Arc<cleanroom_core::keys::KeyStore>>,
}

/// Validates `proposed` and describes its effect against `current`. Returns the report, or the
/// reason the proposed rules are invalid.
pub fn validate(
    current: &Path,
    proposed: &Path,
    queries: &Path,
    data_dir: Option<DataDir<'_>>,
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
    section(&mut out, "settings", settings(&old, &new))?;
    let (before, after) = (access(&old, &old_list, now), access(&new, &new_list, now));
    let unrunnable = unrunnable(&before, &after, &new_list);
    section(&mut out, "queries that become unrunnable", unrunnable)?;
    section(&mut out, "access lost", moved(&before, &after, "loses"))?;
    section(&mut out, "access gained", moved(&after, &before, "gains"))?;
    let k_changes = k_changes(&old, &new, &old_list, &new_list, &before, &after);
    section(&mut out, "effective k", k_changes)?;
    let consent = consent_filter(&old, &new, data_dir, now)?;
    section(&mut out, "consent filter", consent)?;
    section(&mut out, "destruction", destruction_dates(&new, now))?;
    section(&mut out, "declarations", declarations(&new, now))?;
    Ok(out)
}

/// Each partner's declaration (APPI Art. 30) on the retailer's local date: a list is received
/// only from a partner whose declaration is current.
fn declarations(rules: &Rules, now: DateTime<Utc>) -> Vec<String> {
    let today = rules.retailer.today(now);
    rules
        .partners
        .keys()
        .map(|id| {
            let status = rules.declaration_status(id, today);
            let effect = if status.is_current() {
                ""
            } else {
                "; its uploads are refused"
            };
            format!("partner {id}: declaration {}{effect}", status.sentence())
        })
        .collect()
}

/// When each collaboration of the proposed rules is destroyed (its lists, member tokens, stored
/// answers and key, the day after its last day plus its grace period), what its list rules
/// destroy before that, and which purchases a sweep today would remove.
fn destruction_dates(rules: &Rules, now: DateTime<Utc>) -> Vec<String> {
    let today = rules.retailer.today(now);
    let mut dates = Vec::new();
    for (id, c) in &rules.contracts {
        dates.push(format!(
            "contract {id}: in force until {}, destroyed on {} ({} days of grace)",
            c.expires,
            c.destruction_day(),
            c.retention.grace_days
        ));
        let kept = c.retention.keep_versions;
        let mut lists = format!(
            "contract {id}: {kept} list version(s) kept, an older one destroyed once a newer \
             upload leaves it behind"
        );
        if let (Some(days), Some(day)) = (c.retention.max_list_days, c.list_destruction_day(today))
        {
            let _ = write!(
                lists,
                "; a list is kept {days} days (one uploaded today is destroyed on {day})"
            );
        }
        dates.push(lists);
    }
    dates.push(match rules.retention.purchases_kept_from(today) {
        Some(day) => format!(
            "purchases: kept {} days; today's sweep removes those before {day}",
            rules.retention.purchases_days.unwrap_or_default()
        ),
        None => "purchases: kept without limit ([retention] purchases_days unset)".into(),
    });
    dates
}

/// The "settings" section: changes of the k floor, purposes, contracts, sensitive columns and
/// principals, in that order.
fn settings(old: &Rules, new: &Rules) -> Vec<String> {
    let mut settings = Vec::new();
    if old.privacy.k_floor != new.privacy.k_floor {
        settings.push(format!(
            "k floor {} -> {}",
            old.privacy.k_floor, new.privacy.k_floor
        ));
    }
    settings.extend(purpose_changes(old, new));
    settings.extend(contract_changes(old, new));
    settings.extend(sensitive_changes(old, new));
    settings.extend(principal_changes(old, new));
    settings
}

/// Purposes added, or whose notice version or grant validity moved.
fn purpose_changes(old: &Rules, new: &Rules) -> Vec<String> {
    let mut changes = Vec::new();
    for (id, p) in &new.purposes {
        match old.purposes.get(id) {
            None => changes.push(format!("purpose {id} added")),
            Some(o) if o.min_notice_version != p.min_notice_version => changes.push(format!(
                "purpose {id}: notice version {} -> {}",
                o.min_notice_version, p.min_notice_version
            )),
            Some(o) if o.grant_valid_days != p.grant_valid_days => changes.push(format!(
                "purpose {id}: grants valid for {:?} -> {:?} days",
                o.grant_valid_days, p.grant_valid_days
            )),
            _ => {}
        }
    }
    changes
}

/// Contracts added or changed (in the proposed rules' order), then contracts removed.
fn contract_changes(old: &Rules, new: &Rules) -> Vec<String> {
    let mut changes = Vec::new();
    for (id, c) in &new.contracts {
        match old.contracts.get(id) {
            None => changes.push(format!("contract {id} added (partner {})", c.partner)),
            Some(o) => {
                let terms = term_changes(o, c);
                if !terms.is_empty() {
                    changes.push(format!("contract {id}: {}", terms.join("; ")));
                }
            }
        }
    }
    for id in old
        .contracts
        .keys()
        .filter(|id| !new.contracts.contains_key(*id))
    {
        changes.push(format!("contract {id} removed"));
    }
    changes
}

/// What a change of a contract's match key version (or its overlap) does.
fn key_change(o: &Contract, c: &Contract) -> String {
    let (from, to, days) = (o.key_version, c.key_version, c.key_overlap_days);
    if to < from {
        return format!(
            "match key version {from} -> {to}: going back is not a rotation; a version destroyed \
             stays destroyed, and the collaboration is refused if version {to} was"
        );
    }
    if to == from {
        return format!(
            "key_overlap_days {} -> {days} (an overlap under way counts from the current \
             version's key being made)",
            o.key_overlap_days
        );
    }
    let old = match days {
        0 => format!("version {from} is destroyed at once"),
        _ => format!(
            "version {from} stays usable for {days} days (lists of either version are \
             accepted), then is destroyed with its member tokens and lists"
        ),
    };
    format!(
        "match key version {from} -> {to}: {old}; the partner uploads its list again under \
         version {to}, and the members are ingested again to compute its tokens"
    )
}

/// What moved between two versions of one contract.
fn term_changes(o: &Contract, c: &Contract) -> Vec<String> {
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
    if o.key_version != c.key_version || o.key_overlap_days != c.key_overlap_days {
        changes.push(key_change(o, c));
    }
    if o.max_queries_per_day != c.max_queries_per_day {
        changes.push(format!(
            "answers per day {:?} -> {:?}",
            o.max_queries_per_day, c.max_queries_per_day
        ));
    }
    if o.retention != c.retention {
        let (o, c) = (&o.retention, &c.retention);
        changes.push(format!(
            "retention: grace after expiry {} -> {} days, list versions kept {} -> {}, \
             longest a list is kept {:?} -> {:?} days",
            o.grace_days,
            c.grace_days,
            o.keep_versions,
            c.keep_versions,
            o.max_list_days,
            c.max_list_days
        ));
    }
    if o.protection != c.protection {
        changes.push(format!(
            "protection {:?} -> {:?}",
            o.protection, c.protection
        ));
    }
    changes
}

/// Columns newly tagged sensitive, then columns no longer tagged.
fn sensitive_changes(old: &Rules, new: &Rules) -> Vec<String> {
    let (old_sensitive, new_sensitive) =
        (old.sensitive_column_names(), new.sensitive_column_names());
    let tagged = new_sensitive
        .difference(&old_sensitive)
        .map(|column| format!("column {column} now tagged sensitive"));
    let untagged = old_sensitive
        .difference(&new_sensitive)
        .map(|column| format!("column {column} no longer tagged sensitive"));
    tagged.chain(untagged).collect()
}

/// Principals (name and role) added, then removed.
fn principal_changes(old: &Rules, new: &Rules) -> Vec<String> {
    let principals = |r: &Rules| -> BTreeSet<String> {
        r.principals
            .iter()
            .map(|p| format!("{} ({})", p.name, p.role.as_str()))
            .collect()
    };
    let (old, new) = (principals(old), principals(new));
    let added = new.difference(&old).map(|p| format!("principal {p} added"));
    let removed = old
        .difference(&new)
        .map(|p| format!("principal {p} removed"));
    added.chain(removed).collect()
}

/// The "queries that become unrunnable" section: queries someone could run before and nobody
/// can after, with the reason, sorted.
fn unrunnable(
    before: &BTreeSet<(String, String)>,
    after: &BTreeSet<(String, String)>,
    new_list: &AllowList,
) -> Vec<String> {
    let runnable = |pairs: &BTreeSet<(String, String)>| -> BTreeSet<String> {
        pairs.iter().map(|(_, q)| q.clone()).collect()
    };
    let mut unrunnable: Vec<String> = runnable(before)
        .difference(&runnable(after))
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
    unrunnable
}

/// The "access lost" and "access gained" sections: (partner, query) pairs in `from` but not in
/// `to`, as `"<partner> <verb> <query>"`.
fn moved(
    from: &BTreeSet<(String, String)>,
    to: &BTreeSet<(String, String)>,
    verb: &str,
) -> Vec<String> {
    from.difference(to)
        .map(|(p, q)| format!("{p} {verb} {q}"))
        .collect()
}

/// The "effective k" section: pairs runnable both before and after whose effective k moves.
fn k_changes(
    old: &Rules,
    new: &Rules,
    old_list: &AllowList,
    new_list: &AllowList,
    before: &BTreeSet<(String, String)>,
    after: &BTreeSet<(String, String)>,
) -> Vec<String> {
    let mut k_changes = Vec::new();
    for (partner, query_id) in before.intersection(after) {
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
    k_changes
}

/// The "consent filter" section: per contract, the members its consent filter admits before and
/// after (needs the data directory), then contracts whose members have no tokens yet.
fn consent_filter(
    old: &Rules,
    new: &Rules,
    data_dir: Option<DataDir<'_>>,
    now: DateTime<Utc>,
) -> Result<Vec<String>> {
    let Some(DataDir { dir, keys }) = data_dir else {
        return Ok(vec![
            "(give --data-dir to count the members each consent filter admits, and to be \
             warned of contracts whose members have no tokens under their key version yet)"
                .into(),
        ]);
    };
    let store = match keys {
        Some(keys) => Store::open_with_keys(dir, keys),
        None => Store::open(dir),
    }
    .with_context(|| format!("opening data directory {}", dir.display()))?;
    let (snapshot, sealed) = readable_lists(&store);
    let mut consent = Vec::new();
    let ids: BTreeSet<&String> = old.contracts.keys().chain(new.contracts.keys()).collect();
    for id in ids {
        let (b, a) = (
            consent_count(&snapshot, id, old, now)?,
            consent_count(&snapshot, id, new, now)?,
        );
        let marker = if b == a { "unchanged" } else { "changes" };
        consent.push(format!(
            "{id}: {} -> {} ({marker})",
            show_count(b),
            show_count(a)
        ));
    }
    consent.extend(missing_tokens(&snapshot, new));
    if !sealed.is_empty() {
        consent.push(format!(
            "(the lists of {} are sealed with their collaborations' keys and were not read: give \
             --config, the service's settings, to count their members)",
            sealed.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(consent)
}

/// The store's snapshot without the partners' lists it cannot open (sealed, and the store was
/// opened without its key store), and those partners.
fn readable_lists(store: &Store) -> (cleanroom_engine::store::Snapshot, BTreeSet<String>) {
    let mut snapshot = (*store.snapshot()).clone();
    let sealed: BTreeSet<String> = snapshot
        .lists
        .iter()
        .filter(|(_, list)| list.sealed().is_some() && !store.opens_sealed())
        .map(|(partner, _)| partner.clone())
        .collect();
    snapshot
        .lists
        .retain(|partner, _| !sealed.contains(partner));
    (snapshot, sealed)
}

/// Members consenting under contract `id` of `rules`, and how many of them are in the partner's
/// list (if it uploaded one); `None` when `rules` has no such contract or purpose.
fn consent_count(
    snapshot: &cleanroom_engine::store::Snapshot,
    id: &str,
    rules: &Rules,
    now: DateTime<Utc>,
) -> Result<Option<(usize, Option<usize>)>> {
    let Some(contract) = rules.contracts.get(id) else {
        return Ok(None);
    };
    let Some(requirement) = requirement(rules, &contract.purpose) else {
        return Ok(None);
    };
    let counts = cleanroom_engine::consent_counts(snapshot, id, contract, &requirement, now)
        .context("reading a partner's list")?;
    Ok(Some(counts))
}

fn show_count(c: Option<(usize, Option<usize>)>) -> String {
    match c {
        None => "no contract".to_string(),
        Some((all, None)) => format!("{all} consenting, no list yet"),
        Some((all, Some(listed))) => {
            format!("{all} consenting, {listed} of them in the partner's list")
        }
    }
}

/// Contracts whose members have no tokens under their current key version yet (added, or
/// rotated, since the last members ingest): their partners' questions over a list of that
/// version are refused, uncharged, until the members are ingested again.
fn missing_tokens(snapshot: &cleanroom_engine::store::Snapshot, rules: &Rules) -> Vec<String> {
    let mut missing = Vec::new();
    for (id, contract) in &rules.contracts {
        let line = match snapshot.member_token_versions.get(id) {
            None => "no member tokens yet".to_string(),
            Some(held) if !held.contains(&contract.key_version) => format!(
                "no member tokens under key version {} yet (the members were last ingested \
                 under {})",
                contract.key_version,
                versions_text(held)
            ),
            Some(_) => continue,
        };
        missing.push(format!(
            "warning: {id}: {line}; ingest the members again before its partner's questions \
             can be answered (they are refused, uncharged, until then)"
        ));
    }
    missing
}

fn versions_text(versions: &std::collections::BTreeSet<u32>) -> String {
    if versions.is_empty() {
        return "no version".into();
    }
    let names: Vec<String> = versions.iter().map(|v| format!("v{v}")).collect();
    names.join(", ")
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
