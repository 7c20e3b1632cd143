//! Streaming dot-stuffing for RETR/TOP bodies (RFC 1939 §3); its inverse, for bodies
//! received, is `wire::DotUnstuffer`. Pure: chunks in, bytes out; the state between
//! chunks lives in the encoder, so a message is never held in memory whole.

use bytes::{BufMut, BytesMut};

#[derive(Debug, Clone, Copy, Default)]
pub struct BodyOptions {
    /// Replace NUL octets with `0x80` for clients that hang on them (like Dovecot's
    /// `outlook-no-nuls`); off by default because it alters the message.
    pub replace_nul: bool,
}

/// Where the encoder is within the current line. Bare LF counts as a line end so that
/// a lenient client never sees an unstuffed `.` after one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineState {
    /// Nothing of the current line has been seen yet.
    Start,
    /// The line so far is a single CR (so far still an empty line, if LF follows).
    Cr,
    /// The line has content.
    Content,
}

impl LineState {
    /// The state after more of the current line (without its LF) has been seen.
    fn after(self, more: &[u8]) -> Self {
        match (self, more) {
            (_, []) => self,
            (LineState::Start, b"\r") => LineState::Cr,
            _ => LineState::Content,
        }
    }
}

/// How the output written so far ends, for `finish`: the terminator must follow a
/// real CRLF, or strict clients would not recognise it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tail {
    /// CRLF, or nothing written yet (the status line before the body ended in CRLF).
    Crlf,
    /// A CR that may yet be joined by an LF from the next chunk.
    Cr,
    /// Anything else, including a bare LF.
    Other,
}

impl Tail {
    /// The tail after `segment` (non-empty) has been written.
    fn after(self, segment: &[u8]) -> Self {
        match segment {
            [.., b'\r', b'\n'] => Tail::Crlf,
            [b'\n'] if self == Tail::Cr => Tail::Crlf,
            [.., b'\r'] => Tail::Cr,
            _ => Tail::Other,
        }
    }
}

/// How much of the message is still wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limit {
    /// RETR: everything.
    All,
    /// TOP, still in the header; then this many body lines.
    Header { body_lines: u32 },
    /// TOP, in the body, with this many (at least one) lines left.
    Body { remaining: u32 },
    /// TOP's limit is reached.
    Done,
}

impl Limit {
    fn line_ended(self, blank: bool) -> Self {
        match self {
            Limit::Header { body_lines } if blank => match body_lines {
                0 => Limit::Done,
                n => Limit::Body { remaining: n },
            },
            Limit::Body { remaining } if remaining <= 1 => Limit::Done,
            Limit::Body { remaining } => Limit::Body {
                remaining: remaining - 1,
            },
            other => other,
        }
    }
}

#[derive(Debug)]
pub struct BodyEncoder {
    opts: BodyOptions,
    line: LineState,
    tail: Tail,
    limit: Limit,
    /// TOP's limit left input unsent.
    cut: bool,
}

impl BodyEncoder {
    /// Encoder for a whole message (RETR).
    pub fn full(opts: BodyOptions) -> Self {
        Self {
            opts,
            line: LineState::Start,
            tail: Tail::Crlf,
            limit: Limit::All,
            cut: false,
        }
    }

    /// Encoder for TOP: the header, the blank line, then at most `lines` body lines.
    /// A message without a blank line is all header and is sent whole.
    pub fn top(lines: u32, opts: BodyOptions) -> Self {
        Self {
            opts,
            line: LineState::Start,
            tail: Tail::Crlf,
            limit: Limit::Header { body_lines: lines },
            cut: false,
        }
    }

    /// Stuffs one chunk into `out`. Returns false once no more input is wanted (TOP limit).
    pub fn encode(&mut self, chunk: &[u8], out: &mut BytesMut) -> bool {
        let mut rest = chunk;
        while !rest.is_empty() && self.limit != Limit::Done {
            let (segment, ends_line) = match rest.iter().position(|&b| b == b'\n') {
                Some(lf) => (&rest[..=lf], true),
                None => (rest, false),
            };
            rest = &rest[segment.len()..];
            if self.line == LineState::Start && segment[0] == b'.' {
                out.put_u8(b'.');
            }
            self.put(segment, out);
            self.tail = self.tail.after(segment);
            if ends_line {
                let content = &segment[..segment.len() - 1];
                let blank = self.line.after(content) != LineState::Content;
                self.line = LineState::Start;
                self.limit = self.limit.line_ended(blank);
            } else {
                self.line = self.line.after(segment);
            }
        }
        self.cut |= !rest.is_empty();
        self.limit != Limit::Done
    }

    /// Whether TOP's limit left some of the input given so far unsent. With every chunk
    /// of a message given and nothing cut, the client got the whole message.
    pub fn cut(&self) -> bool {
        self.cut
    }

    /// Ends the multi-line reply: CRLF if the output did not end a line, then `.` CRLF.
    /// A message ending in a bare LF also gets a CRLF, so the terminator is CRLF `.` CRLF
    /// for strict clients too.
    pub fn finish(self, out: &mut BytesMut) {
        if self.tail != Tail::Crlf {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }

    fn put(&self, bytes: &[u8], out: &mut BytesMut) {
        let start = out.len();
        out.extend_from_slice(bytes);
        if self.opts.replace_nul {
            for b in &mut out[start..] {
                if *b == 0 {
                    *b = 0x80;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::crlf as message;
    use crate::wire::dot::tests::decode_with;
    use proptest::prelude::*;

    /// Runs an encoder over `input` in chunks of `chunk` bytes, honouring its "stop" signal.
    fn encode_with(mut enc: BodyEncoder, input: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = BytesMut::new();
        for piece in input.chunks(chunk.max(1)) {
            if !enc.encode(piece, &mut out) {
                break;
            }
        }
        enc.finish(&mut out);
        out.to_vec()
    }

    fn retr(input: &[u8]) -> Vec<u8> {
        encode_with(
            BodyEncoder::full(BodyOptions::default()),
            input,
            input.len(),
        )
    }

    fn top(lines: u32, input: &[u8]) -> Vec<u8> {
        encode_with(
            BodyEncoder::top(lines, BodyOptions::default()),
            input,
            input.len(),
        )
    }

    #[test]
    fn retr_table() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b".\r\n"),
            (b"a\r\n", b"a\r\n.\r\n"),
            (b"a", b"a\r\n.\r\n"),
            (b".\r\n", b"..\r\n.\r\n"),
            (b"..\r\n", b"...\r\n.\r\n"),
            (b".a\r\n.b\r\n", b"..a\r\n..b\r\n.\r\n"),
            (b"a.\r\nb.c\r\n", b"a.\r\nb.c\r\n.\r\n"),
            (b"a\r\n.", b"a\r\n..\r\n.\r\n"),
            (b"\r\n.\r\n", b"\r\n..\r\n.\r\n"),
            // Bare LF ends a line for stuffing: lenient clients would see a terminator.
            (b"a\n.\n", b"a\n..\n\r\n.\r\n"),
            (b"a\n", b"a\n\r\n.\r\n"),
            (b"a\n.\r\n", b"a\n..\r\n.\r\n"),
            // A bare CR does not start a line.
            (b"a\r.\r\n", b"a\r.\r\n.\r\n"),
            (b"\r.\r\n", b"\r.\r\n.\r\n"),
            (b"x\0y\r\n", b"x\0y\r\n.\r\n"),
        ];
        for (input, want) in cases {
            assert_eq!(retr(input), *want, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn replace_nul() {
        let opts = BodyOptions { replace_nul: true };
        let got = encode_with(BodyEncoder::full(opts), b"\0.\0\r\n.\0\r\n", 3);
        assert_eq!(got, b"\x80.\x80\r\n..\x80\r\n.\r\n");
        let got = encode_with(BodyEncoder::top(0, opts), b"H: \0\r\n\r\n\0body\r\n", 1);
        assert_eq!(got, b"H: \x80\r\n\r\n.\r\n");
    }

    #[test]
    fn top_table() {
        let msg: &[u8] = b"Subject: x\r\nFrom: a\r\n\r\nl1\r\n.l2\r\nl3\r\n";
        let cases: Vec<(u32, &[u8], &[u8])> = vec![
            (0, msg, b"Subject: x\r\nFrom: a\r\n\r\n.\r\n"),
            (1, msg, b"Subject: x\r\nFrom: a\r\n\r\nl1\r\n.\r\n"),
            (2, msg, b"Subject: x\r\nFrom: a\r\n\r\nl1\r\n..l2\r\n.\r\n"),
            (
                3,
                msg,
                b"Subject: x\r\nFrom: a\r\n\r\nl1\r\n..l2\r\nl3\r\n.\r\n",
            ),
            (
                99,
                msg,
                b"Subject: x\r\nFrom: a\r\n\r\nl1\r\n..l2\r\nl3\r\n.\r\n",
            ),
            (
                u32::MAX,
                msg,
                b"Subject: x\r\nFrom: a\r\n\r\nl1\r\n..l2\r\nl3\r\n.\r\n",
            ),
            // No body at all, with and without the blank line.
            (5, b"Subject: x\r\n\r\n", b"Subject: x\r\n\r\n.\r\n"),
            (5, b"Subject: x\r\n", b"Subject: x\r\n.\r\n"),
            (0, b"Subject: x\r\n", b"Subject: x\r\n.\r\n"),
            (0, b"Subject: x", b"Subject: x\r\n.\r\n"),
            (0, b"", b".\r\n"),
            // The very first line is blank: empty header.
            (0, b"\r\nbody\r\n", b"\r\n.\r\n"),
            (1, b"\r\nbody\r\nmore\r\n", b"\r\nbody\r\n.\r\n"),
            // Blank body lines count as lines.
            (
                2,
                b"H: 1\r\n\r\n\r\n\r\nx\r\n",
                b"H: 1\r\n\r\n\r\n\r\n.\r\n",
            ),
            // A last body line without CRLF is completed.
            (5, b"H: 1\r\n\r\nlast", b"H: 1\r\n\r\nlast\r\n.\r\n"),
            // Dots in the header are stuffed too.
            (0, b".H: 1\r\n\r\n.b\r\n", b"..H: 1\r\n\r\n.\r\n"),
            // A line holding only CR and text is not blank.
            (
                0,
                b"H: 1\r\n \r\nb\r\n\r\nc\r\n",
                b"H: 1\r\n \r\nb\r\n\r\n.\r\n",
            ),
            (
                0,
                b"H: 1\r\n\r\r\nb\r\n\r\nc\r\n",
                b"H: 1\r\n\r\r\nb\r\n\r\n.\r\n",
            ),
            // Bare LF line ends are tolerated.
            (1, b"H: 1\n\nb1\nb2\n", b"H: 1\n\nb1\n\r\n.\r\n"),
            (1, b"H: 1\r\n\r\nb1\r", b"H: 1\r\n\r\nb1\r\r\n.\r\n"),
        ];
        for (lines, input, want) in cases {
            for chunk in 1..=input.len().max(1) {
                let got = encode_with(
                    BodyEncoder::top(lines, BodyOptions::default()),
                    input,
                    chunk,
                );
                assert_eq!(
                    got,
                    want,
                    "TOP {lines} of {:?} in chunks of {chunk}",
                    String::from_utf8_lossy(input)
                );
            }
        }
    }

    #[test]
    fn cut_tells_whether_top_sent_everything() {
        let message = b"A: b\r\n\r\none\r\ntwo\r\n";
        for (lines, cut) in [(0, true), (1, true), (2, false), (99, false)] {
            let mut enc = BodyEncoder::top(lines, BodyOptions::default());
            enc.encode(message, &mut BytesMut::new());
            assert_eq!(enc.cut(), cut, "TOP {lines}");
        }
        let mut enc = BodyEncoder::full(BodyOptions::default());
        enc.encode(message, &mut BytesMut::new());
        assert!(!enc.cut());
    }

    #[test]
    fn top_stops_asking_for_input() {
        let mut enc = BodyEncoder::top(1, BodyOptions::default());
        let mut out = BytesMut::new();
        assert!(enc.encode(b"H: 1\r\n", &mut out));
        assert!(enc.encode(b"\r\n", &mut out));
        assert!(enc.encode(b"body", &mut out));
        assert!(!enc.encode(b" one\r\nbody two\r\n", &mut out));
        assert!(!enc.encode(b"more\r\n", &mut out));
        enc.finish(&mut out);
        assert_eq!(&out[..], b"H: 1\r\n\r\nbody one\r\n.\r\n");

        let mut full = BodyEncoder::full(BodyOptions::default());
        let mut out = BytesMut::new();
        assert!(full.encode(b"\r\n\r\n", &mut out));
        assert!(full.encode(b"", &mut out));
    }

    #[test]
    fn top_zero_stops_at_the_blank_line() {
        let mut enc = BodyEncoder::top(0, BodyOptions::default());
        let mut out = BytesMut::new();
        assert!(enc.encode(b"H: 1\r\n\r", &mut out));
        assert!(!enc.encode(b"\nbody\r\n", &mut out));
        enc.finish(&mut out);
        assert_eq!(&out[..], b"H: 1\r\n\r\n.\r\n");
    }

    fn sample_message() -> Vec<u8> {
        let mut msg = Vec::new();
        msg.extend_from_slice(b"Return-Path: <a@example.com>\r\n.Dotted: header\r\n\r\n");
        for i in 0..200 {
            match i % 7 {
                0 => msg.extend_from_slice(b".\r\n"),
                1 => msg.extend_from_slice(b"..double\r\n"),
                2 => msg.extend_from_slice(b"\r\n"),
                3 => msg.extend_from_slice(b"text with . in the middle.\r\n"),
                4 => msg.extend_from_slice(b".\r"),
                5 => msg.extend_from_slice(b"\n"),
                _ => msg.extend_from_slice(&[b'x'; 97]),
            }
        }
        msg.extend_from_slice(b"\r\n.last");
        msg
    }

    #[test]
    fn same_output_for_every_chunk_size() {
        let msg = sample_message();
        let whole = encode_with(BodyEncoder::full(BodyOptions::default()), &msg, msg.len());
        let (decoded, consumed, done) = decode_with(&whole, whole.len());
        assert!(done);
        assert_eq!(consumed, whole.len());
        let mut want = msg.clone();
        want.extend_from_slice(b"\r\n");
        assert_eq!(decoded, want);
        let top_whole = encode_with(
            BodyEncoder::top(50, BodyOptions::default()),
            &msg,
            msg.len(),
        );
        for chunk in 1..=512 {
            let full = BodyEncoder::full(BodyOptions::default());
            assert_eq!(
                encode_with(full, &msg, chunk),
                whole,
                "RETR, chunk size {chunk}"
            );
            let top = BodyEncoder::top(50, BodyOptions::default());
            assert_eq!(
                encode_with(top, &msg, chunk),
                top_whole,
                "TOP, chunk size {chunk}"
            );
            assert_eq!(
                decode_with(&whole, chunk),
                (want.clone(), whole.len(), true)
            );
        }
    }

    #[test]
    fn smuggled_terminators_are_stuffed_by_the_encoder() {
        // Whatever a message contains, the encoded form ends exactly at its own terminator.
        for input in [
            &b"a\n.\n"[..],
            b"a\r.\r",
            b"a\n.\r\nMAIL FROM:<x>\r\n",
            b"a\r\n.\nb",
            b".\r\n",
            b"\r\n.\r\n",
        ] {
            let encoded = retr(input);
            let (_, consumed, done) = decode_with(&encoded, encoded.len());
            assert!(done);
            assert_eq!(
                consumed,
                encoded.len(),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    /// Bytes biased towards the ones that matter for line structure.
    fn message_bytes() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![
                4 => Just(b'.'),
                3 => Just(b'\r'),
                3 => Just(b'\n'),
                2 => Just(b'a'),
                1 => Just(0u8),
                1 => any::<u8>(),
            ],
            0..300,
        )
    }

    proptest! {
        #[test]
        fn encode_then_unstuff_round_trips(
            raw in message_bytes(),
            enc_chunk in 1usize..40,
            dec_chunk in 1usize..40,
        ) {
            let input = message::normalize(&raw);
            let encoded = encode_with(BodyEncoder::full(BodyOptions::default()), &input, enc_chunk);
            let (decoded, consumed, done) = decode_with(&encoded, dec_chunk);
            prop_assert!(done);
            prop_assert_eq!(consumed, encoded.len());
            prop_assert_eq!(decoded, input);
        }

        #[test]
        fn any_input_ends_exactly_at_its_terminator(raw in message_bytes(), chunk in 1usize..40) {
            for enc in [
                BodyEncoder::full(BodyOptions::default()),
                BodyEncoder::top(3, BodyOptions::default()),
            ] {
                let encoded = encode_with(enc, &raw, chunk);
                let (_, consumed, done) = decode_with(&encoded, encoded.len());
                prop_assert!(done);
                prop_assert_eq!(consumed, encoded.len());
            }
        }

        #[test]
        fn top_is_a_prefix_of_retr(raw in message_bytes(), lines in 0u32..6) {
            let input = message::normalize(&raw);
            let full = retr(&input);
            let cut = top(lines, &input);
            // Both end in ".\r\n"; before it, TOP's output is a prefix of RETR's.
            prop_assert!(full[..full.len() - 3].starts_with(&cut[..cut.len() - 3]));
        }
    }
}
