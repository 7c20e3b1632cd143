//! Certificates made by outside tools load and serve: keys in every format `openssl`
//! writes, and the output of the development script `certs/make-dev-certs.sh`. A missing
//! tool fails these tests; it never skips them.

use crate::common::{require_tool, tls_connector};
use mailgate::tls::{CertPaths, TlsManager};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

fn dev_cert_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/make-dev-certs.sh")
}

/// A real handshake over an in-memory pipe, after which the server sends a greeting the
/// client must read; returns the leaf the server sent. An IP address as `name` makes the
/// client send no SNI.
async fn served_leaf(
    server: Arc<rustls::ServerConfig>,
    client: TlsConnector,
    name: &str,
) -> Result<CertificateDer<'static>, String> {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let server_name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    let server_side = async {
        let mut tls = TlsAcceptor::from(server).accept(server_io).await?;
        tls.write_all(b"+OK\r\n").await?;
        tls.shutdown().await
    };
    let client_side = async {
        let mut tls = client.connect(server_name, client_io).await?;
        let mut greeting = [0u8; 5];
        tls.read_exact(&mut greeting).await?;
        let leaf = tls.get_ref().1.peer_certificates().map(|c| c[0].clone());
        Ok::<_, std::io::Error>((leaf, greeting))
    };
    let both = async { tokio::join!(server_side, client_side) };
    let (served, seen) = tokio::time::timeout(Duration::from_secs(10), both)
        .await
        .map_err(|_| "handshake timed out".to_string())?;
    let (leaf, greeting) = seen.map_err(|e| format!("client: {e}"))?;
    served.map_err(|e| format!("server: {e}"))?;
    assert_eq!(&greeting, b"+OK\r\n");
    leaf.ok_or_else(|| "no peer certificates".to_string())
}

#[tokio::test]
async fn key_formats_written_by_openssl_load() {
    require_tool("openssl");
    // (case, commands making KEY, the key file's first line)
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "sec1 ec",
            &["ecparam", "-name", "prime256v1", "-genkey", "-out", "KEY"],
            "-----BEGIN EC PARAMETERS-----",
        ),
        (
            "pkcs1 rsa",
            &["genrsa", "-traditional", "-out", "KEY", "2048"],
            "-----BEGIN RSA PRIVATE KEY-----",
        ),
        (
            "pkcs8 rsa",
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                "KEY",
            ],
            "-----BEGIN PRIVATE KEY-----",
        ),
        (
            "pkcs8 ed25519",
            &["genpkey", "-algorithm", "ed25519", "-out", "KEY"],
            "-----BEGIN PRIVATE KEY-----",
        ),
    ];
    for (case, make_key, first_line) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("key.pem");
        let cert = dir.path().join("cert.pem");
        let key_arg = key.to_str().expect("utf-8 path");
        let args: Vec<&str> = make_key
            .iter()
            .map(|a| if *a == "KEY" { key_arg } else { a })
            .collect();
        openssl(&args);
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            key_arg,
            "-subj",
            "/CN=fmt.test",
            "-days",
            "2",
            "-addext",
            "subjectAltName=DNS:fmt.test",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-out",
            cert.to_str().expect("utf-8 path"),
        ]);
        let text = std::fs::read_to_string(&key).expect("read key");
        assert_eq!(text.lines().next(), Some(*first_line), "{case}");
        let root = CertificateDer::from_pem_file(&cert).expect("read cert");
        let client = tls_connector(&cert);
        let manager = TlsManager::load(CertPaths { cert, key }, BTreeMap::new())
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        // The server must also be able to sign with it.
        let served = served_leaf(manager.server_config(), client, "fmt.test")
            .await
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(served, root, "{case}");
    }
}

#[tokio::test]
async fn dev_cert_script_output_loads_and_serves_by_sni() {
    require_tool("bash");
    require_tool("openssl");
    let script = dev_cert_script();
    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().join("out");
    let run = Command::new("bash")
        .arg(&script)
        .arg("-o")
        .arg(&out_dir)
        .args(["example.org", "Example.NET"])
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for file in [
        "ca.crt",
        "ca.key",
        "example.org.crt",
        "example.org.key",
        "example.net.crt",
        "example.net.key",
    ] {
        let path = out_dir.join(file);
        assert!(
            stdout.contains(&path.display().to_string()),
            "{file} not reported:\n{stdout}"
        );
        let want = if file.ends_with(".key") { 0o600 } else { 0o644 };
        assert_eq!(mode(&path), want, "{file}");
    }

    let pair = |d: &str| CertPaths {
        cert: out_dir.join(format!("{d}.crt")),
        key: out_dir.join(format!("{d}.key")),
    };
    let domains = BTreeMap::from([
        ("example.org".to_string(), pair("example.org")),
        ("example.net".to_string(), pair("example.net")),
    ]);
    let manager = TlsManager::load(pair("example.org"), domains).expect("load");
    let leaf = |d: &str| {
        CertificateDer::from_pem_file(out_dir.join(format!("{d}.crt"))).expect("read leaf")
    };
    let client = tls_connector(&out_dir.join("ca.crt"));
    for (name, want) in [
        ("mail.example.net", "example.net"),
        ("example.net", "example.net"),
        ("mail.example.org", "example.org"),
        ("localhost", "example.org"),
        ("127.0.0.1", "example.org"),
    ] {
        let served = served_leaf(manager.server_config(), client.clone(), name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(served, leaf(want), "{name}");
    }

    // A second run keeps the CA, so clients trusting it keep working.
    let ca_before = std::fs::read(out_dir.join("ca.crt")).expect("read ca");
    let again = Command::new("bash")
        .arg(&script)
        .arg("-o")
        .arg(&out_dir)
        .arg("example.com")
        .output()
        .expect("bash");
    assert!(again.status.success());
    assert_eq!(
        std::fs::read(out_dir.join("ca.crt")).expect("read ca"),
        ca_before
    );
}

#[test]
fn dev_cert_script_rejects_bad_arguments() {
    require_tool("bash");
    require_tool("openssl");
    let script = dev_cert_script();
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: &[&[&str]] = &[
        &[],
        &["../escape.org"],
        &["no_underscores.org"],
        &["single"],
        &["-x", "a.org"],
        &["a.org", "-o"],
    ];
    for args in cases {
        let run = Command::new("bash")
            .arg(&script)
            .arg("-o")
            .arg(dir.path())
            .args(*args)
            .output()
            .expect("bash");
        assert_eq!(
            run.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("read dir").count(),
        0,
        "nothing written"
    );
}
