//! Dot-unstuffing of a message body received after DATA (RFC 5321 §4.5.2), strict
//! about line ends so that no smuggled terminator ends a message early.
//! Pure: std and `bytes` only.

use bytes::{BufMut, BytesMut};

/// Progress of one `DotUnstuffer::decode` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unstuffed {
    /// Input bytes used; after the terminator, the rest of the input is not the body's
    /// (a pipelined next command, for instance).
    pub consumed: usize,
    /// The terminating CRLF `.` CRLF has been read.
    pub done: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UnstuffState {
    /// After CRLF, or at the very beginning.
    LineStart,
    /// A `.` at line start, withheld: stuffing, or the start of the terminator.
    Dot,
    /// `.` CR at line start, withheld: only LF makes it the terminator.
    DotCr,
    /// Inside a line; the last byte was not CR.
    Mid,
    /// Inside a line; the last byte was CR.
    MidCr,
    /// The terminator has been read.
    Done,
}

/// Streaming inverse of dot-stuffing: removes the extra `.` at line starts and stops at
/// the terminator, across arbitrary chunk boundaries.
///
/// Strict on purpose (SMTP smuggling): a line starts only after CRLF, and the
/// terminator is exactly CRLF `.` CRLF. `\n.\n`, `\r.\r`, `\n.\r\n` and `\r\n.\n` end
/// nothing; such bytes are passed through (a `.` at a real line start is still removed).
#[derive(Debug)]
pub struct DotUnstuffer {
    state: UnstuffState,
}

impl Default for DotUnstuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl DotUnstuffer {
    /// A decoder at the start of the body, which counts as a line start: `.` CRLF right
    /// away is an empty body.
    pub fn new() -> Self {
        Self {
            state: UnstuffState::LineStart,
        }
    }

    /// True once the terminator has been read.
    pub fn is_done(&self) -> bool {
        self.state == UnstuffState::Done
    }

    /// Decodes `input` into `out` up to and including the terminator.
    pub fn decode(&mut self, input: &[u8], out: &mut BytesMut) -> Unstuffed {
        let mut at = 0;
        while at < input.len() {
            let b = input[at];
            match self.state {
                UnstuffState::Done => break,
                UnstuffState::LineStart => {
                    self.state = match b {
                        b'.' => UnstuffState::Dot,
                        b'\r' => UnstuffState::MidCr,
                        _ => UnstuffState::Mid,
                    };
                    if b != b'.' {
                        out.put_u8(b);
                    }
                }
                UnstuffState::Dot => {
                    if b == b'\r' {
                        self.state = UnstuffState::DotCr;
                    } else {
                        // The withheld dot was stuffing: drop it and read `b` as content.
                        self.state = UnstuffState::Mid;
                        continue;
                    }
                }
                UnstuffState::DotCr => {
                    if b == b'\n' {
                        self.state = UnstuffState::Done;
                    } else {
                        // `.` CR then something else: the dot was stuffing, the CR is data.
                        out.put_u8(b'\r');
                        self.state = UnstuffState::MidCr;
                        continue;
                    }
                }
                UnstuffState::Mid => {
                    // Only CR can change the state here: copy everything before it at once.
                    let end = input[at..]
                        .iter()
                        .position(|&c| c == b'\r')
                        .map_or(input.len(), |cr| at + cr);
                    out.extend_from_slice(&input[at..end]);
                    if end < input.len() {
                        out.put_u8(b'\r');
                        self.state = UnstuffState::MidCr;
                        at = end + 1;
                    } else {
                        at = end;
                    }
                    continue;
                }
                UnstuffState::MidCr => {
                    out.put_u8(b);
                    self.state = match b {
                        b'\n' => UnstuffState::LineStart,
                        b'\r' => UnstuffState::MidCr,
                        _ => UnstuffState::Mid,
                    };
                }
            }
            at += 1;
        }
        Unstuffed {
            consumed: at,
            done: self.is_done(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Decodes `input` in chunks; returns the body, the total consumed and `done`.
    pub(crate) fn decode_with(input: &[u8], chunk: usize) -> (Vec<u8>, usize, bool) {
        let mut dec = DotUnstuffer::new();
        let mut out = BytesMut::new();
        let mut consumed = 0;
        for piece in input.chunks(chunk.max(1)) {
            let progress = dec.decode(piece, &mut out);
            consumed += progress.consumed;
            if progress.done {
                return (out.to_vec(), consumed, true);
            }
            assert_eq!(
                progress.consumed,
                piece.len(),
                "stopped early without the end"
            );
        }
        (out.to_vec(), consumed, dec.is_done())
    }

    #[test]
    fn unstuff_table() {
        // (input, body, consumed, done)
        let cases: &[(&[u8], &[u8], usize, bool)] = &[
            (b".\r\n", b"", 3, true),
            (b"a\r\n.\r\n", b"a\r\n", 6, true),
            (b"a\r\n.\r\nQUIT\r\n", b"a\r\n", 6, true),
            (b"..\r\n.\r\n", b".\r\n", 7, true),
            (b"..a\r\n...\r\n.\r\n", b".a\r\n..\r\n", 13, true),
            (b"a.\r\nb\r\n.\r\n", b"a.\r\nb\r\n", 10, true),
            // A lone dot starting a line that is not the terminator is stuffing.
            (b".a\r\n.\r\n", b"a\r\n", 7, true),
            (b".\r.\r\n.\r\n", b"\r.\r\n", 8, true),
            (b"a\r\n.", b"a\r\n", 4, false),
            (b"a\r\n.\r", b"a\r\n", 5, false),
            (b"", b"", 0, false),
            // SMTP smuggling: none of these is a terminator.
            (b"a\n.\n", b"a\n.\n", 4, false),
            (b"a\r.\r", b"a\r.\r", 4, false),
            (b"a\n.\r\n", b"a\n.\r\n", 5, false),
            (b"a\r.\r\n", b"a\r.\r\n", 5, false),
            (b"a\r\n.\n", b"a\r\n\n", 5, false),
            (b"a\r\n.\rb", b"a\r\n\rb", 6, false),
            (b"a\n\r.\r\n", b"a\n\r.\r\n", 6, false),
            (b"a\r\n\n.\r\n", b"a\r\n\n.\r\n", 7, false),
            (b"a\r\r\n.\r\n", b"a\r\r\n", 7, true),
            (b"a\r\n..\r\n", b"a\r\n.\r\n", 7, false),
        ];
        for &(input, body, consumed, done) in cases {
            for chunk in 1..=input.len().max(1) {
                assert_eq!(
                    decode_with(input, chunk),
                    (body.to_vec(), consumed, done),
                    "{:?} in chunks of {chunk}",
                    String::from_utf8_lossy(input)
                );
            }
        }
    }

    #[test]
    fn unstuff_stops_at_the_terminator() {
        let mut dec = DotUnstuffer::new();
        let mut out = BytesMut::new();
        let progress = dec.decode(b"x\r\n.\r\nRETR 1\r\n", &mut out);
        assert_eq!(
            progress,
            Unstuffed {
                consumed: 6,
                done: true
            }
        );
        assert_eq!(&out[..], b"x\r\n");
        assert_eq!(
            dec.decode(b"more", &mut out),
            Unstuffed {
                consumed: 0,
                done: true
            }
        );
        assert_eq!(&out[..], b"x\r\n");
    }
}
