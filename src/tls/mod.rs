//! TLS for every listener: a rustls `ServerConfig` (ring provider, TLS 1.2 and 1.3 only)
//! whose certificate is chosen by SNI per hosted domain with a default fallback, read
//! from PEM with `rustls-pki-types`, and reloaded when the files change; and, in
//! `self_signed.rs`, the self-signed certificate a fresh install starts with.
//! Does no socket I/O itself.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

mod self_signed;
#[cfg(test)]
mod test_support;

pub use self_signed::{ensure_self_signed, SELF_SIGNED_VALIDITY};

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

/// How many TLS 1.2 session ids / TLS 1.3 stateful sessions the server remembers.
/// rustls' default of 256 would churn at the target of ~2000 logins per second; at a
/// few hundred bytes per entry this costs a few MiB.
pub const SESSION_CACHE_SIZE: usize = 16_384;

/// The name [`TlsManager::expiry`] and [`ReloadReport`] use for the default certificate.
pub const DEFAULT_NAME: &str = "default";

/// What `reload_changed` compares to notice that a certificate file was replaced: the
/// identity of the file the path leads to (device and inode), its size, and its
/// modification and status-change times.
///
/// The identity catches replacements that keep size and mtime: a Kubernetes Secret
/// volume swaps its `..data` symlink to a new directory (`cp -p`, `tar` or a kubelet
/// restore can carry the old mtime along); the ctime, which no one can set, catches
/// in-place rewrites, including onto an inode reused from an earlier generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    device: u64,
    inode: u64,
    len: u64,
    modified: Option<SystemTime>,
    changed: (i64, i64),
}

impl FileStamp {
    fn read(path: &Path) -> Result<FileStamp, TlsError> {
        use std::os::unix::fs::MetadataExt;
        // metadata() follows symlinks, so certbot's live/ links and Kubernetes' ..data
        // swaps show up as the new target.
        let meta = fs::metadata(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(FileStamp {
            device: meta.dev(),
            inode: meta.ino(),
            len: meta.len(),
            modified: meta.modified().ok(),
            changed: (meta.ctime(), meta.ctime_nsec()),
        })
    }
}

/// One loaded certificate pair and what is needed to notice it changed on disk.
#[derive(Debug, Clone)]
struct Loaded {
    certified: Arc<CertifiedKey>,
    /// Leaf notAfter, Unix seconds.
    not_after: i64,
    /// (cert, key) as they were just before they were read: a change racing the read
    /// then shows up as a difference on the next poll rather than being missed.
    stamp: (FileStamp, FileStamp),
}

impl Loaded {
    fn load(paths: &CertPaths, provider: &CryptoProvider) -> Result<Loaded, TlsError> {
        let stamp = (FileStamp::read(&paths.cert)?, FileStamp::read(&paths.key)?);
        let chain = read_chain(&paths.cert)?;
        let key = read_key(&paths.key)?;
        let leaf = chain.first().ok_or_else(|| TlsError::NoCertificate {
            path: paths.cert.clone(),
        })?;
        let not_after = leaf_not_after(&paths.cert, leaf)?;
        let signing_key =
            provider
                .key_provider
                .load_private_key(key)
                .map_err(|e| TlsError::Pem {
                    path: paths.key.clone(),
                    message: format!("unusable private key: {e}"),
                })?;
        let certified = CertifiedKey::new(chain, signing_key);
        certified.keys_match().map_err(|e| TlsError::Mismatch {
            cert: paths.cert.clone(),
            key: paths.key.clone(),
            message: e.to_string(),
        })?;
        if not_after < unix_now() {
            tracing::warn!(cert = %paths.cert.display(), not_after, "certificate has expired");
        }
        Ok(Loaded {
            certified: Arc::new(certified),
            not_after,
            stamp,
        })
    }

    fn changed_on_disk(&self, paths: &CertPaths) -> Result<bool, TlsError> {
        Ok((FileStamp::read(&paths.cert)?, FileStamp::read(&paths.key)?) != self.stamp)
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn pem_error(path: &Path, error: pem::Error) -> TlsError {
    match error {
        pem::Error::Io(source) => TlsError::Read {
            path: path.to_path_buf(),
            source,
        },
        other => TlsError::Pem {
            path: path.to_path_buf(),
            message: other.to_string(),
        },
    }
}

/// Every CERTIFICATE block of the file, leaf first as the file has them.
pub fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(chain)
}

/// The first PKCS#8, PKCS#1 (RSA) or SEC1 (EC) key of the file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_path_buf(),
        },
        other => pem_error(path, other),
    })
}

fn leaf_not_after(path: &Path, leaf: &CertificateDer<'_>) -> Result<i64, TlsError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            message: format!("invalid certificate: {e}"),
        })?;
    Ok(cert.validity().not_after.timestamp())
}

/// Lower-case, without the trailing dot of an absolute name.
fn normalize_name(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// Everything the resolver serves, replaced as a whole on reload.
#[derive(Debug, Clone)]
struct CertSet {
    default: Loaded,
    /// Keyed by normalized domain name.
    domains: BTreeMap<String, Loaded>,
}

impl CertSet {
    /// The entry for an SNI name: the domain itself, else the nearest configured parent
    /// (so `mail.example.org` and `pop.eu.example.org` use `example.org`), else default.
    fn select(&self, server_name: Option<&str>) -> &Loaded {
        let Some(raw) = server_name else {
            return &self.default;
        };
        let name = normalize_name(raw);
        let mut candidate = name.as_str();
        loop {
            if let Some(found) = self.domains.get(candidate) {
                return found;
            }
            match candidate.split_once('.') {
                Some((_, parent)) if !parent.is_empty() => candidate = parent,
                _ => return &self.default,
            }
        }
    }
}

/// The SNI resolver inside the shared `ServerConfig`. Reload swaps the `Arc` under the
/// lock, so handshakes in flight keep the set they started with and the config itself
/// (with its session cache and ticket keys) is never rebuilt.
#[derive(Debug)]
struct SniResolver {
    current: RwLock<Arc<CertSet>>,
}

impl SniResolver {
    fn snapshot(&self) -> Arc<CertSet> {
        // Only an Arc is swapped under the lock; a poisoned lock still holds a whole set.
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn replace(&self, set: CertSet) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
    }

    fn select(&self, server_name: Option<&str>) -> Arc<CertifiedKey> {
        Arc::clone(&self.snapshot().select(server_name).certified)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.select(client_hello.server_name()))
    }
}

/// What one reload pass did, by name ([`DEFAULT_NAME`] or the domain).
#[derive(Debug, Default)]
pub struct ReloadReport {
    /// Pairs whose files changed and that now serve the new certificate.
    pub replaced: Vec<String>,
    /// Pairs that could not be read; each keeps serving its previous certificate and is
    /// tried again on the next pass.
    pub failed: Vec<(String, TlsError)>,
}

/// The server's TLS state: the acceptor config and what is needed to reload it.
#[derive(Debug)]
pub struct TlsManager {
    default: CertPaths,
    /// Keyed by normalized domain name, like `CertSet::domains`.
    domains: BTreeMap<String, CertPaths>,
    provider: Arc<CryptoProvider>,
    resolver: Arc<SniResolver>,
    config: Arc<rustls::ServerConfig>,
    /// Serializes reload passes so two of them cannot interleave their swaps.
    reload_lock: Mutex<()>,
}

impl TlsManager {
    /// Loads every certificate; any error stops start-up.
    ///
    /// Domain names are matched case-insensitively and without a trailing dot.
    pub fn load(
        default: CertPaths,
        domains: BTreeMap<String, CertPaths>,
    ) -> Result<TlsManager, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let domains: BTreeMap<String, CertPaths> = domains
            .into_iter()
            .map(|(name, paths)| (normalize_name(&name), paths))
            .collect();
        let set = CertSet {
            default: Loaded::load(&default, &provider)?,
            domains: domains
                .iter()
                .map(|(name, paths)| Ok((name.clone(), Loaded::load(paths, &provider)?)))
                .collect::<Result<_, TlsError>>()?,
        };
        let resolver = Arc::new(SniResolver {
            current: RwLock::new(Arc::new(set)),
        });

        let mut config = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&resolver) as Arc<dyn ResolvesServerCert>);
        // ALPN stays empty on purpose: rustls then ignores whatever the client offers,
        // where a non-empty list would refuse clients offering none of ours.
        config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_SIZE);
        // Stateless tickets make resumption cost no server memory; keys rotate every
        // 6 hours and are per process, so a ticket only resumes on the replica that made it.
        config.ticketer = rustls::crypto::ring::Ticketer::new()?;

        Ok(TlsManager {
            default,
            domains,
            provider,
            resolver,
            config: Arc::new(config),
            reload_lock: Mutex::new(()),
        })
    }

    /// The rustls config every listener shares (the SNI resolver inside is hot-swapped).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.config)
    }

    /// Re-reads certificate files that were replaced or changed; a broken new file
    /// keeps the old certificate and returns the error. Returns how many were replaced.
    ///
    /// When several pairs fail only the first error is returned (the good ones are still
    /// swapped in); [`TlsManager::reload_report`] gives every outcome.
    pub fn reload_changed(&self) -> Result<usize, TlsError> {
        let report = self.reload_report();
        match report.failed.into_iter().next() {
            Some((_, error)) => Err(error),
            None => Ok(report.replaced.len()),
        }
    }

    /// One reload pass: every pair whose cert or key file was replaced or changed (see
    /// `FileStamp`) is read again and, when it loads and matches, swapped in. A pair whose files
    /// vanished or are broken keeps its old certificate and is retried next pass.
    pub fn reload_report(&self) -> ReloadReport {
        let _pass = self
            .reload_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut next = CertSet::clone(&self.resolver.snapshot());
        let mut report = ReloadReport::default();
        self.refresh(DEFAULT_NAME, &self.default, &mut next.default, &mut report);
        for (name, paths) in &self.domains {
            // Both maps are built from the same keys in `load` and never change.
            if let Some(slot) = next.domains.get_mut(name) {
                self.refresh(name, paths, slot, &mut report);
            }
        }
        if !report.replaced.is_empty() {
            self.resolver.replace(next);
        }
        report
    }

    fn refresh(&self, name: &str, paths: &CertPaths, slot: &mut Loaded, report: &mut ReloadReport) {
        let outcome = slot.changed_on_disk(paths).and_then(|changed| {
            changed
                .then(|| Loaded::load(paths, &self.provider))
                .transpose()
        });
        match outcome {
            Ok(Some(loaded)) => {
                *slot = loaded;
                report.replaced.push(name.to_string());
            }
            Ok(None) => {}
            Err(error) => report.failed.push((name.to_string(), error)),
        }
    }

    /// Not-after of every loaded certificate, by name ("default" or the domain), as Unix
    /// seconds, for expiry metrics.
    pub fn expiry(&self) -> Vec<(String, i64)> {
        let set = self.resolver.snapshot();
        std::iter::once((DEFAULT_NAME.to_string(), set.default.not_after))
            .chain(
                set.domains
                    .iter()
                    .map(|(name, loaded)| (name.clone(), loaded.not_after)),
            )
            .collect()
    }

    /// Paths being watched.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(self.default.cert.as_path())
            .chain(self.domains.values().map(|p| p.cert.as_path()))
    }
}

/// How often `serve` polls certificate files for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::test_support::{client_config, handshake, BOTH};
    use super::*;
    use std::fs::File;

    use rustls::{HandshakeKind, ProtocolVersion};

    /// A test CA issuing leaf certificates, all generated in memory.
    struct Ca {
        cert: rcgen::Certificate,
        key: rcgen::KeyPair,
    }

    /// A leaf certificate as PEM files hold it, plus what tests compare with.
    struct Leaf {
        cert_pem: String,
        key_pem: String,
        der: CertificateDer<'static>,
        not_after: i64,
    }

    impl Ca {
        fn new() -> Ca {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "mailgate test CA");
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
            ];
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            Ca { cert, key }
        }

        fn der(&self) -> CertificateDer<'static> {
            self.cert.der().clone()
        }

        fn issue(&self, names: &[&str]) -> Leaf {
            self.issue_until(names, (2040, 1, 1))
        }

        fn issue_until(&self, names: &[&str], (year, month, day): (i32, u8, u8)) -> Leaf {
            let sans: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            let mut params = rcgen::CertificateParams::new(sans).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, names[0]);
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(year, month, day);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
            Leaf {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
                der: cert.der().clone(),
                not_after: rcgen::date_time_ymd(year, month, day).unix_timestamp(),
            }
        }
    }

    fn write_pair(dir: &Path, stem: &str, leaf: &Leaf) -> CertPaths {
        let paths = CertPaths {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
        };
        fs::write(&paths.cert, &leaf.cert_pem).unwrap();
        fs::write(&paths.key, &leaf.key_pem).unwrap();
        paths
    }

    /// Sets the file's mtime `secs` into the future so a reload must notice it even on
    /// file systems with coarse timestamps.
    fn touch_later(path: &Path, secs: u64) {
        let file = File::options().write(true).open(path).unwrap();
        file.set_modified(SystemTime::now() + Duration::from_secs(secs))
            .unwrap();
    }

    /// Overwrites both files of `paths` with `leaf` and moves their mtimes forward.
    fn replace_pair(paths: &CertPaths, leaf: &Leaf, secs: u64) {
        fs::write(&paths.cert, &leaf.cert_pem).unwrap();
        fs::write(&paths.key, &leaf.key_pem).unwrap();
        touch_later(&paths.cert, secs);
        touch_later(&paths.key, secs);
    }

    /// A manager with a default certificate (localhost, 127.0.0.1) and one per domain.
    struct Fixture {
        dir: tempfile::TempDir,
        ca: Ca,
        default: Leaf,
        domains: Vec<(String, Leaf)>,
        manager: TlsManager,
    }

    fn fixture(domains: &[&str]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new();
        let default = ca.issue(&["localhost", "127.0.0.1"]);
        let default_paths = write_pair(dir.path(), "default", &default);
        let mut map = BTreeMap::new();
        let mut leaves = Vec::new();
        for domain in domains {
            let mail = format!("mail.{domain}");
            let leaf = ca.issue(&[domain, &mail]);
            map.insert(domain.to_string(), write_pair(dir.path(), domain, &leaf));
            leaves.push((domain.to_string(), leaf));
        }
        let manager = TlsManager::load(default_paths, map).unwrap();
        Fixture {
            dir,
            ca,
            default,
            domains: leaves,
            manager,
        }
    }

    impl Fixture {
        fn leaf(&self, domain: &str) -> &Leaf {
            &self.domains.iter().find(|(d, _)| d == domain).unwrap().1
        }

        fn paths(&self, stem: &str) -> CertPaths {
            CertPaths {
                cert: self.dir.path().join(format!("{stem}.crt")),
                key: self.dir.path().join(format!("{stem}.key")),
            }
        }

        fn served(&self, sni: Option<&str>) -> CertificateDer<'static> {
            self.manager.resolver.select(sni).cert[0].clone()
        }
    }

    // ---- loading -------------------------------------------------------------------

    #[test]
    fn loads_a_good_pair_with_its_chain_in_file_order() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new();
        let leaf = ca.issue(&["example.org"]);
        let paths = write_pair(dir.path(), "chain", &leaf);
        fs::write(&paths.cert, format!("{}{}", leaf.cert_pem, ca.cert.pem())).unwrap();
        let manager = TlsManager::load(paths.clone(), BTreeMap::new()).unwrap();
        let served = manager.resolver.select(None);
        assert_eq!(served.cert, vec![leaf.der.clone(), ca.der()]);
        assert_eq!(
            manager.expiry(),
            vec![(DEFAULT_NAME.to_string(), leaf.not_after)]
        );
        assert_eq!(
            manager.paths().collect::<Vec<_>>(),
            vec![paths.cert.as_path()]
        );
    }

    #[test]
    fn text_around_pem_blocks_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let leaf = Ca::new().issue(&["example.org"]);
        let paths = write_pair(dir.path(), "chatty", &leaf);
        fs::write(
            &paths.cert,
            format!(
                "subject=CN = example.org\n{}trailing words\n",
                leaf.cert_pem
            ),
        )
        .unwrap();
        fs::write(&paths.key, format!("Bag Attributes\n{}", leaf.key_pem)).unwrap();
        let manager = TlsManager::load(paths, BTreeMap::new()).unwrap();
        assert_eq!(manager.resolver.select(None).cert[0], leaf.der);
    }

    /// Which error a broken pair must produce, and which path it must name.
    enum Want {
        Read(&'static str),
        NoCertificate,
        NoKey,
        Pem(&'static str),
        Mismatch,
    }

    #[test]
    fn broken_pairs_fail_naming_the_file() {
        let ca = Ca::new();
        let good = ca.issue(&["example.org"]);
        let other = ca.issue(&["example.net"]);
        let garbage_block =
            "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n";
        let garbage_key =
            "-----BEGIN PRIVATE KEY-----\naGVsbG8gd29ybGQ=\n-----END PRIVATE KEY-----\n";
        let encrypted_key = "-----BEGIN ENCRYPTED PRIVATE KEY-----\naGVsbG8gd29ybGQ=\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let wrong_order = format!("{}{}", ca.cert.pem(), good.cert_pem);
        let no_end = good.cert_pem.replace("-----END CERTIFICATE-----", "");
        let bad_base64 =
            "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n";
        // (case, cert contents or None for a missing file, key contents or None, want)
        let cases: Vec<(&str, Option<String>, Option<String>, Want)> = vec![
            (
                "missing cert",
                None,
                Some(good.key_pem.clone()),
                Want::Read("cert"),
            ),
            (
                "missing key",
                Some(good.cert_pem.clone()),
                None,
                Want::Read("key"),
            ),
            (
                "empty cert",
                Some(String::new()),
                Some(good.key_pem.clone()),
                Want::NoCertificate,
            ),
            (
                "cert file holds a key",
                Some(good.key_pem.clone()),
                Some(good.key_pem.clone()),
                Want::NoCertificate,
            ),
            (
                "cert file not PEM",
                Some("hello\nworld\n".into()),
                Some(good.key_pem.clone()),
                Want::NoCertificate,
            ),
            (
                "empty key",
                Some(good.cert_pem.clone()),
                Some(String::new()),
                Want::NoKey,
            ),
            (
                "key file holds a cert",
                Some(good.cert_pem.clone()),
                Some(good.cert_pem.clone()),
                Want::NoKey,
            ),
            (
                "encrypted key",
                Some(good.cert_pem.clone()),
                Some(encrypted_key.into()),
                Want::NoKey,
            ),
            (
                "bad base64",
                Some(bad_base64.into()),
                Some(good.key_pem.clone()),
                Want::Pem("cert"),
            ),
            (
                "no END line",
                Some(no_end),
                Some(good.key_pem.clone()),
                Want::Pem("cert"),
            ),
            (
                "not DER",
                Some(garbage_block.into()),
                Some(good.key_pem.clone()),
                Want::Pem("cert"),
            ),
            (
                "key not DER",
                Some(good.cert_pem.clone()),
                Some(garbage_key.into()),
                Want::Pem("key"),
            ),
            (
                "other cert's key",
                Some(good.cert_pem.clone()),
                Some(other.key_pem.clone()),
                Want::Mismatch,
            ),
            (
                "CA before leaf",
                Some(wrong_order),
                Some(good.key_pem.clone()),
                Want::Mismatch,
            ),
        ];
        for (case, cert, key, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            let paths = CertPaths {
                cert: dir.path().join("c.pem"),
                key: dir.path().join("k.pem"),
            };
            if let Some(cert) = cert {
                fs::write(&paths.cert, cert).unwrap();
            }
            if let Some(key) = key {
                fs::write(&paths.key, key).unwrap();
            }
            let error = match TlsManager::load(paths.clone(), BTreeMap::new()) {
                Ok(_) => panic!("{case}: loaded"),
                Err(e) => e,
            };
            let which = |name: &str| {
                if name == "cert" {
                    &paths.cert
                } else {
                    &paths.key
                }
            };
            match (&want, &error) {
                (Want::Read(file), TlsError::Read { path, .. }) => {
                    assert_eq!(path, which(file), "{case}")
                }
                (Want::NoCertificate, TlsError::NoCertificate { path }) => {
                    assert_eq!(path, &paths.cert, "{case}")
                }
                (Want::NoKey, TlsError::NoKey { path }) => assert_eq!(path, &paths.key, "{case}"),
                (Want::Pem(file), TlsError::Pem { path, .. }) => {
                    assert_eq!(path, which(file), "{case}")
                }
                (Want::Mismatch, TlsError::Mismatch { cert, key, .. }) => {
                    assert_eq!((cert, key), (&paths.cert, &paths.key), "{case}")
                }
                _ => panic!("{case}: unexpected error {error:?}"),
            }
            let shown = error.to_string();
            let named = match want {
                Want::Read("key") | Want::NoKey | Want::Pem("key") => &paths.key,
                _ => &paths.cert,
            };
            assert!(
                shown.contains(&named.display().to_string()),
                "{case}: {shown}"
            );
        }
    }

    #[test]
    fn directory_instead_of_cert_file_is_a_read_error() {
        let dir = tempfile::tempdir().unwrap();
        let leaf = Ca::new().issue(&["example.org"]);
        let mut paths = write_pair(dir.path(), "x", &leaf);
        paths.cert = dir.path().to_path_buf();
        match TlsManager::load(paths.clone(), BTreeMap::new()) {
            Err(TlsError::Read { path, .. }) => assert_eq!(path, paths.cert),
            other => panic!("unexpected {:?}", other.err()),
        }
    }

    #[test]
    fn a_broken_domain_pair_stops_loading_and_names_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new();
        let default = write_pair(dir.path(), "default", &ca.issue(&["localhost"]));
        let broken = CertPaths {
            cert: dir.path().join("absent.crt"),
            key: default.key.clone(),
        };
        let domains = BTreeMap::from([("example.org".to_string(), broken.clone())]);
        match TlsManager::load(default, domains) {
            Err(TlsError::Read { path, .. }) => assert_eq!(path, broken.cert),
            other => panic!("unexpected {:?}", other.err()),
        }
    }

    #[test]
    fn expiry_lists_every_leaf_by_normalized_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new();
        let default = ca.issue_until(&["localhost"], (2031, 5, 17));
        let org = ca.issue_until(&["example.org"], (2029, 12, 31));
        let net = ca.issue_until(&["example.net"], (2035, 2, 1));
        let domains = BTreeMap::from([
            (
                "Example.ORG.".to_string(),
                write_pair(dir.path(), "org", &org),
            ),
            (
                "example.net".to_string(),
                write_pair(dir.path(), "net", &net),
            ),
        ]);
        let manager =
            TlsManager::load(write_pair(dir.path(), "default", &default), domains).unwrap();
        assert_eq!(
            manager.expiry(),
            vec![
                ("default".to_string(), 1_936_742_400),
                ("example.net".to_string(), net.not_after),
                ("example.org".to_string(), org.not_after),
            ]
        );
        assert_eq!(default.not_after, 1_936_742_400, "2031-05-17T00:00:00Z");
        assert_eq!(manager.paths().count(), 3);
    }

    // ---- SNI -----------------------------------------------------------------------

    #[test]
    fn sni_selects_domain_parent_or_default() {
        let f = fixture(&["example.org", "example.net", "eu.example.org"]);
        let org = &f.leaf("example.org").der;
        let net = &f.leaf("example.net").der;
        let eu = &f.leaf("eu.example.org").der;
        let default = &f.default.der;
        let cases: &[(Option<&str>, &CertificateDer<'static>)] = &[
            (Some("example.org"), org),
            (Some("mail.example.org"), org),
            (Some("MAIL.Example.Org."), org),
            (Some("a.b.example.org"), org),
            (Some("eu.example.org"), eu),
            (Some("pop.eu.example.org"), eu),
            (Some("example.net"), net),
            (Some("mail.example.net"), net),
            (Some("notexample.org"), default),
            (Some("example.org.evil.test"), default),
            (Some("org"), default),
            (Some("example.com"), default),
            (Some("localhost"), default),
            (Some(""), default),
            (Some("."), default),
            (None, default),
        ];
        for (sni, want) in cases {
            assert_eq!(&f.served(*sni), *want, "{sni:?}");
        }
    }

    #[test]
    fn domain_keys_are_matched_case_insensitively() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new();
        let org = ca.issue(&["example.org"]);
        let domains = BTreeMap::from([(
            "Example.ORG.".to_string(),
            write_pair(dir.path(), "org", &org),
        )]);
        let manager = TlsManager::load(
            write_pair(dir.path(), "d", &ca.issue(&["localhost"])),
            domains,
        )
        .unwrap();
        assert_eq!(
            manager.resolver.select(Some("mail.example.org")).cert[0],
            org.der
        );
    }

    #[tokio::test]
    async fn handshake_serves_the_domain_certificate_for_its_mail_name() {
        let f = fixture(&["example.org", "example.net"]);
        let client = client_config(&[f.ca.der()], BOTH, &[]);
        let served = handshake(
            f.manager.server_config(),
            client.clone(),
            "mail.example.org",
        )
        .await
        .unwrap();
        assert_eq!(served.chain, vec![f.leaf("example.org").der.clone()]);
        assert_eq!(served.version, ProtocolVersion::TLSv1_3);
        let served = handshake(f.manager.server_config(), client.clone(), "example.net")
            .await
            .unwrap();
        assert_eq!(served.chain[0], f.leaf("example.net").der);
        // An IP address sends no SNI: the default answers.
        let served = handshake(f.manager.server_config(), client, "127.0.0.1")
            .await
            .unwrap();
        assert_eq!(served.chain[0], f.default.der);
    }

    #[tokio::test]
    async fn handshake_for_an_unknown_name_gets_the_default_and_the_client_refuses_it() {
        let f = fixture(&["example.org"]);
        let client = client_config(&[f.ca.der()], BOTH, &[]);
        let error = handshake(f.manager.server_config(), client, "mail.example.com")
            .await
            .err()
            .unwrap();
        assert!(error.contains("certificate"), "{error}");
    }

    #[tokio::test]
    async fn clients_offering_alpn_still_connect() {
        let f = fixture(&["example.org"]);
        let client = client_config(&[f.ca.der()], BOTH, &[b"pop3", b"h2"]);
        let served = handshake(f.manager.server_config(), client, "mail.example.org")
            .await
            .unwrap();
        assert_eq!(served.chain[0], f.leaf("example.org").der);
    }

    // ---- versions and resumption ---------------------------------------------------

    #[tokio::test]
    async fn tls12_and_tls13_clients_connect() {
        let f = fixture(&["example.org"]);
        for (version, want) in [
            (&rustls::version::TLS12, ProtocolVersion::TLSv1_2),
            (&rustls::version::TLS13, ProtocolVersion::TLSv1_3),
        ] {
            let client = client_config(&[f.ca.der()], &[version], &[]);
            let served = handshake(f.manager.server_config(), client, "example.org")
                .await
                .unwrap();
            assert_eq!(served.version, want);
        }
    }

    /// A ClientHello as an old client sends it: no supported_versions extension,
    /// `version` as the highest it speaks, and signature_algorithms, supported_groups
    /// and ec_point_formats only when `extensions` (TLS 1.0/1.1 clients may omit them).
    fn legacy_client_hello(version: [u8; 2], extensions: bool) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&version);
        body.extend_from_slice(&[0x5a; 32]);
        body.push(0);
        body.extend_from_slice(&[0x00, 0x04, 0xc0, 0x2b, 0x00, 0x2f]);
        body.extend_from_slice(&[0x01, 0x00]);
        if extensions {
            body.extend_from_slice(&[0x00, 0x1a]);
            // signature_algorithms: ecdsa_secp256r1_sha256, rsa_pkcs1_sha256
            body.extend_from_slice(&[0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x04, 0x01]);
            // supported_groups: x25519, secp256r1
            body.extend_from_slice(&[0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]);
            // ec_point_formats: uncompressed
            body.extend_from_slice(&[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]);
        }
        let mut handshake = vec![0x01, 0x00, 0x00, u8::try_from(body.len()).unwrap()];
        handshake.extend_from_slice(&body);
        let mut record = vec![
            0x16,
            0x03,
            0x01,
            0x00,
            u8::try_from(handshake.len()).unwrap(),
        ];
        record.extend_from_slice(&handshake);
        record
    }

    /// Feeds one ClientHello to a fresh server connection: the error and what it sent.
    fn answer(
        config: Arc<rustls::ServerConfig>,
        hello: &[u8],
    ) -> (Result<(), rustls::Error>, Vec<u8>) {
        let mut conn = rustls::ServerConnection::new(config).unwrap();
        conn.read_tls(&mut &hello[..]).unwrap();
        let result = conn.process_new_packets().map(|_| ());
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        (result, out)
    }

    #[test]
    fn tls10_and_tls11_clients_are_refused_with_protocol_version_alert() {
        let f = fixture(&[]);
        let too_old = Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ));
        for version in [[0x03, 0x00], [0x03, 0x01], [0x03, 0x02]] {
            let (result, out) = answer(
                f.manager.server_config(),
                &legacy_client_hello(version, true),
            );
            assert_eq!(result, too_old, "{version:?}");
            // An alert record whose body is fatal(2), protocol_version(70).
            assert_eq!(out.first(), Some(&0x15), "{version:?}");
            assert_eq!(
                out.get(out.len().saturating_sub(2)..),
                Some(&[2u8, 70][..]),
                "{version:?}"
            );
            // Without the TLS 1.2-era extensions: refused too.
            let (result, _) = answer(
                f.manager.server_config(),
                &legacy_client_hello(version, false),
            );
            assert!(result.is_err(), "{version:?}");
        }
        // The same hello claiming TLS 1.2 gets a ServerHello, so the refusal above is
        // about the version and nothing else.
        let (result, out) = answer(
            f.manager.server_config(),
            &legacy_client_hello([0x03, 0x03], true),
        );
        assert_eq!(result, Ok(()));
        assert_eq!(out.first(), Some(&0x16), "a handshake record");
    }

    #[tokio::test]
    async fn second_handshake_resumes_on_both_versions() {
        let f = fixture(&["example.org"]);
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let client = client_config(&[f.ca.der()], &[version], &[]);
            let first = handshake(f.manager.server_config(), client.clone(), "example.org")
                .await
                .unwrap();
            assert_eq!(first.kind, HandshakeKind::Full, "{version:?}");
            let second = handshake(f.manager.server_config(), client, "example.org")
                .await
                .unwrap();
            assert_eq!(second.kind, HandshakeKind::Resumed, "{version:?}");
        }
    }

    // ---- reload --------------------------------------------------------------------

    #[tokio::test]
    async fn reload_serves_a_changed_pair_through_the_same_config() {
        let f = fixture(&["example.org", "example.net"]);
        let config = f.manager.server_config();
        assert_eq!(f.manager.reload_changed().unwrap(), 0);

        let renewed =
            f.ca.issue_until(&["example.org", "mail.example.org"], (2033, 3, 3));
        replace_pair(&f.paths("example.org"), &renewed, 60);
        assert_eq!(f.manager.reload_changed().unwrap(), 1);
        assert_eq!(f.served(Some("mail.example.org")), renewed.der);
        assert_eq!(f.served(Some("example.net")), f.leaf("example.net").der);
        assert!(f
            .manager
            .expiry()
            .contains(&("example.org".to_string(), renewed.not_after)));

        let client = client_config(&[f.ca.der()], BOTH, &[]);
        let served = handshake(config, client, "mail.example.org").await.unwrap();
        assert_eq!(served.chain[0], renewed.der);

        assert_eq!(
            f.manager.reload_changed().unwrap(),
            0,
            "unchanged files are not reloaded"
        );
    }

    #[test]
    fn reload_notices_a_changed_key_file_alone_and_the_default() {
        let f = fixture(&["example.org"]);
        let renewed = f.ca.issue(&["localhost"]);
        let paths = f.paths("default");
        fs::write(&paths.cert, &renewed.cert_pem).unwrap();
        touch_later(&paths.cert, 30);
        // Only the cert changed so far: it no longer matches the old key.
        assert!(matches!(
            f.manager.reload_changed(),
            Err(TlsError::Mismatch { .. })
        ));
        assert_eq!(f.served(None), f.default.der);
        fs::write(&paths.key, &renewed.key_pem).unwrap();
        touch_later(&paths.key, 30);
        assert_eq!(f.manager.reload_changed().unwrap(), 1);
        assert_eq!(f.served(None), renewed.der);
    }

    #[test]
    fn reload_notices_an_in_place_rewrite_that_keeps_size_and_mtime() {
        let f = fixture(&["example.org"]);
        let paths = f.paths("example.org");
        // Text after a PEM block is ignored: pad every generation to one size.
        let padded = |pem: &str| format!("{pem:\n<4096}");
        let write_with_mtime = |leaf: &Leaf, mtime: SystemTime| {
            for (path, pem) in [(&paths.cert, &leaf.cert_pem), (&paths.key, &leaf.key_pem)] {
                fs::write(path, padded(pem)).unwrap();
                File::options()
                    .write(true)
                    .open(path)
                    .unwrap()
                    .set_modified(mtime)
                    .unwrap();
            }
        };
        let mtime = SystemTime::now() - Duration::from_secs(600);
        write_with_mtime(f.leaf("example.org"), mtime);
        assert_eq!(f.manager.reload_changed().unwrap(), 1);
        // The status-change time has a coarse clock: let it move on.
        std::thread::sleep(Duration::from_millis(50));
        let renewed = f.ca.issue(&["example.org", "mail.example.org"]);
        write_with_mtime(&renewed, mtime);
        assert_eq!(f.manager.reload_changed().unwrap(), 1);
        assert_eq!(f.served(Some("example.org")), renewed.der);
        assert_eq!(f.manager.reload_changed().unwrap(), 0);
    }

    type ErrorCheck = fn(&TlsError) -> bool;

    #[test]
    fn broken_replacement_keeps_the_old_certificate_until_fixed() {
        let f = fixture(&["example.org"]);
        let paths = f.paths("example.org");
        let old = f.leaf("example.org").der.clone();
        let cases: Vec<(&str, String, ErrorCheck)> = vec![
            ("empty", String::new(), |e| {
                matches!(e, TlsError::NoCertificate { .. })
            }),
            (
                "garbage",
                "-----BEGIN CERTIFICATE-----\n%%%\n-----END CERTIFICATE-----\n".into(),
                |e| matches!(e, TlsError::Pem { .. }),
            ),
            ("foreign cert", f.ca.issue(&["example.org"]).cert_pem, |e| {
                matches!(e, TlsError::Mismatch { .. })
            }),
        ];
        for (i, (case, contents, is_expected)) in cases.into_iter().enumerate() {
            fs::write(&paths.cert, contents).unwrap();
            touch_later(&paths.cert, 10 * (i as u64 + 1));
            let error = f
                .manager
                .reload_changed()
                .err()
                .unwrap_or_else(|| panic!("{case}: reloaded"));
            assert!(is_expected(&error), "{case}: {error:?}");
            assert!(
                error
                    .to_string()
                    .contains(&paths.cert.display().to_string()),
                "{case}: {error}"
            );
            assert_eq!(f.served(Some("example.org")), old, "{case}");
            // A broken pair is retried, and keeps failing, on every pass.
            assert!(f.manager.reload_changed().is_err(), "{case}: retried");
        }
        let fixed = f.ca.issue(&["example.org"]);
        replace_pair(&paths, &fixed, 100);
        assert_eq!(f.manager.reload_changed().unwrap(), 1);
        assert_eq!(f.served(Some("example.org")), fixed.der);
    }

    #[test]
    fn one_broken_pair_does_not_stop_the_others_from_reloading() {
        let f = fixture(&["example.org", "example.net"]);
        let renewed = f.ca.issue(&["example.org"]);
        replace_pair(&f.paths("example.org"), &renewed, 20);
        fs::remove_file(f.paths("example.net").key).unwrap();
        fs::write(f.paths("default").cert, "").unwrap();
        touch_later(&f.paths("default").cert, 20);

        let report = f.manager.reload_report();
        assert_eq!(report.replaced, vec!["example.org".to_string()]);
        let failed: Vec<&str> = report
            .failed
            .iter()
            .map(|(name, _)| name.as_str())
            .collect();
        assert_eq!(failed, vec![DEFAULT_NAME, "example.net"]);
        assert!(matches!(report.failed[0].1, TlsError::NoCertificate { .. }));
        match &report.failed[1].1 {
            TlsError::Read { path, .. } => assert_eq!(path, &f.paths("example.net").key),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(f.served(Some("example.org")), renewed.der);
        assert_eq!(f.served(Some("example.net")), f.leaf("example.net").der);
        assert_eq!(f.served(None), f.default.der);
        assert!(f.manager.reload_changed().is_err());
    }
}
