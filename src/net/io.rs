//! Buffered connection I/O for every line protocol: a read buffer framed into lines by
//! `wire::LineReader`, and a write buffer that replies are encoded into and that is
//! flushed only when the session needs more input (or asks), so pipelined commands are
//! answered in order with few writes. Every read and write is bounded in time. Knows no
//! protocol: replies are encoded by the protocols' own `Reply` types into [`Io::out`].

use crate::wire::{LineError, LineReader};
use bytes::BytesMut;
use std::io::ErrorKind;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// A write buffer that grew past this (a RETR's batches) is given back after a flush,
/// so an idle session holds little memory.
const SHRINK_WBUF_ABOVE: usize = 68 * 1024;

/// What one read brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// More bytes are in the read buffer.
    More,
    /// The client closed its side.
    Closed,
    /// Nothing arrived within the limit.
    Timeout,
    /// The `cancel` token was cancelled (shutdown).
    Cancelled,
    /// The `lost` token was cancelled (POP3: the maildrop lock was lost).
    Lost,
}

/// One connection's stream and buffers.
pub struct Io<S> {
    stream: S,
    rbuf: BytesMut,
    wbuf: BytesMut,
    lines: LineReader,
    /// Bound on every write, and the default bound on reads.
    idle: Duration,
    /// Room reserved in the read buffer before a read when less than half of it is free.
    read_chunk: usize,
}

impl<S> Io<S> {
    /// Both buffers start empty, so an idle connection costs little.
    pub fn new(stream: S, idle: Duration, read_chunk: usize) -> Self {
        Io {
            stream,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            lines: LineReader::new(),
            idle,
            read_chunk,
        }
    }

    /// Like `new`, with bytes already read from the stream (a forwarded session's first
    /// command, read with the preamble).
    pub fn with_input(stream: S, idle: Duration, read_chunk: usize, input: BytesMut) -> Self {
        let mut io = Io::new(stream, idle, read_chunk);
        io.rbuf = input;
        io
    }

    /// The write buffer: replies are encoded here and sent at the next flush.
    pub fn out(&mut self) -> &mut BytesMut {
        &mut self.wbuf
    }

    /// Bytes read and not yet taken: a DATA body is decoded from here.
    pub fn input(&mut self) -> &mut BytesMut {
        &mut self.rbuf
    }

    /// Gives the stream back, dropping both buffers (and with them any bytes a client
    /// pipelined before a TLS handshake, which must never be executed).
    pub fn into_stream(self) -> S {
        self.stream
    }

    /// Gives the stream back with the bytes read and not yet taken (a session handed to
    /// another replica carries them along). Pending output is dropped: flush first.
    pub fn into_parts(self) -> (S, BytesMut) {
        (self.stream, self.rbuf)
    }

    /// The bound on every write and the default bound on reads.
    pub fn idle(&self) -> Duration {
        self.idle
    }

    /// The next whole line of at most `max` octets from what has been read, if any.
    pub fn take_line(&mut self, max: usize) -> Option<Result<BytesMut, LineError>> {
        self.lines.next_line(&mut self.rbuf, max)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Io<S> {
    /// Writes out everything buffered, each write bounded by the idle timeout (an
    /// `ErrorKind::TimedOut` error when it is over).
    pub async fn flush(&mut self) -> std::io::Result<()> {
        if !self.wbuf.is_empty() {
            match tokio::time::timeout(self.idle, self.stream.write_all(&self.wbuf)).await {
                Err(_) => return Err(ErrorKind::TimedOut.into()),
                Ok(r) => r?,
            }
            self.wbuf.clear();
            if self.wbuf.capacity() > SHRINK_WBUF_ABOVE {
                self.wbuf = BytesMut::new();
            }
        }
        tokio::time::timeout(self.idle, self.stream.flush())
            .await
            .map_err(|_| std::io::Error::from(ErrorKind::TimedOut))?
    }

    /// Flushes the replies, then reads more input within `limit` (the idle timeout when
    /// `None`), unless `cancel` or `lost` is cancelled first.
    pub async fn fill(
        &mut self,
        limit: Option<Duration>,
        cancel: &CancellationToken,
        lost: Option<&CancellationToken>,
    ) -> std::io::Result<Read> {
        self.flush().await?;
        if self.rbuf.capacity() - self.rbuf.len() < self.read_chunk / 2 {
            self.rbuf.reserve(self.read_chunk);
        }
        let lost = async {
            match lost {
                Some(t) => t.cancelled().await,
                None => std::future::pending().await,
            }
        };
        let limit = limit.unwrap_or(self.idle);
        tokio::select! {
            biased;
            _ = cancel.cancelled() => Ok(Read::Cancelled),
            _ = lost => Ok(Read::Lost),
            r = tokio::time::timeout(limit, self.stream.read_buf(&mut self.rbuf)) => match r {
                Err(_) => Ok(Read::Timeout),
                Ok(Ok(0)) => Ok(Read::Closed),
                Ok(Ok(_)) => Ok(Read::More),
                Ok(Err(e)) => Err(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn lines_replies_and_timeouts() {
        let (client, server) = tokio::io::duplex(1024);
        let mut io = Io::new(server, Duration::from_millis(200), 64);
        let (mut rd, mut wr) = tokio::io::split(client);
        wr.write_all(b"ONE\r\nTWO\r\n").await.expect("write");
        let cancel = CancellationToken::new();
        assert_eq!(io.take_line(255), None);
        assert_eq!(
            io.fill(None, &cancel, None).await.expect("fill"),
            Read::More
        );
        assert_eq!(&io.take_line(255).expect("line").expect("ok")[..], b"ONE");
        assert_eq!(&io.take_line(255).expect("line").expect("ok")[..], b"TWO");
        io.out().extend_from_slice(b"+OK\r\n");
        // Replies go out before the next read waits, which then times out.
        assert_eq!(
            io.fill(Some(Duration::from_millis(20)), &cancel, None)
                .await
                .expect("fill"),
            Read::Timeout
        );
        let mut got = [0u8; 5];
        rd.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"+OK\r\n");
        let lost = CancellationToken::new();
        lost.cancel();
        assert_eq!(
            io.fill(None, &cancel, Some(&lost)).await.expect("fill"),
            Read::Lost
        );
        cancel.cancel();
        assert_eq!(
            io.fill(None, &cancel, Some(&lost)).await.expect("fill"),
            Read::Cancelled,
            "shutdown comes first"
        );
        drop(wr);
        drop(rd);
        let fresh = CancellationToken::new();
        assert_eq!(
            io.fill(None, &fresh, None).await.expect("fill"),
            Read::Closed
        );
    }

    #[tokio::test]
    async fn a_write_nobody_reads_times_out() {
        let (_client, server) = tokio::io::duplex(16);
        let mut io = Io::new(server, Duration::from_millis(50), 64);
        io.out().extend_from_slice(&[b'x'; 1024]);
        let e = io.flush().await.expect_err("nobody reads");
        assert_eq!(e.kind(), ErrorKind::TimedOut);
    }
}
