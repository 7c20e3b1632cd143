//! The body of an `ImportAccount` admin request: a sequence of messages, each a header
//! line `<octets> <uidl>\n` followed by exactly `octets` raw bytes, until the end of the
//! stream. A message the server said it knows (`ImportKnown`) is not sent again, only
//! named by a line `have <uidl>\n`. A stream that must be known complete (one whose
//! missing messages are deleted, `mirror_deletions`) ends with the line `end\n`. Neither
//! can be a header line (those start with a digit). Pure: encoding and parsing of the lines only.

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

const HAVE: &[u8] = b"have ";

/// The line naming a message of the source that the server already knows.
pub fn have(uidl: &str) -> Vec<u8> {
    [HAVE, uidl.as_bytes(), b"\n"].concat()
}

/// The UIDL of a `have` line (its newline removed); `None` for any other line.
pub fn parse_have(line: &[u8]) -> Option<Result<&str, FrameError>> {
    let uidl = line.strip_prefix(HAVE)?;
    Some(match std::str::from_utf8(uidl) {
        _ if line.len() > MAX_HEADER_LINE => Err(FrameError::TooLong),
        Ok(uidl) if !uidl.is_empty() => Ok(uidl),
        _ => Err(FrameError::Malformed),
    })
}

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
    fn have_lines_round_trip_and_are_never_headers() {
        let line = have("0000002a6560ab1f");
        assert_eq!(line, b"have 0000002a6560ab1f\n");
        let line = &line[..line.len() - 1];
        assert_eq!(parse_have(line), Some(Ok("0000002a6560ab1f")));
        assert_eq!(parse_header(line), Err(FrameError::Malformed));
        assert_eq!(parse_have(b"12 x"), None);
        assert_eq!(parse_have(END), None);
        assert_eq!(parse_have(b"have "), Some(Err(FrameError::Malformed)));
        assert_eq!(parse_have(b"have \xff"), Some(Err(FrameError::Malformed)));
        let long = [HAVE, &[b'x'; MAX_HEADER_LINE][..]].concat();
        assert_eq!(parse_have(&long), Some(Err(FrameError::TooLong)));
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
