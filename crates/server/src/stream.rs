//! Reading a client stream of "one header, then chunks of records", the shape of every upload and
//! ingest, as it arrives. The header is read first and the caller's checks (permission, contract,
//! allowance) run on it before any record is read. Each chunk then goes, as soon as it is read,
//! to a blocking thread that checks, hashes and stages it, with at most [`CHUNKS_IN_FLIGHT`]
//! chunks waiting: an upload's memory is bounded by its chunk size, never by its length. The
//! stream is bounded in records, bytes and silence; a stream that breaks or exceeds a bound
//! leaves nothing behind (its staged files are removed).

use std::time::Duration;

use cleanroom_core::rules::Rules;
use cleanroom_engine::ingest::{Ingest, IngestReport};
use cleanroom_engine::store::Staging;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::{Error, Result};

/// Chunks read from the network but not yet staged, at most.
const CHUNKS_IN_FLIGHT: usize = 2;

/// One message of an upload stream, whatever its proto type.
pub(crate) enum Part<H, R> {
    Header(H),
    Chunk(Vec<R>),
    /// A chunk of rows as an Arrow IPC stream, decoded and checked by the ingest.
    Arrow(Vec<u8>),
    /// A message no stream may carry, and why.
    Invalid(&'static str),
    Empty,
}

/// The bounds on one stream.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamLimits {
    /// Records, over all chunks.
    pub records: u64,
    /// Encoded bytes, over all messages.
    pub bytes: u64,
    /// The longest wait for the next message.
    pub idle: Duration,
}

impl StreamLimits {
    /// The bounds the rules set on a partner's list upload: records and bytes.
    pub fn of(rules: &Rules) -> Self {
        Self {
            records: rules.privacy.max_upload_records,
            bytes: rules.limits.max_stream_bytes,
            idle: Duration::from_secs(u64::from(rules.limits.stream_idle_seconds)),
        }
    }

    /// The bounds on an analyst's ingest of the retailer's exports: bytes only, so an export of
    /// any number of records goes in whole.
    pub fn for_ingest(rules: &Rules) -> Self {
        Self {
            records: u64::MAX,
            bytes: rules.limits.max_ingest_bytes,
            ..Self::of(rules)
        }
    }
}

/// An ingest fed from a stream: converts each chunk's records and stages the rows.
pub(crate) struct Feed<I: Ingest, R> {
    ingest: I,
    staging: Staging,
    convert: fn(R) -> I::Input,
}

impl<I: Ingest, R> Feed<I, R> {
    /// Feeds `ingest`, staging its rows in `staging` (a collaboration's tables sealed with the
    /// keys the ingest names), each record converted with `convert`.
    pub fn new(ingest: I, mut staging: Staging, convert: fn(R) -> I::Input) -> Result<Self> {
        for (table, key) in ingest.seals() {
            staging.seal(table, key)?;
        }
        Ok(Self {
            ingest,
            staging,
            convert,
        })
    }

    /// Ingests chunks until the end of the stream is signalled, then finishes and closes the
    /// staged files (synced, ready to commit). A channel closed without the end means the stream
    /// failed: the staged files are dropped, and with them removed.
    fn run(mut self, chunks: &mut mpsc::Receiver<Message<R>>) -> Result<Fed> {
        loop {
            match chunks.blocking_recv() {
                Some(Message::Chunk(records)) => {
                    let inputs = records.into_iter().map(self.convert).collect();
                    self.ingest.push(inputs, &mut self.staging)?;
                }
                Some(Message::Arrow(ipc)) => self.ingest.push_arrow(&ipc, &mut self.staging)?,
                Some(Message::End) => break,
                None => return Err(Error::Internal("the stream ended early".into())),
            }
        }
        let report = self.ingest.finish(&mut self.staging)?;
        self.staging.close()?;
        Ok(Fed {
            staging: self.staging,
            report,
        })
    }
}

/// What a stream became: its tables, staged and synced but not committed, and what happened to
/// its records.
pub(crate) struct Fed {
    pub staging: Staging,
    pub report: IngestReport,
}

enum Message<R> {
    Chunk(Vec<R>),
    Arrow(Vec<u8>),
    End,
}

/// Reads a whole stream: exactly one header first, on which `start` decides and builds the
/// feed, then chunks, fed as they arrive, within `limits`, each message's bytes counted on
/// `bytes` as it arrives. If `start` builds no feed (a retry of a write already committed),
/// nothing more is read and no feed is returned.
pub(crate) async fn feed<M, H, R, I>(
    mut stream: Streaming<M>,
    split: fn(M) -> Part<H, R>,
    limits: StreamLimits,
    bytes: Counter,
    start: impl FnOnce(&H) -> Result<Option<Feed<I, R>>>,
) -> Result<(H, Option<Fed>)>
where
    M: prost::Message + Default + Send + 'static,
    R: Send + 'static,
    I: Ingest + 'static,
{
    let input = |msg: &str| Error::from(cleanroom_core::Error::Input(msg.to_string()));
    let mut received = Received::new(limits, bytes);
    let header = match received.next(&mut stream).await?.map(split) {
        Some(Part::Header(header)) => header,
        Some(Part::Empty) => return Err(input("empty stream message")),
        Some(Part::Invalid(why)) => return Err(input(why)),
        _ => return Err(input("the stream must start with a header")),
    };
    let Some(feed) = start(&header)? else {
        return Ok((header, None));
    };
    let (chunks, mut waiting) = mpsc::channel(CHUNKS_IN_FLIGHT);
    let worker = tokio::task::spawn_blocking(move || feed.run(&mut waiting));
    let read = async {
        while let Some(message) = received.next(&mut stream).await? {
            let chunk = match split(message) {
                Part::Chunk(records) => {
                    received.count(records.len())?;
                    Message::Chunk(records)
                }
                // Only ingests, which have no record limit, take Arrow: its rows are counted
                // as the ingest decodes them.
                Part::Arrow(ipc) => Message::Arrow(ipc),
                Part::Header(_) => return Err(input("the stream has a second header")),
                Part::Invalid(why) => return Err(input(why)),
                Part::Empty => return Err(input("empty stream message")),
            };
            if chunks.send(chunk).await.is_err() {
                // The worker stopped on a record (strict mode): its error is the answer.
                return Ok(());
            }
        }
        let _ = chunks.send(Message::End).await;
        Ok(())
    }
    .await;
    drop(chunks);
    let fed = worker
        .await
        .map_err(|e| Error::Internal(format!("ingest worker: {e}")))?;
    read?;
    Ok((header, Some(fed?)))
}

/// What a stream has sent so far, against its limits.
struct Received {
    limits: StreamLimits,
    records: u64,
    bytes: u64,
    /// The service's count of stream bytes (the metrics), over all streams of the method.
    counted: Counter,
}

impl Received {
    fn new(limits: StreamLimits, counted: Counter) -> Self {
        Self {
            limits,
            records: 0,
            bytes: 0,
            counted,
        }
    }

    /// The next message, if the stream sends one in time and within the byte limit.
    async fn next<M: prost::Message + Default>(
        &mut self,
        stream: &mut Streaming<M>,
    ) -> Result<Option<M>> {
        let idle = self.limits.idle;
        let message = tokio::time::timeout(idle, stream.message())
            .await
            .map_err(|_| {
                Error::Stalled(format!(
                    "the stream sent nothing for {} s; nothing was stored",
                    idle.as_secs()
                ))
            })?
            .map_err(|s| broken(&s))?;
        if let Some(message) = &message {
            let length = message.encoded_len() as u64;
            self.counted.inc_by(length);
            self.bytes += length;
            if self.bytes > self.limits.bytes {
                return Err(cleanroom_core::Error::Limit(format!(
                    "this stream may carry at most {} bytes; nothing was stored",
                    self.limits.bytes
                ))
                .into());
            }
        }
        Ok(message)
    }

    /// Counts a chunk's records against the record limit.
    fn count(&mut self, records: usize) -> Result<()> {
        self.records += records as u64;
        if self.records > self.limits.records {
            return Err(cleanroom_core::Error::Limit(format!(
                "an upload may hold at most {} records",
                self.limits.records
            ))
            .into());
        }
        Ok(())
    }
}

/// A stream that broke mid-way (a client error, a message over the size limit) fails the upload.
fn broken(status: &Status) -> Error {
    match status.code() {
        tonic::Code::ResourceExhausted | tonic::Code::OutOfRange => cleanroom_core::Error::Limit(
            "a message exceeds the size limit; send smaller chunks".into(),
        )
        .into(),
        _ => cleanroom_core::Error::Input("the upload stream broke off; nothing was stored".into())
            .into(),
    }
}
