//! Framing on a reusable replica link: each direction is a sequence of frames (a 4-octet
//! big-endian length, then that many octets), and an empty frame ends that direction for
//! the current session. A forwarded POP3 session runs over [`Framed`] as over a plain
//! stream; once both directions have ended, the link carries the next session instead of
//! paying for a new TCP connection and TLS handshake; on such a reused link the home
//! acknowledges each preamble with [`ACK`] first. Nothing here knows POP3.

use bytes::{BufMut, BytesMut};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a home sends first on a reused link once it has read the next session's
/// preamble (no POP3 reply starts with it), before the front sends the session itself.
pub const ACK: u8 = 0x06;

/// Largest frame payload: one write of a session at most.
pub const MAX_FRAME: usize = 64 * 1024;

/// A stream framed as above. Shutting it down sends the end frame and leaves the inner
/// stream open.
pub struct Framed<S> {
    inner: S,
    header: [u8; 4],
    header_len: usize,
    /// Payload octets of the current frame not yet read.
    remaining: usize,
    read_ended: bool,
    /// Encoded frames not yet written to `inner`.
    pending: BytesMut,
    write_ended: bool,
}

impl<S> Framed<S> {
    pub fn new(inner: S) -> Framed<S> {
        Framed {
            inner,
            header: [0; 4],
            header_len: 0,
            remaining: 0,
            read_ended: false,
            pending: BytesMut::new(),
            write_ended: false,
        }
    }

    /// Both directions ended cleanly: the link may carry another session.
    pub fn reusable(&self) -> bool {
        self.read_ended && self.write_ended && self.pending.is_empty()
    }

    /// Starts the next session on the same link; only after [`Framed::reusable`].
    pub fn next_session(&mut self) {
        self.read_ended = false;
        self.write_ended = false;
        self.header_len = 0;
        self.remaining = 0;
    }

    pub fn read_ended(&self) -> bool {
        self.read_ended
    }

    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncWrite + Unpin> Framed<S> {
    /// Writes out encoded frames; Ready once none is left.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let _ = self.pending.split_to(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Framed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.read_ended || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if this.remaining > 0 {
                let want = this.remaining.min(buf.remaining());
                let mut part = ReadBuf::new(buf.initialize_unfilled_to(want));
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut part))?;
                let n = part.filled().len();
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                buf.advance(n);
                this.remaining -= n;
                return Poll::Ready(Ok(()));
            }
            let mut header = ReadBuf::new(&mut this.header[this.header_len..]);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut header))?;
            let n = header.filled().len();
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            this.header_len += n;
            if this.header_len < 4 {
                continue;
            }
            this.header_len = 0;
            let len = u32::from_be_bytes(this.header) as usize;
            if len == 0 {
                this.read_ended = true;
            } else if len > MAX_FRAME {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("frame of {len} octets"),
                )));
            } else {
                this.remaining = len;
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Framed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_ended {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        ready!(this.poll_drain(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = data.len().min(MAX_FRAME);
        this.pending.reserve(4 + n);
        this.pending.put_u32(n as u32);
        this.pending.extend_from_slice(&data[..n]);
        // Written out now if the inner stream takes it; otherwise at the next write or
        // flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_ended {
            this.pending.put_u32(0);
            this.write_ended = true;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn sessions_follow_each_other_on_one_stream() {
        let (a, b) = tokio::io::duplex(64);
        let (mut a, mut b) = (Framed::new(a), Framed::new(b));
        for round in 0..3u8 {
            let big = vec![round; MAX_FRAME + 10];
            let writer = async {
                a.write_all(b"hello ").await.unwrap();
                a.write_all(&big).await.unwrap();
                a.shutdown().await.unwrap();
            };
            let reader = async {
                let mut got = Vec::new();
                b.read_to_end(&mut got).await.unwrap();
                got
            };
            let ((), got) = tokio::join!(writer, reader);
            assert_eq!(&got[..6], b"hello ");
            assert_eq!(&got[6..], &big[..]);
            // The other way, empty: just the end.
            b.shutdown().await.unwrap();
            let mut none = Vec::new();
            a.read_to_end(&mut none).await.unwrap();
            assert!(none.is_empty());
            assert!(a.reusable() && b.reusable());
            a.next_session();
            b.next_session();
        }
    }

    #[tokio::test]
    async fn a_closed_stream_or_an_oversized_frame_is_an_error() {
        let (a, b) = tokio::io::duplex(64);
        let mut b = Framed::new(b);
        let mut raw = a;
        raw.write_all(&[0, 0, 0, 3, b'a']).await.unwrap();
        drop(raw);
        let mut got = Vec::new();
        let e = b.read_to_end(&mut got).await.expect_err("cut mid-frame");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(!b.reusable());

        let (mut raw, b) = tokio::io::duplex(64);
        let mut b = Framed::new(b);
        raw.write_all(&((MAX_FRAME as u32) + 1).to_be_bytes())
            .await
            .unwrap();
        let e = b.read_to_end(&mut Vec::new()).await.expect_err("too big");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn nothing_is_written_after_the_end() {
        let (a, _b) = tokio::io::duplex(64);
        let mut a = Framed::new(a);
        a.shutdown().await.unwrap();
        assert!(a.write_all(b"late").await.is_err());
    }
}
