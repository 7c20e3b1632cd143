//! A small pool of dedicated threads for argon2id work. Each thread keeps its argon2
//! working memory between jobs, so memory stays at one buffer per thread (about
//! `memory_kib` each) however many logins arrive; with `spawn_blocking` every job could
//! land on a different thread and the allocator kept each thread's buffer, which grew
//! the server by hundreds of MiB. The pool size also bounds concurrent hashing.

use super::{Block, Credentials, HashParams};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce(&mut Vec<Block>) + Send>;

#[derive(Debug, thiserror::Error)]
#[error("the password hashing pool has stopped")]
pub struct PoolStopped;

pub struct HashPool {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
}

impl HashPool {
    /// Starts `threads` hashing threads (at least one).
    pub fn new(threads: usize) -> std::io::Result<HashPool> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
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
                    }
                })?;
        }
        Ok(HashPool {
            jobs: Mutex::new(Some(tx)),
        })
    }

    async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Vec<Block>) -> R + Send + 'static,
    ) -> Result<R, PoolStopped> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |memory| {
            let _ = tx.send(f(memory));
        });
        {
            let jobs = self.jobs.lock().map_err(|_| PoolStopped)?;
            jobs.as_ref()
                .ok_or(PoolStopped)?
                .send(job)
                .map_err(|_| PoolStopped)?;
        }
        rx.await.map_err(|_| PoolStopped)
    }

    /// Verifies `password`; gives the password back for the verified-login cache.
    pub async fn verify(
        &self,
        creds: Credentials,
        password: Vec<u8>,
    ) -> Result<(bool, Vec<u8>), PoolStopped> {
        self.run(move |memory| {
            (
                super::verify_password_in(&creds, &password, memory),
                password,
            )
        })
        .await
    }

    /// The stand-in work for an unknown user.
    pub async fn dummy(&self, password: Vec<u8>, params: HashParams) -> Result<(), PoolStopped> {
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
        let pool = HashPool::new(2).expect("pool");
        let (ok, back) = pool
            .verify(creds.clone(), b"pw here".to_vec())
            .await
            .expect("run");
        assert!(ok);
        assert_eq!(back, b"pw here");
        let (ok, _) = pool.verify(creds, b"other".to_vec()).await.expect("run");
        assert!(!ok);
        pool.dummy(b"x".to_vec(), params).await.expect("run");
    }
}
