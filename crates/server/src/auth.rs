//! Authentication: a bearer token on every call maps to one principal. Only the SHA-256 of each
//! token is configured, so the rules file never holds a usable credential.

use std::collections::HashMap;

use cleanroom_core::rules::{Role, Rules};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Name, for the audit trail.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// For partners: which one.
    pub partner: Option<String>,
    /// The client certificate (SHA-256 of its DER) the caller must present, if bound to one.
    client_cert_sha256: Option<String>,
}

/// Token hashes to principals.
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    by_token_hash: HashMap<String, Principal>,
}

/// The SHA-256 (hex) of a bearer token, as the rules file stores it.
pub fn token_sha256(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Authenticator {
    /// Builds the table from the rules.
    pub fn new(rules: &Rules) -> Self {
        let by_token_hash = rules
            .principals
            .iter()
            .map(|p| {
                (
                    p.token_sha256.clone(),
                    Principal {
                        name: p.name.clone(),
                        role: p.role,
                        partner: p.partner.clone(),
                        client_cert_sha256: p.client_cert_sha256.clone(),
                    },
                )
            })
            .collect();
        Self { by_token_hash }
    }

    /// The principal behind a request: its `authorization: Bearer <token>` metadata, and for a
    /// principal bound to a client certificate, that certificate presented over mutual TLS.
    pub fn principal<T>(&self, request: &tonic::Request<T>) -> Result<Principal> {
        let principal = self.bearer(request.metadata())?;
        if let Some(bound) = &principal.client_cert_sha256 {
            let presented = request
                .peer_certs()
                .and_then(|certs| certs.first().map(|c| crate::tls::cert_sha256(c)));
            if presented.as_ref() != Some(bound) {
                return Err(Error::Unauthenticated(
                    "this token is bound to a client certificate, which the connection did not \
                     present"
                        .into(),
                ));
            }
        }
        Ok(principal)
    }

    fn bearer(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Principal> {
        let header = metadata
            .get("authorization")
            .ok_or_else(|| {
                Error::Unauthenticated("missing `authorization: Bearer <token>` metadata".into())
            })?
            .to_str()
            .map_err(|_| Error::Unauthenticated("malformed authorization metadata".into()))?;
        let token = header.strip_prefix("Bearer ").ok_or_else(|| {
            Error::Unauthenticated("authorization must be `Bearer <token>`".into())
        })?;
        self.by_token_hash
            .get(&token_sha256(token.trim()))
            .cloned()
            .ok_or_else(|| Error::Unauthenticated("unknown bearer token".into()))
    }
}

impl Principal {
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
