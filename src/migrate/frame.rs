//! The body of an `ImportAccount` admin request: a sequence of messages, each a header
//! line `<octets> <uidl>\n` followed by exactly `octets` raw bytes, until the end of the
//! stream. A stream that must be known complete (one whose missing messages are deleted,
//! `mirror_deletions`) ends with the line `end\n`, which no header line can be. Pure:
//! encoding and parsing of the lines only.

/// Longest header line: a 20-digit size, a space, a UIDL (70 octets at most in POP3,
/// refused later when longer) and the newline, with room to report what was sent.
pub const MAX_HEADER_LINE: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("message header line longer than {MAX_HEADER_LINE} octets")]
    TooLong,
    #[error("malformed message header line: expected `<octets> <uidl>`")]
    Malformed,
    #[error("data after the end line")]
    AfterEnd,
}

/// The line (newline removed) that ends a complete stream.
pub const END: &[u8] = b"end";

/// The header line announcing one message.
pub fn header(octets: u64, uidl: &str) -> Vec<u8> {
    format!("{octets} {uidl}\n").into_bytes()
}

/// Parses a header line (its newline removed): the message's size and UIDL.
pub fn parse_header(line: &[u8]) -> Result<(u64, &str), FrameError> {
    if line.len() > MAX_HEADER_LINE {
        return Err(FrameError::TooLong);
    }
    let text = std::str::from_utf8(line).map_err(|_| FrameError::Malformed)?;
    let (size, uidl) = text.split_once(' ').ok_or(FrameError::Malformed)?;
    if size.is_empty() || !size.bytes().all(|b| b.is_ascii_digit()) || uidl.is_empty() {
        return Err(FrameError::Malformed);
    }
    let size = size.parse().map_err(|_| FrameError::Malformed)?;
    Ok((size, uidl))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let h = header(1234, "0000002a6560ab1f");
        assert_eq!(h, b"1234 0000002a6560ab1f\n");
        assert_eq!(
            parse_header(&h[..h.len() - 1]),
            Ok((1234, "0000002a6560ab1f"))
        );
    }

    #[test]
    fn hostile_headers_are_refused() {
        for bad in [
            &b""[..],
            b" x",
            b"12",
            b"12 ",
            b"-1 x",
            b"+1 x",
            b"1x x",
            b"99999999999999999999999 x",
            b"\xff x",
            END,
        ] {
            assert_eq!(parse_header(bad), Err(FrameError::Malformed), "{bad:?}");
        }
        assert_eq!(
            parse_header(&[b'1'; MAX_HEADER_LINE + 1]),
            Err(FrameError::TooLong)
        );
    }
}
