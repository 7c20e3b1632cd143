//! The sled implementation of the store.

use super::{Account, Address, MessageMeta, StoreError, StoreOptions};
use std::path::Path;
use std::sync::Arc;

pub struct Directory {
    opts: StoreOptions,
}

pub struct DomainStore {
    name: String,
}

/// A message being written; invisible until `commit`.
pub struct PendingMessage {
    id: u64,
}

impl Directory {
    /// Opens (creating) `data_dir/domains/`.
    pub fn open(data_dir: &Path, opts: StoreOptions) -> Result<Directory, StoreError> {
        let _ = (data_dir, opts);
        todo!()
    }
    pub fn add_domain(&self, name: &str) -> Result<(), StoreError> {
        let _ = (name, &self.opts);
        todo!()
    }
    /// Removes a domain with all its accounts and mail.
    pub fn remove_domain(&self, name: &str) -> Result<(), StoreError> {
        let _ = name;
        todo!()
    }
    pub fn list_domains(&self) -> Result<Vec<String>, StoreError> {
        todo!()
    }
    pub fn has_domain(&self, name: &str) -> bool {
        let _ = name;
        todo!()
    }
    /// The (lazily opened) store of a hosted domain.
    pub fn domain(&self, name: &str) -> Result<Arc<DomainStore>, StoreError> {
        let _ = name;
        todo!()
    }
    /// Closes domain stores unused for longer than `idle_close`; returns how many.
    pub fn close_idle(&self) -> usize {
        todo!()
    }
    /// Number of domain stores open now.
    pub fn open_count(&self) -> usize {
        todo!()
    }
    /// Flushes every open store (shutdown).
    pub fn flush_all(&self) -> Result<(), StoreError> {
        todo!()
    }
}

impl DomainStore {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn account(&self, local: &str) -> Result<Option<Account>, StoreError> {
        let _ = local;
        todo!()
    }
    /// Creates an account; `AccountExists` if present. Flushed before returning.
    pub fn create_account(&self, local: &str, account: &Account) -> Result<(), StoreError> {
        let _ = (local, account);
        todo!()
    }
    /// Replaces an existing account's record (passwd); `UnknownAccount` if absent.
    pub fn update_account(&self, local: &str, account: &Account) -> Result<(), StoreError> {
        let _ = (local, account);
        todo!()
    }
    /// Removes an account and its whole maildrop.
    pub fn remove_account(&self, local: &str) -> Result<(), StoreError> {
        let _ = local;
        todo!()
    }
    pub fn list_accounts(&self) -> Result<Vec<String>, StoreError> {
        todo!()
    }
    /// The maildrop's messages in delivery order.
    pub fn snapshot(&self, local: &str) -> Result<Vec<MessageMeta>, StoreError> {
        let _ = local;
        todo!()
    }
    /// Reads up to `buf.len()` body bytes of message `id` from `offset`; 0 at the end.
    pub fn read_body(&self, id: u64, offset: u64, buf: &mut Vec<u8>) -> Result<usize, StoreError> {
        let _ = (id, offset, buf);
        todo!()
    }
    /// Starts a new message for `local`'s maildrop.
    pub fn begin_message(&self, local: &str) -> Result<PendingMessage, StoreError> {
        let _ = local;
        todo!()
    }
    /// Deletes messages of `local` in one atomic batch, then flushes.
    pub fn delete_messages(&self, local: &str, ids: &[u64]) -> Result<(), StoreError> {
        let _ = (local, ids);
        todo!()
    }
    /// Durably flushes everything written so far.
    pub fn flush(&self) -> Result<(), StoreError> {
        todo!()
    }
}

impl PendingMessage {
    /// Appends body bytes (already normalised); stored in `CHUNK_SIZE` pieces.
    pub fn write(&mut self, store: &DomainStore, data: &[u8]) -> Result<(), StoreError> {
        let _ = (store, data, self.id);
        todo!()
    }
    /// Makes the message visible in the maildrop and flushes; returns its metadata.
    pub fn commit(self, store: &DomainStore) -> Result<MessageMeta, StoreError> {
        let _ = store;
        todo!()
    }
}

#[allow(dead_code)]
fn _address_used(_: &Address) {}
