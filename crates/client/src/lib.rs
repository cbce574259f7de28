//! The client side of the clean room: a bearer-token channel to the service, readers for the
//! retailer's export files and the partners' lists, and streaming uploads in chunks. The demo, the
//! tests and any Rust integration use it; other languages use the proto directly.

pub mod columns;
pub mod pki;
pub mod sample;
pub mod stream;

use std::path::Path;
use std::sync::Arc;

use cleanroom_proto::v1::admin_service_client::AdminServiceClient;
use cleanroom_proto::v1::legal_service_client::LegalServiceClient;
use cleanroom_proto::v1::partner_service_client::PartnerServiceClient;
use cleanroom_proto::v1::{
    ConsentChunk, ConsentRecord, CustomerRecord, IngestConsentRequest, IngestHeader,
    IngestMembersRequest, IngestPartnerListRequest, IngestPurchasesRequest, IngestSummary,
    ListChunk, MemberChunk, MemberRecord, PartnerListHeader, PurchaseChunk, PurchaseRecord,
    UploadListHeader, UploadListRequest, UploadListResponse, ingest_consent_request,
    ingest_members_request, ingest_partner_list_request, ingest_purchases_request,
    upload_list_request,
};
use serde::Deserialize;
pub use stream::{CsvRecord, Progress};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// Records per streamed message: small enough to stay far below the message size limit.
pub const CHUNK_RECORDS: usize = 2_000;

/// Errors of the client side.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The service could not be reached.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Address tried.
        addr: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// A bearer token with characters metadata cannot carry.
    #[error("the bearer token is not valid metadata")]
    Token,
    /// A file could not be read or parsed.
    #[error("{path}: {message}")]
    File {
        /// Which file.
        path: String,
        /// What went wrong (never the offending value).
        message: String,
    },
    /// The service refused a call.
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(#[from] Status),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> std::result::Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A partner client that authenticates every call.
pub type PartnerClient = PartnerServiceClient<InterceptedService<Channel, Bearer>>;
/// An admin client that authenticates every call.
pub type AdminClient = AdminServiceClient<InterceptedService<Channel, Bearer>>;
/// A legal reviewer's client that authenticates every call.
pub type LegalClient = LegalServiceClient<InterceptedService<Channel, Bearer>>;

/// An open channel to the service.
#[derive(Clone)]
pub struct Connection {
    channel: Channel,
}

/// How a client verifies the service over TLS, and optionally proves who it is.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// The CA certificate(s) the service's certificate must chain to (PEM).
    pub ca_pem: Vec<u8>,
    /// The client certificate and key (PEM), for mutual TLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the service's certificate must carry, if not the address's host.
    pub domain: Option<String>,
}

impl ClientTls {
    /// Reads the CA file and, when both are given, the client certificate and key files.
    pub fn from_files(ca: &Path, cert: Option<&Path>, key: Option<&Path>) -> Result<Self> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| Error::File {
                path: path.display().to_string(),
                message: e.to_string(),
            })
        };
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            (None, None) => None,
            _ => {
                return Err(Error::File {
                    path: cert
                        .or(key)
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    message: "a client certificate needs its key, and a key its certificate".into(),
                });
            }
        };
        Ok(Self {
            ca_pem: read(ca)?,
            identity,
            domain: None,
        })
    }
}

impl Connection {
    /// Connects to `http://host:port` (plain text: loopback only on the service's side).
    pub async fn open(addr: &str) -> Result<Self> {
        Self::connect(addr, None).await
    }

    /// Connects to `https://host:port`, verifying the service with `tls`.
    pub async fn open_tls(addr: &str, tls: &ClientTls) -> Result<Self> {
        Self::connect(addr, Some(tls)).await
    }

    async fn connect(addr: &str, tls: Option<&ClientTls>) -> Result<Self> {
        let invalid = |message: &str| Error::File {
            path: addr.into(),
            message: message.into(),
        };
        let mut endpoint =
            Channel::from_shared(addr.to_string()).map_err(|_| invalid("not a valid URI"))?;
        if let Some(tls) = tls {
            let mut config = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.identity {
                config = config.identity(tonic::transport::Identity::from_pem(cert, key));
            }
            if let Some(domain) = &tls.domain {
                config = config.domain_name(domain.clone());
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|_| invalid("TLS settings not usable"))?;
        }
        let channel = endpoint.connect().await.map_err(|source| Error::Connect {
            addr: addr.into(),
            source,
        })?;
        Ok(Self { channel })
    }

    fn bearer(token: &str) -> Result<Bearer> {
        format!("Bearer {token}")
            .parse()
            .map(Bearer)
            .map_err(|_| Error::Token)
    }

    /// The partner API, as the holder of `token`.
    pub fn partner(&self, token: &str) -> Result<PartnerClient> {
        Ok(
            PartnerServiceClient::with_interceptor(self.channel.clone(), Self::bearer(token)?)
                .max_decoding_message_size(64 * 1024 * 1024),
        )
    }

    /// The admin API, as the holder of `token`.
    pub fn admin(&self, token: &str) -> Result<AdminClient> {
        Ok(AdminServiceClient::with_interceptor(
            self.channel.clone(),
            Self::bearer(token)?,
        ))
    }

    /// The legal review API, as the holder of `token`.
    pub fn legal(&self, token: &str) -> Result<LegalClient> {
        Ok(LegalServiceClient::with_interceptor(
            self.channel.clone(),
            Self::bearer(token)?,
        ))
    }
}

/// A row of the retailer's member export. Names, addresses and postal codes are read past and
/// never leave this function.
#[derive(Deserialize)]
pub struct MemberRow {
    member_id: String,
    email: String,
    phone: String,
    prefecture: String,
    birth_date: String,
    gender: String,
}

impl CsvRecord for MemberRecord {
    type Row = MemberRow;
    fn from_row(r: MemberRow) -> Self {
        MemberRecord {
            member_id: r.member_id,
            email: r.email,
            phone: r.phone,
            prefecture: r.prefecture,
            birth_date: r.birth_date,
            gender: r.gender,
        }
    }
}

/// Reads the retailer's member export (`members.csv`).
pub fn read_members(path: &Path) -> Result<Vec<MemberRecord>> {
    stream::read_all(path)
}

/// A row of the retailer's purchase export.
#[derive(Deserialize)]
pub struct PurchaseRow {
    member_id: String,
    purchased_at: String,
    sku: String,
    brand: String,
    manufacturer: String,
    category: String,
    quantity: i64,
    amount: i64,
}

impl CsvRecord for PurchaseRecord {
    type Row = PurchaseRow;
    fn from_row(r: PurchaseRow) -> Self {
        PurchaseRecord {
            member_id: r.member_id,
            purchased_at: r.purchased_at,
            sku: r.sku,
            brand: r.brand,
            manufacturer: r.manufacturer,
            category: r.category,
            quantity: r.quantity,
            amount: r.amount,
        }
    }
}

/// Reads the retailer's purchase export (`purchases.csv`).
pub fn read_purchases(path: &Path) -> Result<Vec<PurchaseRecord>> {
    stream::read_all(path)
}

/// A row of the retailer's consent log export.
#[derive(Deserialize)]
pub struct ConsentRow {
    member_id: String,
    purpose: String,
    notice_version: u32,
    action: String,
    at: String,
    source: String,
    expires_at: String,
}

impl CsvRecord for ConsentRecord {
    type Row = ConsentRow;
    fn from_row(r: ConsentRow) -> Self {
        ConsentRecord {
            member_id: r.member_id,
            purpose: r.purpose,
            notice_version: r.notice_version,
            action: r.action,
            at: r.at,
            source: r.source,
            expires_at: r.expires_at,
        }
    }
}

/// Reads the retailer's consent log export (`consent_events.csv`).
pub fn read_consent(path: &Path) -> Result<Vec<ConsentRecord>> {
    stream::read_all(path)
}

/// A row of a partner's customer list: raw identifiers or tokens, and the attribute.
#[derive(Deserialize)]
pub struct ListRow {
    #[serde(default)]
    email: String,
    #[serde(default)]
    phone: String,
    #[serde(default)]
    email_token: String,
    #[serde(default)]
    phone_token: String,
    #[serde(default)]
    attribute: String,
}

impl CsvRecord for CustomerRecord {
    type Row = ListRow;
    fn from_row(r: ListRow) -> Self {
        CustomerRecord {
            email: r.email,
            phone: r.phone,
            email_token: r.email_token,
            phone_token: r.phone_token,
            attribute: r.attribute,
        }
    }
}

/// Reads a partner's customer list: `email,phone,attribute` (raw) or
/// `email_token,phone_token,attribute` (from `cleanroom prep`).
pub fn read_list(path: &Path) -> Result<Vec<CustomerRecord>> {
    stream::read_all(path)
}

/// Streams a member export: a header, then chunks.
pub async fn ingest_members(
    client: &mut AdminClient,
    header: IngestHeader,
    records: Vec<MemberRecord>,
) -> Result<IngestSummary> {
    let mut messages = vec![IngestMembersRequest {
        kind: Some(ingest_members_request::Kind::Header(header)),
    }];
    messages.extend(chunks(records).map(|records| IngestMembersRequest {
        kind: Some(ingest_members_request::Kind::Chunk(MemberChunk { records })),
    }));
    Ok(client
        .ingest_members(tokio_stream::iter(messages))
        .await?
        .into_inner())
}

/// Streams purchases: a header, then chunks.
pub async fn ingest_purchases(
    client: &mut AdminClient,
    header: IngestHeader,
    records: Vec<PurchaseRecord>,
) -> Result<IngestSummary> {
    let mut messages = vec![IngestPurchasesRequest {
        kind: Some(ingest_purchases_request::Kind::Header(header)),
    }];
    messages.extend(chunks(records).map(|records| IngestPurchasesRequest {
        kind: Some(ingest_purchases_request::Kind::Chunk(PurchaseChunk {
            records,
            arrow_ipc: Vec::new(),
        })),
    }));
    Ok(client
        .ingest_purchases(tokio_stream::iter(messages))
        .await?
        .into_inner())
}

/// Streams consent events: a header, then chunks.
pub async fn ingest_consent(
    client: &mut AdminClient,
    header: IngestHeader,
    records: Vec<ConsentRecord>,
) -> Result<IngestSummary> {
    let mut messages = vec![IngestConsentRequest {
        kind: Some(ingest_consent_request::Kind::Header(header)),
    }];
    messages.extend(chunks(records).map(|records| IngestConsentRequest {
        kind: Some(ingest_consent_request::Kind::Chunk(ConsentChunk {
            records,
        })),
    }));
    Ok(client
        .ingest_consent(tokio_stream::iter(messages))
        .await?
        .into_inner())
}

/// Streams a partner's customer list as the analyst, on the partner's behalf, under a request id
/// of its own.
pub async fn ingest_partner_list(
    client: &mut AdminClient,
    partner_id: &str,
    strict: bool,
    records: Vec<CustomerRecord>,
) -> Result<UploadListResponse> {
    let header = PartnerListHeader {
        partner_id: partner_id.into(),
        strict,
        request_id: new_request_id(),
    };
    ingest_partner_list_as(client, header, records).await
}

/// Streams a partner's customer list as the analyst under `header` (whose request id a retry
/// sends again).
pub async fn ingest_partner_list_as(
    client: &mut AdminClient,
    header: PartnerListHeader,
    records: Vec<CustomerRecord>,
) -> Result<UploadListResponse> {
    let mut messages = vec![IngestPartnerListRequest {
        kind: Some(ingest_partner_list_request::Kind::Header(header)),
    }];
    messages.extend(chunks(records).map(|records| IngestPartnerListRequest {
        kind: Some(ingest_partner_list_request::Kind::Chunk(ListChunk {
            records,
        })),
    }));
    Ok(client
        .ingest_partner_list(tokio_stream::iter(messages))
        .await?
        .into_inner())
}

/// Streams a customer list, under a request id of its own.
pub async fn upload_list(
    client: &mut PartnerClient,
    strict: bool,
    records: Vec<CustomerRecord>,
) -> Result<UploadListResponse> {
    let header = UploadListHeader {
        strict,
        request_id: new_request_id(),
    };
    upload_list_as(client, header, records).await
}

/// Streams a customer list under `header` (whose request id a retry sends again).
pub async fn upload_list_as(
    client: &mut PartnerClient,
    header: UploadListHeader,
    records: Vec<CustomerRecord>,
) -> Result<UploadListResponse> {
    let mut messages = vec![UploadListRequest {
        kind: Some(upload_list_request::Kind::Header(header)),
    }];
    messages.extend(chunks(records).map(|records| UploadListRequest {
        kind: Some(upload_list_request::Kind::Chunk(ListChunk { records })),
    }));
    Ok(client
        .upload_list(tokio_stream::iter(messages))
        .await?
        .into_inner())
}

/// Streams a member export file, read a chunk at a time (see [`stream::send_file`]).
pub async fn ingest_members_file(
    client: &mut AdminClient,
    header: IngestHeader,
    path: &Path,
    progress: Arc<Progress>,
) -> Result<IngestSummary> {
    let header = IngestMembersRequest {
        kind: Some(ingest_members_request::Kind::Header(header)),
    };
    let chunk = |records| IngestMembersRequest {
        kind: Some(ingest_members_request::Kind::Chunk(MemberChunk { records })),
    };
    stream::send_file(path, header, chunk, progress, |messages| async move {
        Ok(client.ingest_members(messages).await?.into_inner())
    })
    .await
}

/// Streams a purchase export file (CSV, or Parquet if its name ends in `.parquet`) as Arrow
/// record batches, a batch at a time.
pub async fn ingest_purchases_file(
    client: &mut AdminClient,
    header: IngestHeader,
    path: &Path,
    progress: Arc<Progress>,
) -> Result<IngestSummary> {
    let header = IngestPurchasesRequest {
        kind: Some(ingest_purchases_request::Kind::Header(header)),
    };
    let chunk = |arrow_ipc| IngestPurchasesRequest {
        kind: Some(ingest_purchases_request::Kind::Chunk(PurchaseChunk {
            records: Vec::new(),
            arrow_ipc,
        })),
    };
    let columns = &columns::PURCHASE_COLUMNS;
    columns::send_columns(
        path,
        header,
        columns,
        chunk,
        progress,
        |messages| async move { Ok(client.ingest_purchases(messages).await?.into_inner()) },
    )
    .await
}

/// Streams a consent log export file, read a chunk at a time.
pub async fn ingest_consent_file(
    client: &mut AdminClient,
    header: IngestHeader,
    path: &Path,
    progress: Arc<Progress>,
) -> Result<IngestSummary> {
    let header = IngestConsentRequest {
        kind: Some(ingest_consent_request::Kind::Header(header)),
    };
    let chunk = |records| IngestConsentRequest {
        kind: Some(ingest_consent_request::Kind::Chunk(ConsentChunk {
            records,
        })),
    };
    stream::send_file(path, header, chunk, progress, |messages| async move {
        Ok(client.ingest_consent(messages).await?.into_inner())
    })
    .await
}

/// Streams a customer list file as the partner, read a chunk at a time.
pub async fn upload_list_file(
    client: &mut PartnerClient,
    header: UploadListHeader,
    path: &Path,
    progress: Arc<Progress>,
) -> Result<UploadListResponse> {
    let header = UploadListRequest {
        kind: Some(upload_list_request::Kind::Header(header)),
    };
    let chunk = |records| UploadListRequest {
        kind: Some(upload_list_request::Kind::Chunk(ListChunk { records })),
    };
    stream::send_file(path, header, chunk, progress, |messages| async move {
        Ok(client.upload_list(messages).await?.into_inner())
    })
    .await
}

/// Streams a customer list file as the analyst on a partner's behalf, read a chunk at a time.
pub async fn ingest_partner_list_file(
    client: &mut AdminClient,
    header: PartnerListHeader,
    path: &Path,
    progress: Arc<Progress>,
) -> Result<UploadListResponse> {
    let header = IngestPartnerListRequest {
        kind: Some(ingest_partner_list_request::Kind::Header(header)),
    };
    let chunk = |records| IngestPartnerListRequest {
        kind: Some(ingest_partner_list_request::Kind::Chunk(ListChunk {
            records,
        })),
    };
    stream::send_file(path, header, chunk, progress, |messages| async move {
        Ok(client.ingest_partner_list(messages).await?.into_inner())
    })
    .await
}

/// A new request id: 128 random bits in hex. Make one per file and send it again on every retry
/// of that file's write, so that the service recognises a retry of a write that committed.
pub fn new_request_id() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Whether a failed call may be sent again as it is: the connection broke or the service was
/// unavailable (or busy with the same write), so the call may or may not have been carried out.
/// Only for writes that carry a request id, which makes a second run harmless.
pub fn worth_retrying(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

/// A write sent up to `attempts` times with one request id, `pause` apart (doubling), for as long
/// as its connection breaks. Returns its answer and the attempts it took, or the last error
/// with the attempts made.
pub async fn retrying<T, F, Fut>(
    attempts: u32,
    pause: std::time::Duration,
    mut attempt: F,
) -> std::result::Result<(T, u32), (Error, u32)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut wait = pause;
    let mut made = 0;
    loop {
        made += 1;
        match attempt().await {
            Ok(answer) => return Ok((answer, made)),
            Err(Error::Status(status)) if worth_retrying(&status) && made < attempts => {
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            Err(e) => return Err((e, made)),
        }
    }
}

fn chunks<T>(records: Vec<T>) -> impl Iterator<Item = Vec<T>> {
    let mut records = records.into_iter().peekable();
    std::iter::from_fn(move || {
        records.peek()?;
        Some(records.by_ref().take(CHUNK_RECORDS).collect())
    })
}

/// The most member ids one erasure call takes (`AdminService.EraseMembers`; the service refuses
/// more the same way).
pub const MAX_ERASE_MEMBERS: usize = 10_000;

/// Reads a file of member ids to erase: UTF-8 text, one member id per line (no header; spaces
/// around an id are ignored; a final newline is fine). Refused, naming the line but never an id:
/// an empty file, a blank line, an id over 256 characters, or more than [`MAX_ERASE_MEMBERS`].
pub fn read_member_ids(path: &Path) -> Result<Vec<String>> {
    let fail = |message: String| Error::File {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let lines: Vec<&str> = text
        .strip_suffix('\n')
        .unwrap_or(&text)
        .split('\n')
        .collect();
    if text.trim().is_empty() {
        return Err(fail("no member id: the file is empty".into()));
    }
    if lines.len() > MAX_ERASE_MEMBERS {
        return Err(fail(format!(
            "{} member ids: at most {MAX_ERASE_MEMBERS} a call; split the file",
            lines.len()
        )));
    }
    let mut ids = Vec::with_capacity(lines.len());
    for (at, line) in lines.iter().enumerate() {
        let id = line.trim();
        if id.is_empty() {
            return Err(fail(format!("line {}: blank member id", at + 1)));
        }
        if id.chars().count() > 256 {
            return Err(fail(format!("line {}: longer than 256 characters", at + 1)));
        }
        ids.push(id.to_string());
    }
    Ok(ids)
}
