//! Dot-stuffing round trip: any message, CRLF-normalised as delivery stores it, comes
//! back unchanged through `BodyEncoder` then `DotUnstuffer`, and the decoder stops
//! exactly at the encoder's terminator (no smuggled end inside the message).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mailgate::pop3::codec::{BodyEncoder, BodyOptions};
use mailgate::wire::crlf as message;
use mailgate::wire::DotUnstuffer;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk sizes for encoding and decoding.
    let Some((&first, raw)) = data.split_first() else {
        return;
    };
    let enc_chunk = usize::from(first & 0x0f) + 1;
    let dec_chunk = usize::from(first >> 4) + 1;
    let input = message::normalize(raw);

    let mut encoder = BodyEncoder::full(BodyOptions::default());
    let mut encoded = BytesMut::new();
    for piece in input.chunks(enc_chunk) {
        assert!(encoder.encode(piece, &mut encoded));
    }
    encoder.finish(&mut encoded);

    let mut decoder = DotUnstuffer::new();
    let mut decoded = BytesMut::new();
    let mut consumed = 0;
    for piece in encoded.chunks(dec_chunk) {
        let progress = decoder.decode(piece, &mut decoded);
        consumed += progress.consumed;
        if progress.done {
            break;
        }
    }
    assert!(decoder.is_done());
    assert_eq!(consumed, encoded.len());
    assert_eq!(&decoded[..], &input[..]);

    // Raw (unnormalised) bytes through TOP must still end exactly at the terminator.
    let mut top = BodyEncoder::top(u32::from(first % 4), BodyOptions { replace_nul: true });
    let mut cut = BytesMut::new();
    top.encode(raw, &mut cut);
    top.finish(&mut cut);
    let mut check = DotUnstuffer::new();
    let progress = check.decode(&cut, &mut BytesMut::new());
    assert!(progress.done);
    assert_eq!(progress.consumed, cut.len());
});
