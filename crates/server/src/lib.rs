//! The clean room's gRPC service: the partner and admin handlers, bearer-token authentication, the
//! hash-chained audit trail and the single mapping from errors to gRPC statuses.
//!
//! A query's path: [`partner::PartnerApi::run_query`] authenticates the caller, has the guard
//! admit the query ([`cleanroom_engine::guard::admission`]), binds the parameters
//! ([`cleanroom_core::allowlist`]), hands the request to the guard
//! ([`cleanroom_engine::guard::Guard::run`]), writes the audit record, and only then answers.

pub mod admin;
pub mod app;
pub mod audit;
pub mod auth;
pub mod error;
mod limit;
pub mod page;
pub mod partner;
pub mod results;
pub mod review;
pub mod status;
mod stream;
pub mod tls;

pub use app::{
    App, AppConfig, Clock, FixedClock, Live, Running, Sources, SystemClock, serve, spawn,
};
pub use error::{Error, Result};
