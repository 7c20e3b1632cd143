//! What a client sends during POP3 AUTH (RFC 5034), as the session reads it: lines through
//! the framer, AUTH commands through the command parser, initial responses and
//! continuation lines through the SASL response decoder, and every decoded message through
//! the PLAIN and SCRAM parsers. No panics; `Debug` of an AUTH command never shows its
//! initial response; a decoded message is exactly what its line encodes (canonical base64,
//! `=` for empty), and only `*` cancels.
#![no_main]

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mailgate::auth::sasl::{decode_response, Response};
use mailgate::auth::{plain, scram};
use mailgate::pop3::codec::{Command, MAX_SASL_LINE};
use mailgate::wire::LineReader;

fn check_response(line: &[u8]) {
    match decode_response(line) {
        Response::Cancelled => assert_eq!(line, b"*"),
        Response::Message(message) => {
            if line != b"=" {
                assert_eq!(BASE64.encode(&message).as_bytes(), line);
            }
            let _ = plain::parse(&message);
            let _ = scram::ClientFirst::parse(&message);
        }
        Response::Invalid => assert!(line != b"*" && line != b"="),
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the read size, so chunk boundaries are fuzzed too.
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first).max(1);
    let mut reader = LineReader::new();
    let mut buf = BytesMut::new();
    for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        while let Some(line) = reader.next_line(&mut buf, MAX_SASL_LINE) {
            let Ok(line) = line else { continue };
            assert!(line.len() < MAX_SASL_LINE);
            match Command::parse(&line) {
                Ok(cmd @ Command::Auth { .. }) => {
                    let shown = format!("{cmd:?}");
                    let Command::Auth { mechanism, initial } = cmd else {
                        continue;
                    };
                    assert!(!mechanism.is_empty());
                    assert!(!mechanism.bytes().any(|b| b.is_ascii_lowercase()));
                    if let Some(initial) = initial {
                        if initial.len() > 16 {
                            assert!(!shown.contains(&initial), "{shown}");
                        }
                        // `=` arrives here as empty, which decodes to the empty message.
                        check_response(initial.as_bytes());
                    }
                }
                // Any other line is what a continuation may be.
                _ => check_response(&line),
            }
        }
        assert!(buf.len() < MAX_SASL_LINE);
    }
});
