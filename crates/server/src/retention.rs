//! The retention rules at work while a collaboration runs (its end is [`crate::ending`]'s):
//!
//! - list versions beyond a contract's `retention.keep_versions` are destroyed after each upload,
//!   once no answer is being computed over them (an answer holds the snapshot naming its list
//!   version; while one does, the destruction waits for the next sweep, a minute later);
//! - a list older than `retention.max_list_days` is destroyed with every older version, and the
//!   partner's questions are then refused, naming the day, until it uploads a new list;
//! - purchases older than `[retention] purchases_days` are removed from the purchases files,
//!   once a day (at start and when the retailer's local date changes);
//! - a contract a reload removes from the rules ends at once, as an expired one does.
//!
//! Each is one commit of the manifest and one typed audit record ([`Event::Retired`], method
//! `Sweep`, principal `retention rules`), naming each file with its SHA-256 and rows. Stored
//! answers computed over a destroyed list version are destroyed with it; a crash between the
//! commit and that is finished at the next start ([`finish_cut`]). Member tokens and the key
//! are untouched: only the collaboration's end destroys them. A sweep with nothing due writes
//! nothing.

use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use cleanroom_core::rules::{Contract, Rules};
use cleanroom_engine::ingest::IngestReport;
use cleanroom_engine::store::{CommitRecord, SWEEP, WriteFacts};

use crate::Result;
use crate::audit::{Entry, Event, Retirement};
use crate::state::App;

/// Who destroys under the retention rules, as audit records name it.
const RULES: &str = "retention rules";

/// How long an upload waits for answers still reading the version it superseded before it
/// leaves that version to the minute's sweep.
const WAIT_FOR_READERS: std::time::Duration = std::time::Duration::from_secs(2);

/// What the list rules of one contract did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lists {
    /// Nothing was due.
    Kept,
    /// A version due is being read; a later sweep destroys it.
    Deferred,
    /// Versions were destroyed.
    Destroyed,
}

/// Applies every retention rule that is due (module docs); returns how many destructions it
/// made. Runs at start, every minute, and after each list upload.
pub(crate) fn sweep(app: &App) -> Result<usize> {
    let live = app.live();
    let today = live.rules.retailer.today(app.clock.now());
    let mut done = 0;
    for (id, contract) in &live.rules.contracts {
        if app.keys.tombstone(id, contract.key_version)?.is_some() {
            continue;
        }
        done += usize::from(retire_lists(app, &live.rules, id, contract)? == Lists::Destroyed);
    }
    let mut swept_on = app
        .purchases_swept_on
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if *swept_on != Some(today) {
        done += usize::from(remove_old_purchases(app, &live.rules, today)?);
        *swept_on = Some(today);
    }
    Ok(done)
}

/// Applies the list rules of the contract of `partner` right after its upload: the superseded
/// version goes now, or once the answers being computed over it end, within
/// [`WAIT_FOR_READERS`] (else the minute's sweep destroys it). A failure is logged: the upload
/// stands, and the sweep tries again.
pub(crate) fn after_upload(app: &App, partner: &str) {
    let live = app.live();
    let Some((id, contract)) = live.rules.contract_of(partner) else {
        return;
    };
    let until = std::time::Instant::now() + WAIT_FOR_READERS;
    loop {
        match retire_lists(app, &live.rules, id, contract) {
            Ok(Lists::Deferred) if std::time::Instant::now() < until => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Ok(_) => return,
            Err(e) => {
                tracing::error!(error = %e, contract = %id, "list retention after an upload failed");
                return;
            }
        }
    }
}

/// Destroys the list versions of `contract` its rules no longer keep: all of them when the
/// newest is older than `max_list_days`, else those beyond `keep_versions` (not while an answer
/// is being computed over one: then a later sweep does).
fn retire_lists(app: &App, rules: &Rules, id: &str, contract: &Contract) -> Result<Lists> {
    let now = app.clock.now();
    let today = rules.retailer.today(now);
    let versions = app.store.list_versions(&contract.partner);
    let Some(newest) = versions.last() else {
        return Ok(Lists::Kept);
    };
    let retention = &contract.retention;
    let expired = newest
        .uploaded
        .and_then(|at| contract.list_destruction_day(rules.retailer.today(at)))
        .is_some_and(|day| today >= day);
    let keep = usize::try_from(retention.keep_versions).unwrap_or(usize::MAX);
    let (through, rule, destroyed_on) = if expired {
        let days = retention.max_list_days.unwrap_or_default();
        (
            newest.version,
            format!("max_list_days = {days}"),
            Some(today),
        )
    } else if versions.len() > keep {
        let through = versions[versions.len() - keep - 1].version;
        (through, format!("keep_versions = {keep}"), None)
    } else {
        return Ok(Lists::Kept);
    };
    let partner = &contract.partner;
    let Some((record, files)) = app.store.commit_list_retention(
        partner,
        through,
        destroyed_on,
        sweep_facts(now, Some(partner)),
    )?
    else {
        tracing::info!(contract = %id, "a list version to destroy is being read; a later sweep destroys it");
        return Ok(Lists::Deferred);
    };
    crate::faults::pause_point("lists:committed");
    let stored_answers = app.guard.forget_answers_through(partner, through)?;
    let current = app
        .store
        .snapshot()
        .lists
        .get(partner)
        .map(|l| l.digest.clone());
    app.guard.forget_destroyed_matches(id, current.as_deref());
    let key_id = app
        .keys
        .status()?
        .into_iter()
        .find(|k| k.contract == id && k.version == contract.key_version)
        .map(|k| k.key_id);
    let retirement = Retirement {
        what: "list versions".into(),
        contract: Some(id.to_string()),
        partner: Some(partner.clone()),
        rule,
        key_id,
        through_version: Some(through),
        files,
        stored_answers,
        ..retirement()
    };
    append_record(app, Some(partner), Some(&record), retirement, now)?;
    tracing::info!(contract = %id, through_version = through, "list versions destroyed by the retention rules");
    Ok(Lists::Destroyed)
}

/// Removes the purchases `[retention] purchases_days` no longer keeps on `today`; returns
/// whether any were.
fn remove_old_purchases(app: &App, rules: &Rules, today: NaiveDate) -> Result<bool> {
    let Some(day) = rules.retention.purchases_kept_from(today) else {
        return Ok(false);
    };
    let now = app.clock.now();
    let kept_from = local_midnight(rules, day);
    let Some((record, removed)) =
        app.store
            .commit_purchase_retention(kept_from, day, sweep_facts(now, None))?
    else {
        return Ok(false);
    };
    let days = rules.retention.purchases_days.unwrap_or_default();
    let retirement = Retirement {
        what: "purchases".into(),
        rule: format!("purchases_days = {days} (kept from {day})"),
        files: removed.removed,
        written: removed.written,
        removed_rows: removed.removed_rows,
        ..retirement()
    };
    append_record(app, None, Some(&record), retirement, now)?;
    tracing::info!(rows = removed.removed_rows, kept_from = %day, "old purchases removed by the retention rules");
    Ok(true)
}

/// The first instant of `day` in the retailer's local time.
fn local_midnight(rules: &Rules, day: NaiveDate) -> DateTime<Utc> {
    let local = day.and_time(NaiveTime::MIN);
    (local - rules.retailer.offset()).and_utc()
}

/// Ends every collaboration whose contract the rules in force no longer hold, though `before`
/// (the rules a reload replaced) did, as an expired one ends (reason `removed from the rules`).
/// Returns how many it ended.
pub(crate) fn end_removed(app: &App, before: &Rules) -> Result<usize> {
    let live = app.live();
    let mut ended = 0;
    for (id, contract) in &before.contracts {
        if live.rules.contracts.contains_key(id)
            || app.keys.tombstone(id, contract.key_version)?.is_some()
        {
            continue;
        }
        crate::ending::end_by_rules(
            app,
            id,
            &contract.partner,
            contract.key_version,
            "removed from the rules",
        )?;
        ended += 1;
    }
    Ok(ended)
}

/// Finishes list retentions a crash cut after their commit: the stored answers over the
/// versions destroyed. Run at start, before any call is served; the newest such commit of each
/// partner covers the older ones.
pub(crate) fn finish_cut(app: &App, log: &[CommitRecord]) -> Result<()> {
    let mut newest = std::collections::BTreeMap::new();
    for (partner, through) in log.iter().filter_map(CommitRecord::retired_lists) {
        newest.insert(partner, through);
    }
    for (partner, through) in newest {
        let forgotten = app.guard.forget_answers_through(partner, through)?;
        if forgotten > 0 {
            tracing::warn!(
                stored_answers = forgotten,
                "finishing a list retention a crash cut short"
            );
        }
    }
    Ok(())
}

/// What the service's own destructions commit under.
pub(crate) fn sweep_facts(now: DateTime<Utc>, partner: Option<&String>) -> WriteFacts {
    WriteFacts {
        at: now,
        method: SWEEP.into(),
        partner: partner.cloned(),
        request_id: None,
        report: IngestReport::default(),
    }
}

/// The fields every retention shares.
fn retirement() -> Retirement {
    Retirement {
        reason: "retention".into(),
        requested_by: RULES.into(),
        ..Retirement::default()
    }
}

/// Appends the audit record of what the rules retired (a retention, or a rotation's end), with
/// its commit if the store held anything.
pub(crate) fn append_record(
    app: &App,
    partner: Option<&str>,
    committed: Option<&CommitRecord>,
    retirement: Retirement,
    now: DateTime<Utc>,
) -> Result<()> {
    let mut entry = Entry {
        principal: RULES.into(),
        role: "service".into(),
        partner: partner.map(str::to_string),
        method: SWEEP.into(),
        outcome: "ok".into(),
        ..Entry::default()
    };
    if let Some(record) = committed {
        entry.committed(record);
    }
    entry.event = Some(Event::Retired(Box::new(retirement)));
    app.audit.append(entry, now)?;
    Ok(())
}
