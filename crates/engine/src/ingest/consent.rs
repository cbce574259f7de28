//! The consent export: every grant and withdrawal, appended to the consent log.

use std::collections::HashSet;
use std::sync::Arc;

use cleanroom_core::consent::Action;
use cleanroom_core::rules::Rules;
use cleanroom_core::token::{MasterSecret, PseudonymKey};
use datafusion::arrow::array::{
    ArrayBuilder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder, UInt32Builder,
};
use datafusion::arrow::record_batch::RecordBatch;

use super::{Ingest, IngestReport, Rows, Sink, Table, flush, parse_time};
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
