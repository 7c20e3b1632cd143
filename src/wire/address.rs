//! Mailbox names as they arrive in commands: `local@domain` syntax, normalisation to
//! lower case, and the limits that keep a name from ever forming a path outside its
//! domain's directory. Pure: std only.

/// The reserved local part every mail domain must accept (RFC 5321 §4.5.1).
pub const POSTMASTER: &str = "postmaster";

/// A name that is not a valid mailbox or domain; carries the start of the input. The
/// texts say what a valid name looks like, so callers add nothing to them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("invalid domain name {0:?}: {DOMAIN_EXPECTED}")]
    Domain(String),
    #[error("invalid address {0:?}: {ADDRESS_EXPECTED}")]
    Address(String),
}

/// What an error about a malformed address tells the operator to give instead.
pub const ADDRESS_EXPECTED: &str = "expected local@domain";

/// What an error about a malformed domain name tells the operator to give instead.
pub const DOMAIN_EXPECTED: &str =
    "expected dot-separated labels of letters, digits and inner hyphens";

/// A validated, lower-cased `local@domain`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Address {
    pub local: String,
    pub domain: String,
}

impl Address {
    /// Parses and normalises (lower-case) an address; rejects anything that could escape
    /// the domain directory or that is not a plausible mailbox name.
    ///
    /// Nothing is trimmed: surrounding whitespace is an error, so the caller decides what
    /// a protocol allows around a name. Only ASCII is accepted (no SMTPUTF8 mailboxes;
    /// internationalised domains arrive as A-labels).
    pub fn parse(s: &str) -> Result<Address, AddressError> {
        let invalid = || AddressError::Address(clip(s));
        let mut parts = s.split('@');
        let (Some(local), Some(domain), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(invalid());
        };
        let local = validate_local(local).ok_or_else(invalid)?;
        let domain = normalise_domain(domain).ok_or_else(invalid)?;
        Ok(Address { local, domain })
    }
}

/// Longest local part (RFC 5321 §4.5.3.1.1).
pub const MAX_LOCAL_LEN: usize = 64;
/// Longest domain name in its textual form (RFC 1035 §2.3.4, without the root dot).
pub const MAX_DOMAIN_LEN: usize = 253;
/// Longest DNS label (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;

/// Validates a hosted domain name and returns it lower-cased.
///
/// Every `Directory` method goes through this, so `Example.ORG` and `example.org` are
/// the same domain and no accepted name can contain a path separator or be `.`/`..`:
/// labels are `[a-z0-9-]`, 1 to 63 octets, not starting or ending with `-`; a single
/// label (`localhost`) is allowed, a trailing root dot is not.
pub fn validate_domain(name: &str) -> Result<String, AddressError> {
    normalise_domain(name).ok_or_else(|| AddressError::Domain(clip(name)))
}

fn normalise_domain(name: &str) -> Option<String> {
    if name.is_empty() || name.len() > MAX_DOMAIN_LEN {
        return None;
    }
    let lower = name.to_ascii_lowercase();
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= MAX_LABEL_LEN
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    lower.split('.').all(label_ok).then_some(lower)
}

/// Validates a local part and returns it lower-cased: printable ASCII without `/`, `\`
/// or `@` (so it can never name a path or split an address), not starting with `.`
/// (which also rules out `.` and `..`).
pub fn validate_local(local: &str) -> Option<String> {
    let ok = !local.is_empty()
        && local.len() <= MAX_LOCAL_LEN
        && !local.starts_with('.')
        && local
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b'\\' | b'@'));
    ok.then(|| local.to_ascii_lowercase())
}

/// Hostile input can be arbitrarily long; errors keep only its start.
fn clip(s: &str) -> String {
    const KEEP: usize = 320;
    if s.len() <= KEEP {
        return s.to_owned();
    }
    let mut end = KEEP;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_normalises_good_addresses() {
        let long_local = "l".repeat(MAX_LOCAL_LEN);
        let label = "d".repeat(MAX_LABEL_LEN);
        // 4 labels of 63 + 3 dots = 255; trim to exactly 253.
        let long_domain = format!("{label}.{label}.{label}.{}", "e".repeat(61));
        assert_eq!(long_domain.len(), MAX_DOMAIN_LEN);
        let cases: Vec<(String, &str, String)> = vec![
            ("a@b".into(), "a", "b".into()),
            (
                "Bob.Smith@Example.ORG".into(),
                "bob.smith",
                "example.org".into(),
            ),
            (
                "x+tag@sub.example.org".into(),
                "x+tag",
                "sub.example.org".into(),
            ),
            (
                "postmaster@localhost".into(),
                "postmaster",
                "localhost".into(),
            ),
            ("o'neil@x-y.z9".into(), "o'neil", "x-y.z9".into()),
            ("a.b..c.@x.y".into(), "a.b..c.", "x.y".into()),
            (
                "!#$%&*=?^_`{|}~@1.2".into(),
                "!#$%&*=?^_`{|}~",
                "1.2".into(),
            ),
            (format!("{long_local}@a"), long_local.as_str(), "a".into()),
            (format!("a@{long_domain}"), "a", long_domain.clone()),
            (
                "A@XN--BCHER-KVA.EXAMPLE".into(),
                "a",
                "xn--bcher-kva.example".into(),
            ),
        ];
        for (input, local, domain) in cases {
            let addr = Address::parse(&input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!(addr.local, local, "{input:?}");
            assert_eq!(addr.domain, domain, "{input:?}");
            assert_eq!(addr.to_string(), format!("{local}@{domain}"));
        }
    }

    #[test]
    fn rejects_bad_addresses() {
        let label = "d".repeat(MAX_LABEL_LEN);
        let too_long_domain = format!("{label}.{label}.{label}.{}", "e".repeat(62));
        let cases: Vec<String> = vec![
            "".into(),
            "@".into(),
            "a".into(),
            "a@".into(),
            "@b".into(),
            "a@@b".into(),
            "a@b@c".into(),
            " a@b".into(),
            "a@b ".into(),
            "a@b\r\n".into(),
            "a b@c".into(),
            "a\t@b".into(),
            "a\0b@c".into(),
            "a@b\0".into(),
            // Path traversal and separators, on either side.
            "a@../b".into(),
            "a@..".into(),
            "a@.".into(),
            "a@b/c".into(),
            "a@b\\c".into(),
            "../x@y".into(),
            "..@y".into(),
            ".@y".into(),
            ".x@y".into(),
            "a/b@c".into(),
            "a\\b@c".into(),
            // Malformed domains.
            "a@-b.c".into(),
            "a@b-.c".into(),
            "a@b..c".into(),
            "a@.b".into(),
            "a@b.".into(),
            "a@b_c.d".into(),
            "a@[127.0.0.1]".into(),
            "a@b:25".into(),
            // Non-ASCII either side.
            "é@x.org".into(),
            "a@bücher.example".into(),
            "a\u{7f}@x".into(),
            // Lengths.
            format!("{}@a", "l".repeat(MAX_LOCAL_LEN + 1)),
            format!("a@{too_long_domain}"),
            format!("a@{}.b", "d".repeat(MAX_LABEL_LEN + 1)),
        ];
        for input in cases {
            match Address::parse(&input) {
                Err(AddressError::Address(_)) => {}
                other => panic!("{input:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn validates_domains() {
        assert_eq!(validate_domain("Example.ORG").unwrap(), "example.org");
        assert_eq!(validate_domain("localhost").unwrap(), "localhost");
        assert_eq!(validate_domain("a-b.c1").unwrap(), "a-b.c1");
        for bad in [
            "", ".", "..", "../x", "a/b", "a\\b", "a..b", ".a", "a.", "-a", "a-", "a b", "a\0",
        ] {
            match validate_domain(bad) {
                Err(AddressError::Domain(_)) => {}
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn errors_clip_hostile_input() {
        let huge = format!("{}@x", "é".repeat(10_000));
        let Err(AddressError::Address(kept)) = Address::parse(&huge) else {
            panic!("accepted");
        };
        assert!(kept.len() < 400, "{}", kept.len());
        assert!(kept.ends_with("..."));
    }
}
