//! A full disk: the server's data dir on a small tmpfs that the test mounts, filled with
//! LMTP deliveries until the free-space reserve refuses them; nothing answered 4xx may be
//! visible, everything answered 250 must be, deleting through POP3 must work on the full
//! disk, and the space must come back so delivery resumes.

use crate::common::{logged_in, stat_count, Options, Raw, Server};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A size-limited tmpfs mounted for the test and unmounted when dropped, even after a
/// failed assertion (lazily, in case the server's threads still hold files on it).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (a skip) when mounting is not allowed here, except in CI, where it fails.
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        if out.status.success() {
            return Some(Tmpfs { dir });
        }
        let why = String::from_utf8_lossy(&out.stderr);
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "cannot mount a tmpfs in CI: {why}"
        );
        eprintln!("skipped: cannot mount a tmpfs here: {why}");
        None
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn free_bytes(&self) -> u64 {
        let stat = nix::sys::statvfs::statvfs(self.path()).expect("statvfs");
        stat.blocks_available() * stat.fragment_size()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

const USER: &str = "joe@example.org";
/// What the reserve keeps free on the 48 MiB file system.
const RESERVE: u64 = 16 * 1024 * 1024;
/// Deliveries at once, so commits race the reserve and each other.
const SENDERS: usize = 3;
/// Bounds each sender's deliveries per round (48 MiB / 400 KiB is about 120 in all).
const MAX_PER_SENDER: usize = 100;

/// A message of about 400 KiB whose Subject names it.
fn message(subject: &str) -> String {
    let line = format!("{}\r\n", "x".repeat(78));
    format!("Subject: {subject}\r\n\r\n{}.\r\n", line.repeat(5000))
}

/// One LMTP delivery to `USER`: the reply that decided it (RCPT's refusal or DATA's).
async fn deliver(c: &mut Raw, subject: &str) -> String {
    let r = c.say("MAIL FROM:<mta@sender.test>").await;
    assert!(r.starts_with("250"), "MAIL: {r}");
    let r = c.say(&format!("RCPT TO:<{USER}>")).await;
    if !r.starts_with("250") {
        assert!(c.say("RSET").await.starts_with("250"));
        return r;
    }
    let r = c.say("DATA").await;
    assert!(r.starts_with("354"), "DATA: {r}");
    c.send_bytes(message(subject).as_bytes()).await;
    c.reply().await
}

/// One sender: delivers until refused twice in a row (or `MAX_PER_SENDER`); returns the
/// subjects answered 250 and the refusals.
async fn fill(lmtp: SocketAddr, round: usize, sender: usize) -> (Vec<String>, Vec<String>) {
    let mut c = Raw::plain(lmtp).await;
    assert!(c.reply().await.starts_with("220"));
    assert!(c.say("LHLO mta.test").await.starts_with("250"));
    let (mut accepted, mut refused, mut in_a_row) = (Vec::new(), Vec::new(), 0);
    for n in 0..MAX_PER_SENDER {
        let subject = format!("fill-{round}-{sender}-{n}");
        let r = deliver(&mut c, &subject).await;
        if r.starts_with("250") {
            accepted.push(subject);
            in_a_row = 0;
        } else {
            refused.push(format!("{subject}: {r}"));
            in_a_row += 1;
            if in_a_row == 2 {
                break;
            }
        }
    }
    let _ = c.say("QUIT").await;
    (accepted, refused)
}

/// The subjects of every message in the maildrop, from TOP n 0.
async fn subjects(c: &mut Raw) -> Vec<String> {
    let count = stat_count(&c.cmd("STAT").await);
    let mut out = Vec::new();
    for i in 1..=count {
        let r = c.cmd(&format!("TOP {i} 0")).await;
        assert!(r.starts_with("+OK"), "TOP {i}: {r}");
        let head = String::from_utf8_lossy(&c.multiline().await).into_owned();
        let subject = head
            .lines()
            .find_map(|l| l.strip_prefix("Subject: "))
            .unwrap_or_else(|| panic!("no Subject in {head}"));
        out.push(subject.to_owned());
    }
    out
}

/// Five rounds on one 48 MiB file system: fill it, check, delete everything. sled keeps
/// the space of deleted mail inside its files, so it is the server's compaction (in
/// housekeeping, every second here) that gives it back before the next round. The server
/// runs as its own process, so a storage hang fails the test instead of stalling the
/// suite.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_refuses_cleanly_loses_nothing_and_deletions_make_room() {
    let Some(fs) = Tmpfs::mount("48m") else {
        return;
    };
    let data: PathBuf = fs.path().join("data");
    let mut server = Server::start_with(Options {
        data_dir: Some(data),
        extra: format!("[store]\nmin_free_bytes = {RESERVE}\n"),
        process: true,
        ..Options::default()
    });
    server.with_user(USER);
    let lmtp = server.lmtp.expect("lmtp");
    for round in 0..5 {
        let senders: Vec<_> = (0..SENDERS)
            .map(|s| tokio::spawn(fill(lmtp, round, s)))
            .collect();
        let (mut accepted, mut refused) = (BTreeSet::new(), Vec::new());
        for sender in senders {
            let (a, r) = sender.await.expect("sender");
            accepted.extend(a);
            refused.extend(r);
        }
        assert!(!refused.is_empty(), "round {round}: the disk never filled");
        assert!(!accepted.is_empty(), "round {round}: nothing was delivered");
        for r in &refused {
            assert!(r.contains(": 452 4.3.1"), "round {round}: refusal {r}");
        }
        assert!(
            fs.free_bytes() < 2 * RESERVE,
            "round {round}: filled to {} free",
            fs.free_bytes()
        );
        // Exactly what was acknowledged is there: a retried 4xx never duplicates mail.
        let mut c = logged_in(&server, USER).await;
        let seen = subjects(&mut c).await;
        let visible: BTreeSet<String> = seen.iter().cloned().collect();
        assert_eq!(
            visible.len(),
            seen.len(),
            "round {round}: duplicates {seen:?}"
        );
        assert_eq!(visible, accepted, "round {round}: visible vs answered 250");
        // Deleting works on the full disk and gives the space back.
        for i in 1..=seen.len() {
            let r = c.cmd(&format!("DELE {i}")).await;
            assert!(r.starts_with("+OK"), "DELE {i}: {r}");
        }
        let quit = c.cmd("QUIT").await;
        assert!(quit.starts_with("+OK"), "round {round}: QUIT {quit}");
        let mut c = logged_in(&server, USER).await;
        assert_eq!(stat_count(&c.cmd("STAT").await), 0);
        assert!(c.cmd("QUIT").await.starts_with("+OK"));
        // The space comes back (compaction) and delivery resumes in the next round.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while fs.free_bytes() < RESERVE {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: the space of deleted mail never came back ({} free):\n{}",
                fs.free_bytes(),
                server.log_text()
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        eprintln!(
            "round {round}: {} delivered, {} refused, {} MiB free after deleting",
            accepted.len(),
            refused.len(),
            fs.free_bytes() / (1024 * 1024)
        );
    }
    assert!(server.stop().success(), "clean stop");
    assert!(
        server.log_text().contains("store compacted"),
        "{}",
        server.log_text()
    );
}
