//! APOP (RFC 1939 §7): MD5 over the greeting's timestamp and a shared secret.
//! Makes banner timestamps and checks digests; never logs the secret.

use md5::{Digest, Md5};
use rand::Rng;
use subtle::ConstantTimeEq;

/// The banner timestamp `<pid.nonce@host>` a greeting offers.
///
/// RFC 1939 wants it unique per greeting; the random part makes it so even across
/// connections served by the same process in the same instant.
pub fn make_timestamp(hostname: &str) -> String {
    let nonce: u64 = rand::thread_rng().gen();
    format!("<{}.{nonce:x}@{hostname}>", std::process::id())
}

/// True when `digest_hex` (lower-case hex) equals MD5(timestamp + secret); constant-time.
///
/// Upper-case hex is accepted too, since RFC 1939 only shows lower case by example.
pub fn verify(timestamp: &str, secret: &str, digest_hex: &str) -> bool {
    let mut md5 = Md5::new();
    md5.update(timestamp.as_bytes());
    md5.update(secret.as_bytes());
    let expected = to_hex(&md5.finalize());
    let offered = digest_hex.to_ascii_lowercase();
    // Lengths are public (always 32 here), so `ct_eq` failing fast on a mismatch leaks nothing.
    expected.as_bytes().ct_eq(offered.as_bytes()).into()
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0x0f)]])
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_TIMESTAMP: &str = "<1896.697170952@dbc.mtview.ca.us>";
    const RFC_DIGEST: &str = "c4c9334bac560ecc979e58001b3e22fb";

    #[test]
    fn rfc_1939_example_verifies() {
        assert!(verify(RFC_TIMESTAMP, "tanstaaf", RFC_DIGEST));
        assert!(verify(
            RFC_TIMESTAMP,
            "tanstaaf",
            &RFC_DIGEST.to_ascii_uppercase()
        ));
    }

    #[test]
    fn wrong_inputs_fail() {
        let cases = [
            (RFC_TIMESTAMP, "tanstaa", RFC_DIGEST),
            (RFC_TIMESTAMP, "tanstaaff", RFC_DIGEST),
            (RFC_TIMESTAMP, "", RFC_DIGEST),
            ("<1896.697170953@dbc.mtview.ca.us>", "tanstaaf", RFC_DIGEST),
            (
                RFC_TIMESTAMP,
                "tanstaaf",
                "c4c9334bac560ecc979e58001b3e22fa",
            ),
            (RFC_TIMESTAMP, "tanstaaf", "c4c9334bac560ecc979e58001b3e22f"),
            (
                RFC_TIMESTAMP,
                "tanstaaf",
                "c4c9334bac560ecc979e58001b3e22fb0",
            ),
            (
                RFC_TIMESTAMP,
                "tanstaaf",
                " c4c9334bac560ecc979e58001b3e22fb",
            ),
            (RFC_TIMESTAMP, "tanstaaf", ""),
            (
                RFC_TIMESTAMP,
                "tanstaaf",
                "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
            ),
        ];
        for (timestamp, secret, digest) in cases {
            assert!(
                !verify(timestamp, secret, digest),
                "{timestamp} {secret} {digest}"
            );
        }
    }

    #[test]
    fn hex_encoding_is_lower_case_and_padded() {
        assert_eq!(to_hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        assert_eq!(to_hex(&[]), "");
    }

    #[test]
    fn timestamps_are_msg_ids_and_unique() {
        let a = make_timestamp("mail.example.org");
        let b = make_timestamp("mail.example.org");
        assert_ne!(a, b);
        for ts in [&a, &b] {
            let inner = ts
                .strip_prefix('<')
                .and_then(|s| s.strip_suffix('>'))
                .unwrap();
            let (local, host) = inner.split_once('@').unwrap();
            assert_eq!(host, "mail.example.org");
            let (pid, nonce) = local.split_once('.').unwrap();
            assert_eq!(pid, std::process::id().to_string());
            assert!(!nonce.is_empty() && nonce.len() <= 16, "{nonce}");
            assert!(nonce
                .bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        }
    }

    #[test]
    fn a_digest_over_a_fresh_timestamp_round_trips() {
        let ts = make_timestamp("host");
        let mut md5 = Md5::new();
        md5.update(ts.as_bytes());
        md5.update(b"secret");
        let digest = to_hex(&md5.finalize());
        assert!(verify(&ts, "secret", &digest));
        assert!(!verify(&make_timestamp("host"), "secret", &digest));
    }
}
