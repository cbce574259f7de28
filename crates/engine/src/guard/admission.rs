//! Admission: who may ask what, decided before any data is touched. A partner is admitted under
//! its contract while the contract is in force (in the retailer's local time); a query is
//! admitted when it is on both the query's and the contract's list (otherwise it is not visible:
//! the same "not on your allow-list" as a query that does not exist), serves the contract's
//! purpose, and its current content is approved by legal. Only the admitted types below open the
//! guard's run (through [`super::Guard::answer`]) and [`super::Guard::store_list`], and only this
//! module makes them.

use chrono::{DateTime, NaiveDate, Utc};
use cleanroom_core::allowlist::{AllowList, QueryDef};
use cleanroom_core::keys::KeyStore;
use cleanroom_core::rules::{Contract, Rules};

use crate::Result;

/// Whether legal approved a query's current content: the review state lives with the service,
/// the decision to refuse lives here.
pub trait Approvals: Send + Sync {
    /// Why `query` may not run on `today`, or `None` when its current content is approved.
    fn refusal(&self, query: &QueryDef, today: NaiveDate) -> Option<String>;
}

/// A partner admitted under its contract, which is in force today.
#[derive(Debug, Clone, Copy)]
pub struct AdmittedPartner<'a> {
    pub(super) rules: &'a Rules,
    pub(super) partner: &'a str,
    pub(super) contract_id: &'a str,
    pub(super) contract: &'a Contract,
    pub(super) now: DateTime<Utc>,
}

impl<'a> AdmittedPartner<'a> {
    /// The partner's id.
    pub fn partner(&self) -> &'a str {
        self.partner
    }

    /// Its contract's id.
    pub fn contract_id(&self) -> &'a str {
        self.contract_id
    }

    /// Its contract.
    pub fn contract(&self) -> &'a Contract {
        self.contract
    }

    /// The retailer's local date the admission was decided on.
    pub fn today(&self) -> NaiveDate {
        self.rules.retailer.today(self.now)
    }

    /// A query this partner may see: listed for it by the query and by its contract.
    pub fn visible(&self, allowlist: &'a AllowList, id: &str) -> Result<&'a QueryDef> {
        allowlist.get(id).filter(|q| self.sees(q)).ok_or_else(|| {
            cleanroom_core::Error::NotFound(format!(
                "query `{}` is not on your allow-list",
                shown(id)
            ))
            .into()
        })
    }

    /// Every query this partner may see, in allow-list order.
    pub fn visible_queries(&self, allowlist: &'a AllowList) -> Vec<&'a QueryDef> {
        allowlist.iter().filter(|q| self.sees(q)).collect()
    }

    fn sees(&self, query: &QueryDef) -> bool {
        query.partners.iter().any(|p| p == self.partner)
            && self.contract.queries.contains(&query.id)
    }
}

/// A query admitted for one partner: visible to it, serving its contract's purpose, approved.
#[derive(Debug, Clone, Copy)]
pub struct AdmittedQuery<'a> {
    pub(super) partner: AdmittedPartner<'a>,
    pub(super) query: &'a QueryDef,
}

impl<'a> AdmittedQuery<'a> {
    /// The admitted partner.
    pub fn partner(&self) -> &AdmittedPartner<'a> {
        &self.partner
    }

    /// The admitted query.
    pub fn query(&self) -> &'a QueryDef {
        self.query
    }
}

/// Admits `partner` under its contract, if it has one and it is in force: an expired contract,
/// or one whose key was destroyed, lists, describes, answers and accepts nothing.
pub fn admit_partner<'a>(
    rules: &'a Rules,
    keys: &KeyStore,
    partner: &'a str,
    now: DateTime<Utc>,
) -> Result<AdmittedPartner<'a>> {
    let (contract_id, contract) = rules.contract_of(partner).ok_or_else(|| {
        cleanroom_core::Error::Precondition(format!("partner `{}` has no contract", shown(partner)))
    })?;
    let admitted = AdmittedPartner {
        rules,
        partner,
        contract_id,
        contract,
        now,
    };
    admitted.require_in_force()?;
    if let Some(ended) = keys.tombstone(contract_id, contract.key_version)? {
        return Err(ended.refusal().into());
    }
    Ok(admitted)
}

impl AdmittedPartner<'_> {
    /// Refuses once the contract is past its last day, in the retailer's local time.
    pub fn require_in_force(&self) -> Result<()> {
        if self.today() > self.contract.expires {
            return Err(cleanroom_core::Error::Precondition(format!(
                "contract {} expired on {}",
                self.contract_id, self.contract.expires
            ))
            .into());
        }
        Ok(())
    }
}

/// Admits `query` for an admitted partner: visible to it, its contract in force, for the
/// contract's purpose, its current content approved.
pub fn admit_query<'a>(
    partner: AdmittedPartner<'a>,
    query: &'a QueryDef,
    approvals: &dyn Approvals,
) -> Result<AdmittedQuery<'a>> {
    if !partner.sees(query) {
        return Err(cleanroom_core::Error::NotFound(format!(
            "query `{}` is not on your allow-list",
            shown(&query.id)
        ))
        .into());
    }
    partner.require_in_force()?;
    if let Some(reason) = approvals.refusal(query, partner.today()) {
        return Err(cleanroom_core::Error::Precondition(format!(
            "query {} (version {}, content {}) cannot run: {reason}",
            query.id,
            query.version,
            &query.content_sha256[..12.min(query.content_sha256.len())]
        ))
        .into());
    }
    if !query.purposes.contains(&partner.contract.purpose) {
        return Err(cleanroom_core::Error::Precondition(format!(
            "query {} does not serve the contract's purpose `{}`",
            query.id, partner.contract.purpose
        ))
        .into());
    }
    Ok(AdmittedQuery { partner, query })
}

/// A caller's text shown back in an error: safe characters only, bounded.
pub fn shown(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        .take(64)
        .collect()
}
