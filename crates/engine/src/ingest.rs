//! Ingest: turns incoming records into the pseudonymous tables the store keeps. Emails and phones
//! are normalized and keyed per collaboration, member ids become keyed pseudonyms, birth dates
//! become age bands, and every other direct identifier is dropped here, before anything is stored.
//!
//! An ingest reads its stream a chunk at a time: each chunk is checked, hashed and built into Arrow
//! rows, which leave for the store's staging area ([`Sink`]) a batch at a time, so an ingest's
//! working memory does not grow with its length.
//!
//! A record that breaks a rule is either skipped and counted by reason, or, in strict mode, fails
//! the whole ingest. Reasons are fixed phrases that never contain the record's values.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use cleanroom_core::consent::Action;
use cleanroom_core::generalize;
use cleanroom_core::normalize::{self, Rejection};
use cleanroom_core::rules::{Partner, Rules};
use cleanroom_core::token::{CollaborationKey, MasterSecret, PseudonymKey, Token};
use datafusion::arrow::array::{
    ArrayBuilder, ArrayRef, FixedSizeBinaryBuilder, Int64Array, Int64Builder, StringArray,
    StringBuilder, TimestampMicrosecondBuilder, UInt32Builder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;

use crate::Result;

mod columnar;

/// One retailer member as ingest receives it. Names, addresses and postal codes never get this far.
#[derive(Debug, Clone, Default)]
pub struct MemberInput {
    /// The retailer's member id; replaced by a pseudonym.
    pub member_id: String,
    /// Raw email, normalized and keyed here.
    pub email: String,
    /// Raw phone, normalized and keyed here.
    pub phone: String,
    /// Prefecture name.
    pub prefecture: String,
    /// Birth date, `YYYY-MM-DD`; kept only as an age band.
    pub birth_date: String,
    /// Gender as exported.
    pub gender: String,
}

/// One purchase line.
#[derive(Debug, Clone, Default)]
pub struct PurchaseInput {
    /// The retailer's member id; replaced by a pseudonym.
    pub member_id: String,
    /// RFC 3339 timestamp.
    pub purchased_at: String,
    /// Product code.
    pub sku: String,
    /// Brand name.
    pub brand: String,
    /// Manufacturer name.
    pub manufacturer: String,
    /// Category; must be in the rules' `category` domain when one is configured.
    pub category: String,
    /// Units bought.
    pub quantity: i64,
    /// Amount in yen.
    pub amount: i64,
}

/// One consent event.
#[derive(Debug, Clone, Default)]
pub struct ConsentInput {
    /// The retailer's member id; replaced by a pseudonym.
    pub member_id: String,
    /// Purpose id; must be configured.
    pub purpose: String,
    /// Notice version the member saw.
    pub notice_version: u32,
    /// `granted` or `withdrawn`.
    pub action: String,
    /// RFC 3339 timestamp.
    pub at: String,
    /// Capture channel.
    pub source: String,
    /// Optional RFC 3339 expiry of a grant.
    pub expires_at: String,
}

/// One record of a partner's customer list: raw identifiers or pre-computed tokens.
#[derive(Debug, Clone, Default)]
pub struct ListInput {
    /// Raw email.
    pub email: String,
    /// Raw phone.
    pub phone: String,
    /// Token of the normalized email, from `cleanroom prep`.
    pub email_token: String,
    /// Token of the normalized phone, from `cleanroom prep`.
    pub phone_token: String,
    /// The partner's attribute; one of its declared values, or empty.
    pub attribute: String,
}

/// What an ingest did with its records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestReport {
    /// Records seen.
    pub received: u64,
    /// Records kept.
    pub accepted: u64,
    /// Records skipped, by reason.
    pub rejected: BTreeMap<String, u64>,
}

impl IngestReport {
    /// Counts one rejection, or in strict mode turns it into an error naming the record.
    fn reject(&mut self, index: usize, reason: &str, strict: bool) -> Result<()> {
        if strict {
            return Err(
                cleanroom_core::Error::Input(format!("record {}: {reason}", index + 1)).into(),
            );
        }
        *self.rejected.entry(reason.to_string()).or_default() += 1;
        Ok(())
    }
}

fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// Schema of the stored member table.
pub fn members_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("member_key", DataType::Int64, false),
        Field::new("age_band", DataType::Utf8, false),
        Field::new("prefecture", DataType::Utf8, false),
        Field::new("gender", DataType::Utf8, false),
    ]))
}

/// Schema of a stored table of match tokens (members' per collaboration, or a partner list).
/// `owner` is the member key for member tokens and the record number for a partner list.
pub fn tokens_schema(with_attribute: bool) -> SchemaRef {
    let mut fields = vec![
        Field::new("owner", DataType::Int64, false),
        Field::new("key_version", DataType::UInt32, false),
        Field::new("mac", DataType::FixedSizeBinary(32), false),
    ];
    if with_attribute {
        fields.push(Field::new("attribute", DataType::Utf8, true));
    }
    Arc::new(Schema::new(fields))
}

/// Schema of the stored purchases table (and of the `purchases` safe view).
pub fn purchases_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("member_key", DataType::Int64, false),
        Field::new("purchased_at", timestamp_type(), false),
        Field::new("sku", DataType::Utf8, false),
        Field::new("brand", DataType::Utf8, false),
        Field::new("manufacturer", DataType::Utf8, false),
        Field::new("category", DataType::Utf8, false),
        Field::new("quantity", DataType::Int64, false),
        Field::new("amount", DataType::Int64, false),
    ]))
}

/// Schema of the stored consent log.
pub fn consent_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("member_key", DataType::Int64, false),
        Field::new("purpose", DataType::Utf8, false),
        Field::new("notice_version", DataType::UInt32, false),
        Field::new("action", DataType::Utf8, false),
        Field::new("at", timestamp_type(), false),
        Field::new("source", DataType::Utf8, false),
        Field::new("expires_at", timestamp_type(), true),
    ]))
}

fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Rows per Arrow batch (and per Parquet row group) while a stream is ingested. With the size of
/// the chunks a stream arrives in, this bounds an ingest's working memory whatever its length.
pub const BATCH_ROWS: usize = 65_536;

/// A table an ingest writes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Table {
    /// The member table, replaced whole by a member ingest.
    Members,
    /// One collaboration's member tokens, by contract id.
    MemberTokens(String),
    /// Purchases of one month (`YYYY-MM`, the retailer's local time): each month of an ingest
    /// goes to its own file, so a question over a window reads only its months.
    Purchases(String),
    /// Consent events.
    Consent,
    /// A partner's customer list.
    List,
}

/// Where an ingest's rows go as they are built, one batch at a time: the store's staging area
/// ([`crate::store::Staging`]). Nothing written here is visible until the store commits it.
pub trait Sink {
    /// Takes the next batch of `table`'s rows.
    fn write(&mut self, table: &Table, batch: RecordBatch) -> Result<()>;
}

/// A stream being ingested: chunks of records in, Arrow rows out to a [`Sink`].
pub trait Ingest: Send {
    /// One record as this ingest takes it.
    type Input;

    /// Ingests the next chunk of records.
    fn push(&mut self, records: Vec<Self::Input>, sink: &mut dyn Sink) -> Result<()>;

    /// Ingests the next chunk given as an Arrow IPC stream, its columns named as the record's
    /// fields. Only the ingests that say so take one.
    fn push_arrow(&mut self, _ipc: &[u8], _sink: &mut dyn Sink) -> Result<()> {
        Err(cleanroom_core::Error::Input(
            "this ingest takes chunks of records, not Arrow IPC".into(),
        )
        .into())
    }

    /// Writes what is left and reports what happened to the records.
    fn finish(self, sink: &mut dyn Sink) -> Result<IngestReport>;
}

/// The Arrow builders of one table: rows gather here and leave as one batch.
trait Rows {
    fn len(&self) -> usize;
    fn take(&mut self) -> Result<RecordBatch>;
}

/// Hands a full batch of `rows` to `sink`; with `rest`, whatever is left, even nothing, so that
/// every table an ingest writes gets its file.
fn flush(rows: &mut dyn Rows, table: &Table, sink: &mut dyn Sink, rest: bool) -> Result<()> {
    if rest || rows.len() >= BATCH_ROWS {
        sink.write(table, rows.take()?)?;
    }
    Ok(())
}

impl IngestReport {
    /// Counts one more record received and returns its index in the stream, so that a strict
    /// error names the record by its place in the whole stream, not in its chunk.
    fn next_index(&mut self) -> usize {
        self.received += 1;
        usize::try_from(self.received - 1).unwrap_or(usize::MAX)
    }
}

/// Tokens of one identifier pair under every collaboration key, in a fixed order.
struct TokenBuilder {
    owner: Int64Builder,
    version: UInt32Builder,
    mac: FixedSizeBinaryBuilder,
    attribute: Option<StringBuilder>,
}

impl TokenBuilder {
    fn new(with_attribute: bool) -> Self {
        Self {
            owner: Int64Builder::new(),
            version: UInt32Builder::new(),
            mac: FixedSizeBinaryBuilder::new(32),
            attribute: with_attribute.then(StringBuilder::new),
        }
    }

    fn push(&mut self, owner: i64, token: Token, attribute: Option<&str>) -> Result<()> {
        self.owner.append_value(owner);
        self.version.append_value(token.version);
        self.mac.append_value(token.mac)?;
        if let Some(builder) = &mut self.attribute {
            builder.append_option(attribute);
        }
        Ok(())
    }
}

impl Rows for TokenBuilder {
    fn len(&self) -> usize {
        self.owner.len()
    }

    fn take(&mut self) -> Result<RecordBatch> {
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(self.owner.finish()),
            Arc::new(self.version.finish()),
            Arc::new(self.mac.finish()),
        ];
        if let Some(builder) = &mut self.attribute {
            columns.push(Arc::new(builder.finish()));
        }
        Ok(RecordBatch::try_new(
            tokens_schema(self.attribute.is_some()),
            columns,
        )?)
    }
}

/// Rows of the member table.
#[derive(Default)]
struct MemberRows {
    key: Int64Builder,
    age_band: StringBuilder,
    prefecture: StringBuilder,
    gender: StringBuilder,
}

impl Rows for MemberRows {
    fn len(&self) -> usize {
        self.key.len()
    }

    fn take(&mut self) -> Result<RecordBatch> {
        Ok(RecordBatch::try_new(
            members_schema(),
            vec![
                Arc::new(self.key.finish()),
                Arc::new(self.age_band.finish()),
                Arc::new(self.prefecture.finish()),
                Arc::new(self.gender.finish()),
            ],
        )?)
    }
}

/// A member export being ingested: the member table and each collaboration's member tokens. A
/// member without any usable identifier is still kept (it may buy and consent) but can never be
/// matched.
pub struct MembersIngest {
    pseudonyms: PseudonymKey,
    keys: Vec<(Table, CollaborationKey, TokenBuilder)>,
    as_of: NaiveDate,
    strict: bool,
    rows: MemberRows,
    /// Member pseudonyms seen so far (8 bytes a member), to refuse duplicates across chunks.
    seen: HashSet<i64>,
    report: IngestReport,
}

impl Ingest for MembersIngest {
    type Input = MemberInput;

    fn push(&mut self, records: Vec<MemberInput>, sink: &mut dyn Sink) -> Result<()> {
        for record in records {
            let index = self.report.next_index();
            self.member(index, &record)?;
        }
        flush(&mut self.rows, &Table::Members, sink, false)?;
        for (table, _, tokens) in &mut self.keys {
            flush(tokens, table, sink, false)?;
        }
        Ok(())
    }

    fn finish(mut self, sink: &mut dyn Sink) -> Result<IngestReport> {
        flush(&mut self.rows, &Table::Members, sink, true)?;
        for (table, _, tokens) in &mut self.keys {
            flush(tokens, table, sink, true)?;
        }
        Ok(self.report)
    }
}

impl MembersIngest {
    /// Starts an ingest under the rules' collaborations; ages are taken on `as_of`.
    pub fn new(rules: &Rules, secret: &MasterSecret, as_of: NaiveDate, strict: bool) -> Self {
        Self {
            pseudonyms: secret.pseudonym_key(),
            keys: rules
                .contracts
                .iter()
                .map(|(id, c)| {
                    (
                        Table::MemberTokens(id.clone()),
                        secret.collaboration_key(id, c.key_version),
                        TokenBuilder::new(false),
                    )
                })
                .collect(),
            as_of,
            strict,
            rows: MemberRows::default(),
            seen: HashSet::new(),
            report: IngestReport::default(),
        }
    }

    fn member(&mut self, index: usize, record: &MemberInput) -> Result<()> {
        let strict = self.strict;
        if record.member_id.trim().is_empty() {
            return self.report.reject(index, "member_id: empty", strict);
        }
        let Some(prefecture) = generalize::prefecture(&record.prefecture) else {
            return self
                .report
                .reject(index, "prefecture: not a Japanese prefecture", strict);
        };
        let member_key = self.pseudonyms.pseudonym(&record.member_id);
        if !self.seen.insert(member_key) {
            return self.report.reject(index, "member_id: duplicate", strict);
        }
        let mut identifiers = Vec::with_capacity(2);
        for (raw, normalize) in [
            (
                &record.email,
                normalize::email as fn(&str) -> Result<String, Rejection>,
            ),
            (&record.phone, normalize::phone),
        ] {
            if raw.trim().is_empty() {
                continue;
            }
            match normalize(raw) {
                Ok(normalized) => identifiers.push(normalized),
                // The member stays; only the bad identifier is dropped, and counted.
                Err(reason) => self.report.reject(index, reason.0, strict)?,
            }
        }
        for (_, key, tokens) in &mut self.keys {
            for id in &identifiers {
                tokens.push(member_key, key.token(id), None)?;
            }
        }
        self.rows.key.append_value(member_key);
        self.rows
            .age_band
            .append_value(generalize::age_band(&record.birth_date, self.as_of));
        self.rows.prefecture.append_value(prefecture);
        self.rows
            .gender
            .append_value(generalize::gender(&record.gender));
        self.report.accepted += 1;
        Ok(())
    }
}

/// Rows of the purchases table.
struct PurchaseRows {
    key: Int64Builder,
    at: TimestampMicrosecondBuilder,
    sku: StringBuilder,
    brand: StringBuilder,
    maker: StringBuilder,
    category: StringBuilder,
    quantity: Int64Builder,
    amount: Int64Builder,
}

impl Default for PurchaseRows {
    fn default() -> Self {
        Self {
            key: Int64Builder::new(),
            at: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            sku: StringBuilder::new(),
            brand: StringBuilder::new(),
            maker: StringBuilder::new(),
            category: StringBuilder::new(),
            quantity: Int64Builder::new(),
            amount: Int64Builder::new(),
        }
    }
}

impl Rows for PurchaseRows {
    fn len(&self) -> usize {
        self.key.len()
    }

    fn take(&mut self) -> Result<RecordBatch> {
        Ok(RecordBatch::try_new(
            purchases_schema(),
            vec![
                Arc::new(self.key.finish()),
                Arc::new(self.at.finish()),
                Arc::new(self.sku.finish()),
                Arc::new(self.brand.finish()),
                Arc::new(self.maker.finish()),
                Arc::new(self.category.finish()),
                Arc::new(self.quantity.finish()),
                Arc::new(self.amount.finish()),
            ],
        )?)
    }
}

/// One purchase as the checks read it, borrowed from a record or from a row of Arrow columns.
struct PurchaseRow<'a> {
    member_id: &'a str,
    purchased_at: &'a str,
    sku: &'a str,
    brand: &'a str,
    manufacturer: &'a str,
    category: &'a str,
    /// None: the column had no value (a record always has one).
    quantity: Option<i64>,
    amount: Option<i64>,
}

impl<'a> PurchaseRow<'a> {
    fn of(r: &'a PurchaseInput) -> Self {
        Self {
            member_id: &r.member_id,
            purchased_at: &r.purchased_at,
            sku: &r.sku,
            brand: &r.brand,
            manufacturer: &r.manufacturer,
            category: &r.category,
            quantity: Some(r.quantity),
            amount: Some(r.amount),
        }
    }
}

/// The columns of a purchases chunk sent as Arrow, named as `PurchaseRecord`'s fields.
struct PurchaseColumns {
    text: [StringArray; 6],
    quantity: Int64Array,
    amount: Int64Array,
}

impl PurchaseColumns {
    const FIELDS: [&'static str; 8] = [
        "member_id",
        "purchased_at",
        "sku",
        "brand",
        "manufacturer",
        "category",
        "quantity",
        "amount",
    ];

    fn of(batch: &RecordBatch) -> Result<Self> {
        let text = |i: usize| columnar::text(batch, Self::FIELDS[i]);
        Ok(Self {
            text: [text(0)?, text(1)?, text(2)?, text(3)?, text(4)?, text(5)?],
            quantity: columnar::whole(batch, "quantity")?,
            amount: columnar::whole(batch, "amount")?,
        })
    }

    fn row(&self, i: usize) -> PurchaseRow<'_> {
        let text = |c: usize| columnar::text_at(&self.text[c], i);
        PurchaseRow {
            member_id: text(0),
            purchased_at: text(1),
            sku: text(2),
            brand: text(3),
            manufacturer: text(4),
            category: text(5),
            quantity: columnar::whole_at(&self.quantity, i),
            amount: columnar::whole_at(&self.amount, i),
        }
    }
}

/// The purchases table of one local month.
fn purchases_of((year, month): (i32, u32)) -> Table {
    Table::Purchases(format!("{year:04}-{month:02}"))
}

/// A purchase export being ingested.
pub struct PurchasesIngest {
    pseudonyms: PseudonymKey,
    categories: Option<Vec<String>>,
    strict: bool,
    /// The retailer's offset from UTC, for the local month a purchase falls in.
    offset: chrono::FixedOffset,
    /// Rows by local month (year and month: formatted only when a batch leaves).
    months: BTreeMap<(i32, u32), PurchaseRows>,
    report: IngestReport,
}

impl Ingest for PurchasesIngest {
    type Input = PurchaseInput;

    fn push(&mut self, records: Vec<PurchaseInput>, sink: &mut dyn Sink) -> Result<()> {
        for record in &records {
            let index = self.report.next_index();
            self.purchase(index, PurchaseRow::of(record))?;
        }
        self.flush_full(sink)
    }

    fn push_arrow(&mut self, ipc: &[u8], sink: &mut dyn Sink) -> Result<()> {
        for batch in columnar::batches(ipc, &PurchaseColumns::FIELDS)? {
            let columns = PurchaseColumns::of(&batch)?;
            for i in 0..batch.num_rows() {
                let index = self.report.next_index();
                self.purchase(index, columns.row(i))?;
            }
        }
        self.flush_full(sink)
    }

    fn finish(mut self, sink: &mut dyn Sink) -> Result<IngestReport> {
        for (month, rows) in &mut self.months {
            flush(rows, &purchases_of(*month), sink, true)?;
        }
        Ok(self.report)
    }
}

impl PurchasesIngest {
    /// Starts an ingest; categories must be in the rules' `category` domain when one is set.
    pub fn new(rules: &Rules, secret: &MasterSecret, strict: bool) -> Self {
        let offset = chrono::FixedOffset::east_opt(rules.retailer.utc_offset_minutes * 60)
            .unwrap_or_else(|| chrono::FixedOffset::east_opt(0).expect("zero offset"));
        Self {
            pseudonyms: secret.pseudonym_key(),
            categories: rules.domains.get("category").cloned(),
            strict,
            offset,
            months: BTreeMap::new(),
            report: IngestReport::default(),
        }
    }

    fn flush_full(&mut self, sink: &mut dyn Sink) -> Result<()> {
        for (month, rows) in &mut self.months {
            flush(rows, &purchases_of(*month), sink, false)?;
        }
        Ok(())
    }

    fn purchase(&mut self, index: usize, r: PurchaseRow<'_>) -> Result<()> {
        let time = parse_time(r.purchased_at);
        let reason = if r.member_id.trim().is_empty() {
            Some("member_id: empty")
        } else if time.is_none() {
            Some("purchased_at: not an RFC 3339 timestamp")
        } else if r.quantity.is_none() {
            Some("quantity: missing")
        } else if r.quantity.is_some_and(|q| q <= 0) {
            Some("quantity: must be positive")
        } else if r.amount.is_none() {
            Some("amount: missing")
        } else if r.amount.is_some_and(|a| a < 0) {
            Some("amount: must not be negative")
        } else if self
            .categories
            .as_ref()
            .is_some_and(|c| !c.iter().any(|v| v == r.category.trim()))
        {
            Some("category: not in the configured domain")
        } else {
            None
        };
        let (None, Some(time)) = (reason, time) else {
            let reason = reason.unwrap_or("purchased_at: not an RFC 3339 timestamp");
            return self.report.reject(index, reason, self.strict);
        };
        let local = time.with_timezone(&self.offset);
        let rows = self
            .months
            .entry((local.year(), local.month()))
            .or_default();
        rows.key
            .append_value(self.pseudonyms.pseudonym(r.member_id));
        rows.at.append_value(time.timestamp_micros());
        rows.sku.append_value(r.sku.trim());
        rows.brand.append_value(r.brand.trim());
        rows.maker.append_value(r.manufacturer.trim());
        rows.category.append_value(r.category.trim());
        rows.quantity.append_value(r.quantity.unwrap_or_default());
        rows.amount.append_value(r.amount.unwrap_or_default());
        self.report.accepted += 1;
        Ok(())
    }
}

/// Rows of the consent log.
struct ConsentRows {
    key: Int64Builder,
    purpose: StringBuilder,
    version: UInt32Builder,
    action: StringBuilder,
    at: TimestampMicrosecondBuilder,
    source: StringBuilder,
    expires: TimestampMicrosecondBuilder,
}

impl Default for ConsentRows {
    fn default() -> Self {
        Self {
            key: Int64Builder::new(),
            purpose: StringBuilder::new(),
            version: UInt32Builder::new(),
            action: StringBuilder::new(),
            at: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            source: StringBuilder::new(),
            expires: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
        }
    }
}

impl Rows for ConsentRows {
    fn len(&self) -> usize {
        self.key.len()
    }

    fn take(&mut self) -> Result<RecordBatch> {
        Ok(RecordBatch::try_new(
            consent_schema(),
            vec![
                Arc::new(self.key.finish()),
                Arc::new(self.purpose.finish()),
                Arc::new(self.version.finish()),
                Arc::new(self.action.finish()),
                Arc::new(self.at.finish()),
                Arc::new(self.source.finish()),
                Arc::new(self.expires.finish()),
            ],
        )?)
    }
}

/// A consent export being ingested.
pub struct ConsentIngest {
    pseudonyms: PseudonymKey,
    purposes: HashSet<String>,
    strict: bool,
    rows: ConsentRows,
    report: IngestReport,
}

impl Ingest for ConsentIngest {
    type Input = ConsentInput;

    fn push(&mut self, records: Vec<ConsentInput>, sink: &mut dyn Sink) -> Result<()> {
        for record in records {
            let index = self.report.next_index();
            self.event(index, &record)?;
        }
        flush(&mut self.rows, &Table::Consent, sink, false)
    }

    fn finish(mut self, sink: &mut dyn Sink) -> Result<IngestReport> {
        flush(&mut self.rows, &Table::Consent, sink, true)?;
        Ok(self.report)
    }
}

impl ConsentIngest {
    /// Starts an ingest; purposes must be configured in the rules.
    pub fn new(rules: &Rules, secret: &MasterSecret, strict: bool) -> Self {
        Self {
            pseudonyms: secret.pseudonym_key(),
            purposes: rules.purposes.keys().cloned().collect(),
            strict,
            rows: ConsentRows::default(),
            report: IngestReport::default(),
        }
    }

    fn event(&mut self, index: usize, r: &ConsentInput) -> Result<()> {
        let action = Action::parse(&r.action);
        let at = parse_time(&r.at);
        let expiry = if r.expires_at.trim().is_empty() {
            Some(None)
        } else {
            parse_time(&r.expires_at).map(Some)
        };
        let reason = if r.member_id.trim().is_empty() {
            Some("member_id: empty")
        } else if !self.purposes.contains(r.purpose.trim()) {
            Some("purpose: not configured")
        } else if action.is_none() {
            Some("action: must be granted or withdrawn")
        } else if at.is_none() {
            Some("at: not an RFC 3339 timestamp")
        } else if expiry.is_none() {
            Some("expires_at: not an RFC 3339 timestamp")
        } else if r.notice_version == 0 {
            Some("notice_version: must be positive")
        } else {
            None
        };
        let (None, Some(action), Some(at), Some(expiry)) = (reason, action, at, expiry) else {
            let reason = reason.unwrap_or("record: invalid");
            return self.report.reject(index, reason, self.strict);
        };
        let rows = &mut self.rows;
        rows.key
            .append_value(self.pseudonyms.pseudonym(&r.member_id));
        rows.purpose.append_value(r.purpose.trim());
        rows.version.append_value(r.notice_version);
        rows.action.append_value(action.as_str());
        rows.at.append_value(at.timestamp_micros());
        rows.source.append_value(r.source.trim());
        rows.expires
            .append_option(expiry.map(|t| t.timestamp_micros()));
        self.report.accepted += 1;
        Ok(())
    }
}

/// A partner's customer list being ingested: one row per token, `owner` being the record number
/// in the stream, so that a customer given by both email and phone still counts once.
pub struct ListIngest {
    attribute_values: Vec<String>,
    key: CollaborationKey,
    strict: bool,
    rows: TokenBuilder,
    report: IngestReport,
}

impl Ingest for ListIngest {
    type Input = ListInput;

    fn push(&mut self, records: Vec<ListInput>, sink: &mut dyn Sink) -> Result<()> {
        for record in records {
            let index = self.report.next_index();
            self.customer(index, &record)?;
        }
        flush(&mut self.rows, &Table::List, sink, false)
    }

    fn finish(mut self, sink: &mut dyn Sink) -> Result<IngestReport> {
        flush(&mut self.rows, &Table::List, sink, true)?;
        Ok(self.report)
    }
}

impl ListIngest {
    /// Starts a list of `partner`'s, hashed (or its tokens checked) under `key`.
    pub fn new(partner: &Partner, key: CollaborationKey, strict: bool) -> Self {
        Self {
            attribute_values: partner.attribute_values.clone(),
            key,
            strict,
            rows: TokenBuilder::new(true),
            report: IngestReport::default(),
        }
    }

    fn customer(&mut self, index: usize, r: &ListInput) -> Result<()> {
        let strict = self.strict;
        let has_raw = !r.email.trim().is_empty() || !r.phone.trim().is_empty();
        let has_tokens = !r.email_token.trim().is_empty() || !r.phone_token.trim().is_empty();
        let attribute = r.attribute.trim();
        if has_raw && has_tokens {
            return self
                .report
                .reject(index, "record: mixes raw identifiers and tokens", strict);
        }
        if !has_raw && !has_tokens {
            return self.report.reject(index, "record: no identifier", strict);
        }
        if !attribute.is_empty() && !self.attribute_values.iter().any(|v| v == attribute) {
            return self.report.reject(
                index,
                "attribute: not one of the partner's declared values",
                strict,
            );
        }
        let (tokens, rejected) = if has_raw {
            self.hashed(index, r)?
        } else {
            self.checked(index, r)?
        };
        // A record with one bad identifier still counts through its good one.
        if tokens.is_empty() {
            if !rejected {
                self.report.reject(index, "record: no identifier", strict)?;
            }
            return Ok(());
        }
        let owner = i64::try_from(index).unwrap_or(i64::MAX);
        let attribute = (!attribute.is_empty()).then_some(attribute);
        for token in tokens {
            self.rows.push(owner, token, attribute)?;
        }
        self.report.accepted += 1;
        Ok(())
    }

    /// Tokens of a record's raw identifiers, and whether one was rejected.
    fn hashed(&mut self, index: usize, r: &ListInput) -> Result<(Vec<Token>, bool)> {
        let mut tokens = Vec::with_capacity(2);
        let mut rejected = false;
        for (raw, normalize) in [
            (
                &r.email,
                normalize::email as fn(&str) -> Result<String, Rejection>,
            ),
            (&r.phone, normalize::phone),
        ] {
            if raw.trim().is_empty() {
                continue;
            }
            match normalize(raw) {
                Ok(normalized) => tokens.push(self.key.token(&normalized)),
                Err(reason) => {
                    self.report.reject(index, reason.0, self.strict)?;
                    rejected = true;
                }
            }
        }
        Ok((tokens, rejected))
    }

    /// A record's pre-computed tokens, checked, and whether one was rejected.
    fn checked(&mut self, index: usize, r: &ListInput) -> Result<(Vec<Token>, bool)> {
        let mut tokens = Vec::with_capacity(2);
        let mut rejected = false;
        for text in [&r.email_token, &r.phone_token] {
            if text.trim().is_empty() {
                continue;
            }
            let reason = match text.parse::<Token>() {
                Ok(token) if token.version == self.key.version => {
                    tokens.push(token);
                    continue;
                }
                Ok(_) => "token: key version is not the collaboration's current one",
                Err(_) => "token: malformed",
            };
            self.report.reject(index, reason, self.strict)?;
            rejected = true;
        }
        Ok((tokens, rejected))
    }
}
