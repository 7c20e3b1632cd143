//! Importing mail from another server (today Dovecot). The CLI side reads the source
//! where it runs (`dovecot` parses its formats without I/O, `maildir` reads the files)
//! and streams each account's messages (`frame`) through the admin socket; the server
//! side, [`import_account`], stores them with their old UIDLs. Knows nothing of sockets
//! or the cluster: `admin` routes the request to the domain's home.

pub mod dovecot;
pub mod frame;
pub mod maildir;

use crate::auth::Credentials;
use crate::store::{Account, Address, Directory, StoreError};
use crate::wire::CrlfNormalizer;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Read};

/// What an import did to one account, sent back as the response's first line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Imported {
    /// The account did not exist and was created with the imported password hash.
    pub created: bool,
    /// Messages stored now.
    pub messages: u64,
    /// Messages skipped because the account already holds their UIDL (a rerun).
    pub existing: u64,
    /// Messages skipped because a message with their UIDL was imported before and
    /// deleted since (a rerun after users deleted mail): never brought back.
    #[serde(default)]
    pub deleted: u64,
    /// Octets stored now, as POP3 counts them (CRLF line ends).
    pub octets: u64,
    /// The maildrop is over its quota after the import.
    pub over_quota: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("message {index}: {source}")]
    Frame {
        index: u64,
        source: frame::FrameError,
    },
    #[error("reading message {index} from the importer: {source}")]
    Read { index: u64, source: std::io::Error },
    #[error("message {index} ended after {got} of {expected} octets")]
    Short { index: u64, got: u64, expected: u64 },
}

const CHUNK: usize = 64 * 1024;

/// Imports the messages streamed in `body` (`frame` format) into `address`'s maildrop,
/// creating the account with `credentials` when it does not exist (an existing account
/// keeps its password: it may have been upgraded or changed since the first run). Each
/// message is stored on its own, in stream order, with its UIDL; one whose UIDL the
/// account already holds, or held and deleted since, is read and skipped, so a rerun
/// completes an interrupted import without duplicates and without bringing back mail
/// the user deleted. Bare LF becomes CRLF as at delivery; no header is added;
/// quotas are not enforced but reported (`account_quota` is the configured default).
pub fn import_account(
    directory: &Directory,
    address: &Address,
    credentials: Credentials,
    account_quota: u64,
    body: impl Read,
) -> Result<Imported, ImportError> {
    let store = directory.domain(&address.domain)?;
    let mut imported = Imported::default();
    let account = match store.account(&address.local)? {
        Some(a) => a,
        None => {
            let account = Account::new(credentials);
            store.create_account(&address.local, &account)?;
            imported.created = true;
            account
        }
    };
    let mut body = std::io::BufReader::with_capacity(CHUNK, body);
    let mut line = Vec::new();
    let mut input = vec![0u8; CHUNK];
    let mut output = Vec::with_capacity(CHUNK + CHUNK / 8);
    for index in 1.. {
        line.clear();
        let read = (&mut body)
            .take(frame::MAX_HEADER_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|source| ImportError::Read { index, source })?;
        if read == 0 {
            break;
        }
        let text = line.strip_suffix(b"\n").ok_or(ImportError::Frame {
            index,
            source: frame::FrameError::TooLong,
        })?;
        let (size, uidl) =
            frame::parse_header(text).map_err(|source| ImportError::Frame { index, source })?;
        let mut message = body.by_ref().take(size);
        let mut pending = store.begin_import(&address.local, uidl)?;
        let mut normalizer = CrlfNormalizer::new();
        let mut got = 0u64;
        loop {
            let n = match message.read(&mut input) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(ImportError::Read { index, source }),
            };
            got += n as u64;
            if let Some(p) = pending.as_mut() {
                normalizer.push(&input[..n], &mut output);
                p.write(&store, &output)?;
                output.clear();
            }
        }
        if got != size {
            return Err(ImportError::Short {
                index,
                got,
                expected: size,
            });
        }
        match pending {
            Some(mut p) => {
                normalizer.finish(&mut output);
                p.write(&store, &output)?;
                output.clear();
                imported.octets += p.octets();
                p.commit(&store)?;
                imported.messages += 1;
            }
            None if store.uidl_deleted(&address.local, uidl)? => imported.deleted += 1,
            None => imported.existing += 1,
        }
    }
    let limit = account.quota_bytes.unwrap_or(account_quota);
    let (_, used) = store.maildrop_usage(&address.local)?;
    imported.over_quota = limit != 0 && used > limit;
    Ok(imported)
}
