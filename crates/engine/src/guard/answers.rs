//! The store of answers already paid for: `data_dir/guard/answers/<partner>/<key>.json`, one file
//! per answer, written whole (temporary file, sync, rename, directory sync) so that a crash leaves
//! either the old state or the new one. A repeat of a question on the same data is served from here, byte for
//! byte, at no cost and with no fresh noise; a refusal that was charged (a too-small audience, a
//! failed execution) is stored and repeated the same way.
//!
//! An answer over a sealed list is stored sealed with the same collaboration key (AES-256-GCM,
//! bound to its partner and key): once that key is destroyed, a backup of the directory holds no
//! answer of the collaboration that can be read.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::store::{DataKeys, KeyRef, Sealed};
use crate::{Error, Result};

/// What was answered, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// Rows were released.
    Released(Release),
    /// The answer was refused after its cost was charged; the message is the same whatever the
    /// data beyond what the charged mechanism decided.
    Refused(String),
}

/// A released answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    /// The released rows as an Arrow IPC stream (dimensions, metrics, 95 % half-widths).
    #[serde(with = "base64_bytes")]
    pub arrow_ipc: Vec<u8>,
    /// Cells of the output domain not released.
    pub suppressed_rows: u64,
    /// The parameters after snapping, as text.
    pub params: BTreeMap<String, String>,
    /// The partner's list version that answered.
    pub list_version: u32,
    /// The consent state the answer reflects.
    pub consent_snapshot_id: String,
    /// The noise behind it.
    pub noise: NoiseReport,
    /// Facts for the retailer's audit trail only.
    pub audit: ReleaseFacts,
}

/// The noise behind a released answer, for the partner to judge its accuracy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NoiseReport {
    /// Per metric: the standard deviation of the discrete Gaussian noise on each value.
    pub noise_sd: BTreeMap<String, f64>,
    /// Per metric: the half-width of a 95 % interval around each released value.
    pub interval95: BTreeMap<String, u64>,
    /// Per metric: the most one member adds to one row (contributions are clamped to it).
    pub per_member_bound: BTreeMap<String, u64>,
    /// The most rows one member counted in.
    pub rows_per_member: u32,
    /// The hard k on true counts.
    pub k: u32,
    /// A row's noisy member count had to reach this (k + τ) to be released.
    pub release_threshold: u64,
}

/// What the guard decided for each cell of the output domain, counted (audit only: the partner
/// sees one count of withheld cells, whatever the reason).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseFacts {
    /// Cells released.
    pub released: u64,
    /// Cells whose true member count was below k.
    pub below_k: u64,
    /// Cells of at least k members whose noisy count missed k + τ.
    pub below_threshold: u64,
    /// Result rows whose dimension values fall outside the declared domain (dropped).
    pub out_of_domain_rows: u64,
    /// Members whose rows beyond the per-member limit were dropped.
    pub members_capped: u64,
}

mod base64_bytes {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

/// An answer as its file holds it: with the list version it was computed over, so that the
/// answers over a destroyed version can be found ([`Answers::remove_through`]). Files written
/// before versions were recorded hold the bare outcome.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum Stored {
    /// Sealed with `key`: the outcome's JSON, sealed, in base64.
    Sealed {
        key: KeyRef,
        list_version: u32,
        sealed: String,
    },
    Versioned {
        list_version: u32,
        outcome: Outcome,
    },
    Bare(Outcome),
}

impl Stored {
    /// The outcome, opened with its key from `keys` when it is sealed for `context`.
    fn outcome(self, keys: &Arc<dyn DataKeys>, context: &[u8]) -> Result<Outcome> {
        match self {
            Stored::Versioned { outcome, .. } | Stored::Bare(outcome) => Ok(outcome),
            Stored::Sealed { key, sealed, .. } => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(sealed)
                    .map_err(storage)?;
                let plain = Sealed::new(key, Arc::clone(keys)).open_bytes(context, &bytes)?;
                serde_json::from_slice(&plain).map_err(storage)
            }
        }
    }

    /// The list version it was computed over; unknown for a bare refusal.
    fn list_version(&self) -> Option<u32> {
        match self {
            Stored::Versioned { list_version, .. } | Stored::Sealed { list_version, .. } => {
                Some(*list_version)
            }
            Stored::Bare(Outcome::Released(release)) => Some(release.list_version),
            Stored::Bare(Outcome::Refused(_)) => None,
        }
    }
}

/// The answers directory.
pub struct Answers {
    dir: PathBuf,
    keys: Arc<dyn DataKeys>,
}

impl std::fmt::Debug for Answers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Answers({})", self.dir.display())
    }
}

fn storage(e: impl std::fmt::Display) -> Error {
    Error::Storage(format!("answer store: {e}"))
}

impl Answers {
    /// Opens (or creates) the store; sealed answers open with data keys from `keys`.
    pub fn open(dir: PathBuf, keys: Arc<dyn DataKeys>) -> Result<Self> {
        std::fs::create_dir_all(&dir).map_err(storage)?;
        Ok(Self { dir, keys })
    }

    /// What a sealed answer is bound to: its partner and key, so it opens nowhere else.
    fn context(partner: &str, key: &str) -> Vec<u8> {
        format!("cleanroom/answer/v1|{partner}|{key}").into_bytes()
    }

    fn path(&self, partner: &str, key: &str) -> PathBuf {
        // Partner ids and keys are validated identifiers and hex digests; encoding the partner
        // keeps any id a single path component.
        let partner = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(partner);
        self.dir.join(partner).join(format!("{key}.json"))
    }

    /// The stored outcome of an answer, if any.
    pub fn get(&self, partner: &str, key: &str) -> Result<Option<Outcome>> {
        let path = self.path(partner, key);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<Stored>(&bytes)
                .map_err(storage)?
                .outcome(&self.keys, &Self::context(partner, key))
                .map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(storage(e)),
        }
    }

    /// Stores an outcome computed over `list_version` whole, sealed with `sealed` (the list's
    /// key) when given: a reader sees the old file or the new one, never part of one.
    pub fn put(
        &self,
        partner: &str,
        key: &str,
        list_version: u32,
        outcome: &Outcome,
        sealed: Option<&Sealed>,
    ) -> Result<()> {
        let path = self.path(partner, key);
        let dir = path.parent().expect("answer paths have a parent");
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(storage)?;
            cleanroom_core::files::sync_dir(&self.dir)?;
        }
        let stored = match sealed {
            Some(sealed) => {
                let plain = serde_json::to_vec(outcome).map_err(storage)?;
                let bytes = sealed.seal_bytes(&Self::context(partner, key), &plain)?;
                Stored::Sealed {
                    key: sealed.key.clone(),
                    list_version,
                    sealed: base64::engine::general_purpose::STANDARD.encode(bytes),
                }
            }
            None => Stored::Versioned {
                list_version,
                outcome: outcome.clone(),
            },
        };
        let bytes = serde_json::to_vec(&stored).map_err(storage)?;
        Ok(cleanroom_core::files::write_atomic(&path, &bytes)?)
    }

    /// Removes every stored answer of a partner (the end of its collaboration) and returns how
    /// many there were. Removing the files one by one and then the directory, synced, means a
    /// crash leaves some of them at most, which the next call removes.
    pub fn remove_partner(&self, partner: &str) -> Result<u64> {
        let dir = self.path(partner, "-");
        let dir = dir.parent().expect("answer paths have a parent");
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(storage(e)),
        };
        let mut removed = 0;
        for entry in entries {
            std::fs::remove_file(entry.map_err(storage)?.path()).map_err(storage)?;
            removed += 1;
        }
        std::fs::remove_dir(dir).map_err(storage)?;
        cleanroom_core::files::sync_dir(&self.dir)?;
        Ok(removed)
    }
}

impl Answers {
    /// Removes a partner's stored answers computed over list versions up to `through` (they were
    /// destroyed) and returns how many there were. A refusal stored before versions were
    /// recorded names none and is kept: it holds a fixed message, nothing of a list. Each file
    /// is removed on its own, so a crash leaves some at most, which the next call removes.
    pub fn remove_through(&self, partner: &str, through: u32) -> Result<u64> {
        let dir = self.path(partner, "-");
        let dir = dir.parent().expect("answer paths have a parent");
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(storage(e)),
        };
        let mut removed = 0;
        for entry in entries {
            let path = entry.map_err(storage)?.path();
            let bytes = std::fs::read(&path).map_err(storage)?;
            let stored: Stored = serde_json::from_slice(&bytes).map_err(storage)?;
            if stored.list_version().is_some_and(|v| v <= through) {
                std::fs::remove_file(&path).map_err(storage)?;
                removed += 1;
            }
        }
        if removed > 0 {
            cleanroom_core::files::sync_dir(dir)?;
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NoKeys;

    #[test]
    fn an_answer_over_a_sealed_list_is_stored_sealed_and_unreadable_once_its_key_is_destroyed() {
        let dir = tempfile::tempdir().unwrap();
        let secret = cleanroom_core::token::MasterSecret::new(vec![9; 32]).unwrap();
        let keys = cleanroom_core::keys::KeyStore::open(&dir.path().join("keys"), secret).unwrap();
        let now = chrono::Utc::now();
        keys.key("c", 1, now).unwrap();
        let data_keys: Arc<dyn DataKeys> = keys.clone();
        let answers = Answers::open(dir.path().join("answers"), Arc::clone(&data_keys)).unwrap();
        let key = KeyRef {
            contract: "c".into(),
            version: 1,
        };
        let sealed = Sealed::new(key, Arc::clone(&data_keys));
        let outcome = Outcome::Refused("a fixed refusal".into());
        answers.put("p", "abc", 1, &outcome, Some(&sealed)).unwrap();
        let on_disk = std::fs::read(answers.path("p", "abc")).unwrap();
        assert!(
            !on_disk.windows(5).any(|w| w == b"fixed"),
            "stored in the clear"
        );
        assert_eq!(answers.get("p", "abc").unwrap(), Some(outcome));
        // Moved to another key's name, it does not open.
        std::fs::copy(answers.path("p", "abc"), answers.path("p", "abd")).unwrap();
        assert!(answers.get("p", "abd").is_err());
        assert_eq!(answers.remove_through("p", 0).unwrap(), 0);
        keys.destroy("c", 1, "manual", now).unwrap();
        assert!(answers.get("p", "abc").is_err());
        assert_eq!(answers.remove_through("p", 1).unwrap(), 2);
    }

    #[test]
    fn outcomes_round_trip_and_partners_are_apart() {
        let dir = tempfile::tempdir().unwrap();
        let answers = Answers::open(dir.path().join("answers"), Arc::new(NoKeys)).unwrap();
        let outcome = Outcome::Released(Release {
            arrow_ipc: vec![1, 2, 3],
            suppressed_rows: 4,
            params: BTreeMap::from([("start".into(), "2026-01-01".into())]),
            list_version: 2,
            consent_snapshot_id: "cs".into(),
            noise: NoiseReport::default(),
            audit: ReleaseFacts::default(),
        });
        answers.put("p", "abc", 2, &outcome, None).unwrap();
        assert_eq!(answers.get("p", "abc").unwrap(), Some(outcome));
        assert_eq!(answers.get("q", "abc").unwrap(), None);
        answers
            .put("p", "r", 3, &Outcome::Refused("no".into()), None)
            .unwrap();
        let reopened = Answers::open(dir.path().join("answers"), Arc::new(NoKeys)).unwrap();
        assert_eq!(
            reopened.get("p", "r").unwrap(),
            Some(Outcome::Refused("no".into()))
        );
        // Version 2's answer goes with version 2; version 3's refusal stays.
        assert_eq!(reopened.remove_through("p", 2).unwrap(), 1);
        assert_eq!(reopened.get("p", "abc").unwrap(), None);
        assert!(reopened.get("p", "r").unwrap().is_some());
        assert_eq!(reopened.remove_through("p", 2).unwrap(), 0, "idempotent");
    }

    #[test]
    fn answers_stored_before_versions_were_recorded_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let answers = Answers::open(dir.path().join("answers"), Arc::new(NoKeys)).unwrap();
        let bare = Outcome::Refused("too few".into());
        let path = answers.path("p", "old");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, serde_json::to_vec(&bare).unwrap()).unwrap();
        assert_eq!(answers.get("p", "old").unwrap(), Some(bare));
        assert_eq!(answers.remove_through("p", u32::MAX).unwrap(), 0);
    }
}
