//! Rotation with an overlap ([`cleanroom_core::keys::Retiring`]): raising a contract's
//! `key_version` keeps the previous version usable for its `key_overlap_days` (lists of either
//! version are received and matched; a members ingest computes tokens under both), and at the
//! end of the overlap the sweep destroys it, in this order:
//!
//! 1. its member tokens (the member-tokens file rewritten without them) and the partner's list
//!    versions under it, in one commit of the manifest (stored answers over those list versions
//!    go next; a crash between is finished at the next start, as for any list retention);
//! 2. its key: a tombstone (reason `rotation`), then the seed overwritten and removed;
//! 3. one typed audit record ([`Event::Retired`], what `key version`, reason `rotation`) naming
//!    each file with its SHA-256 and rows and the destroyed key's version and public id.
//!
//! A crash at any step is finished by the next sweep (at start-up): the overlap stays ended
//! (its anchor is in the key store), step 1 finds nothing left and the key is destroyed. From
//! then on an upload or a question under the old version is refused, uncharged, naming the day.
//! The sweep runs at start, every minute and right after a reload.

use chrono::{DateTime, Utc};
use cleanroom_core::keys::{ROTATION, Retiring};
use cleanroom_core::rules::{Contract, Rules};
use cleanroom_engine::ingest::ListKeys;
use cleanroom_engine::store::{Rotated, TokensRemoved};

use crate::Result;
use crate::audit::Retirement;
use crate::state::App;

/// Who destroys a key version whose overlap ended, as audit records name it.
const RULES: &str = "retention rules";

/// Destroys every old key version whose overlap has ended (module docs); returns how many.
pub(crate) fn sweep(app: &App) -> Result<usize> {
    let live = app.live();
    let now = app.clock.now();
    let mut done = 0;
    for (id, contract) in &live.rules.contracts {
        if app.keys.tombstone(id, contract.key_version)?.is_some() {
            continue;
        }
        let retiring =
            app.keys
                .retiring(id, contract.key_version, contract.key_overlap_days, now)?;
        for old in retiring.iter().filter(|old| old.ended(now)) {
            if !end_overlap(app, &live.rules, id, contract, old)? {
                break;
            }
            done += 1;
        }
    }
    Ok(done)
}

/// The keys an upload for `contract` is checked against at `now`: the current one, the older
/// versions still in their overlap, the versions a rotation destroyed, and the version of the
/// partner's stored list.
pub(crate) fn list_keys(
    app: &App,
    id: &str,
    contract: &Contract,
    now: DateTime<Utc>,
) -> Result<ListKeys> {
    let current = contract.key_version;
    let live = app
        .keys
        .live_versions(id, current, contract.key_overlap_days, now)?;
    let mut destroyed = Vec::new();
    for key in app.keys.status()? {
        if key.contract != id || key.version >= current || key.destroyed.is_none() {
            continue;
        }
        destroyed.extend(app.keys.tombstone(id, key.version)?);
    }
    let stored = app
        .store
        .snapshot()
        .lists
        .get(&contract.partner)
        .and_then(|list| list.key_versions.iter().max().copied());
    Ok(ListKeys {
        contract: id.to_string(),
        current: app.keys.key(id, current, now)?,
        older: live.into_iter().filter(|v| *v != current).collect(),
        destroyed,
        stored,
    })
}

/// Ends the overlap of one old version (module docs). Returns `false` when a list version under
/// it is being read: a later sweep ends it.
fn end_overlap(
    app: &App,
    rules: &Rules,
    id: &str,
    contract: &Contract,
    old: &Retiring,
) -> Result<bool> {
    let now = app.clock.now();
    let partner = &contract.partner;
    let facts = crate::retention::sweep_facts(now, Some(partner));
    let today = rules.retailer.today(now);
    let (record, removed) = match app.store.commit_rotation(
        id,
        partner,
        old.version,
        today,
        facts,
    )? {
        Rotated::Deferred => {
            tracing::info!(contract = %id, version = old.version, "a list version under an old key is being read; a later sweep ends its overlap");
            return Ok(false);
        }
        Rotated::Nothing => (None, TokensRemoved::default()),
        Rotated::Done(done) => {
            let (record, removed) = *done;
            (Some(record), removed)
        }
    };
    crate::faults::pause_point("rotation:committed");
    let stored_answers = match removed.through_list_version {
        Some(through) => app.guard.forget_answers_through(partner, through)?,
        None => 0,
    };
    let tombstone = app.keys.destroy(id, old.version, ROTATION, now)?;
    crate::faults::pause_point("rotation:key-destroyed");
    let retirement = Retirement {
        what: "key version".into(),
        contract: Some(id.to_string()),
        partner: Some(partner.clone()),
        reason: ROTATION.into(),
        rule: format!(
            "key_overlap_days = {} (key version {} made {}, overlap ended {})",
            contract.key_overlap_days,
            contract.key_version,
            old.replaced_at.to_rfc3339(),
            old.ends.to_rfc3339()
        ),
        requested_by: RULES.into(),
        key_id: Some(tombstone.key_id),
        key_version: Some(old.version),
        through_version: removed.through_list_version,
        files: removed.removed,
        written: removed.written,
        removed_rows: removed.removed_rows,
        stored_answers,
    };
    crate::retention::append_record(app, Some(partner), record.as_ref(), retirement, now)?;
    tracing::info!(contract = %id, version = old.version, "key version destroyed at the end of its rotation overlap");
    Ok(true)
}
