//! Streaming a file's records to the service a chunk at a time: the file is read on a thread of
//! its own, [`crate::CHUNK_RECORDS`] records to a message, with a few messages waiting at most, so
//! a file of any length streams in bounded memory. A row that does not parse stops the stream
//! *and cancels the call*, so the service never takes a file's first part for the whole of it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use crate::{CHUNK_RECORDS, Error, Result};

/// Messages read ahead of the network, at most.
const MESSAGES_AHEAD: usize = 4;

/// A record type of one of the CSV files the tools read, with the row it is read from.
pub trait CsvRecord: Send + 'static {
    /// The row as the file has it.
    type Row: DeserializeOwned;
    /// The record the service takes.
    fn from_row(row: Self::Row) -> Self;
}

/// How far a stream has got: records and bytes of the file read so far (for a progress display).
#[derive(Debug, Default)]
pub struct Progress {
    records: AtomicU64,
    bytes: AtomicU64,
}

impl Progress {
    /// Records read so far.
    pub fn records(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    /// Bytes of the file read so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// Reads every row of a CSV file at once (small files: lists, tests).
pub fn read_all<T: CsvRecord>(path: &Path) -> Result<Vec<T>> {
    let fail = |message: String| Error::File {
        path: path.display().to_string(),
        message,
    };
    let mut reader = csv::Reader::from_path(path).map_err(|e| fail(e.to_string()))?;
    reader
        .deserialize::<T::Row>()
        .enumerate()
        .map(|(i, row)| {
            row.map(T::from_row)
                .map_err(|_| fail(format!("row {} does not match the expected columns", i + 1)))
        })
        .collect()
}

/// Sends `header`, then the file's records in chunks (`chunk` makes a message of each), as the
/// request stream of `call`. A row that does not parse cancels the call and is the error.
pub async fn send_file<T, M, R, F, Fut>(
    path: &Path,
    header: M,
    chunk: fn(Vec<T>) -> M,
    progress: Arc<Progress>,
    call: F,
) -> Result<R>
where
    T: CsvRecord,
    M: Send + 'static,
    F: FnOnce(ReceiverStream<M>) -> Fut,
    Fut: std::future::Future<Output = Result<R>>,
{
    let path: PathBuf = path.to_path_buf();
    let read = move |messages: &mpsc::Sender<M>, progress: &Progress| {
        read_chunks::<T, M>(&path, chunk, messages, progress)
    };
    send_read(header, progress, read, call).await
}

/// Sends `header`, then what `read` sends (on a thread of its own), as the request stream of
/// `call`. An error of `read` cancels the call and is the error: the stream is not ended, so the
/// service never takes what was read before it for the whole file.
pub(crate) async fn send_read<M, R, F, Fut>(
    header: M,
    progress: Arc<Progress>,
    read: impl FnOnce(&mpsc::Sender<M>, &Progress) -> Result<()> + Send + 'static,
    call: F,
) -> Result<R>
where
    M: Send + 'static,
    F: FnOnce(ReceiverStream<M>) -> Fut,
    Fut: std::future::Future<Output = Result<R>>,
{
    let (messages, stream) = mpsc::channel(MESSAGES_AHEAD);
    let (failed, failure) = oneshot::channel();
    std::thread::spawn(move || {
        if messages.blocking_send(header).is_err() {
            return;
        }
        if let Err(e) = read(&messages, &progress) {
            // The sender travels with the error: ending the stream now would commit the part
            // read so far, so it is dropped only after the call is cancelled.
            let _ = failed.send((e, messages));
        }
    });
    let mut held = None;
    let outcome = tokio::select! {
        answer = call(ReceiverStream::new(stream)) => answer,
        Ok((e, sender)) = failure => {
            held = Some(sender);
            Err(e)
        }
    };
    // The call, if unfinished, was dropped (cancelled) when the select ended; only now may the
    // stream end.
    drop(held);
    outcome
}

/// Counts `n` more records read, `bytes` of the file read so far.
pub(crate) fn advanced(progress: &Progress, n: usize, bytes: u64) {
    progress.records.fetch_add(n as u64, Ordering::Relaxed);
    progress.bytes.store(bytes, Ordering::Relaxed);
}

/// Reads the file's rows into chunks of records and sends them as messages.
fn read_chunks<T: CsvRecord, M>(
    path: &Path,
    chunk: fn(Vec<T>) -> M,
    messages: &mpsc::Sender<M>,
    progress: &Progress,
) -> Result<()> {
    let fail = |message: String| Error::File {
        path: path.display().to_string(),
        message,
    };
    let mut reader = match csv::Reader::from_path(path) {
        Ok(reader) => reader,
        Err(e) => return Err(fail(e.to_string())),
    };
    let mut rows = reader.deserialize::<T::Row>();
    let mut index = 0u64;
    loop {
        let mut records = Vec::with_capacity(CHUNK_RECORDS);
        for row in rows.by_ref().take(CHUNK_RECORDS) {
            index += 1;
            match row {
                Ok(row) => records.push(T::from_row(row)),
                Err(_) => {
                    return Err(fail(format!(
                        "row {index} does not match the expected columns"
                    )));
                }
            }
        }
        if records.is_empty() {
            return Ok(());
        }
        advanced(progress, records.len(), rows.reader().position().byte());
        if messages.blocking_send(chunk(records)).is_err() {
            // The call ended (refused, or cancelled): nothing more to send.
            return Ok(());
        }
    }
}

#[cfg(test)]
mod fuzz;
