//! A call's context, built once before its handler runs: who calls (authenticated, within its
//! limits), under which configuration, at which instant and local day, and the audit entry the
//! handler fills in. The authentication layer ([`crate::layer`]) and the review page build it
//! the same way, with `App::open_call`; handlers take it from the request and end the call with
//! `App::finish`, which writes the audit record before anything is answered.

use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use cleanroom_core::rules::Role;
use tonic::codegen::http::HeaderMap;
use tonic::{Response, Status};

use crate::audit::Entry;
use crate::auth::{Principal, bearer_token};
use crate::live::Live;
use crate::state::{App, Refusal, blocking};
use crate::status::to_status;
use crate::{Error, Result};

/// One call's context.
#[derive(Clone)]
pub struct Call {
    /// The caller, holding its place among its calls in flight for as long as the call lives.
    pub principal: Principal,
    /// The configuration in force when the call began, for the whole call.
    pub live: Arc<Live>,
    /// The call's instant.
    pub now: DateTime<Utc>,
    /// The retailer's local date at `now`.
    pub today: NaiveDate,
    /// The call's audit record as authentication began it (principal, role, partner, method);
    /// `Call::take` hands it to the handler to fill in.
    pub entry: Entry,
}

impl Call {
    /// The context the authentication layer attached to `request`, and the call's audit entry
    /// apart from it (the handler fills the entry while it reads the context). A handler reached
    /// without a context was wired without the layer: refused, never served unauthenticated.
    pub(crate) fn take<T>(
        request: &mut tonic::Request<T>,
    ) -> std::result::Result<(Self, Entry), Status> {
        let mut call = request
            .extensions_mut()
            .remove::<Call>()
            .ok_or_else(|| Status::internal("the call reached its handler unauthenticated"))?;
        let entry = std::mem::take(&mut call.entry);
        Ok((call, entry))
    }

    /// Refuses a caller of `method` whose role is not `role`.
    pub fn require(&self, role: Role, method: &str) -> Result<()> {
        self.principal.require(role, method)
    }

    /// What a write of this call is, for the store's record of it.
    pub fn write_facts(
        &self,
        method: &str,
        partner: Option<&str>,
        request_id: Option<&str>,
        report: &cleanroom_engine::ingest::IngestReport,
    ) -> cleanroom_engine::store::WriteFacts {
        cleanroom_engine::store::WriteFacts {
            at: self.now,
            method: method.to_string(),
            partner: partner.map(str::to_string),
            request_id: request_id.map(str::to_string),
            report: report.clone(),
        }
    }

    /// The partner a partner principal speaks for.
    pub fn partner(&self, method: &str) -> Result<&str> {
        self.require(Role::Partner, method)?;
        self.principal
            .partner
            .as_deref()
            .ok_or_else(|| Error::Internal("a partner principal names no partner".into()))
    }
}

/// Responses that name the audit record written for them.
pub(crate) trait Audited {
    fn set_audit_id(&mut self, id: String);
}

impl App {
    /// Authenticates a call to `method` from its headers (and the client certificate its
    /// connection presented, by SHA-256) and builds its context: the principal, within its
    /// per-minute limit and its calls in flight, under the configuration in force. A refused call
    /// is counted, never recorded: it could otherwise fill the trail and name any partner.
    pub(crate) async fn open_call(
        self: &Arc<Self>,
        method: &str,
        headers: &HeaderMap,
        presented_cert: Option<String>,
    ) -> std::result::Result<Call, Status> {
        let live = self.live();
        let principal = match self.authenticate(&live, headers, presented_cert).await {
            Ok(principal) => principal,
            Err(e) => {
                self.refuse(Refusal::Unauthenticated);
                return Err(to_status(&e, "unrecorded"));
            }
        };
        let principal = self.within_limits(&live, principal).map_err(|e| {
            self.refuse(Refusal::Limited);
            to_status(&e, "unrecorded")
        })?;
        let now = self.clock.now();
        let entry = Entry {
            principal: principal.name.clone(),
            role: principal.role.as_str().to_string(),
            partner: principal.partner.clone(),
            method: cleanroom_engine::guard::admission::shown(method),
            ..Default::default()
        };
        Ok(Call {
            today: live.today(now),
            principal,
            live,
            now,
            entry,
        })
    }

    /// The principal behind the bearer token. Argon2 runs (once per token and configuration)
    /// off the async workers.
    async fn authenticate(
        &self,
        live: &Arc<Live>,
        headers: &HeaderMap,
        presented_cert: Option<String>,
    ) -> Result<Principal> {
        let token = bearer_token(headers)?;
        if let Some(known) = live.auth.known(&token) {
            return known.bound_to(presented_cert.as_deref());
        }
        let live = Arc::clone(live);
        let principal = blocking(move || live.auth.verify(&token)).await?;
        principal.bound_to(presented_cert.as_deref())
    }

    /// The principal with a place among its calls in flight, if its limits allow one more call.
    fn within_limits(&self, live: &Live, principal: Principal) -> Result<Principal> {
        let limit = live.rules.limits.calls_per_minute as usize;
        self.calls
            .admit(&principal.name, limit, true)
            .map_err(|wait| {
                cleanroom_core::Error::Limit(format!(
                    "rate limit of {limit} calls per minute reached; retry in {wait} s"
                ))
            })?;
        let most = live.rules.limits.concurrent_calls_per_principal as usize;
        let slot = self.in_flight.enter(&principal.name, most).ok_or_else(|| {
            cleanroom_core::Error::Limit(format!(
                "{most} calls of yours are already in flight; retry when one has ended"
            ))
        })?;
        Ok(principal.holding(slot))
    }

    /// Ends a call: writes its audit record (off the async workers, durable before it returns),
    /// then answers. A result whose audit record cannot be written is not released.
    pub(crate) async fn finish<T: Audited>(
        &self,
        call: Call,
        mut entry: Entry,
        result: Result<T>,
    ) -> std::result::Result<Response<T>, Status> {
        // The principal, and with it the call's place in flight, is held until the answer.
        let _held = call;
        let method = crate::metrics::known_method(&entry.method);
        entry.outcome = match &result {
            Ok(_) => "ok".to_string(),
            Err(e) => crate::status::outcome(e),
        };
        let (audit, at) = (Arc::clone(&self.audit), self.clock.now());
        let recorded = blocking(move || audit.append(entry, at)).await;
        let answer = match (result, recorded) {
            (Ok(mut response), Ok(id)) => {
                response.set_audit_id(id);
                Ok(Response::new(response))
            }
            (Ok(_), Err(e)) => {
                tracing::error!(error = %e, "audit trail write failed; result withheld");
                Err(to_status(&e, "unrecorded"))
            }
            (Err(e), Ok(id)) => Err(to_status(&e, &id)),
            (Err(e), Err(audit_error)) => {
                tracing::error!(error = %audit_error, "audit trail write failed");
                Err(to_status(&e, "unrecorded"))
            }
        };
        self.counted(method, answer)
    }

    /// Counts a call's answer in the metrics, by method and status code, and passes it on: every
    /// handler's answer goes through here (through `finish` for the calls the trail records).
    pub(crate) fn counted<T>(
        &self,
        method: &'static str,
        answer: std::result::Result<Response<T>, Status>,
    ) -> std::result::Result<Response<T>, Status> {
        let code = answer
            .as_ref()
            .map_or_else(Status::code, |_| tonic::Code::Ok);
        self.metrics.call(method, code);
        answer
    }
}
