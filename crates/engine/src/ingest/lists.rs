//! A partner's customer list: raw identifiers hashed here, or tokens made by `cleanroom prep`
//! checked, one row per token. A list is under one key version: raw identifiers are hashed under
//! the current one; tokens may be of any version the collaboration accepts now (during a
//! rotation's overlap, the previous one too), and the list's first record decides.

use cleanroom_core::keys::Tombstone;
use cleanroom_core::normalize::{self, Rejection};
use cleanroom_core::rules::Partner;
use cleanroom_core::token::{CollaborationKey, Token};

use super::tokens::TokenBuilder;
use super::{Ingest, IngestReport, Sink, Table, flush};
use crate::Result;
use crate::store::KeyRef;

/// One record of a partner's customer list: raw identifiers or pre-computed tokens.
#[derive(Debug, Clone, Default)]
pub struct ListInput {
    /// Raw email.
    pub email: String,
    /// Raw phone.
    pub phone: String,
    /// Token of the normalized email, from `cleanroom prep`.
    pub email_token: String,
    /// Token of the normalized phone, from `cleanroom prep`.
    pub phone_token: String,
    /// The partner's attribute; one of its declared values, or empty.
    pub attribute: String,
}

/// The keys a list upload is checked against.
#[derive(Debug, Clone)]
pub struct ListKeys {
    /// The collaboration (contract id): the list is sealed with its current key's data key.
    pub contract: String,
    /// The current key: raw identifiers are hashed under it.
    pub current: CollaborationKey,
    /// Older versions still accepted (a rotation's overlap).
    pub older: Vec<u32>,
    /// Versions a rotation destroyed: a token of one refuses the whole upload, naming the date.
    pub destroyed: Vec<Tombstone>,
    /// The partner's stored list is under this version: an older one is refused, so a
    /// partner's list versions never go back to a key about to be destroyed.
    pub stored: Option<u32>,
}

impl ListKeys {
    /// Keys with only the current one (no rotation under way).
    pub fn current(contract: &str, key: CollaborationKey) -> Self {
        Self {
            contract: contract.to_string(),
            current: key,
            older: Vec::new(),
            destroyed: Vec::new(),
            stored: None,
        }
    }

    /// Whether a token of `version` may be in a list now.
    fn accepts(&self, version: u32) -> bool {
        let live = version == self.current.version || self.older.contains(&version);
        live && self.stored.is_none_or(|stored| version >= stored)
    }

    /// Why a token of `version` cannot be in this list at all (a destroyed key, or one older
    /// than the partner's stored list): the whole upload is refused.
    fn refusal(&self, version: u32) -> Option<cleanroom_core::Error> {
        if let Some(t) = self.destroyed.iter().find(|t| t.version == version) {
            return Some(t.refusal());
        }
        let stored = self.stored?;
        (version < stored).then(|| {
            cleanroom_core::Error::Precondition(format!(
                "the partner's stored list is under key version {stored}; a list under the \
                 older version {version} is no longer accepted: nothing is charged, use the \
                 current key version {}",
                self.current.version
            ))
        })
    }
}

/// A partner's customer list being ingested: one row per token, `owner` being the record number
/// in the stream, so that a customer given by both email and phone still counts once.
pub struct ListIngest {
    attribute_values: Vec<String>,
    keys: ListKeys,
    /// The list's key version, once its first record decided it.
    version: Option<u32>,
    strict: bool,
    rows: TokenBuilder,
    report: IngestReport,
}

impl Ingest for ListIngest {
    type Input = ListInput;

    fn push(&mut self, records: Vec<ListInput>, sink: &mut dyn Sink) -> Result<()> {
        for record in records {
            let index = self.report.next_index();
            self.customer(index, &record)?;
        }
        flush(&mut self.rows, &Table::List, sink, false)
    }

    fn finish(mut self, sink: &mut dyn Sink) -> Result<IngestReport> {
        flush(&mut self.rows, &Table::List, sink, true)?;
        Ok(self.report)
    }

    /// A list is sealed with its collaboration's current key, whatever version its tokens
    /// carry: during a rotation's overlap the new key outlives the list's own.
    fn seals(&self) -> Vec<(Table, KeyRef)> {
        let key = KeyRef {
            contract: self.keys.contract.clone(),
            version: self.keys.current.version,
        };
        vec![(Table::List, key)]
    }
}

impl ListIngest {
    /// Starts a list of `partner`'s, hashed under the current key (or its tokens checked
    /// against `keys`).
    pub fn new(partner: &Partner, keys: ListKeys, strict: bool) -> Self {
        Self {
            attribute_values: partner.attribute_values.clone(),
            keys,
            version: None,
            strict,
            rows: TokenBuilder::new(true),
            report: IngestReport::default(),
        }
    }

    fn customer(&mut self, index: usize, r: &ListInput) -> Result<()> {
        let strict = self.strict;
        let has_raw = !r.email.trim().is_empty() || !r.phone.trim().is_empty();
        let has_tokens = !r.email_token.trim().is_empty() || !r.phone_token.trim().is_empty();
        let attribute = r.attribute.trim();
        if has_raw && has_tokens {
            return self
                .report
                .reject(index, "record: mixes raw identifiers and tokens", strict);
        }
        if !has_raw && !has_tokens {
            return self.report.reject(index, "record: no identifier", strict);
        }
        if !attribute.is_empty() && !self.attribute_values.iter().any(|v| v == attribute) {
            return self.report.reject(
                index,
                "attribute: not one of the partner's declared values",
                strict,
            );
        }
        let (tokens, rejected) = if has_raw {
            self.hashed(index, r)?
        } else {
            self.checked(index, r)?
        };
        // A record with one bad identifier still counts through its good one.
        if tokens.is_empty() {
            if !rejected {
                self.report.reject(index, "record: no identifier", strict)?;
            }
            return Ok(());
        }
        let version = *self.version.get_or_insert(tokens[0].version);
        if tokens.iter().any(|t| t.version != version) {
            return self.report.reject(
                index,
                "token: key version differs from the list's first record",
                strict,
            );
        }
        let owner = i64::try_from(index).unwrap_or(i64::MAX);
        let attribute = (!attribute.is_empty()).then_some(attribute);
        for token in tokens {
            self.rows.push(owner, token, attribute)?;
        }
        self.report.accepted += 1;
        Ok(())
    }

    /// Tokens of a record's raw identifiers, and whether one was rejected.
    fn hashed(&mut self, index: usize, r: &ListInput) -> Result<(Vec<Token>, bool)> {
        let mut tokens = Vec::with_capacity(2);
        let mut rejected = false;
        for (raw, normalize) in [
            (
                &r.email,
                normalize::email as fn(&str) -> Result<String, Rejection>,
            ),
            (&r.phone, normalize::phone),
        ] {
            if raw.trim().is_empty() {
                continue;
            }
            match normalize(raw) {
                Ok(normalized) => tokens.push(self.keys.current.token(&normalized)),
                Err(reason) => {
                    self.report.reject(index, reason.0, self.strict)?;
                    rejected = true;
                }
            }
        }
        Ok((tokens, rejected))
    }

    /// A record's pre-computed tokens, checked, and whether one was rejected.
    fn checked(&mut self, index: usize, r: &ListInput) -> Result<(Vec<Token>, bool)> {
        let mut tokens = Vec::with_capacity(2);
        let mut rejected = false;
        for text in [&r.email_token, &r.phone_token] {
            if text.trim().is_empty() {
                continue;
            }
            let reason = match text.parse::<Token>() {
                Ok(token) if self.keys.accepts(token.version) => {
                    tokens.push(token);
                    continue;
                }
                Ok(token) => match self.keys.refusal(token.version) {
                    Some(refusal) => return Err(refusal.into()),
                    None => "token: key version is not one the collaboration accepts now",
                },
                Err(_) => "token: malformed",
            };
            self.report.reject(index, reason, self.strict)?;
            rejected = true;
        }
        Ok((tokens, rejected))
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone as _;
    use cleanroom_core::token::MasterSecret;

    use super::*;

    /// Counts nothing: these tests read the ingest's report and errors.
    struct Discard;

    impl crate::ingest::Sink for Discard {
        fn write(
            &mut self,
            _: &Table,
            _: datafusion::arrow::record_batch::RecordBatch,
        ) -> Result<()> {
            Ok(())
        }
    }

    fn key(version: u32) -> CollaborationKey {
        MasterSecret::new(vec![7; 32])
            .unwrap()
            .collaboration_key("c", version, &[1; 32])
    }

    fn partner() -> Partner {
        Partner {
            name: "P".into(),
            attribute: "tier".into(),
            attribute_values: vec!["a".into()],
            declaration: None,
        }
    }

    fn tokens(version: u32, email: &str) -> ListInput {
        ListInput {
            email_token: key(version).token(email).to_string(),
            ..ListInput::default()
        }
    }

    /// Version 2 is current, version 1 in its overlap, version 0 destroyed by a rotation.
    fn keys(stored: Option<u32>) -> ListKeys {
        let destroyed = chrono::Utc.with_ymd_and_hms(2026, 11, 8, 3, 0, 0).unwrap();
        ListKeys {
            contract: "c".into(),
            current: key(2),
            older: vec![1],
            destroyed: vec![Tombstone {
                contract: "c".into(),
                version: 0,
                key_id: "id0".into(),
                created: destroyed,
                destroyed,
                reason: cleanroom_core::keys::ROTATION.into(),
            }],
            stored,
        }
    }

    fn ingest(keys: ListKeys, records: Vec<ListInput>) -> Result<IngestReport> {
        let mut ingest = ListIngest::new(&partner(), keys, false);
        ingest.push(records, &mut Discard)?;
        ingest.finish(&mut Discard)
    }

    #[test]
    fn a_list_is_under_one_version_of_those_the_collaboration_accepts() {
        let old = ingest(keys(None), vec![tokens(1, "a@x.jp"), tokens(1, "b@x.jp")]).unwrap();
        assert_eq!(old.accepted, 2, "the overlap's version is accepted");
        let mixed = ingest(
            keys(None),
            vec![
                tokens(1, "a@x.jp"),
                tokens(2, "b@x.jp"),
                ListInput {
                    email: "c@x.jp".into(),
                    ..ListInput::default()
                },
            ],
        )
        .unwrap();
        assert_eq!(mixed.accepted, 1, "{mixed:?}");
        assert_eq!(
            mixed.rejected["token: key version differs from the list's first record"], 2,
            "a raw record is hashed under the current version, not the list's"
        );
        let unknown = ingest(keys(None), vec![tokens(3, "a@x.jp")]).unwrap();
        assert_eq!(
            unknown.rejected["token: key version is not one the collaboration accepts now"],
            1
        );
    }

    #[test]
    fn a_destroyed_or_superseded_version_refuses_the_whole_upload() {
        let destroyed = ingest(keys(None), vec![tokens(2, "a@x.jp"), tokens(0, "b@x.jp")]);
        match destroyed {
            Err(crate::Error::Domain(cleanroom_core::Error::Precondition(m))) => {
                assert!(m.contains("destroyed on 2026-11-08"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        match ingest(keys(Some(2)), vec![tokens(1, "a@x.jp")]) {
            Err(crate::Error::Domain(cleanroom_core::Error::Precondition(m))) => {
                assert!(m.contains("stored list is under key version 2"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        // Control: the same list before the partner moved on is received.
        assert_eq!(
            ingest(keys(Some(1)), vec![tokens(1, "a@x.jp")])
                .unwrap()
                .accepted,
            1
        );
    }
}
