//! The unique-id of a stored message, as POP3's UIDL shows it. Mailgate computes one for
//! the mail it receives: the account's nonce as 8 and the store id as 16 lower-case hex
//! digits. The nonce makes ids from a recreated maildrop differ from the old ones, so
//! clients do not mistake new mail for mail they already have; a domain move keeps both
//! parts, so it changes no UIDL (and checks that with this same module).
//!
//! A message imported from another server keeps the UIDL that server showed (a *stored*
//! UIDL): any RFC 1939 unique-id except one of mailgate's own form, so an imported UIDL can
//! never equal a computed one. [`Uidls`] is an account's UIDLs as a listing shows them:
//! the stored ones where present, else the computed one.

use std::borrow::Cow;
use std::fmt;

/// Length of a UIDL mailgate computes.
pub const COMPUTED_LEN: usize = 24;
/// Longest unique-id RFC 1939 §7 allows.
pub const MAX_LEN: usize = 70;

/// The UIDL of message `id` in a maildrop whose account has `nonce`.
pub fn uidl(nonce: u32, id: u64) -> String {
    let mut out = String::with_capacity(COMPUTED_LEN);
    // invariant: writing into a String cannot fail.
    let _ = write_uidl(&mut out, nonce, id);
    out
}

/// Writes the UIDL of message `id` in a maildrop whose account has `nonce`: the one
/// formatter of computed UIDLs, for listings written straight into a buffer.
pub fn write_uidl(out: &mut impl fmt::Write, nonce: u32, id: u64) -> fmt::Result {
    write!(out, "{nonce:08x}{id:016x}")
}

/// Why a string cannot be stored as a message's UIDL. The UIDL itself is named only
/// where it is printable (`Form`), and then at most its first 70 characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UidlError {
    #[error("empty UIDL")]
    Empty,
    #[error("UIDL of {0} characters (RFC 1939 allows at most {MAX_LEN})")]
    TooLong(usize),
    #[error("UIDL with a character outside 0x21..=0x7E (RFC 1939 §7) at position {0}")]
    Character(usize),
    /// Exactly 24 lower-case hex digits: a UIDL mailgate itself could compute, which an
    /// imported message must not take (it could equal a later message's UIDL).
    #[error("UIDL {0} has the form of mailgate's own UIDLs (24 lower-case hex digits)")]
    Form(String),
}

/// Whether `uidl` may be stored as a message's UIDL: 1 to 70 characters in
/// 0x21..=0x7E (RFC 1939 §7), and not of the form mailgate computes.
pub fn validate_uidl(uidl: &str) -> Result<(), UidlError> {
    if uidl.is_empty() {
        return Err(UidlError::Empty);
    }
    if let Some(at) = uidl.bytes().position(|b| !(0x21..=0x7e).contains(&b)) {
        return Err(UidlError::Character(at));
    }
    if uidl.len() > MAX_LEN {
        return Err(UidlError::TooLong(uidl.len()));
    }
    if is_computed_form(uidl) {
        return Err(UidlError::Form(uidl.to_owned()));
    }
    Ok(())
}

/// Whether `uidl` has the form of the UIDLs mailgate computes.
pub fn is_computed_form(uidl: &str) -> bool {
    uidl.len() == COMPUTED_LEN
        && uidl
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// An account's UIDLs as its listings show them: the stored UIDL of a message that has
/// one, else the one computed from the nonce. Most accounts store none, and then this
/// is the nonce and an empty (unallocated) list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Uidls {
    nonce: u32,
    /// `(message id, UIDL)`, sorted by id.
    stored: Box<[(u64, Box<str>)]>,
}

impl Uidls {
    /// The UIDLs of an account with `nonce` and these stored ones (any order; each one
    /// must pass `validate_uidl`, which the store checked when it took them).
    pub fn new(nonce: u32, mut stored: Vec<(u64, Box<str>)>) -> Uidls {
        stored.sort_unstable_by_key(|(id, _)| *id);
        Uidls {
            nonce,
            stored: stored.into_boxed_slice(),
        }
    }

    /// The account's nonce.
    pub fn nonce(&self) -> u32 {
        self.nonce
    }

    /// Whether any message has a stored UIDL.
    pub fn has_stored(&self) -> bool {
        !self.stored.is_empty()
    }

    /// Message `id`'s stored UIDL, if it has one.
    pub fn stored(&self, id: u64) -> Option<&str> {
        self.stored
            .binary_search_by_key(&id, |(i, _)| *i)
            .ok()
            .map(|at| &*self.stored[at].1)
    }

    /// Message `id`'s UIDL.
    pub fn get(&self, id: u64) -> Cow<'_, str> {
        match self.stored(id) {
            Some(stored) => Cow::Borrowed(stored),
            None => Cow::Owned(uidl(self.nonce, id)),
        }
    }

    /// Writes message `id`'s UIDL.
    pub fn write(&self, out: &mut impl fmt::Write, id: u64) -> fmt::Result {
        match self.stored(id) {
            Some(stored) => out.write_str(stored),
            None => write_uidl(out, self.nonce, id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_then_id_in_fixed_width_hex() {
        assert_eq!(uidl(0x0102_0304, 0xab), "0102030400000000000000ab");
        assert_eq!(uidl(u32::MAX, u64::MAX).len(), COMPUTED_LEN);
        assert!(is_computed_form(&uidl(0, 0)));
        assert!(is_computed_form(&uidl(u32::MAX, u64::MAX)));
    }

    #[test]
    fn stored_uidls_follow_rfc_1939() {
        for good in [
            "1",
            "000000010000000A",
            "00000001507c2d5c",
            "<abc@example.org>",
            "!~",
            "x".repeat(70).as_str(),
            // 24 hex digits, but upper case: Dovecot's %08X forms, never mailgate's.
            "0102030400000000000000AB",
            // 23 and 25 lower-case hex digits.
            "0102030400000000000000a",
            "0102030400000000000000abc",
        ] {
            assert_eq!(validate_uidl(good), Ok(()), "{good:?}");
        }
        assert_eq!(validate_uidl(""), Err(UidlError::Empty));
        assert_eq!(validate_uidl(&"x".repeat(71)), Err(UidlError::TooLong(71)));
        assert_eq!(validate_uidl("a b"), Err(UidlError::Character(1)));
        assert_eq!(validate_uidl("ab\r\n"), Err(UidlError::Character(2)));
        assert_eq!(validate_uidl("\0"), Err(UidlError::Character(0)));
        assert_eq!(validate_uidl("ä"), Err(UidlError::Character(0)));
        assert_eq!(validate_uidl("x\u{7f}"), Err(UidlError::Character(1)));
        // A long hostile string is reported by its position, not echoed.
        let hostile = format!("{}\n", "y".repeat(500));
        let e = validate_uidl(&hostile).unwrap_err();
        assert!(e.to_string().len() < 100, "{e}");
        let own = uidl(7, 9);
        assert_eq!(validate_uidl(&own), Err(UidlError::Form(own.clone())));
    }

    #[test]
    fn listings_show_stored_uidls_where_present_else_computed_ones() {
        let uidls = Uidls::new(0xabcd, vec![(9, "B".into()), (3, "A".into())]);
        assert!(uidls.has_stored());
        assert_eq!(uidls.get(3), "A");
        assert_eq!(uidls.get(9), "B");
        assert_eq!(uidls.get(5), uidl(0xabcd, 5));
        let mut out = String::new();
        uidls.write(&mut out, 9).unwrap();
        uidls.write(&mut out, 10).unwrap();
        assert_eq!(out, format!("B{}", uidl(0xabcd, 10)));
        let plain = Uidls::new(1, Vec::new());
        assert!(!plain.has_stored());
        assert_eq!(plain.get(2), uidl(1, 2));
    }
}
