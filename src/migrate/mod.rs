//! Importing mail from another server (today Dovecot). The CLI side reads the source
//! where it runs (`dovecot` parses its formats without I/O, `maildir` reads the files)
//! and streams each account's messages (`frame`) through the admin socket; the server
//! side, [`import_account`], stores them with their old UIDLs. Knows nothing of sockets
//! or the cluster: `admin` routes the request to the domain's home.

pub mod dovecot;
pub mod frame;
pub mod maildir;

use crate::auth::Credentials;
use crate::store::{Account, Address, Directory, StoreError, StoredUidl};
use crate::wire::CrlfNormalizer;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::io::{BufRead, Read};

/// What [`import_account`] did, and what the stream said of the source.
#[derive(Debug, Default)]
pub struct Streamed {
    pub imported: Imported,
    /// Every UIDL the stream listed (when asked to): the source's mail as it is now.
    pub uidls: HashSet<Box<str>>,
    /// The stream ended with its end line ([`frame::END`]): `uidls` is the whole source.
    pub complete: bool,
}

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
    /// Imported messages deleted now because the source no longer has them (a rerun
    /// with `mirror_deletions` after users deleted mail on the old server).
    #[serde(default)]
    pub mirrored: u64,
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
    #[error("more than {MAX_SOURCE_UIDLS} messages in one account")]
    TooMany,
    #[error("message {index} was named as one the account has, and it has not (the account changed during the import)")]
    Unknown { index: u64 },
}

const CHUNK: usize = 64 * 1024;

impl Streamed {
    /// Adds a UIDL of the source, within the bound.
    fn list(&mut self, uidl: &str) -> Result<(), ImportError> {
        if self.uidls.len() >= MAX_SOURCE_UIDLS {
            return Err(ImportError::TooMany);
        }
        self.uidls.insert(Box::from(uidl));
        Ok(())
    }
}

/// Imports the messages streamed in `body` (`frame` format) into `address`'s maildrop,
/// creating the account with `credentials` when it does not exist (an existing account
/// keeps its password: it may have been upgraded or changed since the first run). Each
/// message is stored on its own, in stream order, with its UIDL; one whose UIDL the
/// account already holds, or held and deleted since, is read and skipped, so a rerun
/// completes an interrupted import without duplicates and without bringing back mail
/// the user deleted; a `have` line counts such a message without its bytes (one the
/// account does not know fails the stream). Bare LF becomes CRLF as at delivery; no
/// header is added;
/// quotas are not enforced but reported (`account_quota` is the configured default).
/// With `list_source`, also returns the UIDLs the stream listed, for
/// [`mirror_deletions`].
pub fn import_account(
    directory: &Directory,
    address: &Address,
    credentials: Credentials,
    account_quota: u64,
    body: impl Read,
    list_source: bool,
) -> Result<Streamed, ImportError> {
    let store = directory.domain(&address.domain)?;
    let mut streamed = Streamed::default();
    let account = match store.account(&address.local)? {
        Some(a) => a,
        None => {
            let account = Account::new(credentials);
            store.create_account(&address.local, &account)?;
            streamed.imported.created = true;
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
        if let Some(uidl) = frame::parse_have(text) {
            let uidl = uidl.map_err(|source| ImportError::Frame { index, source })?;
            match store.stored_uidl(&address.local, uidl)? {
                StoredUidl::Held => streamed.imported.existing += 1,
                StoredUidl::Deleted => streamed.imported.deleted += 1,
                StoredUidl::Unknown => return Err(ImportError::Unknown { index }),
            }
            if list_source {
                streamed.list(uidl)?;
            }
            continue;
        }
        if text == frame::END {
            let after = body
                .fill_buf()
                .map_err(|source| ImportError::Read { index, source })?;
            if !after.is_empty() {
                return Err(ImportError::Frame {
                    index,
                    source: frame::FrameError::AfterEnd,
                });
            }
            streamed.complete = true;
            break;
        }
        let (size, uidl) =
            frame::parse_header(text).map_err(|source| ImportError::Frame { index, source })?;
        if list_source {
            streamed.list(uidl)?;
        }
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
                streamed.imported.octets += p.octets();
                p.commit(&store)?;
                streamed.imported.messages += 1;
            }
            None if store.uidl_deleted(&address.local, uidl)? => streamed.imported.deleted += 1,
            None => streamed.imported.existing += 1,
        }
    }
    let limit = account.quota_bytes.unwrap_or(account_quota);
    let (_, used) = store.maildrop_usage(&address.local)?;
    streamed.imported.over_quota = limit != 0 && used > limit;
    Ok(streamed)
}

/// Most messages one account's import may list when deletions are mirrored (their UIDLs
/// are kept until the stream ends, ~60 MiB at most): far above any real POP3 maildrop.
pub const MAX_SOURCE_UIDLS: usize = 1_000_000;

/// Deletes `address`'s imported messages whose UIDLs `source` (a complete stream's
/// list) no longer has: the user deleted them on the old server since an earlier import.
/// They are deleted as a POP3 QUIT would (their UIDLs stay as tombstones); mail without
/// a stored UIDL (delivered here) is never touched. The caller holds the maildrop lock.
/// Returns how many were deleted.
pub fn mirror_deletions(
    directory: &Directory,
    address: &Address,
    source: &HashSet<Box<str>>,
) -> Result<u64, StoreError> {
    let store = directory.domain(&address.domain)?;
    let gone: Vec<u64> = store
        .stored_uidls(&address.local)?
        .into_iter()
        .filter(|(_, uidl)| !source.contains(uidl))
        .map(|(id, _)| id)
        .collect();
    if !gone.is_empty() {
        store.update_maildrop(&address.local, &gone, &[])?;
    }
    Ok(gone.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{make_credentials, HashParams};

    fn setup() -> (tempfile::TempDir, Directory, Address) {
        let dir = tempfile::tempdir().unwrap();
        let directory = Directory::open(dir.path(), Default::default()).unwrap();
        directory.add_domain("a.org").unwrap();
        (dir, directory, Address::parse("u@a.org").unwrap())
    }

    fn stream(messages: &[(&str, &str)], end: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for (uidl, body) in messages {
            out.extend(frame::header(body.len() as u64, uidl));
            out.extend(body.as_bytes());
        }
        if end {
            out.extend(frame::END);
            out.push(b'\n');
        }
        out
    }

    fn run(
        directory: &Directory,
        address: &Address,
        body: &[u8],
        list: bool,
    ) -> Result<Streamed, ImportError> {
        let credentials = make_credentials("pw", &HashParams::cheap()).unwrap();
        import_account(directory, address, credentials, 0, body, list)
    }

    fn listed(directory: &Directory, address: &Address) -> Vec<String> {
        let store = directory.domain(&address.domain).unwrap();
        let uidls = store.uidls(&address.local, 1).unwrap();
        store
            .snapshot(&address.local)
            .unwrap()
            .iter()
            .map(|m| uidls.get(m.id).into_owned())
            .collect()
    }

    /// A complete stream lists the source; mirroring deletes the imported mail it no
    /// longer has (leaving tombstones), never mail delivered here, and a second mirror
    /// of the same source deletes nothing.
    #[test]
    fn mirroring_deletes_only_imported_mail_the_source_dropped() {
        let (_tmp, directory, address) = setup();
        let first = stream(
            &[("a1", "one\r\n"), ("a2", "two\r\n"), ("a3", "three\r\n")],
            false,
        );
        let streamed = run(&directory, &address, &first, false).unwrap();
        assert_eq!(streamed.imported.messages, 3);
        assert!(!streamed.complete && streamed.uidls.is_empty());
        let store = directory.domain("a.org").unwrap();
        let mut own = store.begin_message("u").unwrap();
        own.write(&store, b"delivered here\r\n").unwrap();
        own.commit(&store).unwrap();
        // a2 was deleted on the old server; a4 arrived there.
        let second = stream(
            &[("a1", "one\r\n"), ("a3", "three\r\n"), ("a4", "four\r\n")],
            true,
        );
        let streamed = run(&directory, &address, &second, true).unwrap();
        assert!(streamed.complete);
        assert_eq!(streamed.imported.messages, 1);
        assert_eq!(streamed.imported.existing, 2);
        assert_eq!(streamed.uidls.len(), 3);
        assert_eq!(
            mirror_deletions(&directory, &address, &streamed.uidls).unwrap(),
            1
        );
        let now = listed(&directory, &address);
        assert_eq!(now.len(), 4, "{now:?}");
        assert_eq!(&now[..2], ["a1", "a3"]);
        assert_eq!(now[3], "a4");
        assert_eq!(store.tombstones("u").unwrap(), ["a2"]);
        assert_eq!(
            mirror_deletions(&directory, &address, &streamed.uidls).unwrap(),
            0
        );
        // An empty complete source: every imported message goes, the delivered one stays.
        let streamed = run(&directory, &address, &stream(&[], true), true).unwrap();
        assert!(streamed.complete && streamed.uidls.is_empty());
        assert_eq!(
            mirror_deletions(&directory, &address, &streamed.uidls).unwrap(),
            3
        );
        assert_eq!(listed(&directory, &address).len(), 1);
    }

    /// `have` lines name messages the account knows without sending them: counted as
    /// there or deleted since, listed as part of the source (so the mirror keeps them),
    /// and refused when the account does not know them.
    #[test]
    fn have_lines_count_known_mail_and_keep_it_from_the_mirror() {
        let (_tmp, directory, address) = setup();
        let first = stream(
            &[("a1", "one\r\n"), ("a2", "two\r\n"), ("a3", "three\r\n")],
            false,
        );
        run(&directory, &address, &first, false).unwrap();
        let store = directory.domain("a.org").unwrap();
        let a2 = store.snapshot("u").unwrap()[1].id;
        store.update_maildrop("u", &[a2], &[]).unwrap();
        let mut known = store.known_uidls("u").unwrap();
        known.sort_unstable();
        assert_eq!(known, ["a1", "a2", "a3"]);
        let mut second = Vec::new();
        second.extend(frame::have("a1"));
        second.extend(frame::have("a2"));
        second.extend(stream(&[("a4", "four\r\n")], true));
        let streamed = run(&directory, &address, &second, true).unwrap();
        let i = &streamed.imported;
        assert_eq!((i.messages, i.existing, i.deleted), (1, 1, 1));
        assert!(streamed.complete);
        assert_eq!(
            mirror_deletions(&directory, &address, &streamed.uidls).unwrap(),
            1
        );
        assert_eq!(listed(&directory, &address), ["a1", "a4"]);
        let mut bad = frame::have("never-imported");
        bad.extend(frame::END);
        bad.push(b'\n');
        match run(&directory, &address, &bad, true) {
            Err(ImportError::Unknown { index: 1 }) => {}
            other => panic!("{other:?}"),
        }
        match run(&directory, &address, b"have \n", true) {
            Err(ImportError::Frame { index: 1, .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    /// A stream cut before its end line is not complete, and bytes after the end line
    /// fail the stream.
    #[test]
    fn only_a_stream_with_its_end_line_alone_at_the_end_is_complete() {
        let (_tmp, directory, address) = setup();
        let cut = stream(&[("a1", "one\r\n")], false);
        assert!(!run(&directory, &address, &cut, true).unwrap().complete);
        let mut trailing = stream(&[("a2", "two\r\n")], true);
        trailing.extend(frame::header(5, "a3"));
        trailing.extend(b"three");
        match run(&directory, &address, &trailing, true) {
            Err(ImportError::Frame {
                source: frame::FrameError::AfterEnd,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
    }
}
