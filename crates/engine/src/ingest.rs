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
//!
//! One file per table: [`members`] (the member table and each collaboration's member tokens),
//! [`purchases`], [`consent`] and [`lists`] (a partner's customer list); their schemas are in
//! [`crate::tables`].

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use datafusion::arrow::record_batch::RecordBatch;

use crate::Result;

mod columnar;
pub mod consent;
pub mod lists;
pub mod members;
pub mod purchases;
mod tokens;

pub use consent::{ConsentIngest, ConsentInput};
pub use lists::{ListIngest, ListInput, ListKeys};
pub use members::{MemberInput, MembersIngest, TokensOnly};
pub use purchases::{PurchaseInput, PurchasesIngest};

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
    /// Erasure tombstones, replaced whole by each erasure.
    Erasures,
}

impl Table {
    /// Whether the table holds a collaboration's match tokens (member tokens, a list): such a
    /// table is sealed with the collaboration's data key.
    pub fn holds_tokens(&self) -> bool {
        matches!(self, Table::MemberTokens(_) | Table::List)
    }
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

    /// The tables of collaborations this ingest writes, each with the key to seal it with
    /// ([`crate::store::Staging::seal`]).
    fn seals(&self) -> Vec<(Table, crate::store::KeyRef)> {
        Vec::new()
    }
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

#[cfg(test)]
mod fuzz;
