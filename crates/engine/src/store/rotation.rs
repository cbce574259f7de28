//! What the end of a rotation's overlap removes from the store: the old key version's member
//! tokens (the collaboration's member-tokens file rewritten without them, or removed if nothing
//! is left) and every list version under it. One commit of the manifest, like every write.

use chrono::NaiveDate;
use datafusion::arrow::array::{AsArray as _, BooleanArray};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::UInt32Type;
use serde::{Deserialize, Serialize};

use super::{CommitRecord, DestroyedFile, Produced, Staging, Store, WriteFacts};
use super::{KeyRef, ListVersion, Manifest, Placer, file_safe};
use crate::ingest::{Sink, Table};
use crate::tables::tokens::KEY_VERSION;
use crate::{Error, Result};

/// A key version a rotation destroyed with a partner's last list versions, and the local day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyDestroyed {
    /// The destroyed key version.
    pub key_version: u32,
    /// The retailer's local day the rotation's end removed the lists.
    pub on: NaiveDate,
}

/// What the end of a rotation's overlap removed: each file by name, SHA-256 and rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokensRemoved {
    /// The files removed: the member-tokens file replaced, and the list versions.
    pub removed: Vec<DestroyedFile>,
    /// The member-tokens file written in its place, if any token of another version was left.
    pub written: Vec<DestroyedFile>,
    /// Member-token rows removed.
    pub removed_rows: u64,
    /// The newest list version removed, if any (every older one is gone too).
    pub through_list_version: Option<u32>,
}

/// What [`Store::commit_rotation`] did.
#[derive(Debug)]
pub enum Rotated {
    /// The store held nothing under the version.
    Nothing,
    /// A list version under it is being read by an answer: a later sweep removes it.
    Deferred,
    /// Removed in one commit.
    Done(Box<(CommitRecord, TokensRemoved)>),
}

/// The member-tokens file the end of a rotation rewrites.
struct TokensPlan {
    name: String,
    rows: u64,
    /// The rewritten file, if tokens of another version are left.
    staging: Option<Staging>,
    kept: u64,
}

impl Store {
    /// Removes what the store holds under `contract`'s key `version` (and any older one): its
    /// member tokens and `partner`'s list versions under it, in one commit. With no list version
    /// left, the partner's questions are refused naming `on` until it uploads a new list. The
    /// list versions under an old key are always the partner's oldest (an upload under an older
    /// version than the stored list's is refused), so version numbers keep counting.
    pub fn commit_rotation(
        &self,
        contract: &str,
        partner: &str,
        version: u32,
        on: NaiveDate,
        facts: WriteFacts,
    ) -> Result<Rotated> {
        let before = self.writer.lock().expect("writer lock poisoned").clone();
        let doomed = self.lists_under(partner, version)?;
        if doomed.iter().any(|v| v.in_use) {
            return Ok(Rotated::Deferred);
        }
        let tokens = match before.member_tokens.get(contract) {
            Some(name) if before.versions_in(name).iter().any(|v| *v <= version) => {
                Some(self.tokens_plan(contract, name, version)?)
            }
            _ => None,
        };
        if tokens.is_none() && doomed.is_empty() {
            return Ok(Rotated::Nothing);
        }
        let mut removed = TokensRemoved {
            through_list_version: doomed.last().map(|v| v.version),
            ..TokensRemoved::default()
        };
        if let Some(plan) = &tokens {
            removed.removed_rows = plan.rows - plan.kept;
            removed
                .removed
                .push(self.destroyed_file(&before, plan.name.clone())?);
        }
        for list in &doomed {
            removed
                .removed
                .push(self.destroyed_file(&before, list.file.clone())?);
        }
        let kept = tokens.as_ref().map_or(0, |p| p.kept);
        let record = self.commit(facts, |manifest, place| {
            if let Some(plan) = tokens {
                replace_tokens(manifest, place, contract, plan)?;
            }
            let gone = KeyDestroyed {
                key_version: version,
                on,
            };
            drop_oldest_lists(manifest, partner, doomed.len(), gone);
            Ok(Produced {
                list_version: removed.through_list_version,
                ..Produced::default()
            })
        })?;
        let after = self.writer.lock().expect("writer lock poisoned").clone();
        removed.written = record
            .files
            .iter()
            .map(|name| DestroyedFile {
                name: name.clone(),
                sha256: after.digest(name).to_string(),
                rows: kept,
            })
            .collect();
        Ok(Rotated::Done(Box::new((record, removed))))
    }

    /// `partner`'s list versions under key `version` or an older one: its oldest versions.
    fn lists_under(&self, partner: &str, version: u32) -> Result<Vec<ListVersion>> {
        let manifest = self.writer.lock().expect("writer lock poisoned").clone();
        let under = |v: &ListVersion| manifest.versions_in(&v.file).iter().any(|k| *k <= version);
        let all = self.list_versions(partner);
        let doomed: Vec<ListVersion> = all.iter().take_while(|v| under(v)).cloned().collect();
        if all[doomed.len()..].iter().any(under) {
            return Err(Error::Storage(format!(
                "the list versions of {partner} under key version {version} are not its oldest"
            )));
        }
        Ok(doomed)
    }

    /// Reads the member-tokens file `name` of `contract` and stages it without the tokens of
    /// key `version` or older.
    fn tokens_plan(&self, contract: &str, name: &str, version: u32) -> Result<TokensPlan> {
        let table = Table::MemberTokens(contract.to_string());
        let (file, mut staging) = self.rewrite_of(name, &table)?;
        if let Some(sealed) = &file.sealed
            && sealed.key.version <= version
        {
            // Sealed with the key this rotation destroys: the tokens kept go under the newest.
            let manifest = self.writer.lock().expect("writer lock poisoned").clone();
            if let Some(newest) = manifest
                .versions_in(name)
                .into_iter()
                .rfind(|v| *v > version)
            {
                let key = KeyRef {
                    contract: contract.to_string(),
                    version: newest,
                };
                staging.seal(table.clone(), key)?;
            }
        }
        let rows = file.rows()?;
        let mut kept = 0u64;
        for batch in file.batches()? {
            let batch = batch?;
            let versions = batch.column(KEY_VERSION).as_primitive::<UInt32Type>();
            let keep: BooleanArray = versions.iter().map(|v| v.map(|v| v > version)).collect();
            let left = filter_record_batch(&batch, &keep)?;
            kept += u64::try_from(left.num_rows()).unwrap_or(u64::MAX);
            if left.num_rows() > 0 {
                staging.write(&table, left)?;
            }
        }
        let staging = if kept > 0 {
            staging.close()?;
            Some(staging)
        } else {
            None
        };
        Ok(TokensPlan {
            name: name.to_string(),
            rows,
            staging,
            kept,
        })
    }
}

/// Puts the rewritten member tokens of `contract` in place of the file `plan` read (or removes
/// the entry if no token was left), unless a members ingest replaced that file meanwhile.
fn replace_tokens(
    manifest: &mut Manifest,
    place: &mut Placer<'_>,
    contract: &str,
    mut plan: TokensPlan,
) -> Result<()> {
    if manifest.member_tokens.get(contract) != Some(&plan.name) {
        return Err(Error::Storage(format!(
            "{}: replaced while the rotation read it; the next sweep tries again",
            plan.name
        )));
    }
    match plan.staging.as_mut() {
        Some(staging) => {
            let staged = staging.table(&Table::MemberTokens(contract.to_string()))?;
            let stem = format!("member_tokens-{}", file_safe(contract));
            let file = place(&stem, staged)?;
            manifest.member_tokens.insert(contract.to_string(), file);
        }
        None => {
            manifest.member_tokens.remove(contract);
        }
    }
    Ok(())
}

/// Drops `partner`'s `count` oldest list versions (they keep their numbers); with none left,
/// the partner's questions are refused naming `gone` until it uploads a new list.
fn drop_oldest_lists(manifest: &mut Manifest, partner: &str, count: usize, gone: KeyDestroyed) {
    let files = manifest.lists.entry(partner.to_string()).or_default();
    let dropped = files.drain(..count.min(files.len())).count();
    let left = files.len();
    *manifest
        .lists_dropped
        .entry(partner.to_string())
        .or_default() += u32::try_from(dropped).unwrap_or(u32::MAX);
    if dropped > 0 && left == 0 {
        manifest
            .lists_key_destroyed
            .insert(partner.to_string(), gone);
    }
}
