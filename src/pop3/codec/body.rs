//! Streaming dot-stuffing for RETR/TOP bodies (RFC 1939 §3) and its inverse.

use bytes::BytesMut;

#[derive(Debug, Clone, Copy, Default)]
pub struct BodyOptions {
    /// Replace NUL octets with `0x80` for clients that hang on them (like Dovecot's
    /// `outlook-no-nuls`); off by default because it alters the message.
    pub replace_nul: bool,
}

#[derive(Debug)]
pub struct BodyEncoder {
    opts: BodyOptions,
}

impl BodyEncoder {
    /// Encoder for a whole message (RETR).
    pub fn full(opts: BodyOptions) -> Self {
        Self { opts }
    }

    /// Encoder for TOP: the header, the blank line, then at most `lines` body lines.
    pub fn top(lines: u32, opts: BodyOptions) -> Self {
        let _ = lines;
        Self { opts }
    }

    /// Stuffs one chunk into `out`. Returns false once no more input is wanted (TOP limit).
    pub fn encode(&mut self, chunk: &[u8], out: &mut BytesMut) -> bool {
        let _ = (chunk, out, self.opts);
        todo!()
    }

    /// Ends the multi-line reply: CRLF if the output did not end a line, then `.` CRLF.
    pub fn finish(self, out: &mut BytesMut) {
        let _ = out;
        todo!()
    }
}
