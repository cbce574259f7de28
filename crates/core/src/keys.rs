//! The key store: one random 256-bit seed per collaboration and key version, kept in a directory
//! of its own outside the data directory (and outside the data directory's backups).
//!
//! A collaboration's match key is derived with HKDF-SHA256 from the master secret *and* its seed:
//! neither alone gives the key. So the master secret and an old backup of the data directory no
//! longer re-derive a key once its seed is destroyed, and nobody can then test a guessed e-mail
//! address against the old member tokens or lists; the key store alone (without the master
//! secret) gives nothing either.
//!
//! Destruction writes a tombstone first (what, when, why, and the key's public id), then
//! overwrites and removes the seed. A destruction cut by a crash is finished when the store is
//! next opened, and a destroyed key is never made again: asking for it is refused with its date.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::files::{self, TEMPORARY_SUFFIX};
use crate::token::{CollaborationKey, DataKey, MasterSecret};
use crate::{Error, Result};

/// What a seed file holds. The seed is the only secret in the store.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedFile {
    contract: String,
    version: u32,
    created: DateTime<Utc>,
    /// 32 random bytes, hex.
    seed: String,
}

/// The record a destroyed key leaves behind: enough to prove what was destroyed, nothing that
/// re-derives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tombstone {
    /// The collaboration (contract id).
    pub contract: String,
    /// The key version.
    pub version: u32,
    /// The key's public id ([`KeyStatus::key_id`]).
    pub key_id: String,
    /// When the key was made.
    pub created: DateTime<Utc>,
    /// When it was destroyed.
    pub destroyed: DateTime<Utc>,
    /// Why: `expiry`, `retention`, `manual`, `rotation`.
    pub reason: String,
}

impl Tombstone {
    /// The refusal every call of the ended collaboration gets: fixed, naming the date. A version
    /// a rotation destroyed names the end of its overlap instead: the collaboration runs on
    /// under its current version.
    pub fn refusal(&self) -> Error {
        if self.reason == ROTATION {
            return Error::Precondition(format!(
                "key version {} of contract {} (id {}) was destroyed on {} at the end of its \
                 rotation overlap: nothing is charged; use the contract's current key version \
                 (prepare the list again with the key `cleanroom export-key` gives now, or \
                 upload raw identifiers)",
                self.version,
                self.contract,
                self.key_id,
                self.destroyed.date_naive()
            ));
        }
        Error::Precondition(format!(
            "the collaboration of contract {} ended: its key (version {}, id {}) was destroyed \
             on {} ({})",
            self.contract,
            self.version,
            self.key_id,
            self.destroyed.date_naive(),
            self.reason
        ))
    }
}

/// The reason a key a rotation's overlap ended is destroyed with.
pub const ROTATION: &str = "rotation";

/// One key of the store as `cleanroom keys status` lists it: never key material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyStatus {
    /// The collaboration (contract id).
    pub contract: String,
    /// The key version.
    pub version: u32,
    /// A public id of the key: the first 8 bytes of a SHA-256 of the derived key, hex. It names
    /// the key in audit records and certificates and cannot be turned back into the key.
    pub key_id: String,
    /// When the key was made.
    pub created: DateTime<Utc>,
    /// When and why it was destroyed, if it was.
    pub destroyed: Option<(DateTime<Utc>, String)>,
}

/// The key store of one service.
pub struct KeyStore {
    dir: PathBuf,
    secret: MasterSecret,
    /// Keys already read or made: a members ingest asks once per collaboration, an upload once.
    cache: Mutex<HashMap<(String, u32), CollaborationKey>>,
    /// Data keys already derived: every sealed file or stored answer opened asks for one.
    data_keys: Mutex<HashMap<(String, u32), DataKey>>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyStore({})", self.dir.display())
    }
}

impl KeyStore {
    /// Opens (making it if needed, readable by its owner only) the key store at `dir`, and
    /// finishes any destruction a crash cut short.
    pub fn open(dir: &Path, secret: MasterSecret) -> Result<Arc<Self>> {
        make_private_dir(dir)?;
        let store = Self {
            dir: dir.to_path_buf(),
            secret,
            cache: Mutex::new(HashMap::new()),
            data_keys: Mutex::new(HashMap::new()),
        };
        store.finish_destructions()?;
        store.remove_stale_temporaries()?;
        Ok(Arc::new(store))
    }

    /// The key store at `dir` as it is, for checking it (`verify-audit`): nothing is made,
    /// finished or removed.
    pub fn inspect(dir: &Path, secret: MasterSecret) -> Result<Self> {
        if !dir.is_dir() {
            return Err(storage(dir, "no key store here"));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            secret,
            cache: Mutex::new(HashMap::new()),
            data_keys: Mutex::new(HashMap::new()),
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The match key of `contract` at `version`, made now if the store has none. Refused once
    /// that key was destroyed.
    pub fn key(
        &self,
        contract: &str,
        version: u32,
        now: DateTime<Utc>,
    ) -> Result<CollaborationKey> {
        let id = (contract.to_string(), version);
        if let Some(key) = self.cached(&id) {
            return Ok(key);
        }
        if let Some(tombstone) = self.tombstone(contract, version)? {
            return Err(tombstone.refusal());
        }
        let seed = match self.read_seed(contract, version)? {
            Some(seed) => seed,
            None => self.make_seed(contract, version, now)?,
        };
        let key = self.derive(&seed);
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, key.clone());
        Ok(key)
    }

    /// The key of `contract` at `version` if the store holds it, without making one.
    pub fn existing_key(&self, contract: &str, version: u32) -> Result<Option<CollaborationKey>> {
        if let Some(key) = self.cached(&(contract.to_string(), version)) {
            return Ok(Some(key));
        }
        match self.read_seed(contract, version)? {
            Some(seed) => Ok(Some(self.derive(&seed))),
            None => Ok(None),
        }
    }

    /// The data key of `contract` at `version`, to seal or open what is stored for it. Never
    /// makes a key: a file is sealed only under a key its collaboration already has. Refused
    /// with the tombstone's message once the key was destroyed, and as a storage fault when the
    /// store holds no such key (a data directory restored beside the wrong key store).
    pub fn data_key(&self, contract: &str, version: u32) -> Result<DataKey> {
        let id = (contract.to_string(), version);
        if let Some(key) = lock(&self.data_keys).get(&id) {
            return Ok(key.clone());
        }
        if let Some(tombstone) = self.tombstone(contract, version)? {
            return Err(tombstone.refusal());
        }
        let Some(seed) = self.read_seed(contract, version)? else {
            return Err(storage(
                &self.dir,
                &format!(
                    "holds no key of contract {contract} version {version}: a data directory \
                     is read with the key store it was written beside"
                ),
            ));
        };
        let key = self.secret.data_key(contract, version, &seed.bytes);
        lock(&self.data_keys).insert(id, key.clone());
        Ok(key)
    }

    /// The tombstone of a destroyed key, if it was destroyed.
    pub fn tombstone(&self, contract: &str, version: u32) -> Result<Option<Tombstone>> {
        let path = self.path(contract, version, TOMBSTONE)?;
        if !path.exists() {
            return Ok(None);
        }
        let text = files::read_config_file(&path)?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| storage(&path, &format!("not a key tombstone ({e})")))
    }

    /// Destroys a key: the tombstone is written and synced first, then the seed is overwritten,
    /// synced and removed, and the directory synced. After this nothing re-derives the key. A key
    /// never made gets a tombstone too (its id `never made`), so it can never be made.
    pub fn destroy(
        &self,
        contract: &str,
        version: u32,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<Tombstone> {
        if let Some(done) = self.tombstone(contract, version)? {
            return Ok(done);
        }
        let (key_id, created) = match self.read_seed(contract, version)? {
            Some(seed) => (key_id(&self.derive(&seed)), seed.created),
            None => ("never made".to_string(), now),
        };
        let tombstone = Tombstone {
            contract: contract.to_string(),
            version,
            key_id,
            created,
            destroyed: now,
            reason: reason.to_string(),
        };
        let body = serde_json::to_vec_pretty(&tombstone).expect("a tombstone serializes");
        files::write_atomic(&self.path(contract, version, TOMBSTONE)?, &body)?;
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(contract.to_string(), version));
        lock(&self.data_keys).remove(&(contract.to_string(), version));
        self.shred(&self.path(contract, version, SEED)?)?;
        Ok(tombstone)
    }

    /// Every key the store holds or held, by contract and version; never key material.
    pub fn status(&self) -> Result<Vec<KeyStatus>> {
        let mut listed = Vec::new();
        for (contract, version, kind) in self.entries()? {
            match kind {
                Entry::Seed => {
                    if self.tombstone(&contract, version)?.is_some() {
                        continue;
                    }
                    let seed = self
                        .read_seed(&contract, version)?
                        .expect("listed just now");
                    listed.push(KeyStatus {
                        key_id: key_id(&self.derive(&seed)),
                        created: seed.created,
                        destroyed: None,
                        contract,
                        version,
                    });
                }
                Entry::Tombstone => {
                    let t = self
                        .tombstone(&contract, version)?
                        .expect("listed just now");
                    listed.push(KeyStatus {
                        contract,
                        version,
                        key_id: t.key_id,
                        created: t.created,
                        destroyed: Some((t.destroyed, t.reason)),
                    });
                }
            }
        }
        listed.sort_by(|a, b| (&a.contract, a.version).cmp(&(&b.contract, b.version)));
        Ok(listed)
    }

    /// Keys that have a tombstone and still have a seed: a destruction that did not finish.
    /// [`KeyStore::open`] finishes them; `verify-audit` reports any it finds.
    pub fn undestroyed(&self) -> Result<Vec<(String, u32)>> {
        let mut left = Vec::new();
        for (contract, version, kind) in self.entries()? {
            if matches!(kind, Entry::Seed) && self.tombstone(&contract, version)?.is_some() {
                left.push((contract, version));
            }
        }
        Ok(left)
    }

    fn finish_destructions(&self) -> Result<()> {
        for (contract, version) in self.undestroyed()? {
            self.shred(&self.path(&contract, version, SEED)?)?;
        }
        Ok(())
    }

    fn cached(&self, id: &(String, u32)) -> Option<CollaborationKey> {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    fn derive(&self, seed: &Seed) -> CollaborationKey {
        self.secret
            .collaboration_key(&seed.contract, seed.version, &seed.bytes)
    }

    fn read_seed(&self, contract: &str, version: u32) -> Result<Option<Seed>> {
        let path = self.path(contract, version, SEED)?;
        if !path.exists() {
            return Ok(None);
        }
        let text = files::read_config_file(&path)?;
        let file: SeedFile = serde_json::from_str(&text)
            .map_err(|e| storage(&path, &format!("not a key seed ({e})")))?;
        let bytes: [u8; 32] = hex::decode(&file.seed)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| storage(&path, "the seed is not 64 hex digits"))?;
        if file.contract != contract || file.version != version {
            return Err(storage(&path, "names another contract or version"));
        }
        Ok(Some(Seed {
            contract: file.contract,
            version,
            created: file.created,
            bytes,
        }))
    }

    /// Makes a seed from the operating system's random source. Written to a temporary file and
    /// linked into place, so two processes making the same key at once (the service and
    /// `cleanroom export-key`) end with one seed: the loser reads the winner's.
    fn make_seed(&self, contract: &str, version: u32, now: DateTime<Utc>) -> Result<Seed> {
        use rand::TryRngCore as _;
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng
            .try_fill_bytes(&mut bytes)
            .map_err(|e| Error::Storage(format!("no randomness for a new key: {e}")))?;
        let path = self.path(contract, version, SEED)?;
        let body = serde_json::to_vec_pretty(&SeedFile {
            contract: contract.to_string(),
            version,
            created: now,
            seed: hex::encode(bytes),
        })
        .expect("a seed file serializes");
        let tmp = files::temporary_beside(&path);
        write_private(&tmp, &body)?;
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => files::sync_dir(&self.dir)?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(storage(&path, &e.kind().to_string())),
        }
        self.read_seed(contract, version)?
            .ok_or_else(|| storage(&path, "vanished while it was made"))
    }

    /// Overwrites a seed file with zeros, syncs it, removes it and syncs the directory. (On a
    /// copy-on-write or journalled file system the old blocks may survive the overwrite; the
    /// removal from the store, and from its backups, is what counts.)
    fn shred(&self, path: &Path) -> Result<()> {
        use std::io::Write as _;
        let len = match std::fs::metadata(path) {
            Ok(meta) => meta.len() as usize,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(storage(path, &e.kind().to_string())),
        };
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|mut f| f.write_all(&vec![0u8; len]).and_then(|_| f.sync_all()))
            .and_then(|_| std::fs::remove_file(path))
            .map_err(|e| storage(path, &e.kind().to_string()))?;
        files::sync_dir(&self.dir)
    }

    fn path(&self, contract: &str, version: u32, ending: &str) -> Result<PathBuf> {
        check_contract_id(contract)?;
        Ok(self.dir.join(format!("{contract}.v{version}{ending}")))
    }

    /// The store's seeds and tombstones by contract and version. Temporary files are skipped:
    /// one may be another process's seed about to be linked into place.
    fn entries(&self) -> Result<Vec<(String, u32, Entry)>> {
        let read = std::fs::read_dir(&self.dir).map_err(|e| storage(&self.dir, &e.to_string()))?;
        let mut found = Vec::new();
        for entry in read {
            let entry = entry.map_err(|e| storage(&self.dir, &e.to_string()))?;
            if let Some(parsed) = parse_name(&entry.file_name().to_string_lossy()) {
                found.push(parsed);
            }
        }
        Ok(found)
    }

    /// Removes temporary files a crash left before they were linked into place. Only old ones:
    /// a young one may be another process's seed being made right now.
    fn remove_stale_temporaries(&self) -> Result<()> {
        let read = std::fs::read_dir(&self.dir).map_err(|e| storage(&self.dir, &e.to_string()))?;
        for entry in read.flatten() {
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > std::time::Duration::from_secs(600));
            if stale
                && entry
                    .file_name()
                    .to_string_lossy()
                    .ends_with(TEMPORARY_SUFFIX)
            {
                self.shred(&entry.path())?;
            }
        }
        Ok(())
    }
}

const SEED: &str = ".seed";
const TOMBSTONE: &str = ".destroyed";

enum Entry {
    Seed,
    Tombstone,
}

struct Seed {
    contract: String,
    version: u32,
    created: DateTime<Utc>,
    bytes: [u8; 32],
}

fn parse_name(name: &str) -> Option<(String, u32, Entry)> {
    let (stem, kind) = if let Some(stem) = name.strip_suffix(SEED) {
        (stem, Entry::Seed)
    } else {
        (name.strip_suffix(TOMBSTONE)?, Entry::Tombstone)
    };
    let (contract, version) = stem.rsplit_once(".v")?;
    Some((contract.to_string(), version.parse().ok()?, kind))
}

/// A key's public id: the first 8 bytes of SHA-256 over a label and the derived key.
pub fn key_id(key: &CollaborationKey) -> String {
    let mut hash = Sha256::new();
    hash.update(b"cleanroom/key-id/v1");
    hash.update(key.export().as_bytes());
    hex::encode(&hash.finalize()[..8])
}

/// Contract ids name files of the key store: letters, digits, `_` and `-` only.
pub fn check_contract_id(contract: &str) -> Result<()> {
    let fits = !contract.is_empty()
        && contract.len() <= 64
        && contract
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if fits {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "contract id `{}`: use 1 to 64 letters, digits, `_` or `-`",
            crate::files::excerpt(contract)
        )))
    }
}

/// A lock of a key cache: a poisoned one still holds whole keys.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn storage(path: &Path, why: &str) -> Error {
    Error::Storage(format!("{}: {why}", path.display()))
}

/// Makes the store's directory, or closes an existing one to everyone but its owner.
fn make_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .and_then(|_| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| storage(dir, &e.kind().to_string()))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_all()))
        .map_err(|e| {
            let _ = std::fs::remove_file(path);
            storage(path, &e.kind().to_string())
        })
}

mod rotation;
pub use rotation::Retiring;

#[cfg(test)]
mod tests;
