//! SASL PLAIN (RFC 4616) message decoding.
//! Pure parsing: it neither checks the password nor logs any field.

use super::AuthError;

/// RFC 4616 §2: each field holds at most 255 octets of UTF-8.
pub const MAX_FIELD_LEN: usize = 255;

/// The three fields of a PLAIN message; `Debug` hides the password.
pub struct PlainMessage<'a> {
    /// Empty when the client asked to act as itself.
    pub authzid: &'a str,
    pub authcid: &'a str,
    pub password: &'a str,
}

impl std::fmt::Debug for PlainMessage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlainMessage")
            .field("authzid", &self.authzid)
            .field("authcid", &self.authcid)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Parses the decoded (not base64) PLAIN message `authzid NUL authcid NUL passwd`.
pub fn parse(decoded: &[u8]) -> Result<PlainMessage<'_>, AuthError> {
    let mut fields = decoded.split(|&b| b == 0);
    let (Some(authzid), Some(authcid), Some(password), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(AuthError::Malformed(
            "PLAIN needs exactly two NUL separators",
        ));
    };
    if authcid.is_empty() {
        return Err(AuthError::Malformed(
            "PLAIN authentication identity is empty",
        ));
    }
    if password.is_empty() {
        return Err(AuthError::Malformed("PLAIN password is empty"));
    }
    if [authzid, authcid, password]
        .iter()
        .any(|f| f.len() > MAX_FIELD_LEN)
    {
        return Err(AuthError::Malformed("PLAIN field longer than 255 octets"));
    }
    let text = |field| {
        std::str::from_utf8(field).map_err(|_| AuthError::Malformed("PLAIN field is not UTF-8"))
    };
    Ok(PlainMessage {
        authzid: text(authzid)?,
        authcid: text(authcid)?,
        password: text(password)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_well_formed_messages() {
        let long = "x".repeat(MAX_FIELD_LEN);
        let long_msg = format!("{long}\0{long}\0{long}");
        let cases: [(&[u8], &str, &str, &str); 6] = [
            (b"\0tim\0tanstaaftanstaaf", "", "tim", "tanstaaftanstaaf"),
            (b"Ursel\0Kurt\0xipj3plmq", "Ursel", "Kurt", "xipj3plmq"),
            (b"\0a\0b", "", "a", "b"),
            (
                b"\0user@example.org\0pass word with spaces",
                "",
                "user@example.org",
                "pass word with spaces",
            ),
            ("\0jörg\0p\u{e4}ss☃".as_bytes(), "", "jörg", "päss☃"),
            (long_msg.as_bytes(), &long, &long, &long),
        ];
        for (input, authzid, authcid, password) in cases {
            let msg = parse(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!(
                (msg.authzid, msg.authcid, msg.password),
                (authzid, authcid, password)
            );
        }
    }

    #[test]
    fn rejects_malformed_messages() {
        let long = "x".repeat(MAX_FIELD_LEN + 1);
        let too_long = [
            format!("{long}\0a\0b"),
            format!("\0{long}\0b"),
            format!("\0a\0{long}"),
        ];
        let mut cases: Vec<&[u8]> = vec![
            b"",
            b"\0",
            b"\0\0",
            b"\0\0password",
            b"\0user\0",
            b"user\0password",
            b"userpassword",
            b"\0user\0pass\0",
            b"\0user\0pa\0ss",
            b"\0\0\0",
            b"\0us\xffer\0password",
            b"\0user\0pass\xc3",
            b"\xc3\0user\0pass",
        ];
        cases.extend(too_long.iter().map(|s| s.as_bytes()));
        for input in cases {
            assert!(
                matches!(parse(input), Err(AuthError::Malformed(_))),
                "{input:?}"
            );
        }
    }

    #[test]
    fn debug_hides_the_password() {
        let msg = parse(b"admin\0tim\0s3cr3t-value").unwrap();
        let shown = format!("{msg:?}");
        assert!(!shown.contains("s3cr3t-value"), "{shown}");
        assert!(shown.contains("tim") && shown.contains("admin"), "{shown}");
    }
}
