//! The forwarding preamble a home reads first on the replica link: any line parses or
//! fails without panicking, and whatever parses encodes back to a line that parses to
//! the same preamble.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailgate::cluster::Preamble;

fuzz_target!(|data: &[u8]| {
    let Ok(preamble) = Preamble::parse(data) else {
        return;
    };
    let line = preamble.encode();
    assert!(line.ends_with(b"\r\n"));
    assert_eq!(Preamble::parse(&line[..line.len() - 2]), Ok(preamble));
});
