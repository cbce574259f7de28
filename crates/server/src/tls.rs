//! TLS for both ports, through rustls (no OpenSSL): the server's certificate and key, and
//! optionally a CA whose client certificates the service accepts (mutual TLS). A client
//! certificate is never required to connect, so a reviewer's browser still reaches the page;
//! a principal bound to a certificate in the rules is refused without it ([`crate::auth`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;

use crate::{Error, Result};

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the service's TLS material lives.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The server's certificate chain (PEM).
    pub cert: PathBuf,
    /// The server's private key (PEM).
    pub key: PathBuf,
    /// CA certificates whose client certificates are accepted (PEM); none: no client certificates.
    pub client_ca: Option<PathBuf>,
}

/// Loaded and checked TLS material.
#[derive(Clone)]
pub struct Tls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Tls")
            .field("client_ca", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

fn config_error(path: &Path, what: &str) -> Error {
    Error::Internal(format!("TLS: {}: {what}", path.display()))
}

/// Reads a PEM file as every configuration file is read: a regular file (no symlink, device or
/// FIFO, even one swapped in after the check), at most 1 MiB.
fn read_pem(path: &Path) -> Result<Vec<u8>> {
    cleanroom_core::files::read_config_file(path)
        .map(String::into_bytes)
        .map_err(|e| Error::Internal(format!("TLS: {e}")))
}

fn certificates(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| config_error(path, "not a PEM certificate file"))?;
    if certs.is_empty() {
        return Err(config_error(path, "holds no certificate"));
    }
    Ok(certs)
}

impl Tls {
    /// Reads and checks the files: each parses, and the key belongs to the certificate.
    pub fn load(files: &TlsFiles) -> Result<Self> {
        let tls = Self {
            cert_pem: read_pem(&files.cert)?,
            key_pem: read_pem(&files.key)?,
            client_ca_pem: files.client_ca.as_deref().map(read_pem).transpose()?,
        };
        certificates(&tls.cert_pem, &files.cert)?;
        PrivateKeyDer::from_pem_slice(&tls.key_pem)
            .map_err(|_| config_error(&files.key, "not a PEM private key"))?;
        if let (Some(pem), Some(path)) = (&tls.client_ca_pem, &files.client_ca) {
            certificates(pem, path)?;
        }
        tls.check()?;
        Ok(tls)
    }

    /// TLS material already in memory (PEM), checked the same way.
    pub fn from_pem(cert: &[u8], key: &[u8], client_ca: Option<&[u8]>) -> Result<Self> {
        let tls = Self {
            cert_pem: cert.to_vec(),
            key_pem: key.to_vec(),
            client_ca_pem: client_ca.map(<[u8]>::to_vec),
        };
        tls.check()?;
        Ok(tls)
    }

    fn check(&self) -> Result<()> {
        self.page_config()
            .map(|_| ())
            .map_err(|e| Error::Internal(format!("TLS: {e}")))
    }

    /// The gRPC server's TLS configuration.
    pub fn grpc(&self) -> tonic::transport::ServerTlsConfig {
        let identity = tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem);
        let config = tonic::transport::ServerTlsConfig::new()
            .identity(identity)
            .timeout(HANDSHAKE_TIMEOUT);
        match &self.client_ca_pem {
            Some(ca) => config
                .client_ca_root(tonic::transport::Certificate::from_pem(ca))
                .client_auth_optional(true),
            None => config,
        }
    }

    /// The review page's rustls configuration (HTTP/1.1).
    fn page_config(&self) -> std::result::Result<ServerConfig, String> {
        let certs = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| e.to_string())?;
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match &self.client_ca_pem {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(ca) {
                    roots
                        .add(cert.map_err(|e| e.to_string())?)
                        .map_err(|e| e.to_string())?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| e.to_string())?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| format!("the key does not match the certificate: {e}"))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    /// Accepts TLS connections on `listener` for the review page. Handshakes run in their own
    /// tasks, each bounded by [`HANDSHAKE_TIMEOUT`], so a slow or failing client delays no one.
    pub fn page_listener(&self, listener: TcpListener) -> Result<TlsListener> {
        let acceptor = TlsAcceptor::from(Arc::new(
            self.page_config()
                .map_err(|e| Error::Internal(format!("TLS: {e}")))?,
        ));
        let local = listener
            .local_addr()
            .map_err(|e| Error::Internal(e.to_string()))?;
        let (tx, rx) = mpsc::channel(64);
        let accepting = tokio::spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
                    match handshake.await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "review page: TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "review page: TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener {
            rx,
            local,
            accepting,
        })
    }
}

/// TLS connections for axum, handshakes done.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    accepting: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(accepted) => accepted,
            // The accepting task only ends when the listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// The SHA-256 (hex) of a DER certificate: how the rules bind a principal to a client certificate.
pub fn cert_sha256(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Key and certificate files are read as every configuration file is: a symlink (here to a
    /// readable key) or a FIFO in their place is refused, never followed or waited on.
    #[test]
    fn certificate_and_key_files_are_regular_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.key");
        std::fs::write(&real, "not a key").unwrap();
        let link = dir.path().join("server.key");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let files = TlsFiles {
            cert: dir.path().join("server.pem"),
            key: link,
            client_ca: None,
        };
        std::fs::write(&files.cert, "not a certificate").unwrap();
        let refused = Tls::load(&files).expect_err("a symlinked key is refused");
        assert!(
            refused.to_string().contains("not a regular file"),
            "{refused}"
        );
        let fifo = dir.path().join("fifo.pem");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.unwrap().success());
        let files = TlsFiles {
            cert: fifo,
            key: real,
            client_ca: None,
        };
        let refused = Tls::load(&files).expect_err("a FIFO is refused");
        assert!(
            refused.to_string().contains("not a regular file"),
            "{refused}"
        );
    }
}
