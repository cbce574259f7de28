//! A member's erasure (AdminService.EraseMembers): an analyst names members by the retailer's
//! member id; each becomes its pseudonym at once (the id is kept nowhere), and the store removes
//! their rows from the member table, every collaboration's member tokens, the purchases and the
//! consent log in one commit, leaving a withdrawal tombstone per purpose under a keyed digest of
//! its own ([`cleanroom_engine::tables::erasures`]). The audit record ([`Event::Erased`]) holds
//! counts only.
//!
//! What stays, on purpose: records of receipt name members by a digest under their own key
//! ([`crate::receipts`]) and are kept three years by law whatever else happens; the privacy
//! ledger's charges stay (an erasure refills no budget); partners' lists are the partners' data
//! and hold none of the retailer's member ids. Stored answers over the old data are never served
//! again: every commit makes a new data version, which answers are keyed on.

use std::collections::HashSet;
use std::sync::Arc;

use cleanroom_core::rules::Role;
use cleanroom_engine::ingest::IngestReport;
use cleanroom_engine::store::{CommitRecord, ERASE_MEMBERS, Erased, ErasureAsk};
use cleanroom_proto::v1::{EraseMembersRequest, ErasureSummary};

use crate::Result;
use crate::audit::{Entry, ErasureCounts, Event};
use crate::context::Call;
use crate::retry::Claim;
use crate::state::App;

/// The most member ids one call may erase: the request is one message, bounded as the stream
/// chunks of an ingest are.
pub const MAX_MEMBERS: usize = 10_000;

/// The longest member id accepted, in characters.
pub const MAX_ID_CHARS: usize = 256;

/// Erases the members `member_ids` names (module docs), recording the counts in `entry`.
pub(crate) async fn erase(
    app: &Arc<App>,
    call: &Call,
    entry: &mut Entry,
    asked: &EraseMembersRequest,
) -> Result<ErasureSummary> {
    call.require(Role::Analyst, ERASE_MEMBERS)?;
    let member_ids = &asked.member_ids;
    let members = pseudonyms(app, member_ids)?;
    let request_id = crate::retry::parse(&asked.request_id)?;
    entry.request_id = request_id.clone();
    let _slot = match app.claim_write(ERASE_MEMBERS, None, request_id.as_deref())? {
        Claim::Replay(record) => return replayed(app, entry, &record),
        Claim::Run(slot) => slot,
    };
    let asked = members.len() as u64;
    let report = IngestReport {
        received: member_ids.len() as u64,
        accepted: asked,
        ..IngestReport::default()
    };
    let facts = call.write_facts(ERASE_MEMBERS, None, request_id.as_deref(), &report);
    let purposes: Vec<String> = call.live.rules.purposes.keys().cloned().collect();
    let (owned, at) = (Arc::clone(app), call.now);
    let (record, erased) = crate::state::blocking(move || {
        let digests = owned.secret.member_digest_key("erasure");
        let ask = ErasureAsk {
            members: &members,
            digests: &digests,
            purposes: &purposes,
            at,
            restored: &std::collections::BTreeMap::new(),
            before_commit: &|| crate::faults::pause_point("erase:staged"),
        };
        let done = owned.store.commit_erasure(&ask, facts)?;
        // The kept matched lists name the erased members' pseudonyms.
        owned.guard.forget_kept_audiences();
        crate::faults::pause_point("erase:committed");
        Ok(done)
    })
    .await?;
    entry.committed(&record);
    let summary = summary_of(asked, &erased, record.seq);
    entry.event = Some(Event::Erased(Box::new(ErasureCounts {
        members_asked: asked,
        members_found: erased.members_found,
        rows_removed: erased.rows_removed,
        tombstones: erased.tombstones,
        files_replaced: erased.files_replaced,
        requested_by: call.principal.name.clone(),
    })));
    Ok(summary)
}

/// The pseudonyms of the members asked (an id given twice counts once). The ids themselves are
/// checked and dropped here: an error names an id by its position, never its text.
/// The answer to a retry of an erasure committed before under its request id: the original
/// counts, from the audit record of its commit, and nothing erased again. (The answer's
/// `audit_id` is this call's own record, which names the commit it replayed.)
fn replayed(app: &App, entry: &mut Entry, record: &CommitRecord) -> Result<ErasureSummary> {
    entry.replayed(record);
    let trail = crate::audit::read(app.audit.path())?;
    let original = trail.iter().rev().find_map(|r| match &r.entry.event {
        Some(Event::Erased(counts)) if r.entry.commit == Some(record.seq) => Some(counts),
        _ => None,
    });
    let Some(counts) = original else {
        return Err(crate::Error::Internal(format!(
            "erasure commit {} has no erasure record in the audit trail",
            record.seq
        )));
    };
    let erased = Erased {
        members_found: counts.members_found,
        rows_removed: counts.rows_removed.clone(),
        tombstones: counts.tombstones,
        files_replaced: counts.files_replaced,
    };
    let mut summary = summary_of(counts.members_asked, &erased, record.seq);
    summary.already_committed = true;
    Ok(summary)
}

fn pseudonyms(app: &App, member_ids: &[String]) -> Result<HashSet<i64>> {
    let bad = |why: String| crate::Error::from(cleanroom_core::Error::Input(why));
    if member_ids.is_empty() {
        return Err(bad("no member id to erase".into()));
    }
    if member_ids.len() > MAX_MEMBERS {
        return Err(bad(format!(
            "at most {MAX_MEMBERS} member ids a call, got {}: erase them in several calls",
            member_ids.len()
        )));
    }
    let key = app.secret.pseudonym_key();
    let mut members = HashSet::with_capacity(member_ids.len());
    for (at, id) in member_ids.iter().enumerate() {
        if id.trim().is_empty() {
            return Err(bad(format!("member_ids[{at}]: blank")));
        }
        if id.chars().count() > MAX_ID_CHARS {
            return Err(bad(format!(
                "member_ids[{at}]: longer than {MAX_ID_CHARS} characters"
            )));
        }
        members.insert(key.pseudonym(id));
    }
    Ok(members)
}

/// The call's answer: counts only.
fn summary_of(asked: u64, erased: &Erased, commit: u64) -> ErasureSummary {
    let rows = |table: &str| erased.rows_removed.get(table).copied().unwrap_or(0);
    ErasureSummary {
        members_asked: asked,
        members_found: erased.members_found,
        member_rows: rows("members"),
        member_token_rows: rows("member_tokens"),
        purchase_rows: rows("purchases"),
        consent_rows: rows("consent"),
        tombstones: erased.tombstones,
        files_replaced: erased.files_replaced,
        commit,
        audit_id: String::new(),
        already_committed: false,
    }
}
