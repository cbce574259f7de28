//! Idempotent writes: a request id in an ingest's or an upload's header names the write, so a
//! client whose connection broke can send it again without writing twice (THREATS 17).
//!
//! A write can commit while its client sees only a broken connection. Retried with the same id,
//! a write the store's log already holds is answered with the original result and changes
//! nothing (not another list version, not the same rows twice, no list allowance taken); one
//! that did not commit runs. While a write with an id is in flight, another with the same id is
//! told to retry shortly: the first's outcome decides what the second answers.

use cleanroom_engine::store::CommitRecord;

use crate::Result;
use crate::limit::CallSlot;
use crate::state::App;

/// The longest request id accepted.
const MAX_REQUEST_ID: usize = 64;

/// What a write with a request id turned out to be.
pub(crate) enum Claim {
    /// Committed before under this id: answer its result, write nothing.
    Replay(Box<CommitRecord>),
    /// Not committed: run it, holding this place until its call ends so no retry runs beside it.
    Run(Option<CallSlot>),
}

/// A request id as the client sent it: empty means none; otherwise 1 to 64 letters, digits, `-`
/// or `_` (the caller's text is never echoed).
pub(crate) fn parse(text: &str) -> Result<Option<String>> {
    if text.is_empty() {
        return Ok(None);
    }
    let valid = text.len() <= MAX_REQUEST_ID
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid {
        return Err(cleanroom_core::Error::Input(format!(
            "request_id must be 1 to {MAX_REQUEST_ID} letters, digits, '-' or '_'"
        ))
        .into());
    }
    Ok(Some(text.to_string()))
}

impl App {
    /// Claims the write `method` (for `partner`, for list uploads) named `request_id`: a replay
    /// of a committed write, or a place to run it. The place is taken before the store's log is
    /// read, so a write committing beside the claim is either in flight (busy) or in the log.
    pub(crate) fn claim_write(
        &self,
        method: &str,
        partner: Option<&str>,
        request_id: Option<&str>,
    ) -> Result<Claim> {
        let Some(id) = request_id else {
            return Ok(Claim::Run(None));
        };
        let key = format!("{method}\0{}\0{id}", partner.unwrap_or_default());
        let slot = self.writes_in_flight.enter(&key, 1).ok_or_else(|| {
            cleanroom_core::Error::Busy(
                "a write with this request_id is in progress; retry when it has ended".into(),
            )
        })?;
        Ok(match self.store.committed(method, partner, id) {
            Some(record) => Claim::Replay(Box::new(record)),
            None => Claim::Run(Some(slot)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_short_and_plain() {
        assert_eq!(parse("").unwrap(), None);
        assert_eq!(parse("a-1_B").unwrap().as_deref(), Some("a-1_B"));
        assert!(parse("has space").is_err());
        assert!(parse(&"x".repeat(65)).is_err());
        let refused = parse("'; DROP").unwrap_err().to_string();
        assert!(!refused.contains("DROP"), "{refused}");
    }
}
