//! Incremental line framing: finds CRLF (or a bare LF) in a read buffer, enforces a
//! length limit and skips the rest of an overlong line so the session can go on.
//! Pure: no I/O, no allocation beyond splitting the caller's buffer.

use bytes::{Buf, BytesMut};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineError {
    /// No line end within the limit; the rest of the line is being discarded.
    TooLong,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LineError::TooLong => f.write_str("line too long"),
        }
    }
}

impl std::error::Error for LineError {}

/// Frames lines out of a buffer the caller keeps appending to.
///
/// The reader assumes the caller only appends to `buf` between calls (the usual
/// read-into-`BytesMut` loop); that is what lets it remember how far it already looked.
#[derive(Debug, Default)]
pub struct LineReader {
    /// Discarding the tail of an overlong line until its LF.
    skipping: bool,
    /// The first `scanned` bytes of the buffer hold no LF: a line that trickles in
    /// through small reads is searched once in total, not once per read.
    scanned: usize,
}

impl LineReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the next whole line out of `buf`, without its CRLF/LF. `None` until a line is
    /// complete. An overlong line yields `Err(TooLong)` once; its remaining bytes are then
    /// discarded as they arrive, up to and including its line end.
    ///
    /// `max` counts the whole line including its CRLF, as RFC 2449 does. While a line is
    /// incomplete `buf` never holds more than `max - 1` bytes of it, so a client cannot
    /// make the buffer grow by never sending a line end.
    pub fn next_line(
        &mut self,
        buf: &mut BytesMut,
        max: usize,
    ) -> Option<Result<BytesMut, LineError>> {
        if self.skipping && !self.skip_to_line_end(buf) {
            return None;
        }
        if buf.is_empty() {
            self.scanned = 0;
            return None;
        }
        let limit = buf.len().min(max);
        // A shorter buffer means the caller replaced it: search it from the start. A
        // smaller `max` than last time is fine: the searched prefix holds no LF either way.
        let from = if self.scanned > buf.len() {
            0
        } else {
            self.scanned.min(limit)
        };
        if let Some(pos) = find_lf(&buf[from..limit]) {
            self.scanned = 0;
            let mut line = buf.split_to(from + pos + 1);
            line.truncate(line.len() - 1);
            if line.last() == Some(&b'\r') {
                line.truncate(line.len() - 1);
            }
            return Some(Ok(line));
        }
        if buf.len() < max {
            self.scanned = limit;
            return None;
        }
        // The first `max` bytes hold no line end: drop them and whatever else of this
        // line is already here, and keep dropping until its LF arrives.
        buf.advance(max);
        self.scanned = 0;
        self.skipping = true;
        self.skip_to_line_end(buf);
        Some(Err(LineError::TooLong))
    }

    /// Discards bytes up to and including the next LF. Returns true once the LF was
    /// found (normal framing resumes), false if all of `buf` was discarded without it.
    fn skip_to_line_end(&mut self, buf: &mut BytesMut) -> bool {
        match find_lf(buf) {
            Some(pos) => {
                buf.advance(pos + 1);
                self.skipping = false;
                true
            }
            None => {
                buf.clear();
                false
            }
        }
    }
}

fn find_lf(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// POP3's limits (`pop3::codec`), the lengths the reader is used with most.
    const MAX_COMMAND_LINE: usize = 255;
    const MAX_SASL_LINE: usize = 4096;

    /// One observable event of the reader: a line, or an overlong-line error.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Event {
        Line(Vec<u8>),
        TooLong,
    }

    /// Feeds `input` in chunks of `chunk` bytes and collects every event.
    fn run(input: &[u8], chunk: usize, max: usize) -> Vec<Event> {
        let mut reader = LineReader::new();
        let mut buf = BytesMut::new();
        let mut events = Vec::new();
        for piece in input.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(result) = reader.next_line(&mut buf, max) {
                events.push(match result {
                    Ok(line) => Event::Line(line.to_vec()),
                    Err(LineError::TooLong) => Event::TooLong,
                });
            }
            assert!(
                buf.len() < max,
                "buffer holds {} bytes, max {max}",
                buf.len()
            );
        }
        events
    }

    fn line(s: &str) -> Event {
        Event::Line(s.as_bytes().to_vec())
    }

    #[test]
    fn table() {
        let cases: &[(&[u8], &[Event])] = &[
            (b"STAT\r\n", &[Event::Line(b"STAT".to_vec())]),
            (b"STAT\n", &[Event::Line(b"STAT".to_vec())]),
            (b"\r\n", &[Event::Line(Vec::new())]),
            (b"\n", &[Event::Line(Vec::new())]),
            (b"STAT", &[]),
            (b"STAT\r", &[]),
            (b"a\rb\r\n", &[Event::Line(b"a\rb".to_vec())]),
            // Only the one CR that belongs to the terminator is removed.
            (b"x\r\r\n", &[Event::Line(b"x\r".to_vec())]),
            (
                b"USER a\r\nPASS b c\nQUIT\r\n",
                &[
                    Event::Line(b"USER a".to_vec()),
                    Event::Line(b"PASS b c".to_vec()),
                    Event::Line(b"QUIT".to_vec()),
                ],
            ),
            (b"\x00\xff\r\n", &[Event::Line(b"\x00\xff".to_vec())]),
        ];
        for (input, want) in cases {
            assert_eq!(
                run(input, input.len().max(1), MAX_COMMAND_LINE),
                *want,
                "{input:?}"
            );
        }
    }

    #[test]
    fn limit_counts_the_terminator() {
        let ok = format!("{}\r\n", "x".repeat(253));
        assert_eq!(ok.len(), MAX_COMMAND_LINE);
        assert_eq!(
            run(ok.as_bytes(), 1024, MAX_COMMAND_LINE),
            vec![line(&"x".repeat(253))]
        );

        let bare_lf = format!("{}\n", "x".repeat(254));
        assert_eq!(
            run(bare_lf.as_bytes(), 1024, MAX_COMMAND_LINE),
            vec![line(&"x".repeat(254))]
        );

        let long = format!("{}\r\nNOOP\r\n", "x".repeat(254));
        assert_eq!(
            run(long.as_bytes(), 1024, MAX_COMMAND_LINE),
            vec![Event::TooLong, line("NOOP")]
        );
    }

    #[test]
    fn limit_reached_without_line_end() {
        let mut reader = LineReader::new();
        let mut buf = BytesMut::from(&[b'a'; 9][..]);
        assert_eq!(reader.next_line(&mut buf, 10), None);
        buf.extend_from_slice(b"a");
        assert_eq!(
            reader.next_line(&mut buf, 10),
            Some(Err(LineError::TooLong))
        );
        assert!(buf.is_empty());
        // Still inside the overlong line: more of it is dropped, and no second error.
        buf.extend_from_slice(b"aaaaaaaaaaaaaaaaaaaa");
        assert_eq!(reader.next_line(&mut buf, 10), None);
        assert!(buf.is_empty());
        buf.extend_from_slice(b"aa\r\nNOOP\r\n");
        assert_eq!(
            reader.next_line(&mut buf, 10),
            Some(Ok(BytesMut::from(&b"NOOP"[..])))
        );
        assert_eq!(reader.next_line(&mut buf, 10), None);
    }

    #[test]
    fn overlong_line_ending_in_the_same_read() {
        let input = format!(
            "{}\r\nSTAT\r\n{}\nQUIT\r\n",
            "y".repeat(300),
            "z".repeat(256)
        );
        assert_eq!(
            run(input.as_bytes(), input.len(), MAX_COMMAND_LINE),
            vec![Event::TooLong, line("STAT"), Event::TooLong, line("QUIT")]
        );
    }

    #[test]
    fn same_events_for_every_chunk_size() {
        let mut input = Vec::new();
        input.extend_from_slice(b"USER alice\r\nPASS se cret\r\n\r\n");
        input.extend_from_slice(&[b'A'; 700]);
        input.extend_from_slice(b"\r\nLIST 1\nTOP 1 2\r\n");
        input.extend_from_slice(&[b'B'; 254]);
        input.extend_from_slice(b"\r\n");
        input.extend_from_slice(&[b'C'; 253]);
        input.extend_from_slice(b"\r\nQUIT\r\nPARTIAL");
        let want = vec![
            line("USER alice"),
            line("PASS se cret"),
            line(""),
            Event::TooLong,
            line("LIST 1"),
            line("TOP 1 2"),
            Event::TooLong,
            line(&"C".repeat(253)),
            line("QUIT"),
        ];
        for chunk in 1..=512 {
            assert_eq!(
                run(&input, chunk, MAX_COMMAND_LINE),
                want,
                "chunk size {chunk}"
            );
        }
    }

    #[test]
    fn memory_stays_bounded_while_skipping() {
        let mut reader = LineReader::new();
        let mut buf = BytesMut::new();
        let mut errors = 0;
        for _ in 0..100_000 {
            buf.extend_from_slice(b"0123456");
            while let Some(result) = reader.next_line(&mut buf, MAX_COMMAND_LINE) {
                assert_eq!(result, Err(LineError::TooLong));
                errors += 1;
            }
            assert!(buf.len() < MAX_COMMAND_LINE);
        }
        assert_eq!(errors, 1);
        buf.extend_from_slice(b"\nSTAT\r\n");
        assert_eq!(
            reader.next_line(&mut buf, MAX_COMMAND_LINE),
            Some(Ok(BytesMut::from(&b"STAT"[..])))
        );
    }

    #[test]
    fn remembers_how_far_it_searched() {
        let mut reader = LineReader::new();
        let mut buf = BytesMut::new();
        for n in 1..=100 {
            buf.extend_from_slice(b"x");
            assert_eq!(reader.next_line(&mut buf, MAX_SASL_LINE), None);
            assert_eq!(reader.scanned, n);
        }
        buf.extend_from_slice(b"\r\n");
        let got = reader.next_line(&mut buf, MAX_SASL_LINE);
        assert_eq!(got, Some(Ok(BytesMut::from(&[b'x'; 100][..]))));
        assert_eq!(reader.scanned, 0);
    }

    #[test]
    fn shrunk_buffer_does_not_skip_bytes() {
        // A caller that replaced the buffer must still get correct framing.
        let mut reader = LineReader::new();
        let mut buf = BytesMut::from(&b"abcdef"[..]);
        assert_eq!(reader.next_line(&mut buf, 100), None);
        let mut other = BytesMut::from(&b"a\n"[..]);
        assert_eq!(
            reader.next_line(&mut other, 100),
            Some(Ok(BytesMut::from(&b"a"[..])))
        );
    }

    #[test]
    fn smaller_limit_after_a_longer_search() {
        // SASL continuation (large limit) followed by a command (small limit).
        let mut reader = LineReader::new();
        let mut buf = BytesMut::from(&[b'x'; 300][..]);
        assert_eq!(reader.next_line(&mut buf, MAX_SASL_LINE), None);
        assert_eq!(
            reader.next_line(&mut buf, MAX_COMMAND_LINE),
            Some(Err(LineError::TooLong))
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn sasl_limit_allows_long_lines() {
        let long = format!("{}\r\n", "Q".repeat(MAX_SASL_LINE - 2));
        assert_eq!(
            run(long.as_bytes(), 100, MAX_SASL_LINE),
            vec![line(&"Q".repeat(MAX_SASL_LINE - 2))]
        );
        assert_eq!(
            run(long.as_bytes(), 100, MAX_COMMAND_LINE),
            vec![Event::TooLong]
        );
    }

    #[test]
    fn error_message() {
        assert_eq!(LineError::TooLong.to_string(), "line too long");
    }
}
