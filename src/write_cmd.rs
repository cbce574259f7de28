//! `cleanroom ingest` and `cleanroom upload-list`: a file's records streamed to the service a chunk
//! at a time (any length, in bounded memory, with its progress shown) under one request id, sent
//! again while the connection breaks (at most [`ATTEMPTS`] times), and a plain answer on whether
//! the write committed. A retry of a write that committed is recognised
//! by the service and answered with the original result; nothing is written twice.

use std::collections::BTreeMap;
use std::path::Path;

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Result, bail};
use cleanroom_client::{Connection, Progress};
use cleanroom_proto::v1::{
    EraseMembersRequest, ErasureSummary, IngestHeader, IngestSummary, PartnerListHeader,
    UploadListHeader, UploadListResponse,
};
use indicatif::{ProgressBar, ProgressStyle};

use crate::IngestKind;

/// Sends of one write, the first included.
pub const ATTEMPTS: u32 = 4;

/// The first pause between two sends (doubling after each).
const PAUSE: std::time::Duration = std::time::Duration::from_millis(500);

/// How often progress is written as a line when standard error is not a terminal.
const LINE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// An answer that says whether it replays an earlier commit.
trait Committed {
    fn already_committed(&self) -> bool;
}

impl Committed for IngestSummary {
    fn already_committed(&self) -> bool {
        self.already_committed
    }
}

impl Committed for UploadListResponse {
    fn already_committed(&self) -> bool {
        self.already_committed
    }
}

impl Committed for ErasureSummary {
    fn already_committed(&self) -> bool {
        self.already_committed
    }
}

/// Erases members as the analyst under a request id (`request_id`, or a new one), sent again
/// while its connection breaks: a retry of an erasure that committed answers its counts.
pub async fn erase(
    member_ids: Vec<String>,
    request_id: Option<String>,
    conn: &Connection,
    token: &str,
) -> Result<ErasureSummary> {
    let id = request_id.unwrap_or_else(cleanroom_client::new_request_id);
    send(&id, || {
        let conn = conn.clone();
        let request = EraseMembersRequest {
            member_ids: member_ids.clone(),
            request_id: id.clone(),
        };
        async move {
            let answer = conn.admin(token)?.erase_members(request).await?;
            Ok(answer.into_inner())
        }
    })
    .await
}

/// What a write command streams, and under which request id.
pub struct Write<'a> {
    /// The file.
    pub file: &'a Path,
    /// One invalid record fails the write.
    pub strict: bool,
    /// The request id given, or a new one.
    pub request_id: Option<String>,
    /// A members ingest computes only the missing collaborations' tokens.
    pub tokens_only: bool,
}

impl Write<'_> {
    fn request_id(&self) -> String {
        self.request_id
            .clone()
            .unwrap_or_else(cleanroom_client::new_request_id)
    }

    fn ingest_header(&self, request_id: &str) -> IngestHeader {
        IngestHeader {
            source: self
                .file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            strict: self.strict,
            request_id: request_id.to_string(),
            tokens_only: self.tokens_only,
        }
    }
}

/// Ingests a retailer export as the analyst, streamed from the file a chunk at a time.
pub async fn ingest(
    kind: IngestKind,
    write: Write<'_>,
    conn: &Connection,
    token: &str,
) -> Result<()> {
    let id = write.request_id();
    let header = write.ingest_header(&id);
    let shown = Shown::start(write.file)?;
    let summary = send(&id, || {
        let (conn, header, path, progress) = (
            conn.clone(),
            header.clone(),
            write.file.to_path_buf(),
            shown.restart(),
        );
        async move {
            let mut admin = conn.admin(token)?;
            match kind {
                IngestKind::Members => {
                    cleanroom_client::ingest_members_file(&mut admin, header, &path, progress).await
                }
                IngestKind::Purchases => {
                    cleanroom_client::ingest_purchases_file(&mut admin, header, &path, progress)
                        .await
                }
                IngestKind::Consent => {
                    cleanroom_client::ingest_consent_file(&mut admin, header, &path, progress).await
                }
            }
        }
    })
    .await;
    shown.finish();
    let summary = summary?;
    println!(
        "{} received, {} accepted, audit {}{}",
        summary.records_received,
        summary.records_accepted,
        summary.audit_id,
        if summary.consent_snapshot_id.is_empty() {
            String::new()
        } else {
            format!(", consent snapshot {}", summary.consent_snapshot_id)
        }
    );
    print_skipped(&summary.rejected_by_reason);
    Ok(())
}

/// Uploads a customer list (the partner's own, or, with `on_behalf_of`, as the analyst),
/// streamed from the file a chunk at a time.
pub async fn upload_list(
    write: Write<'_>,
    on_behalf_of: Option<&str>,
    conn: &Connection,
    token: &str,
) -> Result<()> {
    let id = write.request_id();
    let strict = write.strict;
    let shown = Shown::start(write.file)?;
    let response = send(&id, || {
        let (conn, id, path, progress) = (
            conn.clone(),
            id.clone(),
            write.file.to_path_buf(),
            shown.restart(),
        );
        async move {
            match on_behalf_of {
                Some(partner) => {
                    let header = PartnerListHeader {
                        partner_id: partner.to_string(),
                        strict,
                        request_id: id,
                    };
                    let mut admin = conn.admin(token)?;
                    cleanroom_client::ingest_partner_list_file(&mut admin, header, &path, progress)
                        .await
                }
                None => {
                    let header = UploadListHeader {
                        strict,
                        request_id: id,
                    };
                    let mut partner = conn.partner(token)?;
                    cleanroom_client::upload_list_file(&mut partner, header, &path, progress).await
                }
            }
        }
    })
    .await;
    shown.finish();
    let response = response?;
    println!(
        "list v{}: {} received, {} accepted, audit {}",
        response.list_version,
        response.records_received,
        response.records_accepted,
        response.audit_id
    );
    print_skipped(&response.rejected_by_reason);
    Ok(())
}

/// The progress of a write, shown while it streams: a bar (records, bytes, rate, time left) on a
/// terminal, a plain line every few seconds otherwise. Each attempt starts a fresh count.
struct Shown {
    current: Arc<Mutex<Arc<Progress>>>,
    done: Arc<AtomicBool>,
    painter: Option<std::thread::JoinHandle<()>>,
}

impl Shown {
    fn start(file: &Path) -> Result<Self> {
        let total = std::fs::metadata(file)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?
            .len();
        let current = Arc::new(Mutex::new(Arc::new(Progress::default())));
        let done = Arc::new(AtomicBool::new(false));
        let painter = {
            let (current, done) = (Arc::clone(&current), Arc::clone(&done));
            std::thread::spawn(move || paint_until(total, &current, &done))
        };
        Ok(Self {
            current,
            done,
            painter: Some(painter),
        })
    }

    /// A fresh count for the next attempt, which the display follows from now on.
    fn restart(&self) -> Arc<Progress> {
        let fresh = Arc::new(Progress::default());
        *self.current.lock().expect("progress lock") = Arc::clone(&fresh);
        fresh
    }

    fn finish(mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(painter) = self.painter.take() {
            let _ = painter.join();
        }
    }
}

/// Shows the progress of `current` of a file of `total` bytes until `done`.
fn paint_until(total: u64, current: &Mutex<Arc<Progress>>, done: &AtomicBool) {
    let bar = std::io::stderr().is_terminal().then(|| {
        let style = ProgressStyle::with_template(
            "{bar:30} {bytes}/{total_bytes} {msg} ({binary_bytes_per_sec}, {eta} left)",
        )
        .expect("a valid template");
        ProgressBar::new(total).with_style(style)
    });
    let started = Instant::now();
    let mut said = Instant::now();
    while !done.load(Ordering::Relaxed) {
        let progress = current.lock().expect("progress lock").clone();
        let (records, bytes) = (progress.records(), progress.bytes());
        let rate = records as f64 / started.elapsed().as_secs_f64().max(0.001);
        match &bar {
            Some(bar) => {
                bar.set_position(bytes);
                bar.set_message(format!("{records} records, {rate:.0}/s"));
            }
            None if said.elapsed() >= LINE_EVERY => {
                eprintln!(
                    "{records} records sent, {} of {} MB, {rate:.0} records/s",
                    bytes / 1_000_000,
                    total / 1_000_000
                );
                said = Instant::now();
            }
            None => {}
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}

/// Sends a write until it is answered or its connection broke [`ATTEMPTS`] times, and says in
/// plain words whether it committed.
async fn send<T, F, Fut>(request_id: &str, attempt: F) -> Result<T>
where
    T: Committed,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = cleanroom_client::Result<T>>,
{
    match cleanroom_client::retrying(ATTEMPTS, PAUSE, attempt).await {
        Ok((answer, attempts)) => {
            if answer.already_committed() {
                println!(
                    "committed by an earlier attempt of this write (request id {request_id}); \
                     nothing new was stored, and the figures are that write's"
                );
            } else if attempts > 1 {
                println!(
                    "committed on attempt {attempts} (request id {request_id}); the earlier \
                     attempts' connections broke before they committed"
                );
            } else {
                println!("committed (request id {request_id})");
            }
            Ok(answer)
        }
        Err((cleanroom_client::Error::Status(status), attempts)) if unknown_outcome(&status) => {
            bail!(
                "{:?}: {} (after {attempts} attempts). Whether the write committed is not known. \
                 Run the same command with --request-id {request_id}: if it committed, the \
                 service says so and stores nothing new; if not, it is written then",
                status.code(),
                status.message()
            )
        }
        Err((e, _)) => bail!("{e}. The write was refused: nothing was stored"),
    }
}

/// Errors after which the write may or may not have committed: the connection broke, the
/// service was unavailable, or it failed after it might have committed.
fn unknown_outcome(status: &tonic::Status) -> bool {
    cleanroom_client::worth_retrying(status)
        || matches!(
            status.code(),
            tonic::Code::Internal | tonic::Code::DeadlineExceeded
        )
}

/// Prints what an upload or ingest skipped, by reason (reasons never contain the values).
fn print_skipped(rejected: &BTreeMap<String, u64>) {
    for (reason, count) in rejected {
        println!("  skipped ({reason}): {count}");
    }
}
