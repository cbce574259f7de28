//! Ingest: turns incoming records into the pseudonymous tables the store keeps. Emails and phones
//! are normalized and keyed per collaboration, member ids become keyed pseudonyms, birth dates
//! become age bands, and every other direct identifier is dropped here, before anything is stored.
//!
//! A record that breaks a rule is either skipped and counted by reason, or, in strict mode, fails
//! the whole batch. Reasons are fixed phrases that never contain the record's values.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use cleanroom_core::consent::Action;
use cleanroom_core::generalize;
use cleanroom_core::normalize::{self, Rejection};
use cleanroom_core::rules::{Partner, Rules};
use cleanroom_core::token::{CollaborationKey, MasterSecret, Token};
use datafusion::arrow::array::{
    ArrayRef, FixedSizeBinaryBuilder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
    UInt32Builder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;

use crate::Result;

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

    fn finish(mut self) -> Result<RecordBatch> {
        let with_attribute = self.attribute.is_some();
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(self.owner.finish()),
            Arc::new(self.version.finish()),
            Arc::new(self.mac.finish()),
        ];
        if let Some(builder) = &mut self.attribute {
            columns.push(Arc::new(builder.finish()));
        }
        Ok(RecordBatch::try_new(
            tokens_schema(with_attribute),
            columns,
        )?)
    }
}

/// The result of a member ingest: the member table and, per collaboration, the member tokens.
pub struct MemberTables {
    /// `members_schema()` rows.
    pub members: RecordBatch,
    /// Member tokens by collaboration (contract) id.
    pub tokens: BTreeMap<String, RecordBatch>,
    /// What happened to the records.
    pub report: IngestReport,
}

/// Builds the member table and each collaboration's member tokens. A member without any usable
/// identifier is still kept (it may buy and consent) but can never be matched.
pub fn members(
    records: &[MemberInput],
    rules: &Rules,
    secret: &MasterSecret,
    as_of: NaiveDate,
    strict: bool,
) -> Result<MemberTables> {
    let pseudonyms = secret.pseudonym_key();
    let keys: Vec<(&String, CollaborationKey)> = rules
        .contracts
        .iter()
        .map(|(id, c)| (id, secret.collaboration_key(id, c.key_version)))
        .collect();
    let mut report = IngestReport::default();
    let mut key_col = Int64Builder::new();
    let mut age_col = StringBuilder::new();
    let mut pref_col = StringBuilder::new();
    let mut gender_col = StringBuilder::new();
    let mut token_builders: Vec<TokenBuilder> =
        keys.iter().map(|_| TokenBuilder::new(false)).collect();
    let mut seen = std::collections::HashSet::new();

    for (index, record) in records.iter().enumerate() {
        report.received += 1;
        if record.member_id.trim().is_empty() {
            report.reject(index, "member_id: empty", strict)?;
            continue;
        }
        let Some(prefecture) = generalize::prefecture(&record.prefecture) else {
            report.reject(index, "prefecture: not a Japanese prefecture", strict)?;
            continue;
        };
        let member_key = pseudonyms.pseudonym(&record.member_id);
        if !seen.insert(member_key) {
            report.reject(index, "member_id: duplicate", strict)?;
            continue;
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
                Err(reason) => report.reject(index, reason.0, strict)?,
            }
        }
        for ((_, key), builder) in keys.iter().zip(token_builders.iter_mut()) {
            for id in &identifiers {
                builder.push(member_key, key.token(id), None)?;
            }
        }
        key_col.append_value(member_key);
        age_col.append_value(generalize::age_band(&record.birth_date, as_of));
        pref_col.append_value(prefecture);
        gender_col.append_value(generalize::gender(&record.gender));
        report.accepted += 1;
    }
    let members = RecordBatch::try_new(
        members_schema(),
        vec![
            Arc::new(key_col.finish()),
            Arc::new(age_col.finish()),
            Arc::new(pref_col.finish()),
            Arc::new(gender_col.finish()),
        ],
    )?;
    let mut tokens = BTreeMap::new();
    for ((id, _), builder) in keys.into_iter().zip(token_builders) {
        tokens.insert(id.clone(), builder.finish()?);
    }
    Ok(MemberTables {
        members,
        tokens,
        report,
    })
}

/// Builds a batch of purchases.
pub fn purchases(
    records: &[PurchaseInput],
    rules: &Rules,
    secret: &MasterSecret,
    strict: bool,
) -> Result<(RecordBatch, IngestReport)> {
    let pseudonyms = secret.pseudonym_key();
    let categories = rules.domains.get("category");
    let mut report = IngestReport::default();
    let mut key = Int64Builder::new();
    let mut at = TimestampMicrosecondBuilder::new().with_timezone("UTC");
    let (mut sku, mut brand, mut maker, mut category) = (
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
    );
    let (mut quantity, mut amount) = (Int64Builder::new(), Int64Builder::new());
    for (index, r) in records.iter().enumerate() {
        report.received += 1;
        let reason = if r.member_id.trim().is_empty() {
            Some("member_id: empty")
        } else if parse_time(&r.purchased_at).is_none() {
            Some("purchased_at: not an RFC 3339 timestamp")
        } else if r.quantity <= 0 {
            Some("quantity: must be positive")
        } else if r.amount < 0 {
            Some("amount: must not be negative")
        } else if categories.is_some_and(|c| !c.iter().any(|v| v == r.category.trim())) {
            Some("category: not in the configured domain")
        } else {
            None
        };
        if let Some(reason) = reason {
            report.reject(index, reason, strict)?;
            continue;
        }
        let time = parse_time(&r.purchased_at).expect("checked above");
        key.append_value(pseudonyms.pseudonym(&r.member_id));
        at.append_value(time.timestamp_micros());
        sku.append_value(r.sku.trim());
        brand.append_value(r.brand.trim());
        maker.append_value(r.manufacturer.trim());
        category.append_value(r.category.trim());
        quantity.append_value(r.quantity);
        amount.append_value(r.amount);
        report.accepted += 1;
    }
    let batch = RecordBatch::try_new(
        purchases_schema(),
        vec![
            Arc::new(key.finish()),
            Arc::new(at.finish()),
            Arc::new(sku.finish()),
            Arc::new(brand.finish()),
            Arc::new(maker.finish()),
            Arc::new(category.finish()),
            Arc::new(quantity.finish()),
            Arc::new(amount.finish()),
        ],
    )?;
    Ok((batch, report))
}

/// Builds a batch of consent events.
pub fn consent(
    records: &[ConsentInput],
    rules: &Rules,
    secret: &MasterSecret,
    strict: bool,
) -> Result<(RecordBatch, IngestReport)> {
    let pseudonyms = secret.pseudonym_key();
    let mut report = IngestReport::default();
    let mut key = Int64Builder::new();
    let (mut purpose, mut action, mut source) = (
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
    );
    let mut version = UInt32Builder::new();
    let mut at = TimestampMicrosecondBuilder::new().with_timezone("UTC");
    let mut expires = TimestampMicrosecondBuilder::new().with_timezone("UTC");
    for (index, r) in records.iter().enumerate() {
        report.received += 1;
        let parsed_action = Action::parse(&r.action);
        let expiry = if r.expires_at.trim().is_empty() {
            Some(None)
        } else {
            parse_time(&r.expires_at).map(Some)
        };
        let reason = if r.member_id.trim().is_empty() {
            Some("member_id: empty")
        } else if !rules.purposes.contains_key(r.purpose.trim()) {
            Some("purpose: not configured")
        } else if parsed_action.is_none() {
            Some("action: must be granted or withdrawn")
        } else if parse_time(&r.at).is_none() {
            Some("at: not an RFC 3339 timestamp")
        } else if expiry.is_none() {
            Some("expires_at: not an RFC 3339 timestamp")
        } else if r.notice_version == 0 {
            Some("notice_version: must be positive")
        } else {
            None
        };
        if let Some(reason) = reason {
            report.reject(index, reason, strict)?;
            continue;
        }
        key.append_value(pseudonyms.pseudonym(&r.member_id));
        purpose.append_value(r.purpose.trim());
        version.append_value(r.notice_version);
        action.append_value(parsed_action.expect("checked").as_str());
        at.append_value(parse_time(&r.at).expect("checked").timestamp_micros());
        source.append_value(r.source.trim());
        expires.append_option(expiry.flatten().map(|t| t.timestamp_micros()));
        report.accepted += 1;
    }
    let batch = RecordBatch::try_new(
        consent_schema(),
        vec![
            Arc::new(key.finish()),
            Arc::new(purpose.finish()),
            Arc::new(version.finish()),
            Arc::new(action.finish()),
            Arc::new(at.finish()),
            Arc::new(source.finish()),
            Arc::new(expires.finish()),
        ],
    )?;
    Ok((batch, report))
}

/// Builds a partner list: one row per token, `owner` being the record number so that a customer
/// given by both email and phone still counts once.
pub fn partner_list(
    records: &[ListInput],
    partner: &Partner,
    key: &CollaborationKey,
    strict: bool,
) -> Result<(RecordBatch, IngestReport)> {
    let mut report = IngestReport::default();
    let mut builder = TokenBuilder::new(true);
    for (index, r) in records.iter().enumerate() {
        report.received += 1;
        let has_raw = !r.email.trim().is_empty() || !r.phone.trim().is_empty();
        let has_tokens = !r.email_token.trim().is_empty() || !r.phone_token.trim().is_empty();
        let attribute = r.attribute.trim();
        if has_raw && has_tokens {
            report.reject(index, "record: mixes raw identifiers and tokens", strict)?;
            continue;
        }
        if !has_raw && !has_tokens {
            report.reject(index, "record: no identifier", strict)?;
            continue;
        }
        if !attribute.is_empty() && !partner.attribute_values.iter().any(|v| v == attribute) {
            report.reject(
                index,
                "attribute: not one of the partner's declared values",
                strict,
            )?;
            continue;
        }
        let mut tokens = Vec::with_capacity(2);
        let mut rejected = false;
        if has_raw {
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
                    Ok(normalized) => tokens.push(key.token(&normalized)),
                    Err(reason) => {
                        report.reject(index, reason.0, strict)?;
                        rejected = true;
                    }
                }
            }
        } else {
            for text in [&r.email_token, &r.phone_token] {
                if text.trim().is_empty() {
                    continue;
                }
                match text.parse::<Token>() {
                    Ok(token) if token.version == key.version => tokens.push(token),
                    Ok(_) => {
                        report.reject(
                            index,
                            "token: key version is not the collaboration's current one",
                            strict,
                        )?;
                        rejected = true;
                    }
                    Err(_) => {
                        report.reject(index, "token: malformed", strict)?;
                        rejected = true;
                    }
                }
            }
        }
        // A record with one bad identifier still counts through its good one.
        if tokens.is_empty() {
            if !rejected {
                report.reject(index, "record: no identifier", strict)?;
            }
            continue;
        }
        let owner = i64::try_from(index).unwrap_or(i64::MAX);
        let attribute = (!attribute.is_empty()).then_some(attribute);
        for token in tokens {
            builder.push(owner, token, attribute)?;
        }
        report.accepted += 1;
    }
    Ok((builder.finish()?, report))
}
