//! Arbitrary bytes through the POP3 line framer and command parser: no panics, the
//! read buffer stays below the line limit, and `Debug` never shows a password.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mailgate::pop3::codec::{Command, MAX_COMMAND_LINE};
use mailgate::wire::LineReader;

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
        while let Some(line) = reader.next_line(&mut buf, MAX_COMMAND_LINE) {
            let Ok(line) = line else { continue };
            assert!(line.len() < MAX_COMMAND_LINE);
            match Command::parse(&line) {
                Ok(cmd) => {
                    let shown = format!("{cmd:?}");
                    assert!(!cmd.verb().is_empty());
                    if let Command::Pass(password) = &cmd {
                        // Long enough not to match the `Pass(<redacted>)` text by chance.
                        if password.len() > 16 {
                            assert!(!shown.contains(password.as_str()));
                        }
                    }
                }
                Err(e) => assert!(!e.to_string().is_empty()),
            }
        }
        assert!(buf.len() < MAX_COMMAND_LINE);
    }
});
