//! SASL PLAIN (RFC 4616) message decoding.

use super::AuthError;

/// The three fields of a PLAIN message; `Debug` hides the password.
pub struct PlainMessage<'a> {
    pub authzid: &'a str,
    pub authcid: &'a str,
    pub password: &'a str,
}

/// Parses the decoded (not base64) PLAIN message `authzid NUL authcid NUL passwd`.
pub fn parse(decoded: &[u8]) -> Result<PlainMessage<'_>, AuthError> {
    let _ = decoded;
    todo!()
}
