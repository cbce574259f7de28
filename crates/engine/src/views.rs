//! The per-collaboration safe views. For one query they show only the members of its audience
//! ([`crate::audience`]: in the partner's current list and consenting to the contract's purpose at
//! the current notice version, at the question's instant), and no column that identifies anyone:
//! no member id, no token, no identifier. They are the only tables a query's SQL can name. The
//! audience is applied inside the plan, as each table is scanned ([`filter::AudienceExec`]), so no
//! table is ever copied for a question.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use cleanroom_core::consent::{self, Event, Requirement};
use cleanroom_core::rules::Contract;
use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef, UInt32Type};
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::{MemTable, TableType};
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::Result;
use crate::audience::{Audience, MemberMap};
use crate::store::{PartnerList, Snapshot, TableFile};
use crate::tables::{self, tokens};

mod filter;
mod standard;

pub(crate) use standard::{audience_schema, with_standard_scans};

/// Names of the tables a query may read. Nothing else is registered in a query's session.
pub const SAFE_VIEWS: &[&str] = &["members", "purchases"];

/// The column of every safe view that carries the member pseudonym. It may be joined on and
/// counted, never output.
pub const MEMBER_KEY: &str = "member_key";

/// The `members` view's column carrying the partner's attribute of each member.
pub const PARTNER_ATTRIBUTE: &str = "partner_attribute";

/// Where both tables under the views keep the member key.
const KEY_COLUMN: usize = tables::members::MEMBER_KEY;
const _: () = assert!(tables::purchases::MEMBER_KEY == KEY_COLUMN);

/// Safe views built for one query: the retailer's tables, each scanned through its audience.
pub struct SafeViews {
    members: Arc<SafeView>,
    purchases: Arc<SafeView>,
}

/// Schema of the `members` view: the member table's columns, then the partner attribute.
pub fn members_view_schema() -> Arc<Schema> {
    let table = tables::members::schema();
    let mut fields: Vec<Field> = table.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(PARTNER_ATTRIBUTE, DataType::Utf8, false));
    Arc::new(Schema::new(fields))
}

impl SafeViews {
    /// The views of `snapshot`'s tables over `audience`: only its members' rows are scanned out,
    /// and `members` carries each one's partner attribute.
    pub fn of(snapshot: &Snapshot, audience: Arc<Audience>) -> Result<Self> {
        let members = file_table(tables::members::schema(), &paths(&snapshot.members))?;
        let purchases = file_table(tables::purchases::schema(), &paths(&snapshot.purchases))?;
        Ok(Self {
            members: Arc::new(SafeView::new(
                members_view_schema(),
                members,
                Arc::clone(&audience),
                filter::RowsPerMember::One,
            )),
            purchases: Arc::new(SafeView::new(
                tables::purchases::schema(),
                purchases,
                audience,
                filter::RowsPerMember::Many,
            )),
        })
    }

    /// Views with the right schemas and no rows, to plan and check queries without data (lint).
    pub fn empty() -> Self {
        Self::of(&Snapshot::default(), Arc::default()).expect("empty tables build")
    }

    /// A fresh DataFusion session in which the safe views are the only tables (for planning
    /// and checking: its runtime is DataFusion's default).
    pub fn session(&self) -> Result<SessionContext> {
        self.session_in(Arc::new(RuntimeEnv::default()))
    }

    /// A fresh session over the safe views that executes in `env` (the service's memory pool and
    /// spill directory).
    pub fn session_in(&self, env: Arc<RuntimeEnv>) -> Result<SessionContext> {
        let config = SessionConfig::new()
            .with_information_schema(false)
            .with_default_catalog_and_schema("cleanroom", "safe");
        let mut config = config;
        let parquet = &mut config.options_mut().execution.parquet;
        // Filters evaluated while decoding, so rows outside a window are never materialised.
        parquet.pushdown_filters = true;
        parquet.reorder_filters = true;
        // A question joins purchases to members; the audience's members (at most one row each)
        // are the smaller side and are collected once and probed by every partition, rather than
        // both sides hashed and repartitioned. The row limit reaches a retailer of tens of
        // millions of members; the build side is still charged to the memory pool.
        let optimizer = &mut config.options_mut().optimizer;
        optimizer.hash_join_single_partition_threshold_rows = COLLECTED_JOIN_SIDE_ROWS;
        let ctx = SessionContext::new_with_config_rt(config, env);
        ctx.register_table(
            SAFE_VIEWS[0],
            Arc::clone(&self.members) as Arc<dyn TableProvider>,
        )?;
        ctx.register_table(
            SAFE_VIEWS[1],
            Arc::clone(&self.purchases) as Arc<dyn TableProvider>,
        )?;
        Ok(ctx)
    }
}

/// The most rows a join's smaller side may have to be collected once rather than partitioned.
const COLLECTED_JOIN_SIDE_ROWS: usize = 8 << 20;

/// The paths of a table's committed files.
pub(crate) fn paths<'a>(files: impl IntoIterator<Item = &'a TableFile>) -> Vec<&'a Path> {
    files.into_iter().map(|f| f.path.as_path()).collect()
}

/// A retailer table: its committed Parquet files, read by DataFusion (projection and predicate
/// pushed into the scan, row groups and pages pruned by their statistics). The files are named
/// one by one, never listed from the directory, so a file no commit named is never read.
pub(crate) fn file_table(schema: Arc<Schema>, files: &[&Path]) -> Result<Arc<dyn TableProvider>> {
    if files.is_empty() {
        return Ok(Arc::new(MemTable::try_new(schema, vec![Vec::new()])?));
    }
    let urls = files
        .iter()
        .map(|f| ListingTableUrl::parse(f.to_string_lossy()))
        .collect::<datafusion::error::Result<Vec<_>>>()?;
    let options =
        ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    let config = ListingTableConfig::new_with_multi_paths(urls)
        .with_listing_options(options)
        .with_schema(schema);
    Ok(Arc::new(ListingTable::try_new(config)?))
}

/// One safe view: a retailer table whose scan keeps only the audience's rows (and, for
/// `members`, adds the partner attribute), inside the plan. A query cannot name the table
/// underneath, and the audience is applied however the query reads the view.
#[derive(Debug)]
struct SafeView {
    schema: Arc<Schema>,
    source: Arc<dyn TableProvider>,
    audience: Arc<Audience>,
    rows: filter::RowsPerMember,
}

impl SafeView {
    fn new(
        schema: Arc<Schema>,
        source: Arc<dyn TableProvider>,
        audience: Arc<Audience>,
        rows: filter::RowsPerMember,
    ) -> Self {
        Self {
            schema,
            source,
            audience,
            rows,
        }
    }
}

#[async_trait::async_trait]
impl TableProvider for SafeView {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    /// Filters on the table's own columns are handed to its scan to prune with (DataFusion
    /// still applies them above the view): a date window reads only the row groups it covers.
    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::error::Result<Vec<TableProviderFilterPushDown>> {
        let stored = self.source.schema();
        Ok(filters
            .iter()
            .map(|f| {
                let own = f
                    .column_refs()
                    .iter()
                    .all(|c| stored.index_of(&c.name).is_ok());
                if own {
                    TableProviderFilterPushDown::Inexact
                } else {
                    TableProviderFilterPushDown::Unsupported
                }
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let wanted: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..self.schema.fields().len()).collect(),
        };
        // View columns are the table's, in order, then (for members) the partner attribute.
        let stored = self.source.schema().fields().len();
        let mut read: Vec<usize> = wanted.iter().copied().filter(|c| *c < stored).collect();
        let key = match read.iter().position(|c| *c == KEY_COLUMN) {
            Some(at) => at,
            None => {
                read.push(KEY_COLUMN);
                read.len() - 1
            }
        };
        let outputs = wanted
            .iter()
            .map(|c| match read.iter().position(|r| r == c) {
                Some(at) => filter::Output::Column(at),
                None => filter::Output::Attribute,
            })
            .collect();
        let input = self.source.scan(state, Some(&read), filters, None).await?;
        let schema = Arc::new(self.schema.project(&wanted)?);
        Ok(Arc::new(
            filter::AudienceExec::new(input, Arc::clone(&self.audience), key, outputs, schema)
                .with_rows(self.rows),
        ))
    }
}

/// Members whose tokens for this collaboration appear in a list, with the partner's attribute for
/// them: that of the member's first token (in the stored order) whose list record gives one,
/// taken from the first list record that carries the token. The list is read from disk a batch at
/// a time and only its tokens that some member has are kept, so the work's memory follows the
/// retailer's members, never the list's length. Two passes: the member tokens once, the list once.
pub fn matched_members(
    snapshot: &Snapshot,
    contract_id: &str,
    list: &PartnerList,
) -> Result<MemberMap<Option<String>>> {
    let Some(tokens) = snapshot.member_tokens.get(contract_id) else {
        return Ok(MemberMap::default());
    };
    let mut in_list = member_tokens(tokens)?;
    mark_listed(&mut in_list, list)?;
    Ok(owners_of_listed(in_list))
}

/// A member token's owner, its place in the stored order, and the attribute of the first list
/// record that carries it (`None` until a record does).
struct Listed {
    owner: i64,
    ordinal: u64,
    attribute: Option<Option<String>>,
}

/// Millions of keys: a faster hash than std's SipHash, which guards against keys chosen to
/// collide, and these are MACs nobody can choose.
type TokenIndex = datafusion::common::HashMap<TokenKey, Listed>;

/// Every member token of the collaboration, not yet marked as listed.
fn member_tokens(tokens: &TableFile) -> Result<TokenIndex> {
    // Sized from the file's footer once: grown as it fills, the table of millions of tokens was
    // moved to a new allocation again and again (most of a list upload's time at a million
    // members went to the kernel zeroing those allocations' pages).
    let rows = usize::try_from(tokens.rows()?).unwrap_or(0);
    let mut index = TokenIndex::with_capacity_and_hasher(rows, Default::default());
    let mut ordinal = 0u64;
    for batch in tokens.batches()? {
        let batch = batch?;
        let owners = batch.column(tokens::OWNER).as_primitive::<Int64Type>();
        let versions = batch
            .column(tokens::KEY_VERSION)
            .as_primitive::<UInt32Type>();
        let macs = batch.column(tokens::MAC).as_fixed_size_binary();
        for i in 0..batch.num_rows() {
            let listed = Listed {
                owner: owners.value(i),
                ordinal,
                attribute: None,
            };
            index.insert(token_key(versions.value(i), macs.value(i)), listed);
            ordinal += 1;
        }
    }
    Ok(index)
}

/// Marks each member token that a list record carries, with the first such record's attribute.
fn mark_listed(index: &mut TokenIndex, list: &PartnerList) -> Result<()> {
    for batch in list.batches()? {
        let batch = batch?;
        let versions = batch
            .column(tokens::KEY_VERSION)
            .as_primitive::<UInt32Type>();
        let macs = batch.column(tokens::MAC).as_fixed_size_binary();
        let attributes = batch.column(tokens::ATTRIBUTE).as_string::<i32>();
        for i in 0..batch.num_rows() {
            let Some(listed) = index.get_mut(&token_key(versions.value(i), macs.value(i))) else {
                continue;
            };
            if listed.attribute.is_none() {
                let attribute = attributes.is_valid(i).then(|| attributes.value(i));
                listed.attribute = Some(attribute.map(str::to_string));
            }
        }
    }
    Ok(())
}

/// The owners of the listed tokens, each with the attribute of its first listed token (in the
/// stored order) that has one: the hash map's own order never decides.
fn owners_of_listed(index: TokenIndex) -> MemberMap<Option<String>> {
    let mut first: MemberMap<(u64, Option<String>)> = MemberMap::default();
    for listed in index.into_values() {
        let Some(attribute) = listed.attribute else {
            continue;
        };
        let entry = first.entry(listed.owner).or_insert((u64::MAX, None));
        if attribute.is_some() && listed.ordinal < entry.0 {
            *entry = (listed.ordinal, attribute);
        }
    }
    first
        .into_iter()
        .map(|(owner, (_, a))| (owner, a))
        .collect()
}

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
    let consenting = consented_where(snapshot, |_| true, &contract.purpose, requirement, now)?;
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

/// The members passing `keep` whose consent for `purpose` holds at `now`.
fn consented_where(
    snapshot: &Snapshot,
    keep: impl Fn(i64) -> bool,
    purpose: &str,
    requirement: &Requirement,
    now: DateTime<Utc>,
) -> Result<HashSet<i64>> {
    let mut latest: HashMap<i64, Option<Event>> = HashMap::new();
    crate::audience::for_each_event(snapshot, purpose, |member, event| {
        if keep(member) {
            consent::keep_latest(latest.entry(member).or_default(), event, now);
        }
    })?;
    Ok(latest
        .into_iter()
        .filter(|(_, event)| consent::admits(event.as_ref(), requirement, now))
        .map(|(member, _)| member)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(index: &mut TokenIndex, byte: u8, owner: i64, ordinal: u64, listed: Option<&str>) {
        let attribute = match listed {
            Some("") => Some(None),
            Some(a) => Some(Some(a.to_string())),
            None => None,
        };
        let listed = Listed {
            owner,
            ordinal,
            attribute,
        };
        index.insert((1, [byte; 32]), listed);
    }

    #[test]
    fn a_member_takes_the_attribute_of_its_first_listed_token_that_has_one() {
        let mut index = TokenIndex::default();
        // Member 7: its first token is listed without an attribute, its second with "b", its
        // third with "a"; the second's wins, whatever order the map gives.
        token(&mut index, 1, 7, 0, Some(""));
        token(&mut index, 2, 7, 5, Some("a"));
        token(&mut index, 3, 7, 1, Some("b"));
        // Member 8: listed, never with an attribute. Member 9: not listed.
        token(&mut index, 4, 8, 2, Some(""));
        token(&mut index, 5, 9, 3, None);
        let owners = owners_of_listed(index);
        assert_eq!(owners.len(), 2);
        assert_eq!(owners[&7], Some("b".to_string()));
        assert_eq!(owners[&8], None);
        assert!(!owners.contains_key(&9));
    }
}
