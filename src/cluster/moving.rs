//! Moving a domain to another replica, run by its home: pre-copy while the domain is
//! served, freeze (record `moving`, epoch + 1, leased), a bounded grace for open
//! sessions and deliveries in DATA, eviction of what is left and a seal of the store,
//! the final delta and its check, install on the target (not yet served), the switch of
//! the record (home = target, epoch + 1), the target serving, and the old copy renamed.
//! Any failure before the switch makes the domain active here again; the target's copy
//! is discarded, or retired by its duties if it was already installed.

use super::transfer::{self, Progress, Sender, TransferError};
use super::{Alpn, Cluster, LinkError, Route};
use crate::store::{Directory, DomainStore, StoreError};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often progress is reported while data is copied.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How long evicted sessions get to let their locks go before the delta starts anyway
/// (the store is sealed by then, so they cannot change anything).
const EVICT_WAIT: Duration = Duration::from_secs(5);
/// How long the switch of the record is retried while Redis does not answer.
const SWITCH_TRIES: u32 = 20;

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("{0} is not a replica of this cluster (see cluster.peers)")]
    UnknownReplica(String),
    #[error("{domain} already lives on {to}")]
    AlreadyThere { domain: String, to: String },
    #[error("{domain} is not served by this replica now: {why}")]
    NotHome { domain: String, why: String },
    #[error("cannot reach {to}: {source}")]
    Link { to: String, source: LinkError },
    #[error("copy to {to} failed: {source}")]
    Transfer { to: String, source: TransferError },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("redis: {0}")]
    Homes(#[from] super::HomesError),
    #[error("the record of {domain} changed under the move: {what}")]
    Raced { domain: String, what: String },
    #[error("{0}")]
    Unsettled(String),
}

/// What a finished move did.
#[derive(Debug, Clone)]
pub struct MoveReport {
    pub accounts: u64,
    pub messages: u64,
    pub bytes: u64,
    /// The whole move.
    pub took: Duration,
    /// From the freeze to the switch: how long the domain was not served.
    pub frozen: Duration,
    /// The domain's epoch on its new home.
    pub epoch: u64,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(StoreError::Io {
            path: "move".into(),
            source: std::io::Error::other(e.to_string()),
        })
    })
}

/// Runs `work`, reporting the progress counters through `say` every second.
async fn reporting<T>(
    work: impl std::future::Future<Output = T>,
    progress: &Progress,
    label: &str,
    say: &(dyn Fn(String) + Send + Sync),
) -> T {
    let started = Instant::now();
    tokio::pin!(work);
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tick.tick() => say(progress_line(label, progress, started.elapsed())),
        }
    }
}

fn progress_line(label: &str, p: &Progress, took: Duration) -> String {
    let bytes = p.bytes.load(Ordering::Relaxed);
    let secs = took.as_secs_f64().max(0.001);
    format!(
        "{label}: {} accounts, {} messages, {:.1} MB in {:.1} s ({:.1} MB/s)",
        p.accounts.load(Ordering::Relaxed),
        p.messages.load(Ordering::Relaxed),
        bytes as f64 / 1e6,
        secs,
        bytes as f64 / 1e6 / secs
    )
}

/// Moves `domain`, homed here, to replica `to`. `grace` bounds how long open sessions
/// and deliveries get to finish once the domain is frozen. Progress goes to `say`.
/// Counted in `mailgate_cluster_moves_total` (and the freeze in
/// `mailgate_cluster_move_frozen_seconds`) once it got past the checks of its request.
pub async fn move_domain(
    cluster: &Cluster,
    directory: &Arc<Directory>,
    domain: &str,
    to: &str,
    grace: Duration,
    say: &(dyn Fn(String) + Send + Sync),
) -> Result<MoveReport, MoveError> {
    let result = run(cluster, directory, domain, to, grace, say).await;
    match &result {
        Ok(report) => cluster.metrics().domain_move(Some(report.frozen)),
        Err(
            MoveError::UnknownReplica(_)
            | MoveError::AlreadyThere { .. }
            | MoveError::NotHome { .. }
            | MoveError::Store(StoreError::UnknownDomain(_) | StoreError::InvalidDomain(_)),
        ) => {}
        Err(_) => cluster.metrics().domain_move(None),
    }
    result
}

async fn run(
    cluster: &Cluster,
    directory: &Arc<Directory>,
    domain: &str,
    to: &str,
    grace: Duration,
    say: &(dyn Fn(String) + Send + Sync),
) -> Result<MoveReport, MoveError> {
    let domain = crate::wire::address::validate_domain(domain).map_err(StoreError::from)?;
    if !cluster.link.peer_names().any(|p| p == to) {
        return Err(MoveError::UnknownReplica(to.to_owned()));
    }
    let not_home = |why: &str| MoveError::NotHome {
        domain: domain.clone(),
        why: why.to_owned(),
    };
    match cluster.route(&domain, true).await {
        Route::Local => {}
        Route::Unavailable(why) => return Err(not_home(why.describe())),
        Route::Forward(home) => return Err(not_home(&format!("its home is {home}"))),
    }
    let Some(epoch) = cluster.local_epoch(&domain) else {
        return Err(StoreError::UnknownDomain(domain).into());
    };
    if to == cluster.name() {
        return Err(MoveError::AlreadyThere {
            domain,
            to: to.to_owned(),
        });
    }
    let Some(_moving) = cluster.start_move(&domain) else {
        return Err(not_home("another move of it is running"));
    };
    let (dir, name) = (directory.clone(), domain.clone());
    let store = blocking(move || dir.domain(&name)).await?;
    let started = Instant::now();

    let link = |source| MoveError::Link {
        to: to.to_owned(),
        source,
    };
    let mut stream = cluster.connect(to, Alpn::Admin).await.map_err(link)?;
    let failed = |source| MoveError::Transfer {
        to: to.to_owned(),
        source,
    };
    stream
        .write_all(&transfer::request_line(&domain))
        .await
        .map_err(|e| failed(TransferError::Io(e)))?;
    let mut sender = Sender::start(stream).await.map_err(failed)?;

    // 1. Pre-copy, the domain still served.
    say(format!(
        "moving {domain} from {} to {to}: copying while it is served",
        cluster.name()
    ));
    let progress = Progress::default();
    reporting(
        sender.pass(&store, None, &progress),
        &progress,
        "pre-copy",
        say,
    )
    .await
    .map_err(failed)?;
    say(progress_line("pre-copy done", &progress, started.elapsed()));

    // 2. Freeze: the store's epoch goes up first, so a crash from here on leaves a copy
    //    whose epoch is at least the record's.
    let frozen_at = Instant::now();
    let frozen = epoch + 1;
    let (dir, name) = (directory.clone(), domain.clone());
    blocking(move || dir.set_epoch(&name, frozen)).await?;
    let lease = cluster.ttl();
    let homes = cluster.homes();
    match homes.freeze(&domain, epoch, to, lease).await {
        Ok(Ok(e)) if e == frozen => {}
        other => {
            let (dir, name) = (directory.clone(), domain.clone());
            blocking(move || dir.set_epoch(&name, epoch)).await?;
            sender.abandon("the domain could not be frozen").await;
            return Err(match other {
                Err(e) => e.into(),
                Ok(Ok(e)) => MoveError::Raced {
                    domain,
                    what: format!("frozen at epoch {e}, expected {frozen}"),
                },
                Ok(Err(record)) => MoveError::Raced {
                    domain,
                    what: format!("record is {record:?}"),
                },
            });
        }
    }
    cluster.set_local_epoch(&domain, frozen);
    say(format!(
        "frozen at epoch {frozen}: new sessions and deliveries are answered try-later; open ones get {} s",
        grace.as_secs()
    ));
    info!(domain, to, epoch = frozen, "domain frozen for its move");
    let renewing = CancellationToken::new();
    let renewer = {
        let (homes, domain, stop) = (homes.clone(), domain.clone(), renewing.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(lease / 3);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = every.tick() => {
                        if let Err(e) = homes.renew_move(&domain, frozen, lease).await {
                            warn!(domain, error = %e, "cannot renew the move's lease");
                        }
                    }
                }
            }
        })
    };
    let stop = |e: MoveError| {
        renewing.cancel();
        renewer.abort();
        e
    };

    let delta_progress = Progress::default();
    let delta = final_delta(
        cluster,
        directory,
        &store,
        &domain,
        grace,
        &mut sender,
        say,
        to,
        &delta_progress,
    )
    .await;
    if let Err(e) = delta {
        warn!(domain, to, error = %e, "move failed before the switch; the domain stays here");
        sender.abandon(&e.to_string()).await;
        let thawed = thaw(cluster, directory, &domain, frozen).await;
        return Err(stop(match thawed {
            Ok(()) => e,
            Err(t) => MoveError::Unsettled(format!("{e}; and {t}")),
        }));
    }
    let sum = |f: fn(&Progress) -> &std::sync::atomic::AtomicU64| {
        f(&progress).load(Ordering::Relaxed) + f(&delta_progress).load(Ordering::Relaxed)
    };
    let (accounts, messages, bytes) = (
        delta_progress.accounts.load(Ordering::Relaxed),
        sum(|p| &p.messages),
        sum(|p| &p.bytes),
    );

    // 4. Switch. Retried while Redis does not answer: until it does, the domain is
    //    frozen everywhere and nothing is lost.
    let mut tries = 0;
    let switched = loop {
        match homes.finish_move(&domain, frozen, to).await {
            Ok(result) => break Ok(result),
            Err(e) if tries < SWITCH_TRIES => {
                tries += 1;
                warn!(domain, error = %e, "cannot switch the record yet; retrying");
                tokio::time::sleep(lease / 10).await;
            }
            Err(e) => break Err(e),
        }
    };
    match switched {
        Ok(Ok(())) => {}
        Ok(Err(record)) => {
            // Not switched: the lease ran out and the record went back to this replica
            // (or changed otherwise). The target's copy stays unserved and is retired.
            sender.abandon("the record was not switched").await;
            let thawed = thaw(cluster, directory, &domain, frozen).await;
            let e = MoveError::Raced {
                domain,
                what: format!("record is {record:?} at the switch"),
            };
            return Err(stop(match thawed {
                Ok(()) => e,
                Err(t) => MoveError::Unsettled(format!("{e}; and {t}")),
            }));
        }
        Err(e) => {
            // Unknown whether it switched: this copy stays sealed; the duties settle it
            // by the record once Redis answers (retired if the target is home, unsealed
            // if this replica still is).
            cluster.unsettled(&domain);
            return Err(stop(MoveError::Unsettled(format!(
                "cannot tell whether the record of {domain} was switched to {to} ({e}); \
                 it stays frozen here until Redis answers and the record decides"
            ))));
        }
    }
    let took_frozen = frozen_at.elapsed();
    renewing.cancel();
    renewer.abort();
    info!(
        domain,
        to,
        epoch = frozen + 1,
        frozen_ms = took_frozen.as_millis() as u64,
        "domain moved"
    );
    // 5. The target serves; if it does not hear it, its duties adopt the record's epoch.
    if let Err(e) = sender.go(frozen + 1).await {
        warn!(domain, to, error = %e, "the new home did not confirm; it serves after its next announcement");
    }
    drop(store);
    let (dir, name) = (directory.clone(), domain.clone());
    match blocking(move || dir.retire_domain(&name)).await {
        Ok(path) => say(format!("old copy kept as {}", path.display())),
        Err(e) => warn!(domain, error = %e, "cannot rename the old copy; it is not served"),
    }
    cluster.moved_away(&domain);
    say(format!(
        "moved {domain} to {to}: {accounts} accounts, {messages} messages, {:.1} MB copied in {:.1} s; \
         unavailable for {:.2} s; epoch {}",
        bytes as f64 / 1e6,
        started.elapsed().as_secs_f64(),
        took_frozen.as_secs_f64(),
        frozen + 1
    ));
    Ok(MoveReport {
        accounts,
        messages,
        bytes,
        took: started.elapsed(),
        frozen: took_frozen,
        epoch: frozen + 1,
    })
}

/// Steps 2–3 after the freeze: grace, eviction, seal, final delta, check, install.
#[allow(clippy::too_many_arguments)]
async fn final_delta<S>(
    cluster: &Cluster,
    directory: &Arc<Directory>,
    store: &Arc<DomainStore>,
    domain: &str,
    grace: Duration,
    sender: &mut Sender<S>,
    say: &(dyn Fn(String) + Send + Sync),
    to: &str,
    progress: &Progress,
) -> Result<(), MoveError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let pattern = crate::locks::domain_lock_pattern(domain);
    let homes = cluster.homes();
    let quiet = |deadline: Instant| {
        let (pattern, store) = (pattern.clone(), store.clone());
        async move {
            loop {
                let locks = homes.count_keys(&pattern).await.unwrap_or(usize::MAX);
                let pending = store.pending_count();
                if locks == 0 && pending == 0 {
                    return (0, 0);
                }
                if Instant::now() >= deadline {
                    return (locks, pending);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let (locks, pending) = quiet(Instant::now() + grace).await;
    if locks > 0 || pending > 0 {
        say(format!(
            "grace over: ending {} open sessions without UPDATE; {pending} deliveries in progress will be refused",
            if locks == usize::MAX { "the".to_owned() } else { locks.to_string() },
        ));
    }
    cluster.evict(domain);
    let (dir, name) = (directory.clone(), domain.to_owned());
    blocking(move || dir.seal(&name)).await?;
    let (locks, _) = quiet(Instant::now() + EVICT_WAIT).await;
    if locks > 0 {
        warn!(
            domain,
            locks, "maildrop locks still held after eviction; the store is sealed"
        );
    }
    // 3. Final delta on the sealed store, then the check.
    let s = store.clone();
    let floor = blocking(move || s.id_floor()).await?;
    let failed = |source| MoveError::Transfer {
        to: to.to_owned(),
        source,
    };
    let copy = reporting(
        sender.pass(store, Some(floor), progress),
        progress,
        "final delta",
        say,
    )
    .await
    .map_err(failed)?;
    let s = store.clone();
    let mine = blocking(move || transfer::summarize(&s)).await?;
    if let Some(diff) = transfer::compare(&mine, &copy) {
        return Err(failed(TransferError::Mismatch(diff)));
    }
    let messages: u64 = mine.iter().map(|a| a.messages).sum();
    say(format!(
        "final delta: {} messages sent; verified {} accounts, {messages} messages, UIDLs equal",
        progress.messages.load(Ordering::Relaxed),
        mine.len()
    ));
    sender.install().await.map_err(failed)
}

/// Makes the domain active here again after a failed move.
async fn thaw(
    cluster: &Cluster,
    directory: &Arc<Directory>,
    domain: &str,
    frozen: u64,
) -> Result<(), MoveError> {
    match cluster
        .homes()
        .finish_move(domain, frozen, cluster.name())
        .await
    {
        Ok(Ok(())) => {
            let (dir, name) = (directory.clone(), domain.to_owned());
            blocking(move || dir.unseal(&name)).await?;
            info!(
                domain,
                epoch = frozen,
                "move abandoned; the domain is active here again"
            );
            Ok(())
        }
        Ok(Err(record)) => {
            cluster.unsettled(domain);
            Err(MoveError::Raced {
                domain: domain.to_owned(),
                what: format!("record is {record:?} after the failure"),
            })
        }
        Err(e) => {
            // The lease expires and the next announcement makes it active here again.
            cluster.unsettled(domain);
            Err(e.into())
        }
    }
}
