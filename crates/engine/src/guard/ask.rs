//! The guard's front half: one question as the caller asked it, answered or refused in one call.
//! [`Guard::answer`] admits the partner and then the query ([`super::admission`]), types and
//! snaps the parameters once ([`super::params`]), runs the question ([`Guard::run`]) and returns
//! the answer or the refusal together with what the retailer's audit record of the call needs,
//! so that nothing about the question is decided, or written down, anywhere else.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use cleanroom_core::allowlist::{AllowList, QueryDef};
use cleanroom_core::keys::KeyStore;
use cleanroom_core::rules::Rules;

use super::admission::{Approvals, admit_partner, admit_query};
use super::params::{self, RawValue};
use super::{Answer, Guard, GuardReport, QueryRequest};
use crate::store::Store;
use crate::{Error, Result};

/// One question as a partner asked it, with everything the guard decides it against.
pub struct Ask<'a> {
    /// The rules in force for the whole call.
    pub rules: &'a Rules,
    /// Each collaboration's key: a contract whose key was destroyed admits no one.
    pub keys: &'a KeyStore,
    /// The allow-list in force for the whole call.
    pub allowlist: &'a AllowList,
    /// Legal's approvals of each query's current content.
    pub approvals: &'a dyn Approvals,
    /// The data, read at one snapshot for the whole question.
    pub store: &'a Store,
    /// The partner asking (the authenticated principal's, never a request field).
    pub partner: &'a str,
    /// The query asked for, as the caller spelled it.
    pub query_id: &'a str,
    /// The parameters as the caller sent them, unchecked.
    pub params: BTreeMap<String, RawValue>,
    /// The call's instant.
    pub now: DateTime<Utc>,
}

/// What the retailer's audit record of a question keeps: as much as the guard had decided when
/// it answered or refused. A field stays empty when the question was refused before it was
/// known: the query only once it is visible to the partner, the parameters and the consent
/// snapshot only once the parameters are typed, the rest only with an answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditFacts {
    /// The query's id.
    pub query_id: Option<String>,
    /// SHA-256 of the query's content.
    pub query_sha256: Option<String>,
    /// The parameters: as typed for a refusal, as snapped (and stated in the answer) for an
    /// answer.
    pub params: Option<BTreeMap<String, String>>,
    /// The consent snapshot the question read.
    pub consent_snapshot: Option<String>,
    /// The partner's list version that answered.
    pub list_version: Option<u32>,
    /// Rows released.
    pub rows_released: Option<u64>,
    /// Cells of the output domain withheld.
    pub rows_suppressed: Option<u64>,
    /// Result rows dropped because a dimension value fell outside its declared domain.
    pub out_of_domain_rows: Option<u64>,
    /// What the guard enforced for the answer and what it cost.
    pub report: Option<GuardReport>,
}

impl AuditFacts {
    fn query(&mut self, query: &QueryDef) {
        self.query_id = Some(query.id.clone());
        self.query_sha256 = Some(query.content_sha256.clone());
    }

    fn answer(&mut self, answer: &Answer) {
        let release = &answer.release;
        self.params = Some(release.params.clone());
        self.list_version = Some(release.list_version);
        self.rows_released = Some(answer.batch.num_rows() as u64);
        self.rows_suppressed = Some(release.suppressed_rows);
        self.out_of_domain_rows = Some(release.audit.out_of_domain_rows);
        self.report = Some(answer.report());
    }
}

/// A question answered.
#[derive(Debug)]
pub struct Answered {
    /// The released answer and what it cost.
    pub answer: Answer,
    /// The query's id.
    pub query_id: String,
    /// The query's version.
    pub query_version: u32,
    /// The k the partner's contract and the query call for, under the rules in force.
    pub effective_k: u32,
    /// What the audit record keeps.
    pub facts: AuditFacts,
}

/// A question refused: why, and what the audit record keeps.
#[derive(Debug)]
pub struct Refused {
    /// The refusal, with its kind (which decides the caller's status code) and message.
    pub error: Error,
    /// What the audit record keeps.
    pub facts: AuditFacts,
}

impl Guard {
    /// Answers one question as the partner asked it: the only way to a query result.
    pub async fn answer(&self, ask: Ask<'_>) -> std::result::Result<Answered, Refused> {
        let mut facts = AuditFacts::default();
        match self.answer_noting(&ask, &mut facts).await {
            Ok((answer, query, effective_k)) => {
                facts.answer(&answer);
                Ok(Answered {
                    answer,
                    query_id: query.id.clone(),
                    query_version: query.version,
                    effective_k,
                    facts,
                })
            }
            Err(error) => Err(Refused { error, facts }),
        }
    }

    /// Admission, parameters and the run, in that order, noting in `facts` what each step
    /// decided as it is decided: a refusal at any step keeps what the steps before it found.
    async fn answer_noting<'a>(
        &self,
        ask: &'a Ask<'a>,
        facts: &mut AuditFacts,
    ) -> Result<(Answer, &'a QueryDef, u32)> {
        let partner = admit_partner(ask.rules, ask.keys, ask.partner, ask.now)?;
        let query = partner.visible(ask.allowlist, ask.query_id)?;
        facts.query(query);
        let admitted = admit_query(partner, query, ask.approvals)?;
        let typed = params::typed(query, &ask.params, ask.rules, partner.partner())?;
        let snapshot = ask.store.snapshot();
        facts.consent_snapshot = Some(snapshot.consent_snapshot_id.clone());
        // From here a refusal records the parameters as the caller sent them, typed; an answer
        // replaces them with the snapped ones it states.
        facts.params = Some(typed.shown());
        let snapped = params::snap(query, &typed)?;
        let answer = self
            .run(QueryRequest::new(admitted, snapped, snapshot))
            .await?;
        let effective_k = ask.rules.effective_k(partner.contract(), query.k);
        Ok((answer, query, effective_k))
    }
}
