//! A partner's declaration of how it came by its customers' data: what a retailer receiving
//! personal data from a third party must confirm and record (APPI Art. 30(1); which items, to be
//! checked against the official text of the Enforcement Rules). The rules hold it per partner
//! (`[partners.X.declaration]`) with a reference to the signed document and its SHA-256; an
//! upload is refused before any record is read unless the declaration is current.

use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::files::excerpt;
use crate::{Error, Result};

/// `[partners.X.declaration]`: who the partner is and how it acquired the data it provides.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Declaration {
    /// The partner's legal name (the provider's name, as the record of receipt must give it).
    pub legal_name: String,
    /// Its registered address.
    pub address: String,
    /// Its representative (for a corporation).
    pub representative: String,
    /// How the partner acquired its customers' data (for example "direct sign-up on its own
    /// site, privacy notice v3").
    pub acquisition: String,
    /// The basis of the provision, for example `consent` (the customers' consent to provision).
    pub basis: String,
    /// The signed declaration, relative to the rules file.
    pub document: PathBuf,
    /// The document's SHA-256, hex.
    pub sha256: String,
    /// The last day the declaration holds (the retailer's local date).
    pub valid_until: NaiveDate,
}

/// Whether a partner's declaration lets the retailer receive its list today.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeclarationStatus {
    /// Current: in date, and the document is the one declared.
    Current {
        /// Its last day.
        valid_until: NaiveDate,
    },
    /// The rules hold no declaration for the partner.
    Missing,
    /// Past its last day.
    Expired {
        /// Its last day.
        valid_until: NaiveDate,
    },
    /// The document cannot be read (moved, removed, or the rules were not read from a file).
    Unreadable(String),
    /// The document is not the one whose SHA-256 the rules hold: it was changed or replaced.
    Changed {
        /// The SHA-256 the document has now.
        found: String,
    },
}

impl DeclarationStatus {
    /// Whether an upload may go ahead.
    pub fn is_current(&self) -> bool {
        matches!(self, DeclarationStatus::Current { .. })
    }

    /// The status in one line, for `rules validate` and the review page.
    pub fn sentence(&self) -> String {
        match self {
            DeclarationStatus::Current { valid_until } => {
                format!("current until {valid_until}")
            }
            DeclarationStatus::Missing => "missing: the rules hold no declaration".into(),
            DeclarationStatus::Expired { valid_until } => {
                format!("out of date: it held until {valid_until}")
            }
            DeclarationStatus::Unreadable(why) => format!("document unreadable: {why}"),
            DeclarationStatus::Changed { found } => format!(
                "document changed: its SHA-256 is now {}…, not the one the rules hold",
                &found[..12.min(found.len())]
            ),
        }
    }

    /// The refusal of an upload for partner `partner` under this status, or `Ok` if current.
    pub fn require_current(&self, partner: &str) -> Result<()> {
        if self.is_current() {
            return Ok(());
        }
        Err(Error::Precondition(format!(
            "partner `{}` has no current declaration of how it acquired its customers' data \
             (APPI Art. 30): {}; the retailer updates [partners.{}.declaration] before a list \
             is received",
            excerpt(partner),
            self.sentence(),
            excerpt(partner)
        )))
    }
}

impl Declaration {
    /// Checks the fields on their own (called by rules validation): nothing empty, a SHA-256 in
    /// hex, a relative document path that stays beside the rules.
    pub fn check(&self, partner: &str) -> Result<()> {
        let at = format!("partners.{}.declaration", excerpt(partner));
        for (field, value) in [
            ("legal_name", &self.legal_name),
            ("address", &self.address),
            ("representative", &self.representative),
            ("acquisition", &self.acquisition),
            ("basis", &self.basis),
        ] {
            if value.trim().is_empty() {
                return Err(Error::Config(format!("{at}.{field}: must not be empty")));
            }
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::Config(format!(
                "{at}.sha256: expected 64 hex digits"
            )));
        }
        let inside = self
            .document
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !inside || self.document.as_os_str().is_empty() {
            return Err(Error::Config(format!(
                "{at}.document: a path relative to the rules file, without `..`"
            )));
        }
        Ok(())
    }

    /// Where the document is, for rules read from a file in `base`.
    pub fn document_path(&self, base: &Path) -> PathBuf {
        base.join(&self.document)
    }

    /// The declaration's status on `today` (the retailer's local date), reading the document
    /// under `base` (the rules file's directory; `None` for rules not read from a file).
    pub fn status(&self, base: Option<&Path>, today: NaiveDate) -> DeclarationStatus {
        if today > self.valid_until {
            return DeclarationStatus::Expired {
                valid_until: self.valid_until,
            };
        }
        let Some(base) = base else {
            return DeclarationStatus::Unreadable(
                "the rules were not read from a file, so the document has no place".into(),
            );
        };
        let path = self.document_path(base);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) => {
                return DeclarationStatus::Unreadable(format!(
                    "{}: {}",
                    self.document.display(),
                    e.kind()
                ));
            }
        };
        let found = hex::encode(Sha256::digest(&bytes));
        if !found.eq_ignore_ascii_case(&self.sha256) {
            return DeclarationStatus::Changed { found };
        }
        DeclarationStatus::Current {
            valid_until: self.valid_until,
        }
    }
}

/// The status of an optional declaration (see [`Declaration::status`]).
pub fn status_of(
    declaration: Option<&Declaration>,
    base: Option<&Path>,
    today: NaiveDate,
) -> DeclarationStatus {
    declaration.map_or(DeclarationStatus::Missing, |d| d.status(base, today))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declaration(document: &str, sha256: &str) -> Declaration {
        Declaration {
            legal_name: "Sakura Foods K.K.".into(),
            address: "1-1 Chiyoda, Tokyo".into(),
            representative: "Hanako Sato".into(),
            acquisition: "own sign-up".into(),
            basis: "consent".into(),
            document: document.into(),
            sha256: sha256.into(),
            valid_until: NaiveDate::from_ymd_opt(2026, 12, 31).unwrap(),
        }
    }

    #[test]
    fn current_expired_changed_and_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("d.txt"), b"signed").unwrap();
        let sha = hex::encode(Sha256::digest(b"signed"));
        let d = declaration("d.txt", &sha);
        let day = |m, d| NaiveDate::from_ymd_opt(2026, m, d).unwrap();
        assert!(d.status(Some(dir.path()), day(12, 31)).is_current());
        assert!(matches!(
            d.status(
                Some(dir.path()),
                NaiveDate::from_ymd_opt(2027, 1, 1).unwrap()
            ),
            DeclarationStatus::Expired { .. }
        ));
        assert!(matches!(
            d.status(None, day(6, 1)),
            DeclarationStatus::Unreadable(_)
        ));
        std::fs::write(dir.path().join("d.txt"), b"signed, then edited").unwrap();
        let changed = d.status(Some(dir.path()), day(6, 1));
        assert!(matches!(changed, DeclarationStatus::Changed { .. }));
        let refusal = changed.require_current("sakura_foods").unwrap_err();
        assert!(matches!(refusal, Error::Precondition(m) if m.contains("document changed")));
        std::fs::remove_file(dir.path().join("d.txt")).unwrap();
        assert!(matches!(
            d.status(Some(dir.path()), day(6, 1)),
            DeclarationStatus::Unreadable(_)
        ));
        assert_eq!(
            status_of(None, Some(dir.path()), day(6, 1)),
            DeclarationStatus::Missing
        );
    }

    #[test]
    fn bad_fields_are_refused() {
        let sha = "a".repeat(64);
        assert!(declaration("d.txt", &sha).check("p").is_ok());
        assert!(declaration("../d.txt", &sha).check("p").is_err());
        assert!(declaration("/etc/d.txt", &sha).check("p").is_err());
        assert!(declaration("d.txt", "abc").check("p").is_err());
        let mut empty = declaration("d.txt", &sha);
        empty.basis = " ".into();
        assert!(empty.check("p").is_err());
    }
}
