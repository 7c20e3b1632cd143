//! A client's SASL response line (RFC 5034 §4) decoded: a cancel, a base64 message, or
//! junk. Pure: the session decides what to answer.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

/// What a SASL response line (or an AUTH initial response) carries.
#[derive(PartialEq, Eq)]
pub enum Response {
    /// `*`: the client cancelled the exchange.
    Cancelled,
    /// The decoded message; `=` stands for an empty one.
    Message(Vec<u8>),
    /// Not canonical, padded base64.
    Invalid,
}

/// Shows a message's length only: it may hold a password.
impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Response::Cancelled => f.write_str("Cancelled"),
            Response::Message(m) => write!(f, "Message({} octets)", m.len()),
            Response::Invalid => f.write_str("Invalid"),
        }
    }
}

/// Decodes one response line, CRLF already removed.
pub fn decode_response(line: &[u8]) -> Response {
    match line {
        b"*" => Response::Cancelled,
        b"=" => Response::Message(Vec::new()),
        _ => BASE64
            .decode(line)
            .map_or(Response::Invalid, Response::Message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_cancel_empty_and_base64() {
        let cases: [(&[u8], Response); 9] = [
            (b"*", Response::Cancelled),
            (b"=", Response::Message(Vec::new())),
            (b"", Response::Message(Vec::new())),
            (
                b"AHRpbQB0YW5zdGFhZnRhbnN0YWFm",
                Response::Message(b"\0tim\0tanstaaftanstaaf".to_vec()),
            ),
            (b"YQ==", Response::Message(b"a".to_vec())),
            (b"YQ", Response::Invalid),
            (b"YR==", Response::Invalid),
            (b"**", Response::Invalid),
            (b"YQ==\r", Response::Invalid),
        ];
        for (line, want) in cases {
            assert_eq!(decode_response(line), want, "{line:?}");
        }
    }

    #[test]
    fn debug_shows_no_message() {
        let shown = format!("{:?}", decode_response(b"AHRpbQB0YW5zdGFhZnRhbnN0YWFm"));
        assert_eq!(shown, "Message(21 octets)");
    }
}
