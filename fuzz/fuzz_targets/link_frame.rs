//! The replica link's framing (`cluster::frame::Framed`) both ways, over in-memory streams.
//! Reading arbitrary bytes, two sessions in a row on one link, with reads of a fuzzed
//! size: no panics, and exactly what a plain reading of the format gives — the payload
//! octets in order, then the end frame (having consumed exactly up to it), an oversized
//! frame refused as invalid data, or a cut stream as an unexpected end. Writing: any data
//! in any write sizes comes back unchanged, in frames of at most `MAX_FRAME` and one end
//! frame, and nothing is written after the end.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailgate::cluster::frame::{Framed, MAX_FRAME};
use std::future::Future;
use std::io::ErrorKind;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Runs a future over in-memory streams, which never wait.
fn now<F: Future>(f: F) -> F::Output {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("an in-memory stream never waits"),
    }
}

#[derive(Debug, PartialEq)]
enum End {
    /// The end frame, after this many octets of input.
    Ended(usize),
    TooBig,
    Cut,
}

/// A plain reading of the format: payload octets and how the session ends.
fn reference(input: &[u8]) -> (Vec<u8>, End) {
    let (mut out, mut at) = (Vec::new(), 0);
    loop {
        let Some(head) = input.get(at..at + 4) else {
            return (out, End::Cut);
        };
        at += 4;
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if len == 0 {
            return (out, End::Ended(at));
        }
        if len > MAX_FRAME {
            return (out, End::TooBig);
        }
        let Some(payload) = input.get(at..at + len) else {
            out.extend_from_slice(&input[at..]);
            return (out, End::Cut);
        };
        out.extend_from_slice(payload);
        at += len;
    }
}

/// Reads one session from `framed` in reads of at most `size` octets.
fn read_session(framed: &mut Framed<&[u8]>, size: usize) -> (Vec<u8>, Option<ErrorKind>) {
    let (mut out, mut buf) = (Vec::new(), vec![0u8; size]);
    loop {
        match now(framed.read(&mut buf)) {
            Ok(0) => return (out, None),
            Ok(n) => {
                assert!(n <= size);
                out.extend_from_slice(&buf[..n]);
            }
            Err(e) => return (out, Some(e.kind())),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the read and write sizes.
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let read_size = usize::from(first & 0x0f) * 37 + 1;
    let write_size = usize::from(first >> 4) * 97 + 1;

    let mut framed = Framed::new(input);
    let mut offset = 0;
    for _session in 0..2 {
        let (want, end) = reference(&input[offset..]);
        let (got, error) = read_session(&mut framed, read_size);
        assert_eq!(got, want);
        match end {
            End::Ended(used) => {
                assert_eq!(error, None);
                assert!(framed.read_ended());
                offset += used;
            }
            End::TooBig | End::Cut => {
                let kind = if end == End::Cut {
                    ErrorKind::UnexpectedEof
                } else {
                    ErrorKind::InvalidData
                };
                assert_eq!(error, Some(kind));
                return;
            }
        }
        // The reader holds nothing back: the rest is still in the stream.
        framed.next_session();
    }
    assert_eq!(framed.into_inner(), &input[offset..]);

    let mut framed = Framed::new(Vec::new());
    for piece in input.chunks(write_size) {
        now(framed.write_all(piece)).expect("writing to memory");
    }
    now(framed.shutdown()).expect("ending to memory");
    assert!(now(framed.write_all(b"late")).is_err());
    let written = framed.into_inner();
    let (payload, end) = reference(&written);
    assert_eq!(payload, input);
    assert_eq!(end, End::Ended(written.len()));
    let mut back = Framed::new(&written[..]);
    assert_eq!(read_session(&mut back, read_size), (input.to_vec(), None));
    assert!(back.read_ended());
});
