//! A small pool of dedicated threads for argon2id work, sized from the CPUs and a memory
//! budget, with a bounded queue. Each thread keeps its argon2 working memory between
//! jobs, so memory stays at one buffer per thread (about `memory_kib` each) however many
//! logins arrive; with `spawn_blocking` every job could land on a different thread and
//! the allocator kept each thread's buffer, which grew the server by hundreds of MiB.
//! A job that finds the queue full is refused at once (`Busy`) rather than waiting.

use super::{Block, Credentials, HashParams};
use std::path::Path;
use std::sync::mpsc::{self, TrySendError};
use std::sync::{Arc, Mutex};
use tracing::warn;

type Job = Box<dyn FnOnce(&mut Vec<Block>) + Send>;

/// cgroup v2's memory limit of this process's cgroup (as a container sees it).
const CGROUP_V2_MEMORY_MAX: &str = "/sys/fs/cgroup/memory.max";
/// cgroup v1's.
const CGROUP_V1_MEMORY_LIMIT: &str = "/sys/fs/cgroup/memory/memory.limit_in_bytes";
/// cgroup v1 reports "no limit" as a huge number (the page-rounded i64::MAX); anything
/// from here up is taken as no limit.
const CGROUP_UNLIMITED: u64 = 1 << 60;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("the password hashing pool has stopped")]
    Stopped,
    #[error("the password hashing queue is full")]
    Busy,
}

/// What verifying a password found.
pub struct Verified {
    pub ok: bool,
    /// The password, given back for the verified-login cache.
    pub password: Vec<u8>,
    /// New credentials at the configured costs, when the password was right and the
    /// stored ones were made with less (`auth::needs_upgrade`); `None` if making them
    /// failed too (logged).
    pub upgraded: Option<Credentials>,
}

pub struct HashPool {
    jobs: Mutex<Option<mpsc::SyncSender<Job>>>,
    params: HashParams,
    /// Whether a legacy hash (`auth::is_legacy`) is replaced at a right password
    /// (`[auth] upgrade_legacy_hashes`).
    upgrade_legacy: bool,
}

/// How many hashing threads to start: `requested` (0 = one per CPU), but no more than
/// fit in `budget` bytes at `per_thread` bytes each, and at least one.
pub fn thread_count(requested: usize, cpus: usize, budget: Option<u64>, per_thread: u64) -> usize {
    let wanted = if requested == 0 { cpus } else { requested };
    let fits = budget.map_or(usize::MAX, |b| {
        usize::try_from(b / per_thread.max(1)).unwrap_or(usize::MAX)
    });
    wanted.min(fits).max(1)
}

/// The memory the hashing threads may use: `configured_mib` when set, else half the
/// cgroup's memory limit (the rest is for the stores' caches and the connections), else
/// no bound.
pub fn memory_budget(configured_mib: u64, cgroup_limit: Option<u64>) -> Option<u64> {
    if configured_mib > 0 {
        return Some(configured_mib.saturating_mul(1024 * 1024));
    }
    cgroup_limit.map(|limit| limit / 2)
}

/// The memory limit of this process's cgroup (v2, else v1), if it has one.
pub fn cgroup_memory_limit() -> Option<u64> {
    [CGROUP_V2_MEMORY_MAX, CGROUP_V1_MEMORY_LIMIT]
        .iter()
        .find_map(|path| std::fs::read_to_string(Path::new(path)).ok())
        .and_then(|text| parse_memory_limit(&text))
}

/// A cgroup memory limit file's value: bytes, or `None` for "max" or v1's no-limit value.
fn parse_memory_limit(text: &str) -> Option<u64> {
    text.trim()
        .parse::<u64>()
        .ok()
        .filter(|&bytes| bytes > 0 && bytes < CGROUP_UNLIMITED)
}

impl HashPool {
    /// Starts `threads` hashing threads (at least one) with room for `queue` waiting
    /// jobs (at least one). `params` are the configured costs: what upgrades are made
    /// with, what bounds the hashes verified (`HashParams::ceiling`), and the working
    /// memory a thread keeps between jobs.
    pub fn new(threads: usize, queue: usize, params: HashParams) -> std::io::Result<HashPool> {
        let (tx, rx) = mpsc::sync_channel::<Job>(queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let kept_blocks = params.block_count();
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("mailgate-hash-{i}"))
                .spawn(move || {
                    let mut memory = Vec::new();
                    loop {
                        // The lock is held only while waiting for the next job.
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(&mut memory),
                            Err(_) => return,
                        }
                        // A costlier stored hash grew the buffer: give that back.
                        if memory.len() > kept_blocks {
                            memory.truncate(kept_blocks);
                            memory.shrink_to_fit();
                        }
                    }
                })?;
        }
        Ok(HashPool {
            jobs: Mutex::new(Some(tx)),
            params,
            upgrade_legacy: true,
        })
    }

    /// Whether verifications replace legacy hashes (on unless turned off here).
    pub fn upgrading_legacy(mut self, on: bool) -> HashPool {
        self.upgrade_legacy = on;
        self
    }

    async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Vec<Block>) -> R + Send + 'static,
    ) -> Result<R, PoolError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |memory| {
            let _ = tx.send(f(memory));
        });
        {
            let jobs = self.jobs.lock().map_err(|_| PoolError::Stopped)?;
            match jobs.as_ref().ok_or(PoolError::Stopped)?.try_send(job) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => return Err(PoolError::Busy),
                Err(TrySendError::Disconnected(_)) => return Err(PoolError::Stopped),
            }
        }
        rx.await.map_err(|_| PoolError::Stopped)
    }

    /// Verifies `password` (argon2, or a legacy scheme); when it is right and `creds`
    /// were made with less than the configured costs or hold a legacy hash (unless
    /// legacy upgrades are off), also makes their replacement (in the same job: the
    /// password is at hand only now).
    pub async fn verify(
        &self,
        creds: Credentials,
        password: Vec<u8>,
    ) -> Result<Verified, PoolError> {
        let (params, upgrade_legacy) = (self.params, self.upgrade_legacy);
        self.run(move |memory| {
            let ok = super::verify_password_in(&creds, &password, &params, memory);
            let upgrade = ok
                && super::needs_upgrade(&creds, &params)
                && (upgrade_legacy || !super::is_legacy(&creds));
            let upgraded = upgrade
                .then(|| {
                    // Making a hash allocates its own memory: free ours meanwhile.
                    memory.clear();
                    memory.shrink_to_fit();
                    super::upgraded(&creds, &password, &params)
                        .inspect_err(|e| warn!(error = %e, "cannot upgrade a password hash"))
                        .ok()
                })
                .flatten();
            Verified {
                ok,
                password,
                upgraded,
            }
        })
        .await
    }

    /// The stand-in work for an unknown user.
    pub async fn dummy(&self, password: Vec<u8>) -> Result<(), PoolError> {
        let params = self.params;
        self.run(move |memory| super::dummy_verify_in(&password, &params, memory))
            .await
    }
}

impl Drop for HashPool {
    fn drop(&mut self) {
        // Closing the channel ends the threads once they finish their current job.
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.take();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn verifies_on_the_pool() {
        let params = HashParams::cheap();
        let creds = super::super::make_credentials("pw here", &params).expect("hash");
        let pool = HashPool::new(2, 8, params).expect("pool");
        let verified = pool
            .verify(creds.clone(), b"pw here".to_vec())
            .await
            .expect("run");
        assert!(verified.ok);
        assert!(verified.upgraded.is_none());
        assert_eq!(verified.password, b"pw here");
        let verified = pool.verify(creds, b"other".to_vec()).await.expect("run");
        assert!(!verified.ok);
        pool.dummy(b"x".to_vec()).await.expect("run");
    }

    #[tokio::test]
    async fn a_right_password_upgrades_weaker_credentials() {
        let old = HashParams::cheap();
        let creds = super::super::make_credentials("pw", &old).expect("hash");
        let current = HashParams {
            iterations: 2,
            scram_iterations: 5000,
            ..old
        };
        let pool = HashPool::new(1, 8, current).expect("pool");
        let wrong = pool
            .verify(creds.clone(), b"no".to_vec())
            .await
            .expect("run");
        assert!(!wrong.ok && wrong.upgraded.is_none());
        let right = pool.verify(creds, b"pw".to_vec()).await.expect("run");
        let new = right.upgraded.expect("upgraded");
        assert!(new.phc.contains("m=1024,t=2,p=1"), "{}", new.phc);
        assert_eq!(new.scram.map(|k| k.iterations), Some(5000));
    }

    /// A legacy hash verifies on the pool and is replaced by argon2id with SCRAM keys,
    /// unless legacy upgrades are off; argon2id hashes below the cost are upgraded either
    /// way. The hashes: bcrypt made with libxcrypt (`crypt.crypt('pencil', '$2b$04$…')`),
    /// `doveadm pw -s MD5-CRYPT -p pencil`, `mkpasswd -m yescrypt pencil`.
    #[tokio::test]
    async fn legacy_hashes_are_upgraded_with_scram_keys_unless_turned_off() {
        let params = HashParams::cheap();
        let on = HashPool::new(1, 8, params).expect("pool");
        let off = HashPool::new(1, 8, params)
            .expect("pool")
            .upgrading_legacy(false);
        for field in [
            "{BLF-CRYPT}$2b$04$abcdefghijklmnopqrstuu/FyAyuZSl3DbPdvio4KrIBdz2k2yhV2",
            "{MD5-CRYPT}$1$87ZDym/5$k7Pq2zieab4.SxJnA2uxE0",
            "{CRYPT}$y$j9T$VtniJlJWZmH3t9uKXrlGz.$6UUMJTn3v628S11k9zJRE3Xh4VBQ/mpCPHCwpuVTtq2",
        ] {
            let legacy = super::super::credentials_from_dovecot(field, &params).expect("import");
            assert!(super::super::is_legacy(&legacy), "{field}");
            let right = on
                .verify(legacy.clone(), b"pencil".to_vec())
                .await
                .expect("run");
            assert!(right.ok, "{field}");
            let new = right.upgraded.expect("upgraded");
            assert!(new.phc.starts_with("$argon2id$"), "{}", new.phc);
            assert!(new.scram.is_some());
            assert!(super::super::verify_password(&new, b"pencil", &params));
            let wrong = on
                .verify(legacy.clone(), b"pencil2".to_vec())
                .await
                .expect("run");
            assert!(!wrong.ok && wrong.upgraded.is_none(), "{field}");
            let kept = off.verify(legacy, b"pencil".to_vec()).await.expect("run");
            assert!(kept.ok && kept.upgraded.is_none(), "{field}");
        }
        let weak = super::super::make_credentials("pw", &params).expect("hash");
        let stronger = HashParams {
            iterations: 2,
            ..params
        };
        let off = HashPool::new(1, 8, stronger)
            .expect("pool")
            .upgrading_legacy(false);
        let cost = off.verify(weak, b"pw".to_vec()).await.expect("run");
        assert!(cost.upgraded.is_some(), "argon2id cost upgrades stay on");
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let params = HashParams::cheap();
        let pool = Arc::new(HashPool::new(1, 1, params).expect("pool"));
        // Hold the only thread until released, then fill the one queue slot.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let holder = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.run(move |_| {
                    let _ = started_tx.send(());
                    let _ = held.recv();
                })
                .await
            })
        };
        started.await.expect("holder started");
        // Polled once, the job is sent to the queue (its one slot) and waits there.
        let queued = pool.dummy(b"q".to_vec());
        tokio::pin!(queued);
        tokio::select! {
            biased;
            done = &mut queued => panic!("ran with the only thread held: {done:?}"),
            () = std::future::ready(()) => {}
        }
        assert!(matches!(
            pool.dummy(b"x".to_vec()).await,
            Err(PoolError::Busy)
        ));
        release.send(()).expect("release");
        holder.await.expect("join").expect("holder ran");
        queued.await.expect("queued job ran");
        pool.dummy(b"y".to_vec()).await.expect("room again");
    }

    #[test]
    fn threads_follow_cpus_request_and_memory_budget() {
        const MIB: u64 = 1024 * 1024;
        // Auto: one per CPU, unless the budget holds fewer.
        assert_eq!(thread_count(0, 64, None, 64 * MIB), 64);
        assert_eq!(thread_count(0, 64, Some(256 * MIB), 64 * MIB), 4);
        assert_eq!(thread_count(0, 2, Some(256 * MIB), 64 * MIB), 2);
        // A request above the budget is cut to it; at least one thread always.
        assert_eq!(thread_count(64, 2, Some(128 * MIB), 64 * MIB), 2);
        assert_eq!(thread_count(64, 2, None, 64 * MIB), 64);
        assert_eq!(thread_count(3, 64, Some(MIB), 64 * MIB), 1);
        assert_eq!(thread_count(0, 0, Some(0), 0), 1);

        assert_eq!(memory_budget(100, Some(512 * MIB)), Some(100 * MIB));
        assert_eq!(memory_budget(0, Some(512 * MIB)), Some(256 * MIB));
        assert_eq!(memory_budget(0, None), None);
    }

    #[test]
    fn cgroup_limits_parse() {
        assert_eq!(parse_memory_limit("536870912\n"), Some(536_870_912));
        assert_eq!(parse_memory_limit("max\n"), None);
        assert_eq!(parse_memory_limit("9223372036854771712\n"), None);
        assert_eq!(parse_memory_limit("0"), None);
        assert_eq!(parse_memory_limit(""), None);
    }
}
