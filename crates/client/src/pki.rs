//! A throwaway certificate authority for the demo and the tests: one CA, a server certificate for
//! the loopback names, and a client certificate per named client. Never for production: a real
//! deployment's certificates come from the retailer's own PKI, named in `[tls]`.

use std::path::Path;

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PublicKeyData as _,
};
use sha2::{Digest, Sha256};

use crate::{ClientTls, Error, Result};

/// A certificate and its private key, in PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PEM).
    pub key_pem: String,
    /// SHA-256 (hex) of the certificate's DER: how the rules bind a principal to it.
    pub cert_sha256: String,
    /// Base64 SHA-256 of its SubjectPublicKeyInfo: how a browser pins it
    /// (`--ignore-certificate-errors-spki-list`).
    pub spki_sha256_base64: String,
}

/// A CA with the certificates it issued.
#[derive(Debug, Clone)]
pub struct ThrowawayPki {
    /// The CA certificate (PEM): what clients trust and what the server checks clients against.
    pub ca_pem: String,
    /// The server's certificate.
    pub server: Issued,
    /// One client certificate per name given, in order.
    pub clients: Vec<(String, Issued)>,
}

fn pki_error(e: rcgen::Error) -> Error {
    Error::File {
        path: "(throwaway PKI)".into(),
        message: e.to_string(),
    }
}

fn issue(
    names: Vec<String>,
    common_name: &str,
    usage: ExtendedKeyUsagePurpose,
    ca: &CertifiedIssuer<'_, KeyPair>,
) -> Result<Issued> {
    let key = KeyPair::generate().map_err(pki_error)?;
    let mut params = CertificateParams::new(names).map_err(pki_error)?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, ca).map_err(pki_error)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert_sha256: hex::encode(Sha256::digest(cert.der())),
        spki_sha256_base64: base64::engine::general_purpose::STANDARD
            .encode(Sha256::digest(key.subject_public_key_info())),
    })
}

impl ThrowawayPki {
    /// A fresh CA, a server certificate for `localhost` and `127.0.0.1`, and a client
    /// certificate for each of `clients`.
    pub fn generate(clients: &[&str]) -> Result<Self> {
        Self::generate_for(&["localhost", "127.0.0.1"], clients)
    }

    /// As [`ThrowawayPki::generate`], with the server certificate for `server_names` (DNS names
    /// or IP addresses).
    pub fn generate_for(server_names: &[&str], clients: &[&str]) -> Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(pki_error)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "cleanroom throwaway CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().map_err(pki_error)?)
            .map_err(pki_error)?;
        let server = issue(
            server_names.iter().map(|n| n.to_string()).collect(),
            "cleanroom",
            ExtendedKeyUsagePurpose::ServerAuth,
            &ca,
        )?;
        let clients = clients
            .iter()
            .map(|name| {
                let issued = issue(Vec::new(), name, ExtendedKeyUsagePurpose::ClientAuth, &ca)?;
                Ok((name.to_string(), issued))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            ca_pem: ca.pem(),
            server,
            clients,
        })
    }

    /// The client certificate issued to `name`.
    pub fn client(&self, name: &str) -> Option<&Issued> {
        self.clients.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }

    /// How a client trusts this CA, optionally presenting `name`'s certificate.
    pub fn client_tls(&self, name: Option<&str>) -> ClientTls {
        ClientTls {
            ca_pem: self.ca_pem.as_bytes().to_vec(),
            identity: name.and_then(|n| self.client(n)).map(|c| {
                (
                    c.cert_pem.as_bytes().to_vec(),
                    c.key_pem.as_bytes().to_vec(),
                )
            }),
            domain: None,
        }
    }

    /// Writes `ca.pem`, `server.pem`, `server.key`, `server.spki` (the browser pin) and
    /// `<client>.pem`/`<client>.key` to `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|e| Error::File {
                path: path.display().to_string(),
                message: e.to_string(),
            })
        };
        write("ca.pem", &self.ca_pem)?;
        write("server.pem", &self.server.cert_pem)?;
        write("server.key", &self.server.key_pem)?;
        write("server.spki", &self.server.spki_sha256_base64)?;
        for (name, issued) in &self.clients {
            write(&format!("{name}.pem"), &issued.cert_pem)?;
            write(&format!("{name}.key"), &issued.key_pem)?;
        }
        Ok(())
    }
}
