//! Authentication: a bearer token on every call maps to one principal, optionally bound to a
//! client certificate. The rules never hold a usable credential:
//! - a token minted by `cleanroom token new` is `cr1.<id>.<secret>`, 256 random bits of secret;
//!   the rules keep its public id and an Argon2id hash of the secret, so a stolen rules file does
//!   not let anyone test guesses cheaply. A verified token is remembered (by its SHA-256, in
//!   memory only) so Argon2 runs once per token and configuration, and failed guesses against
//!   one id are limited per minute;
//! - the demo form keeps the SHA-256 of a token of any length; `cleanroom serve` refuses it
//!   unless told the deployment is a demo.

use std::collections::HashMap;
use std::sync::Mutex;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine as _;
use cleanroom_core::rules::{Role, Rules};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tonic::codegen::http::HeaderMap;

use crate::{Error, Result};

/// The prefix of a minted token.
const MINTED_PREFIX: &str = "cr1";

/// Failed secrets accepted per token id per minute before the id is refused unchecked.
const MAX_FAILURES_PER_MINUTE: usize = 10;

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Principal {
    /// Name, for the audit trail.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// For partners: which one.
    pub partner: Option<String>,
    /// The client certificate (SHA-256 of its DER) the caller must present, if bound to one.
    client_cert_sha256: Option<String>,
    /// The call's place among the principal's calls in flight, held while the principal is.
    slot: Option<std::sync::Arc<crate::limit::CallSlot>>,
}

impl PartialEq for Principal {
    fn eq(&self, other: &Self) -> bool {
        (
            &self.name,
            self.role,
            &self.partner,
            &self.client_cert_sha256,
        ) == (
            &other.name,
            other.role,
            &other.partner,
            &other.client_cert_sha256,
        )
    }
}

impl Eq for Principal {}

/// The SHA-256 (hex) of a bearer token, as the demo form of the rules stores it.
pub fn token_sha256(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A freshly minted token and what the rules keep of it.
#[derive(Debug, Clone)]
pub struct MintedToken {
    /// The token, shown once to whoever will use it.
    pub token: String,
    /// Its public id (`token_id` in the rules).
    pub id: String,
    /// Argon2id of its secret (`token_hash` in the rules).
    pub hash: String,
}

/// Mints a token: a 64-bit public id and a 256-bit secret, both from the operating system's
/// random source.
pub fn mint_token() -> Result<MintedToken> {
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    let mut salt = [0u8; 16];
    let mut rng = rand::rng();
    rng.fill_bytes(&mut id);
    rng.fill_bytes(&mut secret);
    rng.fill_bytes(&mut salt);
    let id = hex::encode(id);
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
    let salt = SaltString::encode_b64(&salt).map_err(|e| Error::Internal(e.to_string()))?;
    let hash = Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map_err(|e| Error::Internal(format!("hashing the token: {e}")))?
        .to_string();
    Ok(MintedToken {
        token: format!("{MINTED_PREFIX}.{id}.{secret}"),
        id,
        hash,
    })
}

/// Tokens to principals, from the rules.
#[derive(Debug, Default)]
pub struct Authenticator {
    by_token_sha256: HashMap<String, Principal>,
    by_id: HashMap<String, (String, Principal)>,
    verified: Mutex<HashMap<String, Principal>>,
    failures: crate::limit::PerMinute,
}

impl Authenticator {
    /// Builds the table from the rules. With `allow_demo_tokens` false, a principal in the demo
    /// form (a bare SHA-256 of a token of unknown strength) is refused, naming it.
    pub fn new(rules: &Rules, allow_demo_tokens: bool) -> Result<Self> {
        let mut auth = Self::default();
        for p in &rules.principals {
            let principal = Principal {
                name: p.name.clone(),
                role: p.role,
                partner: p.partner.clone(),
                client_cert_sha256: p.client_cert_sha256.clone(),
                slot: None,
            };
            match (&p.token_id, &p.token_hash, &p.token_sha256) {
                (Some(id), Some(hash), _) => {
                    PasswordHash::new(hash).map_err(|_| {
                        Error::Internal(format!(
                            "principal `{}`: token_hash does not parse",
                            p.name
                        ))
                    })?;
                    auth.by_id.insert(id.clone(), (hash.clone(), principal));
                }
                (_, _, Some(sha)) if allow_demo_tokens => {
                    auth.by_token_sha256.insert(sha.clone(), principal);
                }
                (_, _, Some(_)) => {
                    return Err(Error::Internal(format!(
                        "principal `{}` has a demo token (token_sha256: a hash of a token of \
                         unknown strength, such as the published sample tokens); mint one with \
                         `cleanroom token new`, or start with --allow-demo-tokens for a demo",
                        p.name
                    )));
                }
                _ => {
                    return Err(Error::Internal(format!(
                        "principal `{}` has no token",
                        p.name
                    )));
                }
            }
        }
        Ok(auth)
    }

    /// The principal behind `token` when it is known without running Argon2: a demo-form token,
    /// or a minted token verified before under this configuration.
    pub fn known(&self, token: &str) -> Option<Principal> {
        let digest = token_sha256(token);
        if let Some(principal) = self.by_token_sha256.get(&digest) {
            return Some(principal.clone());
        }
        self.verified
            .lock()
            .expect("auth lock poisoned")
            .get(&digest)
            .cloned()
    }

    /// The principal behind `token`, checking a minted token's secret with Argon2 (slow by
    /// design: run it off the async workers). Failed secrets are limited per token id.
    pub fn verify(&self, token: &str) -> Result<Principal> {
        if let Some(principal) = self.known(token) {
            return Ok(principal);
        }
        let unknown = || Error::Unauthenticated("unknown bearer token".into());
        let mut parts = token.splitn(3, '.');
        let (Some(MINTED_PREFIX), Some(id), Some(secret)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(unknown());
        };
        let (hash, principal) = self.by_id.get(id).ok_or_else(unknown)?;
        self.limit_failures(id)?;
        let parsed = PasswordHash::new(hash).map_err(|_| unknown())?;
        if Argon2::default()
            .verify_password(secret.as_bytes(), &parsed)
            .is_err()
        {
            self.record_failure(id);
            return Err(unknown());
        }
        self.verified
            .lock()
            .expect("auth lock poisoned")
            .insert(token_sha256(token), principal.clone());
        Ok(principal.clone())
    }

    /// Refuses, without running Argon2, an id that failed too often in the last minute.
    fn limit_failures(&self, id: &str) -> Result<()> {
        self.failures
            .admit(id, MAX_FAILURES_PER_MINUTE, false)
            .map_err(|wait| {
                cleanroom_core::Error::Limit(format!(
                    "too many failed tokens for this id; retry in {wait} s"
                ))
                .into()
            })
    }

    fn record_failure(&self, id: &str) {
        self.failures.record(id);
    }
}

/// The bearer token of a call's `authorization: Bearer <token>` header (gRPC metadata, or the
/// review page's HTTP header).
pub fn bearer_token(headers: &HeaderMap) -> Result<String> {
    let header = headers
        .get("authorization")
        .ok_or_else(|| {
            Error::Unauthenticated("missing `authorization: Bearer <token>` metadata".into())
        })?
        .to_str()
        .map_err(|_| Error::Unauthenticated("malformed authorization metadata".into()))?;
    let token = header
        .strip_prefix("Bearer ")
        .ok_or_else(|| Error::Unauthenticated("authorization must be `Bearer <token>`".into()))?;
    Ok(token.trim().to_string())
}

impl Principal {
    /// The principal, if the connection presented the client certificate (SHA-256 of its DER)
    /// that it is bound to, or it is bound to none.
    pub fn bound_to(self, presented: Option<&str>) -> Result<Self> {
        match &self.client_cert_sha256 {
            Some(bound) if presented != Some(bound.as_str()) => Err(Error::Unauthenticated(
                "this token is bound to a client certificate, which the connection did not \
                 present"
                    .into(),
            )),
            _ => Ok(self),
        }
    }

    /// The principal holding `slot` for as long as it (or a clone) lives.
    pub(crate) fn holding(mut self, slot: crate::limit::CallSlot) -> Self {
        self.slot = Some(std::sync::Arc::new(slot));
        self
    }

    /// Refuses a principal whose role is not `role`.
    pub fn require(&self, role: Role, method: &str) -> Result<()> {
        if self.role == role {
            Ok(())
        } else {
            Err(cleanroom_core::Error::Permission(format!(
                "{method} is for the {} role; the caller is {}",
                role.as_str(),
                self.role.as_str()
            ))
            .into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minted_token_is_strong_and_only_its_hash_is_kept() {
        let minted = mint_token().unwrap();
        let secret = minted.token.rsplit('.').next().unwrap();
        let bits = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(secret)
            .unwrap()
            .len()
            * 8;
        assert!(bits >= 128, "{bits} bits");
        assert!(minted.hash.starts_with("$argon2id$"));
        assert!(!minted.hash.contains(secret));
        let parsed = PasswordHash::new(&minted.hash).unwrap();
        assert!(
            Argon2::default()
                .verify_password(secret.as_bytes(), &parsed)
                .is_ok()
        );
        assert!(
            Argon2::default()
                .verify_password(b"guess", &parsed)
                .is_err()
        );
    }
}
