//! Password hashes imported from Dovecot: a passwd-file's `{SCHEME}data` field made into
//! `Credentials` that verify without the plaintext, and the verification of the legacy
//! ones at login. Supported: `{ARGON2ID}`/`{ARGON2I}` (PHC strings), `{SHA512-CRYPT}`
//! (`$6$`), `{SHA256-CRYPT}` (`$5$`), `{BLF-CRYPT}` (bcrypt `$2a$`/`$2b$`/`$2y$`),
//! `{MD5-CRYPT}` (`$1$`, also as Dovecot's `{MD5}` alias), and `{CRYPT}` (Dovecot's
//! default scheme, libc crypt(3)) when its `$id$` is one of those or yescrypt's `$y$`.
//! Plaintext forms (`{PLAIN}`, `{CLEAR}`, `{CLEARTEXT}` and their `.B64`/`.HEX`
//! encodings) are hashed to argon2id with SCRAM keys here and never stored.
//!
//! The schemes are the crates' (`sha-crypt`, `bcrypt`, `md5crypt`, `yescrypt`); this
//! module only reads the scheme name, checks the string's shape and bounds its cost. A
//! legacy hash is stored as `{SCHEME}data` in `Credentials::phc` (the brace never starts
//! a PHC string), so `verify_password` recognises it; yescrypt, which Dovecot knows only
//! as `{CRYPT}`, is stored as `{YESCRYPT}$y$…`. Errors name the scheme, never the hash.

use super::{hash_credentials, AuthError, Credentials, HashParams, PhcError};

/// Most rounds of an imported SHA-crypt hash. glibc's default is 5 000; 1 000 000 costs
/// about half a second of one core for `$6$` (`docs/OPERATIONS.md`), so a hostile
/// passwd-file cannot make one login cost more.
pub const MAX_SHA_CRYPT_ROUNDS: u64 = 1_000_000;
/// The fewest rounds SHA-crypt uses: glibc raises lower counts to this, so a hash that
/// names fewer was not made by it.
const MIN_SHA_CRYPT_ROUNDS: u64 = 1_000;
/// SHA-crypt's rounds when the hash names none.
const DEFAULT_SHA_CRYPT_ROUNDS: u64 = 5_000;
/// Highest bcrypt cost of an imported hash (2^14 rounds, about one second of one core);
/// Dovecot's default is 5, common settings 10 to 12.
pub const MAX_BCRYPT_COST: u32 = 14;
/// Most memory (KiB) an imported yescrypt hash may ask for, `N`·`r`·128 bytes: the argon2
/// ceiling (`MAX_HASH_MEMORY_KIB`, 64 MiB), which the hashing pool budgets per thread.
/// That is libxcrypt's cost 7 (about 0.25 s of one core, `docs/OPERATIONS.md`); its
/// default, cost 5 (`$y$j9T$`), is 16 MiB.
pub const MAX_YESCRYPT_MEMORY_KIB: u64 = super::MAX_HASH_MEMORY_KIB as u64;
/// Highest yescrypt `t` (more passes over the same memory; libxcrypt always writes 0):
/// 3 about doubles the time of 0.
pub const MAX_YESCRYPT_TIME: u32 = 3;
/// Most yescrypt lanes `p` (libxcrypt always writes 1; in yescrypt's scrypt-compatible
/// modes each lane is another full pass).
pub const MAX_YESCRYPT_PARALLELISM: u32 = 1;
/// Largest yescrypt block size `r` (libxcrypt writes 8 or 32). With `N` bounded by the
/// memory ceiling, this keeps the working memory besides `N`·`r`·128 bytes to kilobytes.
pub const MAX_YESCRYPT_BLOCK_SIZE: u32 = 64;
/// Longest yescrypt salt in its base64 characters (libxcrypt writes 22, 16 bytes).
const MAX_YESCRYPT_SALT: usize = 64;
/// yescrypt's output in base64 characters (32 bytes, as libxcrypt writes it).
const YESCRYPT_HASH_LEN: usize = 43;
/// Longest MD5-crypt salt: glibc and libxcrypt cut longer ones to 8, so no hash they
/// made has more.
const MAX_MD5_CRYPT_SALT: usize = 8;
/// MD5-crypt's output in base64 characters (16 bytes).
const MD5_CRYPT_HASH_LEN: usize = 22;

/// The canonical scheme names a stored legacy hash carries.
const SHA512_CRYPT: &str = "SHA512-CRYPT";
const SHA256_CRYPT: &str = "SHA256-CRYPT";
const BLF_CRYPT: &str = "BLF-CRYPT";
const MD5_CRYPT: &str = "MD5-CRYPT";
/// Not a Dovecot scheme (Dovecot verifies `$y$` through crypt(3) as `{CRYPT}`): the name
/// mailgate stores and logs yescrypt hashes under.
const YESCRYPT: &str = "YESCRYPT";

/// Why a passwd-file password field cannot become credentials. Never contains the hash
/// or the password; the scheme is shown as the file names it (cut and made printable).
#[derive(Debug, thiserror::Error)]
pub enum ImportHashError {
    #[error("no password")]
    Empty,
    #[error("unknown password scheme {0}")]
    Unknown(String),
    #[error("password scheme {0} is not supported ({1})")]
    Unsupported(String, &'static str),
    #[error("malformed {0} hash: {1}")]
    Malformed(String, &'static str),
    #[error("{scheme} hash too costly ({cost}; the accepted maximum is {max})")]
    TooCostly { scheme: String, cost: u64, max: u64 },
    /// A cost above its ceiling whose value the hash's crate does not tell (yescrypt's `t`).
    #[error("{scheme} hash too costly ({what} above the accepted maximum {max})")]
    TooCostlyAbove {
        scheme: String,
        what: &'static str,
        max: u64,
    },
    #[error("{0} hash: {1}")]
    Phc(String, PhcError),
    /// A bare PHC string (no `{SCHEME}`) that is not an acceptable argon2id hash.
    #[error("{0}")]
    PhcString(PhcError),
    #[error("cannot hash the {0} password: {1}")]
    Hash(String, AuthError),
}

/// Credentials from the password field of a Dovecot passwd-file line: `{SCHEME}data`,
/// or data alone (Dovecot's default scheme, CRYPT). Hashes are kept as they are and
/// verified at login; plaintext forms are hashed here (argon2id and SCRAM keys at
/// `params`: blocking and costly). Costs above `params.ceiling()` (argon2) or the
/// `MAX_*` ceilings here are refused.
pub fn credentials_from_dovecot(
    field: &str,
    params: &HashParams,
) -> Result<Credentials, ImportHashError> {
    let (scheme, data) = split_scheme(field)?;
    let (base, encoding) = match scheme.split_once('.') {
        Some((base, encoding)) => (base, Some(encoding)),
        None => (scheme.as_str(), None),
    };
    match base {
        "PLAIN" | "CLEAR" | "CLEARTEXT" => {
            let password = decode_plain(&scheme, data, encoding)?;
            if password.is_empty() {
                return Err(ImportHashError::Empty);
            }
            hash_credentials(&password, params, true).map_err(|e| ImportHashError::Hash(scheme, e))
        }
        _ if encoding.is_some() => Err(ImportHashError::Unsupported(
            scheme,
            "only plaintext schemes may name an encoding",
        )),
        _ => credentials_from_hash(&scheme, data, params),
    }
}

/// Credentials from a hash of a scheme that needs no plaintext: `{SCHEME}data` or a PHC
/// string, as a provisioning file or `user add` may give one. Plaintext schemes are
/// refused here (`credentials_from_dovecot` takes them).
pub fn credentials_from_stored_hash(
    field: &str,
    params: &HashParams,
) -> Result<Credentials, ImportHashError> {
    if !field.starts_with('{') {
        return super::credentials_from_phc(field, params).map_err(ImportHashError::PhcString);
    }
    let (scheme, data) = split_scheme(field)?;
    credentials_from_hash(&scheme, data, params)
}

/// `{SCHEME}` and the rest, the scheme upper-cased (Dovecot's are case-insensitive);
/// no braces: CRYPT.
fn split_scheme(field: &str) -> Result<(String, &str), ImportHashError> {
    if field.is_empty() {
        return Err(ImportHashError::Empty);
    }
    let Some(rest) = field.strip_prefix('{') else {
        return Ok(("CRYPT".into(), field));
    };
    let Some((scheme, data)) = rest.split_once('}') else {
        // Where the scheme would end is unknown: the rest may be the hash.
        return Err(ImportHashError::Malformed(
            "{…".into(),
            "no closing brace after the scheme",
        ));
    };
    Ok((printable(scheme).to_ascii_uppercase(), data))
}

/// A scheme name as errors show it: at most 32 characters, control and non-ASCII ones
/// as `?`.
fn printable(scheme: &str) -> String {
    scheme
        .chars()
        .take(32)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

fn decode_plain(
    scheme: &str,
    data: &str,
    encoding: Option<&str>,
) -> Result<Vec<u8>, ImportHashError> {
    use base64::Engine;
    match encoding {
        None => Ok(data.as_bytes().to_vec()),
        Some("B64" | "BASE64") => base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|_| ImportHashError::Malformed(scheme.into(), "not valid base64")),
        Some("HEX") => decode_hex(data)
            .ok_or_else(|| ImportHashError::Malformed(scheme.into(), "not valid hex")),
        Some(_) => Err(ImportHashError::Unknown(scheme.into())),
    }
}

fn decode_hex(data: &str) -> Option<Vec<u8>> {
    if !data.len().is_multiple_of(2) {
        return None;
    }
    (0..data.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(data.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The credentials of a stored hash of a known scheme.
fn credentials_from_hash(
    scheme: &str,
    data: &str,
    params: &HashParams,
) -> Result<Credentials, ImportHashError> {
    let stored = match scheme {
        "ARGON2ID" | "ARGON2I" => return argon2_credentials(scheme, data, params),
        "SHA512-CRYPT" => sha_crypt_hash(scheme, data, "$6$", SHA512_CRYPT)?,
        "SHA256-CRYPT" => sha_crypt_hash(scheme, data, "$5$", SHA256_CRYPT)?,
        "BLF-CRYPT" => bcrypt_hash(scheme, data)?,
        "MD5-CRYPT" => md5_crypt_hash(scheme, data)?,
        // Dovecot's MD5 is MD5-CRYPT when the data is a `$1$` string, else PLAIN-MD5.
        "MD5" if data.starts_with("$1$") => md5_crypt_hash(scheme, data)?,
        "MD5" => {
            return Err(ImportHashError::Unsupported(
                "MD5 (PLAIN-MD5)".into(),
                "an unsalted digest: reset or rehash it in Dovecot, then import",
            ))
        }
        "CRYPT" => crypt(data, params)?,
        "PLAIN" | "CLEAR" | "CLEARTEXT" => {
            return Err(ImportHashError::Unsupported(
                scheme.into(),
                "a plaintext password is not a hash",
            ))
        }
        "PLAIN-TRUNC" => {
            return Err(ImportHashError::Unsupported(
                scheme.into(),
                "a truncated password cannot be rehashed",
            ))
        }
        _ => return Err(ImportHashError::Unknown(scheme.into())),
    };
    Ok(Credentials {
        phc: stored,
        scram: None,
        apop_secret: None,
    })
}

/// `{CRYPT}`: libc crypt(3), by the hash's `$id$`.
fn crypt(data: &str, params: &HashParams) -> Result<String, ImportHashError> {
    let scheme = "CRYPT";
    if data.starts_with("$6$") {
        sha_crypt_hash(scheme, data, "$6$", SHA512_CRYPT)
    } else if data.starts_with("$5$") {
        sha_crypt_hash(scheme, data, "$5$", SHA256_CRYPT)
    } else if ["$2a$", "$2b$", "$2y$"].iter().any(|p| data.starts_with(p)) {
        bcrypt_hash(scheme, data)
    } else if data.starts_with("$argon2") {
        // glibc has no argon2, but libxcrypt-based systems may: take it as the PHC it is.
        super::credentials_from_phc(data, params)
            .map(|c| c.phc)
            .map_err(|e| ImportHashError::Phc(scheme.into(), e))
    } else if data.starts_with("$1$") {
        md5_crypt_hash(scheme, data)
    } else if data.starts_with("$y$") {
        yescrypt_hash(scheme, data)
    } else if data.starts_with("$7$") || data.starts_with("$gy$") {
        Err(ImportHashError::Unsupported(
            "CRYPT ($7$/$gy$)".into(),
            "no maintained crate verifies it: reset or rehash it in Dovecot, then import",
        ))
    } else if data.len() == 13 && !data.starts_with('$') {
        Err(ImportHashError::Unsupported(
            "CRYPT (traditional DES)".into(),
            "no maintained crate verifies it: reset or rehash it in Dovecot, then import",
        ))
    } else {
        Err(ImportHashError::Malformed(
            scheme.into(),
            "not a crypt(3) hash of a known kind",
        ))
    }
}

/// `{ARGON2ID}`/`{ARGON2I}`: the PHC string Dovecot (libsodium) writes. argon2id is
/// kept like any imported PHC hash; argon2i is kept as it is (verified by the same
/// code) and rehashed at the first login.
fn argon2_credentials(
    scheme: &str,
    data: &str,
    params: &HashParams,
) -> Result<Credentials, ImportHashError> {
    let phc_err = |e| ImportHashError::Phc(scheme.into(), e);
    let wanted = if scheme == "ARGON2ID" {
        "$argon2id$"
    } else {
        "$argon2i$"
    };
    if !data.starts_with(wanted) {
        return Err(ImportHashError::Malformed(
            scheme.into(),
            "the PHC string names another algorithm",
        ));
    }
    if scheme == "ARGON2ID" {
        return super::credentials_from_phc(data, params).map_err(phc_err);
    }
    super::check_argon2_phc(data, params, argon2::Algorithm::Argon2i).map_err(phc_err)?;
    Ok(Credentials {
        phc: data.to_owned(),
        scram: None,
        apop_secret: None,
    })
}

/// Checks a SHA-crypt string's shape and rounds; returns it as stored.
fn sha_crypt_hash(
    scheme: &str,
    data: &str,
    prefix: &str,
    canonical: &str,
) -> Result<String, ImportHashError> {
    let hash_len = if canonical == SHA512_CRYPT { 86 } else { 43 };
    let malformed = |why| ImportHashError::Malformed(scheme.into(), why);
    let rounds = sha_crypt_rounds(data, prefix, hash_len).map_err(malformed)?;
    if rounds < MIN_SHA_CRYPT_ROUNDS {
        return Err(malformed("fewer than 1000 rounds"));
    }
    if rounds > MAX_SHA_CRYPT_ROUNDS {
        return Err(ImportHashError::TooCostly {
            scheme: scheme.into(),
            cost: rounds,
            max: MAX_SHA_CRYPT_ROUNDS,
        });
    }
    Ok(format!("{{{canonical}}}{data}"))
}

/// The rounds of a `$5$`/`$6$` string `[rounds=N$]salt$hash`, its shape checked: a salt
/// of at most 16 characters without `$`, a hash of `hash_len` crypt-base64 characters.
fn sha_crypt_rounds(data: &str, prefix: &str, hash_len: usize) -> Result<u64, &'static str> {
    let rest = data.strip_prefix(prefix).ok_or("wrong $id$ prefix")?;
    let mut parts: Vec<&str> = rest.split('$').collect();
    let rounds = match parts.first().and_then(|p| p.strip_prefix("rounds=")) {
        Some(n) => {
            let n = n
                .parse::<u64>()
                .ok()
                .filter(|_| n.bytes().all(|b| b.is_ascii_digit()))
                .ok_or("rounds is not a number")?;
            parts.remove(0);
            n
        }
        None => DEFAULT_SHA_CRYPT_ROUNDS,
    };
    let [salt, hash] = parts[..] else {
        return Err("expected salt and hash");
    };
    if salt.len() > 16 || !salt.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("bad salt");
    }
    if hash.len() != hash_len || !hash.bytes().all(is_crypt64) {
        return Err("bad hash length or character");
    }
    Ok(rounds)
}

/// Checks a bcrypt string (the crate's parser) and its cost; returns it as stored.
fn bcrypt_hash(scheme: &str, data: &str) -> Result<String, ImportHashError> {
    if data.starts_with("$2x$") {
        return Err(ImportHashError::Unsupported(
            scheme.into(),
            "$2x$ is the broken pre-2011 variant",
        ));
    }
    let parts: bcrypt::HashParts = data
        .parse()
        .map_err(|_| ImportHashError::Malformed(scheme.into(), "not a bcrypt string"))?;
    let cost = parts.get_cost();
    if !(4..=31).contains(&cost) {
        return Err(ImportHashError::Malformed(
            scheme.into(),
            "cost out of range",
        ));
    }
    if cost > MAX_BCRYPT_COST {
        return Err(ImportHashError::TooCostly {
            scheme: scheme.into(),
            cost: u64::from(cost),
            max: u64::from(MAX_BCRYPT_COST),
        });
    }
    Ok(format!("{{{BLF_CRYPT}}}{data}"))
}

/// Checks an MD5-crypt string's shape (`$1$salt$hash`: a salt of at most 8 characters
/// without `$`, 22 crypt-base64 characters of hash); returns it as stored. Its cost is
/// fixed (1 000 MD5 rounds).
fn md5_crypt_hash(scheme: &str, data: &str) -> Result<String, ImportHashError> {
    let malformed = |why| ImportHashError::Malformed(scheme.into(), why);
    let rest = data
        .strip_prefix("$1$")
        .ok_or(malformed("not a $1$ string"))?;
    let Some((salt, hash)) = rest.split_once('$') else {
        return Err(malformed("expected salt and hash"));
    };
    if salt.len() > MAX_MD5_CRYPT_SALT || !salt.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(malformed("bad salt"));
    }
    if hash.len() != MD5_CRYPT_HASH_LEN || !hash.bytes().all(is_crypt64) {
        return Err(malformed("bad hash length or character"));
    }
    Ok(format!("{{{MD5_CRYPT}}}{data}"))
}

/// Checks a yescrypt string (`$y$params$salt$hash`) with the crate's parsers and its
/// costs against the `MAX_YESCRYPT_*` ceilings; returns it as stored.
fn yescrypt_hash(scheme: &str, data: &str) -> Result<String, ImportHashError> {
    let scheme = format!("{scheme} ($y$, yescrypt)");
    let malformed = |why| ImportHashError::Malformed(scheme.clone(), why);
    let rest = data
        .strip_prefix("$y$")
        .ok_or(malformed("not a $y$ string"))?;
    let [setting, salt, hash] = rest.split('$').collect::<Vec<_>>()[..] else {
        return Err(malformed("expected parameters, salt and hash"));
    };
    if salt.is_empty() || salt.len() > MAX_YESCRYPT_SALT || !salt.bytes().all(is_crypt64) {
        return Err(malformed("bad salt"));
    }
    if hash.len() != YESCRYPT_HASH_LEN || !hash.bytes().all(is_crypt64) {
        return Err(malformed("bad hash length or character"));
    }
    let params: yescrypt::Params = setting
        .parse()
        .map_err(|_| malformed("bad or unsupported parameters"))?;
    let (n, r, p) = (params.n(), params.r(), params.p());
    let too_costly = |cost: u64, max: u64| ImportHashError::TooCostly {
        scheme: scheme.clone(),
        cost,
        max,
    };
    if r > MAX_YESCRYPT_BLOCK_SIZE {
        return Err(too_costly(u64::from(r), u64::from(MAX_YESCRYPT_BLOCK_SIZE)));
    }
    // N·r·128 bytes, in KiB; N is a power of two up to 2^63.
    let memory_kib = n.saturating_mul(u64::from(r)) / 8;
    if memory_kib > MAX_YESCRYPT_MEMORY_KIB {
        return Err(too_costly(memory_kib, MAX_YESCRYPT_MEMORY_KIB));
    }
    if p > MAX_YESCRYPT_PARALLELISM {
        return Err(too_costly(
            u64::from(p),
            u64::from(MAX_YESCRYPT_PARALLELISM),
        ));
    }
    // The crate keeps `t` and the mode to itself: the parameters must be among those it
    // builds from N, r, p, a mode and a `t` within the ceiling.
    let modes = [
        yescrypt::Mode::Rw,
        yescrypt::Mode::Worm,
        yescrypt::Mode::Classic,
    ];
    let within = modes.into_iter().any(|mode| {
        (0..=MAX_YESCRYPT_TIME).any(|t| {
            yescrypt::Params::new_with_all_params(mode, n, r, p, t, 0).is_ok_and(|q| q == params)
        })
    });
    if !within {
        return Err(ImportHashError::TooCostlyAbove {
            scheme,
            what: "t",
            max: u64::from(MAX_YESCRYPT_TIME),
        });
    }
    // What the verifier decodes: the whole string, the salt and the hash.
    let parsed =
        yescrypt::PasswordHashRef::new(data).map_err(|_| malformed("not an MCF string"))?;
    let decodes = parsed
        .fields()
        .skip(1)
        .all(|field| field.decode_base64(mcf::Base64::Crypt).is_ok());
    if !decodes {
        return Err(malformed("salt or hash is not valid base64"));
    }
    Ok(format!("{{{YESCRYPT}}}{data}"))
}

/// A character of crypt(3)'s base64 alphabet (`./0-9A-Za-z`).
fn is_crypt64(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'.' || b == b'/'
}

/// A stored legacy hash: its canonical scheme and the crypt string.
pub(super) struct Legacy<'a> {
    pub scheme: &'static str,
    data: &'a str,
}

impl<'a> Legacy<'a> {
    /// The legacy hash `phc` holds, if it holds one (`{SCHEME}data`).
    pub fn parse(phc: &'a str) -> Option<Legacy<'a>> {
        let rest = phc.strip_prefix('{')?;
        let (scheme, data) = rest.split_once('}')?;
        let scheme = [SHA512_CRYPT, SHA256_CRYPT, BLF_CRYPT, MD5_CRYPT, YESCRYPT]
            .into_iter()
            .find(|s| *s == scheme)?;
        Some(Legacy { scheme, data })
    }

    /// Whether `password` matches (blocking, costly; constant-time compares, the crates'
    /// or, for MD5-crypt, ours). A hash over the ceilings never matches. SHA-crypt takes
    /// the password as text, so a non-UTF-8 password never matches one. Nor does one
    /// with a NUL byte match any: crypt(3) reads C strings, so none of these hashes is of
    /// such a password, and where the password keys an HMAC (yescrypt's scrypt mode)
    /// `pw` and `pw\0` would otherwise both match, and the upgrade keep the second.
    pub fn verify(&self, password: &[u8]) -> bool {
        if password.contains(&0) || self.check().is_err() {
            return false;
        }
        match self.scheme {
            SHA512_CRYPT => std::str::from_utf8(password)
                .is_ok_and(|p| sha_crypt::sha512_check(p, self.data).is_ok()),
            SHA256_CRYPT => std::str::from_utf8(password)
                .is_ok_and(|p| sha_crypt::sha256_check(p, self.data).is_ok()),
            MD5_CRYPT => {
                // The checked shape: `$1$salt$hash`.
                let salt = self.data[3..].split('$').next().unwrap_or_default();
                let made = md5crypt::md5crypt(password, salt.as_bytes());
                subtle::ConstantTimeEq::ct_eq(made.as_slice(), self.data.as_bytes()).into()
            }
            YESCRYPT => {
                use yescrypt::PasswordVerifier;
                yescrypt::Yescrypt::default()
                    .verify_password(password, self.data)
                    .is_ok()
            }
            _ => bcrypt::verify(password, self.data).unwrap_or(false),
        }
    }

    /// Whether verifying allocates working memory of its own, as much as the argon2
    /// ceiling (yescrypt).
    pub fn allocates(&self) -> bool {
        self.scheme == YESCRYPT
    }

    /// Whether the hash is of the right shape and within the ceilings, as the import
    /// accepts it.
    pub fn check(&self) -> Result<(), ImportHashError> {
        match self.scheme {
            SHA512_CRYPT => sha_crypt_hash(self.scheme, self.data, "$6$", SHA512_CRYPT).map(drop),
            SHA256_CRYPT => sha_crypt_hash(self.scheme, self.data, "$5$", SHA256_CRYPT).map(drop),
            MD5_CRYPT => md5_crypt_hash(self.scheme, self.data).map(drop),
            YESCRYPT => yescrypt_hash(self.scheme, self.data).map(drop),
            _ => bcrypt_hash(self.scheme, self.data).map(drop),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{
        is_legacy, make_credentials, needs_upgrade, scheme, upgraded, verify_password, ScramKeys,
    };
    use super::*;

    // Made with `openssl passwd -6 -salt Xq3Zp9Lm pencil` (5 000 rounds, the default).
    const SHA512: &str = "$6$Xq3Zp9Lm$KeKwt7zj6L3uoD/lzx0ujct4NGEVO3U7N0Pr8VmDWp5Rs9iS9ZZMYKWyf.WjSxoYNaNKcOwEzGPc52oVEZu9b.";
    // Python's crypt (libxcrypt): crypt.crypt('pencil', '$6$rounds=1000$Xq3Zp9Lm$').
    const SHA512_ROUNDS: &str = "$6$rounds=1000$Xq3Zp9Lm$4oqBIvjeY0GAfkjWPbAt0FmCF9oOc4FwaMdwqHIOe6uDzNanrUEQuj.LyNU3S4j8XA0ggWGy9apX2U6AwR/KW1";
    // crypt.crypt('pässwörd ☃', '$6$rounds=1000$Xq3Zp9Lm$'): UTF-8 bytes.
    const SHA512_UTF8: &str = "$6$rounds=1000$Xq3Zp9Lm$2l9mThdFq9C2DLtACGZZ1MhdRMZs2Lii9K8lli3uDNq7rAkjG5r468HeREFjVsYp85AwP4Vytqaa0i4Qytdyx.";
    // `openssl passwd -5 -salt Xq3Zp9Lm pencil`.
    const SHA256: &str = "$5$Xq3Zp9Lm$z1H6cv53tiW.QGr01puBu7S2fHkoXIr9HqQbNE1ezt9";
    // crypt.crypt('pencil', '$5$rounds=1000$Xq3Zp9Lm$').
    const SHA256_ROUNDS: &str =
        "$5$rounds=1000$Xq3Zp9Lm$1CUV0fmfwiE2Q/ezhkj9y/jfGvBKQRtdVV.EbmpitwD";
    // crypt.crypt('pencil', '$2y$05$abcdefghijklmnopqrstuu'), as Dovecot's BLF-CRYPT writes.
    const BCRYPT_2Y: &str = "$2y$05$abcdefghijklmnopqrstuu680Yiaj5hFUaJTH/rTAcbA2PQEGfiZu";
    // crypt.crypt('pencil', '$2b$04$abcdefghijklmnopqrstuu') and the same with $2a$.
    const BCRYPT_2B: &str = "$2b$04$abcdefghijklmnopqrstuu/FyAyuZSl3DbPdvio4KrIBdz2k2yhV2";
    const BCRYPT_2A: &str = "$2a$04$abcdefghijklmnopqrstuu/FyAyuZSl3DbPdvio4KrIBdz2k2yhV2";
    // crypt.crypt('pässwörd ☃', '$2b$04$abcdefghijklmnopqrstuu').
    const BCRYPT_UTF8: &str = "$2b$04$abcdefghijklmnopqrstuu4SmA3hVMbWKmJVGcHRDZ6Y7bUU/SMZe";
    // `openssl passwd -1 -salt Xq3Zp9Lm pencil` (and `mkpasswd -m md5crypt -S Xq3Zp9Lm
    // pencil`, the same string).
    const MD5: &str = "$1$Xq3Zp9Lm$GovETaYfLLpt/jmkb/txg.";
    // `doveadm pw -s MD5-CRYPT -p pencil` and `doveadm pw -s MD5 -p pencil` (Dovecot
    // 2.3.19), whole passwd-file fields.
    const MD5_DOVEADM: &str = "{MD5-CRYPT}$1$87ZDym/5$k7Pq2zieab4.SxJnA2uxE0";
    const MD5_ALIAS_DOVEADM: &str = "{MD5}$1$8AUtuMDB$FJGZ9Ud6XFtIWZvqiA4QV.";
    // `openssl passwd -1 -salt ab 'pässwörd ☃'` and `openssl passwd -1 -salt '' pencil`.
    const MD5_UTF8: &str = "$1$ab$0X/E6TKXdATiT6zFlxJEL/";
    const MD5_NO_SALT: &str = "$1$$I9U3L93k1pmqVqSR.zXfQ0";
    // `mkpasswd -m yescrypt pencil` (whois 5.5.17, libxcrypt 4.4.33, Debian 12): its
    // default, cost 5 (N 4096, r 32: 16 MiB), and `-R 1` (N 1024, r 8: 1 MiB).
    const YESCRYPT: &str =
        "$y$j9T$VtniJlJWZmH3t9uKXrlGz.$6UUMJTn3v628S11k9zJRE3Xh4VBQ/mpCPHCwpuVTtq2";
    const YESCRYPT_R1: &str =
        "$y$j75$2HNGvgdtESLC7q9ImLIec0$IvnBidOKDU0iQvqKzPUB/Hj7WErf89RNY6jY/xHkLu4";
    // `mkpasswd -m yescrypt 'pässwörd ☃'`.
    const YESCRYPT_UTF8: &str =
        "$y$j9T$UAoOqEHwvnbVHrT3gnqn90$sx4g5LJPUQnVqqq1wR96Iji8LVinAz0LM2qMujdp1A9";
    // libxcrypt through Python's crypt, settings mkpasswd does not write:
    // crypt.crypt('pencil', '$y$j9T/0$Xq3Zp9LmXq3Zp9LmXq3Zp.$') (t = 3), and the same with
    // '$y$j9T/1$…' (t = 4), '$y$j9T..$…' (p = 2), '$y$/9T$…' (write-once/read-many mode)
    // and '$y$.9T$…' (classic scrypt mode).
    const YESCRYPT_T3: &str =
        "$y$j9T/0$Xq3Zp9LmXq3Zp9LmXq3Zp.$E0soWgNqpMNmCibvxbdNikak7ZO99Sw7M5MrsTLRsb5";
    const YESCRYPT_T4: &str =
        "$y$j9T/1$Xq3Zp9LmXq3Zp9LmXq3Zp.$MzFOiA9/2QlYPGtHvYEOIFWc6nOUcB6fk7dfs4493JC";
    const YESCRYPT_P2: &str =
        "$y$j9T..$Xq3Zp9LmXq3Zp9LmXq3Zp.$WD2XwbbsW4kH9t9ogJCrFxS9SX9ootCHS3V363ftkN9";
    const YESCRYPT_WORM: &str =
        "$y$/9T$Xq3Zp9LmXq3Zp9LmXq3Zp.$kfEi41UERlCqqDI9xFsJ68pSEvaxzKBckrcx0Lc9dxA";
    const YESCRYPT_CLASSIC: &str =
        "$y$.9T$Xq3Zp9LmXq3Zp9LmXq3Zp.$KE4FMGl9W1oaLGQGnSZhrbRjwHD1mTqfvr4FZDTBfzD";
    // `mkpasswd -m descrypt -S ab pencil`.
    const DES: &str = "abJ32bJMdTsnY";

    fn params() -> HashParams {
        HashParams::cheap()
    }

    fn import(field: &str) -> Result<Credentials, ImportHashError> {
        credentials_from_dovecot(field, &params())
    }

    /// Every supported crypt scheme verifies its right password only, whichever way
    /// the passwd-file names it, and is stored under its canonical scheme.
    #[test]
    fn crypt_schemes_verify_known_vectors() {
        let cases = [
            (
                format!("{{SHA512-CRYPT}}{SHA512}"),
                "SHA512-CRYPT",
                "pencil",
            ),
            (
                format!("{{sha512-crypt}}{SHA512_ROUNDS}"),
                "SHA512-CRYPT",
                "pencil",
            ),
            (format!("{{CRYPT}}{SHA512}"), "SHA512-CRYPT", "pencil"),
            (SHA512_ROUNDS.to_owned(), "SHA512-CRYPT", "pencil"),
            (
                format!("{{SHA512-CRYPT}}{SHA512_UTF8}"),
                "SHA512-CRYPT",
                "pässwörd ☃",
            ),
            (
                format!("{{SHA256-CRYPT}}{SHA256}"),
                "SHA256-CRYPT",
                "pencil",
            ),
            (
                format!("{{CRYPT}}{SHA256_ROUNDS}"),
                "SHA256-CRYPT",
                "pencil",
            ),
            (format!("{{BLF-CRYPT}}{BCRYPT_2Y}"), "BLF-CRYPT", "pencil"),
            (format!("{{BLF-CRYPT}}{BCRYPT_2B}"), "BLF-CRYPT", "pencil"),
            (format!("{{CRYPT}}{BCRYPT_2A}"), "BLF-CRYPT", "pencil"),
            (BCRYPT_UTF8.to_owned(), "BLF-CRYPT", "pässwörd ☃"),
            (format!("{{MD5-CRYPT}}{MD5}"), "MD5-CRYPT", "pencil"),
            (format!("{{CRYPT}}{MD5}"), "MD5-CRYPT", "pencil"),
            (MD5.to_owned(), "MD5-CRYPT", "pencil"),
            (MD5_DOVEADM.to_owned(), "MD5-CRYPT", "pencil"),
            (MD5_ALIAS_DOVEADM.to_owned(), "MD5-CRYPT", "pencil"),
            (
                format!("{{md5-crypt}}{MD5_UTF8}"),
                "MD5-CRYPT",
                "pässwörd ☃",
            ),
            (format!("{{MD5-CRYPT}}{MD5_NO_SALT}"), "MD5-CRYPT", "pencil"),
            (format!("{{CRYPT}}{YESCRYPT}"), "YESCRYPT", "pencil"),
            (YESCRYPT.to_owned(), "YESCRYPT", "pencil"),
            (format!("{{crypt}}{YESCRYPT_R1}"), "YESCRYPT", "pencil"),
            (YESCRYPT_UTF8.to_owned(), "YESCRYPT", "pässwörd ☃"),
            (YESCRYPT_T3.to_owned(), "YESCRYPT", "pencil"),
            (YESCRYPT_WORM.to_owned(), "YESCRYPT", "pencil"),
            (YESCRYPT_CLASSIC.to_owned(), "YESCRYPT", "pencil"),
        ];
        for (field, canonical, password) in cases {
            let creds = import(&field).unwrap_or_else(|e| panic!("{field}: {e}"));
            assert!(creds.scram.is_none() && creds.apop_secret.is_none());
            assert_eq!(scheme(&creds), canonical, "{field}");
            assert!(
                creds.phc.starts_with(&format!("{{{canonical}}}$")),
                "{field}"
            );
            assert!(is_legacy(&creds) && needs_upgrade(&creds, &params()));
            assert!(check_credentials_ok(&creds), "{field}");
            assert!(
                verify_password(&creds, password.as_bytes(), &params()),
                "{field}"
            );
            for wrong in ["", "pencil ", "Pencil", "pencil\0", "\u{ff}"] {
                assert!(
                    !verify_password(&creds, wrong.as_bytes(), &params()),
                    "{field} {wrong:?}"
                );
            }
            assert!(!verify_password(&creds, b"\xff\xfe", &params()), "{field}");
        }
    }

    fn check_credentials_ok(creds: &Credentials) -> bool {
        super::super::check_credentials(creds, &params()).is_ok()
    }

    /// A legacy hash verified at login becomes argon2id at the configured costs, with
    /// SCRAM keys made from the same password: every crypt scheme.
    #[test]
    fn an_upgrade_replaces_a_legacy_hash_and_adds_scram_keys() {
        for field in [
            format!("{{BLF-CRYPT}}{BCRYPT_2B}"),
            format!("{{SHA512-CRYPT}}{SHA512}"),
            MD5_DOVEADM.to_owned(),
            format!("{{CRYPT}}{MD5}"),
            format!("{{CRYPT}}{YESCRYPT}"),
        ] {
            let creds = import(&field).unwrap();
            assert!(needs_upgrade(&creds, &params()), "{field}");
            let new = upgraded(&creds, b"pencil", &params()).unwrap();
            assert_eq!(scheme(&new), "ARGON2ID", "{field}");
            assert!(!is_legacy(&new) && !needs_upgrade(&new, &params()));
            assert!(verify_password(&new, b"pencil", &params()), "{field}");
            assert!(!verify_password(&new, b"pencil2", &params()), "{field}");
            let keys = new.scram.expect("SCRAM keys");
            assert!(ScramKeys::derive(b"pencil", &keys.salt, keys.iterations) == keys);
        }
    }

    /// yescrypt verifies in memory of its own: the caller's argon2 buffer is given back
    /// first, so a hashing thread never holds both.
    #[test]
    fn yescrypt_frees_the_argon2_buffer_first() {
        let creds = import(YESCRYPT).unwrap();
        let mut memory = vec![argon2::Block::default(); 1024];
        assert!(super::super::verify_password_in(
            &creds,
            b"pencil",
            &params(),
            &mut memory
        ));
        assert_eq!(memory.capacity(), 0);
        let md5 = import(MD5).unwrap();
        let mut memory = vec![argon2::Block::default(); 1024];
        assert!(super::super::verify_password_in(
            &md5,
            b"pencil",
            &params(),
            &mut memory
        ));
        assert_eq!(
            memory.len(),
            1024,
            "MD5-crypt needs no memory: the buffer stays"
        );
    }

    /// Dovecot's argon2 PHC strings: argon2id kept as imported (and at the first login);
    /// argon2i kept, verified
    /// and upgraded at the first login; costs over the ceiling refused.
    #[test]
    fn argon2_schemes_are_imported_within_the_ceiling() {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let made = make_credentials("pencil", &params()).unwrap();
        let id = import(&format!("{{ARGON2ID}}{}", made.phc)).unwrap();
        assert_eq!(id.phc, made.phc);
        // Kept at the first login too, which only adds the SCRAM keys it lacks.
        assert!(!is_legacy(&id) && id.scram.is_none() && needs_upgrade(&id, &params()));
        let first = upgraded(&id, b"pencil", &params()).unwrap();
        assert_eq!(first.phc, made.phc);
        assert!(first.scram.is_some() && !needs_upgrade(&first, &params()));
        // argon2i as libsodium (Dovecot) writes it, made here with the argon2 crate.
        let argon2i = argon2::Argon2::new(
            argon2::Algorithm::Argon2i,
            argon2::Version::V0x13,
            argon2::Params::new(1024, 2, 1, None).unwrap(),
        )
        .hash_password(
            b"pencil",
            &SaltString::from_b64("c2FsdHNhbHRzYWx0").unwrap(),
        )
        .unwrap()
        .to_string();
        assert!(
            argon2i.starts_with("$argon2i$v=19$m=1024,t=2,p=1$"),
            "{argon2i}"
        );
        let i = import(&format!("{{ARGON2I}}{argon2i}")).unwrap();
        assert_eq!((scheme(&i), is_legacy(&i)), ("ARGON2I", true));
        assert!(needs_upgrade(&i, &params()) && check_credentials_ok(&i));
        assert!(verify_password(&i, b"pencil", &params()));
        assert!(!verify_password(&i, b"pencil!", &params()));
        // The wrong algorithm under a scheme, and costs above the ceiling.
        assert!(matches!(
            import(&format!("{{ARGON2I}}{}", made.phc)),
            Err(ImportHashError::Malformed(..))
        ));
        let huge = made.phc.replace("m=1024", "m=4194304");
        assert!(matches!(
            import(&format!("{{ARGON2ID}}{huge}")),
            Err(ImportHashError::Phc(_, PhcError::TooCostly { .. }))
        ));
        let huge_i = argon2i.replace("t=2", "t=1000");
        assert!(matches!(
            import(&format!("{{ARGON2I}}{huge_i}")),
            Err(ImportHashError::Phc(_, PhcError::TooCostly { .. }))
        ));
    }

    /// Plaintext forms become argon2id with SCRAM keys; the plaintext is kept nowhere.
    #[test]
    fn plaintext_forms_are_hashed_with_scram_keys() {
        for field in [
            "{PLAIN}pencil",
            "{plain}pencil",
            "{CLEAR}pencil",
            "{CLEARTEXT}pencil",
            "{PLAIN.B64}cGVuY2ls",
            "{PLAIN.BASE64}cGVuY2ls",
            "{CLEARTEXT.HEX}70656e63696c",
        ] {
            let creds = import(field).unwrap_or_else(|e| panic!("{field}: {e}"));
            assert_eq!(scheme(&creds), "ARGON2ID");
            assert!(!creds.phc.contains("pencil"));
            assert!(verify_password(&creds, b"pencil", &params()), "{field}");
            assert!(!verify_password(&creds, b"pencil2", &params()), "{field}");
            let keys = creds.scram.expect("SCRAM keys");
            assert!(ScramKeys::derive(b"pencil", &keys.salt, keys.iterations) == keys);
        }
        // Passwords with spaces and colons are passwords too.
        let creds = import("{PLAIN}a b:c").unwrap();
        assert!(verify_password(&creds, b"a b:c", &params()));
    }

    /// Unknown and unsupported schemes, malformed and costly hashes: an error naming the
    /// scheme, never the hash or password, and never a panic.
    #[test]
    fn hostile_fields_are_refused_by_scheme() {
        let secret = "SeCrEt";
        let too_many_rounds = SHA512_ROUNDS.replace("rounds=1000", "rounds=999999999");
        let costly_bcrypt = BCRYPT_2B.replace("$04$", "$20$");
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "no password"),
            (format!("{{SSHA}}{secret}"), "unknown password scheme SSHA"),
            (format!("{{SHA512.HEX}}{secret}"), "not supported"),
            (DES.to_owned(), "traditional DES) is not supported"),
            (format!("{{CRYPT}}{DES}"), "reset or rehash it in Dovecot"),
            (
                format!("{{CRYPT}}$7$CU..../....{secret}$abc"),
                "CRYPT ($7$/$gy$) is not supported",
            ),
            (
                format!("{{MD5}}{secret}"),
                "MD5 (PLAIN-MD5) is not supported",
            ),
            (format!("{{MD5}}{secret}"), "then import"),
            // MD5-crypt: salt over 8 characters, hash cut or too long, no hash, a
            // character outside crypt's base64, trailing fields.
            (
                MD5.replace("Xq3Zp9Lm", "Xq3Zp9LmX"),
                "malformed CRYPT hash: bad salt",
            ),
            (
                format!(
                    "{{MD5-CRYPT}}$1${}$GovETaYfLLpt/jmkb/txg.",
                    "s".repeat(5000)
                ),
                "bad salt",
            ),
            (
                format!("{{MD5-CRYPT}}{}", &MD5[..30]),
                "malformed MD5-CRYPT",
            ),
            (format!("{{MD5-CRYPT}}{MD5}A"), "bad hash length"),
            (
                format!("{{MD5-CRYPT}}$1${secret}"),
                "expected salt and hash",
            ),
            (
                format!("{{MD5-CRYPT}}{}", MD5.replace('.', "é")),
                "malformed",
            ),
            (
                format!("{{MD5-CRYPT}}{}", MD5.replace('G', "\0")),
                "malformed",
            ),
            (format!("{{MD5-CRYPT}}{MD5}$x"), "bad hash length"),
            (format!("{{MD5-CRYPT}}{SHA512}"), "not a $1$ string"),
            (format!("{{MD5}}{SHA512}"), "PLAIN-MD5"),
            // yescrypt: the ceilings (4 GiB, 1 GiB as r, t 4, p 2), then malformed
            // strings.
            (
                YESCRYPT.replace("j9T", "jHT"),
                "too costly (4194304; the accepted maximum is 65536)",
            ),
            (YESCRYPT.replace("j9T", "jbT"), "too costly (4398046511104;"),
            (
                YESCRYPT.replace("j9T", "j.s4r"),
                "too costly (1000; the accepted maximum is 64)",
            ),
            (
                YESCRYPT.replace("j9T", "j9kE"),
                "too costly (65; the accepted maximum is 64)",
            ),
            (YESCRYPT.replace("j9T", "j9T/s4r"), "too costly (t above"),
            (
                YESCRYPT_T4.to_owned(),
                "too costly (t above the accepted maximum 3)",
            ),
            (
                YESCRYPT_P2.to_owned(),
                "too costly (2; the accepted maximum is 1)",
            ),
            (
                YESCRYPT.replace("j9T", "jzT"),
                "malformed CRYPT ($y$, yescrypt)",
            ),
            (
                YESCRYPT.replace("j9T", "j"),
                "bad or unsupported parameters",
            ),
            (YESCRYPT.replace("j9T", ""), "bad or unsupported parameters"),
            (
                YESCRYPT.replace("j9T", "k9T"),
                "bad or unsupported parameters",
            ),
            (
                YESCRYPT.replace("j9T", "j9T3/"),
                "bad or unsupported parameters",
            ),
            (
                YESCRYPT.replace("j9T", "jC559"),
                "bad or unsupported parameters",
            ),
            (
                YESCRYPT.replace("j9T", "j9T!"),
                "bad or unsupported parameters",
            ),
            (
                YESCRYPT.replace("VtniJlJWZmH3t9uKXrlGz.", &"Vt".repeat(40)),
                "bad salt",
            ),
            (YESCRYPT.replace("VtniJlJWZmH3t9uKXrlGz.", ""), "bad salt"),
            (
                YESCRYPT.replace("VtniJlJWZmH3t9uKXrlGz.", "VtniJlJWZ"),
                "salt or hash is not valid base64",
            ),
            (format!("{YESCRYPT}A"), "bad hash length"),
            (YESCRYPT[..60].to_owned(), "bad hash length"),
            (format!("{YESCRYPT}$"), "expected parameters, salt and hash"),
            (
                format!("$y$j9T${secret}"),
                "expected parameters, salt and hash",
            ),
            ("$y$$$".to_owned(), "bad salt"),
            (
                format!("{{CRYPT}}{}", YESCRYPT.replace('V', "\n")),
                "bad salt",
            ),
            (
                format!("{{PLAIN-TRUNC}}10-{secret}"),
                "PLAIN-TRUNC is not supported",
            ),
            (
                format!("{{PLAIN.ROT13}}{secret}"),
                "unknown password scheme PLAIN.ROT13",
            ),
            (format!("{{PLAIN.B64}}!!{secret}"), "not valid base64"),
            (format!("{{PLAIN.HEX}}7{secret}"), "not valid hex"),
            ("{PLAIN}".to_owned(), "no password"),
            (format!("{{SHA512-CRYPT{secret}"), "no closing brace"),
            (
                format!("{{SHA512-CRYPT}}{}", &SHA512[..40]),
                "malformed SHA512-CRYPT",
            ),
            (
                format!("{{SHA512-CRYPT}}{SHA256}"),
                "malformed SHA512-CRYPT",
            ),
            (
                format!("{{SHA256-CRYPT}}{SHA512}"),
                "malformed SHA256-CRYPT",
            ),
            (
                format!("{{SHA512-CRYPT}}{SHA512}\0"),
                "malformed SHA512-CRYPT",
            ),
            (
                format!("{{SHA512-CRYPT}}{SHA512}$x"),
                "malformed SHA512-CRYPT",
            ),
            (
                SHA512_ROUNDS.replace("rounds=1000", "rounds=10"),
                "fewer than 1000 rounds",
            ),
            (
                SHA512_ROUNDS.replace("rounds=1000", "rounds=-5"),
                "rounds is not a number",
            ),
            (
                SHA512_ROUNDS.replace("rounds=1000", "rounds=99999999999999999999999"),
                "rounds is not a number",
            ),
            (
                format!("{{SHA512-CRYPT}}{too_many_rounds}"),
                "too costly (999999999",
            ),
            (format!("{{BLF-CRYPT}}{costly_bcrypt}"), "too costly (20"),
            (
                format!("{{BLF-CRYPT}}{}", &BCRYPT_2B[..59]),
                "malformed BLF-CRYPT",
            ),
            (
                format!("{{BLF-CRYPT}}{}é", &BCRYPT_2B[..58]),
                "malformed BLF-CRYPT",
            ),
            (
                format!("{{BLF-CRYPT}}{}", BCRYPT_2B.replace("$2b$", "$2x$")),
                "broken",
            ),
            (
                format!("{{BLF-CRYPT}}{}", BCRYPT_2B.replace("$04$", "$99$")),
                "cost out of range",
            ),
            (format!("{{ARGON2ID}}{secret}"), "malformed ARGON2ID"),
            (format!("{{ARGON2ID}}$argon2id${secret}"), "ARGON2ID hash"),
            (
                format!("{{\u{7}ev\nil}}{secret}"),
                "unknown password scheme ?EV?IL",
            ),
            (
                format!("{{{}}}{secret}", "X".repeat(500)),
                "unknown password scheme XXXX",
            ),
        ];
        for (field, want) in cases {
            let e = match import(&field) {
                Ok(_) => panic!("{field:?} accepted"),
                Err(e) => e.to_string(),
            };
            assert!(e.contains(want), "{field:?}: {e}");
            assert!(!e.contains(secret) && !e.contains("Xq3Zp9Lm"), "{e}");
            assert!(!e.contains("VtniJlJWZ") && !e.contains("GovETaYf"), "{e}");
            assert!(e.len() < 160, "{e}");
        }
    }

    /// A legacy hash that got into the store past the import checks never verifies
    /// when over the ceilings, and the server refuses such credentials from a client.
    #[test]
    fn stored_legacy_hashes_over_the_ceiling_never_verify() {
        let costly = Credentials {
            phc: format!("{{BLF-CRYPT}}{}", BCRYPT_2B.replace("$04$", "$31$")),
            scram: None,
            apop_secret: None,
        };
        assert!(!verify_password(&costly, b"pencil", &params()));
        assert!(!check_credentials_ok(&costly));
        let garbage = Credentials {
            phc: "{SHA512-CRYPT}garbage".into(),
            ..costly.clone()
        };
        assert!(!verify_password(&garbage, b"pencil", &params()));
        assert!(!check_credentials_ok(&garbage));
        // yescrypt at 4 GiB or t = 4 (the latter a real hash of "pencil"), MD5-crypt with
        // a long salt: never run, never stored.
        for phc in [
            format!("{{YESCRYPT}}{}", YESCRYPT.replace("j9T", "jHT")),
            format!("{{YESCRYPT}}{YESCRYPT_T4}"),
            format!("{{YESCRYPT}}{MD5}"),
            format!(
                "{{MD5-CRYPT}}{}",
                MD5.replace("Xq3Zp9Lm", "Xq3Zp9LmXq3Zp9Lm")
            ),
            format!("{{MD5-CRYPT}}{YESCRYPT}"),
        ] {
            let creds = Credentials {
                phc: phc.clone(),
                ..costly.clone()
            };
            assert!(!verify_password(&creds, b"pencil", &params()), "{phc}");
            assert!(!check_credentials_ok(&creds), "{phc}");
        }
        for phc in [
            format!("{{YESCRYPT}}{YESCRYPT}"),
            format!("{{MD5-CRYPT}}{MD5}"),
        ] {
            let creds = Credentials {
                phc: phc.clone(),
                ..costly.clone()
            };
            assert!(verify_password(&creds, b"pencil", &params()), "{phc}");
            assert!(check_credentials_ok(&creds), "{phc}");
        }
        for phc in [
            "",
            "plain text",
            "{PLAIN}pencil",
            "$argon2d$v=19$m=1024,t=1,p=1$c2FsdHNhbHQ$aGFzaA",
        ] {
            let creds = Credentials {
                phc: phc.into(),
                ..costly.clone()
            };
            assert!(!check_credentials_ok(&creds), "{phc}");
        }
        assert!(check_credentials_ok(
            &make_credentials("pencil", &params()).unwrap()
        ));
        let mut weak = make_credentials("pencil", &params()).unwrap();
        if let Some(keys) = weak.scram.as_mut() {
            keys.iterations = 1;
        }
        assert!(!check_credentials_ok(&weak));
    }

    /// What a provisioning file may hold: argon2id PHC strings and legacy hashes, never
    /// a plaintext password.
    #[test]
    fn stored_hashes_exclude_plaintext() {
        let made = make_credentials("pencil", &params()).unwrap();
        assert!(credentials_from_stored_hash(&made.phc, &params()).is_ok());
        let creds =
            credentials_from_stored_hash(&format!("{{SHA512-CRYPT}}{SHA512}"), &params()).unwrap();
        assert!(verify_password(&creds, b"pencil", &params()));
        let e = credentials_from_stored_hash("{PLAIN}pencil", &params()).unwrap_err();
        assert!(e.to_string().contains("not a hash"), "{e}");
        assert!(!e.to_string().contains("pencil"), "{e}");
        assert!(credentials_from_stored_hash(SHA512, &params()).is_err());
        // yescrypt goes by Dovecot's name for it, and is stored under its own.
        let creds =
            credentials_from_stored_hash(&format!("{{CRYPT}}{YESCRYPT}"), &params()).unwrap();
        assert_eq!(creds.phc, format!("{{YESCRYPT}}{YESCRYPT}"));
        assert!(verify_password(&creds, b"pencil", &params()));
    }
}
