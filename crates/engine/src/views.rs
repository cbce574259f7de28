//! The per-collaboration safe views. For one query they hold only the members who are both in the
//! partner's current list and consented to the contract's purpose at the current notice version,
//! evaluated at query time, and no column that identifies anyone: no member id, no token, no
//! identifier. They are the only tables a query's SQL can name.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use cleanroom_core::consent::{self, Action, Event, Requirement};
use cleanroom_core::rules::{Contract, UNKNOWN_ATTRIBUTE};
use datafusion::arrow::array::{Array, AsArray, BooleanArray, RecordBatch, StringArray};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::{
    DataType, Field, Int64Type, Schema, TimestampMicrosecondType, UInt32Type,
};
use datafusion::datasource::MemTable;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::Result;
use crate::ingest::purchases_schema;
use crate::store::{PartnerList, Snapshot};

/// Names of the tables a query may read. Nothing else is registered in a query's session.
pub const SAFE_VIEWS: &[&str] = &["members", "purchases"];

/// The column of every safe view that carries the member pseudonym. It may be joined on and
/// counted, never output.
pub const MEMBER_KEY: &str = "member_key";

/// Safe views built for one query.
pub struct SafeViews {
    /// The `members` view.
    pub members: Vec<RecordBatch>,
    /// The `purchases` view.
    pub purchases: Vec<RecordBatch>,
}

/// Schema of the `members` view.
pub fn members_view_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new(MEMBER_KEY, DataType::Int64, false),
        Field::new("age_band", DataType::Utf8, false),
        Field::new("prefecture", DataType::Utf8, false),
        Field::new("gender", DataType::Utf8, false),
        Field::new("partner_attribute", DataType::Utf8, false),
    ]))
}

impl SafeViews {
    /// The views over one audience: `eligible` members (matched and consenting), with the partner
    /// attribute `matched` gives them.
    pub fn of_audience(
        snapshot: &Snapshot,
        matched: &HashMap<i64, Option<String>>,
        eligible: &HashSet<i64>,
    ) -> Result<Self> {
        let members = snapshot
            .members
            .iter()
            .map(|batch| members_view(batch, matched, eligible))
            .collect::<Result<Vec<_>>>()?;
        let purchases = snapshot
            .purchases
            .iter()
            .map(|batch| keep_members(batch, eligible))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { members, purchases })
    }

    /// Views with the right schemas and no rows, to plan and check queries without data (lint).
    pub fn empty() -> Self {
        Self {
            members: Vec::new(),
            purchases: Vec::new(),
        }
    }

    /// A fresh DataFusion session in which the safe views are the only tables.
    pub fn session(&self) -> Result<SessionContext> {
        let config = SessionConfig::new()
            .with_information_schema(false)
            .with_default_catalog_and_schema("cleanroom", "safe");
        let ctx = SessionContext::new_with_config(config);
        ctx.register_table(
            SAFE_VIEWS[0],
            Arc::new(MemTable::try_new(
                members_view_schema(),
                vec![self.members.clone()],
            )?),
        )?;
        ctx.register_table(
            SAFE_VIEWS[1],
            Arc::new(MemTable::try_new(
                purchases_schema(),
                vec![self.purchases.clone()],
            )?),
        )?;
        Ok(ctx)
    }
}

/// Members whose tokens for this collaboration appear in a list, with the partner's attribute for
/// them (the first one given, if several records match). The list is read from disk a batch at a
/// time and only its tokens that some member has are kept, so the work's memory follows the
/// retailer's members, never the list's length.
pub fn matched_members(
    snapshot: &Snapshot,
    contract_id: &str,
    list: &PartnerList,
) -> Result<HashMap<i64, Option<String>>> {
    let Some(tokens) = snapshot.member_tokens.get(contract_id) else {
        return Ok(HashMap::new());
    };
    // Each member token, and the attribute of the first list record that carries it (`None`
    // until a record does).
    let mut in_list: HashMap<TokenKey, Option<Option<String>>> = HashMap::new();
    for batch in tokens {
        let versions = batch.column(1).as_primitive::<UInt32Type>();
        let macs = batch.column(2).as_fixed_size_binary();
        for i in 0..batch.num_rows() {
            in_list.insert(token_key(versions.value(i), macs.value(i)), None);
        }
    }
    for batch in list.batches()? {
        let batch = batch?;
        let versions = batch.column(1).as_primitive::<UInt32Type>();
        let macs = batch.column(2).as_fixed_size_binary();
        let attributes = batch.column(3).as_string::<i32>();
        for i in 0..batch.num_rows() {
            if let Some(slot @ None) = in_list.get_mut(&token_key(versions.value(i), macs.value(i)))
            {
                *slot = Some(
                    attributes
                        .is_valid(i)
                        .then(|| attributes.value(i).to_string()),
                );
            }
        }
    }
    let mut matched = HashMap::new();
    for batch in tokens {
        let owners = batch.column(0).as_primitive::<Int64Type>();
        let versions = batch.column(1).as_primitive::<UInt32Type>();
        let macs = batch.column(2).as_fixed_size_binary();
        for i in 0..batch.num_rows() {
            if let Some(Some(attribute)) = in_list.get(&token_key(versions.value(i), macs.value(i)))
            {
                let entry = matched.entry(owners.value(i)).or_insert(None);
                if entry.is_none() {
                    *entry = attribute.clone();
                }
            }
        }
    }
    Ok(matched)
}

/// A match token as a map key: its key version and MAC.
type TokenKey = (u32, [u8; 32]);

fn token_key(version: u32, mac: &[u8]) -> TokenKey {
    // Every stored MAC is 32 bytes (the column is `FixedSizeBinary(32)`).
    let mut bytes = [0u8; 32];
    bytes.copy_from_slice(mac);
    (version, bytes)
}

/// How many members a collaboration's consent filter admits at `now`: all members consenting to
/// its purpose, and those of them in the partner's current list (if it has one). For `rules
/// validate`, which shows an analyst what a rules change does before it is applied.
pub fn consent_counts(
    snapshot: &Snapshot,
    contract_id: &str,
    contract: &Contract,
    requirement: &Requirement,
    now: DateTime<Utc>,
) -> Result<(usize, Option<usize>)> {
    let consenting = consented_where(snapshot, |_| true, &contract.purpose, requirement, now);
    let in_list = match snapshot.lists.get(&contract.partner) {
        Some(list) => {
            let matched = matched_members(snapshot, contract_id, list)?;
            Some(
                consenting
                    .iter()
                    .filter(|m| matched.contains_key(m))
                    .count(),
            )
        }
        None => None,
    };
    Ok((consenting.len(), in_list))
}

/// The matched members whose consent for `purpose` holds at `now`.
pub fn consented(
    snapshot: &Snapshot,
    matched: &HashMap<i64, Option<String>>,
    purpose: &str,
    requirement: &Requirement,
    now: DateTime<Utc>,
) -> HashSet<i64> {
    consented_where(
        snapshot,
        |member| matched.contains_key(&member),
        purpose,
        requirement,
        now,
    )
}

/// The members passing `keep` whose consent for `purpose` holds at `now`.
fn consented_where(
    snapshot: &Snapshot,
    keep: impl Fn(i64) -> bool,
    purpose: &str,
    requirement: &Requirement,
    now: DateTime<Utc>,
) -> HashSet<i64> {
    let mut latest: HashMap<i64, Option<Event>> = HashMap::new();
    for batch in &snapshot.consent {
        let members = batch.column(0).as_primitive::<Int64Type>();
        let purposes = batch.column(1).as_string::<i32>();
        let versions = batch.column(2).as_primitive::<UInt32Type>();
        let actions = batch.column(3).as_string::<i32>();
        let ats = batch.column(4).as_primitive::<TimestampMicrosecondType>();
        let expiries = batch.column(6).as_primitive::<TimestampMicrosecondType>();
        for i in 0..batch.num_rows() {
            let member = members.value(i);
            if purposes.value(i) != purpose || !keep(member) {
                continue;
            }
            let (Some(action), Some(at)) = (
                Action::parse(actions.value(i)),
                DateTime::from_timestamp_micros(ats.value(i)),
            ) else {
                continue;
            };
            let event = Event {
                action,
                notice_version: versions.value(i),
                at,
                expires_at: expiries
                    .is_valid(i)
                    .then(|| DateTime::from_timestamp_micros(expiries.value(i)))
                    .flatten(),
            };
            consent::keep_latest(latest.entry(member).or_default(), event, now);
        }
    }
    latest
        .into_iter()
        .filter(|(_, event)| consent::admits(event.as_ref(), requirement, now))
        .map(|(member, _)| member)
        .collect()
}

fn membership_mask(batch: &RecordBatch, eligible: &HashSet<i64>) -> BooleanArray {
    let keys = batch.column(0).as_primitive::<Int64Type>();
    keys.iter()
        .map(|k| Some(k.is_some_and(|k| eligible.contains(&k))))
        .collect()
}

fn keep_members(batch: &RecordBatch, eligible: &HashSet<i64>) -> Result<RecordBatch> {
    Ok(filter_record_batch(
        batch,
        &membership_mask(batch, eligible),
    )?)
}

fn members_view(
    batch: &RecordBatch,
    matched: &HashMap<i64, Option<String>>,
    eligible: &HashSet<i64>,
) -> Result<RecordBatch> {
    let kept = keep_members(batch, eligible)?;
    let keys = kept.column(0).as_primitive::<Int64Type>();
    let attributes: StringArray = keys
        .iter()
        .map(|k| {
            let attribute = k.and_then(|k| matched.get(&k).cloned().flatten());
            Some(attribute.unwrap_or_else(|| UNKNOWN_ATTRIBUTE.to_string()))
        })
        .collect();
    let mut columns = kept.columns().to_vec();
    columns.push(Arc::new(attributes));
    Ok(RecordBatch::try_new(members_view_schema(), columns)?)
}
