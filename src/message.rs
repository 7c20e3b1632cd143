//! Pure helpers for RFC 5322 message bytes at delivery: CRLF normalisation.
//! No I/O here.

/// Streaming normaliser: bare LF and bare CR become CRLF; the result always ends in CRLF
/// (unless empty), so the stored size is exactly what RETR sends before dot-stuffing.
#[derive(Debug, Default)]
pub struct CrlfNormalizer {
    pending_cr: bool,
}

impl CrlfNormalizer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let _ = (input, out, &mut self.pending_cr);
        todo!()
    }

    pub fn finish(self, out: &mut Vec<u8>) {
        let _ = out;
        todo!()
    }
}
