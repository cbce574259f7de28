//! The consent export: every grant and withdrawal, appended to the consent log.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use cleanroom_core::consent::Action;
use cleanroom_core::rules::Rules;
use cleanroom_core::token::{MasterSecret, MemberDigestKey, PseudonymKey};
use datafusion::arrow::array::{
    ArrayBuilder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder, UInt32Builder,
};
use datafusion::arrow::record_batch::RecordBatch;

use super::{Ingest, IngestReport, Rows, Sink, Table, flush, parse_time};
use crate::store::TableFile;
use crate::{Result, tables};

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
            tables::consent::schema(),
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
    /// Erased members' tombstones: (erasure digest, purpose) to the erasure's instant (µs).
    tombstones: HashMap<(i64, String), i64>,
    digests: MemberDigestKey,
}

/// The reason an event of an erased member from before their erasure is refused.
pub const ERASED: &str = "member_id: erased; the event is from before the erasure";

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
            tombstones: HashMap::new(),
            digests: secret.member_digest_key("erasure"),
        }
    }

    /// Refuses, from the erasure tombstones `erasures` (a snapshot's), every event of an erased member for a
    /// purpose up to the instant they were erased ([`ERASED`]): a re-ingest of an old export
    /// cannot make them consent again, while a grant they give after the erasure counts.
    pub fn after_erasures(mut self, erasures: Option<&TableFile>) -> Result<Self> {
        if let Some(file) = erasures {
            for (digest, purpose, at) in crate::store::tombstone_rows(file)? {
                self.tombstones.insert((digest, purpose), at);
            }
        }
        Ok(self)
    }

    /// Whether the tombstones refuse an event of `member` for `purpose` at `at` (µs).
    fn erased(&self, member: i64, purpose: &str, at: i64) -> bool {
        if self.tombstones.is_empty() {
            return false;
        }
        let key = (self.digests.digest(member), purpose.to_string());
        self.tombstones
            .get(&key)
            .is_some_and(|erased| at <= *erased)
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
        let member = self.pseudonyms.pseudonym(&r.member_id);
        if self.erased(member, r.purpose.trim(), at.timestamp_micros()) {
            return self.report.reject(index, ERASED, self.strict);
        }
        let rows = &mut self.rows;
        rows.key.append_value(member);
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
