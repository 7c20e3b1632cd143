//! Operator commands (domains, accounts, local delivery) as one `Request` type that runs
//! either directly on the data dir or, while `serve` holds the stores open, through the
//! admin socket `data_dir/admin.sock` (mode 0600 in a 0700 directory: only the server's
//! user can open it). Wire format: one JSON request line, for `Deliver` followed by the
//! message bytes up to the client's write shutdown; one JSON response line back.
//! On a replica of a cluster the server sends a request about another replica's domain
//! to that home over the replica link (the same wire format, ALPN `mailgate-admin/1`),
//! creates new domains on the replica their pin or hash names, lists the domains of
//! every replica, and answers `ClusterStatus`.

use crate::auth::{Credentials, HashParams};
use crate::cluster::{Alpn, Cluster, Route};
use crate::delivery::{self, DeliveryError, Quotas};
use crate::locks::{LockBackend, LockError, MaildropLock};
use crate::metrics::{self, Metrics};
use crate::migrate::{self, ImportError};
use crate::store::{Account, Address, Directory, DomainStore, StoreError};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    DomainAdd {
        name: String,
    },
    DomainList,
    DomainRemove {
        name: String,
    },
    /// Credentials are hashed by the CLI, so no password crosses the socket.
    UserAdd {
        address: String,
        credentials: Credentials,
    },
    UserPasswd {
        address: String,
        credentials: Credentials,
    },
    UserRemove {
        address: String,
    },
    /// Sets (`Some`) or clears (`None`: back to the configured default) an account's quota.
    UserQuota {
        address: String,
        bytes: Option<u64>,
    },
    UserList {
        domain: Option<String>,
    },
    Deliver {
        from: Option<String>,
        recipients: Vec<String>,
    },
    /// Imports one account from another server (`migrate::import_account`): created with
    /// these credentials when absent, then the body's messages (`migrate::frame`) are
    /// stored with their UIDLs. Credentials are hashed by the CLI, as for `UserAdd`.
    /// With `mirror_deletions` the body must end with its end line, and imported mail it
    /// no longer lists is deleted, under the maildrop lock (`migrate::mirror_deletions`).
    ImportAccount {
        address: String,
        credentials: Credentials,
        /// Left out when false, so a server that predates it reads the same request.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        mirror_deletions: bool,
    },
    /// The stored UIDLs an account knows (imported messages' and tombstones'), one per
    /// line, none for an account that does not exist: an import sends only the others.
    ImportKnown {
        address: String,
    },
    /// Every replica (reachable, version, domains homed) and every domain (home, state,
    /// epoch); one JSON document when `json`.
    ClusterStatus {
        #[serde(default)]
        json: bool,
    },
    /// Between replicas: this replica's version and how many domains it homes.
    Ping,
    /// Moves a domain to another replica (run by its home; progress streamed).
    DomainMove {
        name: String,
        to: String,
        /// How long open sessions and deliveries get once the domain is frozen.
        #[serde(default)]
        grace_secs: Option<u64>,
    },
    /// Moves, one at a time, every domain whose home differs from its target (pin, else
    /// hash over the live replicas not draining).
    ClusterRebalance {
        #[serde(default)]
        dry_run: bool,
        #[serde(flatten)]
        pace: Pace,
    },
    /// Marks a replica draining and moves all its domains away.
    ClusterDrain {
        replica: String,
        #[serde(default)]
        dry_run: bool,
        #[serde(flatten)]
        pace: Pace,
    },
    /// Takes a replica's draining mark away.
    ClusterUndrain {
        replica: String,
    },
    /// Deletes the copies moves left behind that are older than this, on every replica.
    ClusterCleanup {
        older_than_secs: u64,
    },
    /// Between replicas: the rest of the connection is a domain transfer into this
    /// replica (`cluster::transfer`).
    MoveReceive {
        domain: String,
    },
}

/// Default grace of a move: open sessions and deliveries in DATA get this long.
pub const MOVE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);
/// Default pause between two moves of a rebalance or drain.
pub const MOVE_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// How a rebalance or drain runs its moves.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Pace {
    /// Seconds open sessions and deliveries get once a domain is frozen.
    #[serde(default)]
    pub grace_secs: Option<u64>,
    /// Pause between two moves.
    #[serde(default)]
    pub pause_ms: Option<u64>,
}

/// A progress line streamed before the response (moves).
#[derive(Debug, Serialize, Deserialize)]
pub struct Progress {
    pub progress: String,
}

/// Where a request's progress lines go.
pub type Say<'a> = &'a (dyn Fn(String) + Send + Sync);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Response {
    pub ok: bool,
    /// Lines to print on success.
    #[serde(default)]
    pub lines: Vec<String>,
    /// What went wrong, for the operator.
    #[serde(default)]
    pub error: Option<String>,
    /// Process exit status the CLI should use (sysexits).
    #[serde(default)]
    pub exit_code: u8,
}

impl Response {
    fn ok(lines: Vec<String>) -> Self {
        Response {
            ok: true,
            lines,
            error: None,
            exit_code: 0,
        }
    }
    fn fail(error: String, exit_code: u8) -> Self {
        Response {
            ok: false,
            lines: Vec::new(),
            error: Some(error),
            exit_code,
        }
    }
}

/// sysexits(3) codes used by the CLI.
pub mod exit {
    pub const USAGE: u8 = 64;
    pub const DATAERR: u8 = 65;
    pub const NOUSER: u8 = 67;
    pub const SOFTWARE: u8 = 70;
    pub const TEMPFAIL: u8 = 75;
    pub const CONFIG: u8 = 78;
}

/// The store's error as the operator reads it, with what to do when the store's own
/// text does not say it, and its exit code.
fn store_failure(e: StoreError) -> Response {
    let (code, expected) = match e {
        StoreError::InvalidDomain(_) | StoreError::InvalidAddress(_) => (exit::DATAERR, ""),
        StoreError::UnknownDomain(_) => (
            exit::NOUSER,
            ": expected a hosted domain (see mailgate domain list)",
        ),
        StoreError::UnknownAccount(_) => (
            exit::NOUSER,
            ": expected an existing account (see mailgate user list)",
        ),
        StoreError::DomainExists(_) | StoreError::AccountExists(_) => (exit::DATAERR, ""),
        _ => (exit::TEMPFAIL, ""),
    };
    Response::fail(format!("{e}{expected}"), code)
}

/// Loads an existing account, changes it with `edit` and stores it back.
fn edit_account(
    directory: &Directory,
    address: &str,
    edit: impl FnOnce(&mut Account),
) -> Result<(Address, Arc<DomainStore>), StoreError> {
    let address = Address::parse(address)?;
    let store = directory.domain(&address.domain)?;
    let mut account = store
        .account(&address.local)?
        .ok_or_else(|| StoreError::UnknownAccount(address.to_string()))?;
    edit(&mut account);
    store.update_account(&address.local, &account)?;
    Ok((address, store))
}

/// Refuses credentials no login could verify, or costlier than the configured ceiling.
fn check_credentials(
    address: &Address,
    credentials: &Credentials,
    hashes: &HashParams,
) -> Result<(), Response> {
    crate::auth::check_credentials(credentials, hashes).map_err(|e| {
        Response::fail(
            format!("credentials of {address} refused: {e}"),
            exit::DATAERR,
        )
    })
}

fn delivery_failure(e: DeliveryError) -> Response {
    Response::fail(e.to_string(), e.exit_code())
}

/// Runs a request on the data dir (blocking). `body` is read only by `Deliver`, which is
/// counted in `metrics` when a server runs it.
pub fn execute(
    directory: &Directory,
    request: Request,
    mut body: impl Read,
    quotas: Quotas,
    hashes: &HashParams,
    metrics: Option<&Metrics>,
    locks: Option<&BlockingLocks>,
) -> Response {
    let result = (|| -> Result<Vec<String>, Response> {
        match request {
            Request::DomainAdd { name } => {
                directory.add_domain(&name).map_err(store_failure)?;
                Ok(vec![format!("domain {} added", name.to_ascii_lowercase())])
            }
            Request::DomainList => directory.list_domains().map_err(store_failure),
            Request::DomainRemove { name } => {
                directory.remove_domain(&name).map_err(store_failure)?;
                if let Some(m) = metrics {
                    m.forget_domain(&name.to_ascii_lowercase());
                }
                Ok(vec![format!(
                    "domain {} removed",
                    name.to_ascii_lowercase()
                )])
            }
            Request::UserAdd {
                address,
                credentials,
            } => {
                let address = Address::parse(&address).map_err(|e| store_failure(e.into()))?;
                check_credentials(&address, &credentials, hashes)?;
                let store = directory.domain(&address.domain).map_err(store_failure)?;
                let account = Account::new(credentials);
                store
                    .create_account(&address.local, &account)
                    .map_err(store_failure)?;
                Ok(vec![format!("user {address} added")])
            }
            Request::UserPasswd {
                address,
                credentials,
            } => {
                if let Ok(parsed) = Address::parse(&address) {
                    check_credentials(&parsed, &credentials, hashes)?;
                }
                let (address, _) =
                    edit_account(directory, &address, |a| a.credentials = credentials)
                        .map_err(store_failure)?;
                Ok(vec![format!("password of {address} changed")])
            }
            Request::UserQuota { address, bytes } => {
                let (address, store) = edit_account(directory, &address, |a| a.quota_bytes = bytes)
                    .map_err(store_failure)?;
                let (_, used) = store
                    .maildrop_usage(&address.local)
                    .map_err(store_failure)?;
                let limit = match bytes {
                    None => "the configured default".to_owned(),
                    Some(0) => "unlimited".to_owned(),
                    Some(b) => format!("{b} octets"),
                };
                Ok(vec![format!(
                    "quota of {address} set to {limit} ({used} octets in use)"
                )])
            }
            Request::UserRemove { address } => {
                let address = Address::parse(&address).map_err(|e| store_failure(e.into()))?;
                let store = directory.domain(&address.domain).map_err(store_failure)?;
                store
                    .remove_account(&address.local)
                    .map_err(store_failure)?;
                Ok(vec![format!("user {address} removed")])
            }
            Request::UserList { domain } => {
                let domains = match domain {
                    Some(d) => vec![d],
                    None => directory.list_domains().map_err(store_failure)?,
                };
                let mut lines = Vec::new();
                for d in domains {
                    let store = directory.domain(&d).map_err(store_failure)?;
                    for local in store.list_accounts().map_err(store_failure)? {
                        lines.push(format!("{local}@{}", store.name()));
                    }
                }
                Ok(lines)
            }
            Request::ClusterStatus { .. }
            | Request::Ping
            | Request::DomainMove { .. }
            | Request::ClusterRebalance { .. }
            | Request::ClusterDrain { .. }
            | Request::ClusterUndrain { .. }
            | Request::ClusterCleanup { .. }
            | Request::MoveReceive { .. } => Err(Response::fail(
                "not clustered: cluster.name is empty".into(),
                exit::USAGE,
            )),
            Request::Deliver { from, recipients } => {
                let delivered = match metrics {
                    Some(m) => delivery::deliver_counted(
                        m,
                        metrics::PROTOCOL_LOCAL,
                        directory,
                        quotas,
                        from.as_deref(),
                        &recipients,
                        &mut body,
                    ),
                    None => delivery::deliver(
                        directory,
                        quotas,
                        from.as_deref(),
                        &recipients,
                        &mut body,
                    ),
                };
                let size = delivered.map_err(delivery_failure)?;
                Ok(vec![format!(
                    "delivered {size} octets to {} recipient(s)",
                    recipients.len()
                )])
            }
            Request::ImportKnown { address } => {
                let address = Address::parse(&address).map_err(|e| store_failure(e.into()))?;
                let store = directory.domain(&address.domain).map_err(store_failure)?;
                match store.account(&address.local).map_err(store_failure)? {
                    Some(_) => store.known_uidls(&address.local).map_err(store_failure),
                    None => Ok(Vec::new()),
                }
            }
            Request::ImportAccount {
                address,
                credentials,
                mirror_deletions,
            } => {
                let address = Address::parse(&address).map_err(|e| store_failure(e.into()))?;
                check_credentials(&address, &credentials, hashes)?;
                let streamed = migrate::import_account(
                    directory,
                    &address,
                    credentials,
                    quotas.account,
                    &mut body,
                    mirror_deletions,
                )
                .map_err(|e| match e {
                    ImportError::Store(e) => store_failure(e),
                    ImportError::Frame { .. }
                    | ImportError::Short { .. }
                    | ImportError::TooMany => {
                        Response::fail(format!("{address}: {e}"), exit::DATAERR)
                    }
                    ImportError::Read { .. } | ImportError::Unknown { .. } => {
                        Response::fail(format!("{address}: {e}"), exit::TEMPFAIL)
                    }
                })?;
                let mut imported = streamed.imported;
                if mirror_deletions {
                    imported.mirrored = mirror(directory, &address, &streamed, locks)?;
                }
                // The first line is for the importing CLI, the second for a person.
                Ok(vec![
                    serde_json::to_string(&imported).unwrap_or_default(),
                    format!(
                        "{address}: {} message(s) imported, {} already there, {} deleted since, {} deleted to match the source, {} octets",
                        imported.messages,
                        imported.existing,
                        imported.deleted,
                        imported.mirrored,
                        imported.octets
                    ),
                ])
            }
        }
    })();
    match result {
        Ok(lines) => Response::ok(lines),
        Err(r) => r,
    }
}

/// Deletes the imported mail a complete import stream no longer listed, holding the
/// maildrop lock (from `locks`: a server's; none when the CLI works on a stopped
/// server's data dir, where no session can hold the maildrop). The messages the stream
/// brought are stored either way; a failure here fails the account for a rerun.
fn mirror(
    directory: &Directory,
    address: &Address,
    streamed: &migrate::Streamed,
    locks: Option<&BlockingLocks>,
) -> Result<u64, Response> {
    let not_now = |why: String| {
        Response::fail(
            format!("{address}: {why}: new messages imported, no deletion mirrored"),
            exit::TEMPFAIL,
        )
    };
    if !streamed.complete {
        return Err(not_now(
            "the import stream ended without its end line".into(),
        ));
    }
    let lock = match locks {
        Some(locks) => Some(locks.acquire(address).map_err(not_now)?),
        None => None,
    };
    let result = match &lock {
        Some((lock, runtime)) if !runtime.block_on(lock.still_held()) => {
            Err(not_now("the maildrop lock was lost".into()))
        }
        _ => migrate::mirror_deletions(directory, address, &streamed.uidls).map_err(store_failure),
    };
    if let Some((lock, runtime)) = lock {
        runtime.block_on(lock.release());
    }
    result
}

/// A server's maildrop locks, for an admin request running on a blocking thread.
pub struct BlockingLocks {
    pub backend: Arc<dyn LockBackend>,
    pub runtime: tokio::runtime::Handle,
}

impl BlockingLocks {
    /// Takes `address`'s maildrop lock as a POP3 login would; the reason when it cannot.
    fn acquire(&self, address: &Address) -> Result<(MaildropLock, tokio::runtime::Handle), String> {
        match self
            .runtime
            .block_on(self.backend.acquire(&address.to_string()))
        {
            Ok(lock) => Ok((lock, self.runtime.clone())),
            Err(LockError::Busy) => Err("the maildrop is in use by a POP3 session".into()),
            Err(LockError::Unavailable(e)) => Err(format!("maildrop lock unavailable ({e})")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin socket {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("another mailgate is already serving {0}")]
    AlreadyRunning(String),
    #[error("bad response from the server: {0}")]
    Protocol(String),
}

/// Most octets read and discarded after answering a request.
const MAX_DRAIN: u64 = 256 * 1024 * 1024;

/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Longest request line accepted on the socket.
const MAX_REQUEST_LINE: usize = 64 * 1024;

/// Longest answer line read from the server or a replica: a listing of every account
/// of every domain is one line (~30 octets per account), so this allows millions.
/// Progress lines and the answer come from our own server, never from a client.
const MAX_ANSWER_LINE: u64 = 256 * 1024 * 1024;

/// Binds the admin socket, refusing if a live server already answers on it.
pub async fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    let io = |source| AdminError::Io {
        path: path.display().to_string(),
        source,
    };
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(AdminError::AlreadyRunning(path.display().to_string()));
        }
        // A stale socket from a server that did not exit cleanly.
        std::fs::remove_file(path).map_err(io)?;
    }
    // Bound in a new 0700 directory, given mode 0600 there and only then moved into
    // place, so no one can connect between bind and chmod, whatever the umask and the
    // mode of the data dir.
    let parent = path.parent().unwrap_or(Path::new("."));
    let private = parent.join(format!(".admin-{:016x}", rand::random::<u64>()));
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&private)
            .map_err(io)?;
    }
    let bound = bind_private(&private.join("admin.sock"), path);
    let _ = std::fs::remove_dir_all(&private);
    bound.map_err(io)
}

/// Binds `staged` (in a private directory), makes it 0600 and renames it to `path`.
fn bind_private(staged: &Path, path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let listener = UnixListener::bind(staged)?;
    std::fs::set_permissions(staged, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(staged, path)?;
    Ok(listener)
}

/// What admin requests run with in a server.
pub struct Admin {
    pub directory: Arc<Directory>,
    pub quotas: Quotas,
    /// The configured hash costs: credentials a client sends are checked against their
    /// ceiling (`auth::check_credentials`).
    pub hashes: HashParams,
    pub metrics: Arc<Metrics>,
    pub cluster: Option<Arc<Cluster>>,
    /// The maildrop locks POP3 sessions take (an import mirroring deletions takes one).
    pub locks: Arc<dyn LockBackend>,
}

/// Serves admin requests until `cancel`.
pub async fn serve(listener: UnixListener, admin: Arc<Admin>, cancel: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let admin = admin.clone();
        tokio::spawn(async move { handle(stream, Local::Socket, admin).await });
    }
}

/// Where a request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    /// The admin socket: a request about another replica's domain goes to its home.
    Socket,
    /// Another replica: run here, never sent on.
    Replica,
}

/// Answers one request on `stream`.
pub async fn handle<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(
    stream: S,
    from: Local,
    admin: Arc<Admin>,
) {
    if let Err(e) = handle_inner(stream, from, admin).await {
        warn!(error = %e, "admin request failed");
    }
}

async fn handle_inner<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(
    stream: S,
    from: Local,
    admin: Arc<Admin>,
) -> std::io::Result<()> {
    let (mut read_half, mut write_half) = tokio::io::split(stream);
    // Read the request line by hand so body bytes that arrive with it are kept; each
    // byte is looked at once, and a client that never finishes the line is cut off.
    let mut buf = Vec::with_capacity(1024);
    let read_line = async {
        let mut scanned = 0;
        loop {
            if let Some(i) = buf[scanned..].iter().position(|&b| b == b'\n') {
                return Ok::<_, std::io::Error>(Some(scanned + i));
            }
            scanned = buf.len();
            if buf.len() > MAX_REQUEST_LINE || read_half.read_buf(&mut buf).await? == 0 {
                return Ok(None);
            }
        }
    };
    let newline = tokio::time::timeout(REQUEST_TIMEOUT, read_line)
        .await
        .unwrap_or(Ok(None))?;
    // A replica's liveness probe connects and hangs up without a byte.
    if newline.is_none() && buf.is_empty() && from == Local::Replica {
        return Ok(());
    }
    let response = match newline.map(|i| (serde_json::from_slice::<Request>(&buf[..i]), i)) {
        None => Response::fail(
            "request line missing, too long or too slow".into(),
            exit::USAGE,
        ),
        Some((Err(e), _)) => Response::fail(format!("malformed request: {e}"), exit::USAGE),
        Some((Ok(Request::MoveReceive { domain }), i))
            if from == Local::Replica && admin.cluster.is_some() =>
        {
            // The sender waits for "ready" before sending more than the line.
            if buf.len() > i + 1 {
                return Ok(());
            }
            let stream = read_half.unsplit(write_half);
            if let Some(cluster) = &admin.cluster {
                match crate::cluster::transfer::receive(
                    stream,
                    admin.directory.clone(),
                    &domain,
                    cluster.as_ref(),
                )
                .await
                {
                    Ok(()) => info!(domain, "domain received"),
                    Err(e) => warn!(domain, error = %e, "domain transfer ended without the domain"),
                }
            }
            return Ok(());
        }
        Some((Ok(request), i)) => {
            let op = request_name(&request);
            let leftover = buf.split_off(i + 1);
            let line = buf;
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
            let work = async {
                let say = move |line: String| {
                    let _ = tx.send(line);
                };
                match &admin.cluster {
                    Some(cluster) => {
                        clustered(
                            cluster, &admin, request, &line, leftover, read_half, from, &say,
                        )
                        .await
                    }
                    None => run_here(&admin, request, leftover, read_half).await,
                }
            };
            let progress = async {
                let mut open = true;
                while let Some(text) = rx.recv().await {
                    if open {
                        let mut out =
                            serde_json::to_vec(&Progress { progress: text }).unwrap_or_default();
                        out.push(b'\n');
                        open = write_half.write_all(&out).await.is_ok()
                            && write_half.flush().await.is_ok();
                    }
                }
            };
            let ((response, back), ()) = tokio::join!(work, progress);
            info!(op, ok = response.ok, "admin request");
            match back {
                Some(back) => read_half = back,
                // The request's task failed and took the stream's read side with it.
                None => return reply(&mut write_half, &response).await,
            }
            response
        }
    };
    reply(&mut write_half, &response).await?;
    // Read what the client still sends (a refused delivery's body, the rest of an
    // overlong line), bounded in size and time, so it gets the answer instead of a
    // connection reset for closing with its data unread.
    let (mut rest, mut sink) = ((&mut read_half).take(MAX_DRAIN), tokio::io::sink());
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, tokio::io::copy(&mut rest, &mut sink)).await;
    Ok(())
}

/// Runs a request on this replica's stores. The body (Deliver only) streams through a
/// blocking bridge: the store is blocking anyway, and this keeps the message out of
/// memory. Gives the read half back for draining.
async fn run_here<R: AsyncRead + Send + Unpin + 'static>(
    admin: &Arc<Admin>,
    request: Request,
    leftover: Vec<u8>,
    read_half: R,
) -> (Response, Option<R>) {
    let leftover = std::io::Cursor::new(leftover);
    let bridge =
        tokio_util::io::SyncIoBridge::new_with_handle(read_half, tokio::runtime::Handle::current());
    let admin = admin.clone();
    let locks = BlockingLocks {
        backend: admin.locks.clone(),
        runtime: tokio::runtime::Handle::current(),
    };
    let done = tokio::task::spawn_blocking(move || {
        let mut body = Read::chain(leftover, bridge);
        let response = execute(
            &admin.directory,
            request,
            &mut body,
            admin.quotas,
            &admin.hashes,
            Some(&admin.metrics),
            Some(&locks),
        );
        (response, body.into_inner().1.into_inner())
    })
    .await;
    match done {
        Ok((response, back)) => (response, Some(back)),
        Err(e) => (
            Response::fail(format!("internal error: {e}"), exit::SOFTWARE),
            None,
        ),
    }
}

fn temporary(e: impl std::fmt::Display) -> Response {
    Response::fail(e.to_string(), exit::TEMPFAIL)
}

/// The domain a request is about, if one decides where it runs.
fn domain_of(request: &Request) -> Option<String> {
    let of_address = |a: &str| a.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase());
    match request {
        Request::DomainRemove { name } => Some(name.to_ascii_lowercase()),
        Request::UserAdd { address, .. }
        | Request::UserPasswd { address, .. }
        | Request::UserRemove { address }
        | Request::UserQuota { address, .. }
        | Request::ImportAccount { address, .. }
        | Request::ImportKnown { address } => of_address(address),
        Request::UserList { domain: Some(d) } => Some(d.to_ascii_lowercase()),
        _ => None,
    }
}

/// A request on a replica of a cluster: run here, sent to the domain's home, or answered
/// from the records.
#[allow(clippy::too_many_arguments)]
async fn clustered<R: AsyncRead + Send + Unpin + 'static>(
    cluster: &Arc<Cluster>,
    admin: &Arc<Admin>,
    request: Request,
    line: &[u8],
    leftover: Vec<u8>,
    read_half: R,
    from: Local,
    say: Say<'_>,
) -> (Response, Option<R>) {
    let forwarded = from == Local::Replica;
    match &request {
        Request::DomainMove {
            name,
            to,
            grace_secs,
        } => {
            let grace = grace_secs.map_or(MOVE_GRACE, std::time::Duration::from_secs);
            let r = match cluster.route(name, forwarded).await {
                Route::Forward(home) => {
                    return forward(cluster, &home, line, leftover, read_half, Some(say)).await
                }
                Route::Unavailable(why) => temporary(format!("{name}: {}", why.describe())),
                Route::Local => {
                    match crate::cluster::moving::move_domain(
                        cluster,
                        &admin.directory,
                        name,
                        to,
                        grace,
                        say,
                    )
                    .await
                    {
                        Ok(report) => Response::ok(vec![format!(
                            "domain {} moved to {to} (epoch {}): {} accounts, {} messages, {} octets; unavailable for {} ms",
                            name.to_ascii_lowercase(),
                            report.epoch,
                            report.accounts,
                            report.messages,
                            report.bytes,
                            report.frozen.as_millis()
                        )]),
                        Err(e) => move_failure(e),
                    }
                }
            };
            return (r, Some(read_half));
        }
        Request::ClusterRebalance { dry_run, pace } => {
            let r = rebalance(cluster, None, *dry_run, *pace, say).await;
            return (r, Some(read_half));
        }
        Request::ClusterDrain {
            replica,
            dry_run,
            pace,
        } => {
            if let Some(r) = unknown_replica(cluster, replica) {
                return (r, Some(read_half));
            }
            if !dry_run {
                if let Err(e) = cluster.homes().set_draining(replica, true).await {
                    return (temporary(e), Some(read_half));
                }
                say(format!(
                    "{replica} marked draining: new domains never land there"
                ));
            }
            let r = rebalance(cluster, Some(replica), *dry_run, *pace, say).await;
            return (r, Some(read_half));
        }
        Request::ClusterUndrain { replica } => {
            let r = match unknown_replica(cluster, replica) {
                Some(r) => r,
                None => match cluster.homes().set_draining(replica, false).await {
                    Ok(()) => Response::ok(vec![format!(
                        "{replica} no longer draining; `mailgate cluster rebalance` moves domains back to it"
                    )]),
                    Err(e) => temporary(e),
                },
            };
            return (r, Some(read_half));
        }
        Request::ClusterCleanup { older_than_secs } => {
            let r = if forwarded {
                cleanup_here(&admin.directory, *older_than_secs).await
            } else {
                let mut lines = Vec::new();
                let mut failed = None;
                for peer in cluster.link.peer_names() {
                    let r = ask(cluster, peer, &request).await;
                    if r.ok {
                        lines.extend(r.lines.into_iter().map(|l| format!("{peer}: {l}")));
                    } else {
                        let e = r.error.unwrap_or_default();
                        lines.push(format!("{peer}: not cleaned: {e}"));
                        failed.get_or_insert(r.exit_code);
                    }
                }
                match failed {
                    None => Response::ok(lines),
                    Some(code) => Response {
                        ok: false,
                        lines,
                        error: Some("some replicas were not cleaned".into()),
                        exit_code: code,
                    },
                }
            };
            return (r, Some(read_half));
        }
        Request::DomainAdd { name } => {
            let target = if forwarded {
                Ok(cluster.name().to_owned())
            } else {
                cluster.place(name).await
            };
            return match target {
                Ok(t) if t == cluster.name() => {
                    let r = match cluster.create_here(&admin.directory, name).await {
                        Ok(()) => Response::ok(vec![format!(
                            "domain {} added (home {t})",
                            name.to_ascii_lowercase()
                        )]),
                        Err(crate::cluster::ClusterError::Exists { domain, home }) => {
                            Response::fail(
                                format!("domain {domain} already exists (home {home})"),
                                exit::DATAERR,
                            )
                        }
                        Err(crate::cluster::ClusterError::Store(e)) => store_failure(e),
                        Err(e) => temporary(e),
                    };
                    (r, Some(read_half))
                }
                Ok(t) => forward(cluster, &t, line, leftover, read_half, None).await,
                Err(crate::cluster::ClusterError::Exists { domain, home }) => (
                    Response::fail(
                        format!("domain {domain} already exists (home {home})"),
                        exit::DATAERR,
                    ),
                    Some(read_half),
                ),
                Err(e) => (temporary(e), Some(read_half)),
            };
        }
        Request::DomainList => {
            let r = match cluster.homes().all().await {
                Ok(records) => Response::ok(records.into_iter().map(|(d, _)| d).collect()),
                Err(e) => temporary(e),
            };
            return (r, Some(read_half));
        }
        Request::UserList { domain: None } if !forwarded => {
            return (list_all_users(cluster).await, Some(read_half));
        }
        Request::ClusterStatus { json } => return (status(cluster, *json).await, Some(read_half)),
        Request::Ping => {
            let homed = cluster.homed_count();
            let r = Response::ok(vec![
                env!("CARGO_PKG_VERSION").to_owned(),
                homed.to_string(),
            ]);
            return (r, Some(read_half));
        }
        Request::Deliver { recipients, .. } => {
            let mut homes = Vec::new();
            for r in recipients {
                let route = match r.rsplit_once('@') {
                    Some((_, d)) => cluster.route(d, forwarded).await,
                    None => Route::Local,
                };
                if !homes.contains(&route) {
                    homes.push(route);
                }
            }
            return match homes.as_slice() {
                [Route::Forward(peer)] => forward(cluster, &peer.clone(), line, leftover, read_half, None).await,
                [Route::Unavailable(why)] => (temporary(why.describe()), Some(read_half)),
                [] | [Route::Local] => run_here(admin, request, leftover, read_half).await,
                _ => (
                    Response::fail(
                        "the recipients' domains live on different replicas: deliver to each separately".into(),
                        exit::TEMPFAIL,
                    ),
                    Some(read_half),
                ),
            };
        }
        _ => {}
    }
    let Some(domain) = domain_of(&request) else {
        return run_here(admin, request, leftover, read_half).await;
    };
    match cluster.route(&domain, forwarded).await {
        Route::Local => {
            let removing = matches!(request, Request::DomainRemove { .. });
            let (r, back) = run_here(admin, request, leftover, read_half).await;
            if removing && r.ok {
                if let Err(e) = cluster.removed_here(&domain).await {
                    warn!(domain, error = %e, "domain removed; its home record stays until the next announcement");
                }
            }
            (r, back)
        }
        Route::Forward(peer) => {
            // An import streams a whole maildrop: no overall deadline, only the idle bound
            // on the answer (the progress path of `forward`).
            let long = matches!(request, Request::ImportAccount { .. }).then_some(say);
            forward(cluster, &peer, line, leftover, read_half, long).await
        }
        Route::Unavailable(why) => (temporary(why.describe()), Some(read_half)),
    }
}

/// Every account of every domain, each domain's list from its home.
async fn list_all_users(cluster: &Arc<Cluster>) -> Response {
    let records = match cluster.homes().all().await {
        Ok(r) => r,
        Err(e) => return temporary(e),
    };
    let mut lines = Vec::new();
    for (domain, record) in records {
        let request = Request::UserList {
            domain: Some(domain.clone()),
        };
        let r = ask(cluster, &record.home, &request).await;
        if !r.ok {
            return r;
        }
        lines.extend(r.lines);
    }
    Response::ok(lines)
}

/// Sends a request without a body to `peer` (this replica included) and returns its
/// answer.
async fn ask(cluster: &Arc<Cluster>, peer: &str, request: &Request) -> Response {
    ask_saying(cluster, peer, request, None).await
}

/// `ask`, with the peer's progress lines passed to `say`.
async fn ask_saying(
    cluster: &Arc<Cluster>,
    peer: &str,
    request: &Request,
    say: Option<Say<'_>>,
) -> Response {
    let mut line = serde_json::to_vec(request).unwrap_or_default();
    line.push(b'\n');
    forward(cluster, peer, &line, Vec::new(), tokio::io::empty(), say)
        .await
        .0
}

/// The usage error for a replica name that is not in `cluster.peers` (the same text as a
/// move to one), or `None`.
fn unknown_replica(cluster: &Cluster, replica: &str) -> Option<Response> {
    (!cluster.link.peer_names().any(|p| p == replica)).then(|| {
        move_failure(crate::cluster::moving::MoveError::UnknownReplica(
            replica.to_owned(),
        ))
    })
}

/// How the operator reads a failed move, with its exit code.
fn move_failure(e: crate::cluster::moving::MoveError) -> Response {
    use crate::cluster::moving::MoveError;
    let code = match e {
        MoveError::UnknownReplica(_) | MoveError::AlreadyThere { .. } => exit::USAGE,
        MoveError::Store(e) => return store_failure(e),
        _ => exit::TEMPFAIL,
    };
    Response::fail(e.to_string(), code)
}

/// Moves each planned domain in turn (or lists the plan), pausing between moves.
async fn rebalance(
    cluster: &Arc<Cluster>,
    only_from: Option<&str>,
    dry_run: bool,
    pace: Pace,
    say: Say<'_>,
) -> Response {
    let plan = match cluster.plan(only_from).await {
        Ok(p) => p,
        Err(e) => return temporary(e),
    };
    let mut lines: Vec<String> = plan
        .stuck
        .iter()
        .map(|(d, why)| format!("cannot move {d}: {why}"))
        .collect();
    if plan.moves.is_empty() {
        lines.push("nothing to move: every domain is on its target".into());
        let ok = plan.stuck.is_empty();
        return Response {
            ok,
            lines,
            error: (!ok).then(|| "some domains cannot move now".to_owned()),
            exit_code: if ok { 0 } else { exit::TEMPFAIL },
        };
    }
    if dry_run {
        for m in &plan.moves {
            lines.push(format!(
                "would move {} from {} to {}",
                m.domain, m.from, m.to
            ));
        }
        return Response::ok(lines);
    }
    let pause = pace
        .pause_ms
        .map_or(MOVE_PAUSE, std::time::Duration::from_millis);
    let total = plan.moves.len();
    let mut failed = 0;
    for (i, m) in plan.moves.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(pause).await;
        }
        say(format!(
            "[{}/{total}] moving {} from {} to {}",
            i + 1,
            m.domain,
            m.from,
            m.to
        ));
        let request = Request::DomainMove {
            name: m.domain.clone(),
            to: m.to.clone(),
            grace_secs: pace.grace_secs,
        };
        let r = ask_saying(cluster, &m.from, &request, Some(say)).await;
        if r.ok {
            lines.extend(r.lines);
        } else {
            failed += 1;
            lines.push(format!(
                "{} not moved: {}",
                m.domain,
                r.error.unwrap_or_default()
            ));
        }
    }
    if failed == 0 && plan.stuck.is_empty() {
        Response::ok(lines)
    } else {
        Response {
            ok: false,
            lines,
            error: Some(format!(
                "{failed} of {total} moves failed, {} domains could not move",
                plan.stuck.len()
            )),
            exit_code: exit::TEMPFAIL,
        }
    }
}

/// Deletes this replica's copies left by moves that are older than `older_than_secs`.
async fn cleanup_here(directory: &Arc<Directory>, older_than_secs: u64) -> Response {
    let dir = directory.clone();
    let done = tokio::task::spawn_blocking(move || -> Result<Vec<String>, StoreError> {
        let cutoff = std::time::SystemTime::now()
            .checked_sub(std::time::Duration::from_secs(older_than_secs))
            .unwrap_or(std::time::UNIX_EPOCH);
        let mut lines = Vec::new();
        let mut kept = 0;
        for r in dir.retired()? {
            if r.at <= cutoff {
                dir.remove_retired(&r)?;
                lines.push(format!(
                    "removed old copy of {} ({})",
                    r.domain,
                    r.path.display()
                ));
            } else {
                kept += 1;
            }
        }
        lines.push(format!("{kept} newer copies kept"));
        Ok(lines)
    })
    .await;
    match done {
        Ok(Ok(lines)) => Response::ok(lines),
        Ok(Err(e)) => store_failure(e),
        Err(e) => Response::fail(format!("internal error: {e}"), exit::SOFTWARE),
    }
}

/// Sends the request (`line`, its newline included, then the body) to `peer` over the
/// replica link and returns the home's answer.
async fn forward<R: AsyncRead + Send + Unpin + 'static>(
    cluster: &Arc<Cluster>,
    peer: &str,
    line: &[u8],
    leftover: Vec<u8>,
    mut read_half: R,
    say: Option<Say<'_>>,
) -> (Response, Option<R>) {
    use crate::metrics::{ForwardProtocol, ForwardResult};
    let mut link = match cluster.connect(peer, Alpn::Admin).await {
        Ok(l) => l,
        Err(e) => {
            return (
                temporary(format!("home replica {peer} unreachable: {e}")),
                Some(read_half),
            )
        }
    };
    let sent = async {
        link.write_all(line).await?;
        link.write_all(&leftover).await?;
        tokio::io::copy(&mut read_half, &mut link).await?;
        link.shutdown().await?;
        // Progress lines (a move) until the response line; each must come within the
        // transfer's idle bound, the whole answer of any other request within the
        // request bound.
        let mut reader = tokio::io::BufReader::new(link);
        loop {
            let mut answer = Vec::new();
            let mut limited = (&mut reader).take(MAX_ANSWER_LINE);
            let read = limited.read_until(b'\n', &mut answer);
            let wait = match say {
                Some(_) => crate::cluster::transfer::IDLE,
                None => REQUEST_TIMEOUT * 4,
            };
            tokio::time::timeout(wait, read)
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            match (
                say,
                serde_json::from_slice::<Progress>(answer.trim_ascii_end()),
            ) {
                (Some(say), Ok(p)) => say(p.progress),
                (None, Ok(_)) => {}
                _ => return Ok::<_, std::io::Error>(answer),
            }
        }
    };
    let metrics = cluster.metrics();
    let answer = tokio::time::timeout(
        match say {
            Some(_) => std::time::Duration::MAX,
            None => REQUEST_TIMEOUT * 4,
        },
        sent,
    )
    .await;
    let response = match answer {
        Ok(Ok(bytes)) => match serde_json::from_slice::<Response>(bytes.trim_ascii_end()) {
            Ok(r) => {
                metrics.forward(peer, ForwardProtocol::Admin, ForwardResult::Ok);
                r
            }
            Err(e) => {
                metrics.forward(peer, ForwardProtocol::Admin, ForwardResult::Error);
                temporary(format!("bad answer from {peer}: {e}"))
            }
        },
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
            metrics.forward(peer, ForwardProtocol::Admin, ForwardResult::Error);
            temporary(format!("home replica {peer} did not answer in time"))
        }
        Ok(Err(e)) => {
            metrics.forward(peer, ForwardProtocol::Admin, ForwardResult::Error);
            temporary(format!("home replica {peer}: {e}"))
        }
        Err(_) => {
            metrics.forward(peer, ForwardProtocol::Admin, ForwardResult::Error);
            temporary(format!("home replica {peer} did not answer in time"))
        }
    };
    (response, Some(read_half))
}

/// Every replica and every domain, as lines or one JSON document.
pub async fn status(cluster: &Arc<Cluster>, json: bool) -> Response {
    let names: Vec<String> = cluster.link.peer_names().map(str::to_owned).collect();
    let draining = match cluster.homes().draining().await {
        Ok(d) => d,
        Err(e) => return temporary(e),
    };
    let mut replicas = Vec::new();
    for name in &names {
        let answer = ask(cluster, name, &Request::Ping).await;
        let (reachable, version, domains) = match answer.lines.as_slice() {
            [version, domains] if answer.ok => {
                (true, Some(version.clone()), domains.parse::<u64>().ok())
            }
            _ => (false, None, None),
        };
        replicas.push(serde_json::json!({
            "name": name,
            "reachable": reachable,
            "version": version,
            "domains": domains,
            "draining": draining.contains(name),
        }));
    }
    let records = match cluster.homes().all().await {
        Ok(r) => r,
        Err(e) => return temporary(e),
    };
    let domains: Vec<serde_json::Value> = records
        .iter()
        .map(|(d, r)| {
            serde_json::json!({
                "name": d,
                "home": r.home,
                "state": r.state.name(),
                "epoch": r.epoch,
            })
        })
        .collect();
    if json {
        let doc = serde_json::json!({ "replicas": replicas, "domains": domains });
        return Response::ok(vec![doc.to_string()]);
    }
    let mut lines = vec![format!(
        "{:<24} {:<10} {:<10} {:<8} {}",
        "REPLICA", "REACHABLE", "VERSION", "DOMAINS", "DRAINING"
    )];
    let yes_no = |v: &serde_json::Value| {
        if v.as_bool() == Some(true) {
            "yes"
        } else {
            "no"
        }
    };
    for r in &replicas {
        lines.push(format!(
            "{:<24} {:<10} {:<10} {:<8} {}",
            r["name"].as_str().unwrap_or("?"),
            yes_no(&r["reachable"]),
            r["version"].as_str().unwrap_or("-"),
            r["domains"]
                .as_u64()
                .map_or("-".to_owned(), |n| n.to_string()),
            yes_no(&r["draining"]),
        ));
    }
    lines.push(String::new());
    lines.push(format!(
        "{:<40} {:<24} {:<8} {}",
        "DOMAIN", "HOME", "STATE", "EPOCH"
    ));
    for (d, r) in &records {
        lines.push(format!(
            "{:<40} {:<24} {:<8} {}",
            d,
            r.home,
            r.state.name(),
            r.epoch
        ));
    }
    Response::ok(lines)
}
async fn reply<S: AsyncWrite>(
    write_half: &mut WriteHalf<S>,
    response: &Response,
) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(response).unwrap_or_default();
    out.push(b'\n');
    write_half.write_all(&out).await?;
    write_half.shutdown().await
}

fn request_name(r: &Request) -> &'static str {
    match r {
        Request::DomainAdd { .. } => "domain_add",
        Request::DomainList => "domain_list",
        Request::DomainRemove { .. } => "domain_remove",
        Request::UserAdd { .. } => "user_add",
        Request::UserPasswd { .. } => "user_passwd",
        Request::UserRemove { .. } => "user_remove",
        Request::UserList { .. } => "user_list",
        Request::UserQuota { .. } => "user_quota",
        Request::Deliver { .. } => "deliver",
        Request::ImportAccount { .. } => "import_account",
        Request::ImportKnown { .. } => "import_known",
        Request::ClusterStatus { .. } => "cluster_status",
        Request::Ping => "ping",
        Request::DomainMove { .. } => "domain_move",
        Request::ClusterRebalance { .. } => "cluster_rebalance",
        Request::ClusterDrain { .. } => "cluster_drain",
        Request::ClusterUndrain { .. } => "cluster_undrain",
        Request::ClusterCleanup { .. } => "cluster_cleanup",
        Request::MoveReceive { .. } => "move_receive",
    }
}

/// Client side: sends `request` (and `body` for Deliver) to a running server. `Ok(None)`
/// when no server is listening, so the caller can work on the data dir directly.
pub fn call(
    path: &Path,
    request: &Request,
    body: Option<&mut dyn Read>,
) -> Result<Option<Response>, AdminError> {
    use std::io::{BufRead, Write};
    let io = |source| AdminError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut stream = match std::os::unix::net::UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(io(e)),
    };
    let mut line = serde_json::to_vec(request).map_err(|e| AdminError::Protocol(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    if let Some(body) = body {
        match std::io::copy(body, &mut stream) {
            Ok(_) => {}
            // The server refused the request before reading the body (e.g. an unknown
            // recipient) and closed its side; its answer is still waiting to be read.
            // Closing with unread data makes Linux report ECONNRESET rather than EPIPE
            // on some writes, so both mean the same here.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) => {}
            Err(e) => return Err(io(e)),
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut reader = std::io::BufReader::new(stream);
    loop {
        let mut reply = Vec::new();
        (&mut reader)
            .take(MAX_ANSWER_LINE)
            .read_until(b'\n', &mut reply)
            .map_err(io)?;
        // Progress of a long request (a move), printed as it comes.
        if let Ok(p) = serde_json::from_slice::<Progress>(&reply) {
            eprintln!("{}", p.progress);
            continue;
        }
        return serde_json::from_slice(&reply)
            .map(Some)
            .map_err(|e| AdminError::Protocol(e.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A data dir with the domain a.org.
    fn domain_a_org() -> (tempfile::TempDir, Directory) {
        let dir = tempfile::tempdir().expect("tempdir");
        let directory = Directory::open(dir.path(), Default::default()).expect("open");
        directory.add_domain("a.org").expect("domain");
        (dir, directory)
    }

    /// `user add`, `user passwd` and an import take credentials the server can verify
    /// (argon2id, or an imported legacy hash within its ceiling) and refuse anything
    /// else, never echoing it.
    #[test]
    fn credentials_from_clients_are_checked_by_the_server() {
        let (_dir, directory) = domain_a_org();
        let hashes = HashParams::cheap();
        let run = |request: Request| {
            let quotas = Quotas {
                account: 0,
                domain: 0,
            };
            execute(
                &directory,
                request,
                std::io::empty(),
                quotas,
                &hashes,
                None,
                None,
            )
        };
        let creds = |phc: &str| Credentials {
            phc: phc.into(),
            scram: None,
            apop_secret: None,
        };
        let garbage = creds("not-a-hash-SECRET");
        let r = run(Request::UserAdd {
            address: "joe@a.org".into(),
            credentials: garbage.clone(),
        });
        let error = r.error.clone().unwrap_or_default();
        assert!(!r.ok && r.exit_code == exit::DATAERR, "{r:?}");
        assert!(
            error.contains("refused") && !error.contains("SECRET"),
            "{error}"
        );
        let costly =
            creds("{BLF-CRYPT}$2b$20$abcdefghijklmnopqrstuu/FyAyuZSl3DbPdvio4KrIBdz2k2yhV2");
        assert!(
            !run(Request::UserAdd {
                address: "joe@a.org".into(),
                credentials: costly,
            })
            .ok
        );
        let legacy =
            creds("{BLF-CRYPT}$2b$04$abcdefghijklmnopqrstuu/FyAyuZSl3DbPdvio4KrIBdz2k2yhV2");
        let r = run(Request::UserAdd {
            address: "joe@a.org".into(),
            credentials: legacy,
        });
        assert!(r.ok, "{r:?}");
        let r = run(Request::UserPasswd {
            address: "joe@a.org".into(),
            credentials: garbage.clone(),
        });
        assert!(!r.ok && r.exit_code == exit::DATAERR, "{r:?}");
        // An import creates no account from credentials no login could verify.
        let r = run(Request::ImportAccount {
            address: "ann@a.org".into(),
            credentials: garbage,
            mirror_deletions: false,
        });
        let error = r.error.clone().unwrap_or_default();
        assert!(!r.ok && r.exit_code == exit::DATAERR, "{r:?}");
        assert!(!error.contains("SECRET"), "{error}");
        let store = directory.domain("a.org").expect("store");
        assert!(store.account("ann").expect("read").is_none());
        let good = crate::auth::make_credentials("pw", &hashes).expect("hash");
        assert!(
            run(Request::UserPasswd {
                address: "joe@a.org".into(),
                credentials: good,
            })
            .ok
        );
    }

    /// An import mirroring deletions deletes nothing unless its stream ended with the
    /// end line (a CLI that died mid-stream must not look like a source that shrank).
    #[test]
    fn a_mirroring_import_deletes_only_after_a_complete_stream() {
        let (_dir, directory) = domain_a_org();
        let hashes = HashParams::cheap();
        let credentials = crate::auth::make_credentials("pw", &hashes).expect("hash");
        let run = |uidls: &[&str], end: bool, mirror_deletions: bool| {
            let mut body = Vec::new();
            for uidl in uidls {
                body.extend(migrate::frame::header(3, uidl));
                body.extend(b"x\r\n");
            }
            if end {
                body.extend(migrate::frame::END);
                body.push(b'\n');
            }
            let request = Request::ImportAccount {
                address: "u@a.org".into(),
                credentials: credentials.clone(),
                mirror_deletions,
            };
            let quotas = Quotas {
                account: 0,
                domain: 0,
            };
            execute(&directory, request, &body[..], quotas, &hashes, None, None)
        };
        let count = || {
            let store = directory.domain("a.org").expect("store");
            store.snapshot("u").expect("maildrop").len()
        };
        assert!(run(&["a1", "a2"], false, false).ok);
        assert_eq!(count(), 2);
        let r = run(&["a1"], false, true);
        assert!(!r.ok && r.exit_code == exit::TEMPFAIL, "{r:?}");
        assert!(r.error.unwrap_or_default().contains("end line"));
        assert_eq!(count(), 2);
        let r = run(&["a1"], true, true);
        assert!(r.ok, "{r:?}");
        let imported: migrate::Imported = serde_json::from_str(&r.lines[0]).expect("json");
        assert_eq!((imported.existing, imported.mirrored), (1, 1));
        assert_eq!(count(), 1);
    }

    /// A watcher looking at the socket's path while it is bound again and again never
    /// finds it with any mode but 0600, and no staging directory is left behind.
    #[tokio::test]
    async fn the_socket_appears_with_mode_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let path = dir.path().join("admin.sock");
        let done = Arc::new(AtomicBool::new(false));
        let watcher = {
            let (path, done) = (path.clone(), done.clone());
            std::thread::spawn(move || {
                let mut seen = std::collections::BTreeSet::new();
                while !done.load(Ordering::Relaxed) {
                    if let Ok(m) = std::fs::symlink_metadata(&path) {
                        if m.file_type().is_socket() {
                            seen.insert(m.permissions().mode() & 0o777);
                        }
                    }
                }
                seen
            })
        };
        for _ in 0..300 {
            let listener = bind(&path).await.expect("bind");
            drop(listener);
            std::fs::remove_file(&path).expect("remove");
        }
        done.store(true, Ordering::Relaxed);
        let seen = watcher.join().expect("watcher");
        let modes: Vec<String> = seen.iter().map(|m| format!("{m:o}")).collect();
        assert!(seen.iter().all(|m| *m == 0o600), "modes seen: {modes:?}");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}
