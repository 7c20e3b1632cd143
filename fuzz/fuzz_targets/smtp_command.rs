//! Arbitrary bytes through the line framer, the SMTP/LMTP command parser and the state
//! machine, as a session would drive them: no panics, bounded buffers, and every reply
//! encodes to well-formed `NNN[ -]...CRLF` lines.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mailgate::delivery::Verdict;
use mailgate::smtp::codec::{parse, Reply, MAX_COMMAND_LINE};
use mailgate::smtp::core::{Core, CoreLimits, Protocol, Step};
use mailgate::wire::LineReader;

fn check(reply: &Reply) {
    let mut out = BytesMut::new();
    reply.write_to(&mut out);
    for line in out[..].split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        assert!(line.len() >= 5 && line.ends_with(b"\r"));
        assert!(line[..3].iter().all(u8::is_ascii_digit));
        assert!(line[3] == b' ' || line[3] == b'-');
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the read size and the dialect.
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first >> 1).max(1);
    let protocol = if first & 1 == 0 {
        Protocol::Smtp
    } else {
        Protocol::Lmtp
    };
    let limits = CoreLimits {
        max_message_bytes: 10_000,
        max_recipients: 5,
    };
    let mut core = Core::new(protocol, "mx.fuzz", limits, false);
    let mut reader = LineReader::new();
    let mut buf = BytesMut::new();
    for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        while let Some(line) = reader.next_line(&mut buf, MAX_COMMAND_LINE) {
            let Ok(line) = line else { continue };
            let step = match parse(&line, core.smtputf8()) {
                Ok(cmd) => core.command(cmd),
                Err(e) => Step::Reply(core.parse_error(&e, &line)),
            };
            match step {
                Step::Reply(r) | Step::Quit(r) => check(&r),
                Step::StartTls(r) => {
                    check(&r);
                    core.tls_started();
                }
                // Alternate verdicts so both branches of the envelope are explored.
                Step::CheckRecipient(to) => {
                    let v = if to.len() % 2 == 0 {
                        Verdict::Accepted
                    } else {
                        Verdict::UnknownUser
                    };
                    check(&core.recipient(v, to));
                }
                Step::Data => core.data_done(),
            }
        }
        assert!(buf.len() < MAX_COMMAND_LINE);
    }
});
