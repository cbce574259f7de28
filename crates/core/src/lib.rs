//! Domain rules of the clean room, free of any engine or transport: identifier normalization,
//! keyed match tokens, consent evaluation, the rules configuration and the allow-list model.
//!
//! Everything here is deterministic and pure so that the engine, the server and the command-line
//! tools all apply exactly the same rules.

pub mod accounting;
pub mod allowlist;
pub mod consent;
pub mod declaration;
pub mod error;
pub mod files;
pub mod generalize;
pub mod keys;
pub mod normalize;
pub mod rules;
pub mod token;

pub use error::{Error, Result};
