//! Certificate rotation the way Kubernetes delivers it: a Secret volume whose files are
//! symlinks through `..data`, swapped atomically to a new timestamped directory.

use crate::common::{tls_connector, Options, Server, TestCa};
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

/// Every PEM file is padded to this size (text after a PEM block is ignored), so a
/// renewed file is as long as the one it replaces.
const PADDED: usize = 4096;

/// Writes `..<stamp>/{tls.crt,tls.key}` with the given mtime and points `..data` at it
/// the way kubelet's atomic writer does: a new symlink renamed over the old one, then
/// the old directory removed.
fn kubelet_write(dir: &Path, stamp: &str, cert: &Path, key: &Path, mtime: SystemTime) {
    let data_dir = dir.join(format!("..{stamp}"));
    std::fs::create_dir(&data_dir).expect("mkdir");
    for (from, name) in [(cert, "tls.crt"), (key, "tls.key")] {
        let mut pem = std::fs::read(from).expect("read pem");
        assert!(pem.len() < PADDED);
        pem.resize(PADDED, b'\n');
        let path = data_dir.join(name);
        std::fs::write(&path, &pem).expect("write pem");
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(mtime))
            .expect("set mtime");
    }
    let old = std::fs::read_link(dir.join("..data")).ok();
    symlink(format!("..{stamp}"), dir.join("..data_tmp")).expect("symlink");
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap ..data");
    for name in ["tls.crt", "tls.key"] {
        if std::fs::symlink_metadata(dir.join(name)).is_err() {
            symlink(format!("..data/{name}"), dir.join(name)).expect("symlink");
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).expect("remove old");
    }
}

/// Waits until a handshake for `mail.example.com` verifies against `ca`.
async fn served_by(server: &Server, ca: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let stream = tokio::net::TcpStream::connect(server.pop3s)
            .await
            .expect("connect");
        let name = rustls::pki_types::ServerName::try_from("mail.example.com").expect("sni");
        if tls_connector(ca).connect(name, stream).await.is_ok() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_kubernetes_secret_swap_is_served_without_restart() {
    let secrets = tempfile::tempdir().expect("tempdir");
    let volume = secrets.path().join("example-com-tls");
    std::fs::create_dir(&volume).expect("mkdir");
    // One mtime for every generation: the swap must be noticed even when the new
    // files have the old files' size and modification time.
    let mtime = SystemTime::now() - Duration::from_secs(3600);
    let mut cas = Vec::new();
    for generation in 0..3 {
        let dir = secrets.path().join(format!("ca{generation}"));
        std::fs::create_dir(&dir).expect("mkdir");
        let ca = TestCa::new(&dir);
        let (cert, key) = ca.issue("example-com", &["example.com", "mail.example.com"]);
        cas.push((ca, cert, key));
    }
    let (_, cert, key) = &cas[0];
    kubelet_write(&volume, "2026_01_01_00_00_00.000000001", cert, key, mtime);
    let server = Server::start_with(Options {
        extra: format!(
            "[tls.domains.\"example.com\"]\ncert = \"{0}/tls.crt\"\nkey = \"{0}/tls.key\"\n",
            volume.display()
        ),
        ..Options::default()
    });
    assert!(served_by(&server, &cas[0].0.ca_pem).await);
    for (generation, (ca, cert, key)) in cas.iter().enumerate().skip(1) {
        let stamp = format!("2026_0{}_01_00_00_00.000000001", generation + 1);
        kubelet_write(&volume, &stamp, cert, key, mtime);
        assert!(
            served_by(&server, &ca.ca_pem).await,
            "generation {generation} was not picked up; log:\n{}",
            server.log_text()
        );
    }
    server.wait_for_log("certificates reloaded");
}
