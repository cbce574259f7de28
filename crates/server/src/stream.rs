//! Reading a client stream of "one header, then chunks of records", the shape of every upload and
//! ingest. Nothing is stored while reading: the caller stores only a complete, accepted stream.

use tonic::{Status, Streaming};

use crate::{Error, Result};

/// One message of an upload stream, whatever its proto type.
pub(crate) enum Part<H, R> {
    Header(H),
    Chunk(Vec<R>),
    Empty,
}

/// Reads a whole stream: exactly one header first, then chunks, within the record limit.
pub(crate) async fn collect<M, H, R>(
    mut stream: Streaming<M>,
    split: impl Fn(M) -> Part<H, R>,
    limit: u64,
) -> Result<(H, Vec<R>)> {
    let input = |msg: &str| cleanroom_core::Error::Input(msg.to_string());
    let mut header = None;
    let mut records = Vec::new();
    while let Some(message) = stream.message().await.map_err(|s| broken(&s))? {
        match (split(message), &header) {
            (Part::Header(h), None) => header = Some(h),
            (Part::Header(_), Some(_)) => {
                return Err(input("the stream has a second header").into());
            }
            (Part::Chunk(_), None) => {
                return Err(input("the stream must start with a header").into());
            }
            (Part::Chunk(chunk), Some(_)) => {
                if records.len() as u64 + chunk.len() as u64 > limit {
                    return Err(cleanroom_core::Error::Limit(format!(
                        "an upload may hold at most {limit} records"
                    ))
                    .into());
                }
                records.extend(chunk);
            }
            (Part::Empty, _) => return Err(input("empty stream message").into()),
        }
    }
    let header = header.ok_or_else(|| input("the stream must start with a header"))?;
    Ok((header, records))
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
