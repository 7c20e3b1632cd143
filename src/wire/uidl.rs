//! The unique-id of a stored message, as POP3's UIDL shows it: the account's nonce as 8
//! and the store id as 16 lower-case hex digits. The nonce makes ids from a recreated
//! maildrop differ from the old ones, so clients do not mistake new mail for mail they
//! already have; a domain move keeps both parts, so it changes no UIDL (and checks that
//! with this same function).

/// The UIDL of message `id` in a maildrop whose account has `nonce`.
pub fn uidl(nonce: u32, id: u64) -> String {
    format!("{nonce:08x}{id:016x}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn nonce_then_id_in_fixed_width_hex() {
        assert_eq!(super::uidl(0x0102_0304, 0xab), "0102030400000000000000ab");
        assert_eq!(super::uidl(u32::MAX, u64::MAX).len(), 24);
    }
}
