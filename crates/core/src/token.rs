//! Keyed match tokens: one HMAC-SHA256 key per collaboration, derived with HKDF-SHA256 from the
//! retailer's master secret and the collaboration's random seed in the key store
//! ([`crate::keys`]), and keyed pseudonyms for the retailer's own member ids.
//!
//! Tokens carry their key version so a key can rotate while old and new tokens overlap. Without the
//! collaboration key a token cannot be tested against a guessed email, and ending a collaboration
//! (destroying its seed) makes its tokens unlinkable, even to the holder of the master secret.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::{Error, Result};

type HmacSha256 = Hmac<Sha256>;

/// The shortest master secret accepted: HKDF needs as much entropy as the keys it derives.
pub const MIN_MASTER_SECRET_BYTES: usize = 32;

/// The retailer's master secret. It lives only in memory; `Debug` never prints it.
#[derive(Clone)]
pub struct MasterSecret(Vec<u8>);

impl std::fmt::Debug for MasterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterSecret(..)")
    }
}

impl MasterSecret {
    /// Wraps raw secret bytes, refusing secrets too short to derive keys from.
    pub fn new(bytes: Vec<u8>) -> Result<Self> {
        if bytes.len() < MIN_MASTER_SECRET_BYTES {
            return Err(Error::Config(format!(
                "master secret must be at least {MIN_MASTER_SECRET_BYTES} bytes, got {}",
                bytes.len()
            )));
        }
        Ok(Self(bytes))
    }

    /// Parses a hex-encoded secret, as kept in `CLEANROOM_MASTER_SECRET` or a key file.
    pub fn from_hex(text: &str) -> Result<Self> {
        let bytes = hex::decode(text.trim())
            .map_err(|_| Error::Config("master secret is not valid hex".into()))?;
        Self::new(bytes)
    }

    fn derive(&self, salt: &[u8], info: &[u8]) -> [u8; 32] {
        let mut okm = [0u8; 32];
        Hkdf::<Sha256>::new(Some(salt), &self.0)
            .expand(info, &mut okm)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        okm
    }

    /// Derives the match key of one collaboration at one key version from the master secret and
    /// that key's random seed in the key store ([`crate::keys`]): without the seed the master
    /// secret derives nothing, so destroying the seed makes the key, and every token made with
    /// it, unrecoverable. The collaboration and version are the HKDF info, so a seed copied to
    /// another collaboration's name gives another key.
    pub fn collaboration_key(
        &self,
        collaboration_id: &str,
        version: u32,
        seed: &[u8; 32],
    ) -> CollaborationKey {
        let info = format!("cleanroom/match-key/{collaboration_id}/v{version}");
        CollaborationKey::new(version, self.derive(seed, info.as_bytes()))
    }

    /// Derives the data key of one collaboration at one key version: the key everything stored
    /// for that collaboration is sealed with (its member tokens and list versions as encrypted
    /// Parquet, its stored answers with AES-256-GCM). From the same seed as the match key under
    /// another HKDF label, so destroying the seed makes those files unreadable too, even to the
    /// holder of the master secret with a backup of the data directory.
    pub fn data_key(&self, collaboration_id: &str, version: u32, seed: &[u8; 32]) -> DataKey {
        let info = format!("cleanroom/data-key/{collaboration_id}/v{version}");
        DataKey(self.derive(seed, info.as_bytes()))
    }

    /// The key of the audit trail's chain and checkpoints: without the master secret nobody can
    /// extend, rewrite or re-anchor the trail so that it still verifies.
    pub fn audit_key(&self) -> [u8; 32] {
        self.derive(b"cleanroom/audit", b"chain/v1")
    }

    /// The key that turns retailer member ids into pseudonyms. It is separate from every
    /// collaboration key, so a partner holding its key learns nothing about member pseudonyms.
    pub fn pseudonym_key(&self) -> PseudonymKey {
        PseudonymKey(Keyed::new(
            &self.derive(b"cleanroom/member-pseudonym", b"v1"),
        ))
    }

    /// The key of one use's member digests (`receipts`, `erasure`): keyed hashes of a member's
    /// pseudonym that files kept apart from the tables hold instead of it. Each use has its own
    /// key, separate from the pseudonym key, so the engine's pseudonym (the key every table joins
    /// on) appears in none of those files, and a digest of one use matches nothing of another:
    /// once a member is erased from the tables, what remains names them only to whoever holds the
    /// master secret and asks with their member id.
    pub fn member_digest_key(&self, purpose: &str) -> MemberDigestKey {
        MemberDigestKey(Keyed::new(&self.derive(
            b"cleanroom/member-digest",
            format!("{purpose}/v1").as_bytes(),
        )))
    }

    /// A key of the guard's own, for one use (`noise`, `fingerprint`): seeds of sticky noise and
    /// the keyed hashes inside member-set fingerprints. Separate from every other key, so neither
    /// a leaked fingerprint store nor a partner's match key helps to predict the other.
    pub fn guard_key(&self, purpose: &str) -> [u8; 32] {
        self.derive(b"cleanroom/guard", format!("{purpose}/v1").as_bytes())
    }
}

/// A collaboration's data key (AES-256). It lives only in memory; `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct DataKey([u8; 32]);

impl DataKey {
    /// The key's bytes, for the cipher that seals a file.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

/// An HMAC-SHA256 key with its padded key blocks already hashed: each MAC clones this state
/// instead of hashing the key again, which halves the work for an identifier (two compressions
/// of SHA-256 instead of four) when millions of member ids and e-mails are hashed in an ingest.
#[derive(Clone)]
struct Keyed(HmacSha256);

impl Keyed {
    fn new(key: &[u8; 32]) -> Self {
        Self(HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length"))
    }

    fn mac(&self, data: &[u8]) -> [u8; 32] {
        let mut mac = self.0.clone();
        mac.update(data);
        mac.finalize().into_bytes().into()
    }
}

/// One collaboration's HMAC key at one version.
#[derive(Clone)]
pub struct CollaborationKey {
    /// The key version that tokens made with this key carry.
    pub version: u32,
    key: [u8; 32],
    keyed: Keyed,
}

impl PartialEq for CollaborationKey {
    fn eq(&self, other: &Self) -> bool {
        self.version == other.version && self.key == other.key
    }
}

impl Eq for CollaborationKey {}

impl std::fmt::Debug for CollaborationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CollaborationKey(v{}, ..)", self.version)
    }
}

impl CollaborationKey {
    /// Rebuilds a key from its exported form (`v<version>.<hex>`), as `cleanroom prep` reads it.
    pub fn from_export(text: &str) -> Result<Self> {
        let bad =
            || Error::Input("collaboration key must look like v<version>.<64 hex digits>".into());
        let (version, hex_key) = text.trim().split_once('.').ok_or_else(bad)?;
        let version = version
            .strip_prefix('v')
            .and_then(|v| v.parse().ok())
            .ok_or_else(bad)?;
        let key: [u8; 32] = hex::decode(hex_key)
            .ok()
            .and_then(|k| k.try_into().ok())
            .ok_or_else(bad)?;
        Ok(Self::new(version, key))
    }

    fn new(version: u32, key: [u8; 32]) -> Self {
        Self {
            version,
            key,
            keyed: Keyed::new(&key),
        }
    }

    /// The exported form handed to a partner that hashes its list locally.
    pub fn export(&self) -> String {
        format!("v{}.{}", self.version, hex::encode(self.key))
    }

    /// Computes the token of one normalized identifier.
    pub fn token(&self, normalized: &str) -> Token {
        Token {
            version: self.version,
            mac: self.keyed.mac(normalized.as_bytes()),
        }
    }
}

/// HMAC-SHA256 of `data` under `key`, the key hashed anew (for one-off MACs: keys that hash
/// millions of identifiers keep their hashed key blocks instead).
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// A versioned match token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token {
    /// Version of the collaboration key that made it.
    pub version: u32,
    /// The HMAC-SHA256 of the normalized identifier.
    pub mac: [u8; 32],
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "v{}.{}", self.version, URL_SAFE_NO_PAD.encode(self.mac))
    }
}

impl std::str::FromStr for Token {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let bad = || Error::Input("token must look like v<version>.<base64url HMAC>".into());
        let (version, mac) = text.trim().split_once('.').ok_or_else(bad)?;
        let version = version
            .strip_prefix('v')
            .and_then(|v| v.parse().ok())
            .ok_or_else(bad)?;
        let mac: [u8; 32] = URL_SAFE_NO_PAD
            .decode(mac)
            .ok()
            .and_then(|m| m.try_into().ok())
            .ok_or_else(bad)?;
        Ok(Self { version, mac })
    }
}

/// The key that maps a retailer member id to its pseudonym.
#[derive(Clone)]
pub struct PseudonymKey(Keyed);

impl PseudonymKey {
    /// The pseudonym of one member: the first 8 bytes of a keyed hash of the member id. It is the
    /// only member key the engine ever sees; at 2^64 values, collisions among millions of members
    /// are vanishingly rare.
    pub fn pseudonym(&self, member_id: &str) -> i64 {
        let mac = self.0.mac(member_id.trim().as_bytes());
        i64::from_be_bytes(mac[..8].try_into().expect("8 bytes"))
    }
}

/// The key of one use's member digests ([`MasterSecret::member_digest_key`]).
#[derive(Clone)]
pub struct MemberDigestKey(Keyed);

impl MemberDigestKey {
    /// The digest of the member with pseudonym `pseudonym`: the first 8 bytes of a keyed hash of
    /// it, as the pseudonym is of the member id.
    pub fn digest(&self, pseudonym: i64) -> i64 {
        let mac = self.0.mac(&pseudonym.to_be_bytes());
        i64::from_be_bytes(mac[..8].try_into().expect("8 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> MasterSecret {
        MasterSecret::new(vec![7u8; 32]).unwrap()
    }

    #[test]
    fn collaborations_get_distinct_keys_and_versions_rotate() {
        let s = secret();
        let seed = [3u8; 32];
        let a1 = s.collaboration_key("ctr-a", 1, &seed);
        assert_ne!(a1, s.collaboration_key("ctr-b", 1, &seed));
        assert_ne!(a1, s.collaboration_key("ctr-a", 2, &seed));
        assert_ne!(a1, s.collaboration_key("ctr-a", 1, &[4u8; 32]));
        assert_eq!(a1, s.collaboration_key("ctr-a", 1, &seed));
        let other = MasterSecret::new(vec![8u8; 32]).unwrap();
        assert_ne!(a1, other.collaboration_key("ctr-a", 1, &seed));
    }

    #[test]
    fn token_and_key_round_trip_through_text() {
        let key = secret().collaboration_key("ctr-a", 3, &[3u8; 32]);
        assert_eq!(CollaborationKey::from_export(&key.export()).unwrap(), key);
        let token = key.token("user@example.com");
        assert_eq!(token.to_string().parse::<Token>().unwrap(), token);
        assert!(token.to_string().starts_with("v3."));
    }

    #[test]
    fn member_digests_differ_from_the_pseudonym_and_between_uses() {
        let s = secret();
        let pseudonym = s.pseudonym_key().pseudonym("M000001");
        let receipts = s.member_digest_key("receipts").digest(pseudonym);
        let erasure = s.member_digest_key("erasure").digest(pseudonym);
        assert_ne!(receipts, pseudonym);
        assert_ne!(erasure, pseudonym);
        assert_ne!(receipts, erasure);
        assert_eq!(receipts, s.member_digest_key("receipts").digest(pseudonym));
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(matches!(
            MasterSecret::new(vec![1; 16]),
            Err(Error::Config(_))
        ));
    }
}

#[cfg(test)]
mod fuzz;
