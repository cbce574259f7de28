//! The clean room's gRPC service.
//!
//! A call's path: the authentication layer ([`layer`]) checks the caller's credentials and limits
//! and builds the call's context ([`context::Call`]); a handler ([`partner`], [`admin`],
//! [`legal`]) reads that context and the shared state ([`state::App`]), converts the request
//! ([`convert`]), hands it to the engine (for a query, admission and
//! [`cleanroom_engine::guard::Guard::run`]), and ends with [`state::App`]'s `finish`, which writes
//! the audit record before anything is answered. [`startup`] opens the state and serves;
//! [`status`] is the one place errors become gRPC statuses.
//!
//! Modules depend one way: state and configuration ([`live`], [`state`]) know no handler; the
//! per-call context builds on the state; handlers on both; start-up on everything.

pub mod admin;
pub mod audit;
pub mod auth;
pub mod context;
pub mod convert;
pub mod error;
pub mod layer;
pub mod legal;
mod limit;
pub mod live;
pub mod page;
pub mod partner;
pub mod review;
pub mod startup;
pub mod state;
pub mod status;
mod stream;
pub mod tls;

pub use error::{Error, Result};
pub use live::{Reload, Sources};
pub use startup::{
    CONFIG_HEALTH, MAX_MESSAGE_BYTES, Running, serve, spawn, spawn_with_page, spawn_with_tls,
};
pub use state::{App, AppConfig, Clock, FixedClock, SystemClock};
