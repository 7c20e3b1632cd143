//! The receiving side of a domain move (`cluster::transfer::receive`) fed arbitrary
//! sender bytes over an in-memory link, into a directory opened once per process. No
//! panic and no hang; the receiver answers in well-formed messages (`K` first, only the
//! kinds it may send, summaries that parse, a give-up only last); a receive that ends in
//! an error leaves no staging copy and serves nothing (a copy it installed stays at epoch
//! 0, for the record to settle); one that succeeds serves the domain at the epoch sent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailgate::cluster::transfer::{receive, AccountSum, Installed};
use mailgate::store::{Directory, StoreOptions};
use std::sync::{Arc, Mutex, OnceLock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DOMAIN: &str = "fuzz.example";

struct Served(Mutex<Vec<(String, u64)>>);

impl Installed for Served {
    fn serving(&self, domain: &str, epoch: u64) {
        self.0
            .lock()
            .expect("not poisoned")
            .push((domain.to_owned(), epoch));
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    directory: Arc<Directory>,
    runtime: tokio::runtime::Runtime,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let options = StoreOptions {
            cache_capacity: 1024 * 1024,
            ..StoreOptions::default()
        };
        let directory = Arc::new(Directory::open(dir.path(), options).expect("directory"));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        Fixture {
            dir,
            directory,
            runtime,
        }
    })
}

/// The receiver's messages: kind and payload each.
fn messages(mut out: &[u8]) -> Vec<(u8, &[u8])> {
    let mut all = Vec::new();
    while !out.is_empty() {
        assert!(out.len() >= 5, "cut message head {out:?}");
        let len = u32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
        assert!(out.len() >= 5 + len, "cut message payload");
        all.push((out[0], &out[5..5 + len]));
        out = &out[5 + len..];
    }
    all
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    assert!(!f.directory.has_domain(DOMAIN));
    let served = Served(Mutex::new(Vec::new()));
    let (result, answers) = f.runtime.block_on(async {
        let (mut near, far) = tokio::io::duplex(64 * 1024);
        let sender = async {
            // The receiver may give up before reading everything.
            let _ = near.write_all(data).await;
            let _ = near.shutdown().await;
            let mut answers = Vec::new();
            near.read_to_end(&mut answers)
                .await
                .expect("reading answers");
            answers
        };
        let receiver = receive(far, f.directory.clone(), DOMAIN, &served);
        tokio::join!(receiver, sender)
    });

    let answers = messages(&answers);
    assert_eq!(answers.first().map(|m| m.0), Some(b'K'), "ready first");
    for (i, (kind, payload)) in answers.iter().enumerate() {
        match kind {
            b'K' | b'i' => assert!(payload.is_empty()),
            b'I' => assert!(payload.len() % 8 == 0 && !payload.is_empty()),
            b'V' => {
                let sums: Vec<AccountSum> = serde_json::from_slice(payload).expect("summary");
                assert!(sums.windows(2).all(|w| w[0].local < w[1].local));
            }
            b'X' => {
                assert_eq!(i + 1, answers.len(), "give-up last");
                assert!(result.is_err());
            }
            k => panic!("receiver sent {:?}", char::from(*k)),
        }
    }

    let staging = f
        .dir
        .path()
        .join("domains")
        .join(format!(".incoming-{DOMAIN}"));
    let served = served.0.into_inner().expect("not poisoned");
    match &result {
        Ok(()) => {
            let epoch = f.directory.epoch(DOMAIN).expect("served domain");
            assert_eq!(served, [(DOMAIN.to_owned(), epoch)]);
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            assert!(served.is_empty());
            assert!(!staging.exists());
            if f.directory.has_domain(DOMAIN) {
                assert_eq!(f.directory.epoch(DOMAIN).expect("installed copy"), 0);
            }
        }
    }
    if f.directory.has_domain(DOMAIN) {
        f.directory
            .remove_domain(DOMAIN)
            .expect("removing the copy");
    }
});
