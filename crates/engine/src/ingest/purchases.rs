//! The purchases export, as records or as Arrow columns: a table per local month.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::Datelike;
use cleanroom_core::rules::Rules;
use cleanroom_core::token::{MasterSecret, PseudonymKey};
use datafusion::arrow::array::{
    ArrayBuilder, Int64Array, Int64Builder, StringArray, StringBuilder, TimestampMicrosecondBuilder,
};
use datafusion::arrow::record_batch::RecordBatch;

use super::{Ingest, IngestReport, Rows, Sink, Table, columnar, flush, parse_time};
use crate::{Result, tables};

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
            tables::purchases::schema(),
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
        let offset = rules.retailer.offset();
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
