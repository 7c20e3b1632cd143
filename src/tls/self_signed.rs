//! The self-signed certificate a fresh install starts with, so it speaks TLS before anyone
//! configures a real one. Writes the pair only when a file of it is missing, and never
//! touches a complete pair; loading and serving it is `TlsManager`'s job.

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::{CertPaths, TlsError};

/// How long a self-signed certificate made by [`ensure_self_signed`] is valid.
/// Long, because nobody renews it: it only exists so a fresh install speaks TLS at all.
pub const SELF_SIGNED_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// Writes a self-signed certificate for `hostname` to `paths` unless both files exist
/// (key file mode 0600). Returns true when it made one.
///
/// The certificate is ECDSA P-256 with SANs `hostname`, `localhost`, `127.0.0.1` and
/// `::1`. Each file is written to a temporary name and renamed, so a crash never leaves
/// a half-written file; the key is written first, so a crash in between leaves no
/// certificate and the next start generates both again.
pub fn ensure_self_signed(paths: &CertPaths, hostname: &str) -> Result<bool, TlsError> {
    if exists(&paths.cert)? && exists(&paths.key)? {
        return Ok(false);
    }
    let (cert_pem, key_pem) = self_signed_pem(hostname)?;
    write_file(&paths.key, key_pem.as_bytes(), 0o600)?;
    write_file(&paths.cert, cert_pem.as_bytes(), 0o644)?;
    Ok(true)
}

fn exists(path: &Path) -> Result<bool, TlsError> {
    path.try_exists().map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Returns (certificate PEM, PKCS#8 key PEM).
fn self_signed_pem(hostname: &str) -> Result<(String, String), TlsError> {
    let generate = |e: rcgen::Error| TlsError::Generate(e.to_string());
    if hostname.trim().is_empty() {
        return Err(TlsError::Generate("the hostname is empty".to_string()));
    }
    let mut names = vec![hostname.to_string()];
    for extra in ["localhost", "127.0.0.1", "::1"] {
        if !names.iter().any(|n| n.eq_ignore_ascii_case(extra)) {
            names.push(extra.to_string());
        }
    }
    let mut params = rcgen::CertificateParams::new(names).map_err(generate)?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, hostname);
    dn.push(rcgen::DnType::OrganizationName, "mailgate self-signed");
    params.distinguished_name = dn;
    let now = SystemTime::now();
    // An hour of slack for clients whose clocks run a little behind ours.
    params.not_before = now
        .checked_sub(Duration::from_secs(3600))
        .unwrap_or(now)
        .into();
    params.not_after = now.checked_add(SELF_SIGNED_VALIDITY).unwrap_or(now).into();
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(generate)?;
    let cert = params.self_signed(&key).map_err(generate)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Creates `path`'s parent directories, then writes it with
/// [`crate::fsutil::write_atomically`]; errors name the path.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)
            .map_err(|e| TlsError::Generate(format!("creating {}: {e}", parent.display())))?;
    }
    crate::fsutil::write_atomically(path, contents, mode)
        .map_err(|e| TlsError::Generate(format!("writing {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;

    use rustls_pki_types::CertificateDer;
    use x509_parser::extensions::GeneralName;

    use crate::tls::test_support::{client_config, handshake, BOTH};
    use crate::tls::{unix_now, TlsManager};

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn sans(der: &CertificateDer<'_>) -> (Vec<String>, Vec<Vec<u8>>) {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
        let ext = cert.subject_alternative_name().unwrap().unwrap();
        let mut dns = Vec::new();
        let mut ips = Vec::new();
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                GeneralName::IPAddress(ip) => ips.push(ip.to_vec()),
                other => panic!("unexpected SAN {other:?}"),
            }
        }
        (dns, ips)
    }

    #[tokio::test]
    async fn self_signed_is_made_once_private_and_usable() {
        let dir = tempfile::tempdir().unwrap();
        let paths = CertPaths {
            cert: dir.path().join("a/b/server.crt"),
            key: dir.path().join("a/b/server.key"),
        };
        assert!(ensure_self_signed(&paths, "mail.example.com").unwrap());
        assert_eq!(mode(&paths.key), 0o600);
        let cert_before = fs::read(&paths.cert).unwrap();
        let key_before = fs::read(&paths.key).unwrap();
        assert!(!ensure_self_signed(&paths, "mail.example.com").unwrap());
        assert_eq!(fs::read(&paths.cert).unwrap(), cert_before);
        assert_eq!(fs::read(&paths.key).unwrap(), key_before);
        let mut left: Vec<String> = fs::read_dir(dir.path().join("a/b"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec!["server.crt", "server.key"],
            "no temporary files stay behind"
        );

        let manager = TlsManager::load(paths, BTreeMap::new()).unwrap();
        let der = manager.resolver.select(None).cert[0].clone();
        let (dns, ips) = sans(&der);
        assert_eq!(dns, vec!["mail.example.com", "localhost"]);
        let mut v6 = vec![0u8; 16];
        v6[15] = 1;
        assert_eq!(ips, vec![vec![127, 0, 0, 1], v6]);
        let (_, expiry) = manager.expiry().remove(0);
        let years = (expiry - unix_now()) / (365 * 24 * 3600);
        assert!((9..=10).contains(&years), "{years}");

        for name in ["mail.example.com", "localhost", "127.0.0.1", "::1"] {
            let client = client_config(std::slice::from_ref(&der), BOTH, &[]);
            let served = handshake(manager.server_config(), client, name)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(served.chain, vec![der.clone()], "{name}");
        }
    }

    #[test]
    fn self_signed_for_localhost_lists_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let paths = CertPaths {
            cert: dir.path().join("c.pem"),
            key: dir.path().join("k.pem"),
        };
        assert!(ensure_self_signed(&paths, "LOCALHOST").unwrap());
        let manager = TlsManager::load(paths, BTreeMap::new()).unwrap();
        let (dns, ips) = sans(&manager.resolver.select(None).cert[0]);
        assert_eq!(dns, vec!["LOCALHOST"]);
        assert_eq!(ips.len(), 2);
    }

    #[test]
    fn self_signed_replaces_a_lone_file() {
        for missing in ["cert", "key"] {
            let dir = tempfile::tempdir().unwrap();
            let paths = CertPaths {
                cert: dir.path().join("c.pem"),
                key: dir.path().join("k.pem"),
            };
            let present = if missing == "cert" {
                &paths.key
            } else {
                &paths.cert
            };
            fs::write(present, "left over").unwrap();
            assert!(
                ensure_self_signed(&paths, "host.test").unwrap(),
                "{missing}"
            );
            assert_eq!(mode(&paths.key), 0o600, "{missing}");
            TlsManager::load(paths, BTreeMap::new()).unwrap_or_else(|e| panic!("{missing}: {e}"));
        }
    }

    #[test]
    fn self_signed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let ok = CertPaths {
            cert: dir.path().join("c.pem"),
            key: dir.path().join("k.pem"),
        };
        for bad in ["h\u{e9}st.test", "", "  "] {
            assert!(
                matches!(ensure_self_signed(&ok, bad), Err(TlsError::Generate(_))),
                "{bad:?}"
            );
            assert!(
                !ok.key.exists() && !ok.cert.exists(),
                "nothing written for {bad:?}"
            );
        }

        let blocker = dir.path().join("file");
        fs::write(&blocker, "").unwrap();
        let under_file = CertPaths {
            cert: blocker.join("c.pem"),
            key: blocker.join("k.pem"),
        };
        match ensure_self_signed(&under_file, "host.test") {
            Err(TlsError::Read { path, .. }) => assert_eq!(path, under_file.cert),
            other => panic!("unexpected {other:?}"),
        }

        // The key path is a directory: the rename fails, names it, and cleans up.
        let sub = dir.path().join("sub");
        fs::create_dir_all(sub.join("k.pem")).unwrap();
        let key_is_dir = CertPaths {
            cert: sub.join("c.pem"),
            key: sub.join("k.pem"),
        };
        match ensure_self_signed(&key_is_dir, "host.test") {
            Err(TlsError::Generate(message)) => {
                assert!(
                    message.contains(&key_is_dir.key.display().to_string()),
                    "{message}"
                )
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            fs::read_dir(&sub).unwrap().count(),
            1,
            "only the directory stays"
        );
    }
}
