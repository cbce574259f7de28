//! `cleanroom ingest` and `cleanroom upload-list`: a file's records streamed to the service under
//! one request id, sent again while the connection breaks (at most [`ATTEMPTS`] times), and a
//! plain answer on whether the write committed. A retry of a write that committed is recognised
//! by the service and answered with the original result; nothing is written twice.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Result, bail};
use cleanroom_client::Connection;
use cleanroom_proto::v1::{
    IngestHeader, IngestSummary, PartnerListHeader, UploadListHeader, UploadListResponse,
};

use crate::IngestKind;

/// Sends of one write, the first included.
pub const ATTEMPTS: u32 = 4;

/// The first pause between two sends (doubling after each).
const PAUSE: std::time::Duration = std::time::Duration::from_millis(500);

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

/// What a write command streams, and under which request id.
pub struct Write<'a> {
    /// The file.
    pub file: &'a Path,
    /// One invalid record fails the write.
    pub strict: bool,
    /// The request id given, or a new one.
    pub request_id: Option<String>,
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
        }
    }
}

/// Ingests a retailer export as the analyst.
pub async fn ingest(
    kind: IngestKind,
    write: Write<'_>,
    conn: &Connection,
    token: &str,
) -> Result<()> {
    let id = write.request_id();
    let header = write.ingest_header(&id);
    let summary = match kind {
        IngestKind::Members => {
            let records = cleanroom_client::read_members(write.file)?;
            send(&id, || {
                let (conn, header, records) = (conn.clone(), header.clone(), records.clone());
                async move {
                    let mut admin = conn.admin(token)?;
                    cleanroom_client::ingest_members(&mut admin, header, records).await
                }
            })
            .await?
        }
        IngestKind::Purchases => {
            let records = cleanroom_client::read_purchases(write.file)?;
            send(&id, || {
                let (conn, header, records) = (conn.clone(), header.clone(), records.clone());
                async move {
                    let mut admin = conn.admin(token)?;
                    cleanroom_client::ingest_purchases(&mut admin, header, records).await
                }
            })
            .await?
        }
        IngestKind::Consent => {
            let records = cleanroom_client::read_consent(write.file)?;
            send(&id, || {
                let (conn, header, records) = (conn.clone(), header.clone(), records.clone());
                async move {
                    let mut admin = conn.admin(token)?;
                    cleanroom_client::ingest_consent(&mut admin, header, records).await
                }
            })
            .await?
        }
    };
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

/// Uploads a customer list: the partner's own, or, with `on_behalf_of`, as the analyst.
pub async fn upload_list(
    write: Write<'_>,
    on_behalf_of: Option<&str>,
    conn: &Connection,
    token: &str,
) -> Result<()> {
    let id = write.request_id();
    let records = cleanroom_client::read_list(write.file)?;
    let strict = write.strict;
    let response = send(&id, || {
        let (conn, records, id) = (conn.clone(), records.clone(), id.clone());
        async move {
            match on_behalf_of {
                Some(partner) => {
                    let header = PartnerListHeader {
                        partner_id: partner.to_string(),
                        strict,
                        request_id: id,
                    };
                    let mut admin = conn.admin(token)?;
                    cleanroom_client::ingest_partner_list_as(&mut admin, header, records).await
                }
                None => {
                    let header = UploadListHeader {
                        strict,
                        request_id: id,
                    };
                    let mut partner = conn.partner(token)?;
                    cleanroom_client::upload_list_as(&mut partner, header, records).await
                }
            }
        }
    })
    .await?;
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
