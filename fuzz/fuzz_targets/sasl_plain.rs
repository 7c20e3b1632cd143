//! A decoded SASL PLAIN message (RFC 4616) through its parser: no panics; whatever parses
//! has a non-empty identity and password of at most 255 octets each, joins back to exactly
//! the input, and shows no password in `Debug`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailgate::auth::plain::{parse, MAX_FIELD_LEN};

fuzz_target!(|data: &[u8]| {
    let msg = match parse(data) {
        Ok(msg) => msg,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    assert!(!msg.authcid.is_empty() && !msg.password.is_empty());
    for field in [msg.authzid, msg.authcid, msg.password] {
        assert!(field.len() <= MAX_FIELD_LEN && !field.contains('\0'));
    }
    let joined = [msg.authzid, msg.authcid, msg.password].join("\0");
    assert_eq!(joined.as_bytes(), data);
    // Exactly the identities and a placeholder: nothing of the password shows.
    let want = format!(
        "PlainMessage {{ authzid: {:?}, authcid: {:?}, password: \"<redacted>\" }}",
        msg.authzid, msg.authcid
    );
    assert_eq!(format!("{msg:?}"), want);
});
