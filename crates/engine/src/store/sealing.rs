//! Sealing what is stored for a collaboration with its data key ([`DataKey`], derived from the
//! collaboration's seed in the key store): its member tokens and list versions as Parquet with
//! modular encryption (footer and every column encrypted with AES-GCM), its stored answers with
//! AES-256-GCM. Once the collaboration's key is destroyed, a backup of the data directory holds
//! nothing of it that can be read, even with the master secret (docs/threats.md, THREAT 18).
//!
//! The manifest records which key sealed each file ([`KeyRef`]); the key itself is asked of the
//! key store each time a file is opened, so a destroyed key opens nothing from that moment on.

use std::sync::Arc;

use cleanroom_core::keys::KeyStore;
use cleanroom_core::token::DataKey;
use parquet::encryption::decrypt::FileDecryptionProperties;
use parquet::encryption::encrypt::FileEncryptionProperties;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The key a file was sealed with: a collaboration and one of its key versions.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KeyRef {
    /// The collaboration (contract id).
    pub contract: String,
    /// The key version.
    pub version: u32,
}

/// Where the store gets data keys: the key store, in the service and its tools.
pub trait DataKeys: Send + Sync {
    /// The data key of `key`; refused once that key was destroyed.
    fn data_key(&self, key: &KeyRef) -> cleanroom_core::Result<DataKey>;

    /// Whether a collaboration's tables must be sealed: false only for [`NoKeys`].
    fn seals(&self) -> bool {
        true
    }
}

/// No keys: a store opened by a tool without its key store, or by an engine test. Sealed
/// files cannot be read, and new files are written unsealed.
#[derive(Debug, Clone, Copy)]
pub struct NoKeys;

impl DataKeys for NoKeys {
    fn data_key(&self, key: &KeyRef) -> cleanroom_core::Result<DataKey> {
        Err(cleanroom_core::Error::Storage(format!(
            "a file sealed with the key of contract {} version {} is read only with the key \
             store it was written beside (settings: key_store)",
            key.contract, key.version
        )))
    }

    fn seals(&self) -> bool {
        false
    }
}

impl DataKeys for KeyStore {
    fn data_key(&self, key: &KeyRef) -> cleanroom_core::Result<DataKey> {
        KeyStore::data_key(self, &key.contract, key.version)
    }
}

/// A sealed file's key: which one, and where to ask for it when the file is opened.
#[derive(Clone)]
pub struct Sealed {
    /// The key that sealed it.
    pub key: KeyRef,
    keys: Arc<dyn DataKeys>,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealed({}/v{})", self.key.contract, self.key.version)
    }
}

impl PartialEq for Sealed {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for Sealed {}

impl Sealed {
    /// `key`, opened through `keys`.
    pub fn new(key: KeyRef, keys: Arc<dyn DataKeys>) -> Self {
        Self { key, keys }
    }

    fn data_key(&self) -> Result<DataKey> {
        Ok(self.keys.data_key(&self.key)?)
    }

    /// How a Parquet file sealed with this key is written.
    pub(crate) fn encryption(&self) -> Result<Arc<FileEncryptionProperties>> {
        Ok(FileEncryptionProperties::builder(self.data_key()?.bytes().to_vec()).build()?)
    }

    /// How a Parquet file sealed with this key is read.
    pub(crate) fn decryption(&self) -> Result<Arc<FileDecryptionProperties>> {
        Ok(FileDecryptionProperties::builder(self.data_key()?.bytes().to_vec()).build()?)
    }

    /// Seals `plain` with AES-256-GCM: a random nonce, then the ciphertext and its tag. `context`
    /// is authenticated, not stored: a sealed value opens only where it was sealed for.
    pub fn seal_bytes(&self, context: &[u8], plain: &[u8]) -> Result<Vec<u8>> {
        use rand::TryRngCore as _;
        let key = aead_key(&self.data_key()?)?;
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng
            .try_fill_bytes(&mut nonce)
            .map_err(|e| Error::Storage(format!("no randomness to seal with: {e}")))?;
        let mut sealed = plain.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(context),
            &mut sealed,
        )
        .map_err(|_| Error::Storage("sealing failed".into()))?;
        let mut out = nonce.to_vec();
        out.append(&mut sealed);
        Ok(out)
    }

    /// Opens what [`Sealed::seal_bytes`] sealed for `context`; refused if it was changed, sealed
    /// for another context or with another key.
    pub fn open_bytes(&self, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>> {
        let key = aead_key(&self.data_key()?)?;
        if sealed.len() < NONCE_LEN {
            return Err(Error::Storage("a sealed value is too short".into()));
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| Error::Storage("a sealed value's nonce is malformed".into()))?;
        let mut body = body.to_vec();
        let plain = key
            .open_in_place(nonce, Aad::from(context), &mut body)
            .map_err(|_| {
                Error::Storage(format!(
                    "a value sealed with the key of contract {} version {} does not open: it \
                     was changed or sealed with another key",
                    self.key.contract, self.key.version
                ))
            })?;
        Ok(plain.to_vec())
    }
}

fn aead_key(key: &DataKey) -> Result<LessSafeKey> {
    let unbound = UnboundKey::new(&AES_256_GCM, key.bytes())
        .map_err(|_| Error::Storage("a data key of the wrong length".into()))?;
    Ok(LessSafeKey::new(unbound))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct OneKey(Option<DataKey>);

    impl DataKeys for OneKey {
        fn data_key(&self, _: &KeyRef) -> cleanroom_core::Result<DataKey> {
            self.0
                .clone()
                .ok_or_else(|| cleanroom_core::Error::Precondition("destroyed".into()))
        }
    }

    fn sealed(seed: u8) -> Sealed {
        let secret = cleanroom_core::token::MasterSecret::new(vec![7; 32]).unwrap();
        let key = secret.data_key("c", 1, &[seed; 32]);
        let key_ref = KeyRef {
            contract: "c".into(),
            version: 1,
        };
        Sealed::new(key_ref, Arc::new(OneKey(Some(key))))
    }

    #[test]
    fn a_sealed_value_opens_only_with_its_key_and_context() {
        let s = sealed(1);
        let box_ = s.seal_bytes(b"answer/p/k", b"released rows").unwrap();
        assert!(!box_.windows(8).any(|w| w == b"released"));
        assert_eq!(
            s.open_bytes(b"answer/p/k", &box_).unwrap(),
            b"released rows"
        );
        assert!(s.open_bytes(b"answer/p/other", &box_).is_err());
        assert!(sealed(2).open_bytes(b"answer/p/k", &box_).is_err());
        let mut changed = box_.clone();
        *changed.last_mut().unwrap() ^= 1;
        assert!(s.open_bytes(b"answer/p/k", &changed).is_err());
        let destroyed = Sealed::new(s.key.clone(), Arc::new(OneKey(None)));
        assert!(destroyed.open_bytes(b"answer/p/k", &box_).is_err());
    }
}
