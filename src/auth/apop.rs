//! APOP (RFC 1939 §7): MD5 over the greeting's timestamp and a shared secret.

/// The banner timestamp `<pid.nonce@host>` a greeting offers.
pub fn make_timestamp(hostname: &str) -> String {
    let _ = hostname;
    todo!()
}

/// True when `digest_hex` (lower-case hex) equals MD5(timestamp + secret); constant-time.
pub fn verify(timestamp: &str, secret: &str, digest_hex: &str) -> bool {
    let _ = (timestamp, secret, digest_hex);
    todo!()
}
