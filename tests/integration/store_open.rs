//! One domain whose store cannot be opened (its sled `conf` made a FIFO, so the open
//! blocks in `open(2)`) stalls only its own logins: another domain's users log in while
//! that open is stuck, on the real server.

use crate::common::{logged_in, pop3s, Options, Server, PASSWORD};
use std::path::Path;
use std::time::{Duration, Instant};

/// Whether a thread of process `pid` waits in a FIFO's open.
fn waiting_on_fifo(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks.filter_map(Result::ok).any(|t| {
                std::fs::read_to_string(t.path().join("wchan")).unwrap_or_default()
                    == "wait_for_partner"
            })
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_stuck_opening_stalls_only_its_own_domain() {
    let mut server = Server::start_with(Options {
        process: true,
        ..Options::default()
    });
    server.add_domain("slow.example");
    server.add_domain("fast.example");
    server.add_user("joe@slow.example", PASSWORD);
    server.add_user("joe@fast.example", PASSWORD);
    // Stopped, every store closes; the next start opens them on first use.
    assert!(server.stop().success());
    let store = server.dir.path().join("data/domains/slow.example");
    let (conf, fifo) = (store.join("conf"), store.join("conf.fifo"));
    std::fs::rename(&conf, store.join("conf.real")).expect("move conf");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    std::fs::hard_link(&fifo, &conf).expect("link the fifo as conf");
    server.spawn();

    let slow = {
        let mut c = pop3s(&server).await;
        tokio::spawn(async move {
            c.cmd("USER joe@slow.example").await;
            c.cmd(&format!("PASS {PASSWORD}")).await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !waiting_on_fifo(server.pid()) {
        assert!(Instant::now() < deadline, "the slow open never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Another domain's user is served meanwhile (Raw's own timeout bounds the wait).
    let mut c = logged_in(&server, "joe@fast.example").await;
    assert!(c.cmd("STAT").await.starts_with("+OK"));
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
    assert!(!slow.is_finished(), "the slow login was let go too early");

    release(&store);
    let answer = tokio::time::timeout(Duration::from_secs(20), slow)
        .await
        .expect("the slow login answers once the open goes on")
        .expect("task");
    assert!(
        answer.starts_with("+OK") || answer.starts_with("-ERR [SYS/TEMP]"),
        "{answer}"
    );
}

/// Puts the real `conf` back and lets the waiting open go on.
fn release(store: &Path) {
    std::fs::rename(store.join("conf.real"), store.join("conf")).expect("conf back");
    drop(
        std::fs::OpenOptions::new()
            .write(true)
            .open(store.join("conf.fifo"))
            .expect("open the fifo"),
    );
    std::fs::remove_file(store.join("conf.fifo")).expect("remove the fifo");
}
