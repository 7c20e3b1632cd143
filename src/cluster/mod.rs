//! Several replicas serving the same domains: where each domain lives (its home,
//! recorded in Redis: `homes`), which replica a new domain goes to (a pin, else
//! rendezvous hashing: `hash`), the mutual-TLS link between replicas (`link`) and what a
//! forwarded connection says first (`preamble`). [`Cluster`] answers the one question
//! the protocols ask — serve this domain here, forward it, or answer "try later" — and
//! keeps this replica's claims on its copies current. It forwards nothing itself: the
//! protocols relay their own bytes. Must not name the protocols, the server or start-up.

pub mod frame;
pub mod hash;
pub mod homes;
pub mod link;
pub mod moving;
pub mod preamble;
pub mod transfer;

pub use homes::{Announced, Record, State};
pub use link::{Alpn, Link, LinkError};
pub use preamble::Preamble;

use crate::config::Config;
use crate::metrics::{ForwardProtocol, ForwardResult, HomeState, Metrics};
use crate::redis_conn::RedisConn;
use crate::store::{Directory, StoreError};
use homes::{Homes, HomesError};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How long a read record is used before routing reads it again.
const ROUTE_CACHE: Duration = Duration::from_secs(1);
/// An idle POP3 link is reused within this long; a home closes one idle for
/// [`LINK_IDLE`], so a front never picks one the home is about to drop (and retries on a
/// fresh connection when it did anyway).
const POOL_IDLE: Duration = Duration::from_secs(20);
/// How long a home keeps an idle POP3 link open for the next session.
pub const LINK_IDLE: Duration = Duration::from_secs(30);
/// Most idle POP3 links kept per peer.
const POOL_MAX: usize = 32;
/// A claim outlives its last announcement this many lock TTLs: a replica that stopped
/// announcing a copy (stopped, or its copy removed) gives up a held domain after that.
const CLAIMS_PER_TTL: u32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Homes(#[from] HomesError),
    #[error("reading cluster.secret_file {path}: {source}")]
    Secret {
        path: String,
        source: std::io::Error,
    },
    #[error("cluster.secret_file {0} holds fewer than 32 bytes")]
    ShortSecret(String),
    #[error("domain {domain} already exists (home {home})")]
    Exists { domain: String, home: String },
    #[error("no replica is up to take domain {0}")]
    NoReplica(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What to do with a domain's session or delivery here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Serve it from this replica's store (or, for a domain nobody hosts, answer as for an
    /// unknown name).
    Local,
    /// Hand it to the home replica of that name.
    Forward(String),
    /// Answer "try again later".
    Unavailable(Unavailable),
}

/// Why a domain cannot be served now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// Two copies with the same epoch: an operator must remove one.
    Held,
    /// Being moved.
    Moving,
    /// No valid view of the record: Redis has not answered for `locks.ttl_secs`, or a
    /// replica has not re-announced since Redis lost its data.
    NoView,
    /// The record names this replica but its copy's epoch differs, or this replica was
    /// reached as a home for a domain homed elsewhere.
    NotHere,
}

impl Unavailable {
    pub fn describe(self) -> &'static str {
        match self {
            Unavailable::Held => "domain held: two replicas hold copies",
            Unavailable::Moving => "domain is being moved",
            Unavailable::NoView => "domain homes unknown for now",
            Unavailable::NotHere => "domain not served by this replica",
        }
    }
}

/// The cluster-wide server secret: SHA-256 of `cluster.secret_file`, so any file of 32
/// bytes or more (e.g. a Kubernetes Secret) gives the same key on every replica.
pub fn load_secret(path: &str) -> Result<[u8; 32], ClusterError> {
    use sha2::Digest;
    let bytes = std::fs::read(path).map_err(|source| ClusterError::Secret {
        path: path.to_owned(),
        source,
    })?;
    if bytes.len() < 32 {
        return Err(ClusterError::ShortSecret(path.to_owned()));
    }
    Ok(sha2::Sha256::digest(&bytes).into())
}

struct View {
    record: Option<Record>,
    incomplete: bool,
    read: Instant,
}

/// This replica's part in the cluster.
pub struct Cluster {
    pub link: Link,
    homes: Homes,
    name: String,
    pins: std::collections::BTreeMap<String, String>,
    /// How long a view of a record stays valid (`locks.ttl_secs`).
    ttl: Duration,
    views: Mutex<HashMap<String, View>>,
    /// The copies on this replica's volume and their store epochs, as of the last
    /// announcement (or creation).
    local: Mutex<HashMap<String, u64>>,
    metrics: Arc<Metrics>,
    /// Idle POP3 links to each peer, most recently used last.
    pool: Mutex<HashMap<String, Vec<(Pooled, Instant)>>>,
    /// Per domain, cancelled to end the domain's open POP3 sessions here (a move's
    /// eviction); a child of the server's abort token.
    evictions: Mutex<HashMap<String, CancellationToken>>,
    /// Domains with a move running from here.
    moves: Mutex<HashSet<String>>,
    /// Domains whose move ended without knowing the record's last word: their copy
    /// stays sealed until a pass of the duties reads the record.
    unsettled: Mutex<HashSet<String>>,
}

/// A move of one domain running from this replica; ends on drop.
pub struct MoveGuard<'a> {
    cluster: &'a Cluster,
    domain: String,
}

impl Drop for MoveGuard<'_> {
    fn drop(&mut self) {
        lock(&self.cluster.moves).remove(&self.domain);
        // Sessions logging in from now on get a fresh eviction token.
        lock(&self.cluster.evictions).remove(&self.domain);
    }
}

/// What a rebalance or drain would do.
#[derive(Debug, Default)]
pub struct Plan {
    pub moves: Vec<Planned>,
    /// Domains off their target that cannot move now, and why.
    pub stuck: Vec<(String, String)>,
}

/// One planned move.
#[derive(Debug, Clone)]
pub struct Planned {
    pub domain: String,
    pub from: String,
    pub to: String,
}

/// A replica link whose last session ended cleanly.
pub type Pooled = tokio_rustls::client::TlsStream<TcpStream>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Cluster {
    /// Reads the link's certificates; touches neither Redis nor the stores.
    pub fn open(
        config: &Config,
        redis: RedisConn,
        metrics: Arc<Metrics>,
    ) -> Result<Cluster, ClusterError> {
        let link = Link::load(&config.cluster)?;
        let ttl = config.locks.ttl();
        let others: Vec<&str> = link
            .peer_names()
            .filter(|p| *p != config.cluster.name)
            .collect();
        metrics.cluster_peers(&others);
        Ok(Cluster {
            homes: Homes::new(redis, &config.cluster.name, ttl * CLAIMS_PER_TTL),
            link,
            name: config.cluster.name.clone(),
            pins: config.cluster.pins.clone(),
            ttl,
            views: Mutex::new(HashMap::new()),
            local: Mutex::new(HashMap::new()),
            metrics,
            pool: Mutex::new(HashMap::new()),
            evictions: Mutex::new(HashMap::new()),
            moves: Mutex::new(HashSet::new()),
            unsettled: Mutex::new(HashSet::new()),
        })
    }

    /// The epoch of this replica's copy of `domain`, as last read.
    pub fn local_epoch(&self, domain: &str) -> Option<u64> {
        lock(&self.local).get(domain).copied()
    }

    /// Records the epoch of this replica's copy just written (a freeze).
    pub fn set_local_epoch(&self, domain: &str, epoch: u64) {
        lock(&self.local).insert(domain.to_owned(), epoch);
        lock(&self.views).remove(domain);
    }

    /// Marks a move of `domain` running; `None` if one already is.
    pub fn start_move(&self, domain: &str) -> Option<MoveGuard<'_>> {
        lock(&self.moves)
            .insert(domain.to_owned())
            .then(|| MoveGuard {
                cluster: self,
                domain: domain.to_owned(),
            })
    }

    /// The token whose cancellation ends `domain`'s open POP3 sessions on this replica.
    pub fn eviction(&self, domain: &str, parent: &CancellationToken) -> CancellationToken {
        lock(&self.evictions)
            .entry(domain.to_ascii_lowercase())
            .or_insert_with(|| parent.child_token())
            .clone()
    }

    /// Ends `domain`'s open POP3 sessions here (without UPDATE), and those that log in
    /// until the move running from here ends (the cancelled token stays until then).
    pub fn evict(&self, domain: &str) {
        lock(&self.evictions)
            .entry(domain.to_owned())
            .or_default()
            .cancel();
    }

    /// A move of `domain` ended without a known outcome: settled by the next pass.
    pub fn unsettled(&self, domain: &str) {
        lock(&self.unsettled).insert(domain.to_owned());
    }

    /// `domain` moved to another replica: this replica's copy is gone.
    pub fn moved_away(&self, domain: &str) {
        lock(&self.local).remove(domain);
        lock(&self.views).remove(domain);
    }

    /// Whether a commit to `domain`'s store may happen here now: this replica serves it,
    /// or it is being moved from here and its store is not yet sealed (sessions and
    /// deliveries already under way finish in the grace of a move; the seal stops them
    /// after it).
    pub async fn may_commit(&self, domain: &str) -> bool {
        match self.route(domain, true).await {
            Route::Local => true,
            Route::Unavailable(Unavailable::Moving) => {
                let domain = domain.to_ascii_lowercase();
                let local = self.local_epoch(&domain);
                lock(&self.views)
                    .get(&domain)
                    .and_then(|v| v.record.as_ref())
                    .is_some_and(|r| r.home == self.name && Some(r.epoch) == local)
            }
            _ => false,
        }
    }

    /// This replica's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn homes(&self) -> &Homes {
        &self.homes
    }

    /// `locks.ttl_secs`: how long a view of a record may be used.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// How many domains this replica is the active home of, as last announced.
    pub fn homed_count(&self) -> usize {
        let local = lock(&self.local);
        lock(&self.views)
            .iter()
            .filter(|(d, v)| {
                v.record.as_ref().is_some_and(|r| {
                    r.home == self.name
                        && r.state == State::Active
                        && local.get(*d) == Some(&r.epoch)
                })
            })
            .count()
    }

    /// Where `domain` is served. `forwarded`: the session already crossed the link, so
    /// it may only be served here.
    pub async fn route(&self, domain: &str, forwarded: bool) -> Route {
        let domain = domain.to_ascii_lowercase();
        let Some((record, incomplete)) = self.view(&domain).await else {
            return Route::Unavailable(Unavailable::NoView);
        };
        let local_epoch = lock(&self.local).get(&domain).copied();
        decide(&Seen {
            record: record.as_ref(),
            incomplete,
            local_epoch,
            me: &self.name,
            forwarded,
            known: |p| self.link.peer_names().any(|n| n == p),
        })
    }

    /// The record as last read if that was recent, else read now; `None` when Redis
    /// has not answered for longer than the view may be used.
    async fn view(&self, domain: &str) -> Option<(Option<Record>, bool)> {
        if let Some(v) = lock(&self.views).get(domain) {
            if v.read.elapsed() < ROUTE_CACHE {
                return Some((v.record.clone(), v.incomplete));
            }
        }
        match self.homes.read(domain, self.link.peer_names()).await {
            Ok(read) => {
                let out = (read.record.clone(), read.incomplete);
                // Only real domains are remembered: names a client makes up must not
                // grow the map.
                if read.record.is_some() {
                    lock(&self.views).insert(
                        domain.to_owned(),
                        View {
                            record: read.record,
                            incomplete: read.incomplete,
                            read: Instant::now(),
                        },
                    );
                } else {
                    lock(&self.views).remove(domain);
                }
                Some(out)
            }
            Err(e) => {
                warn!(domain, error = %e, "cannot read the domain's home");
                let views = lock(&self.views);
                let v = views.get(domain)?;
                (v.read.elapsed() < self.ttl).then(|| (v.record.clone(), v.incomplete))
            }
        }
    }

    fn remember(&self, domain: &str, record: Record) {
        lock(&self.views).insert(
            domain.to_owned(),
            View {
                record: Some(record),
                incomplete: false,
                read: Instant::now(),
            },
        );
    }

    /// Connects to `peer` for `protocol`, counting the attempt.
    pub async fn connect(
        &self,
        peer: &str,
        alpn: Alpn,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, LinkError> {
        match self.link.connect(peer, alpn).await {
            Ok((stream, took)) => {
                self.metrics.peer_connect(peer, Some(took));
                Ok(stream)
            }
            Err(e) => {
                self.metrics.peer_connect(peer, None);
                self.metrics
                    .forward(peer, forward_protocol(alpn), ForwardResult::Unreachable);
                warn!(peer, error = %e, "cannot reach the home replica");
                Err(e)
            }
        }
    }

    /// A POP3 link to `peer`: an idle one from an earlier session if there is one
    /// (`true`), else a new connection.
    pub async fn connect_pop3(&self, peer: &str) -> Result<(Pooled, bool), LinkError> {
        let idle = {
            let mut pool = lock(&self.pool);
            let links = pool.entry(peer.to_owned()).or_default();
            links.retain(|(_, since)| since.elapsed() < POOL_IDLE);
            links.pop()
        };
        if let Some((link, _)) = idle {
            return Ok((link, true));
        }
        Ok((self.connect(peer, Alpn::Pop3).await?, false))
    }

    /// Keeps a POP3 link whose session ended cleanly for the next one.
    pub fn reuse_pop3(&self, peer: &str, link: Pooled) {
        let mut pool = lock(&self.pool);
        let links = pool.entry(peer.to_owned()).or_default();
        if links.len() < POOL_MAX {
            links.push((link, Instant::now()));
        }
    }

    /// One pass of this replica's duties: re-read rotated certificates, announce every
    /// copy on the volume (which repairs a Redis that lost its data), mark the pass done,
    /// refresh the heartbeat and the domain gauges. Run at start and every third of the
    /// lock TTL.
    pub async fn tick(&self, directory: &Arc<Directory>) {
        match self.link.reload_if_changed() {
            Ok(true) => info!("cluster certificates reloaded"),
            Ok(false) => {}
            Err(e) => {
                warn!(error = %e, "cannot reload the cluster certificates; keeping the old ones")
            }
        }
        let dir = directory.clone();
        let copies = tokio::task::spawn_blocking(move || -> Result<Vec<(String, u64)>, StoreError> {
            let mut out = Vec::new();
            for domain in dir.list_domains()? {
                match dir.epoch(&domain) {
                    Ok(epoch) => out.push((domain, epoch)),
                    Err(e) => warn!(domain, error = %e, "cannot read the domain's epoch; not announced"),
                }
            }
            Ok(out)
        })
        .await;
        let copies = match copies {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot list the domains to announce");
                return;
            }
            Err(e) => {
                warn!(error = %e, "listing the domains failed");
                return;
            }
        };
        {
            let mut local = lock(&self.local);
            let mut read: HashMap<String, u64> = copies.iter().cloned().collect();
            // A moved-in copy told to serve while this pass listed it still read 0 here.
            for (domain, epoch) in read.iter_mut() {
                if *epoch == 0 {
                    *epoch = local.get(domain).copied().unwrap_or(0);
                }
            }
            *local = read;
        }
        // Views no longer usable are dropped, so removed domains do not stay behind.
        lock(&self.views).retain(|_, v| v.read.elapsed() < self.ttl);
        const STATES: [HomeState; 5] = [
            HomeState::Active,
            HomeState::Moving,
            HomeState::Held,
            HomeState::Elsewhere,
            HomeState::Unknown,
        ];
        let mut counts = [0i64; STATES.len()];
        let mut complete = true;
        for (domain, epoch) in &copies {
            // After one failure the rest wait for the next pass: with Redis down, a pass
            // over many domains must not take a Redis timeout each (start-up waits for
            // the first pass).
            if !complete {
                counts[STATES.len() - 1] += 1; // HomeState::Unknown
                continue;
            }
            if *epoch == 0 {
                // A moved-in copy whose mover did not say "serve": the record decides.
                if let Err(e) = self.settle_installed(directory, domain).await {
                    complete = false;
                    warn!(domain, error = %e, "cannot read the record of a moved-in copy");
                }
                counts[STATES.len() - 1] += 1; // HomeState::Unknown
                continue;
            }
            let state = match self.homes.announce(domain, *epoch).await {
                Ok((what, record)) => {
                    if lock(&self.unsettled).contains(domain) {
                        self.settle(directory, domain, &record).await;
                    }
                    match what {
                        Announced::Conflict => {
                            self.metrics.home_conflict();
                            warn!(domain, other = %record.home, epoch, "two replicas hold this domain at the same epoch: held until one copy is removed");
                        }
                        Announced::Created | Announced::TookOver => {
                            info!(domain, epoch = record.epoch, outcome = ?what, "domain homed here");
                        }
                        // A copy a finished move left behind (its old home killed
                        // before renaming it): retired like the move would have, kept
                        // for `cluster cleanup`, never deleted here.
                        Announced::Stale
                            if record.state == State::Active && record.home != self.name =>
                        {
                            info!(domain, home = %record.home, epoch, recorded = record.epoch, "this copy is older than the home's: retired");
                            self.retire(directory, domain).await;
                        }
                        Announced::Stale => {
                            warn!(domain, home = %record.home, epoch, recorded = record.epoch, "this copy is older than the home's: not served here");
                        }
                        Announced::Confirmed | Announced::Held => {}
                    }
                    let state = match record.state {
                        State::Held => HomeState::Held,
                        State::Moving => HomeState::Moving,
                        State::Active if record.home == self.name => HomeState::Active,
                        State::Active => HomeState::Elsewhere,
                    };
                    self.remember(domain, record);
                    state
                }
                Err(e) => {
                    complete = false;
                    warn!(domain, error = %e, "cannot announce the domain; the others wait for the next pass");
                    HomeState::Unknown
                }
            };
            if let Some(i) = STATES.iter().position(|s| *s == state) {
                counts[i] += 1;
            }
        }
        if complete {
            if let Err(e) = self.homes.announced().await {
                warn!(error = %e, "cannot mark the announcement done");
            }
        }
        let homed = counts[0];
        let beat = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "domains": homed,
        })
        .to_string();
        if let Err(e) = self.homes.heartbeat(&beat, self.ttl).await {
            warn!(error = %e, "cannot write the heartbeat");
        }
        let counts: Vec<(HomeState, i64)> = STATES.into_iter().zip(counts).collect();
        self.metrics.set_cluster_domains(&counts);
    }

    /// A copy installed by a move (epoch 0) whose mover did not tell it to serve: adopted
    /// at the record's epoch once the record names this replica (the switch happened),
    /// retired once it names another as active home (the move failed).
    async fn settle_installed(
        &self,
        directory: &Arc<Directory>,
        domain: &str,
    ) -> Result<(), ClusterError> {
        let Some(record) = self.homes.read(domain, std::iter::empty()).await?.record else {
            return Ok(());
        };
        let (dir, name) = (directory.clone(), domain.to_owned());
        if record.home == self.name {
            let epoch = record.epoch;
            tokio::task::spawn_blocking(move || dir.set_epoch(&name, epoch))
                .await
                .map_err(|e| StoreError::Io {
                    path: domain.to_owned(),
                    source: std::io::Error::other(e.to_string()),
                })??;
            self.set_local_epoch(domain, epoch);
            info!(
                domain,
                epoch, "moved-in copy adopted: the record names this replica"
            );
        } else if record.state == State::Active {
            self.retire(directory, domain).await;
        }
        Ok(())
    }

    /// Settles a copy whose move ended without a known outcome, by its record.
    async fn settle(&self, directory: &Arc<Directory>, domain: &str, record: &Record) {
        if record.state == State::Moving {
            return;
        }
        lock(&self.unsettled).remove(domain);
        if record.home == self.name {
            if let Err(e) = directory.unseal(domain) {
                warn!(domain, error = %e, "cannot unseal the domain");
            }
            info!(
                domain,
                "the move did not happen; the domain is active here again"
            );
        } else {
            self.retire(directory, domain).await;
        }
    }

    /// Renames this replica's copy of `domain` out of the hosted domains.
    async fn retire(&self, directory: &Arc<Directory>, domain: &str) {
        let (dir, name) = (directory.clone(), domain.to_owned());
        match tokio::task::spawn_blocking(move || dir.retire_domain(&name)).await {
            Ok(Ok(path)) => {
                self.moved_away(domain);
                info!(domain, path = %path.display(), "copy not served here retired");
            }
            Ok(Err(e)) => warn!(domain, error = %e, "cannot retire the copy"),
            Err(e) => warn!(domain, error = %e, "cannot retire the copy"),
        }
    }

    /// Connects to every other replica (and hangs up), so `mailgate_cluster_peer_up`
    /// follows a peer going away and coming back even without traffic.
    pub async fn probe_peers(&self) {
        let others: Vec<String> = self
            .link
            .peer_names()
            .filter(|p| *p != self.name)
            .map(str::to_owned)
            .collect();
        for peer in others {
            match self.link.connect(&peer, Alpn::Admin).await {
                Ok((mut stream, took)) => {
                    self.metrics.peer_connect(&peer, Some(took));
                    use tokio::io::AsyncWriteExt;
                    let _ = stream.shutdown().await;
                }
                Err(e) => {
                    self.metrics.peer_connect(&peer, None);
                    tracing::debug!(peer, error = %e, "peer unreachable");
                }
            }
        }
    }

    /// Whether this replica is the home of `domain` as last seen (for per-domain
    /// metrics, which only a home exports).
    pub fn homed_here(&self, domain: &str) -> bool {
        lock(&self.views)
            .get(domain)
            .and_then(|v| v.record.as_ref())
            .is_some_and(|r| r.home == self.name)
    }

    /// The replica a new domain goes to: its pin, else the first replica of its
    /// rendezvous order whose heartbeat is live. `Exists` when it has a record.
    pub async fn place(&self, domain: &str) -> Result<String, ClusterError> {
        let domain = domain.to_ascii_lowercase();
        let read = self.homes.read(&domain, std::iter::empty()).await?;
        if let Some(record) = read.record {
            return Err(ClusterError::Exists {
                domain,
                home: record.home,
            });
        }
        let eligible = self.eligible().await?;
        self.target(&domain, &eligible)
            .ok_or(ClusterError::NoReplica(domain))
    }

    /// The replicas a domain may go to now: live (heartbeat) and not draining.
    async fn eligible(&self) -> Result<Vec<String>, ClusterError> {
        let names: Vec<&str> = self.link.peer_names().collect();
        let beats = self.homes.heartbeats(&names).await?;
        let draining = self.homes.draining().await?;
        Ok(names
            .iter()
            .zip(&beats)
            .filter(|(n, b)| b.is_some() && !draining.iter().any(|d| d == *n))
            .map(|(n, _)| (*n).to_owned())
            .collect())
    }

    /// Where `domain` belongs among `eligible` replicas: its pin if that one is
    /// eligible, else the first eligible replica of its rendezvous order.
    fn target(&self, domain: &str, eligible: &[String]) -> Option<String> {
        if let Some(pinned) = self.pins.get(domain) {
            if eligible.contains(pinned) {
                return Some(pinned.clone());
            }
        }
        hash::target(domain, self.link.peer_names(), |n| {
            eligible.iter().any(|e| e == n)
        })
        .map(str::to_owned)
    }

    /// The moves that would put every active domain (or only those homed on
    /// `only_from`) on its target, and the domains that cannot move now.
    pub async fn plan(&self, only_from: Option<&str>) -> Result<Plan, ClusterError> {
        let eligible = self.eligible().await?;
        let names: Vec<&str> = self.link.peer_names().collect();
        let beats = self.homes.heartbeats(&names).await?;
        let live = |n: &str| {
            names
                .iter()
                .zip(&beats)
                .any(|(m, b)| *m == n && b.is_some())
        };
        let mut plan = Plan::default();
        for (domain, record) in self.homes.all().await? {
            if only_from.is_some_and(|f| f != record.home) {
                continue;
            }
            let Some(to) = self.target(&domain, &eligible) else {
                plan.stuck
                    .push((domain, "no live replica that is not draining".into()));
                continue;
            };
            if to == record.home {
                continue;
            }
            if record.state != State::Active {
                plan.stuck
                    .push((domain, format!("it is {}", record.state.name())));
            } else if !live(&record.home) {
                plan.stuck
                    .push((domain, format!("its home {} is down", record.home)));
            } else {
                plan.moves.push(Planned {
                    domain,
                    from: record.home,
                    to,
                });
            }
        }
        Ok(plan)
    }

    /// Where `[provision]` would create `domain`: its recorded home if it has one, else
    /// its pin, else the first replica of its rendezvous order over every configured
    /// replica that is not draining (not only live ones, so every replica agrees at
    /// start).
    pub async fn provision_home(&self, domain: &str) -> Result<String, ClusterError> {
        let domain = domain.to_ascii_lowercase();
        let read = self.homes.read(&domain, std::iter::empty()).await?;
        if let Some(record) = read.record {
            return Ok(record.home);
        }
        // Every replica computes the same answer at start: the configured replicas, less
        // those being drained (a set in Redis), not only the live ones.
        let draining = self.homes.draining().await?;
        if let Some(pinned) = self.pins.get(&domain) {
            if !draining.contains(pinned) {
                return Ok(pinned.clone());
            }
        }
        hash::target(&domain, self.link.peer_names(), |n| {
            !draining.iter().any(|d| d == n)
        })
        .map(str::to_owned)
        .ok_or(ClusterError::NoReplica(domain))
    }

    /// Creates `domain` here as its home: the record first (so no two replicas create
    /// it), then the store at epoch 1. Blocking store work runs off the async threads.
    pub async fn create_here(
        &self,
        directory: &Arc<Directory>,
        domain: &str,
    ) -> Result<(), ClusterError> {
        let domain = crate::wire::address::validate_domain(domain)
            .map_err(|e| ClusterError::Store(e.into()))?;
        if let Err(home) = self.homes.create(&domain, &self.name).await? {
            return Err(ClusterError::Exists { domain, home });
        }
        let dir = directory.clone();
        let name = domain.clone();
        let made = tokio::task::spawn_blocking(move || {
            dir.add_domain(&name)?;
            dir.set_epoch(&name, 1)
        })
        .await
        .unwrap_or_else(|e| {
            Err(StoreError::Io {
                path: domain.clone(),
                source: std::io::Error::other(e.to_string()),
            })
        });
        if let Err(e) = made {
            // Nothing was created here: give the name back.
            if let Err(e) = self.homes.remove(&domain).await {
                warn!(domain, error = %e, "cannot remove the record of a domain that was not created");
            }
            return Err(e.into());
        }
        lock(&self.local).insert(domain.clone(), 1);
        self.remember(
            &domain,
            Record {
                home: self.name.clone(),
                state: State::Active,
                epoch: 1,
            },
        );
        Ok(())
    }

    /// Forgets `domain` after its copy here was removed (its record too, if it named
    /// this replica).
    pub async fn removed_here(&self, domain: &str) -> Result<(), ClusterError> {
        let domain = domain.to_ascii_lowercase();
        lock(&self.local).remove(&domain);
        lock(&self.views).remove(&domain);
        self.homes.remove(&domain).await?;
        Ok(())
    }
}

/// What routing knows about a domain at one moment.
struct Seen<'a, K: Fn(&str) -> bool> {
    /// The home record, if the domain has one.
    record: Option<&'a Record>,
    /// Some replica has not announced since Redis last lost its data.
    incomplete: bool,
    /// The epoch of this replica's copy, if it holds one.
    local_epoch: Option<u64>,
    /// This replica's name.
    me: &'a str,
    /// The session already crossed the replica link.
    forwarded: bool,
    /// Whether a replica name is in `cluster.peers`.
    known: K,
}

/// The routing rule, apart from how the record was read: fencing (home = this replica,
/// active, epochs equal), one hop at most, and "try later" whenever a missing record may
/// only be missing for now.
fn decide<K: Fn(&str) -> bool>(seen: &Seen<'_, K>) -> Route {
    let Some(record) = seen.record else {
        // A copy here without a record is announced at the next pass; a replica that
        // has not announced since Redis lost its data may hold the domain.
        if seen.local_epoch.is_some() || seen.incomplete {
            return Route::Unavailable(Unavailable::NoView);
        }
        return Route::Local;
    };
    match record.state {
        State::Held => return Route::Unavailable(Unavailable::Held),
        State::Moving => return Route::Unavailable(Unavailable::Moving),
        State::Active => {}
    }
    if record.home == seen.me {
        if seen.local_epoch == Some(record.epoch) {
            Route::Local
        } else {
            Route::Unavailable(Unavailable::NotHere)
        }
    } else if seen.forwarded || !(seen.known)(&record.home) {
        Route::Unavailable(Unavailable::NotHere)
    } else {
        Route::Forward(record.home.clone())
    }
}

impl transfer::Installed for Cluster {
    fn serving(&self, domain: &str, epoch: u64) {
        self.set_local_epoch(domain, epoch);
        info!(domain, epoch, "domain moved here");
    }
}

/// The metric label of what a link connection carries.
pub fn forward_protocol(alpn: Alpn) -> ForwardProtocol {
    match alpn {
        Alpn::Pop3 => ForwardProtocol::Pop3,
        Alpn::Lmtp => ForwardProtocol::Lmtp,
        Alpn::Smtp => ForwardProtocol::Smtp,
        Alpn::Admin => ForwardProtocol::Admin,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(home: &str, state: State, epoch: u64) -> Record {
        Record {
            home: home.into(),
            state,
            epoch,
        }
    }

    fn route(
        record: Option<&Record>,
        incomplete: bool,
        local_epoch: Option<u64>,
        forwarded: bool,
    ) -> Route {
        decide(&Seen {
            record,
            incomplete,
            local_epoch,
            me: "mailgate-0",
            forwarded,
            known: |p: &str| ["mailgate-0", "mailgate-1"].contains(&p),
        })
    }

    #[test]
    fn a_domain_nobody_holds_is_answered_here_unless_the_records_may_be_incomplete() {
        assert_eq!(route(None, false, None, false), Route::Local);
        assert_eq!(route(None, false, None, true), Route::Local);
        let later = Route::Unavailable(Unavailable::NoView);
        assert_eq!(route(None, true, None, false), later);
        // A copy here whose record is missing (Redis lost it): announced soon.
        assert_eq!(route(None, false, Some(1), false), later);
    }

    #[test]
    fn the_home_serves_only_while_its_epoch_matches() {
        let mine = record("mailgate-0", State::Active, 3);
        assert_eq!(route(Some(&mine), false, Some(3), false), Route::Local);
        assert_eq!(route(Some(&mine), false, Some(3), true), Route::Local);
        let fenced = Route::Unavailable(Unavailable::NotHere);
        assert_eq!(route(Some(&mine), false, Some(2), false), fenced);
        assert_eq!(route(Some(&mine), false, Some(4), false), fenced);
        assert_eq!(route(Some(&mine), false, None, false), fenced);
    }

    #[test]
    fn another_home_is_forwarded_to_once() {
        let theirs = record("mailgate-1", State::Active, 1);
        assert_eq!(
            route(Some(&theirs), false, None, false),
            Route::Forward("mailgate-1".into())
        );
        // A stale copy here changes nothing: the record decides.
        assert_eq!(
            route(Some(&theirs), false, Some(1), false),
            Route::Forward("mailgate-1".into())
        );
        // A home never forwards.
        assert_eq!(
            route(Some(&theirs), false, None, true),
            Route::Unavailable(Unavailable::NotHere)
        );
        // A record naming a replica this one does not know.
        let stranger = record("mailgate-9", State::Active, 1);
        assert_eq!(
            route(Some(&stranger), false, None, false),
            Route::Unavailable(Unavailable::NotHere)
        );
    }

    #[test]
    fn held_and_moving_domains_are_served_nowhere() {
        for home in ["mailgate-0", "mailgate-1"] {
            for forwarded in [false, true] {
                let held = record(home, State::Held, 1);
                assert_eq!(
                    route(Some(&held), false, Some(1), forwarded),
                    Route::Unavailable(Unavailable::Held)
                );
                let moving = record(home, State::Moving, 1);
                assert_eq!(
                    route(Some(&moving), false, Some(1), forwarded),
                    Route::Unavailable(Unavailable::Moving)
                );
            }
        }
    }

    #[test]
    fn the_secret_needs_32_bytes_and_is_the_same_from_the_same_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        std::fs::write(&path, [7u8; 31]).expect("write");
        let p = path.to_str().expect("utf8");
        assert!(matches!(load_secret(p), Err(ClusterError::ShortSecret(_))));
        std::fs::write(&path, [7u8; 32]).expect("write");
        let a = load_secret(p).expect("secret");
        assert_eq!(a, load_secret(p).expect("secret"));
        std::fs::write(&path, [8u8; 32]).expect("write");
        assert_ne!(a, load_secret(p).expect("secret"));
        assert!(matches!(
            load_secret(dir.path().join("none").to_str().expect("utf8")),
            Err(ClusterError::Secret { .. })
        ));
    }
}
