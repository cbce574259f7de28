//! The server's error type: everything the engine and domain layers report, plus authentication.

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure a handler can meet. [`crate::status::to_status`] is the only place that turns it
/// into what a caller sees.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No bearer token, or one that maps to no principal.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// Anything from the engine or the domain rules.
    #[error(transparent)]
    Engine(#[from] cleanroom_engine::Error),
    /// A stream that went silent for longer than the limit allows.
    #[error("stalled: {0}")]
    Stalled(String),
    /// A failure of the server itself (audit trail, encoding).
    #[error("internal: {0}")]
    Internal(String),
    /// Start-up found the data directory in a state it must not start on; nothing was changed.
    /// The message names the file, what disagrees and how to recover.
    #[error("refused to start: {0}")]
    Refused(String),
}

impl From<cleanroom_core::Error> for Error {
    fn from(e: cleanroom_core::Error) -> Self {
        Error::Engine(e.into())
    }
}
