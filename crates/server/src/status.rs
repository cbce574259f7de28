//! The one place where errors become gRPC statuses.
//!
//! | error | code |
//! |---|---|
//! | bad parameter, record or upload | `INVALID_ARGUMENT` |
//! | no or unknown bearer token | `UNAUTHENTICATED` |
//! | role or partner escape | `PERMISSION_DENIED` |
//! | unknown query (or not on the caller's allow-list) | `NOT_FOUND` |
//! | expired contract, no list yet, query refused by the guard | `FAILED_PRECONDITION` |
//! | size limits, budgets | `RESOURCE_EXHAUSTED` |
//! | an upload stream silent for too long | `DEADLINE_EXCEEDED` |
//! | a write whose request id is already in progress (retry) | `UNAVAILABLE` |
//! | anything else | `INTERNAL`, with only the audit id |
//!
//! Domain and guard messages are written never to contain data, so they are shown. Storage and
//! engine failures could name paths or SQL, so the caller gets only the code and the audit id.

use cleanroom_core::Error as Domain;
use cleanroom_engine::Error as Engine;
use tonic::{Code, Status};

use crate::Error;

/// Maps an error to the status the caller sees.
pub fn to_status(error: &Error, audit_id: &str) -> Status {
    let internal = || {
        Status::new(
            Code::Internal,
            format!("internal error; the retailer can look it up as audit record {audit_id}"),
        )
    };
    match error {
        Error::Unauthenticated(msg) => Status::unauthenticated(msg.clone()),
        Error::Stalled(msg) => Status::deadline_exceeded(msg.clone()),
        Error::Engine(Engine::Domain(domain)) => {
            let code = match domain {
                Domain::Input(_) => Code::InvalidArgument,
                Domain::NotFound(_) => Code::NotFound,
                Domain::Permission(_) => Code::PermissionDenied,
                Domain::Precondition(_) => Code::FailedPrecondition,
                Domain::Limit(_) => Code::ResourceExhausted,
                Domain::Busy(_) => Code::Unavailable,
                Domain::Config(_) | Domain::Storage(_) => return internal(),
            };
            Status::new(code, domain.to_string())
        }
        Error::Engine(Engine::Guard(_)) => Status::failed_precondition(error.to_string()),
        Error::Engine(Engine::Storage(_) | Engine::Engine(_))
        | Error::Internal(_)
        | Error::Refused(_) => internal(),
    }
}

/// Short outcome text for the audit trail: the status code and message, or the full internal
/// error (the audit trail is the retailer's, not the partner's).
pub fn outcome(error: &Error) -> String {
    let status = to_status(error, "-");
    match status.code() {
        Code::Internal => format!("INTERNAL: {error}"),
        code => format!("{code:?}: {}", status.message()),
    }
}

/// The HTTP status the review page answers for a gRPC status code: the same decision, told the
/// way browsers expect.
pub fn http_code(code: Code) -> u16 {
    match code {
        Code::Ok => 200,
        Code::InvalidArgument | Code::OutOfRange => 400,
        Code::Unauthenticated => 401,
        Code::PermissionDenied => 403,
        Code::NotFound => 404,
        Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => 409,
        Code::ResourceExhausted => 429,
        Code::Unimplemented => 501,
        Code::Unavailable => 503,
        _ => 500,
    }
}
