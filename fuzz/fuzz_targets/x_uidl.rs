//! The `X-UIDL:` header of a message (`migrate::dovecot::find_x_uidl`) and the check of a
//! UIDL to store (`wire::validate_uidl`). The input is a message head, optionally followed
//! by a NUL and eight octets for a computed UIDL's nonce and id. Properties: no panics; a
//! found value is non-empty, trimmed, on one line and taken from the head before its first
//! empty line; LF and CRLF line ends find the same value, and nothing after the first empty
//! line changes it; `validate_uidl` accepts exactly what a plain reading of RFC 1939 §7
//! and mailgate's own form allow, naming a refused UIDL only when it has mailgate's form
//! (its messages stay short whatever the input); every computed UIDL is refused; an accepted UIDL goes
//! through the import frame header and back unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailgate::migrate::dovecot::find_x_uidl;
use mailgate::migrate::frame;
use mailgate::wire::uidl::{is_computed_form, COMPUTED_LEN, MAX_LEN};
use mailgate::wire::{uidl, validate_uidl, UidlError};

/// Every bare LF made CRLF.
fn crlf(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() * 2);
    for (i, &b) in text.iter().enumerate() {
        if b == b'\n' && (i == 0 || text[i - 1] != b'\r') {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

/// RFC 1939 §7 and mailgate's own form, read plainly.
fn reference(uidl: &str) -> Result<(), UidlError> {
    let bytes = uidl.as_bytes();
    if bytes.is_empty() {
        return Err(UidlError::Empty);
    }
    if let Some(at) = bytes.iter().position(|&b| !(b'!'..=b'~').contains(&b)) {
        return Err(UidlError::Character(at));
    }
    if bytes.len() > MAX_LEN {
        return Err(UidlError::TooLong(bytes.len()));
    }
    let hex = |b: &u8| b.is_ascii_digit() || (b'a'..=b'f').contains(b);
    if bytes.len() == COMPUTED_LEN && bytes.iter().all(hex) {
        return Err(UidlError::Form(uidl.to_owned()));
    }
    Ok(())
}

fn check_uidl(candidate: &str) {
    let checked = validate_uidl(candidate);
    assert_eq!(checked, reference(candidate));
    match checked {
        Ok(()) => {
            assert!(!is_computed_form(candidate));
            let header = frame::header(candidate.len() as u64, candidate);
            assert_eq!(header.iter().filter(|&&b| b == b'\n').count(), 1);
            assert!(header.len() <= frame::MAX_HEADER_LINE);
            let line = header.strip_suffix(b"\n").expect("a header line ends");
            assert_eq!(
                frame::parse_header(line),
                Ok((candidate.len() as u64, candidate))
            );
        }
        Err(e) => {
            // Only `Form` carries the UIDL (24 characters); the others only numbers.
            let message = e.to_string();
            assert!(message.len() < 120, "{message}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (head, numbers) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let found = find_x_uidl(head);
    if let Some(value) = &found {
        assert!(!value.is_empty());
        assert_eq!(value.trim(), value);
        assert!(!value.contains('\n'));
        let at = head
            .windows(value.len())
            .position(|w| w == value.as_bytes())
            .expect("the value is in the head");
        let before = &head[..at];
        assert!(!before.windows(2).any(|w| w == b"\n\n"));
        assert!(!before.windows(3).any(|w| w == b"\n\r\n"));
        assert!(!before.starts_with(b"\n") && !before.starts_with(b"\r\n"));
        check_uidl(value);
    }
    assert_eq!(find_x_uidl(&crlf(head)), found);
    let with_body = [head, b"\r\n\r\nX-UIDL: from-the-body\r\n", numbers].concat();
    assert_eq!(find_x_uidl(&with_body), found);

    if let Ok(text) = std::str::from_utf8(head) {
        check_uidl(text);
    }
    if numbers.len() >= 12 {
        let nonce = u32::from_le_bytes([numbers[0], numbers[1], numbers[2], numbers[3]]);
        let mut id = [0u8; 8];
        id.copy_from_slice(&numbers[4..12]);
        let own = uidl(nonce, u64::from_le_bytes(id));
        assert!(is_computed_form(&own));
        assert_eq!(validate_uidl(&own), Err(UidlError::Form(own.clone())));
    }
});
