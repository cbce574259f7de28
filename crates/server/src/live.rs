//! The configuration in force: rules, allow-list and the principals they define, replaced whole
//! when the files they come from change and still validate, so a call sees one consistent
//! configuration from its start to its end.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use cleanroom_core::allowlist::AllowList;
use cleanroom_core::rules::Rules;
use sha2::{Digest, Sha256};

use crate::audit::Event;
use crate::auth::Authenticator;
use crate::{Error, Result};

/// Where the rules and the allow-list come from, when the service should follow edits to them.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The rules file.
    pub rules: PathBuf,
    /// The allow-list directory.
    pub queries: PathBuf,
    /// How often to look for changes.
    pub poll: Duration,
}

/// The configuration in force: rules, allow-list and the principals they define. It is replaced
/// whole, never edited.
pub struct Live {
    /// The rules.
    pub rules: Rules,
    /// The allow-list (valid queries, and the files that failed validation).
    pub allowlist: AllowList,
    /// Bearer tokens to principals, from the rules.
    pub auth: Authenticator,
    /// SHA-256 of the rules' canonical form, for the audit trail.
    pub rules_sha256: String,
    /// What the source files looked like when this was loaded (empty without sources).
    pub(crate) fingerprint: String,
}

impl Live {
    /// The configuration of already loaded rules and allow-list; refused if a principal's
    /// credentials are not acceptable.
    pub(crate) fn new(
        rules: Rules,
        mut allowlist: AllowList,
        fingerprint: String,
        allow_demo_tokens: bool,
    ) -> Result<Self> {
        set_aside_what_the_guard_refuses(&rules, &mut allowlist);
        Ok(Self {
            auth: Authenticator::new(&rules, allow_demo_tokens)?,
            rules_sha256: hex::encode(Sha256::digest(format!("{rules:?}").as_bytes())),
            rules,
            allowlist,
            fingerprint,
        })
    }

    /// Loads and validates the configuration from its files.
    pub(crate) fn load(
        sources: &Sources,
        fingerprint: String,
        allow_demo_tokens: bool,
    ) -> Result<Self> {
        let rules = Rules::load(&sources.rules)?;
        let allowlist = AllowList::scan(&sources.queries, &rules)?;
        Self::new(rules, allowlist, fingerprint, allow_demo_tokens)
    }

    /// The retailer's local date at `now`: contracts expire and ages turn over on local dates.
    pub fn today(&self, now: DateTime<Utc>) -> NaiveDate {
        self.rules.retailer.today(now)
    }
}

/// Runs the guard's plan checks on every query for every partner with a contract, as the guard
/// will before each answer, and sets aside the queries it refuses: they are shown to reviewers as
/// invalid, with the reason, and can be neither approved nor run.
fn set_aside_what_the_guard_refuses(rules: &Rules, allowlist: &mut AllowList) {
    let mut refused = Vec::new();
    for query in allowlist.iter() {
        for partner in &query.partners {
            let Some((_, contract)) = rules.contract_of(partner) else {
                continue;
            };
            if let Err(e) = cleanroom_engine::guard::check_now(rules, query, contract, partner) {
                refused.push((query.id.clone(), format!("for partner {partner}: {e}")));
                break;
            }
        }
    }
    for (id, reason) in refused {
        tracing::warn!(query = %id, %reason, "the guard refuses a query; it is set aside");
        allowlist.set_aside(&id, reason);
    }
}

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// The sources did not change.
    Unchanged,
    /// A new configuration took effect.
    Applied,
    /// The sources changed into something that does not load; the previous configuration stays.
    Refused,
}

/// A file's part of the fingerprint: its bytes, or why it cannot be read (read under the same
/// rules as loading: regular files only, bounded, so a FIFO or a symlink cannot stall or redirect
/// the poll).
fn fingerprint_part(path: &std::path::Path) -> Vec<u8> {
    match cleanroom_core::files::read_config_file(path) {
        Ok(text) => text.into_bytes(),
        Err(e) => format!("\0unreadable: {e}").into_bytes(),
    }
}

/// A digest of the rules file and every query file (names and bytes), to notice edits cheaply.
pub(crate) fn source_fingerprint(sources: &Sources) -> Result<String> {
    let io = |e: std::io::Error| Error::Internal(format!("reading configuration: {e}"));
    let mut hasher = Sha256::new();
    hasher.update(fingerprint_part(&sources.rules));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&sources.queries)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    for file in files {
        hasher.update(file.to_string_lossy().as_bytes());
        hasher.update([0]);
        hasher.update(fingerprint_part(&file));
    }
    Ok(hex::encode(hasher.finalize()))
}

/// What a configuration change changed, for its audit record.
pub(crate) fn config_change(old: &Live, new: &Live) -> Event {
    let rules = (old.rules_sha256 != new.rules_sha256)
        .then(|| format!("{} -> {}", &old.rules_sha256[..12], &new.rules_sha256[..12]));
    let hashes = |live: &Live| -> BTreeMap<String, String> {
        live.allowlist
            .iter()
            .map(|q| (q.id.clone(), q.content_sha256.clone()))
            .collect()
    };
    let (before, after) = (hashes(old), hashes(new));
    let mut queries = Vec::new();
    for (id, sha) in &after {
        match before.get(id) {
            None => queries.push(format!("{id} added")),
            Some(old) if old != sha => queries.push(format!("{id} changed")),
            _ => {}
        }
    }
    queries.extend(
        before
            .keys()
            .filter(|id| !after.contains_key(*id))
            .map(|id| format!("{id} removed")),
    );
    let invalid_queries = new
        .allowlist
        .invalid()
        .iter()
        .map(|q| q.id.clone())
        .collect();
    Event::ConfigChange {
        rules,
        queries,
        invalid_queries,
    }
}
