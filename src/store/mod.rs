//! `Directory`: one sled database per hosted domain under `data_dir/domains/<domain>/`,
//! opened lazily and closed when idle. Holds accounts, maildrops and message bodies.
//! A `DomainStore` only ever sees its own domain; nothing here reaches across tenants.
//! All calls block (sled): async callers use `spawn_blocking`.

mod sled_store;

pub use sled_store::{
    Directory, DomainStore, PendingMessage, Retired, StoredUidl, DOMAINS_DIR, FORMAT_VERSION,
    USAGE_FILE,
};

pub use crate::wire::address::{validate_domain, validate_local, Address, AddressError};

use crate::wire::address::{ADDRESS_EXPECTED, DOMAIN_EXPECTED};

use crate::auth::Credentials;
use crate::config::StoreConfig;
use serde::{Deserialize, Serialize};

/// Bodies are stored in chunks of this size so RETR never loads a whole message.
pub const CHUNK_SIZE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid domain name {0:?}: {DOMAIN_EXPECTED}")]
    InvalidDomain(String),
    #[error("invalid address {0:?}: {ADDRESS_EXPECTED}")]
    InvalidAddress(String),
    #[error("unknown domain {0}")]
    UnknownDomain(String),
    #[error("domain {0} already exists")]
    DomainExists(String),
    /// The account's whole address, `local@domain`.
    #[error("unknown account {0}")]
    UnknownAccount(String),
    /// The account's whole address, `local@domain`.
    #[error("account {0} already exists")]
    AccountExists(String),
    #[error("cannot store this UIDL: {0}")]
    InvalidUidl(crate::wire::UidlError),
    /// Another message of the account has this stored UIDL (two imports of one message
    /// raced; the other one committed).
    #[error("account {account} already holds a message with UIDL {uidl}")]
    UidlExists { account: String, uidl: String },
    #[error("message {0} not found")]
    MessageNotFound(u64),
    #[error("storage error in {path}: {source}")]
    Sled { path: String, source: sled::Error },
    /// The file system holding the store has less free space than `store.min_free_bytes`:
    /// new mail and accounts wait (a temporary failure), deletions still run.
    #[error(
        "{path}: {available} bytes free, below the reserve of {reserve} (store.min_free_bytes)"
    )]
    Full {
        path: String,
        available: u64,
        reserve: u64,
    },
    /// The domain is being moved to another replica: no change until the move ends.
    #[error("domain {0} is being moved to another replica; try again shortly")]
    Sealed(String),
    #[error("corrupt record: {0}")]
    Corrupt(String),
    #[error("{path} is in store format {found}; this mailgate reads formats up to {supported} (upgrade mailgate)")]
    Format {
        path: String,
        found: u32,
        supported: u32,
    },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl From<AddressError> for StoreError {
    fn from(e: AddressError) -> Self {
        match e {
            AddressError::Domain(name) => StoreError::InvalidDomain(name),
            AddressError::Address(name) => StoreError::InvalidAddress(name),
        }
    }
}

/// Sizing of each open domain store.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// sled page cache per open domain, bytes.
    pub cache_capacity: u64,
    /// Close a domain store unused for this long.
    pub idle_close: std::time::Duration,
    /// Free space the file system must keep: below it new mail and accounts are refused
    /// while deletions run. 0 checks nothing.
    pub min_free_bytes: u64,
    /// Most domain stores open at once; the least recently used one not in use is closed
    /// when another opens past it.
    pub max_open: usize,
}

impl StoreOptions {
    /// The `[store]` section's sizing.
    pub fn from_config(store: &StoreConfig) -> StoreOptions {
        StoreOptions {
            cache_capacity: store.cache_capacity_mib * 1024 * 1024,
            idle_close: std::time::Duration::from_secs(store.idle_close_secs),
            min_free_bytes: store.min_free_bytes,
            max_open: store.max_open_stores,
        }
    }
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            cache_capacity: 8 * 1024 * 1024,
            idle_close: std::time::Duration::from_secs(300),
            min_free_bytes: 0,
            max_open: 1000,
        }
    }
}

/// An account record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Account {
    pub credentials: Credentials,
    /// Random per-account value that prefixes every UIDL, so UIDs are never reused even
    /// if the account is removed and created again.
    pub uid_nonce: u32,
    /// Maildrop size limit in octets overriding `delivery.account_quota_bytes`; `Some(0)`
    /// means unlimited. Absent in records written before quotas existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_bytes: Option<u64>,
}

impl Account {
    /// A new account record with a fresh random UID nonce.
    pub fn new(credentials: Credentials) -> Account {
        Account {
            credentials,
            uid_nonce: rand::random(),
            quota_bytes: None,
        }
    }
}

/// What a domain holds: the figures of the per-domain gauges and of domain quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub accounts: u64,
    pub messages: u64,
    /// Total message octets.
    pub octets: u64,
}

/// One message in a maildrop, as a session snapshot lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageMeta {
    /// Monotonic within the domain store; never reused.
    pub id: u64,
    pub octets: u64,
    /// Retrieved in an earlier session that ended in UPDATE (`pop3.last`).
    pub seen: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_accounts_get_varied_nonces() {
        let creds = || Credentials {
            phc: "x".into(),
            scram: None,
            apop_secret: None,
        };
        let nonces: std::collections::HashSet<u32> =
            (0..16).map(|_| Account::new(creds()).uid_nonce).collect();
        assert!(nonces.len() > 1);
    }
}
