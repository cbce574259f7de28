//! The member export: the member table and, for every collaboration, its member tokens.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use cleanroom_core::generalize;
use cleanroom_core::keys::KeyStore;
use cleanroom_core::normalize::{self, Rejection};
use cleanroom_core::rules::Rules;
use cleanroom_core::token::{CollaborationKey, MasterSecret, PseudonymKey};
use datafusion::arrow::array::{ArrayBuilder, Int64Builder, StringBuilder};
use datafusion::arrow::record_batch::RecordBatch;

use super::tokens::TokenBuilder;
use super::{Ingest, IngestReport, Rows, Sink, Table, flush};
use crate::store::{KeyRef, Snapshot};
use crate::{Error, Result, tables};

/// One retailer member as ingest receives it. Names, addresses and postal codes never get this far.
#[derive(Debug, Clone, Default)]
pub struct MemberInput {
    /// The retailer's member id; replaced by a pseudonym.
    pub member_id: String,
    /// Raw email, normalized and keyed here.
    pub email: String,
    /// Raw phone, normalized and keyed here.
    pub phone: String,
    /// Prefecture name.
    pub prefecture: String,
    /// Birth date, `YYYY-MM-DD`; kept only as an age band.
    pub birth_date: String,
    /// Gender as exported.
    pub gender: String,
}

/// Rows of the member table.
#[derive(Default)]
struct MemberRows {
    key: Int64Builder,
    age_band: StringBuilder,
    prefecture: StringBuilder,
    gender: StringBuilder,
}

impl Rows for MemberRows {
    fn len(&self) -> usize {
        self.key.len()
    }

    fn take(&mut self) -> Result<RecordBatch> {
        Ok(RecordBatch::try_new(
            tables::members::schema(),
            vec![
                Arc::new(self.key.finish()),
                Arc::new(self.age_band.finish()),
                Arc::new(self.prefecture.finish()),
                Arc::new(self.gender.finish()),
            ],
        )?)
    }
}

/// A member export being ingested: the member table and each collaboration's member tokens,
/// under every key version the collaboration accepts now (during a rotation's overlap, the
/// previous one as well as the current one). A member without any usable identifier is still
/// kept (it may buy and consent) but can never be matched.
pub struct MembersIngest {
    pseudonyms: PseudonymKey,
    keys: Vec<(Table, Vec<CollaborationKey>, TokenBuilder)>,
    as_of: NaiveDate,
    strict: bool,
    rows: MemberRows,
    /// Member pseudonyms seen so far (8 bytes a member), to refuse duplicates across chunks.
    seen: HashSet<i64>,
    /// The member's normalized identifiers, kept between members so that normalizing millions
    /// of them allocates once, not once each.
    identifiers: Identifiers,
    report: IngestReport,
    /// For a tokens-only ingest, the members of the member table and how many of them the
    /// export held so far, and how many it held that the table does not.
    only: Option<Only>,
}

/// What a tokens-only ingest computes: the member tokens of the collaborations that have none
/// under their current key version (a contract added, a key rotated, since the last members
/// ingest), from the same export, leaving the member table and every other collaboration's
/// tokens as they are. The export must hold exactly the members of the member table.
#[derive(Debug, Clone)]
pub struct TokensOnly {
    /// The collaborations (contract ids) to compute tokens for.
    pub contracts: BTreeSet<String>,
    /// The pseudonyms of the member table's members.
    pub members: HashSet<i64>,
    /// The member table it was read from (its file and digest), which the commit checks.
    pub members_version: String,
}

impl TokensOnly {
    /// What a tokens-only ingest over `snapshot` computes under `rules`: the collaborations in
    /// force whose member tokens lack their current key version. Refused when no members were
    /// ingested yet, or no collaboration lacks tokens.
    pub fn of(snapshot: &Snapshot, rules: &Rules) -> Result<Self> {
        let Some(table) = &snapshot.members else {
            return Err(cleanroom_core::Error::Precondition(
                "no members were ingested yet: ingest the members in full".into(),
            )
            .into());
        };
        let contracts: BTreeSet<String> = rules
            .contracts
            .iter()
            .filter(|(id, c)| {
                snapshot
                    .member_token_versions
                    .get(*id)
                    .is_none_or(|held| !held.contains(&c.key_version))
            })
            .map(|(id, _)| id.clone())
            .collect();
        if contracts.is_empty() {
            return Err(cleanroom_core::Error::Precondition(
                "every collaboration has its members' tokens under its current key version: \
                 a tokens-only ingest has nothing to compute"
                    .into(),
            )
            .into());
        }
        let mut members = HashSet::new();
        for batch in table.batches()? {
            let batch = batch?;
            let keys = crate::tables::member_keys(&batch).ok_or_else(|| {
                Error::Storage("the member table's first column is no key".into())
            })?;
            members.extend(keys.values().iter().copied());
        }
        Ok(Self {
            contracts,
            members,
            members_version: snapshot.members_version.clone(),
        })
    }
}

/// A tokens-only ingest's count of the export's members against the member table's.
struct Only {
    members: HashSet<i64>,
    found: usize,
    not_in_table: usize,
}

/// One member's normalized e-mail and phone number, either of which may be missing or refused.
#[derive(Default)]
struct Identifiers {
    email: String,
    phone: String,
    has_email: bool,
    has_phone: bool,
}

impl Identifiers {
    /// The identifiers that normalized.
    fn present(&self) -> impl Iterator<Item = &str> {
        [(self.has_email, &self.email), (self.has_phone, &self.phone)]
            .into_iter()
            .filter_map(|(present, id)| present.then_some(id.as_str()))
    }
}

impl Ingest for MembersIngest {
    type Input = MemberInput;

    fn push(&mut self, records: Vec<MemberInput>, sink: &mut dyn Sink) -> Result<()> {
        for record in records {
            let index = self.report.next_index();
            self.member(index, &record)?;
        }
        if self.only.is_none() {
            flush(&mut self.rows, &Table::Members, sink, false)?;
        }
        for (table, _, tokens) in &mut self.keys {
            flush(tokens, table, sink, false)?;
        }
        Ok(())
    }

    fn finish(mut self, sink: &mut dyn Sink) -> Result<IngestReport> {
        self.check_same_members()?;
        if self.only.is_none() {
            flush(&mut self.rows, &Table::Members, sink, true)?;
        }
        for (table, _, tokens) in &mut self.keys {
            flush(tokens, table, sink, true)?;
        }
        Ok(self.report)
    }

    /// Each collaboration's member tokens are sealed with its newest key version's data key:
    /// during a rotation's overlap that is the new version, whose key outlives the old one.
    fn seals(&self) -> Vec<(Table, KeyRef)> {
        self.keys
            .iter()
            .filter_map(|(table, keys, _)| {
                let Table::MemberTokens(contract) = table else {
                    return None;
                };
                let version = keys.iter().map(|k| k.version).max()?;
                Some((
                    table.clone(),
                    KeyRef {
                        contract: contract.clone(),
                        version,
                    },
                ))
            })
            .collect()
    }
}

impl MembersIngest {
    /// Starts an ingest under the rules' collaborations, their keys from the key store (made
    /// now for a collaboration that has none yet): each version the collaboration accepts at
    /// `now` (`KeyStore::live_versions`). Ages are taken on the retailer's date of `now`. A
    /// collaboration whose current key was destroyed gets no tokens: it has ended.
    pub fn new(
        rules: &Rules,
        secret: &MasterSecret,
        keys: &KeyStore,
        now: DateTime<Utc>,
        strict: bool,
    ) -> Result<Self> {
        let mut collaborations = Vec::new();
        for (id, contract) in &rules.contracts {
            let versions =
                keys.live_versions(id, contract.key_version, contract.key_overlap_days, now)?;
            if versions.is_empty() {
                continue;
            }
            let keys = versions
                .into_iter()
                .map(|version| keys.key(id, version, now))
                .collect::<cleanroom_core::Result<Vec<_>>>()?;
            collaborations.push((
                Table::MemberTokens(id.clone()),
                keys,
                TokenBuilder::new(false),
            ));
        }
        Ok(Self {
            pseudonyms: secret.pseudonym_key(),
            keys: collaborations,
            as_of: rules.retailer.today(now),
            strict,
            rows: MemberRows::default(),
            seen: HashSet::new(),
            identifiers: Identifiers::default(),
            report: IngestReport::default(),
            only: None,
        })
    }

    /// A tokens-only ingest ([`TokensOnly`]): only the member tokens of `only.contracts`, each
    /// member checked against the member table.
    pub fn tokens_only(
        rules: &Rules,
        secret: &MasterSecret,
        keys: &KeyStore,
        now: DateTime<Utc>,
        strict: bool,
        only: TokensOnly,
    ) -> Result<Self> {
        let mut ingest = Self::new(rules, secret, keys, now, strict)?;
        ingest.keys.retain(
            |(table, _, _)| matches!(table, Table::MemberTokens(id) if only.contracts.contains(id)),
        );
        if ingest.keys.is_empty() {
            return Err(cleanroom_core::Error::Precondition(
                "the collaborations without tokens have no key in force (ended): a tokens-only \
                 ingest has nothing to compute"
                    .into(),
            )
            .into());
        }
        ingest.only = Some(Only {
            members: only.members,
            found: 0,
            not_in_table: 0,
        });
        Ok(ingest)
    }

    /// For a tokens-only ingest, refuses an export whose members are not the member table's:
    /// its tokens would name members the table lacks, or leave some of the table's without.
    fn check_same_members(&self) -> Result<()> {
        let Some(only) = &self.only else {
            return Ok(());
        };
        let missing = only.members.len() - only.found;
        if only.not_in_table == 0 && missing == 0 {
            return Ok(());
        }
        Err(cleanroom_core::Error::Input(format!(
            "a tokens-only ingest needs the export of the last members ingest: this one holds \
             {} members the member table does not, and lacks {missing} of its members; ingest \
             the members in full instead",
            only.not_in_table
        ))
        .into())
    }

    /// Normalizes the member's e-mail and phone number into the kept buffers. A bad one is
    /// dropped and counted; the member stays.
    fn normalize_identifiers(&mut self, index: usize, record: &MemberInput) -> Result<()> {
        let ids = &mut self.identifiers;
        let email = (!record.email.trim().is_empty())
            .then(|| normalize::email_into(&record.email, &mut ids.email));
        let phone = (!record.phone.trim().is_empty())
            .then(|| normalize::phone(&record.phone).map(|p| ids.phone = p));
        ids.has_email = matches!(email, Some(Ok(())));
        ids.has_phone = matches!(phone, Some(Ok(())));
        for outcome in [email, phone] {
            if let Some(Err(Rejection(reason))) = outcome {
                self.report.reject(index, reason, self.strict)?;
            }
        }
        Ok(())
    }

    fn member(&mut self, index: usize, record: &MemberInput) -> Result<()> {
        let strict = self.strict;
        if record.member_id.trim().is_empty() {
            return self.report.reject(index, "member_id: empty", strict);
        }
        let Some(prefecture) = generalize::prefecture(&record.prefecture) else {
            return self
                .report
                .reject(index, "prefecture: not a Japanese prefecture", strict);
        };
        let member_key = self.pseudonyms.pseudonym(&record.member_id);
        if !self.seen.insert(member_key) {
            return self.report.reject(index, "member_id: duplicate", strict);
        }
        self.normalize_identifiers(index, record)?;
        if let Some(only) = &mut self.only {
            if only.members.contains(&member_key) {
                only.found += 1;
            } else {
                only.not_in_table += 1;
            }
        }
        for (_, keys, tokens) in &mut self.keys {
            for key in keys.iter() {
                for id in self.identifiers.present() {
                    tokens.push(member_key, key.token(id), None)?;
                }
            }
        }
        if self.only.is_none() {
            self.rows.key.append_value(member_key);
            self.rows
                .age_band
                .append_value(generalize::age_band(&record.birth_date, self.as_of));
            self.rows.prefecture.append_value(prefecture);
            self.rows
                .gender
                .append_value(generalize::gender(&record.gender));
        }
        self.report.accepted += 1;
        Ok(())
    }
}
