//! TLS for every listener: a rustls `ServerConfig` (ring provider, TLS 1.2 and 1.3 only)
//! whose certificate is chosen by SNI per hosted domain with a default fallback, read
//! from PEM with `rustls-pki-types`, and reloaded when the files change.
//! Does no socket I/O itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no certificate found in PEM")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no private key found in PEM")]
    NoKey { path: PathBuf },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("certificate {cert} does not match key {key}: {message}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error("generating a self-signed certificate: {0}")]
    Generate(String),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A certificate chain and key as files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Installs the ring provider as the process default; call once at start.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Writes a self-signed certificate for `hostname` to `paths` unless both files exist
/// (key file mode 0600). Returns true when it made one.
pub fn ensure_self_signed(paths: &CertPaths, hostname: &str) -> Result<bool, TlsError> {
    let _ = (paths, hostname);
    todo!()
}

/// The server's TLS state: the acceptor config and what is needed to reload it.
pub struct TlsManager {
    default: CertPaths,
    domains: BTreeMap<String, CertPaths>,
}

impl TlsManager {
    /// Loads every certificate; any error stops start-up.
    pub fn load(
        default: CertPaths,
        domains: BTreeMap<String, CertPaths>,
    ) -> Result<TlsManager, TlsError> {
        let _ = (&default, &domains);
        todo!()
    }

    /// The rustls config every listener shares (the SNI resolver inside is hot-swapped).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        todo!()
    }

    /// Re-reads certificate files whose modification time changed; a broken new file
    /// keeps the old certificate and returns the error. Returns how many were replaced.
    pub fn reload_changed(&self) -> Result<usize, TlsError> {
        todo!()
    }

    /// Not-after of every loaded certificate, by name ("default" or the domain), as Unix
    /// seconds, for expiry metrics.
    pub fn expiry(&self) -> Vec<(String, i64)> {
        todo!()
    }

    /// Paths being watched.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(self.default.cert.as_path())
            .chain(self.domains.values().map(|p| p.cert.as_path()))
    }
}

/// How often `serve` polls certificate files for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(10);
