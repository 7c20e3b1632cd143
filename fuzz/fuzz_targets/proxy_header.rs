//! Arbitrary bytes through the PROXY protocol decoder, prefix by prefix as a socket would
//! deliver them: no panics, a complete header never claims more bytes than were given
//! and decodes the same from exactly its own bytes, an incomplete one never lets the
//! header grow past `MAX_HEADER`, and once decided (complete or refused) more bytes never
//! change the decision.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailgate::net::proxy::{decode, Decoded, MAX_HEADER};

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(MAX_HEADER + 64)];
    let mut decided = None;
    for cut in 0..=data.len() {
        let got = decode(&data[..cut]);
        match (&decided, &got) {
            (Some(Ok(first)), _) => assert_eq!(got.as_ref().ok(), Some(first)),
            (Some(Err(())), _) => assert!(got.is_err()),
            (None, Ok(Decoded::Incomplete { at_most })) => {
                assert!(*at_most >= 1 && cut + at_most <= MAX_HEADER);
            }
            (None, Ok(complete @ Decoded::Complete { len, .. })) => {
                assert!(*len <= cut && *len > 0);
                assert_eq!(decode(&data[..*len]).ok(), Some(*complete));
                decided = Some(Ok(*complete));
            }
            (None, Err(_)) => decided = Some(Err(())),
        }
    }
});
