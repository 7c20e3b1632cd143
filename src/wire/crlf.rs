//! Pure helpers for RFC 5322 message bytes at delivery: CRLF normalisation.
//! No I/O here, and nothing beyond std.

/// What the normaliser last wrote, so `finish` knows whether a final CRLF is needed
/// even when the caller has already drained `out`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Written {
    /// Nothing yet: an empty message stays empty.
    #[default]
    Nothing,
    /// The output ends with CRLF.
    LineEnd,
    /// The output ends inside a line.
    MidLine,
}

/// Streaming normaliser: bare LF and bare CR become CRLF; the result always ends in CRLF
/// (unless empty), so the stored size is exactly what RETR sends before dot-stuffing.
#[derive(Debug, Default)]
pub struct CrlfNormalizer {
    /// A CR ended the previous chunk; the next byte decides whether it was bare.
    pending_cr: bool,
    written: Written,
}

impl CrlfNormalizer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut rest = input;
        if self.pending_cr && !rest.is_empty() {
            // The CR and an LF opening this chunk are one CRLF; a CR alone becomes one.
            if rest[0] == b'\n' {
                rest = &rest[1..];
            }
            self.pending_cr = false;
            self.line_end(out);
        }
        while !rest.is_empty() {
            let Some(at) = rest.iter().position(|&b| b == b'\r' || b == b'\n') else {
                out.extend_from_slice(rest);
                self.written = Written::MidLine;
                return;
            };
            if at > 0 {
                out.extend_from_slice(&rest[..at]);
                self.written = Written::MidLine;
            }
            match (rest[at], rest.get(at + 1)) {
                (b'\r', Some(b'\n')) => rest = &rest[at + 2..],
                (b'\r', None) => {
                    self.pending_cr = true;
                    return;
                }
                _ => rest = &rest[at + 1..],
            }
            self.line_end(out);
        }
    }

    pub fn finish(self, out: &mut Vec<u8>) {
        if self.pending_cr || self.written == Written::MidLine {
            out.extend_from_slice(b"\r\n");
        }
    }

    fn line_end(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"\r\n");
        self.written = Written::LineEnd;
    }
}

/// Normalises a whole message at once; see [`CrlfNormalizer`].
pub fn normalize(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len() + 2);
    let mut normalizer = CrlfNormalizer::new();
    normalizer.push(input, &mut out);
    normalizer.finish(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chunked(input: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut normalizer = CrlfNormalizer::new();
        for piece in input.chunks(chunk.max(1)) {
            normalizer.push(piece, &mut out);
        }
        normalizer.finish(&mut out);
        out
    }

    /// True if every CR is followed by LF and every LF preceded by CR.
    fn only_crlf(bytes: &[u8]) -> bool {
        bytes.iter().enumerate().all(|(i, &b)| match b {
            b'\r' => bytes.get(i + 1) == Some(&b'\n'),
            b'\n' => i > 0 && bytes[i - 1] == b'\r',
            _ => true,
        })
    }

    #[test]
    fn table() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b""),
            (b"a", b"a\r\n"),
            (b"a\r\n", b"a\r\n"),
            (b"a\n", b"a\r\n"),
            (b"a\r", b"a\r\n"),
            (b"\n", b"\r\n"),
            (b"\r", b"\r\n"),
            (b"\r\n", b"\r\n"),
            (b"\n\r", b"\r\n\r\n"),
            (b"\r\r\n", b"\r\n\r\n"),
            (b"\r\n\n", b"\r\n\r\n"),
            (b"a\rb\nc\r\nd", b"a\r\nb\r\nc\r\nd\r\n"),
            (b"\r\r\r", b"\r\n\r\n\r\n"),
            (b"\n\n\n", b"\r\n\r\n\r\n"),
            (b"x\0\xff\r\n", b"x\0\xff\r\n"),
            (b"H: v\n\nbody\n.\n", b"H: v\r\n\r\nbody\r\n.\r\n"),
        ];
        for (input, want) in cases {
            assert_eq!(
                normalize(input),
                *want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
            for chunk in 1..=64 {
                assert_eq!(
                    chunked(input, chunk),
                    *want,
                    "{input:?} in chunks of {chunk}"
                );
            }
        }
    }

    #[test]
    fn cr_at_chunk_end_joins_lf_at_next_start() {
        let mut out = Vec::new();
        let mut normalizer = CrlfNormalizer::new();
        normalizer.push(b"a\r", &mut out);
        assert_eq!(out, b"a");
        normalizer.push(b"\nb", &mut out);
        assert_eq!(out, b"a\r\nb");
        normalizer.push(b"\r", &mut out);
        normalizer.push(b"", &mut out);
        normalizer.push(b"c", &mut out);
        normalizer.finish(&mut out);
        assert_eq!(out, b"a\r\nb\r\nc\r\n");
    }

    #[test]
    fn finish_works_after_the_caller_drained_out() {
        let mut out = Vec::new();
        let mut normalizer = CrlfNormalizer::new();
        normalizer.push(b"line\r\nnext", &mut out);
        out.clear();
        normalizer.finish(&mut out);
        assert_eq!(out, b"\r\n");

        let mut out = Vec::new();
        let mut normalizer = CrlfNormalizer::new();
        normalizer.push(b"line\r\n", &mut out);
        out.clear();
        normalizer.finish(&mut out);
        assert_eq!(out, b"");

        let mut out = Vec::new();
        let mut normalizer = CrlfNormalizer::new();
        normalizer.push(b"line\r", &mut out);
        out.clear();
        normalizer.finish(&mut out);
        assert_eq!(out, b"\r\n");
    }

    #[test]
    fn every_chunk_size_agrees() {
        let mut input = Vec::new();
        for i in 0..300u32 {
            input.extend_from_slice(match i % 6 {
                0 => b"text\r".as_slice(),
                1 => b"\n",
                2 => b"\r",
                3 => b"more text\n",
                4 => b"\r\n",
                _ => b"\r\r\n\n",
            });
        }
        let whole = normalize(&input);
        assert!(only_crlf(&whole));
        for chunk in 1..=64 {
            assert_eq!(chunked(&input, chunk), whole, "chunk size {chunk}");
        }
    }

    fn line_bytes() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![3 => Just(b'\r'), 3 => Just(b'\n'), 2 => Just(b'a'), 1 => any::<u8>()],
            0..200,
        )
    }

    proptest! {
        #[test]
        fn output_has_only_crlf_line_ends(input in line_bytes(), chunk in 1usize..20) {
            let out = chunked(&input, chunk);
            prop_assert!(only_crlf(&out));
            prop_assert!(out.is_empty() || out.ends_with(b"\r\n"));
            prop_assert_eq!(out.is_empty(), input.is_empty());
            prop_assert_eq!(&out, &normalize(&input));
        }

        #[test]
        fn idempotent(input in line_bytes()) {
            let once = normalize(&input);
            prop_assert_eq!(normalize(&once), once.clone());
        }

        #[test]
        fn keeps_everything_but_line_ends(input in line_bytes()) {
            let strip = |b: &[u8]| -> Vec<u8> {
                b.iter().copied().filter(|&c| c != b'\r' && c != b'\n').collect()
            };
            prop_assert_eq!(strip(&normalize(&input)), strip(&input));
        }
    }
}
