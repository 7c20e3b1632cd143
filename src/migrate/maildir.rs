//! Reads one account's Dovecot Maildir (its INBOX, what POP3 shows) where the CLI runs:
//! the messages in Dovecot's UID order with the UIDL Dovecot showed for each, and the
//! stream of them an `ImportAccount` request carries. The formats are parsed in
//! `migrate::dovecot`; this file only opens and reads files, never the whole Maildir at
//! once.

use super::dovecot::{
    find_x_uidl, parse_maildir_name, parse_uidlist, MaildirNameError, UidlFormat, UidlInputs,
    UidlistError,
};
use super::frame;
use crate::wire::{validate_uidl, UidlError};
use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest `dovecot-uidlist` read (about 100 octets a message: a million messages).
pub const MAX_UIDLIST: u64 = 128 * 1024 * 1024;
/// How much of a message is searched for an `X-UIDL:` header.
const XUIDL_WINDOW: u64 = 64 * 1024;

/// One message to import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mail {
    pub path: PathBuf,
    pub uidl: String,
    /// The file's size when scanned: exactly this many octets are sent.
    pub octets: u64,
}

/// Where a message's UIDL comes from, besides the uidlist's own `P` record (which always
/// wins, as in Dovecot).
#[derive(Debug, Clone, Copy)]
pub struct UidlSource<'a> {
    pub format: &'a UidlFormat,
    /// Dovecot's `pop3_reuse_xuidl`: an `X-UIDL:` header wins over the format.
    pub reuse_xuidl: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("no Maildir at {0} (neither cur/ nor new/ exists)")]
    NoMaildir(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: larger than {MAX_UIDLIST} octets")]
    UidlistTooLarge { path: PathBuf },
    #[error("{path}: {source}")]
    Uidlist { path: PathBuf, source: UidlistError },
    #[error("{0} holds messages but no dovecot-uidlist: Dovecot has not shown them over POP3 yet, so they have no UIDL to keep (log in once with Dovecot, or run `doveadm force-resync`)")]
    NoUidlist(PathBuf),
    #[error("{0}")]
    Name(#[from] MaildirNameError),
    #[error("{path}: file name says S={recorded} but the file has {actual} octets")]
    Size {
        path: PathBuf,
        recorded: u64,
        actual: u64,
    },
    #[error("{path}: UIDL {uidl:?} cannot be kept: {source}")]
    Uidl {
        path: PathBuf,
        uidl: String,
        source: UidlError,
    },
    #[error("{path}: UIDL {uidl} is shown for two messages")]
    DuplicateUidl { path: PathBuf, uidl: String },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ScanError + '_ {
    move |source| ScanError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A message file found in cur/ or new/.
struct Found {
    path: PathBuf,
    trashed: bool,
    size: Option<u64>,
}

/// The messages of the Maildir at `dir` that POP3 shows, in the order Dovecot's POP3
/// lists them (UID order, unless the uidlist records a POP3 order). Expunged mail
/// (in the uidlist, no file) and trashed mail (`T`) are left out; files Dovecot has not
/// listed yet follow in file name order with the UIDs Dovecot would give them next.
pub fn scan(dir: &Path, source: UidlSource<'_>) -> Result<Vec<Mail>, ScanError> {
    let mut found: BTreeMap<String, Found> = BTreeMap::new();
    let mut any_dir = false;
    for sub in ["cur", "new"] {
        let path = dir.join(sub);
        let entries = match std::fs::read_dir(&path) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(&path)(e)),
        };
        any_dir = true;
        for entry in entries {
            let entry = entry.map_err(io(&path))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                return Err(io(&entry.path())(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "file name is not UTF-8",
                )));
            };
            if name.starts_with('.') || !entry.file_type().map_err(io(&entry.path()))?.is_file() {
                continue;
            }
            let parsed = parse_maildir_name(name)?;
            found.insert(
                parsed.base.to_owned(),
                Found {
                    path: entry.path(),
                    trashed: parsed.trashed(),
                    size: parsed.size,
                },
            );
        }
    }
    if !any_dir {
        return Err(ScanError::NoMaildir(dir.to_owned()));
    }
    let uidlist_path = dir.join("dovecot-uidlist");
    let list = match std::fs::File::open(&uidlist_path) {
        Ok(file) => {
            let mut text = Vec::new();
            file.take(MAX_UIDLIST + 1)
                .read_to_end(&mut text)
                .map_err(io(&uidlist_path))?;
            if text.len() as u64 > MAX_UIDLIST {
                return Err(ScanError::UidlistTooLarge { path: uidlist_path });
            }
            parse_uidlist(&text).map_err(|source| ScanError::Uidlist {
                path: uidlist_path.clone(),
                source,
            })?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if found.is_empty() {
                return Ok(Vec::new());
            }
            return Err(ScanError::NoUidlist(dir.to_owned()));
        }
        Err(e) => return Err(io(&uidlist_path)(e)),
    };
    let mut ordered = Vec::new();
    for entry in &list.entries {
        if let Some(file) = found.remove(&entry.base) {
            ordered.push((
                entry.uid,
                entry.base.clone(),
                entry.pop3_uidl.clone(),
                entry.guid.clone(),
                file,
                entry.pop3_order,
            ));
        }
    }
    // BTreeMap order: by base name, which starts with the delivery time.
    for (i, (base, file)) in std::mem::take(&mut found).into_iter().enumerate() {
        let uid = list.next_uid.saturating_add(i as u32);
        ordered.push((uid, base, None, None, file, None));
    }
    // Dovecot's POP3 lists by the `O` records, stable, those without one last.
    ordered.sort_by_key(|m| m.5.unwrap_or(u64::from(u32::MAX)));
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (uid, base, pop3_uidl, guid, file, _) in ordered {
        if file.trashed {
            continue;
        }
        let meta = std::fs::metadata(&file.path).map_err(io(&file.path))?;
        if let Some(recorded) = file.size.filter(|s| *s != meta.len()) {
            return Err(ScanError::Size {
                path: file.path,
                recorded,
                actual: meta.len(),
            });
        }
        let uidl = match pop3_uidl {
            Some(u) => u,
            None => {
                let xuidl = if source.reuse_xuidl {
                    x_uidl_of(&file.path)?
                } else {
                    None
                };
                xuidl.unwrap_or_else(|| {
                    source.format.expand(&UidlInputs {
                        uid,
                        uid_validity: list.uid_validity,
                        filename: &base,
                        guid: guid.as_deref().unwrap_or(&base),
                    })
                })
            }
        };
        if let Err(e) = validate_uidl(&uidl) {
            return Err(ScanError::Uidl {
                path: file.path,
                uidl,
                source: e,
            });
        }
        if !seen.insert(uidl.clone()) {
            return Err(ScanError::DuplicateUidl {
                path: file.path,
                uidl,
            });
        }
        out.push(Mail {
            path: file.path,
            uidl,
            octets: meta.len(),
        });
    }
    Ok(out)
}

fn x_uidl_of(path: &Path) -> Result<Option<String>, ScanError> {
    let mut head = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(XUIDL_WINDOW).read_to_end(&mut head))
        .map_err(io(path))?;
    Ok(find_x_uidl(&head))
}

/// The body of an `ImportAccount` request: each message's header line, then its file,
/// opened only when its turn comes, except for the messages whose UIDL the server
/// `known`, each named by a `have` line instead; then (when `end`) the end line.
/// `progress` hears every read's octets and each finished message.
pub struct Frames<'a, P: FnMut(u64, bool)> {
    mails: std::slice::Iter<'a, Mail>,
    known: &'a HashSet<String>,
    /// The end line is still to come.
    end: bool,
    /// The header line still to send, then the open file with its octets left.
    header: std::io::Cursor<Vec<u8>>,
    current: Option<(std::io::Take<std::fs::File>, &'a Mail)>,
    progress: P,
}

impl<'a, P: FnMut(u64, bool)> Frames<'a, P> {
    pub fn new(mails: &'a [Mail], known: &'a HashSet<String>, end: bool, progress: P) -> Self {
        Frames {
            mails: mails.iter(),
            known,
            end,
            header: std::io::Cursor::new(Vec::new()),
            current: None,
            progress,
        }
    }
}

impl<P: FnMut(u64, bool)> Read for Frames<'_, P> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = self.header.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            if let Some((file, mail)) = &mut self.current {
                let n = file.read(buf)?;
                if n > 0 {
                    (self.progress)(n as u64, false);
                    return Ok(n);
                }
                if file.limit() > 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("{} shrank while it was imported", mail.path.display()),
                    ));
                }
                self.current = None;
                (self.progress)(0, true);
            }
            let Some(mail) = self.mails.next() else {
                if std::mem::take(&mut self.end) {
                    let mut line = frame::END.to_vec();
                    line.push(b'\n');
                    self.header = std::io::Cursor::new(line);
                    continue;
                }
                return Ok(0);
            };
            if self.known.contains(&mail.uidl) {
                self.header = std::io::Cursor::new(frame::have(&mail.uidl));
                continue;
            }
            let file = std::fs::File::open(&mail.path).map_err(|e| {
                std::io::Error::new(e.kind(), format!("{}: {e}", mail.path.display()))
            })?;
            self.header = std::io::Cursor::new(frame::header(mail.octets, &mail.uidl));
            self.current = Some((file.take(mail.octets), mail));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::dovecot::DEFAULT_UIDL_FORMAT;

    fn maildir(files: &[(&str, &[u8])], uidlist: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["cur", "new", "tmp"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        for (name, body) in files {
            std::fs::write(dir.path().join(name), body).unwrap();
        }
        if let Some(u) = uidlist {
            std::fs::write(dir.path().join("dovecot-uidlist"), u).unwrap();
        }
        dir
    }

    fn source(format: &UidlFormat, reuse_xuidl: bool) -> UidlSource<'_> {
        UidlSource {
            format,
            reuse_xuidl,
        }
    }

    #[test]
    fn messages_come_in_uid_order_without_trashed_or_expunged_ones() {
        let dir = maildir(
            &[
                ("cur/200.b.h,S=2:2,S", b"b\n"),
                ("cur/100.a.h:2,", b"a\n"),
                ("cur/300.c.h:2,ST", b"c\n"),
                ("new/400.d.h", b"X-UIDL: keep-me\n\nd\n"),
                ("new/050.e.h", b"e\n"),
                ("tmp/500.f.h", b"f\n"),
            ],
            Some("3 V1700000000 N8\n2 :200.b.h,S=2\n3 :100.a.h\n4 :300.c.h\n5 :gone.h\n6 P+OLD+ :400.d.h\n"),
        );
        let format = UidlFormat::parse(DEFAULT_UIDL_FORMAT).unwrap();
        let mails = scan(dir.path(), source(&format, false)).unwrap();
        let uidls: Vec<&str> = mails.iter().map(|m| m.uidl.as_str()).collect();
        assert_eq!(
            uidls,
            [
                "000000026553f100",
                "000000036553f100",
                "+OLD+",
                "000000086553f100"
            ]
        );
        assert_eq!(mails[0].octets, 2);
        let mut body = Vec::new();
        let mut messages = 0;
        let none = HashSet::new();
        Frames::new(&mails, &none, false, |_, done| {
            messages += usize::from(done)
        })
        .read_to_end(&mut body)
        .unwrap();
        assert_eq!(messages, 4);
        let frames = b"2 000000026553f100\nb\n2 000000036553f100\na\n19 +OLD+\nX-UIDL: keep-me\n\nd\n2 000000086553f100\ne\n";
        assert_eq!(body, frames);
        // A stream that must be known complete ends with the end line.
        let mut ended = Vec::new();
        Frames::new(&mails, &none, true, |_, _| {})
            .read_to_end(&mut ended)
            .unwrap();
        assert_eq!(ended, [&frames[..], b"end\n"].concat());
        // Messages the server knows are not read, only named.
        let known: HashSet<String> = ["000000036553f100".into(), "+OLD+".into()].into();
        let mut read = 0;
        let mut named = Vec::new();
        Frames::new(&mails, &known, true, |_, done| read += usize::from(done))
            .read_to_end(&mut named)
            .unwrap();
        assert_eq!(read, 2);
        assert_eq!(
            named,
            b"2 000000026553f100\nb\nhave 000000036553f100\nhave +OLD+\n2 000000086553f100\ne\nend\n"
        );
        // An empty Maildir's complete stream is the end line alone.
        let mut empty = Vec::new();
        Frames::new(&[], &none, true, |_, _| {})
            .read_to_end(&mut empty)
            .unwrap();
        assert_eq!(empty, b"end\n");
    }

    /// `O` records (mail Dovecot imported from elsewhere) set the POP3 order: by them,
    /// then the messages without one in UID order, then files not yet in the uidlist.
    #[test]
    fn pop3_order_records_set_the_listing_order() {
        let dir = maildir(
            &[
                ("cur/1.a.h", b"a\n"),
                ("cur/2.b.h", b"b\n"),
                ("cur/3.c.h", b"c\n"),
                ("cur/4.d.h", b"d\n"),
                ("new/5.e.h", b"e\n"),
            ],
            Some("3 V7 N5\n1 :1.a.h\n2 O2 P-b- :2.b.h\n3 :3.c.h\n4 O1 P-d- :4.d.h\n"),
        );
        let format = UidlFormat::parse("%u").unwrap();
        let mails = scan(dir.path(), source(&format, false)).unwrap();
        let uidls: Vec<&str> = mails.iter().map(|m| m.uidl.as_str()).collect();
        assert_eq!(uidls, ["-d-", "-b-", "1", "3", "5"]);
    }

    #[test]
    fn x_uidl_wins_over_the_format_when_reused() {
        let dir = maildir(
            &[("new/1.a.h", b"X-UIDL: abc\n\nx\n")],
            Some("3 V5 N2\n1 :1.a.h\n"),
        );
        let format = UidlFormat::parse("%u").unwrap();
        assert_eq!(
            scan(dir.path(), source(&format, true)).unwrap()[0].uidl,
            "abc"
        );
        assert_eq!(
            scan(dir.path(), source(&format, false)).unwrap()[0].uidl,
            "1"
        );
    }

    #[test]
    fn broken_maildirs_are_reported() {
        let format = UidlFormat::parse(DEFAULT_UIDL_FORMAT).unwrap();
        let s = source(&format, false);
        let missing = tempfile::tempdir().unwrap();
        assert!(matches!(
            scan(&missing.path().join("x"), s),
            Err(ScanError::NoMaildir(_))
        ));
        let empty = maildir(&[], None);
        assert_eq!(scan(empty.path(), s).unwrap(), Vec::new());
        let unindexed = maildir(&[("new/1.a.h", b"x")], None);
        assert!(matches!(
            scan(unindexed.path(), s),
            Err(ScanError::NoUidlist(_))
        ));
        let malformed = maildir(&[("new/1.a.h", b"x")], Some("3 V5 N2\n1 1.a.h\n"));
        assert!(matches!(
            scan(malformed.path(), s),
            Err(ScanError::Uidlist { .. })
        ));
        let size = maildir(&[("new/1.a.h,S=9", b"x")], Some("3 V5 N2\n1 :1.a.h,S=9\n"));
        assert!(matches!(
            scan(size.path(), s),
            Err(ScanError::Size {
                recorded: 9,
                actual: 1,
                ..
            })
        ));
        let dup = maildir(
            &[("new/1.a.h", b"x"), ("new/2.a.h", b"y")],
            Some("3 V5 N3\n1 Psame :1.a.h\n2 Psame :2.a.h\n"),
        );
        assert!(matches!(
            scan(dup.path(), s),
            Err(ScanError::DuplicateUidl { .. })
        ));
        let spaces = maildir(
            &[("new/1.a.h", b"X-UIDL: a b\n\n")],
            Some("3 V5 N2\n1 :1.a.h\n"),
        );
        assert!(matches!(
            scan(spaces.path(), source(&format, true)),
            Err(ScanError::Uidl { .. })
        ));
    }

    #[test]
    fn a_file_that_shrinks_fails_the_stream() {
        let dir = maildir(&[("new/1.a.h", b"hello")], Some("3 V5 N2\n1 :1.a.h\n"));
        let format = UidlFormat::parse(DEFAULT_UIDL_FORMAT).unwrap();
        let mails = scan(dir.path(), source(&format, false)).unwrap();
        std::fs::write(&mails[0].path, b"he").unwrap();
        let mut body = Vec::new();
        let err = Frames::new(&mails, &HashSet::new(), true, |_, _| {})
            .read_to_end(&mut body)
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
