//! The header line of each message an import streams to the admin server
//! (`migrate::frame::parse_header`), parsed there from a CLI that may be broken or
//! hostile, and written by `frame::header`. Properties: no panics; a line parses exactly
//! when a plain reading of `<octets> <uidl>` says so (at most `MAX_HEADER_LINE` octets,
//! UTF-8, decimal digits that fit a `u64`, a space, a non-empty rest), to the number and
//! the rest after the first space; a parsed line without leading zeros is what `header`
//! writes for what it gave; `header` of any size and of any UIDL without a newline parses
//! back to them. The `have <uidl>` lines of messages the server knows are told apart
//! from headers and parse back to what `have` wrote.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailgate::migrate::frame::{
    have, header, parse_have, parse_header, FrameError, END, MAX_HEADER_LINE,
};

fn reference(line: &[u8]) -> Result<(u64, &str), FrameError> {
    if line.len() > MAX_HEADER_LINE {
        return Err(FrameError::TooLong);
    }
    let text = std::str::from_utf8(line).map_err(|_| FrameError::Malformed)?;
    let space = text.find(' ').ok_or(FrameError::Malformed)?;
    let (digits, uidl) = (&text[..space], &text[space + 1..]);
    if digits.is_empty() || uidl.is_empty() {
        return Err(FrameError::Malformed);
    }
    let mut size = 0u64;
    for b in digits.bytes() {
        if !b.is_ascii_digit() {
            return Err(FrameError::Malformed);
        }
        size = size
            .checked_mul(10)
            .and_then(|s| s.checked_add(u64::from(b - b'0')))
            .ok_or(FrameError::Malformed)?;
    }
    Ok((size, uidl))
}

fuzz_target!(|data: &[u8]| {
    let parsed = parse_header(data);
    assert_eq!(parsed, reference(data));
    // The other lines of the stream: a `have` line is exactly one starting `have `, it
    // is never a header line, and it writes back to itself; the end line is neither.
    match parse_have(data) {
        None => assert!(!data.starts_with(b"have ")),
        Some(Ok(uidl)) => {
            assert!(parsed.is_err() && data.len() <= MAX_HEADER_LINE);
            assert_eq!(have(uidl), [data, b"\n"].concat());
        }
        Some(Err(_)) => assert!(data.starts_with(b"have ")),
    }
    assert!(parse_have(END).is_none() && parse_header(END).is_err());
    if let Ok((size, uidl)) = parsed {
        if !data.starts_with(b"0") || data.starts_with(b"0 ") {
            assert_eq!(header(size, uidl), [data, b"\n"].concat());
        }
    }

    // Writing: the first eight octets are the size, the rest (as text) the UIDL.
    if data.len() < 8 {
        return;
    }
    let size = u64::from_le_bytes(data[..8].try_into().expect("eight octets"));
    let Ok(uidl) = std::str::from_utf8(&data[8..]) else {
        return;
    };
    if uidl.is_empty() || uidl.contains('\n') {
        return;
    }
    let line = header(size, uidl);
    let line = line.strip_suffix(b"\n").expect("a header line ends");
    if line.len() <= MAX_HEADER_LINE {
        assert_eq!(parse_header(line), Ok((size, uidl)));
    } else {
        assert_eq!(parse_header(line), Err(FrameError::TooLong));
    }
});
