//! The engine side of the clean room, on Apache DataFusion: the data store (Arrow in memory,
//! Parquet on disk), ingest into pseudonymous tables, the per-collaboration safe views and the
//! guard, the one place where privacy rules are enforced on every query.
//!
//! A query's path through this crate: [`views::SafeViews::build`] registers only the caller's
//! matched, consented members as the tables `members` and `purchases`; [`guard::run`] plans the
//! allow-listed SQL, checks the plan, binds the typed parameters, counts distinct members per row,
//! executes and releases only rows that pass the threshold.

pub mod error;
pub mod guard;
pub mod ingest;
pub mod store;
pub mod views;

pub use datafusion;
pub use datafusion::arrow;
pub use error::{Error, Result};
