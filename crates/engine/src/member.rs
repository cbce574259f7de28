//! What the store holds about one member, for the records the law asks the retailer to keep and
//! disclose (APPI Arts. 30 and 33(5)): the members a partner's list names, as pseudonyms, and one
//! member's consent events. Read a batch at a time; nothing here is released to a partner.

use chrono::{DateTime, Utc};
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{Int64Type, TimestampMicrosecondType, UInt32Type};

use crate::Result;
use crate::store::Snapshot;
use crate::tables::consent;

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
            events_of(&batch?, member, &mut events);
        }
    }
    events.sort_by_key(|e| e.at);
    Ok(events)
}

fn events_of(batch: &RecordBatch, member: i64, out: &mut Vec<ConsentEvent>) {
    let members = batch
        .column(consent::MEMBER_KEY)
        .as_primitive::<Int64Type>();
    let purposes = batch.column(consent::PURPOSE).as_string::<i32>();
    let versions = batch
        .column(consent::NOTICE_VERSION)
        .as_primitive::<UInt32Type>();
    let actions = batch.column(consent::ACTION).as_string::<i32>();
    let sources = batch.column(consent::SOURCE).as_string::<i32>();
    let ats = batch
        .column(consent::AT)
        .as_primitive::<TimestampMicrosecondType>();
    let expiries = batch
        .column(consent::EXPIRES_AT)
        .as_primitive::<TimestampMicrosecondType>();
    for i in 0..batch.num_rows() {
        if members.value(i) != member {
            continue;
        }
        let Some(at) = DateTime::from_timestamp_micros(ats.value(i)) else {
            continue;
        };
        out.push(ConsentEvent {
            purpose: purposes.value(i).to_string(),
            notice_version: versions.value(i),
            action: actions.value(i).to_string(),
            at,
            source: sources.value(i).to_string(),
            expires_at: expiries
                .is_valid(i)
                .then(|| DateTime::from_timestamp_micros(expiries.value(i)))
                .flatten(),
        });
    }
}
