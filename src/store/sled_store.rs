//! The sled implementation of the store: one sled database per domain, opened lazily under
//! that domain's own lock in the `Directory` (sled refuses a second open of the same path;
//! other domains never wait for it) and closed when idle, past `max_open`, or after a
//! storage error (sled keeps failing until reopened). It must not hold a message in memory
//! beyond one chunk, nor acknowledge a write before flushing it, nor let a delivery it
//! refused stay visible.
//!
//! Trees of each domain database:
//!
//! | tree       | key                                   | value                          |
//! |------------|---------------------------------------|--------------------------------|
//! | `accounts` | local part                            | `Account` as JSON              |
//! | `maildrop` | local part, `0x00`, id (u64 BE)       | octets (u64 BE), flags (u8)    |
//! | `bodies`   | id (u64 BE), chunk index (u32 BE)     | at most `CHUNK_SIZE` bytes     |
//! | `pending`  | id (u64 BE)                           | local part (being delivered)   |
//! | `trash`    | id (u64 BE)                           | empty (body still to remove)   |
//! | `meta`     | `format`                              | format version (u32 BE)        |
//! | `meta`     | `id_base`                             | added to sled's ids (u64 BE)   |
//! | `uidls`    | local part, `0x00`, id (u64 BE)       | the message's stored UIDL      |
//! | `uidl_ids` | local part, `0x00`, stored UIDL       | the message's id (u64 BE), or empty: deleted |
//!
//! Flags of a maildrop entry: bit 0 (`FLAG_SEEN`) is set once a client retrieved the
//! message in a session that ended in UPDATE. Format history, upgraded in place at open
//! (`DomainStore::upgrade`), never read as another:
//!
//! - 1 (no `meta` tree): maildrop values are the octets alone (8 bytes).
//! - 2: maildrop values carry a flags byte; `meta` records the format.
//! - 3: a message's id is `id_base` (absent: 0) plus an id from sled's generator. sled's
//!   generator is not part of the trees, so a copy of the data (a domain move) carries
//!   the allocator's position as `id_base` and new mail never reuses an id. Read as
//!   format 2, a moved store would hand out ids again, overwriting bodies: hence a new
//!   version, which older code refuses.
//! - 4: a message may carry a stored UIDL (an imported one, `begin_import`), in `uidls`
//!   and indexed per account in `uidl_ids`, both written in the transaction that makes
//!   the message visible and removed in the one that deletes it. Read as format 3, a
//!   store would show imported mail under computed UIDLs and clients would fetch it all
//!   again: hence a new version. A format 3 store has no stored UIDLs, so its upgrade
//!   rewrites nothing. Deleting a message with a stored UIDL leaves its `uidl_ids`
//!   entry with an empty value, a tombstone, so importing the same mail again does not
//!   bring back what the user deleted; an account's tombstones go with the account.
//!
//! Beside sled's files, `USAGE_FILE` in the domain's directory records the domain's
//! accounts, messages and octets as of its last close (or housekeeping pass), so the
//! per-domain gauges of a closed store can be read without opening it; `EPOCH_FILE`
//! holds the domain's cluster epoch.
//!
//! Big-endian keys make sled's byte order the numeric order, so a maildrop prefix scan
//! yields delivery order and a body prefix scan yields chunk order. `pending` and `trash`
//! are what make crashes harmless: whatever they list is swept when the store is opened.

use super::{
    validate_domain, validate_local, Account, MessageMeta, StoreError, StoreOptions, Usage,
    CHUNK_SIZE,
};
use crate::auth::Credentials;
use sled::transaction::{
    ConflictableTransactionError, TransactionError, Transactional, TransactionalTree,
};
use sled::{Batch, Db, Tree};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError, Weak};
use std::time::Instant;

/// Name of the directory under `data_dir` that holds one sub-directory per domain.
pub const DOMAINS_DIR: &str = "domains";

/// The format this code writes; stores of an older one are upgraded at open, a newer
/// one is refused.
pub const FORMAT_VERSION: u32 = 4;
const FORMAT_KEY: &[u8] = b"format";
const ID_BASE_KEY: &[u8] = b"id_base";
/// Directory-name prefix of a domain copy being received from another replica (never a
/// valid domain name, so never listed as one); removed at open.
const STAGING_PREFIX: &str = ".incoming-";
/// Directory-name prefix of a store being replaced by its compacted copy
/// (`Directory::compact`): only there between two renames.
const COMPACT_OLD_PREFIX: &str = ".compact-old-";
/// Directory-name prefix of a copy left behind by a move: `.moved-<domain>-<unix secs>`.
const RETIRED_PREFIX: &str = ".moved-";
/// Directory-name prefix of a domain being removed: `remove_domain` renames the store
/// here in one step before deleting its files; `Directory::open` finishes the deletion.
const REMOVING_PREFIX: &str = ".removing-";
/// Maildrop entry flag: retrieved in a session that ended in UPDATE (for LAST).
const FLAG_SEEN: u8 = 1;
/// The domain's usage as last recorded, in its directory beside sled's files.
pub const USAGE_FILE: &str = "mailgate-usage.json";
/// Beside sled's files: the domain's cluster epoch (decimal), which a replica compares
/// with the home record in Redis before it serves the domain; it travels with the store
/// when the directory is copied. Absent: epoch 1, what every domain starts with.
pub const EPOCH_FILE: &str = "mailgate-epoch";
/// Maildrop entries rewritten per batch while upgrading a store.
const UPGRADE_BATCH: usize = 10_000;

/// How often sled syncs on its own; every acknowledged write flushes explicitly anyway,
/// this only bounds what an unacknowledged write can lose.
const FLUSH_EVERY_MS: u64 = 1000;

/// The hosted domains under `data_dir/domains/` and the domain stores open now.
///
/// A domain exists exactly when its directory exists, so an operator can back up, move
/// or delete one tenant with ordinary file tools while the server is stopped.
pub struct Directory {
    /// `data_dir/domains`.
    root: PathBuf,
    opts: StoreOptions,
    /// A slot per domain used since start, by normalised name. This lock is held only to
    /// find or add a slot, never while a store opens or closes: that happens under the
    /// slot's own lock, so the same sled path is never open twice and a slow open (a
    /// crash sweep, a lock still held) stalls only its own domain.
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    /// Stores open now (`max_open` bounds it, except for stores in use).
    open_count: AtomicUsize,
    /// Each domain's write gate, shared by every store opened for it, so a seal outlives
    /// an idle close and reopen.
    gates: Mutex<HashMap<String, Arc<Gate>>>,
}

/// Per-domain state that outlives an open store. Whether the store may change: writes
/// hold the read side of `sealed` for their whole atomic step; `Directory::seal` takes
/// the write side, so once it returns no write is in progress and none starts until
/// `unseal`. And the deliveries whose commit could not be made durable nor undone
/// (`failed_commits`), which the next open removes before anyone sees the store.
#[derive(Default)]
struct Gate {
    sealed: std::sync::RwLock<bool>,
    /// `(local part, id)` of messages committed in memory whose flush failed, answered
    /// as a temporary failure: they must not survive the store's reopening.
    failed_commits: Mutex<Vec<(String, u64)>>,
}

/// One domain's place in the `Directory`.
#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
}

#[derive(Default)]
enum SlotState {
    #[default]
    Closed,
    Open(OpenStore),
    /// The domain was removed or retired while this slot was found: look again.
    Gone,
}

/// What `Directory::compact` did: the store's size on disk before and after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    pub before: u64,
    pub after: u64,
}

/// A copy of a domain left behind by a move, as `cluster cleanup` lists it.
#[derive(Debug, Clone)]
pub struct Retired {
    pub path: PathBuf,
    pub domain: String,
    /// When it was retired.
    pub at: std::time::SystemTime,
}

struct OpenStore {
    store: Arc<DomainStore>,
    /// Last time `Directory::domain` handed the store out; `close_idle` and the
    /// `max_open` cap compare with it.
    last_used: Instant,
}

/// One domain's sled database. Everything it reads or writes belongs to that domain.
pub struct DomainStore {
    name: String,
    /// For error context.
    path: String,
    db: Db,
    accounts: Tree,
    maildrop: Tree,
    bodies: Tree,
    pending: Tree,
    trash: Tree,
    meta: Tree,
    /// Stored UIDLs by maildrop key, and the per-account index UIDL → id (format 4).
    uidls: Tree,
    uidl_ids: Tree,
    /// Added to sled's generated ids (format 3).
    id_base: std::sync::atomic::AtomicU64,
    gate: Arc<Gate>,
    /// Free space to keep (`StoreOptions::min_free_bytes`).
    min_free_bytes: u64,
    /// Set by the first storage (I/O) error: sled then fails every write until the
    /// database is reopened, so the `Directory` stops handing this store out.
    broken: AtomicBool,
    /// Replaced by a compacted copy (`Directory::compact`): its path now names the copy,
    /// so closing records nothing there.
    detached: AtomicBool,
    /// Serialises account creation and removal, which scan the maildrop before their
    /// atomic step; deliveries do not take it.
    account_admin: Mutex<()>,
    /// Accounts, messages and octets of the domain (octets for domain quotas, all three
    /// for the gauges): counted on first use, kept up to date by commits, forgotten
    /// (recounted next time) when messages or accounts are removed or added. Held across
    /// the transactions that change it, so a count never misses or double-counts one.
    usage: Mutex<Option<Usage>>,
    /// What `USAGE_FILE` holds, so it is rewritten only when the figures changed.
    recorded: Mutex<Option<Usage>>,
    /// Lets `begin_message` hand its `PendingMessage` a strong reference, so a store with
    /// a delivery in progress counts as in use and is never closed under it.
    me: Weak<DomainStore>,
}

/// A message being written; invisible until `commit`.
///
/// Full chunks go to disk as they fill, so only one chunk is ever buffered. Its id is
/// listed in `pending` until commit; dropped uncommitted, it removes its chunks, and if
/// the process dies first, the next open of the store sweeps them.
pub struct PendingMessage {
    id: u64,
    local: String,
    store: Arc<DomainStore>,
    /// The chunk being filled; written when full or at commit.
    buf: Vec<u8>,
    next_chunk: u32,
    octets: u64,
    /// Set once the maildrop entry exists, after which the chunks must stay.
    committed: bool,
    /// Committed already marked seen (a copied message).
    seen: bool,
    /// The UIDL recorded with the message at commit (an imported or copied message with
    /// a stored UIDL); `None`: the UIDL is computed.
    uidl: Option<Box<str>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data is only changed in single steps (map insert/remove), so it is
    // consistent even if a holder panicked.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `lock` without waiting: `None` while another thread holds it.
fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(guard) => Some(guard),
        Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

impl Directory {
    /// Opens (creating) `data_dir/domains/`.
    pub fn open(data_dir: &Path, opts: StoreOptions) -> Result<Directory, StoreError> {
        let root = data_dir.join(DOMAINS_DIR);
        std::fs::create_dir_all(&root).map_err(|source| StoreError::Io {
            path: root.display().to_string(),
            source,
        })?;
        // A copy being received when the process stopped is incomplete: a move starts
        // its copy again from nothing.
        for entry in std::fs::read_dir(&root).map_err(|source| StoreError::Io {
            path: root.display().to_string(),
            source,
        })? {
            let Ok(entry) = entry else { continue };
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if let Some(name) = file_name.strip_prefix(COMPACT_OLD_PREFIX) {
                // A compaction stopped between its two renames: the compacted copy is
                // complete once it has the name, else the old store takes it back.
                let (old, current) = (entry.path(), root.join(name));
                let outcome = if current.exists() {
                    std::fs::remove_dir_all(&old)
                } else {
                    std::fs::rename(&old, &current)
                };
                if let Err(e) = outcome {
                    tracing::warn!(path = %old.display(), error = %e, "cannot finish an interrupted compaction");
                }
                continue;
            }
            if file_name.starts_with(REMOVING_PREFIX) {
                let path = entry.path();
                tracing::info!(path = %path.display(), "finishing an interrupted domain removal");
                if let Err(e) = std::fs::remove_dir_all(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot finish an interrupted domain removal");
                }
                continue;
            }
            if file_name.starts_with(STAGING_PREFIX) {
                let path = entry.path();
                tracing::info!(path = %path.display(), "removing an incomplete incoming copy");
                if let Err(e) = std::fs::remove_dir_all(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove an incomplete incoming copy");
                }
            }
        }
        Ok(Directory {
            root,
            opts,
            slots: Mutex::new(HashMap::new()),
            open_count: AtomicUsize::new(0),
            gates: Mutex::new(HashMap::new()),
        })
    }

    fn gate(&self, name: &str) -> Arc<Gate> {
        Arc::clone(lock(&self.gates).entry(name.to_owned()).or_default())
    }

    /// Runs `f` on `name`'s slot state under the slot's lock (not the directory's).
    fn with_slot<R>(&self, name: &str, f: impl FnOnce(&mut SlotState) -> R) -> R {
        loop {
            let slot = Arc::clone(lock(&self.slots).entry(name.to_owned()).or_default());
            let mut state = lock(&slot.state);
            if matches!(*state, SlotState::Gone) {
                continue;
            }
            return f(&mut state);
        }
    }

    /// Takes `name` out of the directory (removed or retired): its open store is closed
    /// and `f` runs under the slot's lock, so no open of the path can run meanwhile.
    fn take_domain<R>(&self, name: &str, f: impl FnOnce() -> R) -> R {
        self.with_slot(name, |state| {
            if let SlotState::Open(open) = std::mem::take(state) {
                self.open_count.fetch_sub(1, Ordering::Relaxed);
                // Dropped under the slot's lock: if this was the last reference, sled
                // shuts down before anyone can open the path again.
                drop(open);
            }
            let result = f();
            lock(&self.slots).remove(name);
            *state = SlotState::Gone;
            result
        })
    }

    /// Opens `name`'s store into its slot (whose lock the caller holds).
    fn open_into(&self, name: &str, state: &mut SlotState) -> Result<Arc<DomainStore>, StoreError> {
        let path = self.root.join(name);
        if !path.is_dir() {
            return Err(StoreError::UnknownDomain(name.to_owned()));
        }
        let store = DomainStore::open(name, &path, &self.opts, self.gate(name))?;
        *state = SlotState::Open(OpenStore {
            store: Arc::clone(&store),
            last_used: Instant::now(),
        });
        self.open_count.fetch_add(1, Ordering::Relaxed);
        Ok(store)
    }

    /// Closes open stores that no one uses and for which `close` says so, least recently
    /// used first, until `enough` says so; returns how many closed. Each is closed under
    /// its own slot's lock, and a slot busy opening or handing out its store is skipped.
    fn close_where(
        &self,
        close: impl Fn(&OpenStore) -> bool,
        enough: impl Fn(usize) -> bool,
    ) -> usize {
        let slots: Vec<Arc<Slot>> = lock(&self.slots).values().cloned().collect();
        let mut candidates: Vec<(Instant, Arc<Slot>)> = slots
            .into_iter()
            .filter_map(|slot| {
                let last_used = match &*try_lock(&slot.state)? {
                    SlotState::Open(o) if Arc::strong_count(&o.store) == 1 && close(o) => {
                        o.last_used
                    }
                    _ => return None,
                };
                Some((last_used, slot))
            })
            .collect();
        candidates.sort_by_key(|(last_used, _)| *last_used);
        let mut closed = 0;
        for (_, slot) in candidates {
            if enough(self.open_count.load(Ordering::Relaxed)) {
                break;
            }
            let Some(mut state) = try_lock(&slot.state) else {
                continue;
            };
            // Checked again: a user may have taken the store since.
            if let SlotState::Open(o) = &*state {
                if Arc::strong_count(&o.store) == 1 && close(o) {
                    // Dropping the last reference flushes (see `Drop for DomainStore`) and
                    // shuts sled down, under the slot's lock so the path is not reopened
                    // before sled has released it.
                    *state = SlotState::Closed;
                    self.open_count.fetch_sub(1, Ordering::Relaxed);
                    closed += 1;
                }
            }
        }
        closed
    }

    /// Closes least recently used stores not in use while more than `max_open` are open.
    fn enforce_max_open(&self) {
        let max = self.opts.max_open;
        if self.open_count.load(Ordering::Relaxed) > max {
            self.close_where(|_| true, |open| open <= max);
        }
    }

    fn io_err(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
        move |source| StoreError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    /// Stops every change to `name`'s store (accounts, deliveries, UPDATE) until
    /// `unseal`: waits for writes in progress, after which the store's content is final.
    /// A write attempted meanwhile fails with `Sealed` (a temporary failure).
    pub fn seal(&self, name: &str) -> Result<(), StoreError> {
        let name = validate_domain(name)?;
        let gate = self.gate(&name);
        *gate.sealed.write().unwrap_or_else(PoisonError::into_inner) = true;
        Ok(())
    }

    /// Lets `name`'s store change again.
    pub fn unseal(&self, name: &str) -> Result<(), StoreError> {
        let name = validate_domain(name)?;
        let gate = self.gate(&name);
        *gate.sealed.write().unwrap_or_else(PoisonError::into_inner) = false;
        Ok(())
    }

    /// An empty store for a copy of `name` received from another replica, outside the
    /// hosted domains (`.incoming-<name>`); whatever an earlier attempt left is removed.
    pub fn open_staging(&self, name: &str) -> Result<Arc<DomainStore>, StoreError> {
        let name = validate_domain(name)?;
        let path = self.root.join(format!("{STAGING_PREFIX}{name}"));
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(Self::io_err(&path))?;
        }
        std::fs::create_dir(&path).map_err(Self::io_err(&path))?;
        DomainStore::open(&name, &path, &self.opts, Arc::default())
    }

    /// Rewrites `name`'s store into a fresh one that holds only its live data and puts it
    /// in the old one's place, so the space of deleted mail goes back to the file system
    /// (sled reuses it only inside its own files). The store is sealed meanwhile (writes
    /// fail as temporary errors; a session still holding the old store cannot change
    /// it). The copy is checked before the swap — every account record, every maildrop
    /// entry and body length, the id allocator's position — and any failure leaves the
    /// store as it was. The copy is written without the free-space reserve: callers
    /// check there is room for the live data. Not for a domain that a cluster move may be
    /// copying (the move would read the old store).
    pub fn compact(&self, name: &str) -> Result<Compacted, StoreError> {
        let name = validate_domain(name)?;
        let store = self.domain(&name)?;
        let before = store.size_on_disk()?;
        let gate = self.gate(&name);
        {
            let mut sealed = gate.sealed.write().unwrap_or_else(PoisonError::into_inner);
            if *sealed {
                return Err(StoreError::Sealed(name));
            }
            *sealed = true;
        }
        let staging_path = self.root.join(format!("{STAGING_PREFIX}{name}"));
        let copied = self.copy_live(&name, &store, &staging_path);
        let swapped = copied.and_then(|()| {
            let old = self.root.join(format!("{COMPACT_OLD_PREFIX}{name}"));
            let path = self.root.join(&name);
            store.detached.store(true, Ordering::Relaxed);
            drop(store);
            self.with_slot(&name, |state| {
                if let SlotState::Open(open) = state {
                    // A session or delivery still holds the old store: its sled would keep
                    // writing under the path the copy takes. Try again later.
                    if Arc::strong_count(&open.store) > 1 {
                        open.store.detached.store(false, Ordering::Relaxed);
                        return Err(StoreError::Sealed(name.clone()));
                    }
                }
                if let SlotState::Open(open) = std::mem::take(state) {
                    self.open_count.fetch_sub(1, Ordering::Relaxed);
                    drop(open);
                }
                wait_for_sled_to_let_go(&path)?;
                wait_for_sled_to_let_go(&staging_path)?;
                std::fs::rename(&path, &old).map_err(Self::io_err(&path))?;
                if let Err(e) = std::fs::rename(&staging_path, &path) {
                    // Put the old store back under its name.
                    std::fs::rename(&old, &path).map_err(Self::io_err(&old))?;
                    return Err(Self::io_err(&staging_path)(e));
                }
                crate::fsutil::sync_dir(&self.root).map_err(Self::io_err(&self.root))?;
                // Sessions that held the old store kept its (sealed) gate; the compacted
                // store starts with a fresh one.
                lock(&self.gates).remove(&name);
                lock(&self.slots).remove(&name);
                *state = SlotState::Gone;
                Ok(old)
            })
        });
        match swapped {
            Ok(old) => {
                if let Err(e) = std::fs::remove_dir_all(&old) {
                    let path = old.display();
                    tracing::warn!(%path, error = %e, "cannot remove the store a compaction replaced");
                }
                let after = self.domain(&name)?.size_on_disk()?;
                Ok(Compacted { before, after })
            }
            Err(e) => {
                *gate.sealed.write().unwrap_or_else(PoisonError::into_inner) = false;
                if let Err(rm) = self.discard_staging(&name) {
                    tracing::warn!(domain = %name, error = %rm, "cannot remove a failed compaction's copy");
                }
                Err(e)
            }
        }
    }

    /// Writes `store`'s live data (sealed by the caller) into a new store at `path` and
    /// checks it; the copy is flushed and closed when this returns `Ok`.
    fn copy_live(&self, name: &str, store: &DomainStore, path: &Path) -> Result<(), StoreError> {
        if path.exists() {
            std::fs::remove_dir_all(path).map_err(Self::io_err(path))?;
        }
        std::fs::create_dir(path).map_err(Self::io_err(path))?;
        let opts = StoreOptions {
            min_free_bytes: 0,
            ..self.opts
        };
        let copy = DomainStore::open(name, path, &opts, Arc::default())?;
        let corrupt = |what: String| StoreError::Corrupt(format!("compacting {name}: {what}"));
        let mut buf = Vec::with_capacity(CHUNK_SIZE);
        let locals = store.list_accounts()?;
        for local in &locals {
            let account = store
                .account(local)?
                .ok_or_else(|| corrupt(format!("account {local} vanished")))?;
            copy.create_account(local, &account)?;
            let uidls = store.uidls(local, account.uid_nonce)?;
            for m in store.snapshot(local)? {
                let mut message = copy.begin_copy(local, m.id)?;
                let mut offset = 0u64;
                loop {
                    buf.clear();
                    let n = store.read_body(m.id, offset, &mut buf)?;
                    if n == 0 {
                        break;
                    }
                    message.write(&copy, &buf)?;
                    offset += n as u64;
                }
                if message.octets() != m.octets {
                    return Err(corrupt(format!(
                        "message {} has {} of {} octets",
                        m.id,
                        message.octets(),
                        m.octets
                    )));
                }
                if m.seen {
                    message.mark_seen();
                }
                if let Some(uidl) = uidls.stored(m.id) {
                    message.keep_uidl(uidl)?;
                }
                message.commit(&copy)?;
            }
            copy.set_tombstones(local, &store.tombstones(local)?)?;
        }
        copy.raise_id_floor(store.id_floor()?)?;
        if copy.list_accounts()? != locals {
            return Err(corrupt("accounts differ".into()));
        }
        for local in &locals {
            let (same_record, same_uidls) = match (store.account(local)?, copy.account(local)?) {
                (Some(a), Some(b)) => (
                    serde_json::to_vec(&a).ok() == serde_json::to_vec(&b).ok(),
                    store.uidls(local, a.uid_nonce)? == copy.uidls(local, b.uid_nonce)?,
                ),
                _ => (false, false),
            };
            if !same_record
                || !same_uidls
                || store.snapshot(local)? != copy.snapshot(local)?
                || store.tombstones(local)? != copy.tombstones(local)?
            {
                return Err(corrupt(format!("account {local} differs")));
            }
        }
        let epoch_file = self.root.join(name).join(EPOCH_FILE);
        match std::fs::read(&epoch_file) {
            Ok(epoch) => crate::fsutil::write_atomically(&path.join(EPOCH_FILE), &epoch, 0o600)
                .map_err(Self::io_err(path))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Self::io_err(&epoch_file)(e)),
        }
        copy.flush()?;
        copy.record_usage()?;
        Ok(())
    }

    /// Removes a received copy that will not be installed.
    pub fn discard_staging(&self, name: &str) -> Result<(), StoreError> {
        let name = validate_domain(name)?;
        let path = self.root.join(format!("{STAGING_PREFIX}{name}"));
        match std::fs::remove_dir_all(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Self::io_err(&path)(e)),
            _ => Ok(()),
        }
    }

    /// Makes a received copy the hosted domain `name` at cluster `epoch`: the staging
    /// store (`store`, its last reference) is flushed and closed, the epoch written into
    /// its directory, and the directory renamed into place, durably. Refused when the
    /// domain exists here.
    pub fn install_staging(
        &self,
        name: &str,
        store: Arc<DomainStore>,
        epoch: u64,
    ) -> Result<(), StoreError> {
        let name = validate_domain(name)?;
        let staging = self.root.join(format!("{STAGING_PREFIX}{name}"));
        if Path::new(&store.path) != staging {
            return Err(StoreError::Corrupt(format!(
                "{} is not the incoming copy of {name}",
                store.path
            )));
        }
        store.flush()?;
        store.record_usage()?;
        drop(store);
        crate::fsutil::write_atomically(
            &staging.join(EPOCH_FILE),
            epoch.to_string().as_bytes(),
            0o600,
        )
        .map_err(Self::io_err(&staging))?;
        let path = self.root.join(&name);
        self.with_slot(&name, |_| {
            if path.exists() {
                return Err(StoreError::DomainExists(name.clone()));
            }
            std::fs::rename(&staging, &path).map_err(Self::io_err(&path))?;
            crate::fsutil::sync_dir(&self.root).map_err(Self::io_err(&self.root))
        })
    }

    /// Takes `name` out of the hosted domains after it moved away: the store is closed
    /// and its directory renamed to `.moved-<name>-<unix secs>`, never deleted
    /// (`remove_retired` does that later). Sessions still holding the store keep reading
    /// the renamed files; the seal stays on them.
    pub fn retire_domain(&self, name: &str) -> Result<PathBuf, StoreError> {
        let name = validate_domain(name)?;
        let path = self.root.join(&name);
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let retired = self.root.join(format!("{RETIRED_PREFIX}{name}-{secs}"));
        self.take_domain(&name, || {
            if !path.is_dir() {
                return Err(StoreError::UnknownDomain(name.clone()));
            }
            std::fs::rename(&path, &retired).map_err(Self::io_err(&path))?;
            crate::fsutil::sync_dir(&self.root).map_err(Self::io_err(&self.root))?;
            // A store opened for the name later (the domain moving back) starts unsealed.
            lock(&self.gates).remove(&name);
            Ok(retired)
        })
    }

    /// The copies left behind by moves, oldest first.
    pub fn retired(&self) -> Result<Vec<Retired>, StoreError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(Self::io_err(&self.root))? {
            let entry = entry.map_err(Self::io_err(&self.root))?;
            let file_name = entry.file_name();
            let Some(rest) = file_name
                .to_str()
                .and_then(|n| n.strip_prefix(RETIRED_PREFIX))
            else {
                continue;
            };
            let Some((domain, secs)) = rest.rsplit_once('-') else {
                continue;
            };
            let Ok(secs) = secs.parse::<u64>() else {
                continue;
            };
            out.push(Retired {
                path: entry.path(),
                domain: domain.to_owned(),
                at: std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs),
            });
        }
        out.sort_by_key(|r| r.at);
        Ok(out)
    }

    /// Deletes a copy `retired` listed.
    pub fn remove_retired(&self, retired: &Retired) -> Result<(), StoreError> {
        std::fs::remove_dir_all(&retired.path).map_err(Self::io_err(&retired.path))
    }

    /// Creates a domain: its directory and an initialised (and now open) sled database.
    pub fn add_domain(&self, name: &str) -> Result<(), StoreError> {
        let name = validate_domain(name)?;
        let path = self.root.join(&name);
        self.with_slot(&name, |state| {
            match std::fs::create_dir(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(StoreError::DomainExists(name.clone()));
                }
                Err(source) => {
                    return Err(StoreError::Io {
                        path: path.display().to_string(),
                        source,
                    });
                }
            }
            if let Err(e) = self.open_into(&name, state) {
                // A domain whose database cannot be initialised must not appear to exist.
                if let Err(rm) = std::fs::remove_dir_all(&path) {
                    let path = path.display();
                    tracing::warn!(%path, error = %rm, "cannot clean up failed domain");
                }
                return Err(e);
            }
            Ok(())
        })?;
        self.enforce_max_open();
        Ok(())
    }

    /// Removes a domain with all its accounts and mail.
    ///
    /// The store leaves the open set and its directory is deleted at once. A session
    /// still holding the store's `Arc` keeps working on the unlinked files until it lets
    /// go (on Unix open files outlive their names); nothing it writes survives, and a
    /// domain added again under the same name starts empty in a new directory.
    pub fn remove_domain(&self, name: &str) -> Result<(), StoreError> {
        let name = validate_domain(name)?;
        let path = self.root.join(&name);
        let doomed = self.root.join(format!("{REMOVING_PREFIX}{name}"));
        self.take_domain(&name, || {
            if !path.is_dir() {
                return Err(StoreError::UnknownDomain(name.clone()));
            }
            // One rename takes the domain away whole: a process killed while the files
            // are deleted leaves a `.removing-` directory that `open` deletes, never a
            // half-deleted store under the domain's name (which would open again,
            // listed and without its accounts).
            if doomed.exists() {
                std::fs::remove_dir_all(&doomed).map_err(Self::io_err(&doomed))?;
            }
            std::fs::rename(&path, &doomed).map_err(Self::io_err(&path))?;
            crate::fsutil::sync_dir(&self.root).map_err(Self::io_err(&self.root))?;
            if let Err(e) = std::fs::remove_dir_all(&doomed) {
                // Removed already; the next start deletes what is left.
                tracing::warn!(path = %doomed.display(), error = %e, "cannot delete a removed domain's files");
            }
            Ok(())
        })
    }

    /// Hosted domains, sorted. Directory entries that are not valid normalised domain
    /// names (stray files, editor leftovers) are not domains and are skipped.
    pub fn list_domains(&self) -> Result<Vec<String>, StoreError> {
        let io_err = |source| StoreError::Io {
            path: self.root.display().to_string(),
            source,
        };
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(io_err)? {
            let entry = entry.map_err(io_err)?;
            if !entry.file_type().map_err(io_err)?.is_dir() {
                continue;
            }
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if validate_domain(&name).is_ok_and(|normal| normal == name) {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// The cluster epoch recorded in a domain's directory (1 when none is recorded).
    pub fn epoch(&self, name: &str) -> Result<u64, StoreError> {
        let name = validate_domain(name)?;
        let path = self.root.join(&name);
        if !path.is_dir() {
            return Err(StoreError::UnknownDomain(name));
        }
        let file = path.join(EPOCH_FILE);
        match std::fs::read_to_string(&file) {
            Ok(text) => text.trim().parse::<u64>().map_err(|_| StoreError::Io {
                path: file.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{text:?} is not an epoch"),
                ),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(1),
            Err(source) => Err(StoreError::Io {
                path: file.display().to_string(),
                source,
            }),
        }
    }

    /// Records a domain's cluster epoch, durably.
    pub fn set_epoch(&self, name: &str, epoch: u64) -> Result<(), StoreError> {
        let name = validate_domain(name)?;
        let file = self.root.join(&name).join(EPOCH_FILE);
        crate::fsutil::write_atomically(&file, epoch.to_string().as_bytes(), 0o600).map_err(
            |source| StoreError::Io {
                path: file.display().to_string(),
                source,
            },
        )
    }

    pub fn has_domain(&self, name: &str) -> bool {
        validate_domain(name).is_ok_and(|name| self.root.join(name).is_dir())
    }

    /// The (lazily opened) store of a hosted domain.
    ///
    /// Opening waits only for this domain's slot. A store that hit a storage error is
    /// not handed out again: it is closed and opened afresh (sled fails every write until
    /// then), which succeeds once its last user has let go of it.
    pub fn domain(&self, name: &str) -> Result<Arc<DomainStore>, StoreError> {
        let name = validate_domain(name)?;
        let store = self.with_slot(&name, |state| {
            if let SlotState::Open(open) = state {
                if !open.store.is_broken() {
                    open.last_used = Instant::now();
                    return Ok((Arc::clone(&open.store), false));
                }
                let domain = &name;
                tracing::warn!(%domain, "reopening the store after a storage error");
                *state = SlotState::Closed;
                self.open_count.fetch_sub(1, Ordering::Relaxed);
            }
            self.open_into(&name, state).map(|store| (store, true))
        });
        let (store, opened) = store?;
        if opened {
            self.enforce_max_open();
        }
        Ok(store)
    }

    /// Closes domain stores unused for longer than `idle_close`, and those left broken by
    /// a storage error, so the next use opens them afresh; returns how many.
    ///
    /// A store still referenced elsewhere (a session, a delivery in progress) stays open
    /// however old its last use. Closed stores are flushed on the way out.
    pub fn close_idle(&self) -> usize {
        let idle = self.opts.idle_close;
        let closed = self.close_where(
            |o| o.last_used.elapsed() >= idle || o.store.is_broken(),
            |_| false,
        );
        self.enforce_max_open();
        closed
    }

    /// The usage a domain's store recorded when it was last closed (or recorded by
    /// housekeeping), read without opening the store; `None` when it never recorded one.
    pub fn recorded_usage(&self, name: &str) -> Option<Usage> {
        let name = validate_domain(name).ok()?;
        read_usage_file(&self.root.join(name))
    }

    /// The open domain stores, sorted by name (for metrics that must not open stores).
    pub fn open_domains(&self) -> Vec<(String, Arc<DomainStore>)> {
        let slots: Vec<(String, Arc<Slot>)> = lock(&self.slots)
            .iter()
            .map(|(name, slot)| (name.clone(), Arc::clone(slot)))
            .collect();
        // A slot busy opening its store is left out rather than waited for.
        let mut out: Vec<_> = slots
            .into_iter()
            .filter_map(|(name, slot)| match &*try_lock(&slot.state)? {
                SlotState::Open(o) => Some((name, Arc::clone(&o.store))),
                _ => None,
            })
            .collect();
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Number of domain stores open now.
    pub fn open_count(&self) -> usize {
        self.open_count.load(Ordering::Relaxed)
    }

    /// Flushes every open store (shutdown). Tries all of them and returns the first error.
    pub fn flush_all(&self) -> Result<(), StoreError> {
        let slots: Vec<Arc<Slot>> = lock(&self.slots).values().cloned().collect();
        let stores: Vec<Arc<DomainStore>> = slots
            .iter()
            .filter_map(|slot| match &*lock(&slot.state) {
                SlotState::Open(o) => Some(Arc::clone(&o.store)),
                _ => None,
            })
            .collect();
        let mut first_err = None;
        for store in stores {
            if let Err(e) = store.flush() {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

fn id_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

fn chunk_key(id: u64, chunk: u32) -> [u8; 12] {
    let mut key = [0; 12];
    key[..8].copy_from_slice(&id.to_be_bytes());
    key[8..].copy_from_slice(&chunk.to_be_bytes());
    key
}

fn maildrop_prefix(local: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(local.len() + 9);
    key.extend_from_slice(local.as_bytes());
    key.push(0);
    key
}

fn maildrop_key(local: &str, id: u64) -> Vec<u8> {
    let mut key = maildrop_prefix(local);
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// The key of `local`'s stored UIDL `uidl` in `uidl_ids`.
fn uidl_key(local: &str, uidl: &str) -> Vec<u8> {
    let mut key = maildrop_prefix(local);
    key.extend_from_slice(uidl.as_bytes());
    key
}

/// What an account knows of a stored (imported) UIDL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredUidl {
    /// No message of the account had it.
    Unknown,
    /// A message of the account has it.
    Held,
    /// A message of the account had it and was deleted (a tombstone).
    Deleted,
}

/// What an unlink of messages is, which decides what becomes of their stored UIDLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unlink {
    /// Messages deleted (by a client, an admin, a move's delta): a stored UIDL stays as
    /// a tombstone, so a rerun of an import does not bring the message back.
    Delete,
    /// Messages no one was told of (a commit answered as failed, entries a crash left
    /// under a new account's name): their stored UIDLs go, so an import may add them.
    Forget,
    /// The account record and its messages; the caller removes its tombstones after.
    Account,
}

/// A stored UIDL as a store error: refused, with the reason.
fn invalid_uidl(e: crate::wire::UidlError) -> StoreError {
    StoreError::InvalidUidl(e)
}

/// A maildrop value: the message's size and its flags.
struct MaildropEntry {
    octets: u64,
    flags: u8,
}

impl MaildropEntry {
    fn encode(&self) -> [u8; 9] {
        let mut v = [0; 9];
        v[..8].copy_from_slice(&self.octets.to_be_bytes());
        v[8] = self.flags;
        v
    }

    /// A format 2 value; anything else (a format 1 value included) is `None`.
    fn decode(value: &[u8]) -> Option<MaildropEntry> {
        let (octets, flags) = value.split_first_chunk::<8>()?;
        match flags {
            [flags] => Some(MaildropEntry {
                octets: u64::from_be_bytes(*octets),
                flags: *flags,
            }),
            _ => None,
        }
    }
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    bytes.try_into().ok().map(u64::from_be_bytes)
}

/// Rejects local parts that did not come through `Address::parse`: empty, containing
/// the maildrop key separator, or not in normalised (lower-case) form.
fn check_local(local: &str) -> Result<(), StoreError> {
    match validate_local(local) {
        Some(normal) if normal == local => Ok(()),
        _ => Err(StoreError::InvalidAddress(local.chars().take(80).collect())),
    }
}

/// Waits (at most `REOPEN_WAIT`) until no sled database holds the store at `path`: sled
/// lets its file lock go from its flusher thread after the last handle is dropped, and
/// until then it may still write under the path.
fn wait_for_sled_to_let_go(path: &Path) -> Result<(), StoreError> {
    use nix::fcntl::{Flock, FlockArg};
    let file = path.join("db");
    let deadline = std::time::Instant::now() + REOPEN_WAIT;
    loop {
        let handle = std::fs::File::open(&file).map_err(|source| StoreError::Io {
            path: file.display().to_string(),
            source,
        })?;
        match Flock::lock(handle, FlockArg::LockExclusiveNonblock) {
            Ok(_unlocked_on_drop) => return Ok(()),
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err((_, errno)) => {
                return Err(StoreError::Io {
                    path: file.display().to_string(),
                    source: std::io::Error::from(errno),
                })
            }
        }
    }
}

/// How long a reopen waits for a just-closed store to let go of its file lock.
const REOPEN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens a sled database, retrying while its file lock is still held by the same
/// database closed a moment ago: sled releases the lock from its flusher thread after
/// the last handle is dropped, so an idle-closed domain used again at once would
/// otherwise fail its first login. A lock held longer (another process) still fails.
fn open_retrying_lock(config: &sled::Config) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + REOPEN_WAIT;
    loop {
        match config.open() {
            // sled reports a held lock only as an I/O error with this text.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

impl DomainStore {
    /// Opens the sled database at `path` and sweeps what a crash may have left.
    fn open(
        name: &str,
        path: &Path,
        opts: &StoreOptions,
        gate: Arc<Gate>,
    ) -> Result<Arc<DomainStore>, StoreError> {
        let path_str = path.display().to_string();
        let err = |source| StoreError::Sled {
            path: path_str.clone(),
            source,
        };
        // LowSpace: each delivery ends in a flush, so throughput is bound by syncs rather
        // than segment rewriting, and deleted mail should give its space back soon.
        let config = sled::Config::new()
            .path(path)
            .cache_capacity(opts.cache_capacity)
            .mode(sled::Mode::LowSpace)
            .flush_every_ms(Some(FLUSH_EVERY_MS));
        let db = open_retrying_lock(&config).map_err(err)?;
        let tree = |n: &str| db.open_tree(n).map_err(err);
        let (accounts, maildrop, bodies) = (tree("accounts")?, tree("maildrop")?, tree("bodies")?);
        let (pending, trash, meta) = (tree("pending")?, tree("trash")?, tree("meta")?);
        let (uidls, uidl_ids) = (tree("uidls")?, tree("uidl_ids")?);
        let store = Arc::new_cyclic(|me| DomainStore {
            name: name.to_owned(),
            path: path_str.clone(),
            db,
            accounts,
            maildrop,
            bodies,
            pending,
            trash,
            meta,
            uidls,
            uidl_ids,
            id_base: std::sync::atomic::AtomicU64::new(0),
            gate,
            detached: AtomicBool::new(false),
            min_free_bytes: opts.min_free_bytes,
            broken: AtomicBool::new(false),
            account_admin: Mutex::new(()),
            usage: Mutex::new(None),
            recorded: Mutex::new(read_usage_file(path)),
            me: me.clone(),
        });
        store.upgrade()?;
        store.undo_failed_commits()?;
        store.sweep()?;
        let base = match store.meta.get(ID_BASE_KEY).map_err(|e| store.sled_err(e))? {
            None => 0,
            Some(v) => be_u64(&v).ok_or_else(|| {
                StoreError::Corrupt(format!("bad id_base record in {}", store.path))
            })?,
        };
        store
            .id_base
            .store(base, std::sync::atomic::Ordering::Relaxed);
        Ok(store)
    }

    /// The store's format version: recorded in `meta`; absent in a format 1 store, and in
    /// a store just created (no account, message or body yet), which is taken as current.
    fn format(&self) -> Result<u32, StoreError> {
        match self.meta.get(FORMAT_KEY).map_err(|e| self.sled_err(e))? {
            Some(v) => v
                .as_ref()
                .try_into()
                .map(u32::from_be_bytes)
                .map_err(|_| StoreError::Corrupt(format!("bad format record in {}", self.path))),
            None if self.accounts.is_empty()
                && self.maildrop.is_empty()
                && self.bodies.is_empty() =>
            {
                Ok(FORMAT_VERSION)
            }
            None => Ok(1),
        }
    }

    /// Brings a store of an older format to `FORMAT_VERSION`, once, in place, and records
    /// the version; refuses a store of a newer format. Each step can be interrupted and
    /// run again: it only rewrites what is still in the old form.
    fn upgrade(&self) -> Result<(), StoreError> {
        let found = self.format()?;
        if found > FORMAT_VERSION {
            return Err(StoreError::Format {
                path: self.path.clone(),
                found,
                supported: FORMAT_VERSION,
            });
        }
        if found == FORMAT_VERSION && self.meta.contains_key(FORMAT_KEY).unwrap_or(false) {
            return Ok(());
        }
        let mut rewritten = 0usize;
        if found < 2 {
            // Format 1 → 2: every maildrop value gains a flags byte (nothing seen yet).
            let mut batch = Batch::default();
            let mut in_batch = 0;
            for entry in self.maildrop.iter() {
                let (key, value) = entry.map_err(|e| self.sled_err(e))?;
                if value.len() == 8 {
                    let mut v = value.to_vec();
                    v.push(0);
                    batch.insert(key, v);
                    in_batch += 1;
                    rewritten += 1;
                }
                if in_batch == UPGRADE_BATCH {
                    self.maildrop
                        .apply_batch(std::mem::take(&mut batch))
                        .map_err(|e| self.sled_err(e))?;
                    in_batch = 0;
                }
            }
            self.maildrop
                .apply_batch(batch)
                .map_err(|e| self.sled_err(e))?;
        }
        self.flush()?;
        self.meta
            .insert(FORMAT_KEY, &FORMAT_VERSION.to_be_bytes())
            .map_err(|e| self.sled_err(e))?;
        self.flush()?;
        if found < FORMAT_VERSION {
            let domain = &self.name;
            tracing::info!(%domain, from = found, to = FORMAT_VERSION, messages = rewritten,
                "store format upgraded");
        }
        Ok(())
    }

    /// Holds off `Directory::seal` for one write; `Sealed` while the store is sealed.
    fn writable(&self) -> Result<std::sync::RwLockReadGuard<'_, bool>, StoreError> {
        let guard = self
            .gate
            .sealed
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if *guard {
            return Err(StoreError::Sealed(self.name.clone()));
        }
        Ok(guard)
    }

    /// A fresh message id: `id_base` plus sled's next generated id.
    fn next_id(&self) -> Result<u64, StoreError> {
        let generated = self.db.generate_id().map_err(|e| self.sled_err(e))?;
        self.id_base
            .load(std::sync::atomic::Ordering::Relaxed)
            .checked_add(generated)
            .ok_or_else(|| StoreError::Corrupt(format!("message ids exhausted in {}", self.path)))
    }

    /// The id allocator's position: every id handed out so far is below it, and every
    /// later one at or above it. Carried by a domain move (`raise_id_floor`).
    pub fn id_floor(&self) -> Result<u64, StoreError> {
        self.next_id()
    }

    /// Makes every id handed out from now on at least `floor`, durably.
    pub fn raise_id_floor(&self, floor: u64) -> Result<(), StoreError> {
        let base = self.id_base.load(std::sync::atomic::Ordering::Relaxed);
        if floor <= base {
            return Ok(());
        }
        self.meta
            .insert(ID_BASE_KEY, &floor.to_be_bytes())
            .map_err(|e| self.sled_err(e))?;
        self.flush()?;
        self.id_base
            .store(floor, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn sled_err(&self, source: sled::Error) -> StoreError {
        if matches!(source, sled::Error::Io(_)) && !self.broken.swap(true, Ordering::Relaxed) {
            let domain = &self.name;
            tracing::warn!(%domain, error = %source,
                "storage error: the store is reopened once its users let go");
        }
        StoreError::Sled {
            path: self.path.clone(),
            source,
        }
    }

    /// Whether a storage error left sled failing every write until the store reopens.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    /// `Full` when the file system holding the store has less free space than the
    /// reserve: checked before anything that adds data (a delivery, each of its chunks,
    /// its commit, a new account), never before deletions, which need the reserve.
    pub fn ensure_room(&self) -> Result<(), StoreError> {
        if self.min_free_bytes == 0 {
            return Ok(());
        }
        let available = self.available()?;
        if available < self.min_free_bytes {
            return Err(StoreError::Full {
                path: self.path.clone(),
                available,
                reserve: self.min_free_bytes,
            });
        }
        Ok(())
    }

    /// Removes the messages whose commit was answered as failed but could not be undone
    /// in the store that failed (see `PendingMessage::commit`); runs at open, before the
    /// store is handed out, and forgets them once the removal is durable.
    fn undo_failed_commits(&self) -> Result<(), StoreError> {
        let mut failed = lock(&self.gate.failed_commits);
        if failed.is_empty() {
            return Ok(());
        }
        let mut removed = Vec::new();
        for (local, id) in failed.iter() {
            removed.extend(self.unlink_messages(local, &[*id], &[], Unlink::Forget)?);
        }
        self.flush()?;
        let domain = &self.name;
        tracing::info!(%domain, messages = removed.len(),
            "removed deliveries whose commit failed before the store was reopened");
        failed.clear();
        Ok(())
    }

    fn txn_err(&self, e: TransactionError<StoreError>) -> StoreError {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(source) => self.sled_err(source),
        }
    }

    /// Removes the bodies of deliveries that never committed and of deleted messages
    /// whose chunks were not yet removed. Runs before the store is handed out.
    fn sweep(&self) -> Result<(), StoreError> {
        let mut swept = 0usize;
        for tree in [&self.pending, &self.trash] {
            for entry in tree.iter().keys() {
                let key = entry.map_err(|e| self.sled_err(e))?;
                let id = be_u64(&key).ok_or_else(|| {
                    StoreError::Corrupt(format!("bad id key in {}: {key:?}", self.path))
                })?;
                self.remove_body(id)?;
                tree.remove(&key).map_err(|e| self.sled_err(e))?;
                swept += 1;
            }
        }
        if swept > 0 {
            let domain = &self.name;
            tracing::info!(%domain, swept, "removed bodies left by an interrupted write");
            self.flush()?;
        }
        Ok(())
    }

    /// Removes all chunks of message `id` in one batch.
    fn remove_body(&self, id: u64) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        for key in self.bodies.scan_prefix(id_key(id)).keys() {
            batch.remove(key.map_err(|e| self.sled_err(e))?);
        }
        self.bodies.apply_batch(batch).map_err(|e| self.sled_err(e))
    }

    /// Removes the bodies listed in `trash` by the given ids, then their trash entries.
    fn purge(&self, ids: &[u64]) -> Result<(), StoreError> {
        for &id in ids {
            self.remove_body(id)?;
            self.trash
                .remove(id_key(id))
                .map_err(|e| self.sled_err(e))?;
        }
        Ok(())
    }

    /// Atomically removes the given maildrop entries of `local` (those that exist), lists
    /// their ids in `trash` and sets the seen flag of the `seen` entries that remain;
    /// returns the ids removed. `how` decides what becomes of the record and of the
    /// removed messages' stored UIDLs.
    fn unlink_messages(
        &self,
        local: &str,
        ids: &[u64],
        seen: &[u64],
        how: Unlink,
    ) -> Result<Vec<u64>, StoreError> {
        let mut usage = lock(&self.usage);
        *usage = None;
        let trees = (
            &self.accounts,
            &self.maildrop,
            &self.trash,
            &self.uidls,
            &self.uidl_ids,
        );
        trees
            .transaction(|(accounts, maildrop, trash, uidls, uidl_ids)| {
                if how == Unlink::Account && accounts.remove(local.as_bytes())?.is_none() {
                    return Err(ConflictableTransactionError::Abort(
                        StoreError::UnknownAccount(self.address(local)),
                    ));
                }
                let mut removed = Vec::with_capacity(ids.len());
                for &id in ids {
                    let key = maildrop_key(local, id);
                    if maildrop.remove(key.as_slice())?.is_some() {
                        trash.insert(&id_key(id), &[])?;
                        removed.push(id);
                    }
                    if let Some(uidl) = uidls.remove(key)? {
                        let mut index = maildrop_prefix(local);
                        index.extend_from_slice(&uidl);
                        if how == Unlink::Delete {
                            uidl_ids.insert(index, &[])?;
                        } else {
                            uidl_ids.remove(index)?;
                        }
                    }
                }
                for &id in seen {
                    let key = maildrop_key(local, id);
                    if let Some(value) = maildrop.get(&key)? {
                        let Some(mut entry) = MaildropEntry::decode(&value) else {
                            return Err(ConflictableTransactionError::Abort(StoreError::Corrupt(
                                format!(
                                    "bad maildrop entry of {local}@{} in {}",
                                    self.name, self.path
                                ),
                            )));
                        };
                        if entry.flags & FLAG_SEEN == 0 {
                            entry.flags |= FLAG_SEEN;
                            maildrop.insert(key, &entry.encode())?;
                        }
                    }
                }
                Ok(removed)
            })
            .map_err(|e| self.txn_err(e))
    }

    /// Ids in `local`'s maildrop, in delivery order.
    fn maildrop_ids(&self, local: &str) -> Result<Vec<u64>, StoreError> {
        Ok(self.snapshot(local)?.into_iter().map(|m| m.id).collect())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `local@domain`, how errors name an account of this store.
    fn address(&self, local: &str) -> String {
        format!("{local}@{}", self.name)
    }

    pub fn account(&self, local: &str) -> Result<Option<Account>, StoreError> {
        check_local(local)?;
        let Some(bytes) = self.accounts.get(local).map_err(|e| self.sled_err(e))? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            StoreError::Corrupt(format!(
                "account {local}@{} in {}: {e}",
                self.name, self.path
            ))
        })
    }

    fn encode(&self, local: &str, account: &Account) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(account).map_err(|e| {
            StoreError::Corrupt(format!("cannot encode account {local}@{}: {e}", self.name))
        })
    }

    /// Creates an account; `AccountExists` if present. Flushed before returning.
    ///
    /// Maildrop entries left under this name by a removal that a crash interrupted are
    /// cleared first, and any tombstones (deleted imported UIDLs) of an earlier account
    /// of the name, so a new account never inherits an old one's mail or import state.
    pub fn create_account(&self, local: &str, account: &Account) -> Result<(), StoreError> {
        check_local(local)?;
        let record = self.encode(local, account)?;
        let _admin = lock(&self.account_admin);
        let _write = self.writable()?;
        self.ensure_room()?;
        if self
            .accounts
            .contains_key(local)
            .map_err(|e| self.sled_err(e))?
        {
            return Err(StoreError::AccountExists(self.address(local)));
        }
        // No delivery can add entries now: commits require the account record.
        let stale = self.maildrop_ids(local)?;
        if !stale.is_empty() {
            let removed = self.unlink_messages(local, &stale, &[], Unlink::Forget)?;
            self.flush()?;
            self.purge(&removed)?;
        }
        self.forget_tombstones(local)?;
        let mut usage = lock(&self.usage);
        self.accounts
            .compare_and_swap(local, None as Option<&[u8]>, Some(record))
            .map_err(|e| self.sled_err(e))?
            .map_err(|_| StoreError::AccountExists(self.address(local)))?;
        if let Some(u) = usage.as_mut() {
            u.accounts += 1;
        }
        drop(usage);
        self.flush()
    }

    /// Replaces an existing account's record (passwd); `UnknownAccount` if absent.
    pub fn update_account(&self, local: &str, account: &Account) -> Result<(), StoreError> {
        check_local(local)?;
        let record = self.encode(local, account)?;
        let _write = self.writable()?;
        self.accounts
            .transaction(|accounts| {
                if accounts.get(local)?.is_none() {
                    return Err(ConflictableTransactionError::Abort(
                        StoreError::UnknownAccount(self.address(local)),
                    ));
                }
                accounts.insert(local, record.as_slice())?;
                Ok(())
            })
            .map_err(|e| self.txn_err(e))?;
        self.flush()
    }

    /// Replaces an account's credentials with `new` (a rehash at a login) if its stored
    /// hash is still `verified_phc`; false when the account is gone or its password was
    /// changed meanwhile (that change wins). The rest of the record is kept.
    pub fn upgrade_credentials(
        &self,
        local: &str,
        verified_phc: &str,
        new: &Credentials,
    ) -> Result<bool, StoreError> {
        check_local(local)?;
        let _write = self.writable()?;
        let replaced = self
            .accounts
            .transaction(|accounts| {
                let Some(bytes) = accounts.get(local)? else {
                    return Ok(false);
                };
                let mut account: Account = serde_json::from_slice(&bytes).map_err(|e| {
                    ConflictableTransactionError::Abort(StoreError::Corrupt(format!(
                        "account {} in {}: {e}",
                        self.address(local),
                        self.path
                    )))
                })?;
                if account.credentials.phc != verified_phc {
                    return Ok(false);
                }
                account.credentials = new.clone();
                let record = self
                    .encode(local, &account)
                    .map_err(ConflictableTransactionError::Abort)?;
                accounts.insert(local, record.as_slice())?;
                Ok(true)
            })
            .map_err(|e| self.txn_err(e))?;
        if replaced {
            self.flush()?;
        }
        Ok(replaced)
    }

    /// Removes an account and its whole maildrop.
    ///
    /// The account record and the maildrop entries go in one transaction; deliveries
    /// that committed between the scan and that transaction are swept right after (no
    /// delivery can commit once the record is gone). Then the bodies are removed.
    pub fn remove_account(&self, local: &str) -> Result<(), StoreError> {
        check_local(local)?;
        let _admin = lock(&self.account_admin);
        let _write = self.writable()?;
        let ids = self.maildrop_ids(local)?;
        let mut removed = self.unlink_messages(local, &ids, &[], Unlink::Account)?;
        let late = self.maildrop_ids(local)?;
        if !late.is_empty() {
            removed.extend(self.unlink_messages(local, &late, &[], Unlink::Forget)?);
        }
        self.forget_tombstones(local)?;
        self.flush()?;
        self.purge(&removed)
    }

    /// Account local parts, sorted.
    pub fn list_accounts(&self) -> Result<Vec<String>, StoreError> {
        self.accounts
            .iter()
            .keys()
            .map(|key| {
                let key = key.map_err(|e| self.sled_err(e))?;
                String::from_utf8(key.to_vec()).map_err(|_| {
                    StoreError::Corrupt(format!("non-UTF-8 account key in {}", self.path))
                })
            })
            .collect()
    }

    /// The maildrop's messages in delivery order.
    pub fn snapshot(&self, local: &str) -> Result<Vec<MessageMeta>, StoreError> {
        check_local(local)?;
        let prefix = maildrop_prefix(local);
        self.maildrop
            .scan_prefix(&prefix)
            .map(|entry| {
                let (key, value) = entry.map_err(|e| self.sled_err(e))?;
                match (be_u64(&key[prefix.len()..]), MaildropEntry::decode(&value)) {
                    (Some(id), Some(entry)) => Ok(MessageMeta {
                        id,
                        octets: entry.octets,
                        seen: entry.flags & FLAG_SEEN != 0,
                    }),
                    _ => Err(StoreError::Corrupt(format!(
                        "bad maildrop entry of {local}@{} in {}",
                        self.name, self.path
                    ))),
                }
            })
            .collect()
    }

    /// Appends to `buf` the body bytes of message `id` from `offset` to the end of the
    /// chunk that holds `offset` (at most `CHUNK_SIZE` bytes); returns how many were
    /// appended, 0 at the end of the message. `buf` is not cleared: the caller does that
    /// between calls. A message of 0 octets, or an unknown id, reads as empty.
    pub fn read_body(&self, id: u64, offset: u64, buf: &mut Vec<u8>) -> Result<usize, StoreError> {
        let chunk_size = CHUNK_SIZE as u64;
        let Ok(chunk) = u32::try_from(offset / chunk_size) else {
            return Ok(0);
        };
        // invariant: the remainder is below CHUNK_SIZE, which is a usize.
        let start = (offset % chunk_size) as usize;
        let Some(data) = self
            .bodies
            .get(chunk_key(id, chunk))
            .map_err(|e| self.sled_err(e))?
        else {
            return Ok(0);
        };
        let Some(tail) = data.get(start..).filter(|t| !t.is_empty()) else {
            return Ok(0);
        };
        buf.extend_from_slice(tail);
        Ok(tail.len())
    }

    /// Starts a new message for `local`'s maildrop.
    ///
    /// The account is checked at commit, not here, so a delivery racing an account
    /// removal fails cleanly instead of resurrecting the maildrop.
    pub fn begin_message(&self, local: &str) -> Result<PendingMessage, StoreError> {
        check_local(local)?;
        let id = self.next_id()?;
        self.begin_with_id(local, id)
    }

    /// Starts a copy of message `id` of another replica's store (a domain move): it
    /// keeps its id, so its UIDL does not change. The caller makes sure the id is not in
    /// use here.
    pub fn begin_copy(&self, local: &str, id: u64) -> Result<PendingMessage, StoreError> {
        check_local(local)?;
        self.begin_with_id(local, id)
    }

    /// Starts an imported message for `local`'s maildrop that keeps `uidl`, the UIDL the
    /// server it comes from showed for it (`wire::validate_uidl`: RFC 1939's form, and
    /// never one of mailgate's own). `Ok(None)` when the account already holds a message
    /// with that stored UIDL, or held one that was deleted since (`uidl_deleted`), so
    /// importing the same mail again adds nothing and brings back nothing. The message
    /// gets the next id, so messages imported in order are listed in that order; it is
    /// written and committed like a delivery, and the UIDL is recorded in the commit's
    /// transaction. Quotas are not checked here (the caller's business); the free-space
    /// reserve and the domain's seal are, as for every write.
    pub fn begin_import(
        &self,
        local: &str,
        uidl: &str,
    ) -> Result<Option<PendingMessage>, StoreError> {
        check_local(local)?;
        crate::wire::validate_uidl(uidl).map_err(invalid_uidl)?;
        drop(self.writable()?);
        if self
            .uidl_ids
            .contains_key(uidl_key(local, uidl))
            .map_err(|e| self.sled_err(e))?
        {
            return Ok(None);
        }
        let id = self.next_id()?;
        let mut message = self.begin_with_id(local, id)?;
        message.uidl = Some(uidl.into());
        Ok(Some(message))
    }

    /// Whether `uidl` is the stored UIDL of a message of `local` that was deleted (a
    /// tombstone): `begin_import` skips it like one the account holds.
    pub fn uidl_deleted(&self, local: &str, uidl: &str) -> Result<bool, StoreError> {
        Ok(self.stored_uidl(local, uidl)? == StoredUidl::Deleted)
    }

    /// What `local` knows of the stored UIDL `uidl`.
    pub fn stored_uidl(&self, local: &str, uidl: &str) -> Result<StoredUidl, StoreError> {
        check_local(local)?;
        let value = self
            .uidl_ids
            .get(uidl_key(local, uidl))
            .map_err(|e| self.sled_err(e))?;
        Ok(match value {
            None => StoredUidl::Unknown,
            Some(v) if v.is_empty() => StoredUidl::Deleted,
            Some(_) => StoredUidl::Held,
        })
    }

    /// The stored UIDLs of `local`'s deleted messages (its tombstones), in byte order.
    pub fn tombstones(&self, local: &str) -> Result<Vec<String>, StoreError> {
        self.indexed_uidls(local, true)
    }

    /// Every stored UIDL `local` knows, in byte order: its imported messages' and its
    /// tombstones'. An import need not send the messages these name again.
    pub fn known_uidls(&self, local: &str) -> Result<Vec<String>, StoreError> {
        self.indexed_uidls(local, false)
    }

    /// The UIDLs of `local` in the `uidl_ids` index: only the tombstones when
    /// `deleted_only`.
    fn indexed_uidls(&self, local: &str, deleted_only: bool) -> Result<Vec<String>, StoreError> {
        check_local(local)?;
        let prefix = maildrop_prefix(local);
        let mut out = Vec::new();
        for entry in self.uidl_ids.scan_prefix(&prefix) {
            let (key, value) = entry.map_err(|e| self.sled_err(e))?;
            if deleted_only && !value.is_empty() {
                continue;
            }
            match std::str::from_utf8(&key[prefix.len()..])
                .ok()
                .filter(|u| crate::wire::validate_uidl(u).is_ok())
            {
                Some(uidl) => out.push(uidl.to_owned()),
                None => {
                    return Err(StoreError::Corrupt(format!(
                        "bad stored UIDL of {local}@{} in {}",
                        self.name, self.path
                    )))
                }
            }
        }
        Ok(out)
    }

    /// Makes `uidls` the tombstones of `local` (a copy's, in a compaction or a move):
    /// others go, and a UIDL a message of the account holds stays that message's. Not
    /// flushed (the copy's caller flushes).
    pub fn set_tombstones(&self, local: &str, uidls: &[String]) -> Result<(), StoreError> {
        check_local(local)?;
        for uidl in uidls {
            crate::wire::validate_uidl(uidl).map_err(invalid_uidl)?;
        }
        let _write = self.writable()?;
        let wanted: std::collections::HashSet<&str> = uidls.iter().map(String::as_str).collect();
        let mut batch = Batch::default();
        for old in self.tombstones(local)? {
            if !wanted.contains(old.as_str()) {
                batch.remove(uidl_key(local, &old));
            }
        }
        for uidl in &wanted {
            let key = uidl_key(local, uidl);
            if !self
                .uidl_ids
                .contains_key(&key)
                .map_err(|e| self.sled_err(e))?
            {
                batch.insert(key, &[]);
            }
        }
        self.uidl_ids
            .apply_batch(batch)
            .map_err(|e| self.sled_err(e))
    }

    /// Removes every `uidl_ids` entry of `local`, which has no account (removed, or
    /// about to be created): tombstones of an earlier account of the name, or index
    /// entries a crash left behind.
    fn forget_tombstones(&self, local: &str) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        for key in self.uidl_ids.scan_prefix(maildrop_prefix(local)).keys() {
            batch.remove(key.map_err(|e| self.sled_err(e))?);
        }
        self.uidl_ids
            .apply_batch(batch)
            .map_err(|e| self.sled_err(e))
    }

    /// The UIDLs of `local`'s messages as listings show them (the account's `nonce`
    /// computes those without a stored one). Costs one empty range scan for an account
    /// without stored UIDLs.
    pub fn uidls(&self, local: &str, nonce: u32) -> Result<crate::wire::Uidls, StoreError> {
        Ok(crate::wire::Uidls::new(nonce, self.stored_uidls(local)?))
    }

    /// The stored UIDLs of `local`'s messages (imported mail), by message id.
    pub fn stored_uidls(&self, local: &str) -> Result<Vec<(u64, Box<str>)>, StoreError> {
        check_local(local)?;
        let prefix = maildrop_prefix(local);
        let mut stored = Vec::new();
        for entry in self.uidls.scan_prefix(&prefix) {
            let (key, value) = entry.map_err(|e| self.sled_err(e))?;
            let id = be_u64(&key[prefix.len()..]);
            let uidl = std::str::from_utf8(&value)
                .ok()
                .filter(|u| crate::wire::validate_uidl(u).is_ok());
            match (id, uidl) {
                (Some(id), Some(uidl)) => stored.push((id, Box::from(uidl))),
                _ => {
                    return Err(StoreError::Corrupt(format!(
                        "bad stored UIDL of {local}@{} in {}",
                        self.name, self.path
                    )))
                }
            }
        }
        Ok(stored)
    }

    fn begin_with_id(&self, local: &str, id: u64) -> Result<PendingMessage, StoreError> {
        // Only fails while the store is being dropped, when no caller can hold `&self`.
        let store = self
            .me
            .upgrade()
            .ok_or_else(|| StoreError::UnknownDomain(self.name.clone()))?;
        self.ensure_room()?;
        self.pending
            .insert(id_key(id), local.as_bytes())
            .map_err(|e| self.sled_err(e))?;
        Ok(PendingMessage {
            id,
            local: local.to_owned(),
            store,
            buf: Vec::with_capacity(CHUNK_SIZE),
            next_chunk: 0,
            octets: 0,
            committed: false,
            seen: false,
            uidl: None,
        })
    }

    /// Deletes messages of `local` and marks others seen in one atomic transaction, then
    /// flushes.
    ///
    /// The maildrop entries disappear together (the POP3 UPDATE commit point); ids not in
    /// the maildrop are ignored. `Ok` once that is durable: bodies are removed after it,
    /// and a failure there (or a crash) leaves them listed in `trash` for the next open's
    /// sweep, so it is logged, never reported as deletions that did not happen. Not
    /// checked against the free-space reserve: deleting is how users make room.
    pub fn update_maildrop(
        &self,
        local: &str,
        delete: &[u64],
        seen: &[u64],
    ) -> Result<(), StoreError> {
        check_local(local)?;
        let _write = self.writable()?;
        let removed = self.unlink_messages(local, delete, seen, Unlink::Delete)?;
        self.flush()?;
        if let Err(e) = self.purge(&removed).and_then(|()| self.flush()) {
            let domain = &self.name;
            tracing::warn!(%domain, error = %e,
                "deleted messages' bodies left for the sweep at the store's next open");
        }
        Ok(())
    }

    /// Durably flushes everything written so far.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(drop).map_err(|e| self.sled_err(e))
    }

    /// Number of messages and their total octets in `local`'s maildrop.
    pub fn maildrop_usage(&self, local: &str) -> Result<(u64, u64), StoreError> {
        let snapshot = self.snapshot(local)?;
        Ok((
            snapshot.len() as u64,
            snapshot.iter().map(|m| m.octets).sum(),
        ))
    }

    /// The space an unprivileged writer may use on the store's file system (the root
    /// reserve is not ours).
    fn available(&self) -> Result<u64, StoreError> {
        let stat =
            nix::sys::statvfs::statvfs(Path::new(&self.path)).map_err(|e| StoreError::Io {
                path: self.path.clone(),
                source: std::io::Error::from(e),
            })?;
        Ok((stat.blocks_available() as u64).saturating_mul(stat.fragment_size() as u64))
    }

    /// Whether `Directory::compact` would give space back: the file system is below the
    /// reserve, the store's files exceed twice its live data (the message octets and an
    /// eighth more for sled's own records) by 16 MiB, and there is room for a copy of the
    /// live data twice over and 4 MiB (a new sled store's own files).
    pub fn worth_compacting(&self) -> Result<bool, StoreError> {
        if self.min_free_bytes == 0 {
            return Ok(false);
        }
        let available = self.available()?;
        if available >= self.min_free_bytes {
            return Ok(false);
        }
        let octets = self.usage()?.octets;
        let live = octets + octets / 8;
        const MIB: u64 = 1024 * 1024;
        Ok(self.size_on_disk()? > 2 * live + 16 * MIB && available > 2 * live + 4 * MIB)
    }

    /// The size of the store's files.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.db.size_on_disk().map_err(|e| self.sled_err(e))
    }

    /// Deliveries begun and not yet committed or discarded.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Total message octets of the whole domain, counted once and then kept current.
    pub fn stored_octets(&self) -> Result<u64, StoreError> {
        Ok(self.usage()?.octets)
    }

    /// Accounts, messages and total message octets of the whole domain: counted once (a
    /// full scan), then kept current.
    pub fn usage(&self) -> Result<Usage, StoreError> {
        let mut usage = lock(&self.usage);
        if let Some(u) = *usage {
            return Ok(u);
        }
        let counted = self.count_usage()?;
        *usage = Some(counted);
        Ok(counted)
    }

    /// Writes the current usage to `USAGE_FILE` when it differs from what the file holds.
    /// Counts first if nothing is counted yet.
    pub fn record_usage(&self) -> Result<Usage, StoreError> {
        let usage = self.usage()?;
        let mut recorded = lock(&self.recorded);
        if *recorded != Some(usage) {
            let path = Path::new(&self.path).join(USAGE_FILE);
            let json = serde_json::to_vec(&usage)
                .map_err(|e| StoreError::Corrupt(format!("cannot encode usage: {e}")))?;
            crate::fsutil::write_atomically(&path, &json, 0o600).map_err(|source| {
                StoreError::Io {
                    path: path.display().to_string(),
                    source,
                }
            })?;
            *recorded = Some(usage);
        }
        Ok(usage)
    }

    /// A full scan of the accounts and the maildrops.
    fn count_usage(&self) -> Result<Usage, StoreError> {
        let accounts = self.accounts.len() as u64;
        let (mut messages, mut octets) = (0u64, 0u64);
        for value in self.maildrop.iter().values() {
            let value = value.map_err(|e| self.sled_err(e))?;
            let entry = MaildropEntry::decode(&value).ok_or_else(|| {
                StoreError::Corrupt(format!("bad maildrop size in {}", self.path))
            })?;
            messages += 1;
            octets += entry.octets;
        }
        Ok(Usage {
            accounts,
            messages,
            octets,
        })
    }
}

impl Drop for DomainStore {
    fn drop(&mut self) {
        // Closing must not lose what a caller wrote without flushing (admin edits that
        // failed half-way, idle stores); sled's own shutdown does not sync. A store broken
        // by a storage error is not flushed: sled's flush then waits for a stability that
        // never comes, and what it holds unflushed was never acknowledged.
        if self.is_broken() {
            let domain = &self.name;
            tracing::warn!(%domain, "closing a store after a storage error without a flush");
        } else if let Err(e) = self.flush() {
            tracing::warn!(domain = %self.name, error = %e, "flush on close failed");
        }
        // A store closed while its domain is removed has no directory to record into, and
        // one replaced by its compacted copy must not record into the copy's.
        if Path::new(&self.path).is_dir() && !self.detached.load(Ordering::Relaxed) {
            if let Err(e) = self.record_usage() {
                tracing::warn!(domain = %self.name, error = %e, "recording usage on close failed");
            }
        }
    }
}

/// The usage `USAGE_FILE` in the store directory `path` records, if it is there and
/// readable.
fn read_usage_file(path: &Path) -> Option<Usage> {
    let bytes = std::fs::read(path.join(USAGE_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

impl PendingMessage {
    /// The id this message will have in the maildrop.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Body octets written so far.
    pub fn octets(&self) -> u64 {
        self.octets
    }

    /// A message belongs to the store that began it; writing it through another would
    /// scatter its parts over two tenants.
    fn check_store(&self, store: &DomainStore) -> Result<(), StoreError> {
        if std::ptr::eq(store, Arc::as_ptr(&self.store)) {
            Ok(())
        } else {
            Err(StoreError::MessageNotFound(self.id))
        }
    }

    fn store_chunk(&mut self) -> Result<(), StoreError> {
        let store = &self.store;
        store.ensure_room()?;
        store
            .bodies
            .insert(chunk_key(self.id, self.next_chunk), self.buf.as_slice())
            .map_err(|e| store.sled_err(e))?;
        self.buf.clear();
        self.next_chunk = self.next_chunk.checked_add(1).ok_or_else(|| {
            StoreError::Corrupt(format!("message {} exceeds the chunk index range", self.id))
        })?;
        Ok(())
    }

    /// Appends body bytes (already normalised); stored in `CHUNK_SIZE` pieces.
    pub fn write(&mut self, store: &DomainStore, mut data: &[u8]) -> Result<(), StoreError> {
        self.check_store(store)?;
        while !data.is_empty() {
            let take = (CHUNK_SIZE - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            self.octets += take as u64;
            if self.buf.len() == CHUNK_SIZE {
                self.store_chunk()?;
            }
        }
        Ok(())
    }

    /// Makes the message visible in the maildrop and flushes; returns its metadata.
    ///
    /// `UnknownAccount` if the account was removed meanwhile (the body is discarded),
    /// `Full` below the free-space reserve. Any error leaves no trace a client could see:
    /// when the final flush fails, the maildrop entry is taken back out in memory, and,
    /// since the failed flush may still have written the commit, the message is listed in
    /// the domain's `Gate` and the store marked broken, so it is reopened and the message
    /// removed before the store is handed out again.
    pub fn commit(mut self, store: &DomainStore) -> Result<MessageMeta, StoreError> {
        self.check_store(store)?;
        if !self.buf.is_empty() {
            self.store_chunk()?;
        }
        store.ensure_room()?;
        let (local, id, octets) = (self.local.as_str(), self.id, self.octets);
        let flags = if self.seen { FLAG_SEEN } else { 0 };
        let _write = store.writable()?;
        let mut total = lock(&store.usage);
        let entry = MaildropEntry { octets, flags };
        let make_visible = |accounts: &TransactionalTree,
                            maildrop: &TransactionalTree,
                            pending: &TransactionalTree|
         -> Result<(), ConflictableTransactionError<StoreError>> {
            if accounts.get(local)?.is_none() {
                return Err(ConflictableTransactionError::Abort(
                    StoreError::UnknownAccount(store.address(local)),
                ));
            }
            maildrop.insert(maildrop_key(local, id), &entry.encode())?;
            pending.remove(&id_key(id))?;
            Ok(())
        };
        match self.uidl.as_deref() {
            None => (&store.accounts, &store.maildrop, &store.pending).transaction(
                |(accounts, maildrop, pending)| make_visible(accounts, maildrop, pending),
            ),
            Some(uidl) => {
                let trees = (
                    &store.accounts,
                    &store.maildrop,
                    &store.pending,
                    &store.uidls,
                    &store.uidl_ids,
                );
                trees.transaction(|(accounts, maildrop, pending, uidls, uidl_ids)| {
                    // Two imports of one UIDL that raced past `begin_import`: one wins.
                    if uidl_ids.get(uidl_key(local, uidl))?.is_some() {
                        return Err(ConflictableTransactionError::Abort(
                            StoreError::UidlExists {
                                account: store.address(local),
                                uidl: uidl.to_owned(),
                            },
                        ));
                    }
                    make_visible(accounts, maildrop, pending)?;
                    uidls.insert(maildrop_key(local, id), uidl.as_bytes())?;
                    uidl_ids.insert(uidl_key(local, uidl), &id_key(id))?;
                    Ok(())
                })
            }
        }
        .map_err(|e| store.txn_err(e))?;
        if let Some(t) = total.as_mut() {
            t.messages += 1;
            t.octets += octets;
        }
        drop(total);
        if let Err(e) = store.flush() {
            self.take_back(store);
            return Err(e);
        }
        self.committed = true;
        Ok(MessageMeta {
            id,
            octets,
            seen: flags & FLAG_SEEN != 0,
        })
    }

    /// Undoes a commit whose flush failed: the maildrop entry goes and the id is listed
    /// in `pending` again, so `Drop` (or the next open's sweep) removes the body; sled may
    /// refuse that write after an I/O error. Either way the message is removed again at
    /// the store's reopening, which marking it broken brings about.
    fn take_back(&self, store: &DomainStore) {
        let (local, id) = (self.local.as_str(), self.id);
        lock(&store.gate.failed_commits).push((local.to_owned(), id));
        store.broken.store(true, Ordering::Relaxed);
        *lock(&store.usage) = None;
        let uidl = self.uidl.as_deref();
        let trees = (
            &store.maildrop,
            &store.pending,
            &store.uidls,
            &store.uidl_ids,
        );
        let undone = trees
            .transaction(|(maildrop, pending, uidls, uidl_ids)| {
                maildrop.remove(maildrop_key(local, id))?;
                pending.insert(&id_key(id), local.as_bytes())?;
                if let Some(uidl) = uidl {
                    uidls.remove(maildrop_key(local, id))?;
                    uidl_ids.remove(uidl_key(local, uidl))?;
                }
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })
            .map_err(|e| store.txn_err(e));
        if let Err(e) = undone {
            let domain = &store.name;
            tracing::warn!(%domain, id, error = %e,
                "cannot take back a commit that failed; removed when the store reopens");
        }
    }

    /// Commits the message already marked seen (a copy of a seen message).
    pub fn mark_seen(&mut self) {
        self.seen = true;
    }

    /// Commits the message with `uidl` as its stored UIDL (a copy of a message that has
    /// one); refused unless `wire::validate_uidl` accepts it.
    pub fn keep_uidl(&mut self, uidl: &str) -> Result<(), StoreError> {
        crate::wire::validate_uidl(uidl).map_err(invalid_uidl)?;
        self.uidl = Some(uidl.into());
        Ok(())
    }

    /// The stored UIDL this message is committed with, if any.
    pub fn uidl(&self) -> Option<&str> {
        self.uidl.as_deref()
    }
}

impl Drop for PendingMessage {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        // The pending entry goes only once the chunks are gone, so a failure here still
        // leaves the sweep at next open something to find.
        let result = self.store.remove_body(self.id).and_then(|()| {
            self.store
                .pending
                .remove(id_key(self.id))
                .map(drop)
                .map_err(|e| self.store.sled_err(e))
        });
        if let Err(e) = result {
            let (domain, id) = (&self.store.name, self.id);
            tracing::warn!(%domain, id, error = %e, "cannot discard uncommitted message");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Credentials, ScramKeys};
    use std::time::Duration;
    use tempfile::TempDir;

    fn account(nonce: u32) -> Account {
        Account {
            credentials: Credentials {
                phc: "x".into(),
                scram: Some(ScramKeys {
                    salt: vec![],
                    iterations: 4096,
                    stored_key: [0; 32],
                    server_key: [0; 32],
                }),
                apop_secret: None,
            },
            uid_nonce: nonce,
            quota_bytes: None,
        }
    }

    fn opts(idle_close: Duration) -> StoreOptions {
        StoreOptions {
            cache_capacity: 1024 * 1024,
            idle_close,
            ..StoreOptions::default()
        }
    }

    fn setup() -> (TempDir, Directory) {
        let tmp = TempDir::new().unwrap();
        let dir = Directory::open(tmp.path(), opts(Duration::from_secs(3600))).unwrap();
        (tmp, dir)
    }

    fn pattern(len: usize, seed: usize) -> Vec<u8> {
        (0..len).map(|i| ((i * 31 + seed) % 251) as u8).collect()
    }

    fn deliver(store: &DomainStore, local: &str, body: &[u8]) -> MessageMeta {
        let mut msg = store.begin_message(local).unwrap();
        msg.write(store, body).unwrap();
        msg.commit(store).unwrap()
    }

    /// Reads a whole body the way RETR does: one chunk per call, buffer cleared between.
    fn read_all(store: &DomainStore, id: u64) -> Vec<u8> {
        let (mut out, mut buf, mut offset) = (Vec::new(), Vec::new(), 0u64);
        loop {
            buf.clear();
            let n = store.read_body(id, offset, &mut buf).unwrap();
            assert_eq!(n, buf.len());
            assert!(n <= CHUNK_SIZE);
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf);
            offset += n as u64;
        }
    }

    /// A full count of (accounts, messages, octets).
    fn counts(store: &DomainStore) -> (u64, u64, u64) {
        let u = store.count_usage().unwrap();
        (u.accounts, u.messages, u.octets)
    }

    fn body_chunks(store: &DomainStore) -> usize {
        store.bodies.len()
    }

    #[test]
    fn credentials_upgrade_only_over_the_verified_hash() {
        let (_tmp, dir) = setup();
        dir.add_domain("example.org").unwrap();
        let store = dir.domain("example.org").unwrap();
        let mut joe = account(7);
        joe.quota_bytes = Some(99);
        store.create_account("joe", &joe).unwrap();
        let new = Credentials {
            phc: "y".into(),
            scram: None,
            apop_secret: Some("kept by caller".into()),
        };
        // Changed meanwhile (stored "x"), or no such account: nothing is written.
        assert!(!store.upgrade_credentials("joe", "w", &new).unwrap());
        assert!(!store.upgrade_credentials("ann", "x", &new).unwrap());
        assert_eq!(store.account("joe").unwrap().unwrap().credentials.phc, "x");
        assert!(store.upgrade_credentials("joe", "x", &new).unwrap());
        let stored = store.account("joe").unwrap().unwrap();
        assert!(stored.credentials == new);
        assert_eq!((stored.uid_nonce, stored.quota_bytes), (7, Some(99)));
        assert!(store.account("ann").unwrap().is_none());
    }

    #[test]
    fn open_creates_the_domains_directory() {
        let tmp = TempDir::new().unwrap();
        let data = tmp.path().join("nested/data");
        let dir = Directory::open(&data, StoreOptions::default()).unwrap();
        assert!(data.join(DOMAINS_DIR).is_dir());
        assert_eq!(dir.list_domains().unwrap(), Vec::<String>::new());
        assert_eq!(dir.open_count(), 0);
    }

    #[test]
    fn stored_octets_follow_commits_deletes_and_removals() {
        let tmp = TempDir::new().unwrap();
        let dir = Directory::open(tmp.path(), StoreOptions::default()).unwrap();
        dir.add_domain("example.org").unwrap();
        let store = dir.domain("example.org").unwrap();
        store.create_account("joe", &account(1)).unwrap();
        store.create_account("ann", &account(2)).unwrap();
        assert_eq!(store.stored_octets().unwrap(), 0);
        let a = deliver(&store, "joe", &[b'a'; 100]);
        deliver(&store, "ann", &[b'b'; 70_000]);
        assert_eq!(
            store.stored_octets().unwrap(),
            70_100,
            "kept current by commits"
        );
        store.update_maildrop("joe", &[a.id], &[]).unwrap();
        assert_eq!(
            store.stored_octets().unwrap(),
            70_000,
            "recounted after a delete"
        );
        // An uncommitted message counts for nothing.
        let mut pending = store.begin_message("joe").unwrap();
        pending.write(&store, &[b'c'; 10]).unwrap();
        drop(pending);
        deliver(&store, "joe", &[b'd'; 5]);
        assert_eq!(store.stored_octets().unwrap(), 70_005);
        store.remove_account("ann").unwrap();
        assert_eq!(store.stored_octets().unwrap(), 5);
        assert_eq!(
            store.count_usage().unwrap().octets,
            5,
            "the same as a full count"
        );
    }

    #[test]
    fn open_fails_with_path_context() {
        let tmp = TempDir::new().unwrap();
        let file = tmp.path().join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        match Directory::open(&file, StoreOptions::default()) {
            Err(StoreError::Io { path, .. }) => assert!(path.contains("plain-file"), "{path}"),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("opened a directory under a file"),
        }
    }

    #[test]
    fn domains_are_normalised_listed_and_validated() {
        let (tmp, dir) = setup();
        dir.add_domain("Zeta.Example").unwrap();
        dir.add_domain("alpha.example").unwrap();
        let dup = dir.add_domain("ALPHA.example");
        assert!(matches!(dup, Err(StoreError::DomainExists(d)) if d == "alpha.example"));
        assert!(matches!(
            dir.add_domain("../evil"),
            Err(StoreError::InvalidDomain(_))
        ));
        assert!(matches!(
            dir.add_domain("a/b"),
            Err(StoreError::InvalidDomain(_))
        ));
        // Things in the domains directory that are not domains are not listed.
        std::fs::write(tmp.path().join("domains/README"), b"x").unwrap();
        std::fs::create_dir(tmp.path().join("domains/Not_A_Domain")).unwrap();
        std::fs::create_dir(tmp.path().join("domains/UPPER.example")).unwrap();
        assert_eq!(
            dir.list_domains().unwrap(),
            vec!["alpha.example", "zeta.example"]
        );
        assert!(dir.has_domain("ZETA.example"));
        assert!(!dir.has_domain("beta.example"));
        assert!(!dir.has_domain(".."));
        assert!(!dir.has_domain("README"));
        assert_eq!(dir.domain("Alpha.Example").unwrap().name(), "alpha.example");
        let unknown = dir.domain("beta.example");
        assert!(matches!(unknown, Err(StoreError::UnknownDomain(d)) if d == "beta.example"));
        assert!(matches!(
            dir.domain("../domains"),
            Err(StoreError::InvalidDomain(_))
        ));
        assert!(matches!(
            dir.remove_domain("beta.example"),
            Err(StoreError::UnknownDomain(_))
        ));
        assert!(tmp.path().join("domains/zeta.example").is_dir());
    }

    #[test]
    fn same_local_part_in_two_domains_is_kept_apart() {
        let (_tmp, dir) = setup();
        dir.add_domain("a.org").unwrap();
        dir.add_domain("b.org").unwrap();
        let a = dir.domain("a.org").unwrap();
        let b = dir.domain("b.org").unwrap();
        a.create_account("alice", &account(1)).unwrap();
        b.create_account("alice", &account(2)).unwrap();
        let m = deliver(&a, "alice", b"for a.org");
        assert_eq!(a.snapshot("alice").unwrap(), vec![m]);
        assert!(b.snapshot("alice").unwrap().is_empty());
        assert_eq!(b.read_body(m.id, 0, &mut Vec::new()).unwrap(), 0);
        assert_eq!(a.account("alice").unwrap().unwrap().uid_nonce, 1);
        assert_eq!(b.account("alice").unwrap().unwrap().uid_nonce, 2);
        b.remove_account("alice").unwrap();
        assert_eq!(read_all(&a, m.id), b"for a.org");
        assert!(a.account("alice").unwrap().is_some());
    }

    #[test]
    fn stores_open_lazily_and_close_when_idle() {
        let tmp = TempDir::new().unwrap();
        {
            let dir = Directory::open(tmp.path(), opts(Duration::from_secs(3600))).unwrap();
            dir.add_domain("a.org").unwrap();
            dir.add_domain("b.org").unwrap();
            assert_eq!(dir.open_count(), 2);
            assert_eq!(dir.close_idle(), 0, "not idle long enough");
        }
        let dir = Directory::open(tmp.path(), opts(Duration::ZERO)).unwrap();
        assert_eq!(dir.open_count(), 0, "nothing opened before use");
        let a = dir.domain("a.org").unwrap();
        assert_eq!(dir.open_count(), 1);
        let a2 = dir.domain("a.org").unwrap();
        assert!(Arc::ptr_eq(&a, &a2));
        drop(a2);
        assert_eq!(dir.close_idle(), 0, "still referenced");
        assert_eq!(dir.open_count(), 1);
        a.create_account("u", &account(1)).unwrap();
        let msg = a.begin_message("u").unwrap();
        drop(a);
        assert_eq!(
            dir.close_idle(),
            0,
            "a delivery in progress holds the store"
        );
        drop(msg);
        assert_eq!(dir.close_idle(), 1);
        assert_eq!(dir.open_count(), 0);
        // Reopening the same path in the same process works: sled released it.
        let a = dir.domain("a.org").unwrap();
        assert!(a.account("u").unwrap().is_some());
        dir.domain("b.org").unwrap();
        assert_eq!(dir.open_count(), 2);
        drop(a);
        assert_eq!(dir.close_idle(), 2);
        assert_eq!(dir.open_count(), 0);
    }

    #[test]
    fn concurrent_first_use_opens_once() {
        let (tmp, dir) = setup();
        dir.add_domain("a.org").unwrap();
        drop(dir);
        let dir = Directory::open(tmp.path(), opts(Duration::ZERO)).unwrap();
        assert_eq!(dir.open_count(), 0);
        let stores: Vec<Arc<DomainStore>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| dir.domain("a.org").unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(stores.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])));
        assert_eq!(dir.open_count(), 1);
    }

    #[test]
    fn open_stores_are_capped_least_recently_used_first_never_one_in_use() {
        let tmp = TempDir::new().unwrap();
        let dir = Directory::open(
            tmp.path(),
            StoreOptions {
                max_open: 3,
                ..opts(Duration::from_secs(3600))
            },
        )
        .unwrap();
        for i in 0..10 {
            dir.add_domain(&format!("d{i}.org")).unwrap();
            assert!(dir.open_count() <= 3, "{} open", dir.open_count());
        }
        // Stores in use stay open past the cap; the idle ones go, oldest first.
        let held: Vec<_> = (0..5)
            .map(|i| dir.domain(&format!("d{i}.org")).unwrap())
            .collect();
        assert_eq!(dir.open_count(), 5, "in use, so above the cap");
        let names = |dir: &Directory| -> Vec<String> {
            dir.open_domains().into_iter().map(|(n, _)| n).collect()
        };
        assert_eq!(
            names(&dir),
            ["d0.org", "d1.org", "d2.org", "d3.org", "d4.org"]
        );
        drop(held);
        dir.domain("d9.org").unwrap();
        dir.domain("d4.org").unwrap();
        assert_eq!(names(&dir), ["d3.org", "d4.org", "d9.org"]);
        assert_eq!(dir.close_idle(), 0, "not idle long enough");
        assert_eq!(dir.open_count(), 3);
    }

    /// Makes the next open of `path`'s sled database block in `open(2)` until `release`:
    /// its `conf` becomes a FIFO, which sled opens for reading.
    struct BlockedOpen {
        path: PathBuf,
    }

    impl BlockedOpen {
        fn new(path: &Path) -> BlockedOpen {
            let (conf, fifo) = (path.join("conf"), path.join("conf.fifo"));
            std::fs::rename(&conf, path.join("conf.real")).unwrap();
            nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
            std::fs::hard_link(&fifo, &conf).unwrap();
            BlockedOpen {
                path: path.to_owned(),
            }
        }

        /// Whether a thread named `thread` of this process waits in a FIFO's open.
        fn waiting(thread: &str) -> bool {
            std::fs::read_dir("/proc/self/task").unwrap().any(|t| {
                let t = t.unwrap().path();
                let read = |f: &str| std::fs::read_to_string(t.join(f)).unwrap_or_default();
                read("comm").trim() == thread && read("wchan") == "wait_for_partner"
            })
        }

        /// Puts the real `conf` back and lets the waiting open go on.
        fn release(&self) {
            std::fs::rename(self.path.join("conf.real"), self.path.join("conf")).unwrap();
            drop(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(self.path.join("conf.fifo"))
                    .unwrap(),
            );
            std::fs::remove_file(self.path.join("conf.fifo")).unwrap();
        }
    }

    #[test]
    fn a_slow_open_stalls_only_its_own_domain() {
        let (tmp, dir) = setup();
        dir.add_domain("slow.org").unwrap();
        dir.add_domain("fast.org").unwrap();
        drop(dir);
        let dir = Directory::open(tmp.path(), opts(Duration::ZERO)).unwrap();
        let blocked = BlockedOpen::new(&tmp.path().join("domains/slow.org"));
        std::thread::scope(|s| {
            let slow = std::thread::Builder::new()
                .name("open-slow".into())
                .spawn_scoped(s, || dir.domain("slow.org").map(|_| ()))
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while !BlockedOpen::waiting("open-slow") {
                assert!(Instant::now() < deadline, "the slow open never started");
                std::thread::sleep(Duration::from_millis(5));
            }
            // Both a closed and an open store of another domain are handed out while the
            // slow one is still being opened (a bounded wait, not a speed check).
            let (tx, rx) = std::sync::mpsc::channel();
            s.spawn(|| {
                let tx = tx;
                let _ = tx.send(dir.domain("fast.org").map(|_| ()));
                let _ = tx.send(dir.domain("fast.org").map(|_| ()));
            });
            for _ in 0..2 {
                let got = rx.recv_timeout(Duration::from_secs(10));
                if !matches!(got, Ok(Ok(()))) {
                    blocked.release();
                    panic!("another domain waited for the slow open: {got:?}");
                }
            }
            assert!(!slow.is_finished(), "the slow open was let go too early");
            blocked.release();
            slow.join().unwrap().unwrap();
        });
        assert_eq!(dir.open_count(), 2);
    }

    #[test]
    fn bodies_round_trip_chunk_by_chunk() {
        let (_tmp, dir) = setup();
        dir.add_domain("a.org").unwrap();
        let store = dir.domain("a.org").unwrap();
        store.create_account("u", &account(1)).unwrap();
        let sizes = [
            0,
            1,
            CHUNK_SIZE - 1,
            CHUNK_SIZE,
            CHUNK_SIZE + 1,
            3 * CHUNK_SIZE + 7,
        ];
        // The same bodies written in different slicings must store the same bytes.
        let pieces = [usize::MAX, 1, 7, 4096, CHUNK_SIZE + 3];
        let mut expected = Vec::new();
        for (n, &size) in sizes.iter().enumerate() {
            for &piece in &pieces {
                if piece == 1 && size > CHUNK_SIZE + 1 {
                    continue;
                }
                let data = pattern(size, n + piece % 13);
                let mut msg = store.begin_message("u").unwrap();
                for part in data.chunks(piece.min(size.max(1))) {
                    msg.write(&store, part).unwrap();
                }
                assert_eq!(msg.octets(), size as u64);
                let id = msg.id();
                let meta = msg.commit(&store).unwrap();
                assert_eq!(
                    meta,
                    MessageMeta {
                        id,
                        octets: size as u64,
                        seen: false,
                    }
                );
                assert_eq!(read_all(&store, meta.id), data, "size {size} piece {piece}");
                expected.push(meta);
            }
        }
        assert_eq!(store.snapshot("u").unwrap(), expected);
        // Every size in every slicing, except the largest one byte at a time.
        let total: u64 = sizes.iter().map(|&s| s as u64).sum::<u64>() * pieces.len() as u64
            - (3 * CHUNK_SIZE as u64 + 7);
        assert_eq!(
            store.maildrop_usage("u").unwrap(),
            (expected.len() as u64, total)
        );
        assert_eq!(counts(&store), (1, expected.len() as u64, total));
    }

    #[test]
    fn read_body_appends_from_offset_to_chunk_end() {
        let (_tmp, dir) = setup();
        dir.add_domain("a.org").unwrap();
        let store = dir.domain("a.org").unwrap();
        store.create_account("u", &account(1)).unwrap();
        let data = pattern(2 * CHUNK_SIZE + 10, 3);
        let id = deliver(&store, "u", &data).id;
        let mut buf = b"kept".to_vec();
        assert_eq!(store.read_body(id, 5, &mut buf).unwrap(), CHUNK_SIZE - 5);
        assert_eq!(&buf[..4], b"kept");
        assert_eq!(&buf[4..], &data[5..CHUNK_SIZE]);
        let cases: [(u64, usize); 7] = [
            (0, CHUNK_SIZE),
            (CHUNK_SIZE as u64 - 1, 1),
            (CHUNK_SIZE as u64, CHUNK_SIZE),
            (2 * CHUNK_SIZE as u64 + 9, 1),
            (2 * CHUNK_SIZE as u64 + 10, 0),
            (3 * CHUNK_SIZE as u64, 0),
            (u64::MAX, 0),
        ];
        for (offset, want) in cases {
            let mut buf = Vec::new();
            assert_eq!(
                store.read_body(id, offset, &mut buf).unwrap(),
                want,
                "offset {offset}"
            );
            let start = offset.min(data.len() as u64) as usize;
            assert_eq!(buf, &data[start..start + want]);
        }
        assert_eq!(store.read_body(id + 1000, 0, &mut Vec::new()).unwrap(), 0);
    }

    #[test]
    fn ids_are_monotonic_and_never_reused() {
        let tmp = TempDir::new().unwrap();
        let mut seen = Vec::new();
        {
            let dir = Directory::open(tmp.path(), opts(Duration::ZERO)).unwrap();
            dir.add_domain("a.org").unwrap();
            let store = dir.domain("a.org").unwrap();
            store.create_account("u", &account(1)).unwrap();
            for i in 0..3 {
                seen.push(deliver(&store, "u", &pattern(i, i)).id);
            }
            store.update_maildrop("u", &seen[1..], &[]).unwrap();
            seen.push(deliver(&store, "u", b"x").id);
            // A discarded delivery consumes its id too.
            let discarded = store.begin_message("u").unwrap();
            seen.push(discarded.id());
            drop(discarded);
            seen.push(deliver(&store, "u", b"y").id);
            drop(store);
            assert_eq!(dir.close_idle(), 1);
            let store = dir.domain("a.org").unwrap();
            seen.push(deliver(&store, "u", b"after close").id);
        }
        let dir = Directory::open(tmp.path(), opts(Duration::ZERO)).unwrap();
        let store = dir.domain("a.org").unwrap();
        seen.push(deliver(&store, "u", b"after reopen").id);
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
        let ids: Vec<u64> = store.snapshot("u").unwrap().iter().map(|m| m.id).collect();
        assert_eq!(ids, [seen[0], seen[3], seen[5], seen[6], seen[7]]);
    }

    #[test]
    fn delete_removes_listed_messages_and_ignores_others() {
        let (_tmp, dir) = setup();
        dir.add_domain("a.org").unwrap();
        let store = dir.domain("a.org").unwrap();
        store.create_account("alice", &account(1)).unwrap();
        store.create_account("bob", &account(2)).unwrap();
        let a: Vec<MessageMeta> = (0..4)
            .map(|i| deliver(&store, "alice", &pattern(CHUNK_SIZE + i, i)))
            .collect();
        let b = deliver(&store, "bob", b"bob's");
        let chunks_before = body_chunks(&store);
        // Unknown ids and another account's id are ignored, duplicates are harmless.
        store
            .update_maildrop("alice", &[a[1].id, 999_999, b.id, a[3].id, a[1].id], &[])
            .unwrap();
        assert_eq!(store.snapshot("alice").unwrap(), vec![a[0], a[2]]);
        assert_eq!(store.snapshot("bob").unwrap(), vec![b]);
        assert_eq!(read_all(&store, b.id), b"bob's");
        assert!(read_all(&store, a[1].id).is_empty());
        assert!(read_all(&store, a[3].id).is_empty());
        assert_eq!(read_all(&store, a[2].id), pattern(CHUNK_SIZE + 2, 2));
        assert_eq!(body_chunks(&store), chunks_before - 4);
        assert!(store.trash.is_empty());
        store.update_maildrop("alice", &[], &[]).unwrap();
        store.update_maildrop("nobody", &[a[0].id], &[]).unwrap();
        assert_eq!(store.snapshot("alice").unwrap(), vec![a[0], a[2]]);
        assert!(matches!(
            store.update_maildrop("Alice", &[a[0].id], &[]),
            Err(StoreError::InvalidAddress(_))
        ));
    }

    #[test]
    fn bodies_of_an_interrupted_delete_are_swept_at_open() {
        let tmp = TempDir::new().unwrap();
        let (kept, gone);
        {
            let dir = Directory::open(tmp.path(), opts(Duration::ZERO)).unwrap();
            dir.add_domain("a.org").unwrap();
            let store = dir.domain("a.org").unwrap();
            store.create_account("u", &account(1)).unwrap();
            kept = deliver(&store, "u", &pattern(CHUNK_SIZE * 2, 1));
            gone = deliver(&store, "u", &pattern(CHUNK_SIZE * 2, 2));
            // The commit point of a delete without its body removal: a crash right after.
            assert_eq!(
                store
                    .unlink_messages("u", &[gone.id], &[], Unlink::Delete)
                    .unwrap(),
                vec![gone.id]
            );
            store.flush().unwrap();
            assert_eq!(store.trash.len(), 1);
            assert_eq!(body_chunks(&store), 4);
        }
        let dir = Directory::open(tmp.path(), opts(Duration::ZERO)).unwrap();
        let store = dir.domain("a.org").unwrap();
        assert!(store.trash.is_empty());
        assert_eq!(body_chunks(&store), 2);
        assert_eq!(store.snapshot("u").unwrap(), vec![kept]);
        assert_eq!(read_all(&store, kept.id), pattern(CHUNK_SIZE * 2, 1));
    }

    #[test]
    fn uncommitted_messages_leave_nothing() {
        let tmp = TempDir::new().unwrap();
        {
            let dir = Directory::open(tmp.path(), opts(Duration::ZERO)).unwrap();
            dir.add_domain("a.org").unwrap();
            let store = dir.domain("a.org").unwrap();
            store.create_account("u", &account(1)).unwrap();
            let mut msg = store.begin_message("u").unwrap();
            msg.write(&store, &pattern(2 * CHUNK_SIZE + 5, 0)).unwrap();
            assert_eq!(
                body_chunks(&store),
                2,
                "full chunks are written as they fill"
            );
            assert_eq!(store.pending.len(), 1);
            assert!(
                store.snapshot("u").unwrap().is_empty(),
                "invisible before commit"
            );
            drop(msg);
            assert_eq!(body_chunks(&store), 0);
            assert!(store.pending.is_empty());

            // A crash mid-delivery: chunks and the pending entry stay behind.
            let mut msg = store.begin_message("u").unwrap();
            msg.write(&store, &pattern(3 * CHUNK_SIZE, 1)).unwrap();
            msg.committed = true;
            drop(msg);
            assert_eq!(body_chunks(&store), 3);
            assert_eq!(store.pending.len(), 1);
            assert!(store.snapshot("u").unwrap().is_empty());
        }
        let dir = Directory::open(tmp.path(), opts(Duration::ZERO)).unwrap();
        let store = dir.domain("a.org").unwrap();
        assert_eq!(body_chunks(&store), 0, "swept at open");
        assert!(store.pending.is_empty());
        assert!(store.snapshot("u").unwrap().is_empty());
        assert_eq!(counts(&store), (1, 0, 0));
    }

    #[test]
    fn commit_requires_the_account() {
        let (_tmp, dir) = setup();
        dir.add_domain("a.org").unwrap();
        let store = dir.domain("a.org").unwrap();
        let msg = store.begin_message("ghost").unwrap();
        assert!(
            matches!(msg.commit(&store), Err(StoreError::UnknownAccount(u)) if u == "ghost@a.org")
        );
        store.create_account("u", &account(1)).unwrap();
        let mut msg = store.begin_message("u").unwrap();
        msg.write(&store, &pattern(CHUNK_SIZE + 1, 0)).unwrap();
        store.remove_account("u").unwrap();
        assert!(matches!(
            msg.commit(&store),
            Err(StoreError::UnknownAccount(_))
        ));
        assert_eq!(body_chunks(&store), 0);
        assert!(store.pending.is_empty());
        assert!(store.snapshot("u").unwrap().is_empty());
    }

    #[test]
    fn a_message_stays_with_the_store_that_began_it() {
        let (_tmp, dir) = setup();
        dir.add_domain("a.org").unwrap();
        dir.add_domain("b.org").unwrap();
        let a = dir.domain("a.org").unwrap();
        let b = dir.domain("b.org").unwrap();
        a.create_account("u", &account(1)).unwrap();
        b.create_account("u", &account(1)).unwrap();
        let mut msg = a.begin_message("u").unwrap();
        let id = msg.id();
        assert!(matches!(msg.write(&b, b"x"), Err(StoreError::MessageNotFound(i)) if i == id));
        assert!(matches!(
            msg.commit(&b),
            Err(StoreError::MessageNotFound(_))
        ));
        assert!(a.snapshot("u").unwrap().is_empty());
        assert!(b.snapshot("u").unwrap().is_empty());
        assert!(
            a.pending.is_empty(),
            "the refused commit discarded the message"
        );
    }

    #[test]
    fn account_records_are_managed() {
        let (_tmp, dir) = setup();
        dir.add_domain("a.org").unwrap();
        let store = dir.domain("a.org").unwrap();
        assert!(store.account("u").unwrap().is_none());
        assert!(matches!(
            store.update_account("u", &account(1)),
            Err(StoreError::UnknownAccount(_))
        ));
        assert!(matches!(
            store.remove_account("u"),
            Err(StoreError::UnknownAccount(_))
        ));
        for local in ["zed", "u", "alice"] {
            store.create_account(local, &account(1)).unwrap();
        }
        assert!(matches!(
            store.create_account("u", &account(9)),
            Err(StoreError::AccountExists(_))
        ));
        assert_eq!(store.account("u").unwrap().unwrap().uid_nonce, 1);
        store.update_account("u", &account(5)).unwrap();
        assert_eq!(store.account("u").unwrap().unwrap().uid_nonce, 5);
        assert_eq!(store.list_accounts().unwrap(), vec!["alice", "u", "zed"]);
        assert_eq!(counts(&store), (3, 0, 0));
        for bad in ["", "U", "a\0b", "a b", "a/b", ".x", "a@b"] {
            assert!(
                matches!(store.account(bad), Err(StoreError::InvalidAddress(_))),
                "{bad:?}"
            );
            assert!(matches!(
                store.create_account(bad, &account(1)),
                Err(StoreError::InvalidAddress(_))
            ));
            assert!(matches!(
                store.update_account(bad, &account(1)),
                Err(StoreError::InvalidAddress(_))
            ));
            assert!(matches!(
                store.remove_account(bad),
                Err(StoreError::InvalidAddress(_))
            ));
            assert!(matches!(
                store.snapshot(bad),
                Err(StoreError::InvalidAddress(_))
            ));
            assert!(matches!(
                store.begin_message(bad),
                Err(StoreError::InvalidAddress(_))
            ));
            assert!(matches!(
                store.maildrop_usage(bad),
                Err(StoreError::InvalidAddress(_))
            ));
        }
        assert_eq!(store.list_accounts().unwrap().len(), 3);
    }

    #[test]
    fn flush_all_covers_every_open_store() {
        let (_tmp, dir) = setup();
        dir.flush_all().unwrap();
        dir.add_domain("a.org").unwrap();
        dir.add_domain("b.org").unwrap();
        dir.flush_all().unwrap();
        assert_eq!(dir.open_count(), 2);
    }

    #[test]
    fn corrupt_account_records_are_reported() {
        let (_tmp, dir) = setup();
        dir.add_domain("a.org").unwrap();
        let store = dir.domain("a.org").unwrap();
        store.accounts.insert("u", b"{not json".as_slice()).unwrap();
        assert!(matches!(store.account("u"), Err(StoreError::Corrupt(m)) if m.contains("u@a.org")));
    }

    #[test]
    fn removing_an_account_removes_its_mail() {
        let (_tmp, dir) = setup();
        dir.add_domain("a.org").unwrap();
        let store = dir.domain("a.org").unwrap();
        store.create_account("u", &account(1)).unwrap();
        store.create_account("v", &account(1)).unwrap();
        let ids: Vec<u64> = (0..3)
            .map(|i| deliver(&store, "u", &pattern(CHUNK_SIZE + i, i)).id)
            .collect();
        let other = deliver(&store, "v", b"v's");
        store.remove_account("u").unwrap();
        assert!(store.account("u").unwrap().is_none());
        assert!(store.snapshot("u").unwrap().is_empty());
        for id in ids {
            assert!(read_all(&store, id).is_empty());
        }
        assert_eq!(body_chunks(&store), 1);
        assert!(store.trash.is_empty());
        assert_eq!(store.list_accounts().unwrap(), vec!["v"]);
        assert_eq!(read_all(&store, other.id), b"v's");
        store.create_account("u", &account(2)).unwrap();
        assert!(store.snapshot("u").unwrap().is_empty());
    }

    #[test]
    fn a_new_account_never_inherits_stale_mail() {
        let (_tmp, dir) = setup();
        dir.add_domain("a.org").unwrap();
        let store = dir.domain("a.org").unwrap();
        store.create_account("ghost", &account(1)).unwrap();
        let m = deliver(&store, "ghost", b"old");
        // A removal interrupted after the account record went but before the maildrop did.
        store.accounts.remove("ghost").unwrap();
        store.create_account("ghost", &account(2)).unwrap();
        assert!(store.snapshot("ghost").unwrap().is_empty());
        assert!(read_all(&store, m.id).is_empty());
        assert!(store.trash.is_empty());
    }

    /// A process killed while `remove_domain` deleted the files left the domain listed,
    /// half deleted, and it opened again empty. The files now go under a `.removing-`
    /// name first, which the next open deletes, and which a later removal replaces.
    #[test]
    fn a_removal_interrupted_while_deleting_files_is_finished_at_open() {
        let (tmp, dir) = setup();
        dir.add_domain("a.org").unwrap();
        dir.domain("a.org")
            .unwrap()
            .create_account("u", &account(1))
            .unwrap();
        dir.flush_all().unwrap();
        drop(dir);
        let doomed = tmp.path().join("domains/.removing-a.org");
        // What a kill between the rename and the end of the deletion leaves.
        std::fs::rename(tmp.path().join("domains/a.org"), &doomed).unwrap();
        std::fs::remove_file(doomed.join("db")).unwrap();
        let dir = Directory::open(tmp.path(), StoreOptions::default()).unwrap();
        assert!(!doomed.exists());
        assert!(dir.list_domains().unwrap().is_empty());
        assert!(matches!(
            dir.domain("a.org"),
            Err(StoreError::UnknownDomain(_))
        ));
        // A leftover under the name does not stop the next removal of the domain.
        dir.add_domain("a.org").unwrap();
        std::fs::create_dir(&doomed).unwrap();
        std::fs::write(doomed.join("db"), b"left over").unwrap();
        dir.remove_domain("a.org").unwrap();
        assert!(!doomed.exists());
        assert!(!tmp.path().join("domains/a.org").exists());
        assert!(dir.list_domains().unwrap().is_empty());
    }

    #[test]
    fn removing_a_domain_removes_its_directory() {
        let (tmp, dir) = setup();
        dir.add_domain("a.org").unwrap();
        dir.add_domain("b.org").unwrap();
        let store = dir.domain("a.org").unwrap();
        store.create_account("u", &account(1)).unwrap();
        let m = deliver(&store, "u", b"hello");
        // A session still holding the store keeps working on the unlinked files.
        dir.remove_domain("A.org").unwrap();
        assert!(!tmp.path().join("domains/a.org").exists());
        assert!(!dir.has_domain("a.org"));
        assert_eq!(dir.list_domains().unwrap(), vec!["b.org"]);
        assert_eq!(dir.open_count(), 1);
        assert!(matches!(
            dir.domain("a.org"),
            Err(StoreError::UnknownDomain(_))
        ));
        assert!(matches!(
            dir.remove_domain("a.org"),
            Err(StoreError::UnknownDomain(_))
        ));
        assert_eq!(read_all(&store, m.id), b"hello");
        // Added again, the domain starts empty, even with the old store still alive.
        dir.add_domain("a.org").unwrap();
        let fresh = dir.domain("a.org").unwrap();
        assert!(!Arc::ptr_eq(&store, &fresh));
        assert!(fresh.list_accounts().unwrap().is_empty());
        drop(store);
        dir.remove_domain("b.org").unwrap();
        assert_eq!(dir.list_domains().unwrap(), vec!["a.org"]);
    }

    #[test]
    fn data_survives_closing_the_directory() {
        let tmp = TempDir::new().unwrap();
        let data = pattern(2 * CHUNK_SIZE + 123, 9);
        let meta;
        {
            let dir = Directory::open(tmp.path(), opts(Duration::from_secs(3600))).unwrap();
            dir.add_domain("a.org").unwrap();
            dir.add_domain("b.org").unwrap();
            let store = dir.domain("a.org").unwrap();
            store.create_account("u", &account(1)).unwrap();
            store.update_account("u", &account(42)).unwrap();
            meta = deliver(&store, "u", &data);
            // No explicit flush: every acknowledged write has flushed already.
        }
        let dir = Directory::open(tmp.path(), opts(Duration::from_secs(3600))).unwrap();
        assert_eq!(dir.list_domains().unwrap(), vec!["a.org", "b.org"]);
        let store = dir.domain("a.org").unwrap();
        assert_eq!(store.account("u").unwrap().unwrap().uid_nonce, 42);
        assert_eq!(store.snapshot("u").unwrap(), vec![meta]);
        assert_eq!(read_all(&store, meta.id), data);
        assert_eq!(counts(&store), (1, 1, data.len() as u64));
    }

    #[test]
    fn seen_marks_are_kept_with_the_deletions_of_one_update() {
        let (_tmp, dir) = setup();
        dir.add_domain("a.org").unwrap();
        let store = dir.domain("a.org").unwrap();
        store.create_account("u", &account(1)).unwrap();
        let m: Vec<MessageMeta> = (0..4)
            .map(|i| deliver(&store, "u", &[b'x'; 10][..i + 1]))
            .collect();
        assert!(store.snapshot("u").unwrap().iter().all(|e| !e.seen));
        // Deleted and seen in one update: the deletion wins; unknown ids are ignored.
        store
            .update_maildrop("u", &[m[1].id], &[m[0].id, m[1].id, m[2].id, 999])
            .unwrap();
        let after = store.snapshot("u").unwrap();
        let seen: Vec<(u64, bool)> = after.iter().map(|e| (e.id, e.seen)).collect();
        assert_eq!(
            seen,
            vec![(m[0].id, true), (m[2].id, true), (m[3].id, false)]
        );
        // Marking again changes nothing; sizes and usage are untouched by the flags.
        store.update_maildrop("u", &[], &[m[0].id]).unwrap();
        assert_eq!(store.snapshot("u").unwrap(), after);
        assert_eq!(counts(&store), (1, 3, 1 + 3 + 4));
    }

    /// Writes what format 1 wrote: maildrop values of 8 bytes, no `meta` tree.
    fn write_format_1(path: &Path, messages: &[(u64, &[u8])]) {
        let db = sled::Config::new().path(path).open().unwrap();
        let accounts = db.open_tree("accounts").unwrap();
        accounts
            .insert("u", serde_json::to_vec(&account(0x0102_0304)).unwrap())
            .unwrap();
        let maildrop = db.open_tree("maildrop").unwrap();
        let bodies = db.open_tree("bodies").unwrap();
        for (id, body) in messages {
            maildrop
                .insert(maildrop_key("u", *id), &(body.len() as u64).to_be_bytes())
                .unwrap();
            bodies.insert(chunk_key(*id, 0), *body).unwrap();
        }
        db.flush().unwrap();
    }

    #[test]
    fn a_format_1_store_is_upgraded_once_and_keeps_every_message() {
        let tmp = TempDir::new().unwrap();
        let path = tmp.path().join("a.org");
        write_format_1(&path, &[(7, b"first\r\n"), (9, b"second\r\n")]);
        let store =
            DomainStore::open("a.org", &path, &StoreOptions::default(), Arc::default()).unwrap();
        assert_eq!(store.format().unwrap(), FORMAT_VERSION);
        let listed = store.snapshot("u").unwrap();
        let expected = [(7, 7), (9, 8)].map(|(id, octets)| MessageMeta {
            id,
            octets,
            seen: false,
        });
        assert_eq!(listed, expected);
        assert_eq!(read_all(&store, 9), b"second\r\n");
        assert_eq!(store.account("u").unwrap().unwrap().uid_nonce, 0x0102_0304);
        // Written in the new format, recorded, and not upgraded again.
        store.update_maildrop("u", &[], &[7]).unwrap();
        drop(store);
        let store =
            DomainStore::open("a.org", &path, &StoreOptions::default(), Arc::default()).unwrap();
        assert!(store.snapshot("u").unwrap()[0].seen);
        assert_eq!(
            store.meta.get(FORMAT_KEY).unwrap().as_deref(),
            Some(&FORMAT_VERSION.to_be_bytes()[..])
        );
    }

    #[test]
    fn an_interrupted_upgrade_runs_again_and_a_newer_format_is_refused() {
        let tmp = TempDir::new().unwrap();
        let path = tmp.path().join("a.org");
        write_format_1(&path, &[(1, b"one\r\n"), (2, b"two\r\n")]);
        {
            // Half-way: one value rewritten, the version not yet recorded.
            let db = sled::Config::new().path(&path).open().unwrap();
            let maildrop = db.open_tree("maildrop").unwrap();
            let entry = MaildropEntry {
                octets: 5,
                flags: 0,
            };
            maildrop
                .insert(maildrop_key("u", 1), &entry.encode())
                .unwrap();
            db.flush().unwrap();
        }
        let store =
            DomainStore::open("a.org", &path, &StoreOptions::default(), Arc::default()).unwrap();
        let sizes: Vec<u64> = store
            .snapshot("u")
            .unwrap()
            .iter()
            .map(|m| m.octets)
            .collect();
        assert_eq!(sizes, vec![5, 5]);
        store
            .meta
            .insert(FORMAT_KEY, &(FORMAT_VERSION + 1).to_be_bytes())
            .unwrap();
        drop(store);
        let refused = DomainStore::open("a.org", &path, &StoreOptions::default(), Arc::default());
        assert!(
            matches!(refused, Err(StoreError::Format { found, .. }) if found == FORMAT_VERSION + 1)
        );
    }

    #[test]
    fn a_new_store_starts_in_the_current_format() {
        let (_tmp, dir) = setup();
        dir.add_domain("a.org").unwrap();
        let store = dir.domain("a.org").unwrap();
        assert_eq!(
            store.meta.get(FORMAT_KEY).unwrap().as_deref(),
            Some(&FORMAT_VERSION.to_be_bytes()[..])
        );
    }

    #[test]
    fn the_epoch_is_recorded_beside_the_store() {
        let (tmp, dir) = setup();
        dir.add_domain("a.org").unwrap();
        assert_eq!(dir.epoch("a.org").unwrap(), 1, "a new domain starts at 1");
        dir.set_epoch("a.org", 7).unwrap();
        assert_eq!(dir.epoch("A.org").unwrap(), 7);
        assert!(matches!(
            dir.epoch("b.org"),
            Err(StoreError::UnknownDomain(_))
        ));
        assert!(dir.epoch("../a.org").is_err());
        std::fs::write(tmp.path().join("domains/a.org").join(EPOCH_FILE), "x").unwrap();
        assert!(matches!(dir.epoch("a.org"), Err(StoreError::Io { .. })));
        // Not a domain directory entry of its own.
        assert_eq!(dir.list_domains().unwrap(), vec!["a.org"]);
    }

    #[test]
    fn usage_is_kept_current_and_recorded_beside_the_store() {
        let tmp = TempDir::new().unwrap();
        let dir = Directory::open(tmp.path(), opts(Duration::ZERO)).unwrap();
        dir.add_domain("a.org").unwrap();
        assert_eq!(dir.recorded_usage("a.org"), None);
        {
            let store = dir.domain("a.org").unwrap();
            let empty = store.usage().unwrap();
            assert_eq!((empty.accounts, empty.messages, empty.octets), (0, 0, 0));
            store.create_account("u", &account(1)).unwrap();
            store.create_account("v", &account(2)).unwrap();
            let m = deliver(&store, "u", b"12345");
            deliver(&store, "v", b"123");
            // Kept current from the first count on, and equal to a fresh count.
            assert_eq!(store.usage().unwrap(), store.count_usage().unwrap());
            store.update_maildrop("u", &[m.id], &[]).unwrap();
            store.remove_account("v").unwrap();
            assert_eq!(store.usage().unwrap(), store.count_usage().unwrap());
            assert_eq!(counts(&store), (1, 0, 0));
            deliver(&store, "u", b"1234567");
            assert_eq!(store.usage().unwrap(), store.count_usage().unwrap());
        }
        // Closing records it; it is read back without opening the store.
        assert_eq!(dir.close_idle(), 1);
        let recorded = dir.recorded_usage("a.org").expect("recorded at close");
        assert_eq!(
            (recorded.accounts, recorded.messages, recorded.octets),
            (1, 1, 7)
        );
        assert!(dir.open_domains().is_empty());
        assert_eq!(dir.recorded_usage("../a.org"), None);
        // A damaged record is no record.
        std::fs::write(tmp.path().join("domains/a.org").join(USAGE_FILE), "{").unwrap();
        assert_eq!(dir.recorded_usage("a.org"), None);
    }

    #[test]
    fn a_sealed_store_refuses_every_change_until_unsealed() {
        let (_tmp, dir) = setup();
        dir.add_domain("a.org").unwrap();
        let store = dir.domain("a.org").unwrap();
        store.create_account("u", &account(1)).unwrap();
        let kept = deliver(&store, "u", b"kept\r\n");
        let mut in_data = store.begin_message("u").unwrap();
        in_data.write(&store, b"late\r\n").unwrap();
        dir.seal("a.org").unwrap();
        let sealed = |r: Result<(), StoreError>| assert!(matches!(r, Err(StoreError::Sealed(_))));
        sealed(in_data.commit(&store).map(drop));
        sealed(store.create_account("v", &account(2)));
        sealed(store.update_account("u", &account(3)));
        sealed(store.remove_account("u"));
        sealed(store.update_maildrop("u", &[kept.id], &[]));
        // The seal survives an idle close and reopen of the store.
        drop(store);
        dir.close_idle();
        let store = dir.domain("a.org").unwrap();
        sealed(store.update_maildrop("u", &[kept.id], &[]));
        assert_eq!(store.snapshot("u").unwrap(), vec![kept]);
        assert_eq!(body_chunks(&store), 1, "the refused delivery left no body");
        dir.unseal("a.org").unwrap();
        store.update_maildrop("u", &[kept.id], &[]).unwrap();
        assert!(store.snapshot("u").unwrap().is_empty());
    }

    fn import(store: &DomainStore, local: &str, uidl: &str, body: &[u8]) -> Option<MessageMeta> {
        let mut msg = store.begin_import(local, uidl).unwrap()?;
        msg.write(store, body).unwrap();
        Some(msg.commit(store).unwrap())
    }

    /// Imported messages keep their UIDLs, listed in import order among the computed
    /// ones of delivered mail; importing a UIDL again adds nothing, also once the message
    /// was deleted (its tombstone stays); removing the account forgets all of it.
    #[test]
    fn imported_messages_keep_their_uidls_and_are_never_duplicated() {
        let (tmp, dir) = setup();
        dir.add_domain("a.org").unwrap();
        let store = dir.domain("a.org").unwrap();
        store.create_account("u", &account(7)).unwrap();
        store.create_account("v", &account(8)).unwrap();
        let none = store.uidls("u", 7).unwrap();
        assert!(!none.has_stored());
        let first = import(&store, "u", "00000001507c2d5c", b"one\r\n").unwrap();
        let second = import(&store, "u", "00000002507c2d5c", b"two\r\n").unwrap();
        let delivered = deliver(&store, "u", b"new\r\n");
        assert!(first.id < second.id && second.id < delivered.id);
        assert_eq!(read_all(&store, second.id), b"two\r\n");
        // Again: nothing new, in the same account; another account may hold the UIDL.
        assert!(import(&store, "u", "00000001507c2d5c", b"one\r\n").is_none());
        assert!(import(&store, "v", "00000001507c2d5c", b"one\r\n").is_some());
        let uidls = store.uidls("u", 7).unwrap();
        let shown: Vec<String> = store
            .snapshot("u")
            .unwrap()
            .iter()
            .map(|m| uidls.get(m.id).into_owned())
            .collect();
        assert_eq!(
            shown,
            vec![
                "00000001507c2d5c".to_owned(),
                "00000002507c2d5c".to_owned(),
                crate::wire::uidl(7, delivered.id)
            ]
        );
        assert_eq!(store.usage().unwrap().messages, 4);
        // Deleted: the message and its listed UIDL go, a tombstone stays, and importing
        // the same mail again brings nothing back; the other account is unaffected.
        assert!(!store.uidl_deleted("u", "00000001507c2d5c").unwrap());
        store.update_maildrop("u", &[first.id], &[]).unwrap();
        assert_eq!(store.uidls("u", 7).unwrap().stored(first.id), None);
        assert!(store.uidl_deleted("u", "00000001507c2d5c").unwrap());
        assert!(!store.uidl_deleted("v", "00000001507c2d5c").unwrap());
        assert_eq!(store.tombstones("u").unwrap(), ["00000001507c2d5c"]);
        assert!(store.tombstones("v").unwrap().is_empty());
        assert!(import(&store, "u", "00000001507c2d5c", b"one\r\n").is_none());
        assert_eq!(store.snapshot("u").unwrap().len(), 2);
        // A copy's tombstones replace the account's; a held UIDL is never one.
        store
            .set_tombstones("u", &["t1".into(), "00000002507c2d5c".into()])
            .unwrap();
        assert_eq!(store.tombstones("u").unwrap(), ["t1"]);
        assert!(store.uidls("u", 7).unwrap().stored(second.id).is_some());
        assert!(matches!(
            store.set_tombstones("u", &["bad uidl".into()]),
            Err(StoreError::InvalidUidl(_))
        ));
        // Removing the account removes its UIDLs and tombstones; a new account of the
        // name has none and may import the same mail.
        store.remove_account("u").unwrap();
        assert!(store.tombstones("u").unwrap().is_empty());
        store.create_account("u", &account(9)).unwrap();
        assert!(!store.uidls("u", 9).unwrap().has_stored());
        assert!(import(&store, "u", "00000002507c2d5c", b"two\r\n").is_some());
        assert!(import(&store, "u", "t1", b"t1\r\n").is_some());
        // Tombstones under a name without an account (a removal a crash cut short) are
        // forgotten when an account of the name is created.
        store.set_tombstones("w", &["left".into()]).unwrap();
        store.create_account("w", &account(4)).unwrap();
        assert!(store.tombstones("w").unwrap().is_empty());
        // Kept across a close and reopen, in format 4.
        drop((store, dir));
        let dir = Directory::open(tmp.path(), opts(Duration::from_secs(3600))).unwrap();
        let store = dir.domain("a.org").unwrap();
        assert_eq!(store.format().unwrap(), 4);
        assert!(store.uidls("v", 8).unwrap().has_stored());
    }

    /// Hostile UIDLs are refused before anything is written; an import needs the
    /// account at commit like a delivery, ignores quotas, and a sealed domain refuses it.
    #[test]
    fn imports_refuse_bad_uidls_missing_accounts_and_sealed_domains() {
        let (_tmp, dir) = setup();
        dir.add_domain("a.org").unwrap();
        let store = dir.domain("a.org").unwrap();
        store.create_account("u", &account(1)).unwrap();
        let own = crate::wire::uidl(1, 1);
        for bad in [
            "",
            "x".repeat(71).as_str(),
            "a b",
            "tab\there",
            "ümlaut",
            "line\r\n",
            own.as_str(),
        ] {
            assert!(
                matches!(
                    store.begin_import("u", bad),
                    Err(StoreError::InvalidUidl(_))
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            store.begin_import("U", "ok"),
            Err(StoreError::InvalidAddress(_))
        ));
        let mut orphan = store.begin_import("nobody", "x1").unwrap().unwrap();
        orphan.write(&store, b"x\r\n").unwrap();
        assert!(matches!(
            orphan.commit(&store),
            Err(StoreError::UnknownAccount(_))
        ));
        assert!(store.uidls("nobody", 0).is_ok_and(|u| !u.has_stored()));
        // Two imports of one UIDL racing past begin_import: the second commit is refused.
        let mut a = store.begin_import("u", "race").unwrap().unwrap();
        let mut b = store.begin_import("u", "race").unwrap().unwrap();
        a.write(&store, b"a\r\n").unwrap();
        b.write(&store, b"b\r\n").unwrap();
        a.commit(&store).unwrap();
        assert!(matches!(
            b.commit(&store),
            Err(StoreError::UidlExists { .. })
        ));
        assert_eq!(store.snapshot("u").unwrap().len(), 1);
        assert_eq!(body_chunks(&store), 1, "the refused import left no body");
        // Sealed (a move): refused at begin and at commit.
        let mut open = store.begin_import("u", "late").unwrap().unwrap();
        open.write(&store, b"late\r\n").unwrap();
        dir.seal("a.org").unwrap();
        assert!(matches!(
            store.begin_import("u", "sealed"),
            Err(StoreError::Sealed(_))
        ));
        assert!(matches!(open.commit(&store), Err(StoreError::Sealed(_))));
        dir.unseal("a.org").unwrap();
        assert_eq!(
            store.snapshot("u").unwrap().len(),
            1,
            "the sealed import stayed out"
        );
        assert!(import(&store, "u", "late", b"late\r\n").is_some());
    }

    /// A format 3 store (no stored UIDLs) opens in format 4 without rewriting anything:
    /// every message, id and computed UIDL stays, and imports work on it.
    #[test]
    fn a_format_3_store_is_upgraded_without_loss() {
        let tmp = TempDir::new().unwrap();
        let path = tmp.path().join("a.org");
        {
            // As format 3 code wrote it: flags bytes, the version and an id base.
            let db = sled::Config::new().path(&path).open().unwrap();
            let accounts = db.open_tree("accounts").unwrap();
            accounts
                .insert("u", serde_json::to_vec(&account(0x0a0b_0c0d)).unwrap())
                .unwrap();
            let (maildrop, bodies) = (
                db.open_tree("maildrop").unwrap(),
                db.open_tree("bodies").unwrap(),
            );
            for (id, body, flags) in [(100u64, &b"one\r\n"[..], FLAG_SEEN), (101, b"two\r\n", 0)] {
                let entry = MaildropEntry {
                    octets: body.len() as u64,
                    flags,
                };
                maildrop
                    .insert(maildrop_key("u", id), &entry.encode())
                    .unwrap();
                bodies.insert(chunk_key(id, 0), body).unwrap();
            }
            let meta = db.open_tree("meta").unwrap();
            meta.insert(FORMAT_KEY, &3u32.to_be_bytes()).unwrap();
            meta.insert(ID_BASE_KEY, &200u64.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        let store =
            DomainStore::open("a.org", &path, &StoreOptions::default(), Arc::default()).unwrap();
        assert_eq!(store.format().unwrap(), FORMAT_VERSION);
        let snapshot = store.snapshot("u").unwrap();
        assert_eq!(
            snapshot,
            vec![
                MessageMeta {
                    id: 100,
                    octets: 5,
                    seen: true
                },
                MessageMeta {
                    id: 101,
                    octets: 5,
                    seen: false
                },
            ]
        );
        let uidls = store.uidls("u", 0x0a0b_0c0d).unwrap();
        assert!(!uidls.has_stored());
        assert_eq!(uidls.get(100), "0a0b0c0d0000000000000064");
        assert_eq!(read_all(&store, 101), b"two\r\n");
        let imported = import(&store, "u", "X-UIDL-1", b"imp\r\n").unwrap();
        assert!(imported.id >= 200, "above the carried id base");
        drop(store);
        // Older code refuses this store: it records a version above 3.
        let db = sled::Config::new().path(&path).open().unwrap();
        let version = db
            .open_tree("meta")
            .unwrap()
            .get(FORMAT_KEY)
            .unwrap()
            .unwrap();
        assert_eq!(version.as_ref(), 4u32.to_be_bytes());
    }

    /// Compaction copies stored UIDLs and checks them.
    #[test]
    fn compaction_keeps_stored_uidls() {
        let (_tmp, dir) = setup();
        dir.add_domain("a.org").unwrap();
        let store = dir.domain("a.org").unwrap();
        store.create_account("u", &account(3)).unwrap();
        let kept = import(&store, "u", "kept-uidl", b"kept\r\n").unwrap();
        let gone = import(&store, "u", "gone-uidl", b"gone\r\n").unwrap();
        deliver(&store, "u", b"own\r\n");
        store.update_maildrop("u", &[gone.id], &[]).unwrap();
        let before = store.uidls("u", 3).unwrap();
        drop(store);
        dir.compact("a.org").unwrap();
        let store = dir.domain("a.org").unwrap();
        assert_eq!(store.uidls("u", 3).unwrap(), before);
        assert_eq!(before.stored(kept.id), Some("kept-uidl"));
        assert!(import(&store, "u", "kept-uidl", b"kept\r\n").is_none());
        assert_eq!(store.tombstones("u").unwrap(), ["gone-uidl"]);
        assert!(import(&store, "u", "gone-uidl", b"gone\r\n").is_none());
    }

    #[test]
    fn a_copy_keeps_ids_and_new_mail_starts_above_the_carried_floor() {
        let (_tmp, dir) = setup();
        dir.add_domain("a.org").unwrap();
        let source = dir.domain("a.org").unwrap();
        source.create_account("u", &account(1)).unwrap();
        let metas: Vec<MessageMeta> = (0..3)
            .map(|i| deliver(&source, "u", &pattern(10, i)))
            .collect();
        source.update_maildrop("u", &[], &[metas[1].id]).unwrap();
        let floor = source.id_floor().unwrap();
        assert!(metas.iter().all(|m| m.id < floor));

        let staging = dir.open_staging("a.org").unwrap();
        staging.create_account("u", &account(1)).unwrap();
        for m in source.snapshot("u").unwrap() {
            let mut copy = staging.begin_copy("u", m.id).unwrap();
            copy.write(&staging, &read_all(&source, m.id)).unwrap();
            if m.seen {
                copy.mark_seen();
            }
            copy.commit(&staging).unwrap();
        }
        staging.raise_id_floor(floor).unwrap();
        assert_eq!(
            staging.snapshot("u").unwrap(),
            source.snapshot("u").unwrap()
        );
        // Installing needs the name free here.
        assert!(matches!(
            dir.install_staging("a.org", staging, 5),
            Err(StoreError::DomainExists(_))
        ));
        let retired = dir.retire_domain("a.org").unwrap();
        assert!(!dir.has_domain("a.org"));
        let listed = dir.retired().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].domain.as_str(), &listed[0].path),
            ("a.org", &retired)
        );
        // The staging copy was dropped by the failed install: receive it again.
        let staging = dir.open_staging("a.org").unwrap();
        staging.create_account("u", &account(1)).unwrap();
        for m in source.snapshot("u").unwrap() {
            let mut copy = staging.begin_copy("u", m.id).unwrap();
            copy.write(&staging, &read_all(&source, m.id)).unwrap();
            copy.commit(&staging).unwrap();
        }
        staging.raise_id_floor(floor).unwrap();
        dir.install_staging("a.org", staging, 5).unwrap();
        assert_eq!(dir.epoch("a.org").unwrap(), 5);
        assert_eq!(
            dir.list_domains().unwrap(),
            vec!["a.org"],
            "retired copies are not domains"
        );
        let moved = dir.domain("a.org").unwrap();
        for m in &metas {
            assert_eq!(read_all(&moved, m.id), read_all(&source, m.id));
        }
        // New mail, also after a reopen, never reuses an id of the copied lineage.
        let fresh = deliver(&moved, "u", b"new\r\n");
        assert!(fresh.id >= floor, "{} < {floor}", fresh.id);
        drop(moved);
        dir.close_idle();
        let moved = dir.domain("a.org").unwrap();
        assert!(deliver(&moved, "u", b"newer\r\n").id >= floor);
        dir.remove_retired(&listed[0]).unwrap();
        assert!(dir.retired().unwrap().is_empty());
    }

    #[test]
    fn an_incomplete_incoming_copy_is_removed_at_open() {
        let tmp = TempDir::new().unwrap();
        {
            let dir = Directory::open(tmp.path(), StoreOptions::default()).unwrap();
            let staging = dir.open_staging("a.org").unwrap();
            staging.create_account("u", &account(1)).unwrap();
            assert!(tmp.path().join("domains/.incoming-a.org").is_dir());
        }
        let dir = Directory::open(tmp.path(), StoreOptions::default()).unwrap();
        assert!(!tmp.path().join("domains/.incoming-a.org").exists());
        assert!(dir.list_domains().unwrap().is_empty());
    }

    #[test]
    fn compaction_keeps_every_message_and_id_and_gives_space_back() {
        let (tmp, dir) = setup();
        dir.add_domain("a.org").unwrap();
        dir.set_epoch("a.org", 4).unwrap();
        let store = dir.domain("a.org").unwrap();
        store.create_account("u", &account(1)).unwrap();
        store.create_account("v", &account(2)).unwrap();
        let big = pattern(3 * CHUNK_SIZE + 5, 1);
        let metas: Vec<MessageMeta> = (0..40)
            .map(|i| deliver(&store, "u", &pattern(200_000, i)))
            .collect();
        let kept = [
            deliver(&store, "u", &big),
            deliver(&store, "v", b"small\r\n"),
        ];
        let gone: Vec<u64> = metas.iter().map(|m| m.id).collect();
        store.update_maildrop("u", &gone, &[kept[0].id]).unwrap();
        let before_u = store.snapshot("u").unwrap();
        let floor = store.id_floor().unwrap();
        // A holder of the store makes it wait, unchanged and writable.
        assert!(matches!(dir.compact("a.org"), Err(StoreError::Sealed(_))));
        deliver(&store, "v", b"still writable\r\n");
        drop(store);

        let done = dir.compact("a.org").unwrap();
        assert!(done.after < done.before, "{done:?}");
        let store = dir.domain("a.org").unwrap();
        assert_eq!(store.snapshot("u").unwrap(), before_u);
        assert!(store.snapshot("u").unwrap()[0].seen);
        assert_eq!(read_all(&store, kept[0].id), big);
        assert_eq!(store.snapshot("v").unwrap().len(), 2);
        assert_eq!(store.account("v").unwrap().unwrap().uid_nonce, 2);
        assert_eq!(
            dir.epoch("a.org").unwrap(),
            4,
            "the epoch travels with the copy"
        );
        assert!(deliver(&store, "u", b"new\r\n").id >= floor);
        let names: Vec<String> = std::fs::read_dir(tmp.path().join("domains"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["a.org"], "nothing left beside the store");
    }

    #[test]
    fn an_interrupted_compaction_is_finished_at_open() {
        let tmp = TempDir::new().unwrap();
        let root = tmp.path().join("domains");
        {
            let dir = Directory::open(tmp.path(), StoreOptions::default()).unwrap();
            dir.add_domain("a.org").unwrap();
            dir.add_domain("b.org").unwrap();
        }
        // a.org stopped after its first rename (the copy not yet in place): the old
        // store takes its name back. b.org stopped after both: the copy stays.
        std::fs::rename(root.join("a.org"), root.join(".compact-old-a.org")).unwrap();
        std::fs::create_dir(root.join(".compact-old-b.org")).unwrap();
        let dir = Directory::open(tmp.path(), StoreOptions::default()).unwrap();
        assert_eq!(dir.list_domains().unwrap(), vec!["a.org", "b.org"]);
        assert!(!root.join(".compact-old-a.org").exists());
        assert!(!root.join(".compact-old-b.org").exists());
        dir.domain("a.org").unwrap();
    }
}
