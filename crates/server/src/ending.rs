//! The end of a collaboration: an analyst asks (AdminService.RequestDestruction), a legal reviewer
//! confirms (LegalService.ConfirmDestruction), and the service destroys what the collaboration
//! left behind, in this order:
//!
//! 1. its partner's list versions and its member tokens, in one commit of the manifest (the
//!    commit point of every write; the files it no longer names are removed, and a file a crash
//!    left is removed at the next start like any replaced file);
//! 2. its stored answers;
//! 3. its keys: a tombstone, then each seed overwritten and removed ([`cleanroom_core::keys`]).
//!
//! One typed audit record ([`Event::Destroyed`]) names every file with its SHA-256 and rows and
//! the key's public id. A crash after step 1 is finished at the next start (`finish_cut`), so a
//! destruction is never left half done. Pending requests are rebuilt from the audit trail at
//! start, as approvals are; the analyst who asks cannot confirm (the legal role does).

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use cleanroom_core::keys::KeyStore;
use cleanroom_engine::ingest::IngestReport;
use cleanroom_engine::store::CommitRecord;
use cleanroom_proto::v1::{DestroyedFile as WireFile, DestructionStatus};

use crate::Result;
use crate::audit::{Destruction, Entry, Event};
use crate::context::Call;
use crate::requests::Pending;
use crate::state::App;
use cleanroom_engine::guard::admission::shown;

/// The longest reason kept.
const MAX_REASON_CHARS: usize = 2000;

/// Checks an analyst's request and records it in `entry`; it takes effect once the audit trail
/// holds it ([`asked`]).
pub(crate) fn request(
    app: &App,
    call: &Call,
    entry: &mut Entry,
    contract_id: &str,
    reason: &str,
) -> Result<(DestructionStatus, Pending)> {
    call.require(cleanroom_core::rules::Role::Analyst, "RequestDestruction")?;
    let contract = call.live.rules.contracts.get(contract_id).ok_or_else(|| {
        cleanroom_core::Error::NotFound(format!("no contract `{}`", shown(contract_id)))
    })?;
    entry.partner = Some(contract.partner.clone());
    let reason: String = reason.trim().chars().take(MAX_REASON_CHARS).collect();
    if reason.is_empty() {
        return Err(cleanroom_core::Error::Input("a destruction needs a reason".into()).into());
    }
    if let Some(ended) = app.keys.tombstone(contract_id, contract.key_version)? {
        return Err(ended.refusal().into());
    }
    if let Some(waiting) = app.destruction_requests.get(contract_id)
        && waiting.reason == reason
        && waiting.requested_by == call.principal.name
    {
        // Sent again (its answer lost on the way): the request already waiting, not a second.
        return Ok((status_of(contract_id, "requested", &waiting), waiting));
    }
    entry.event = Some(Event::DestructionRequested {
        contract: contract_id.to_string(),
        reason: reason.clone(),
    });
    let pending = Pending {
        partner: contract.partner.clone(),
        reason,
        requested_by: call.principal.name.clone(),
    };
    Ok((status_of(contract_id, "requested", &pending), pending))
}

/// Makes a recorded request pending.
pub(crate) fn asked(app: &App, contract: &str, pending: Pending) {
    app.destruction_requests.insert(contract, pending);
}

/// Confirms a pending request and destroys the collaboration (module docs), recording what was
/// destroyed in `entry`.
pub(crate) async fn confirm(
    app: &std::sync::Arc<App>,
    call: &Call,
    entry: &mut Entry,
    contract: &str,
) -> Result<DestructionStatus> {
    let Some(pending) = app.destruction_requests.get(contract) else {
        // A confirmation sent again because its answer was lost: the destruction as recorded.
        if let Some(done) = already_destroyed(app, contract).await? {
            return Ok(done);
        }
        return Err(cleanroom_core::Error::Precondition(format!(
            "no pending request to end contract `{}`: an analyst asks first (RequestDestruction)",
            shown(contract)
        ))
        .into());
    };
    entry.partner = Some(pending.partner.clone());
    let facts = call.write_facts(
        "ConfirmDestruction",
        Some(&pending.partner),
        None,
        &IngestReport::default(),
    );
    let ending = Ending {
        contract: contract.to_string(),
        partner: pending.partner.clone(),
        current_version: call
            .live
            .rules
            .contracts
            .get(contract)
            .map(|c| c.key_version),
        reason: pending.reason.clone(),
        requested_by: pending.requested_by.clone(),
    };
    let owned = std::sync::Arc::clone(app);
    let (record, destruction) =
        crate::state::blocking(move || destroy(&owned, &ending, facts)).await?;
    entry.committed(&record);
    let status = destroyed_status(&destruction, &call.principal.name, call.now);
    entry.event = Some(Event::Destroyed(Box::new(destruction)));
    app.destruction_requests.remove(contract);
    Ok(status)
}

/// The answer a confirmation got, for `contract` destroyed before: read from its typed audit
/// record (the latest, should there be several), so a legal reviewer's client that retries sees
/// the destruction that happened and nothing is done again. `None` if none is recorded.
async fn already_destroyed(
    app: &std::sync::Arc<App>,
    contract: &str,
) -> Result<Option<DestructionStatus>> {
    let path = app.audit.path().to_path_buf();
    let trail = crate::state::blocking(move || crate::audit::read(&path)).await?;
    let found = trail
        .iter()
        .rev()
        .find_map(|record| match &record.entry.event {
            Some(Event::Destroyed(d)) if d.contract == contract && record.entry.outcome == "ok" => {
                Some((record, d))
            }
            _ => None,
        });
    let Some((record, destruction)) = found else {
        return Ok(None);
    };
    let at = DateTime::parse_from_rfc3339(&record.at)
        .map_err(|e| crate::Error::Internal(format!("an audit record's time: {e}")))?
        .with_timezone(&Utc);
    Ok(Some(destroyed_status(
        destruction,
        &record.entry.principal,
        at,
    )))
}

/// A collaboration to destroy, and on whose word.
struct Ending {
    contract: String,
    partner: String,
    /// The rules' key version, destroyed even if it was never made.
    current_version: Option<u32>,
    reason: String,
    requested_by: String,
}

/// Destroys a collaboration in the order the module docs give: its files (one commit), its
/// stored answers, its keys. Returns the commit and what was destroyed.
fn destroy(
    app: &App,
    ending: &Ending,
    facts: cleanroom_engine::store::WriteFacts,
) -> Result<(CommitRecord, Destruction)> {
    let now = facts.at;
    let (record, files) =
        app.store
            .commit_destruction(&ending.contract, &ending.partner, &ending.reason, facts)?;
    crate::faults::pause_point("end:committed");
    let stored_answers = app.guard.forget_answers(&ending.partner)?;
    app.guard.forget_kept_audiences();
    crate::faults::pause_point("end:answers-forgotten");
    let (key_version, key_id) = destroy_keys(
        &app.keys,
        &ending.contract,
        ending.current_version,
        &ending.reason,
        now,
    )?;
    let destruction = Destruction {
        contract: ending.contract.clone(),
        partner: ending.partner.clone(),
        reason: ending.reason.clone(),
        requested_by: ending.requested_by.clone(),
        key_version,
        key_id,
        files,
        stored_answers,
    };
    Ok((record, destruction))
}

/// Destroys every collaboration whose contract is past its last day plus its grace period (in
/// the retailer's local time) and not destroyed yet, each with its own audit record (method
/// `Sweep`, reason `expiry`). Runs at start and then every minute, so a contract ends within a
/// minute of local midnight and a reload that shortens a contract takes effect at once. Returns
/// how many it destroyed.
pub(crate) fn sweep(app: &App) -> Result<usize> {
    let live = app.live();
    let now = app.clock.now();
    let today = live.rules.retailer.today(now);
    let mut ended = 0;
    for (id, contract) in &live.rules.contracts {
        let due = today >= contract.destruction_day();
        if !due || app.keys.tombstone(id, contract.key_version)?.is_some() {
            continue;
        }
        end_by_rules(app, id, &contract.partner, contract.key_version, "expiry")?;
        ended += 1;
    }
    purge_receipts(app, today, now)?;
    Ok(ended)
}

/// Purges the records of receipt whose keeping period ([`crate::receipts::KEEP_DAYS`] after
/// their day of receipt, whatever the retention rules say) ended before `today`, recording the
/// purge in the trail first: once, since a purge a crash cut after its record is finished
/// without a second one.
fn purge_receipts(app: &App, today: chrono::NaiveDate, now: DateTime<Utc>) -> Result<()> {
    let purged = app.receipts.purge(today, |purged| {
        if purge_recorded(app, purged)? {
            return Ok(());
        }
        let entry = Entry {
            principal: "retention rules".into(),
            role: "service".into(),
            method: "PurgeReceipts".into(),
            outcome: "ok".into(),
            event: Some(Event::ReceiptsPurged {
                records: purged.records,
                through_seq: purged.base.seq,
                head: purged.base.head.clone(),
                newest_received_on: purged.newest_received_on,
            }),
            ..Entry::default()
        };
        app.audit.append(entry, now).map(|_| ())
    })?;
    if let Some(purged) = purged {
        tracing::info!(
            records = purged.records,
            "records of receipt purged after their keeping period"
        );
    }
    Ok(())
}

/// Whether the trail already records the purge through `purged`'s new start: read only when a
/// purge is due, at most once a day.
fn purge_recorded(app: &App, purged: &crate::receipts::Purged) -> Result<bool> {
    let trail = crate::audit::read(app.audit.path())?;
    Ok(trail.iter().rev().any(|r| {
        matches!(&r.entry.event, Some(Event::ReceiptsPurged { through_seq, head, .. })
            if *through_seq == purged.base.seq && *head == purged.base.head)
    }))
}

/// Destroys one collaboration on the rules' word (its expiry, or its removal from the rules),
/// with one audit record (method `Sweep`, principal `retention rules`).
pub(crate) fn end_by_rules(
    app: &App,
    contract: &str,
    partner: &str,
    key_version: u32,
    reason: &str,
) -> Result<()> {
    let now = app.clock.now();
    let ending = Ending {
        contract: contract.to_string(),
        partner: partner.to_string(),
        current_version: Some(key_version),
        reason: reason.to_string(),
        requested_by: "retention rules".into(),
    };
    let facts = cleanroom_engine::store::WriteFacts {
        at: now,
        method: cleanroom_engine::store::SWEEP.into(),
        partner: Some(partner.to_string()),
        request_id: None,
        report: IngestReport::default(),
    };
    let (record, destruction) = destroy(app, &ending, facts)?;
    crate::faults::pause_point("end:keys-destroyed");
    let mut entry = Entry {
        principal: "retention rules".into(),
        role: "service".into(),
        partner: Some(partner.to_string()),
        method: cleanroom_engine::store::SWEEP.into(),
        outcome: "ok".into(),
        ..Entry::default()
    };
    entry.committed(&record);
    entry.event = Some(Event::Destroyed(Box::new(destruction)));
    app.audit.append(entry, now)?;
    app.destruction_requests.remove(contract);
    tracing::info!(contract = %contract, reason, "collaboration destroyed by its rules");
    Ok(())
}

/// Destroys every key the store holds for `contract` (every version) and the `current` version
/// of the rules even if it was never made (its tombstone keeps the collaboration ended). Returns
/// the newest version and its public id.
fn destroy_keys(
    keys: &KeyStore,
    contract: &str,
    current: Option<u32>,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<(u32, String)> {
    let mut held: Vec<u32> = keys
        .status()?
        .into_iter()
        .filter(|k| k.contract == contract && k.destroyed.is_none())
        .map(|k| k.version)
        .collect();
    held.extend(current.filter(|v| !held.contains(v)));
    let mut newest = (0, "never made".to_string());
    for version in held {
        let tombstone = keys.destroy(contract, version, reason, now)?;
        if version >= newest.0 {
            newest = (version, tombstone.key_id);
        }
    }
    Ok(newest)
}

/// Finishes destructions a crash cut after their commit: a commit that ended a collaboration
/// whose stored answers or keys are still there, or whose typed audit record is missing from
/// `recorded` (the crash came before it). The record is then written from the commit (files,
/// hashes, rows, reason) and the key store, so every destruction has its proof. Run at start,
/// before any call is served.
pub(crate) fn finish_cut(
    app: &App,
    log: &[CommitRecord],
    recorded: &BTreeSet<u64>,
    now: DateTime<Utc>,
) -> Result<()> {
    for record in log {
        let (Some(contract), Some(partner)) = (&record.ended, &record.partner) else {
            continue;
        };
        let answers = app.guard.forget_answers(partner)?;
        let keys_left = app
            .keys
            .status()?
            .iter()
            .any(|k| &k.contract == contract && k.destroyed.is_none());
        let has_record = recorded.contains(&record.seq);
        if has_record && answers == 0 && !keys_left {
            continue;
        }
        tracing::warn!(
            contract = %contract,
            stored_answers = answers,
            "finishing a destruction a crash cut short"
        );
        let reason = record.reason.as_deref().unwrap_or("manual");
        let (key_version, key_id) = match destroy_keys(&app.keys, contract, None, reason, now)? {
            (0, _) => newest_destroyed(&app.keys, contract)?,
            destroyed => destroyed,
        };
        if !has_record {
            let key = (key_version, key_id);
            record_cut(app, record, (contract, partner), reason, key, answers, now)?;
        }
    }
    Ok(())
}

/// Writes the typed record of a destruction a crash cut before it, from its commit: the
/// reason and requester of the pending request if there was one, else the commit's reason.
fn record_cut(
    app: &App,
    record: &CommitRecord,
    (contract, partner): (&String, &String),
    reason: &str,
    (key_version, key_id): (u32, String),
    stored_answers: u64,
    now: DateTime<Utc>,
) -> Result<()> {
    let pending = app.destruction_requests.get(contract);
    let destruction = Destruction {
        contract: contract.clone(),
        partner: partner.clone(),
        reason: pending.as_ref().map_or(reason, |p| &p.reason).to_string(),
        requested_by: pending.map_or_else(|| "retention rules".into(), |p| p.requested_by),
        key_version,
        key_id,
        files: record.destroyed.clone(),
        stored_answers,
    };
    let mut entry = Entry {
        principal: "service".into(),
        role: "service".into(),
        partner: Some(partner.clone()),
        method: record.method.clone(),
        outcome: "ok".into(),
        ..Entry::default()
    };
    entry.committed(record);
    entry.event = Some(Event::Destroyed(Box::new(destruction)));
    app.audit.append(entry, now)?;
    app.destruction_requests.remove(contract);
    tracing::warn!(contract = %contract, "a destruction's record a crash cut was written");
    Ok(())
}

/// The newest destroyed key of `contract`: its version and public id.
fn newest_destroyed(keys: &KeyStore, contract: &str) -> Result<(u32, String)> {
    Ok(keys
        .status()?
        .into_iter()
        .filter(|k| k.contract == contract && k.destroyed.is_some())
        .max_by_key(|k| k.version)
        .map_or((0, "never made".to_string()), |k| (k.version, k.key_id)))
}

/// The commits the trail's destruction records name.
pub(crate) fn recorded_destructions(history: &[crate::audit::Record]) -> BTreeSet<u64> {
    history
        .iter()
        .filter(|r| matches!(r.entry.event, Some(Event::Destroyed(_))))
        .filter_map(|r| r.entry.commit)
        .collect()
}

fn status_of(contract: &str, state: &str, pending: &Pending) -> DestructionStatus {
    DestructionStatus {
        contract_id: contract.to_string(),
        state: state.to_string(),
        reason: pending.reason.clone(),
        requested_by: pending.requested_by.clone(),
        ..Default::default()
    }
}

fn destroyed_status(d: &Destruction, confirmed_by: &str, at: DateTime<Utc>) -> DestructionStatus {
    DestructionStatus {
        contract_id: d.contract.clone(),
        state: "destroyed".into(),
        reason: d.reason.clone(),
        requested_by: d.requested_by.clone(),
        confirmed_by: confirmed_by.to_string(),
        destroyed_at: at.to_rfc3339(),
        key_version: d.key_version,
        key_id: d.key_id.clone(),
        files: d
            .files
            .iter()
            .map(|f| WireFile {
                name: f.name.clone(),
                sha256: f.sha256.clone(),
                rows: f.rows,
            })
            .collect(),
        stored_answers: d.stored_answers,
        audit_id: String::new(),
    }
}

impl crate::context::Audited for DestructionStatus {
    fn set_audit_id(&mut self, id: String) {
        self.audit_id = id;
    }
}
