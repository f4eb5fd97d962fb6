//! TLS to Redis (`rediss://`): which certificates a node trusts and shows.
//!
//! A `rediss://` URL alone trusts the system's root certificates. A private CA
//! ([`RedisTls::ca`]) replaces them; a client certificate and key
//! ([`RedisTls::client`]) answer a server that requires mutual TLS
//! (`tls-auth-clients yes`). The files are read once, at start-up, by
//! [`RedisTls::load`], so a node with an unreadable file never starts.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Once;

use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::{ClientTlsConfig, IntoConnectionInfo, RedisResult, TlsCertificates};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The scheme of a Redis URL over TLS.
pub const TLS_SCHEME: &str = "rediss://";

/// Certificates for `rediss://` links, as PEM read from files.
#[derive(Clone, Default)]
pub struct RedisTls {
    /// CA certificates (PEM) that sign the Redis servers' certificates; `None`: the
    /// system's root certificates.
    pub ca: Option<Vec<u8>>,
    /// A client certificate chain and its key (PEM), for mutual TLS.
    pub client: Option<ClientCert>,
}

/// A client certificate chain and its private key, both PEM.
#[derive(Clone)]
pub struct ClientCert {
    /// The certificate chain.
    pub cert: Vec<u8>,
    /// The private key.
    pub key: Vec<u8>,
}

impl fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca", &self.ca.as_ref().map(|_| "<set>"))
            .field("client", &self.client.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// Why the TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A certificate file holds no PEM certificate.
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A key file holds no PEM private key.
    #[error("{} holds no PEM private key", path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
    },
}

impl RedisTls {
    /// Reads and checks the files: the CA and client certificate files must hold at
    /// least one PEM certificate, the key file a PEM private key.
    pub fn load(ca: Option<&Path>, client: Option<(&Path, &Path)>) -> Result<Self, TlsError> {
        let ca = ca.map(read_certificates).transpose()?;
        let client = match client {
            Some((cert, key)) => {
                let cert = read_certificates(cert)?;
                let key_pem = read(key)?;
                if PrivateKeyDer::from_pem_slice(&key_pem).is_err() {
                    return Err(TlsError::NoKey { path: key.into() });
                }
                Some(ClientCert { cert, key: key_pem })
            }
            None => None,
        };
        Ok(Self { ca, client })
    }

    /// Whether a CA or a client certificate is set.
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.client.is_some()
    }

    /// The certificates in the `redis` crate's terms; `None` when nothing is set.
    fn certificates(&self) -> Option<TlsCertificates> {
        self.is_set().then(|| TlsCertificates {
            client_tls: self.client.as_ref().map(|c| ClientTlsConfig {
                client_cert: c.cert.clone(),
                client_key: c.key.clone(),
            }),
            root_cert: self.ca.clone(),
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Unreadable {
        path: path.into(),
        source,
    })
}

fn read_certificates(path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = read(path)?;
    let mut certs = CertificateDer::pem_slice_iter(&pem);
    match certs.next() {
        Some(Ok(_)) if certs.all(|c| c.is_ok()) => Ok(pem),
        _ => Err(TlsError::NoCertificate { path: path.into() }),
    }
}

/// Whether `url` asks for TLS.
pub(crate) fn is_tls(url: &str) -> bool {
    url.starts_with(TLS_SCHEME)
}

/// Makes sure rustls has its crypto provider (ring) before the first TLS link.
fn install_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only if a provider is installed already, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The TCP settings of every link to Redis: `TCP_NODELAY` (redis-rs leaves Nagle's
/// algorithm on). With Nagle, a command written while an earlier one on the same
/// multiplexed connection is still unacknowledged waits in the kernel for that ACK:
/// up to a round trip when Redis is on another machine (nothing measurable on
/// loopback, BENCHMARKS.md).
pub(crate) fn tcp_settings() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

/// A client for one Redis at `url`, with the certificates if it is `rediss://`.
pub(crate) fn client(url: &str, tls: &RedisTls) -> RedisResult<redis::Client> {
    let info = url.into_connection_info()?.set_tcp_settings(tcp_settings());
    match tls.certificates() {
        Some(certs) if is_tls(url) => {
            install_provider();
            redis::Client::build_with_tls(info, certs)
        }
        _ => {
            if is_tls(url) {
                install_provider();
            }
            redis::Client::open(info)
        }
    }
}

/// A Redis Cluster client builder for `seeds`, with the certificates if the seeds
/// are `rediss://`.
pub(crate) fn cluster_builder(seeds: &[String], tls: &RedisTls) -> ClusterClientBuilder {
    let builder =
        ClusterClient::builder(seeds.iter().map(String::as_str)).tcp_settings(tcp_settings());
    if !seeds.iter().any(|s| is_tls(s)) {
        return builder;
    }
    install_provider();
    match tls.certificates() {
        Some(certs) => builder.certs(certs),
        None => builder,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_client_sends_its_commands_without_delay() {
        for url in ["redis://127.0.0.1:6379", "rediss://127.0.0.1:6380/0"] {
            let info = client(url, &RedisTls::default())
                .unwrap()
                .get_connection_info()
                .clone();
            assert!(info.tcp_settings().nodelay(), "{url}");
        }
    }
}
