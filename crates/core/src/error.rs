//! The error type of the domain layer, grouped by kind so that every caller maps it the same way.

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure of the domain layer. The message never carries a raw identifier: callers may show
/// it to the person who made the request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A configuration file or value is wrong; the service must not start with it.
    #[error("config error: {0}")]
    Config(String),
    /// The caller sent a value that breaks a declared rule (a parameter, a record, a format).
    #[error("invalid input: {0}")]
    Input(String),
    /// The named thing does not exist, or is not visible to the caller.
    #[error("not found: {0}")]
    NotFound(String),
    /// The caller's role or partner may not do this.
    #[error("permission denied: {0}")]
    Permission(String),
    /// The request is well formed but the state forbids it (expired contract, no list uploaded).
    #[error("precondition failed: {0}")]
    Precondition(String),
    /// A limit was reached (upload size, rate, budget).
    #[error("limit exceeded: {0}")]
    Limit(String),
    /// The request collides with one in progress; the same request a moment later succeeds.
    #[error("busy: {0}")]
    Busy(String),
    /// A file of the service's own could not be read or written (a full disk, a damaged file).
    /// The message names the file and, for a record, its line; never a record's content.
    #[error("storage: {0}")]
    Storage(String),
}
