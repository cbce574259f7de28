//! The engine's error type. Guard refusals are their own kind so that callers can tell a policy
//! decision from a failure; storage and DataFusion failures are internal and never shown verbatim.

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure of the engine layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A domain rule failed (bad input, missing state, limits).
    #[error(transparent)]
    Domain(#[from] cleanroom_core::Error),
    /// The guard refused the query. The message names the rule, never data.
    #[error("guard refused the query: {0}")]
    Guard(String),
    /// Reading or writing the data directory failed.
    #[error("storage: {0}")]
    Storage(String),
    /// DataFusion failed while executing a plan the guard accepted.
    #[error("engine: {0}")]
    Engine(#[from] datafusion::error::DataFusionError),
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

impl From<datafusion::arrow::error::ArrowError> for Error {
    fn from(e: datafusion::arrow::error::ArrowError) -> Self {
        Error::Engine(e.into())
    }
}

impl From<datafusion::parquet::errors::ParquetError> for Error {
    fn from(e: datafusion::parquet::errors::ParquetError) -> Self {
        Error::Storage(e.to_string())
    }
}
