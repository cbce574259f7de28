//! The engine side of the clean room, on Apache DataFusion: the data store (Parquet files on disk,
//! a manifest as the commit point), ingest into pseudonymous tables, the per-collaboration safe views and the
//! guard, the one place where privacy rules are enforced on every query.
//!
//! A query's path through this crate is one call, [`guard::Guard::answer`]: admission
//! ([`guard::admission`]) decides who may ask what, the parameters are typed and snapped once
//! ([`guard::params`]), and the guard's run plans the allow-listed SQL, checks the plan, charges
//! the partner's ledger, builds the safe views (only the matched, consenting audience, as the
//! tables `members` and `purchases`; private to this crate), executes member by member and
//! releases noisy cells.

pub mod audience;
pub mod error;
pub mod executor;
pub mod guard;
pub mod ingest;
#[cfg(feature = "measurement")]
pub mod measurement;
pub mod member;
pub mod store;
pub mod tables;
mod views;

pub use views::consent_counts;

pub use datafusion;
pub use datafusion::arrow;
pub use error::{Error, Result};
