//! Streaming a large export as columns: a CSV or Parquet file is read into Arrow record batches
//! (only the columns the service takes), and each batch goes as one Arrow IPC stream in a chunk
//! message. A purchases export of millions of rows moves as columnar data end to end, without a
//! protobuf message per record. As with records, a batch that does not parse cancels the call, so
//! the service never takes a file's first part for the whole of it.

use std::fs::File;
use std::io::Read;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow::array::RecordBatch;
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema};
use arrow::error::ArrowError;
use arrow::ipc::writer::StreamWriter;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::stream::{Progress, advanced, send_read};
use crate::{Error, Result};

/// Rows per batch, and so per message: about 3 MB of purchases, well under the message limit.
pub const BATCH_ROWS: usize = 32_768;

/// A column the service takes: its name, and whether it holds whole numbers (else text).
#[derive(Debug, Clone, Copy)]
pub struct Column {
    /// The name, as the record's field and the file's header.
    pub name: &'static str,
    /// Whole numbers (else text).
    pub whole: bool,
}

/// The columns of a purchases export, as `PurchaseRecord` names them.
pub const PURCHASE_COLUMNS: [Column; 8] = [
    Column::text("member_id"),
    Column::text("purchased_at"),
    Column::text("sku"),
    Column::text("brand"),
    Column::text("manufacturer"),
    Column::text("category"),
    Column::whole("quantity"),
    Column::whole("amount"),
];

impl Column {
    const fn text(name: &'static str) -> Self {
        Self { name, whole: false }
    }

    const fn whole(name: &'static str) -> Self {
        Self { name, whole: true }
    }
}

/// Sends `header`, then the file's `columns` in batches (`chunk` makes a message of each batch's
/// Arrow IPC), as the request stream of `call`. A file whose name ends in `.parquet` is read as
/// Parquet, any other as CSV with a header row.
pub async fn send_columns<M, R, F, Fut>(
    path: &Path,
    header: M,
    columns: &'static [Column],
    chunk: fn(Vec<u8>) -> M,
    progress: Arc<Progress>,
    call: F,
) -> Result<R>
where
    M: Send + 'static,
    F: FnOnce(ReceiverStream<M>) -> Fut,
    Fut: std::future::Future<Output = Result<R>>,
{
    let path: PathBuf = path.to_path_buf();
    let read = move |messages: &mpsc::Sender<M>, progress: &Progress| {
        let file = FileRead {
            path: &path,
            columns,
        };
        if is_parquet(&path) {
            file.parquet(chunk, messages, progress)
        } else {
            file.csv(chunk, messages, progress)
        }
    };
    send_read(header, progress, read, call).await
}

fn is_parquet(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

/// One file being read into batches.
struct FileRead<'a> {
    path: &'a Path,
    columns: &'static [Column],
}

impl FileRead<'_> {
    fn fail(&self, message: String) -> Error {
        Error::File {
            path: self.path.display().to_string(),
            message,
        }
    }

    fn open(&self) -> Result<File> {
        File::open(self.path).map_err(|e| self.fail(e.to_string()))
    }

    /// A CSV file: its header names the columns; the others are never parsed.
    fn csv<M>(
        &self,
        chunk: fn(Vec<u8>) -> M,
        messages: &mpsc::Sender<M>,
        progress: &Progress,
    ) -> Result<()> {
        let names = self.csv_header()?;
        let (schema, projection) = self.csv_schema(&names)?;
        let read = Arc::new(AtomicU64::new(0));
        let counted = Counted {
            inner: self.open()?,
            read: Arc::clone(&read),
        };
        let reader = arrow::csv::ReaderBuilder::new(Arc::new(schema))
            .with_header(true)
            .with_batch_size(BATCH_ROWS)
            .with_projection(projection)
            .build(counted)
            .map_err(|e| self.fail(format!("not a CSV file: {}", detail(&e))))?;
        let mut first_row = 1u64;
        for batch in reader {
            let batch = batch.map_err(|_| {
                self.fail(format!(
                    "rows {first_row} to {}: a row has the wrong number of fields, or a value \
                     that does not fit its column ({} must be whole numbers)",
                    first_row + BATCH_ROWS as u64 - 1,
                    self.whole_names()
                ))
            })?;
            first_row += batch.num_rows() as u64;
            // The reader reads ahead of its batch by a buffer at most: close enough for a bar.
            let bytes = read.load(Ordering::Relaxed);
            if !self.send(&batch, chunk, messages, progress, bytes)? {
                return Ok(());
            }
        }
        Ok(())
    }

    fn csv_header(&self) -> Result<Vec<String>> {
        let mut reader = csv::Reader::from_path(self.path).map_err(|e| self.fail(e.to_string()))?;
        let header = reader
            .headers()
            .map_err(|_| self.fail("the first row is not a CSV header".into()))?;
        Ok(header.iter().map(|h| h.trim().to_string()).collect())
    }

    /// Every column of the file (numbers where this record takes them, text otherwise) and the
    /// positions of the ones this record takes, in the record's order.
    fn csv_schema(&self, names: &[String]) -> Result<(Schema, Vec<usize>)> {
        let fields: Vec<Field> = names
            .iter()
            .map(|name| {
                let whole = self.columns.iter().any(|c| c.name == name && c.whole);
                let kind = if whole {
                    DataType::Int64
                } else {
                    DataType::Utf8
                };
                Field::new(name, kind, true)
            })
            .collect();
        let projection = self.positions(names)?;
        Ok((Schema::new(fields), projection))
    }

    fn positions(&self, names: &[impl AsRef<str>]) -> Result<Vec<usize>> {
        self.columns
            .iter()
            .map(|c| {
                let mut at = names
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| n.as_ref() == c.name);
                match (at.next(), at.next()) {
                    (Some((i, _)), None) => Ok(i),
                    (None, _) => Err(self.fail(format!("the file has no column `{}`", c.name))),
                    (Some(_), Some(_)) => {
                        Err(self.fail(format!("the file has two columns `{}`", c.name)))
                    }
                }
            })
            .collect()
    }

    fn whole_names(&self) -> String {
        let names: Vec<&str> = self
            .columns
            .iter()
            .filter(|c| c.whole)
            .map(|c| c.name)
            .collect();
        names.join(" and ")
    }

    /// A Parquet file: only the record's columns are decoded; text columns of another type
    /// (a timestamp, a date) are sent as their text.
    fn parquet<M>(
        &self,
        chunk: fn(Vec<u8>) -> M,
        messages: &mpsc::Sender<M>,
        progress: &Progress,
    ) -> Result<()> {
        // The decoders unwrap parts of a file's metadata a damaged file may lack (the Arrow
        // schema a Parquet file embeds): their panic is this file's error, not the tool's. What
        // was sent before it goes nowhere: the error cancels the call.
        let read = AssertUnwindSafe(|| self.read_parquet(chunk, messages, progress));
        std::panic::catch_unwind(read)
            .unwrap_or_else(|_| Err(self.fail("the Parquet file is damaged".into())))
    }

    fn read_parquet<M>(
        &self,
        chunk: fn(Vec<u8>) -> M,
        messages: &mpsc::Sender<M>,
        progress: &Progress,
    ) -> Result<()> {
        let builder = ParquetRecordBatchReaderBuilder::try_new(self.open()?)
            .map_err(|e| self.fail(format!("not a Parquet file: {}", detail(&e))))?;
        let names: Vec<String> = builder
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let positions = self.positions(&names)?;
        let total_rows = builder.metadata().file_metadata().num_rows().max(1) as u64;
        let file_bytes = std::fs::metadata(self.path).map_or(0, |m| m.len());
        let mask = ProjectionMask::roots(builder.parquet_schema(), positions);
        let reader = builder
            .with_projection(mask)
            .with_batch_size(BATCH_ROWS)
            .build()
            .map_err(|e| self.fail(format!("cannot read the Parquet file: {}", detail(&e))))?;
        let mut rows = 0u64;
        for batch in reader {
            let batch =
                batch.map_err(|e| self.fail(format!("a row group is damaged: {}", detail(&e))))?;
            let batch = self.as_sent(batch)?;
            rows += batch.num_rows() as u64;
            let bytes = file_bytes.saturating_mul(rows) / total_rows;
            if !self.send(&batch, chunk, messages, progress, bytes)? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// `batch` with its text columns as text (a Parquet timestamp becomes RFC 3339 with its
    /// offset) and in the record's order.
    fn as_sent(&self, batch: RecordBatch) -> Result<RecordBatch> {
        let mut fields = Vec::new();
        let mut arrays = Vec::new();
        for c in self.columns {
            let array = batch
                .column_by_name(c.name)
                .ok_or_else(|| self.fail(format!("the file has no column `{}`", c.name)))?;
            let text = matches!(
                array.data_type(),
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
            );
            let array = if c.whole || text {
                Arc::clone(array)
            } else {
                cast(array, &DataType::Utf8)
                    .map_err(|_| self.fail(format!("column `{}` cannot be read as text", c.name)))?
            };
            fields.push(Field::new(c.name, array.data_type().clone(), true));
            arrays.push(array);
        }
        RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
            .map_err(|e| self.fail(e.to_string()))
    }

    /// Sends one batch as a message; false if the call has ended (refused, or cancelled).
    fn send<M>(
        &self,
        batch: &RecordBatch,
        chunk: fn(Vec<u8>) -> M,
        messages: &mpsc::Sender<M>,
        progress: &Progress,
        bytes: u64,
    ) -> Result<bool> {
        let ipc = ipc_of(batch)
            .map_err(|e| self.fail(format!("cannot encode a batch: {}", detail(&e))))?;
        advanced(progress, batch.num_rows(), bytes);
        Ok(messages.blocking_send(chunk(ipc)).is_ok())
    }
}

/// A reader's error as a message shows it: one line of at most 160 characters. The Parquet
/// reader quotes the file's names, and a damaged file may hold any bytes there.
fn detail(e: &impl std::fmt::Display) -> String {
    let mut shown = String::new();
    for (i, c) in e.to_string().chars().enumerate() {
        if i == 160 {
            shown.push('…');
            break;
        }
        if c.is_control() {
            shown.extend(c.escape_default());
        } else {
            shown.push(c);
        }
    }
    shown
}

/// One batch as an Arrow IPC stream: its schema, the batch, the end marker.
fn ipc_of(batch: &RecordBatch) -> std::result::Result<Vec<u8>, ArrowError> {
    let mut ipc = Vec::new();
    let mut writer = StreamWriter::try_new(&mut ipc, &batch.schema())?;
    writer.write(batch)?;
    writer.finish()?;
    drop(writer);
    Ok(ipc)
}

/// A reader that counts the bytes read through it, for the progress bar.
struct Counted<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

#[cfg(test)]
mod fuzz;
