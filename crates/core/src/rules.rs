//! The rules a retailer analyst configures: purposes and their notice versions, partners, contracts,
//! the global k floor, sensitive columns and who may call the service. They are plain TOML so they
//! can be versioned and reviewed like code, and `validate` refuses a file that does not hang together.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use chrono::NaiveDate;
use serde::Deserialize;

use crate::generalize::{AGE_BANDS, GENDERS, PREFECTURES};
use crate::{Error, Result};

/// The whole rules file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    /// Global privacy settings.
    pub privacy: Privacy,
    /// Facts about the retailer that shape the data.
    #[serde(default)]
    pub retailer: Retailer,
    /// Named value lists (categories, brands) that parameters and output dimensions draw from.
    #[serde(default)]
    pub domains: BTreeMap<String, Vec<String>>,
    /// Purposes members consent to, by id.
    pub purposes: BTreeMap<String, Purpose>,
    /// Partners (manufacturers), by id.
    pub partners: BTreeMap<String, Partner>,
    /// Contracts, by id. A contract is one collaboration: one partner, one purpose, one match key.
    pub contracts: BTreeMap<String, Contract>,
    /// Columns that hold special-category data and may never be used by a query.
    #[serde(default)]
    pub sensitive_columns: Vec<SensitiveColumn>,
    /// Who may call the service.
    #[serde(default)]
    pub principals: Vec<PrincipalEntry>,
}

/// Global privacy settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Privacy {
    /// No released row ever has fewer distinct members than this, whatever a contract or query says.
    pub k_floor: u32,
    /// The most records one list upload or ingest may carry.
    #[serde(default = "default_max_upload_records")]
    pub max_upload_records: u64,
}

fn default_max_upload_records() -> u64 {
    2_000_000
}

/// Facts about the retailer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retailer {
    /// Offset of the retailer's local time from UTC, in minutes. Date parameters mean local
    /// midnight. Japan: 540.
    #[serde(default = "default_utc_offset")]
    pub utc_offset_minutes: i32,
}

impl Default for Retailer {
    fn default() -> Self {
        Self {
            utc_offset_minutes: default_utc_offset(),
        }
    }
}

fn default_utc_offset() -> i32 {
    540
}

/// A purpose members can consent to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Purpose {
    /// What the purpose is, as the privacy notice says it.
    pub description: String,
    /// Grants of an older notice version do not count.
    pub min_notice_version: u32,
    /// Grants older than this many days do not count, if set.
    #[serde(default)]
    pub grant_valid_days: Option<u32>,
}

/// A partner (manufacturer).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partner {
    /// Display name.
    pub name: String,
    /// What the partner's own per-customer attribute means (for example `loyalty_tier`).
    pub attribute: String,
    /// The values the attribute may take. A fixed list keeps a partner from tagging single customers.
    pub attribute_values: Vec<String>,
}

/// A contract between the retailer and one partner.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contract {
    /// The partner it binds.
    pub partner: String,
    /// The purpose its queries serve; only members who consented to it are counted.
    pub purpose: String,
    /// The clause that allows the data use, as a reviewer would cite it.
    pub clause: String,
    /// Minimum distinct members per released row under this contract.
    pub k: u32,
    /// The last day the contract is in force.
    pub expires: NaiveDate,
    /// Version of the match key in use. Raising it rotates the key.
    #[serde(default = "default_key_version")]
    pub key_version: u32,
    /// Ids of the allow-listed queries the partner may run.
    pub queries: Vec<String>,
    /// The most answers the partner may receive in any 24 hours; unlimited if absent. Bounds how
    /// many overlapping answers a reconstruction attack can collect.
    #[serde(default)]
    pub max_queries_per_day: Option<u32>,
}

fn default_key_version() -> u32 {
    1
}

/// A column tagged as special-category personal data (APPI 要配慮個人情報, GDPR Art. 9).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensitiveColumn {
    /// Column name as the safe views spell it.
    pub column: String,
    /// The category it falls under, for the reviewer (for example `health`).
    pub category: String,
}

/// The three kinds of user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A manufacturer's data team.
    Partner,
    /// A retailer analyst who loads data and configures rules.
    Analyst,
    /// A legal reviewer.
    Legal,
}

impl Role {
    /// Lowercase name, as audit records spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Partner => "partner",
            Role::Analyst => "analyst",
            Role::Legal => "legal",
        }
    }
}

/// One caller and the SHA-256 of its bearer token. The token itself is never stored.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalEntry {
    /// Who it is, for the audit trail.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// For partners: which partner.
    #[serde(default)]
    pub partner: Option<String>,
    /// Hex SHA-256 of the bearer token.
    pub token_sha256: String,
}

/// The built-in domains the guard knows without configuration.
pub const BUILTIN_DOMAINS: &[&str] = &["age_band", "prefecture", "gender", "partner_attribute"];

/// The value the safe views give a matched customer whose partner attribute is missing.
pub const UNKNOWN_ATTRIBUTE: &str = "unknown";

impl Rules {
    /// Reads and validates a rules file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read rules {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| match e {
            Error::Config(msg) => Error::Config(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Parses and validates rules from TOML text.
    pub fn parse(text: &str) -> Result<Self> {
        let rules: Rules = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        rules.validate()?;
        Ok(rules)
    }

    /// Checks that the rules hang together: every reference resolves, every k is at least the
    /// floor's minimum, every partner has at most one contract, every token is unique.
    pub fn validate(&self) -> Result<()> {
        let fail = |msg: String| Err(Error::Config(msg));
        if self.privacy.k_floor < 2 {
            return fail("privacy.k_floor must be at least 2".into());
        }
        for name in self.domains.keys() {
            if BUILTIN_DOMAINS.contains(&name.as_str()) {
                return fail(format!(
                    "domains.{name}: built-in domain cannot be redefined"
                ));
            }
        }
        for (name, values) in &self.domains {
            if values.is_empty() || values.iter().collect::<BTreeSet<_>>().len() != values.len() {
                return fail(format!(
                    "domains.{name}: must be a non-empty list of distinct values"
                ));
            }
        }
        for (id, partner) in &self.partners {
            let distinct: BTreeSet<_> = partner.attribute_values.iter().collect();
            if partner.attribute_values.is_empty()
                || distinct.len() != partner.attribute_values.len()
            {
                return fail(format!(
                    "partners.{id}.attribute_values: must be non-empty and distinct"
                ));
            }
            if distinct.contains(&UNKNOWN_ATTRIBUTE.to_string()) {
                return fail(format!(
                    "partners.{id}.attribute_values: `{UNKNOWN_ATTRIBUTE}` is reserved"
                ));
            }
        }
        let mut contract_of_partner = HashMap::new();
        for (id, contract) in &self.contracts {
            if !self.partners.contains_key(&contract.partner) {
                return fail(format!(
                    "contracts.{id}: unknown partner `{}`",
                    contract.partner
                ));
            }
            if !self.purposes.contains_key(&contract.purpose) {
                return fail(format!(
                    "contracts.{id}: unknown purpose `{}`",
                    contract.purpose
                ));
            }
            if contract.k == 0 {
                return fail(format!("contracts.{id}.k must be positive"));
            }
            if contract.key_version == 0 {
                return fail(format!("contracts.{id}.key_version must be positive"));
            }
            if let Some(other) = contract_of_partner.insert(&contract.partner, id) {
                return fail(format!(
                    "partner `{}` has two contracts ({other}, {id}); one collaboration per partner",
                    contract.partner
                ));
            }
        }
        let mut tokens = BTreeSet::new();
        for p in &self.principals {
            let valid_hash = p.token_sha256.len() == 64
                && p.token_sha256
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase());
            if !valid_hash {
                return fail(format!(
                    "principal `{}`: token_sha256 must be 64 lowercase hex digits",
                    p.name
                ));
            }
            if !tokens.insert(&p.token_sha256) {
                return fail(format!(
                    "principal `{}`: token shared with another principal",
                    p.name
                ));
            }
            match (p.role, &p.partner) {
                (Role::Partner, Some(partner)) if self.partners.contains_key(partner) => {}
                (Role::Partner, _) => {
                    return fail(format!(
                        "principal `{}`: a partner principal needs a known partner",
                        p.name
                    ));
                }
                (_, Some(_)) => {
                    return fail(format!(
                        "principal `{}`: only partner principals name a partner",
                        p.name
                    ));
                }
                (_, None) => {}
            }
        }
        Ok(())
    }

    /// The contract of a partner, if it has one.
    pub fn contract_of(&self, partner: &str) -> Option<(&str, &Contract)> {
        self.contracts
            .iter()
            .find(|(_, c)| c.partner == partner)
            .map(|(id, c)| (id.as_str(), c))
    }

    /// The values a named domain holds, for one partner (the partner attribute depends on it).
    pub fn domain(&self, name: &str, partner: &str) -> Option<Vec<String>> {
        let owned = |values: &[&str]| values.iter().map(|v| v.to_string()).collect();
        match name {
            "age_band" => Some(owned(AGE_BANDS)),
            "prefecture" => Some(owned(PREFECTURES)),
            "gender" => Some(owned(GENDERS)),
            "partner_attribute" => self.partners.get(partner).map(|p| {
                let mut values = p.attribute_values.clone();
                values.push(UNKNOWN_ATTRIBUTE.to_string());
                values
            }),
            other => self.domains.get(other).cloned(),
        }
    }

    /// Whether a domain name is known (built in or configured).
    pub fn has_domain(&self, name: &str) -> bool {
        BUILTIN_DOMAINS.contains(&name) || self.domains.contains_key(name)
    }

    /// The effective threshold of a query under a contract: the largest of the global floor, the
    /// contract's k and the query's k.
    pub fn effective_k(&self, contract: &Contract, query_k: u32) -> u32 {
        self.privacy.k_floor.max(contract.k).max(query_k)
    }

    /// Names of the columns tagged sensitive.
    pub fn sensitive_column_names(&self) -> BTreeSet<String> {
        self.sensitive_columns
            .iter()
            .map(|c| c.column.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [privacy]
        k_floor = 5
        [purposes.p]
        description = "d"
        min_notice_version = 2
        [partners.acme]
        name = "Acme"
        attribute = "tier"
        attribute_values = ["a", "b"]
        [contracts.c1]
        partner = "acme"
        purpose = "p"
        clause = "§1"
        k = 8
        expires = "2027-01-31"
        queries = []
    "#;

    #[test]
    fn effective_k_is_the_largest() {
        let rules = Rules::parse(MINIMAL).unwrap();
        let (_, contract) = rules.contract_of("acme").unwrap();
        assert_eq!(rules.effective_k(contract, 3), 8);
        assert_eq!(rules.effective_k(contract, 20), 20);
    }

    #[test]
    fn broken_references_are_refused() {
        let broken = MINIMAL.replace("purpose = \"p\"", "purpose = \"nope\"");
        assert!(
            matches!(Rules::parse(&broken), Err(Error::Config(m)) if m.contains("unknown purpose"))
        );
        let unknown_key = format!("{MINIMAL}\n[extra]\nx = 1\n");
        assert!(Rules::parse(&unknown_key).is_err());
    }
}
