//! The maildrop commands of the TRANSACTION state that need no message body: STAT,
//! LIST, UIDL, DELE, RSET, LAST and NOOP, as plain functions over the session's
//! [`Listing`] that return the `Reply`. No I/O, no store: the listing is the snapshot
//! taken at login, with this session's DELE marks.

use super::codec::{MsgEntry, Reply};
use std::borrow::Cow;

/// The maildrop as this session sees it: the messages listed at login, in order, with
/// their DELE marks.
#[derive(Debug, Clone)]
pub struct Listing {
    pub msgs: Vec<MsgEntry>,
    /// The account's UIDL prefix.
    pub nonce: u32,
    /// Highest message number accessed, for LAST (RFC 1460).
    pub highest: u32,
}

fn err(text: &'static str) -> Reply<'static> {
    Reply::Err(None, Cow::Borrowed(text))
}

impl Listing {
    pub fn new(msgs: Vec<MsgEntry>, nonce: u32) -> Listing {
        Listing {
            msgs,
            nonce,
            highest: 0,
        }
    }

    /// Message `n` (1-based) if it exists and is not marked deleted; else the error reply.
    pub fn entry(&self, n: u32) -> Result<MsgEntry, Reply<'static>> {
        match (n as usize).checked_sub(1).and_then(|i| self.msgs.get(i)) {
            None => Err(err("No such message")),
            Some(m) if m.deleted => Err(err("Message is deleted")),
            Some(m) => Ok(*m),
        }
    }

    /// Count and octets of the messages not marked deleted.
    pub fn totals(&self) -> (usize, u64) {
        self.msgs
            .iter()
            .filter(|m| !m.deleted)
            .fold((0, 0), |(c, o), m| (c + 1, o + m.octets))
    }

    /// Ids of the messages marked deleted, for UPDATE.
    pub fn marked(&self) -> Vec<u64> {
        self.msgs
            .iter()
            .filter(|m| m.deleted)
            .map(|m| m.id)
            .collect()
    }

    /// Notes that message `n` was accessed (RETR, TOP, DELE).
    pub fn accessed(&mut self, n: u32) {
        self.highest = self.highest.max(n);
    }
}

pub fn noop() -> Reply<'static> {
    Reply::Ok(Cow::Borrowed(""))
}

pub fn stat(listing: &Listing) -> Reply<'static> {
    let (count, octets) = listing.totals();
    Reply::Stat { count, octets }
}

pub fn list(listing: &Listing, n: Option<u32>) -> Reply<'_> {
    match n {
        None => Reply::ScanListing(&listing.msgs),
        Some(n) => match listing.entry(n) {
            Ok(m) => Reply::Scan {
                msg: n,
                octets: m.octets,
            },
            Err(r) => r,
        },
    }
}

pub fn uidl(listing: &Listing, n: Option<u32>) -> Reply<'_> {
    match n {
        None => Reply::UniqueListing {
            nonce: listing.nonce,
            msgs: &listing.msgs,
        },
        Some(n) => match listing.entry(n) {
            Ok(m) => Reply::Unique {
                msg: n,
                nonce: listing.nonce,
                id: m.id,
            },
            Err(r) => r,
        },
    }
}

pub fn last(listing: &Listing) -> Reply<'static> {
    Reply::Ok(Cow::Owned(listing.highest.to_string()))
}

pub fn dele(listing: &mut Listing, n: u32) -> Reply<'static> {
    match listing.entry(n) {
        Ok(_) => {
            listing.msgs[n as usize - 1].deleted = true;
            listing.accessed(n);
            Reply::Ok(Cow::Borrowed("Marked to be deleted"))
        }
        Err(r) => r,
    }
}

pub fn rset(listing: &mut Listing) -> Reply<'static> {
    for m in &mut listing.msgs {
        m.deleted = false;
    }
    listing.highest = 0;
    let (count, octets) = listing.totals();
    Reply::Ok(Cow::Owned(format!("{count} messages ({octets} octets)")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn listing() -> Listing {
        let msgs = [(7, 100), (9, 250), (12, 40)]
            .into_iter()
            .map(|(id, octets)| MsgEntry {
                id,
                octets,
                deleted: false,
            })
            .collect();
        Listing::new(msgs, 0xabcd)
    }

    fn text(r: Reply<'_>) -> String {
        let mut out = BytesMut::new();
        r.write_to(&mut out);
        String::from_utf8(out.to_vec()).expect("utf8")
    }

    #[test]
    fn stat_list_and_uidl_count_only_unmarked_messages() {
        let mut l = listing();
        assert_eq!(text(stat(&l)), "+OK 3 390\r\n");
        assert_eq!(text(list(&l, Some(2))), "+OK 2 250\r\n");
        assert_eq!(text(dele(&mut l, 2)), "+OK Marked to be deleted\r\n");
        assert_eq!(text(stat(&l)), "+OK 2 140\r\n");
        assert_eq!(
            text(list(&l, None)),
            "+OK 2 messages (140 octets)\r\n1 100\r\n3 40\r\n.\r\n"
        );
        assert_eq!(text(list(&l, Some(2))), "-ERR Message is deleted\r\n");
        assert_eq!(text(uidl(&l, Some(2))), "-ERR Message is deleted\r\n");
        let all = text(uidl(&l, None));
        assert!(
            all.starts_with("+OK\r\n1 0000abcd0000000000000007\r\n3 "),
            "{all}"
        );
        assert_eq!(all.lines().count(), 4, "{all}");
        assert_eq!(
            text(uidl(&l, Some(3))),
            "+OK 3 0000abcd000000000000000c\r\n"
        );
        assert_eq!(l.marked(), vec![9]);
    }

    #[test]
    fn numbers_outside_the_listing_are_errors() {
        let mut l = listing();
        for n in [0, 4, u32::MAX] {
            assert_eq!(text(list(&l, Some(n))), "-ERR No such message\r\n");
            assert_eq!(text(uidl(&l, Some(n))), "-ERR No such message\r\n");
            assert_eq!(text(dele(&mut l, n)), "-ERR No such message\r\n");
        }
        assert_eq!(text(dele(&mut l, 1)), "+OK Marked to be deleted\r\n");
        assert_eq!(text(dele(&mut l, 1)), "-ERR Message is deleted\r\n");
        assert_eq!(l.marked(), vec![7]);
    }

    #[test]
    fn rset_unmarks_everything_and_last_follows_access() {
        let mut l = listing();
        assert_eq!(text(last(&l)), "+OK 0\r\n");
        l.accessed(2);
        assert_eq!(text(last(&l)), "+OK 2\r\n");
        dele(&mut l, 3);
        dele(&mut l, 1);
        assert_eq!(text(last(&l)), "+OK 3\r\n");
        assert_eq!(text(rset(&mut l)), "+OK 3 messages (390 octets)\r\n");
        assert_eq!(text(last(&l)), "+OK 0\r\n");
        assert!(l.marked().is_empty());
        assert_eq!(text(noop()), "+OK\r\n");
    }
}
