//! What the store holds about one member, for the records the law asks the retailer to keep and
//! disclose (APPI Arts. 30 and 33(5)): the members a partner's list names, as pseudonyms, and one
//! member's consent events. Read a batch at a time; nothing here is released to a partner.

use chrono::{DateTime, Utc};

use crate::Result;
use crate::store::Snapshot;

/// The retailer's members whose tokens for collaboration `contract_id` appear in `partner`'s
/// current list, as member pseudonyms, ascending, with that list's version (`None` without a
/// list).
pub fn list_members(
    snapshot: &Snapshot,
    contract_id: &str,
    partner: &str,
) -> Result<Option<(u32, Vec<i64>)>> {
    let Some(list) = snapshot.lists.get(partner) else {
        return Ok(None);
    };
    let matched = crate::views::matched_members(snapshot, contract_id, list)?;
    let mut members: Vec<i64> = matched.into_keys().collect();
    members.sort_unstable();
    Ok(Some((list.version, members)))
}

/// One consent event of a member, as ingested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentEvent {
    /// The purpose.
    pub purpose: String,
    /// The notice version the member saw.
    pub notice_version: u32,
    /// `granted` or `withdrawn`.
    pub action: String,
    /// When.
    pub at: DateTime<Utc>,
    /// The capture channel.
    pub source: String,
    /// When a grant lapses, if it does.
    pub expires_at: Option<DateTime<Utc>>,
}

/// Every consent event of the member with pseudonym `member`, oldest first.
pub fn consent_events(snapshot: &Snapshot, member: i64) -> Result<Vec<ConsentEvent>> {
    let mut events = Vec::new();
    for file in &snapshot.consent {
        for batch in file.batches()? {
            crate::audience::consent_rows(
                &batch?,
                |m, _| m == member,
                |_, purpose, event, source| {
                    events.push(ConsentEvent {
                        purpose: purpose.to_string(),
                        notice_version: event.notice_version,
                        action: event.action.as_str().to_string(),
                        at: event.at,
                        source: source.to_string(),
                        expires_at: event.expires_at,
                    });
                },
            );
        }
    }
    events.sort_by_key(|e| e.at);
    Ok(events)
}
