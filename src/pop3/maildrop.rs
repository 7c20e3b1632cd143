//! The maildrop commands of the TRANSACTION state that need no message body: STAT,
//! LIST, UIDL, DELE, RSET, LAST and NOOP, as plain functions over the session's
//! [`Listing`] that return the `Reply`. No I/O, no store: the listing is the snapshot
//! taken at login, with this session's DELE and seen marks (written at UPDATE).

use super::codec::{MsgEntry, Reply};
use crate::wire::Uidls;
use std::borrow::Cow;

/// The maildrop as this session sees it: the messages listed at login, in order, with
/// their DELE marks and seen marks.
#[derive(Debug, Clone)]
pub struct Listing {
    pub msgs: Vec<MsgEntry>,
    /// The account's UIDLs: the nonce, and the stored UIDLs of imported messages (none,
    /// unallocated, for most accounts).
    pub uidls: Uidls,
    /// Per message: retrieved, in an earlier session or this one (for LAST).
    seen: Vec<bool>,
    /// The seen marks as they were at login, for RSET and to know what UPDATE adds.
    seen_at_login: Vec<bool>,
}

fn err(text: &'static str) -> Reply<'static> {
    Reply::Err(None, Cow::Borrowed(text))
}

impl Listing {
    /// The listing of `msgs`, each with whether it was seen before this session.
    pub fn new(msgs: Vec<(MsgEntry, bool)>, uidls: Uidls) -> Listing {
        let (msgs, seen): (Vec<MsgEntry>, Vec<bool>) = msgs.into_iter().unzip();
        Listing {
            msgs,
            uidls,
            seen_at_login: seen.clone(),
            seen,
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

    /// Marks message `n` seen: the client got all of it (RETR, or TOP of the whole).
    pub fn retrieved(&mut self, n: u32) {
        if let Some(seen) = (n as usize)
            .checked_sub(1)
            .and_then(|i| self.seen.get_mut(i))
        {
            *seen = true;
        }
    }

    /// Ids of the messages this session saw first and does not delete, for UPDATE.
    pub fn newly_seen(&self) -> Vec<u64> {
        self.msgs
            .iter()
            .zip(self.seen.iter().zip(&self.seen_at_login))
            .filter(|(m, (now, before))| !m.deleted && **now && !**before)
            .map(|(m, _)| m.id)
            .collect()
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
            uidls: &listing.uidls,
            msgs: &listing.msgs,
        },
        Some(n) => match listing.entry(n) {
            Ok(m) => Reply::Unique {
                msg: n,
                uidls: &listing.uidls,
                id: m.id,
            },
            Err(r) => r,
        },
    }
}

/// LAST: the highest number of a seen message not marked deleted; 0 when there is none.
pub fn last(listing: &Listing) -> Reply<'static> {
    let highest = listing
        .msgs
        .iter()
        .zip(&listing.seen)
        .rposition(|(m, seen)| *seen && !m.deleted)
        .map_or(0, |i| i + 1);
    Reply::Ok(Cow::Owned(highest.to_string()))
}

pub fn dele(listing: &mut Listing, n: u32) -> Reply<'static> {
    match listing.entry(n) {
        Ok(_) => {
            listing.msgs[n as usize - 1].deleted = true;
            Reply::Ok(Cow::Borrowed("Marked to be deleted"))
        }
        Err(r) => r,
    }
}

/// RSET: no DELE marks, and the seen marks as at login.
pub fn rset(listing: &mut Listing) -> Reply<'static> {
    for m in &mut listing.msgs {
        m.deleted = false;
    }
    listing.seen.clone_from(&listing.seen_at_login);
    let (count, octets) = listing.totals();
    Reply::Ok(Cow::Owned(format!("{count} messages ({octets} octets)")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn listing_seen(seen: [bool; 3]) -> Listing {
        let msgs = [(7, 100), (9, 250), (12, 40)]
            .into_iter()
            .zip(seen)
            .map(|((id, octets), seen)| {
                let entry = MsgEntry {
                    id,
                    octets,
                    deleted: false,
                };
                (entry, seen)
            })
            .collect();
        Listing::new(msgs, Uidls::new(0xabcd, vec![(12, "imported-12".into())]))
    }

    fn listing() -> Listing {
        listing_seen([false; 3])
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
        assert_eq!(text(uidl(&l, Some(3))), "+OK 3 imported-12\r\n");
        assert!(all.ends_with("3 imported-12\r\n.\r\n"), "{all}");
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
    fn last_is_the_highest_seen_message_not_deleted() {
        let mut l = listing();
        assert_eq!(text(last(&l)), "+OK 0\r\n");
        l.retrieved(2);
        assert_eq!(text(last(&l)), "+OK 2\r\n");
        // DELE is no retrieval; deleting the highest seen one lowers LAST.
        dele(&mut l, 3);
        assert_eq!(text(last(&l)), "+OK 2\r\n");
        l.retrieved(1);
        dele(&mut l, 2);
        assert_eq!(text(last(&l)), "+OK 1\r\n");
        // Numbers outside the listing are ignored.
        l.retrieved(0);
        l.retrieved(9);
        assert_eq!(l.newly_seen(), vec![7]);
        assert_eq!(l.marked(), vec![9, 12]);
        assert_eq!(text(noop()), "+OK\r\n");
    }

    #[test]
    fn marks_from_earlier_sessions_count_and_rset_returns_to_them() {
        let mut l = listing_seen([true, true, false]);
        assert_eq!(text(last(&l)), "+OK 2\r\n");
        assert!(
            l.newly_seen().is_empty(),
            "known marks are not written again"
        );
        l.retrieved(3);
        assert_eq!(text(last(&l)), "+OK 3\r\n");
        assert_eq!(l.newly_seen(), vec![12]);
        dele(&mut l, 1);
        assert_eq!(text(rset(&mut l)), "+OK 3 messages (390 octets)\r\n");
        assert_eq!(text(last(&l)), "+OK 2\r\n");
        assert!(l.marked().is_empty() && l.newly_seen().is_empty());
    }
}
