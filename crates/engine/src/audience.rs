//! The audience of a question: the members in the partner's current list who consent to the
//! contract's purpose at the current notice version, at the question's instant. It is what the
//! safe views show a query (`views`), applied inside the plan as the retailer's tables are
//! scanned, never by copying them.
//!
//! Its two expensive parts are computed once and shared: the members a list matches (per
//! collaboration, member table and list content) and the latest consent event of every member
//! for a purpose (per consent snapshot). Each is computed by the first question that needs it,
//! while others that need it wait for that one computation, and kept for the next. Consent is
//! then judged at the question's own instant from the kept events, so a withdrawal or an expiry
//! counts at the next question, as at query time it must.
//!
//! What they hold counts against the service's query memory pool ([`Audiences::charged_to`]): the
//! kept parts as long as they are kept (or used), each question's audience while it is answered.
//! When the pool cannot hold a new part, the other kept parts are forgotten first; if it still
//! cannot, the question is short of memory like any other and is answered "ask again".

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use cleanroom_core::consent::{self, Action, Event, Requirement};
use cleanroom_core::rules::UNKNOWN_ATTRIBUTE;
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{Int64Type, TimestampMicrosecondType, UInt32Type};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool, MemoryReservation};
use tokio::sync::OnceCell;

use crate::store::{PartnerList, Snapshot};
use crate::{Error, Result};

/// Hashes a member pseudonym as itself: pseudonyms are keyed hashes, uniform and unguessable, so
/// they need no second hash (and a lookup per scanned row stays cheap).
#[derive(Default, Clone, Copy)]
pub struct MemberHasher(u64);

impl Hasher for MemberHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_i64(&mut self, n: i64) {
        self.0 = n as u64;
    }
}

/// A map keyed by member pseudonym.
pub type MemberMap<V> = HashMap<i64, V, BuildHasherDefault<MemberHasher>>;

/// The members of one question's audience, with the partner's attribute of each.
#[derive(Debug, Default)]
pub struct Audience {
    /// Member → index of its attribute in `attributes`.
    members: MemberMap<u32>,
    attributes: Vec<String>,
    /// Its memory, charged to the query pool while the question holds it.
    charge: Option<MemoryReservation>,
}

impl Audience {
    /// Whether a member is in the audience.
    pub fn contains(&self, member: i64) -> bool {
        self.members.contains_key(&member)
    }

    /// A member's attribute, if the member is in the audience.
    pub fn attribute(&self, member: i64) -> Option<&str> {
        self.attribute_index(member).map(|i| self.attribute_text(i))
    }

    /// Where a member's attribute is kept, if the member is in the audience (one look-up both
    /// tests membership and finds the attribute).
    pub fn attribute_index(&self, member: i64) -> Option<u32> {
        self.members.get(&member).copied()
    }

    /// The attribute kept at `index` (from [`Audience::attribute_index`]).
    pub fn attribute_text(&self, index: u32) -> &str {
        &self.attributes[index as usize]
    }

    /// Members in the audience.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether no member is in it.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The members and their attributes (for measurement).
    pub fn members(&self) -> impl Iterator<Item = (i64, &str)> {
        self.members
            .iter()
            .map(|(m, i)| (*m, self.attributes[*i as usize].as_str()))
    }
}

/// The members a list matches, each with the attribute of the first record that matched it.
#[derive(Debug, Default)]
pub struct Matched {
    members: MemberMap<u32>,
    attributes: Vec<String>,
    /// Its memory, charged to the query pool while it is kept or used.
    charge: Option<MemoryReservation>,
}

impl Matched {
    /// How many members the list matches.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// The members it matches, as pseudonyms, ascending.
    pub fn members(&self) -> Vec<i64> {
        let mut members: Vec<i64> = self.members.keys().copied().collect();
        members.sort_unstable();
        members
    }

    /// Whether it matches no member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Whether `member` is matched.
    pub fn contains(&self, member: i64) -> bool {
        self.members.contains_key(&member)
    }
}

/// Every member's latest consent event for one purpose, over all events (those dated after a
/// question's instant are rare; a question sees them and looks such members up again).
#[derive(Debug, Default)]
pub struct ConsentState {
    latest: MemberMap<Event>,
    /// Its memory, charged to the query pool while it is kept or used.
    charge: Option<MemoryReservation>,
}

/// What a computed part holds on the heap (its maps' tables and its attribute texts), as charged
/// to the query memory pool.
trait HeapBytes {
    fn heap_bytes(&self) -> usize;
    fn charge_with(&mut self, charge: Option<MemoryReservation>);
}

/// A member map's table: its slots and one control byte each.
fn map_bytes<V>(map: &MemberMap<V>) -> usize {
    map.capacity() * (std::mem::size_of::<(i64, V)>() + 1)
}

fn text_bytes(texts: &[String]) -> usize {
    texts
        .iter()
        .map(|t| t.capacity() + std::mem::size_of::<String>())
        .sum()
}

impl HeapBytes for Audience {
    fn heap_bytes(&self) -> usize {
        map_bytes(&self.members) + text_bytes(&self.attributes)
    }
    fn charge_with(&mut self, charge: Option<MemoryReservation>) {
        self.charge = charge;
    }
}

impl HeapBytes for Matched {
    fn heap_bytes(&self) -> usize {
        map_bytes(&self.members) + text_bytes(&self.attributes)
    }
    fn charge_with(&mut self, charge: Option<MemoryReservation>) {
        self.charge = charge;
    }
}

impl HeapBytes for ConsentState {
    fn heap_bytes(&self) -> usize {
        map_bytes(&self.latest)
    }
    fn charge_with(&mut self, charge: Option<MemoryReservation>) {
        self.charge = charge;
    }
}

/// Computed parts kept for the next question, a few of each.
pub(crate) const KEPT: usize = 8;

type Cell<T> = Arc<OnceCell<Arc<T>>>;

/// The shared computations of audiences.
#[derive(Default)]
pub struct Audiences {
    matched: Mutex<VecDeque<(String, Cell<Matched>)>>,
    consent: Mutex<VecDeque<(String, Cell<ConsentState>)>>,
    /// The query memory pool their memory is charged to (none: not charged).
    pool: Option<Arc<dyn MemoryPool>>,
}

/// What a question's audience depends on.
pub struct AudienceOf<'a> {
    /// The data.
    pub snapshot: &'a Arc<Snapshot>,
    /// The collaboration whose member tokens match the list.
    pub contract_id: &'a str,
    /// The partner's current list.
    pub list: &'a PartnerList,
    /// The contract's purpose.
    pub purpose: &'a str,
    /// What a grant must meet.
    pub requirement: Requirement,
    /// The question's instant.
    pub now: DateTime<Utc>,
}

impl Audiences {
    /// Audiences whose memory is charged to `pool`, the query memory pool.
    pub fn charged_to(pool: Arc<dyn MemoryPool>) -> Self {
        Self {
            pool: Some(pool),
            ..Self::default()
        }
    }

    /// The audience of a question: matched and consent state shared with other questions,
    /// consent judged at `of.now`.
    pub async fn audience(&self, of: AudienceOf<'_>) -> Result<Arc<Audience>> {
        // The two parts are independent: computed side by side, on two cores.
        let (matched, state) = tokio::try_join!(
            self.matched(of.snapshot, of.contract_id, of.list),
            self.consent_state(of.snapshot, of.purpose),
        )?;
        let (snapshot, purpose) = (Arc::clone(of.snapshot), of.purpose.to_string());
        let (requirement, now) = (of.requirement, of.now);
        let audience =
            blocking(move || judge(&snapshot, &matched, &state, &purpose, &requirement, now))
                .await?;
        self.charged("question audience", audience)
    }

    /// `part` with its memory charged to the pool. When the pool cannot take it, every kept part
    /// is forgotten (those in use stay charged until their questions end) and it is tried once
    /// more; then the pool's refusal is the question's: short of memory, ask again.
    fn charged<T: HeapBytes>(&self, what: &str, mut part: T) -> Result<Arc<T>> {
        let Some(pool) = &self.pool else {
            return Ok(Arc::new(part));
        };
        let bytes = part.heap_bytes();
        let charge = MemoryConsumer::new(what).register(pool);
        if charge.try_grow(bytes).is_err() {
            self.forget_all();
            charge.try_grow(bytes)?;
        }
        part.charge_with(Some(charge));
        Ok(Arc::new(part))
    }

    /// Forgets every kept part, so that the memory they hold goes back to the pool (and what
    /// they hold of data since destroyed or erased is not kept in memory either).
    pub(crate) fn forget_all(&self) {
        self.matched
            .lock()
            .expect("audience cache lock poisoned")
            .clear();
        self.consent
            .lock()
            .expect("audience cache lock poisoned")
            .clear();
    }

    /// Forgets the kept matches of `contract_id`'s list versions other than `current` (by
    /// digest; all of them when it has none): a retention destroyed them.
    pub(crate) fn forget_matches_except(&self, contract_id: &str, current: Option<&str>) {
        self.matched
            .lock()
            .expect("audience cache lock poisoned")
            .retain(|(key, _)| {
                key.split('|').next() != Some(contract_id)
                    || current.is_some_and(|d| key.rsplit('|').next() == Some(d))
            });
    }

    /// Computes and keeps what the questions of `contract_id` on `snapshot` will share (its
    /// matched list and its purpose's consent state), so the first of them does not wait for it.
    pub async fn prepare(
        &self,
        snapshot: &Arc<Snapshot>,
        contract_id: &str,
        list: &PartnerList,
        purpose: &str,
    ) -> Result<()> {
        tokio::try_join!(
            self.matched(snapshot, contract_id, list),
            self.consent_state(snapshot, purpose),
        )?;
        Ok(())
    }

    pub(crate) async fn matched(
        &self,
        snapshot: &Arc<Snapshot>,
        contract_id: &str,
        list: &PartnerList,
    ) -> Result<Arc<Matched>> {
        // The matches change with the member table, the collaboration's member tokens (a
        // tokens-only ingest, a rotation) and the list, and with nothing else.
        let tokens = snapshot.member_tokens_version.get(contract_id);
        let key = format!(
            "{contract_id}|{}|{}|{}",
            snapshot.members_version,
            tokens.map_or("-", String::as_str),
            list.digest
        );
        let cell = kept(&self.matched, key);
        let (snapshot, contract, list) =
            (Arc::clone(snapshot), contract_id.to_string(), list.clone());
        cell.get_or_try_init(|| async {
            let matched = blocking(move || match_list(&snapshot, &contract, &list)).await?;
            self.charged("matched list", matched)
        })
        .await
        .cloned()
    }

    async fn consent_state(
        &self,
        snapshot: &Arc<Snapshot>,
        purpose: &str,
    ) -> Result<Arc<ConsentState>> {
        let key = format!("{purpose}|{}", snapshot.consent_snapshot_id);
        let cell = kept(&self.consent, key);
        let (snapshot, purpose) = (Arc::clone(snapshot), purpose.to_string());
        cell.get_or_try_init(|| async {
            let state = blocking(move || consent_state(&snapshot, &purpose)).await?;
            self.charged("consent state", state)
        })
        .await
        .cloned()
    }
}

/// The cell kept under `key`, made if missing (the oldest one forgotten beyond [`KEPT`]).
fn kept<T>(cells: &Mutex<VecDeque<(String, Cell<T>)>>, key: String) -> Cell<T> {
    let mut cells = cells.lock().expect("audience cache lock poisoned");
    if let Some((_, cell)) = cells.iter().find(|(k, _)| *k == key) {
        return Arc::clone(cell);
    }
    let cell: Cell<T> = Arc::default();
    cells.push_back((key, Arc::clone(&cell)));
    if cells.len() > KEPT {
        cells.pop_front();
    }
    cell
}

/// Work in proportion to the data, off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Storage(format!("computing an audience: {e}")))?
}

/// The members whose tokens for this collaboration appear in the list, with the attribute of the
/// first list record that carries each (first-attribute semantics). The list is read a batch at
/// a time and only its tokens some member has are kept.
fn match_list(snapshot: &Snapshot, contract_id: &str, list: &PartnerList) -> Result<Matched> {
    let by_token = crate::views::matched_members(snapshot, contract_id, list)?;
    let mut matched = Matched::default();
    let mut index: HashMap<String, u32> = HashMap::new();
    for (member, attribute) in by_token {
        let attribute = attribute.unwrap_or_else(|| UNKNOWN_ATTRIBUTE.to_string());
        let next = u32::try_from(matched.attributes.len()).unwrap_or(u32::MAX);
        let i = *index.entry(attribute.clone()).or_insert_with(|| {
            matched.attributes.push(attribute);
            next
        });
        matched.members.insert(member, i);
    }
    Ok(matched)
}

/// Every member's latest event for `purpose`, over every event in the consent log.
fn consent_state(snapshot: &Snapshot, purpose: &str) -> Result<ConsentState> {
    let mut latest: MemberMap<Option<Event>> = MemberMap::default();
    for_each_event(snapshot, purpose, |member, event| {
        consent::keep_latest(
            latest.entry(member).or_default(),
            event,
            DateTime::<Utc>::MAX_UTC,
        );
    })?;
    Ok(ConsentState {
        latest: latest
            .into_iter()
            .filter_map(|(member, event)| Some((member, event?)))
            .collect(),
        charge: None,
    })
}

/// The audience at `now`: matched members whose latest event at `now` admits them.
fn judge(
    snapshot: &Snapshot,
    matched: &Matched,
    state: &ConsentState,
    purpose: &str,
    requirement: &Requirement,
    now: DateTime<Utc>,
) -> Result<Audience> {
    let mut audience = Audience {
        members: MemberMap::default(),
        attributes: matched.attributes.clone(),
        charge: None,
    };
    let mut later: HashSet<i64> = HashSet::new();
    for (member, attribute) in &matched.members {
        match state.latest.get(member) {
            Some(event) if event.at > now => {
                later.insert(*member);
            }
            Some(event) if consent::admits(Some(event), requirement, now) => {
                audience.members.insert(*member, *attribute);
            }
            _ => {}
        }
    }
    if !later.is_empty() {
        // Members whose latest event is after `now`: their latest event at `now` decides.
        let mut at_now: MemberMap<Option<Event>> = MemberMap::default();
        for_each_event(snapshot, purpose, |member, event| {
            if later.contains(&member) {
                consent::keep_latest(at_now.entry(member).or_default(), event, now);
            }
        })?;
        for (member, event) in at_now {
            if consent::admits(event.as_ref(), requirement, now) {
                audience.members.insert(member, matched.members[&member]);
            }
        }
    }
    Ok(audience)
}

/// Calls `f` with every consent event for `purpose`, in log order, reading the consent files a
/// batch at a time.
pub(crate) fn for_each_event(
    snapshot: &Snapshot,
    purpose: &str,
    mut f: impl FnMut(i64, Event),
) -> Result<()> {
    for file in &snapshot.consent {
        for batch in file.batches()? {
            events_of(&batch?, purpose, &mut f);
        }
    }
    Ok(())
}

/// Calls `f` with the consent events for `purpose` in one batch of the consent table.
fn events_of(batch: &RecordBatch, purpose: &str, f: &mut impl FnMut(i64, Event)) {
    consent_rows(
        batch,
        |_, p| p == purpose,
        |member, _, event, _| f(member, event),
    );
}

/// Calls `f` with each event of one batch of the consent table that `keep` keeps (by member and
/// purpose): the member, the purpose, the event and its capture channel. Rows whose action or time
/// does not parse are not events.
pub(crate) fn consent_rows(
    batch: &RecordBatch,
    keep: impl Fn(i64, &str) -> bool,
    mut f: impl FnMut(i64, &str, Event, &str),
) {
    use crate::tables::consent;
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
        if !keep(members.value(i), purposes.value(i)) {
            continue;
        }
        let (Some(action), Some(at)) = (
            Action::parse(actions.value(i)),
            DateTime::from_timestamp_micros(ats.value(i)),
        ) else {
            continue;
        };
        let expires_at = expiries
            .is_valid(i)
            .then(|| DateTime::from_timestamp_micros(expiries.value(i)))
            .flatten();
        let event = Event {
            action,
            notice_version: versions.value(i),
            at,
            expires_at,
        };
        f(members.value(i), purposes.value(i), event, sources.value(i));
    }
}

#[cfg(test)]
mod tests {
    use datafusion::execution::memory_pool::GreedyMemoryPool;

    use super::*;

    fn matched(members: i64) -> Matched {
        let mut matched = Matched::default();
        matched.attributes.push("owner".into());
        for m in 0..members {
            matched.members.insert(m, 0);
        }
        matched
    }

    #[test]
    fn a_kept_part_is_charged_to_the_query_pool_until_dropped() {
        let pool: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(1 << 20));
        let audiences = Audiences::charged_to(Arc::clone(&pool));
        let part = matched(10_000);
        let bytes = part.heap_bytes();
        assert!(bytes >= 10_000 * 12, "{bytes} bytes for 10,000 members");
        let kept = audiences.charged("matched list", part).unwrap();
        assert_eq!(pool.reserved(), bytes);
        drop(kept);
        assert_eq!(pool.reserved(), 0);
    }

    #[test]
    fn forgetting_the_kept_parts_gives_their_memory_back() {
        let pool: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(1 << 20));
        let audiences = Audiences::charged_to(Arc::clone(&pool));
        let cell = kept(&audiences.matched, "a list".into());
        let part = audiences.charged("matched list", matched(1_000)).unwrap();
        assert!(cell.set(part).is_ok());
        drop(cell);
        assert!(pool.reserved() > 0, "kept, and charged while kept");
        audiences.forget_all();
        assert_eq!(pool.reserved(), 0);
        assert!(audiences.matched.lock().unwrap().is_empty());
    }

    #[test]
    fn a_retention_forgets_the_matches_of_the_versions_it_destroyed_only() {
        let audiences = Audiences::default();
        for key in ["ctr-a|m1|t1|old", "ctr-a|m1|t1|new", "ctr-b|m1|t1|old"] {
            kept(&audiences.matched, key.into());
        }
        audiences.forget_matches_except("ctr-a", Some("new"));
        let left: Vec<String> = audiences
            .matched
            .lock()
            .unwrap()
            .iter()
            .map(|(k, _)| k.clone())
            .collect();
        assert_eq!(left, ["ctr-a|m1|t1|new", "ctr-b|m1|t1|old"]);
        audiences.forget_matches_except("ctr-a", None);
        assert_eq!(audiences.matched.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_part_the_pool_cannot_hold_is_short_of_memory() {
        let pool: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(16 * 1024));
        let audiences = Audiences::charged_to(Arc::clone(&pool));
        let refused = audiences
            .charged("matched list", matched(10_000))
            .unwrap_err();
        assert!(
            matches!(&refused, Error::Engine(e) if matches!(e.find_root(), datafusion::error::DataFusionError::ResourcesExhausted(_))),
            "{refused}"
        );
        assert_eq!(pool.reserved(), 0, "nothing stays charged");
    }
}
