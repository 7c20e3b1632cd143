//! The domain transfer protocol of a move: the domain's home (the sender) brings a
//! staging copy on the target replica (the receiver) up to date with its store, over an
//! admin link (mutual TLS) whose request line is [`request_line`]. A pass is the same
//! whether the store still changes (the pre-copy) or is sealed (the final delta): per
//! account, the receiver lists the ids it holds, the sender lists what the maildrop
//! holds now and sends the bodies the receiver lacks; the receiver drops what the sender
//! no longer has. After the pass the receiver reports per-account counts, octets and a
//! digest of the UIDLs, which the sender compares with its own. Message ids (and so
//! UIDLs) are kept, stored UIDLs (imported mail) travel with their messages and the
//! tombstones of deleted ones with their account, and the digest covers both; the final
//! pass carries the id allocator's position.
//!
//! Messages are a kind byte, a 4-byte big-endian length and the payload:
//!
//! | kind | direction | payload |
//! |------|-----------|---------|
//! | `K`  | ← | ready (the staging store is open); nothing is sent before it |
//! | `P`  | → | pass start: JSON `{"final": bool}` |
//! | `A`  | → | an account: JSON `{"local", "account"}` |
//! | `I`  | ← | ids the receiver holds for it (u64 BE each); `i` ends them |
//! | `E`  | → | the sender's entries: id u64, octets u64, seen u8 each; `e` ends them |
//! | `T`  | → | the account's tombstones (deleted imported UIDLs), one per line; `t` ends them |
//! | `M`  | → | a message follows: id u64, octets u64, seen u8, then its stored UIDL if it has one (format 4); `B` body chunks; `m` ends it |
//! | `Z`  | → | pass end: JSON `{"id_floor": u64 or null}` |
//! | `V`  | ← | the receiver's summary: JSON list of [`AccountSum`] |
//! | `C`  | → | install the copy, not yet served (epoch 0); `K` answers |
//! | `G`  | → | the record now names the receiver: serve at JSON `{"epoch"}`; `K` answers |
//! | `X`  | ↔ | give up (UTF-8 reason); the receiver discards its copy |
//!
//! Nothing is served from the copy before `G`; a receiver that stops before it leaves a
//! staging directory that its next start removes, or an installed copy at epoch 0 that
//! its duties adopt or retire by the record (`Cluster::tick`).

use crate::store::{Account, Directory, DomainStore, PendingMessage, StoreError, CHUNK_SIZE};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest payload: a body chunk, or 8 192 entries of 17 bytes.
const MAX_PAYLOAD: usize = 256 * 1024;
/// Entries (or ids) per `E` (`I`) message.
const PER_MESSAGE: usize = 8192;
/// How long either side waits for the other's next message: a pass's pauses are the
/// other side's store work, and the sender's freeze between passes.
pub const IDLE: Duration = Duration::from_secs(300);
const ENTRY_LEN: usize = 17;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("replica link: {0}")]
    Io(#[from] std::io::Error),
    #[error("the other replica sent nothing for {} s", IDLE.as_secs())]
    Idle,
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("the other replica gave up: {0}")]
    Remote(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("copy differs from the home's store: {0}")]
    Mismatch(String),
}

fn protocol(what: impl Into<String>) -> TransferError {
    TransferError::Protocol(what.into())
}

/// The admin request that opens the receiving side on the target.
pub fn request_line(domain: &str) -> Vec<u8> {
    let mut line = serde_json::json!({ "op": "move_receive", "domain": domain })
        .to_string()
        .into_bytes();
    line.push(b'\n');
    line
}

/// One account's figures as the copy's check compares them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountSum {
    pub local: String,
    pub messages: u64,
    pub octets: u64,
    pub seen: u64,
    /// SHA-256 (hex) of the account's UIDLs in maildrop order, one per line, then a
    /// blank line and its tombstones (deleted imported UIDLs), one per line.
    pub uidls: String,
    /// SHA-256 (hex) of the account record (credentials, nonce, quota).
    pub record: String,
}

/// Every account's figures, sorted by local part (blocking).
pub fn summarize(store: &DomainStore) -> Result<Vec<AccountSum>, StoreError> {
    use sha2::{Digest, Sha256};
    let mut out = Vec::new();
    for local in store.list_accounts()? {
        let Some(account) = store.account(&local)? else {
            continue;
        };
        let record = serde_json::to_vec(&account)
            .map_err(|e| StoreError::Corrupt(format!("cannot encode account {local}: {e}")))?;
        let mut uidls = Sha256::new();
        let (mut messages, mut octets, mut seen) = (0, 0, 0);
        let snapshot = store.snapshot(&local)?;
        let shown = store.uidls(&local, account.uid_nonce)?;
        for m in snapshot {
            uidls.update(shown.get(m.id).as_bytes());
            uidls.update(b"\n");
            messages += 1;
            octets += m.octets;
            seen += u64::from(m.seen);
        }
        uidls.update(b"\n");
        for uidl in store.tombstones(&local)? {
            uidls.update(uidl.as_bytes());
            uidls.update(b"\n");
        }
        out.push(AccountSum {
            local,
            messages,
            octets,
            seen,
            uidls: hex(&uidls.finalize()),
            record: hex(&Sha256::digest(&record)),
        });
    }
    Ok(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The first difference between the home's figures and the copy's, if any.
pub fn compare(home: &[AccountSum], copy: &[AccountSum]) -> Option<String> {
    for (a, b) in home.iter().zip(copy) {
        if a != b {
            return Some(format!(
                "account {}: home {} messages/{} octets, copy {} ({}) {}/{}",
                a.local,
                a.messages,
                a.octets,
                b.local,
                if a.uidls == b.uidls && a.record == b.record {
                    "same UIDLs"
                } else {
                    "different UIDLs or record"
                },
                b.messages,
                b.octets
            ));
        }
    }
    (home.len() != copy.len())
        .then(|| format!("home has {} accounts, copy {}", home.len(), copy.len()))
}

/// Counters a pass updates as it goes, for progress output.
#[derive(Debug, Default)]
pub struct Progress {
    pub accounts: AtomicU64,
    pub messages: AtomicU64,
    pub bytes: AtomicU64,
}

/// One side of the transfer: framed messages with a bounded wait for each.
struct Wire<S> {
    stream: S,
    payload: Vec<u8>,
    /// A message read but handed back (`unread`): the next `recv` returns it.
    pending: Option<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    fn new(stream: S) -> Wire<S> {
        Wire {
            stream,
            payload: Vec::new(),
            pending: None,
        }
    }

    async fn send(&mut self, kind: u8, payload: &[u8]) -> Result<(), TransferError> {
        let len = u32::try_from(payload.len()).map_err(|_| protocol("payload too large"))?;
        let mut head = [0u8; 5];
        head[0] = kind;
        head[1..].copy_from_slice(&len.to_be_bytes());
        self.stream.write_all(&head).await?;
        self.stream.write_all(payload).await?;
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), TransferError> {
        Ok(self.stream.flush().await?)
    }

    /// The next message's kind; its payload is in `self.payload`. An `X` becomes
    /// `Remote`.
    async fn recv(&mut self) -> Result<u8, TransferError> {
        if let Some(kind) = self.pending.take() {
            return Ok(kind);
        }
        let read = async {
            let mut head = [0u8; 5];
            self.stream.read_exact(&mut head).await?;
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            if len > MAX_PAYLOAD {
                return Err(protocol(format!("message of {len} bytes")));
            }
            self.payload.resize(len, 0);
            self.stream.read_exact(&mut self.payload).await?;
            Ok(head[0])
        };
        let kind = tokio::time::timeout(IDLE, read)
            .await
            .map_err(|_| TransferError::Idle)??;
        if kind == b'X' {
            return Err(TransferError::Remote(
                String::from_utf8_lossy(&self.payload).into_owned(),
            ));
        }
        Ok(kind)
    }

    async fn expect(&mut self, want: u8) -> Result<(), TransferError> {
        let kind = self.recv().await?;
        if kind != want {
            return Err(protocol(format!(
                "expected {:?}, got {:?}",
                char::from(want),
                char::from(kind)
            )));
        }
        Ok(())
    }

    fn json<T: for<'de> Deserialize<'de>>(&self) -> Result<T, TransferError> {
        serde_json::from_slice(&self.payload).map_err(|e| protocol(format!("bad JSON: {e}")))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, TransferError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TransferError::Io(std::io::Error::other(e.to_string())))?
        .map_err(TransferError::Store)
}

fn entry_bytes(out: &mut Vec<u8>, id: u64, octets: u64, seen: bool) {
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&octets.to_be_bytes());
    out.push(u8::from(seen));
}

fn parse_entry(b: &[u8]) -> (u64, u64, bool) {
    let id = u64::from_be_bytes(b[..8].try_into().unwrap_or_default());
    let octets = u64::from_be_bytes(b[8..16].try_into().unwrap_or_default());
    (id, octets, b[16] != 0)
}

#[derive(Serialize, Deserialize)]
struct Pass {
    #[serde(rename = "final")]
    last: bool,
}

#[derive(Serialize, Deserialize)]
struct AccountHead {
    local: String,
    account: Account,
}

#[derive(Serialize, Deserialize)]
struct PassEnd {
    id_floor: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct Go {
    epoch: u64,
}

/// The sending side of one move, on the domain's home.
pub struct Sender<S> {
    wire: Wire<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Sender<S> {
    /// Starts on a link whose request line was already sent: waits for the receiver to
    /// be ready.
    pub async fn start(stream: S) -> Result<Sender<S>, TransferError> {
        let mut wire = Wire::new(stream);
        wire.expect(b'K').await?;
        Ok(Sender { wire })
    }

    /// Brings the receiver's copy up to date with `store` and returns the receiver's
    /// summary. `id_floor` is sent on the final pass (the store sealed).
    pub async fn pass(
        &mut self,
        store: &Arc<DomainStore>,
        id_floor: Option<u64>,
        progress: &Progress,
    ) -> Result<Vec<AccountSum>, TransferError> {
        let wire = &mut self.wire;
        let pass = serde_json::to_vec(&Pass {
            last: id_floor.is_some(),
        })
        .map_err(|e| protocol(e.to_string()))?;
        wire.send(b'P', &pass).await?;
        let s = store.clone();
        let locals = blocking(move || s.list_accounts()).await?;
        for local in locals {
            let (s, l) = (store.clone(), local.clone());
            let Some((account, entries, uidls, tombstones)) = blocking(move || {
                let Some(account) = s.account(&l)? else {
                    return Ok(None);
                };
                let entries = s.snapshot(&l)?;
                let uidls = s.uidls(&l, account.uid_nonce)?;
                Ok(Some((account, entries, uidls, s.tombstones(&l)?)))
            })
            .await?
            else {
                // Removed since the listing: the receiver drops it too.
                continue;
            };
            let head = serde_json::to_vec(&AccountHead {
                local: local.clone(),
                account,
            })
            .map_err(|e| protocol(e.to_string()))?;
            wire.send(b'A', &head).await?;
            wire.flush().await?;
            let mut held = HashSet::new();
            loop {
                match wire.recv().await? {
                    b'I' if wire.payload.len().is_multiple_of(8) => {
                        for id in wire.payload.chunks_exact(8) {
                            held.insert(u64::from_be_bytes(id.try_into().unwrap_or_default()));
                        }
                    }
                    b'i' => break,
                    k => return Err(protocol(format!("expected ids, got {:?}", char::from(k)))),
                }
            }
            let mut chunk = Vec::with_capacity(PER_MESSAGE * ENTRY_LEN);
            for batch in entries.chunks(PER_MESSAGE) {
                chunk.clear();
                for m in batch {
                    entry_bytes(&mut chunk, m.id, m.octets, m.seen);
                }
                wire.send(b'E', &chunk).await?;
            }
            wire.send(b'e', &[]).await?;
            chunk.clear();
            for uidl in &tombstones {
                if chunk.len() + uidl.len() + 1 > MAX_PAYLOAD {
                    wire.send(b'T', &chunk).await?;
                    chunk.clear();
                }
                chunk.extend_from_slice(uidl.as_bytes());
                chunk.push(b'\n');
            }
            if !chunk.is_empty() {
                wire.send(b'T', &chunk).await?;
            }
            wire.send(b't', &[]).await?;
            for m in entries.iter().filter(|m| !held.contains(&m.id)) {
                chunk.clear();
                entry_bytes(&mut chunk, m.id, m.octets, m.seen);
                if let Some(uidl) = uidls.stored(m.id) {
                    chunk.extend_from_slice(uidl.as_bytes());
                }
                wire.send(b'M', &chunk).await?;
                let mut offset = 0u64;
                while offset < m.octets {
                    let (s, id) = (store.clone(), m.id);
                    let buf = blocking(move || {
                        let mut buf = Vec::with_capacity(CHUNK_SIZE);
                        s.read_body(id, offset, &mut buf)?;
                        Ok(buf)
                    })
                    .await?;
                    if buf.is_empty() {
                        // Deleted while the store still serves: the receiver sees the
                        // message short and drops it; the next pass settles it.
                        break;
                    }
                    offset += buf.len() as u64;
                    progress
                        .bytes
                        .fetch_add(buf.len() as u64, Ordering::Relaxed);
                    wire.send(b'B', &buf).await?;
                }
                wire.send(b'm', &[]).await?;
                progress.messages.fetch_add(1, Ordering::Relaxed);
            }
            progress.accounts.fetch_add(1, Ordering::Relaxed);
        }
        let end = serde_json::to_vec(&PassEnd { id_floor }).map_err(|e| protocol(e.to_string()))?;
        wire.send(b'Z', &end).await?;
        wire.flush().await?;
        wire.expect(b'V').await?;
        wire.json()
    }

    /// Has the receiver install its copy, not yet served.
    pub async fn install(&mut self) -> Result<(), TransferError> {
        self.wire.send(b'C', &[]).await?;
        self.wire.flush().await?;
        self.wire.expect(b'K').await
    }

    /// Tells the receiver the record names it at `epoch`: it serves from now on.
    pub async fn go(&mut self, epoch: u64) -> Result<(), TransferError> {
        let go = serde_json::to_vec(&Go { epoch }).map_err(|e| protocol(e.to_string()))?;
        self.wire.send(b'G', &go).await?;
        self.wire.flush().await?;
        self.wire.expect(b'K').await
    }

    /// Tells the receiver to discard its copy (best effort).
    pub async fn abandon(&mut self, reason: &str) {
        let _ = self.wire.send(b'X', reason.as_bytes()).await;
        let _ = self.wire.flush().await;
        let _ = self.wire.stream.shutdown().await;
    }
}

/// What the receiving side needs from its replica.
pub trait Installed: Send + Sync {
    /// The copy of `domain` is installed here and served at `epoch`.
    fn serving(&self, domain: &str, epoch: u64);
}

/// The receiving side of one move, on the target: runs until the copy is served, or
/// discards it. `stream` has had its request line read.
pub async fn receive<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    directory: Arc<Directory>,
    domain: &str,
    installed: &dyn Installed,
) -> Result<(), TransferError> {
    let mut wire = Wire::new(stream);
    let dir = directory.clone();
    let name = domain.to_owned();
    let staging = match blocking(move || {
        if dir.has_domain(&name) {
            return Err(StoreError::DomainExists(name));
        }
        dir.open_staging(&name)
    })
    .await
    {
        Ok(s) => {
            wire.send(b'K', &[]).await?;
            wire.flush().await?;
            Some(s)
        }
        Err(e) => {
            wire.send(b'X', format!("target cannot take {domain}: {e}").as_bytes())
                .await?;
            wire.flush().await?;
            return Err(e);
        }
    };
    let result = receive_passes(&mut wire, staging, &directory, domain, installed).await;
    if let Err(e) = &result {
        // The staging store was dropped with `receive_passes`; an installed copy is
        // left to the record (adopted or retired by `Cluster::tick`).
        let (dir, name) = (directory.clone(), domain.to_owned());
        blocking(move || dir.discard_staging(&name)).await?;
        if !matches!(e, TransferError::Remote(_)) {
            let _ = wire
                .send(b'X', format!("target failed: {e}").as_bytes())
                .await;
            let _ = wire.flush().await;
        }
    }
    result
}

async fn receive_passes<S: AsyncRead + AsyncWrite + Unpin>(
    wire: &mut Wire<S>,
    mut staging: Option<Arc<DomainStore>>,
    directory: &Arc<Directory>,
    domain: &str,
    installed: &dyn Installed,
) -> Result<(), TransferError> {
    loop {
        match wire.recv().await? {
            b'P' => {
                let Some(store) = &staging else {
                    return Err(protocol("pass after install"));
                };
                receive_pass(wire, store).await?;
            }
            b'C' => {
                let Some(store) = staging.take() else {
                    return Err(protocol("install twice"));
                };
                let (dir, name) = (directory.clone(), domain.to_owned());
                blocking(move || dir.install_staging(&name, store, 0)).await?;
                wire.send(b'K', &[]).await?;
                wire.flush().await?;
            }
            b'G' if staging.is_none() => {
                let Go { epoch } = wire.json()?;
                let (dir, name) = (directory.clone(), domain.to_owned());
                blocking(move || dir.set_epoch(&name, epoch)).await?;
                installed.serving(domain, epoch);
                wire.send(b'K', &[]).await?;
                wire.flush().await?;
                return Ok(());
            }
            k => return Err(protocol(format!("unexpected {:?}", char::from(k)))),
        }
    }
}

/// One pass into the staging store; answers with the summary.
async fn receive_pass<S: AsyncRead + AsyncWrite + Unpin>(
    wire: &mut Wire<S>,
    store: &Arc<DomainStore>,
) -> Result<(), TransferError> {
    let Pass { last } = wire.json()?;
    let mut seen_accounts = HashSet::new();
    let id_floor = loop {
        match wire.recv().await? {
            b'A' => {
                let AccountHead { local, account } = wire.json()?;
                if !seen_accounts.insert(local.clone()) {
                    return Err(protocol(format!("account {local} twice")));
                }
                receive_account(wire, store, local, account, last).await?;
            }
            b'Z' => break wire.json::<PassEnd>()?.id_floor,
            k => return Err(protocol(format!("unexpected {:?}", char::from(k)))),
        }
    };
    if last && id_floor.is_none() {
        return Err(protocol("final pass without the id floor"));
    }
    let s = store.clone();
    let report = blocking(move || {
        for local in s.list_accounts()? {
            if !seen_accounts.contains(&local) {
                s.remove_account(&local)?;
            }
        }
        if let Some(floor) = id_floor {
            s.raise_id_floor(floor)?;
        }
        s.flush()?;
        summarize(&s)
    })
    .await?;
    let report = serde_json::to_vec(&report).map_err(|e| protocol(e.to_string()))?;
    wire.send(b'V', &report).await?;
    wire.flush().await
}

async fn receive_account<S: AsyncRead + AsyncWrite + Unpin>(
    wire: &mut Wire<S>,
    store: &Arc<DomainStore>,
    local: String,
    account: Account,
    last: bool,
) -> Result<(), TransferError> {
    let (s, l) = (store.clone(), local.clone());
    let held = blocking(move || {
        match s.account(&l)? {
            Some(_) => s.update_account(&l, &account)?,
            None => s.create_account(&l, &account)?,
        }
        Ok(s.snapshot(&l)?
            .into_iter()
            .map(|m| m.id)
            .collect::<Vec<u64>>())
    })
    .await?;
    let mut ids = Vec::with_capacity(PER_MESSAGE * 8);
    for batch in held.chunks(PER_MESSAGE) {
        ids.clear();
        for id in batch {
            ids.extend_from_slice(&id.to_be_bytes());
        }
        wire.send(b'I', &ids).await?;
    }
    wire.send(b'i', &[]).await?;
    wire.flush().await?;
    let (mut keep, mut seen) = (HashSet::new(), Vec::new());
    loop {
        match wire.recv().await? {
            b'E' if wire.payload.len().is_multiple_of(ENTRY_LEN) => {
                for e in wire.payload.chunks_exact(ENTRY_LEN) {
                    let (id, _, is_seen) = parse_entry(e);
                    keep.insert(id);
                    if is_seen {
                        seen.push(id);
                    }
                }
            }
            b'e' => break,
            k => {
                return Err(protocol(format!(
                    "expected entries, got {:?}",
                    char::from(k)
                )))
            }
        }
    }
    let gone: Vec<u64> = held
        .iter()
        .copied()
        .filter(|id| !keep.contains(id))
        .collect();
    let held: HashSet<u64> = held.into_iter().collect();
    let mut tombstones = Vec::new();
    loop {
        match wire.recv().await? {
            b'T' => {
                for line in wire.payload.split_inclusive(|&b| b == b'\n') {
                    let uidl = line
                        .strip_suffix(b"\n")
                        .and_then(|u| std::str::from_utf8(u).ok())
                        .ok_or_else(|| protocol("bad tombstone list"))?;
                    tombstones.push(uidl.to_owned());
                }
            }
            b't' => break,
            k => {
                return Err(protocol(format!(
                    "expected tombstones, got {:?}",
                    char::from(k)
                )))
            }
        }
    }
    let (s, l) = (store.clone(), local.clone());
    blocking(move || {
        s.update_maildrop(&l, &gone, &seen)?;
        s.set_tombstones(&l, &tombstones)
    })
    .await?;
    // The messages the receiver lacks, then the next account or the pass's end.
    loop {
        let kind = wire.recv().await?;
        if kind != b'M' {
            wire.pending = Some(kind);
            return Ok(());
        }
        let Some((entry, uidl)) = wire.payload.split_at_checked(ENTRY_LEN) else {
            return Err(protocol("bad message head"));
        };
        let (id, octets, is_seen) = parse_entry(entry);
        let uidl = match uidl {
            [] => None,
            bytes => Some(
                std::str::from_utf8(bytes)
                    .map_err(|_| protocol(format!("message {id}: UIDL not ASCII")))?
                    .to_owned(),
            ),
        };
        if held.contains(&id) || !keep.contains(&id) {
            return Err(protocol(format!("message {id} not asked for")));
        }
        let head = Head {
            id,
            octets,
            seen: is_seen,
            uidl,
        };
        receive_message(wire, store, &local, head, last).await?;
    }
}

/// What an `M` message announces.
struct Head {
    id: u64,
    octets: u64,
    seen: bool,
    /// The message's stored UIDL, if it has one.
    uidl: Option<String>,
}

/// One message's body into the staging store. A message shorter than announced was
/// deleted on the home while the pre-copy read it: dropped here, settled by the next
/// pass. In the final pass (the home sealed) that cannot happen and is an error.
async fn receive_message<S: AsyncRead + AsyncWrite + Unpin>(
    wire: &mut Wire<S>,
    store: &Arc<DomainStore>,
    local: &str,
    head: Head,
    last: bool,
) -> Result<(), TransferError> {
    let (s, l) = (store.clone(), local.to_owned());
    let Head {
        id,
        octets,
        seen,
        uidl,
    } = head;
    let mut msg: PendingMessage = blocking(move || {
        let mut msg = s.begin_copy(&l, id)?;
        if let Some(uidl) = uidl {
            msg.keep_uidl(&uidl)?;
        }
        Ok(msg)
    })
    .await?;
    if seen {
        msg.mark_seen();
    }
    loop {
        match wire.recv().await? {
            b'B' => {
                if msg.octets() + wire.payload.len() as u64 > octets {
                    return Err(protocol(format!("message {id} longer than announced")));
                }
                let (s, data) = (store.clone(), std::mem::take(&mut wire.payload));
                msg = blocking(move || {
                    msg.write(&s, &data)?;
                    Ok(msg)
                })
                .await?;
            }
            b'm' => break,
            k => {
                return Err(protocol(format!(
                    "expected a body, got {:?}",
                    char::from(k)
                )))
            }
        }
    }
    if msg.octets() != octets {
        if last {
            return Err(protocol(format!("message {id} shorter than announced")));
        }
        let s = store.clone();
        // Dropping an uncommitted message removes its chunks (a store call).
        blocking(move || {
            drop((s, msg));
            Ok(())
        })
        .await?;
        return Ok(());
    }
    let s = store.clone();
    blocking(move || msg.commit(&s).map(drop)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Credentials;
    use crate::store::StoreOptions;
    use std::sync::Mutex;

    struct Served(Mutex<Vec<(String, u64)>>);

    impl Installed for Served {
        fn serving(&self, domain: &str, epoch: u64) {
            self.0.lock().unwrap().push((domain.to_owned(), epoch));
        }
    }

    fn account(nonce: u32) -> Account {
        Account {
            credentials: Credentials {
                phc: format!("phc-{nonce}"),
                scram: None,
                apop_secret: None,
            },
            uid_nonce: nonce,
            quota_bytes: Some(u64::from(nonce)),
        }
    }

    fn deliver(store: &DomainStore, local: &str, body: &[u8]) -> u64 {
        let mut msg = store.begin_message(local).unwrap();
        msg.write(store, body).unwrap();
        msg.commit(store).unwrap().id
    }

    /// A home directory with domain a.org and account u, and an empty target.
    struct Two {
        dirs: [tempfile::TempDir; 2],
        home: Arc<Directory>,
        target: Arc<Directory>,
        store: Arc<DomainStore>,
    }

    type Receiving = tokio::task::JoinHandle<Result<(), TransferError>>;

    impl Two {
        fn new() -> Two {
            let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
            let open = |d: &tempfile::TempDir| {
                Arc::new(Directory::open(d.path(), StoreOptions::default()).unwrap())
            };
            let (home, target) = (open(&dirs[0]), open(&dirs[1]));
            home.add_domain("a.org").unwrap();
            let store = home.domain("a.org").unwrap();
            store.create_account("u", &account(1)).unwrap();
            Two {
                dirs,
                home,
                target,
                store,
            }
        }

        /// A receiver into the target over an in-memory pipe, and its sender.
        async fn link(&self) -> (Arc<Served>, Receiving, Sender<tokio::io::DuplexStream>) {
            let (near, far) = tokio::io::duplex(64 * 1024);
            let served = Arc::new(Served(Mutex::new(Vec::new())));
            let (t, s2) = (self.target.clone(), served.clone());
            let receiver = tokio::spawn(async move { receive(far, t, "a.org", s2.as_ref()).await });
            (served, receiver, Sender::start(near).await.unwrap())
        }
    }

    fn body(store: &DomainStore, id: u64) -> Vec<u8> {
        let (mut out, mut offset) = (Vec::new(), 0u64);
        loop {
            let n = store.read_body(id, offset, &mut out).unwrap();
            if n == 0 {
                return out;
            }
            offset += n as u64;
        }
    }

    /// A pre-copy, changes on the home, a final pass, install and go, all over an
    /// in-memory pipe: the copy ends equal (ids, bodies, seen marks, accounts) and new
    /// mail on it gets ids above the home's.
    #[tokio::test(flavor = "multi_thread")]
    async fn two_passes_make_an_equal_copy_that_never_reuses_ids() {
        let t = Two::new();
        let (home, target, store) = (&t.home, &t.target, &t.store);
        store.create_account("gone", &account(2)).unwrap();
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let first = deliver(store, "u", &big);
        let second = deliver(store, "u", b"second\r\n");
        deliver(store, "gone", b"x\r\n");

        let (served, receiver, mut sender) = t.link().await;
        let progress = Progress::default();
        sender.pass(store, None, &progress).await.unwrap();
        assert_eq!(progress.messages.load(Ordering::Relaxed), 3);

        // Meanwhile: a deletion, a seen mark, a new message, an account gone and one
        // new, a password change.
        store.update_maildrop("u", &[first], &[second]).unwrap();
        let third = deliver(store, "u", b"third\r\n");
        store.remove_account("gone").unwrap();
        store.create_account("new", &account(3)).unwrap();
        store.update_account("u", &account(4)).unwrap();
        home.seal("a.org").unwrap();
        let floor = store.id_floor().unwrap();
        let copy = sender
            .pass(store, Some(floor), &Progress::default())
            .await
            .unwrap();
        let mine = summarize(store).unwrap();
        assert_eq!(compare(&mine, &copy), None, "{mine:?} {copy:?}");
        sender.install().await.unwrap();
        assert_eq!(
            target.epoch("a.org").unwrap(),
            0,
            "installed, not yet served"
        );
        sender.go(7).await.unwrap();
        receiver.await.unwrap().unwrap();
        assert_eq!(
            served.0.lock().unwrap().as_slice(),
            [("a.org".to_owned(), 7)]
        );
        assert_eq!(target.epoch("a.org").unwrap(), 7);

        let moved = target.domain("a.org").unwrap();
        assert_eq!(moved.snapshot("u").unwrap(), store.snapshot("u").unwrap());
        assert_eq!(body(&moved, second), b"second\r\n");
        assert_eq!(body(&moved, third), b"third\r\n");
        assert!(moved.account("gone").unwrap().is_none());
        assert_eq!(
            moved.account("u").unwrap().unwrap().credentials.phc,
            "phc-4"
        );
        let fresh = deliver(&moved, "u", b"after\r\n");
        assert!(fresh >= floor && fresh > third);
    }

    fn import(store: &DomainStore, uidl: &str, body: &[u8]) -> u64 {
        let mut msg = store
            .begin_import("u", uidl)
            .unwrap()
            .expect("not imported yet");
        msg.write(store, body).unwrap();
        msg.commit(store).unwrap().id
    }

    /// Stored UIDLs (imported mail) travel with their messages through a pre-copy, a
    /// deletion and a final pass, and the tombstones of deleted ones with the account;
    /// the summaries (which digest both) agree, and the copy refuses to import the same
    /// mail again, deleted or not.
    #[tokio::test(flavor = "multi_thread")]
    async fn stored_uidls_survive_two_passes_and_a_deletion() {
        let t = Two::new();
        let (home, target, store) = (&t.home, &t.target, &t.store);
        let a = import(store, "00000001507c2d5c", b"a\r\n");
        let b = import(store, "00000002507c2d5c", b"b\r\n");
        let own = deliver(store, "u", b"own\r\n");
        let early = import(store, "00000004507c2d5c", b"early\r\n");
        store.update_maildrop("u", &[early], &[]).unwrap();
        let before = summarize(store).unwrap();

        let (_served, receiver, mut sender) = t.link().await;
        let copy = sender
            .pass(store, None, &Progress::default())
            .await
            .unwrap();
        assert_eq!(compare(&before, &copy), None);
        store.update_maildrop("u", &[a], &[b]).unwrap();
        let c = import(store, "00000003507c2d5c", b"c\r\n");
        home.seal("a.org").unwrap();
        let floor = store.id_floor().unwrap();
        let copy = sender
            .pass(store, Some(floor), &Progress::default())
            .await
            .unwrap();
        let mine = summarize(store).unwrap();
        assert_eq!(compare(&mine, &copy), None, "{mine:?} {copy:?}");
        assert_ne!(before[0].uidls, mine[0].uidls);
        sender.install().await.unwrap();
        sender.go(3).await.unwrap();
        receiver.await.unwrap().unwrap();

        let moved = target.domain("a.org").unwrap();
        let shown = moved.uidls("u", 1).unwrap();
        assert_eq!(shown, store.uidls("u", 1).unwrap());
        assert_eq!(shown.stored(a), None);
        assert_eq!(shown.stored(b), Some("00000002507c2d5c"));
        assert_eq!(shown.stored(c), Some("00000003507c2d5c"));
        assert_eq!(shown.get(own), crate::wire::uidl(1, own));
        assert_eq!(body(&moved, c), b"c\r\n");
        assert!(moved
            .begin_import("u", "00000002507c2d5c")
            .unwrap()
            .is_none());
        // The deleted ones' tombstones came along: the copy does not import them again.
        assert_eq!(
            moved.tombstones("u").unwrap(),
            ["00000001507c2d5c", "00000004507c2d5c"]
        );
        assert!(moved
            .begin_import("u", "00000004507c2d5c")
            .unwrap()
            .is_none());
    }

    /// A sender whose message head carries a UIDL the store must not take (not RFC 1939,
    /// or of mailgate's own form) ends the receive with an error and leaves no copy.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_bad_stored_uidl_ends_the_receive() {
        let target_dir = tempfile::tempdir().unwrap();
        let target = Arc::new(Directory::open(target_dir.path(), StoreOptions::default()).unwrap());
        let served = Served(Mutex::new(Vec::new()));
        let frame = |kind: u8, payload: &[u8]| {
            let mut out = vec![kind];
            out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            out.extend_from_slice(payload);
            out
        };
        let head = serde_json::to_vec(&AccountHead {
            local: "u".into(),
            account: account(1),
        })
        .unwrap();
        let mut entry = Vec::new();
        entry_bytes(&mut entry, 5, 3, false);
        for uidl in [
            &b"two words"[..],
            crate::wire::uidl(1, 5).as_bytes(),
            &b"\xff\xfe"[..],
            &[b'x'; 71][..],
        ] {
            let mut m = entry.clone();
            m.extend_from_slice(uidl);
            let case = [
                frame(b'P', b"{\"final\":false}"),
                frame(b'A', &head),
                frame(b'E', &entry),
                frame(b'e', &[]),
                frame(b'M', &m),
                frame(b'B', b"abc"),
                frame(b'm', &[]),
                frame(b'Z', b"{\"id_floor\":null}"),
            ]
            .concat();
            let (mut near, far) = tokio::io::duplex(256 * 1024);
            near.write_all(&case).await.unwrap();
            near.shutdown().await.unwrap();
            let r = receive(far, target.clone(), "b.org", &served).await;
            assert!(r.is_err(), "{uidl:?}");
            assert!(!target.has_domain("b.org"));
            assert!(!target_dir.path().join("domains/.incoming-b.org").exists());
        }
    }

    /// A pass compares as different when the copy lacks a message, and a receiver that
    /// sees the link end before install leaves nothing behind.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_interrupted_receive_discards_the_copy() {
        let t = Two::new();
        let (target, store) = (&t.target, &t.store);
        deliver(store, "u", b"one\r\n");
        let (served, receiver, mut sender) = t.link().await;
        let copy = sender
            .pass(store, None, &Progress::default())
            .await
            .unwrap();
        deliver(store, "u", b"two\r\n");
        let mine = summarize(store).unwrap();
        assert!(compare(&mine, &copy).is_some());
        drop(sender);
        assert!(receiver.await.unwrap().is_err());
        assert!(!target.has_domain("a.org"));
        let left: Vec<_> = std::fs::read_dir(t.dirs[1].path().join("domains"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "{left:?}");
        assert!(served.0.lock().unwrap().is_empty());
    }

    /// A receiver refuses a domain it already hosts, and hostile input ends a receive
    /// with an error, never a panic or a hang.
    #[tokio::test(flavor = "multi_thread")]
    async fn hostile_senders_are_refused() {
        let target_dir = tempfile::tempdir().unwrap();
        let target = Arc::new(Directory::open(target_dir.path(), StoreOptions::default()).unwrap());
        let served = Served(Mutex::new(Vec::new()));
        let cases: Vec<Vec<u8>> = vec![
            b"Z\0\0\0\0".to_vec(),
            vec![b'P', 0xff, 0xff, 0xff, 0xff],
            b"P\0\0\0\x02{}".to_vec(),
            [
                &b"P\0\0\0\x0f{\"final\":false}"[..],
                b"M\0\0\0\x11",
                &[0u8; 17],
            ]
            .concat(),
            [&b"P\0\0\0\x0f{\"final\":false}"[..], b"A\0\0\0\x02[]"].concat(),
            b"G\0\0\0\x0b{\"epoch\":9}".to_vec(),
            b"C\0\0\0\0C\0\0\0\0".to_vec(),
        ];
        for case in cases {
            let (mut near, far) = tokio::io::duplex(64 * 1024);
            near.write_all(&case).await.unwrap();
            near.shutdown().await.unwrap();
            let r = receive(far, target.clone(), "b.org", &served).await;
            assert!(r.is_err(), "{case:?}");
            assert!(target.epoch("b.org").map_or(true, |e| e == 0), "{case:?}");
            assert!(!target_dir.path().join("domains/.incoming-b.org").exists());
            if target.has_domain("b.org") {
                target.remove_domain("b.org").unwrap();
            }
        }
        target.add_domain("c.org").unwrap();
        let (_near, far) = tokio::io::duplex(1024);
        assert!(matches!(
            receive(far, target.clone(), "c.org", &served).await,
            Err(TransferError::Store(StoreError::DomainExists(_)))
        ));
        assert!(served.0.lock().unwrap().is_empty());
    }
}
