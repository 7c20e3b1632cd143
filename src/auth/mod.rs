//! Credentials: argon2id password hashes with SCRAM-SHA-256 keys made beside them, SASL
//! response lines and PLAIN decoding, the SCRAM-SHA-256 server exchange and APOP digests.
//! Never logs or returns a secret; comparisons are constant-time.

pub mod apop;
pub mod cache;
pub mod legacy;
pub mod plain;
pub mod pool;
pub mod sasl;
pub mod scram;

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
pub use argon2::Block;
use argon2::{Algorithm, Argon2, Params, Version};
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use legacy::{credentials_from_dovecot, credentials_from_stored_hash, ImportHashError};

/// Bytes of random salt for both the argon2id hash and the SCRAM keys (RFC 9106 asks for 16).
const SALT_LEN: usize = 16;

/// The lowest SCRAM iteration count RFC 7677 §4 lets a server announce.
pub const MIN_SCRAM_ITERATIONS: u32 = 4096;

/// Default PBKDF2 rounds of new SCRAM-SHA-256 keys. The keys sit beside the argon2id hash,
/// so a leaked store is as weak as its weaker half: 4096 rounds (RFC 7677's floor) cost an
/// attacker about 1/25 of this. Every SCRAM login costs the client these rounds (about
/// 75 ms of one core); the server pays them only when it makes keys (`user passwd`, or
/// the re-key at a login). OWASP's 600 000 would cost clients ~0.7 s per login.
pub const DEFAULT_SCRAM_ITERATIONS: u32 = 100_000;

/// The largest argon2id memory cost (KiB) of a hash this server imports or verifies,
/// unless the configured cost is larger: RFC 9106's second recommendation (64 MiB). An
/// imported hash asking for more would make every login to it cost that much memory.
pub const MAX_HASH_MEMORY_KIB: u32 = 64 * 1024;
/// The largest argon2id time cost of an imported or verified hash, unless configured higher.
pub const MAX_HASH_ITERATIONS: u32 = 10;
/// The most argon2id lanes of an imported or verified hash, unless configured higher.
pub const MAX_HASH_PARALLELISM: u32 = 8;

/// The salt `dummy_verify` hashes with; any fixed value works because the output is thrown away.
const DUMMY_SALT: [u8; SALT_LEN] = *b"mailgate-dummy!!";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("malformed SASL message: {0}")]
    Malformed(&'static str),
    #[error("password hashing failed: {0}")]
    Hash(String),
}

/// argon2id cost parameters (RFC 9106); defaults are OWASP's second recommendation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    /// PBKDF2 iterations for the SCRAM-SHA-256 keys (RFC 7677 asks for at least 4096).
    pub scram_iterations: u32,
}

impl HashParams {
    /// Minimum argon2id cost, for tests and benchmarks only: it offers no real protection.
    pub const fn cheap() -> HashParams {
        HashParams {
            memory_kib: 1024,
            iterations: 1,
            parallelism: 1,
            scram_iterations: MIN_SCRAM_ITERATIONS,
        }
    }

    /// Rejects costs argon2 cannot run with and SCRAM counts below RFC 7677's floor, so a bad
    /// configuration fails at start-up rather than at the first password change.
    pub fn validate(&self) -> Result<(), AuthError> {
        self.argon2().map(|_| ())?;
        if self.scram_iterations < MIN_SCRAM_ITERATIONS {
            return Err(AuthError::Hash(format!(
                "scram_iterations {} is below the minimum {MIN_SCRAM_ITERATIONS}",
                self.scram_iterations
            )));
        }
        Ok(())
    }

    /// The costliest hash this server accepts with these as its configured costs: the
    /// `MAX_HASH_*` ceiling, raised to the configured costs where those are higher.
    pub fn ceiling(&self) -> HashParams {
        HashParams {
            memory_kib: self.memory_kib.max(MAX_HASH_MEMORY_KIB),
            iterations: self.iterations.max(MAX_HASH_ITERATIONS),
            parallelism: self.parallelism.max(MAX_HASH_PARALLELISM),
            scram_iterations: self.scram_iterations,
        }
    }

    /// Bytes of argon2 working memory one verification may need at most (see `ceiling`).
    pub fn max_memory_bytes(&self) -> u64 {
        u64::from(self.ceiling().memory_kib) * 1024
    }

    /// argon2 blocks (1 KiB each) a hash made with these costs works in.
    pub fn block_count(&self) -> usize {
        Params::new(self.memory_kib, self.iterations, self.parallelism, None)
            .unwrap_or_default()
            .block_count()
    }

    /// The argon2id hasher these costs describe.
    fn argon2(&self) -> Result<Argon2<'static>, AuthError> {
        let params = Params::new(self.memory_kib, self.iterations, self.parallelism, None)
            .map_err(|e| AuthError::Hash(e.to_string()))?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }
}

impl Default for HashParams {
    fn default() -> Self {
        Self {
            memory_kib: 19 * 1024,
            iterations: 2,
            parallelism: 1,
            scram_iterations: DEFAULT_SCRAM_ITERATIONS,
        }
    }
}

/// SCRAM-SHA-256 verifier keys (RFC 5802 §3): enough to check a proof, not to log in.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScramKeys {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl ScramKeys {
    /// Derives the verifier keys from a password (RFC 5802 §3).
    ///
    /// Strictly the password should first go through SASLprep (RFC 4013). We carry no
    /// stringprep implementation, so the password is used as its UTF-8 bytes: SASLprep is
    /// the identity on ASCII, and that is what common clients send for ASCII passwords.
    /// Non-ASCII passwords work with clients that skip SASLprep too.
    pub fn derive(password: &[u8], salt: &[u8], iterations: u32) -> ScramKeys {
        let mut salted_password = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut salted_password);
        let client_key = hmac_sha256(&salted_password, &[b"Client Key"]);
        ScramKeys {
            salt: salt.to_vec(),
            iterations,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac_sha256(&salted_password, &[b"Server Key"]),
        }
    }
}

/// Shows only the public parameters: the keys allow an offline dictionary attack.
impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramKeys")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

/// HMAC-SHA-256 of the concatenated `parts` under `key`.
pub(crate) fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // invariant: HMAC takes keys of any length, so `new_from_slice` cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// What an account stores about its secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// argon2id PHC string.
    pub phc: String,
    /// Absent for accounts made from a PHC hash alone (start-up provisioning): the keys
    /// need the password, so SCRAM-SHA-256 logins to them fail like a wrong password
    /// until `user passwd` sets one.
    #[serde(default)]
    pub scram: Option<ScramKeys>,
    /// Shared secret for APOP, only for accounts that opted in (APOP needs it in clear).
    pub apop_secret: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

/// Hashes `password` with argon2id and derives the SCRAM keys from it (blocking, costly).
///
/// The two use independent random salts, so the stored SCRAM salt says nothing about the
/// argon2id one.
pub fn make_credentials(password: &str, params: &HashParams) -> Result<Credentials, AuthError> {
    hash_credentials(password.as_bytes(), params, true)
}

/// The argon2id hash of `password`, and its SCRAM keys when `with_scram`.
fn hash_credentials(
    password: &[u8],
    params: &HashParams,
    with_scram: bool,
) -> Result<Credentials, AuthError> {
    params.validate()?;
    let salt = SaltString::generate(&mut OsRng);
    let phc = params
        .argon2()?
        .hash_password(password, &salt)
        .map_err(|e| AuthError::Hash(e.to_string()))?
        .to_string();
    let scram = with_scram.then(|| scram_keys(password, params));
    Ok(Credentials {
        phc,
        scram,
        apop_secret: None,
    })
}

/// SCRAM keys for `password` with a fresh random salt, at the configured rounds.
fn scram_keys(password: &[u8], params: &HashParams) -> ScramKeys {
    let mut scram_salt = [0u8; SALT_LEN];
    OsRng.fill_bytes(&mut scram_salt);
    // SCRAM keys come from the SASLprep form, which is what clients hash; a password
    // that is not UTF-8 (a legacy client's bytes) is used as it is.
    match std::str::from_utf8(password) {
        Ok(text) => ScramKeys::derive(
            scram_password(text).as_bytes(),
            &scram_salt,
            params.scram_iterations,
        ),
        Err(_) => ScramKeys::derive(password, &scram_salt, params.scram_iterations),
    }
}

/// Whether credentials were made with less than the configured costs: an argon2id cost
/// below the configured one, SCRAM keys with fewer rounds (whose `i=` would also tell
/// an old account from a new one) or none at all (an account made from a hash alone).
/// Unparsable hashes never verify, so never need it.
///
/// Every legacy hash (`is_legacy`: a crypt scheme or argon2i) needs it too.
pub fn needs_upgrade(creds: &Credentials, params: &HashParams) -> bool {
    if legacy::Legacy::parse(&creds.phc).is_some() {
        return true;
    }
    let Ok(parsed) = ParsedHash::parse(&creds.phc) else {
        return false;
    };
    hash_weaker(&parsed, params)
        || creds
            .scram
            .as_ref()
            .is_none_or(|keys| keys.iterations < params.scram_iterations)
}

/// Whether a parsed hash is not argon2id, or argon2id at less than a configured cost.
fn hash_weaker(parsed: &ParsedHash, params: &HashParams) -> bool {
    let p = &parsed.params;
    parsed.algorithm != Algorithm::Argon2id
        || p.m_cost() < params.memory_kib
        || p.t_cost() < params.iterations
        || p.p_cost() < params.parallelism
}

/// Whether `creds` hold a hash of another scheme than argon2id: an imported crypt hash
/// (`{SHA512-CRYPT}`, `{SHA256-CRYPT}`, `{BLF-CRYPT}`, `{MD5-CRYPT}`, `{YESCRYPT}`) or
/// argon2i.
pub fn is_legacy(creds: &Credentials) -> bool {
    scheme(creds) != "ARGON2ID"
}

/// The scheme of `creds`' hash, Dovecot's name for it, as upgrade logs name it:
/// `ARGON2ID`, `ARGON2I`, `SHA512-CRYPT`, `SHA256-CRYPT`, `BLF-CRYPT`, `MD5-CRYPT`,
/// `YESCRYPT` (Dovecot's `{CRYPT}` with `$y$`), or `UNKNOWN`.
pub fn scheme(creds: &Credentials) -> &'static str {
    if let Some(legacy) = legacy::Legacy::parse(&creds.phc) {
        return legacy.scheme;
    }
    match ParsedHash::parse(&creds.phc).map(|p| p.algorithm) {
        Ok(Algorithm::Argon2id) => "ARGON2ID",
        Ok(Algorithm::Argon2i) => "ARGON2I",
        Ok(Algorithm::Argon2d) => "ARGON2D",
        Err(_) => "UNKNOWN",
    }
}

/// New credentials for a password just verified against `creds` (blocking, costly):
/// always with SCRAM keys at the configured rounds (an account made from a hash alone,
/// imported or provisioned, gets them at its first password login); the argon2id hash
/// kept when it is at least as costly as configured, else made afresh at the configured
/// costs (a legacy hash always is); the same APOP secret.
pub fn upgraded(
    creds: &Credentials,
    password: &[u8],
    params: &HashParams,
) -> Result<Credentials, AuthError> {
    let keep_hash = legacy::Legacy::parse(&creds.phc).is_none()
        && ParsedHash::parse(&creds.phc).is_ok_and(|parsed| !hash_weaker(&parsed, params));
    if keep_hash {
        // Only the SCRAM keys were missing or weaker: the hash (maybe costlier than
        // configured, e.g. an imported one) stays.
        return Ok(Credentials {
            scram: Some(scram_keys(password, params)),
            ..creds.clone()
        });
    }
    let mut new = hash_credentials(password, params, true)?;
    new.apop_secret.clone_from(&creds.apop_secret);
    Ok(new)
}

/// The password SCRAM keys are derived from: its SASLprep form (RFC 5802 §2.2
/// `Normalize`), which is what clients hash. A password SASLprep refuses (e.g. with
/// control or unassigned characters) is used as it is, as PostgreSQL does, so such an
/// account still works with a client that does not prepare it.
pub fn scram_password(password: &str) -> std::borrow::Cow<'_, str> {
    stringprep::saslprep(password).unwrap_or(std::borrow::Cow::Borrowed(password))
}

/// Whether a SASL authorization identity may be used with the authentication identity
/// `authcid`: we authorise no proxy logins, so it must be absent (empty) or name the
/// same account (ASCII case does not matter, as in addresses).
pub fn is_own_authzid(authzid: &str, authcid: &str) -> bool {
    authzid.is_empty() || authzid.eq_ignore_ascii_case(authcid)
}

/// Why a PHC string cannot serve as an account's password hash. The messages never
/// contain the hash itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhcError {
    #[error("not a PHC string ($id$...)")]
    Syntax,
    #[error("unsupported algorithm {0:?} (only argon2id is accepted)")]
    Algorithm(String),
    #[error("unsupported argon2 version (only v=19 is accepted)")]
    Version,
    #[error("argon2 parameters are missing or out of range")]
    Params,
    #[error("salt is missing or not valid base64")]
    Salt,
    #[error("hash output is missing or of an unusable length")]
    Output,
    #[error("argon2 costs above the accepted maximum (m={m}, t={t}, p={p})")]
    TooCostly { m: u32, t: u32, p: u32 },
}

/// Credentials from an argon2id PHC string alone (no SCRAM keys, no APOP secret), for
/// accounts whose password the server never sees. The string must be one that
/// `verify_password` can check, so an account created from it can log in, and its costs
/// may not exceed `params.ceiling()` (the configured costs being `params`).
pub fn credentials_from_phc(phc: &str, params: &HashParams) -> Result<Credentials, PhcError> {
    let parsed = ParsedHash::parse(phc)?;
    parsed.within(&params.ceiling())?;
    if parsed.algorithm != Algorithm::Argon2id {
        return Err(PhcError::Algorithm(parsed.algorithm.as_str().to_string()));
    }
    if parsed.version != Version::V0x13 {
        return Err(PhcError::Version);
    }
    Ok(Credentials {
        phc: phc.to_owned(),
        scram: None,
        apop_secret: None,
    })
}

/// Checks an argon2 PHC string of `algorithm` (version 19, costs within
/// `params.ceiling()`), as `credentials_from_phc` does for argon2id.
fn check_argon2_phc(phc: &str, params: &HashParams, algorithm: Algorithm) -> Result<(), PhcError> {
    let parsed = ParsedHash::parse(phc)?;
    parsed.within(&params.ceiling())?;
    if parsed.algorithm != algorithm {
        return Err(PhcError::Algorithm(parsed.algorithm.as_str().to_string()));
    }
    if parsed.version != Version::V0x13 {
        return Err(PhcError::Version);
    }
    Ok(())
}

/// Whether credentials sent by an admin client (`user add`, `user passwd`, an import)
/// can be stored: an argon2id or argon2i hash within `params.ceiling()`, or a legacy
/// hash the import accepts; SCRAM keys, if any, with at least RFC 7677's rounds. The
/// server checks this itself, so a client cannot store a hash no login could verify or
/// one that makes every login costly.
pub fn check_credentials(creds: &Credentials, params: &HashParams) -> Result<(), ImportHashError> {
    if let Some(legacy) = legacy::Legacy::parse(&creds.phc) {
        legacy.check()?;
    } else {
        let phc_err = |e| ImportHashError::Phc(scheme(creds).into(), e);
        let algorithm = if creds.phc.starts_with("$argon2i$") {
            Algorithm::Argon2i
        } else {
            Algorithm::Argon2id
        };
        check_argon2_phc(&creds.phc, params, algorithm).map_err(phc_err)?;
    }
    if let Some(keys) = &creds.scram {
        if keys.iterations < MIN_SCRAM_ITERATIONS || keys.salt.is_empty() {
            return Err(ImportHashError::Malformed(
                "SCRAM-SHA-256".into(),
                "keys with too few rounds or no salt",
            ));
        }
    }
    Ok(())
}

/// A PHC string taken apart into what argon2 needs to recompute it.
struct ParsedHash {
    algorithm: Algorithm,
    version: Version,
    params: Params,
    salt: [u8; 64],
    salt_len: usize,
    expected: Vec<u8>,
}

impl ParsedHash {
    /// `TooCostly` when any cost is above `ceiling`'s.
    fn within(&self, ceiling: &HashParams) -> Result<(), PhcError> {
        let p = &self.params;
        let (m, t, lanes) = (p.m_cost(), p.t_cost(), p.p_cost());
        if m > ceiling.memory_kib || t > ceiling.iterations || lanes > ceiling.parallelism {
            return Err(PhcError::TooCostly { m, t, p: lanes });
        }
        Ok(())
    }

    fn parse(phc: &str) -> Result<ParsedHash, PhcError> {
        let hash = PasswordHash::new(phc).map_err(|_| PhcError::Syntax)?;
        let algorithm = Algorithm::try_from(hash.algorithm)
            .map_err(|_| PhcError::Algorithm(hash.algorithm.as_str().to_string()))?;
        let version = match hash.version.map(Version::try_from) {
            None => Version::V0x13,
            Some(Ok(v)) => v,
            Some(Err(_)) => return Err(PhcError::Version),
        };
        let params = Params::try_from(&hash).map_err(|_| PhcError::Params)?;
        let mut salt = [0u8; 64];
        let salt_len = hash
            .salt
            .ok_or(PhcError::Salt)?
            .decode_b64(&mut salt)
            .map_err(|_| PhcError::Salt)?
            .len();
        let expected = hash.hash.ok_or(PhcError::Output)?.as_bytes().to_vec();
        let params = Params::new(
            params.m_cost(),
            params.t_cost(),
            params.p_cost(),
            Some(expected.len()),
        )
        .map_err(|_| PhcError::Output)?;
        Ok(ParsedHash {
            algorithm,
            version,
            params,
            salt,
            salt_len,
            expected,
        })
    }
}

/// Checks a cleartext password against the argon2id hash (blocking, costly).
///
/// The costs come from the PHC string, so hashes made under older parameters still verify.
/// An unparsable hash, or one costlier than `params.ceiling()`, never matches. The
/// comparison is constant-time.
pub fn verify_password(creds: &Credentials, password: &[u8], params: &HashParams) -> bool {
    verify_password_in(creds, password, params, &mut Vec::new())
}

/// `verify_password` with caller-owned argon2 working memory, grown as needed and kept,
/// so a long-lived hashing thread allocates its blocks once instead of per login (the
/// allocator would otherwise keep tens of MiB per thread arena).
pub fn verify_password_in(
    creds: &Credentials,
    password: &[u8],
    params: &HashParams,
    memory: &mut Vec<Block>,
) -> bool {
    if let Some(legacy) = legacy::Legacy::parse(&creds.phc) {
        if legacy.allocates() {
            // yescrypt works in memory of its own (up to the argon2 ceiling): free ours
            // meanwhile, so a hashing thread stays within what the pool budgets for it.
            memory.clear();
            memory.shrink_to_fit();
        }
        return legacy.verify(password);
    }
    let Ok(parsed) = ParsedHash::parse(&creds.phc) else {
        return false;
    };
    if parsed.within(&params.ceiling()).is_err() {
        return false;
    }
    let blocks = parsed.params.block_count();
    if memory.len() < blocks {
        memory.resize(blocks, Block::default());
    }
    let mut out = vec![0u8; parsed.expected.len()];
    let argon2 = Argon2::new(parsed.algorithm, parsed.version, parsed.params);
    if argon2
        .hash_password_into_with_memory(
            password,
            &parsed.salt[..parsed.salt_len],
            &mut out,
            &mut memory[..blocks],
        )
        .is_err()
    {
        return false;
    }
    subtle::ConstantTimeEq::ct_eq(out.as_slice(), parsed.expected.as_slice()).into()
}

/// Spends the same work as `verify_password` for an unknown user, so timing does not
/// reveal whether an account exists.
///
/// Invalid `params` fall back to argon2's defaults so the caller still waits about as long.
pub fn dummy_verify(password: &[u8], params: &HashParams) {
    dummy_verify_in(password, params, &mut Vec::new());
}

/// `dummy_verify` with caller-owned working memory (see `verify_password_in`).
pub fn dummy_verify_in(password: &[u8], params: &HashParams, memory: &mut Vec<Block>) {
    let params = Params::new(
        params.memory_kib,
        params.iterations,
        params.parallelism,
        None,
    )
    .unwrap_or_default();
    let blocks = params.block_count();
    if memory.len() < blocks {
        memory.resize(blocks, Block::default());
    }
    let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    let mut output = [0u8; Params::DEFAULT_OUTPUT_LEN];
    let result = argon2.hash_password_into_with_memory(
        password,
        &DUMMY_SALT,
        &mut output,
        &mut memory[..blocks],
    );
    std::hint::black_box((result.is_ok(), output));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_verify_the_right_password_only() {
        let creds = make_credentials("correct horse", &HashParams::cheap()).unwrap();
        assert!(
            creds.phc.starts_with("$argon2id$v=19$m=1024,t=1,p=1$"),
            "{}",
            creds.phc
        );
        assert!(creds.apop_secret.is_none());
        assert!(verify_password(
            &creds,
            b"correct horse",
            &HashParams::cheap()
        ));
        for wrong in [
            &b""[..],
            b"correct hors",
            b"correct horse ",
            b"Correct horse",
            b"\0",
        ] {
            assert!(
                !verify_password(&creds, wrong, &HashParams::cheap()),
                "{wrong:?}"
            );
        }
    }

    #[test]
    fn credentials_carry_matching_scram_keys() {
        let params = HashParams::cheap();
        let creds = make_credentials("pencil", &params).unwrap();
        let keys = creds.scram.unwrap();
        assert_eq!(keys.salt.len(), SALT_LEN);
        assert_eq!(keys.iterations, params.scram_iterations);
        let again = ScramKeys::derive(b"pencil", &keys.salt, keys.iterations);
        assert!(again == keys);
        let other = ScramKeys::derive(b"pencil!", &keys.salt, keys.iterations);
        assert!(other != keys);
    }

    /// The keys are made from the SASLprep form of the password, which is what a client
    /// hashes (RFC 5802 §2.2); one SASLprep refuses is used as it is.
    #[test]
    fn scram_keys_use_the_saslprep_password() {
        assert_eq!(scram_password("I\u{00AD}X"), "IX");
        assert_eq!(scram_password("\u{2168}"), "IX");
        assert_eq!(scram_password("a\u{00A0}b"), "a b");
        assert_eq!(scram_password("pencil"), "pencil");
        assert_eq!(scram_password("bad\u{0007}"), "bad\u{0007}");
        let params = HashParams::cheap();
        let keys = make_credentials("I\u{00AD}X", &params)
            .unwrap()
            .scram
            .unwrap();
        assert!(ScramKeys::derive(b"IX", &keys.salt, keys.iterations) == keys);
        let keys = make_credentials("bad\u{0007}", &params)
            .unwrap()
            .scram
            .unwrap();
        assert!(ScramKeys::derive("bad\u{0007}".as_bytes(), &keys.salt, keys.iterations) == keys);
    }

    #[test]
    fn only_the_own_authzid_is_allowed() {
        assert!(is_own_authzid("", "joe@example.org"));
        assert!(is_own_authzid("Joe@Example.ORG", "joe@example.org"));
        assert!(!is_own_authzid("ann@example.org", "joe@example.org"));
        assert!(!is_own_authzid("joe@example.org ", "joe@example.org"));
    }

    #[test]
    fn salts_differ_between_calls() {
        let a = make_credentials("same", &HashParams::cheap()).unwrap();
        let b = make_credentials("same", &HashParams::cheap()).unwrap();
        assert_ne!(a.phc, b.phc);
        let (a, b) = (a.scram.unwrap(), b.scram.unwrap());
        assert_ne!(a.salt, b.salt);
        assert_ne!(a.stored_key, b.stored_key);
    }

    #[test]
    fn non_ascii_password_round_trips() {
        let creds = make_credentials("pässwörd ☃", &HashParams::cheap()).unwrap();
        assert!(verify_password(
            &creds,
            "pässwörd ☃".as_bytes(),
            &HashParams::cheap()
        ));
        assert!(!verify_password(&creds, b"passwort", &HashParams::cheap()));
    }

    #[test]
    fn hashes_made_with_other_costs_still_verify() {
        let params = HashParams {
            memory_kib: 2048,
            iterations: 2,
            ..HashParams::cheap()
        };
        let creds = make_credentials("pw", &params).unwrap();
        assert!(creds.phc.contains("m=2048,t=2,p=1"), "{}", creds.phc);
        assert!(verify_password(&creds, b"pw", &HashParams::cheap()));
    }

    #[test]
    fn unparsable_or_tampered_hashes_never_match() {
        let good = make_credentials("pw", &HashParams::cheap()).unwrap();
        let mut tampered = good.clone();
        // Change one character well inside the hash output, keeping it valid base64.
        let at = tampered.phc.len() - 10;
        let was = tampered.phc.as_bytes()[at];
        tampered
            .phc
            .replace_range(at..=at, if was == b'A' { "B" } else { "A" });
        assert!(PasswordHash::new(&tampered.phc).is_ok(), "still parses");
        let cases = [
            String::new(),
            "not a hash".to_string(),
            "$argon2id$v=19$m=1024,t=1,p=1$".to_string(),
            good.phc.replace("$argon2id$", "$bogus$"),
            tampered.phc.clone(),
        ];
        for phc in cases {
            let creds = Credentials {
                phc: phc.clone(),
                ..good.clone()
            };
            assert!(
                !verify_password(&creds, b"pw", &HashParams::cheap()),
                "{phc:?}"
            );
        }
    }

    #[test]
    fn credentials_from_a_phc_string_verify_without_scram_keys() {
        let made = make_credentials("from elsewhere", &HashParams::cheap()).unwrap();
        let creds = credentials_from_phc(&made.phc, &HashParams::cheap()).unwrap();
        assert!(creds.scram.is_none());
        assert!(creds.apop_secret.is_none());
        assert!(verify_password(
            &creds,
            b"from elsewhere",
            &HashParams::cheap()
        ));
        assert!(!verify_password(
            &creds,
            b"from elsewhere!",
            &HashParams::cheap()
        ));
        // Hashes written by the reference implementation's CLI (`echo -n password |
        // argon2 somesalt -id -t 2 -m 16 -p 4 -e`, and `-m 10 -p 1 -l 16`).
        for reference in [
            "$argon2id$v=19$m=65536,t=2,p=4$c29tZXNhbHQ$GpZ3sK/oH9p7VIiV56G/64Zo/8GaUw434IimaPqxwCo",
            "$argon2id$v=19$m=1024,t=2,p=1$c29tZXNhbHQ$gTO0gvHf4lDpocsoM1S0Wg",
        ] {
            let creds = credentials_from_phc(reference, &HashParams::cheap()).unwrap();
            assert!(verify_password(&creds, b"password", &HashParams::cheap()), "{reference}");
            assert!(!verify_password(&creds, b"Password", &HashParams::cheap()), "{reference}");
        }
    }

    #[test]
    fn phc_strings_that_cannot_be_used_are_rejected_without_echoing_them() {
        let good = make_credentials("pw", &HashParams::cheap()).unwrap().phc;
        let argon2i = good.replace("$argon2id$", "$argon2i$");
        let cases: Vec<(String, PhcError)> = vec![
            (String::new(), PhcError::Syntax),
            ("secretsecret".into(), PhcError::Syntax),
            (
                "$2y$10$abcdefghijklmnopqrstuuJ0Yd7Bq3lq3cDHYgY9xO5sBxRw8m".into(),
                PhcError::Syntax,
            ),
            (argon2i, PhcError::Algorithm("argon2i".into())),
            (
                good.replace("$argon2id$", "$scrypt$"),
                PhcError::Algorithm("scrypt".into()),
            ),
            (good.replace("v=19", "v=16"), PhcError::Version),
            (good.replace("m=1024", "m=1"), PhcError::Params),
            (good.replace("t=1,", "t=0,"), PhcError::Params),
            (good.replace("m=1024", "m=many"), PhcError::Params),
            ("$argon2id$v=19$m=1024,t=1,p=1".into(), PhcError::Salt),
            (
                format!(
                    "$argon2id$v=19$m=1024,t=1,p=1${}$AAAAAAAAAAAAAAAAAAAAAA",
                    "c2FsdA".repeat(20)
                ),
                PhcError::Syntax,
            ),
            (
                "$argon2id$v=19$m=1024,t=1,p=1$abcde$AAAAAAAAAAAAAAAAAAAAAA".into(),
                PhcError::Salt,
            ),
            (
                "$argon2id$v=19$m=1024,t=1,p=1$c29tZXNhbHQ".into(),
                PhcError::Output,
            ),
            (
                "$argon2id$v=19$m=1024,t=1,p=1$c29tZXNhbHQ$AAA".into(),
                PhcError::Syntax,
            ),
        ];
        for (phc, expected) in cases {
            let error = credentials_from_phc(&phc, &HashParams::cheap()).expect_err(&phc);
            assert_eq!(error, expected, "{phc:?}");
            let shown = error.to_string();
            if phc.len() > 12 {
                assert!(!shown.contains(&phc[phc.len() - 12..]), "{shown}");
            }
        }
    }

    #[test]
    fn hashes_costlier_than_the_ceiling_are_refused_and_never_verify() {
        let cheap = HashParams::cheap();
        let good = make_credentials("pw", &cheap).unwrap().phc;
        // A GiB per login, a thousand passes, 64 lanes: one of each is enough.
        for (from, to) in [
            ("m=1024,", "m=1048576,"),
            ("t=1,", "t=1000,"),
            ("p=1$", "p=64$"),
        ] {
            let costly = good.replace(from, to);
            let error = credentials_from_phc(&costly, &cheap).expect_err(&costly);
            assert!(matches!(error, PhcError::TooCostly { .. }), "{costly}");
            let creds = Credentials {
                phc: costly.clone(),
                scram: None,
                apop_secret: None,
            };
            assert!(!verify_password(&creds, b"pw", &cheap), "{costly}");
        }
        // The ceiling rises to the configured costs: hashes made here always verify.
        let big = HashParams {
            memory_kib: MAX_HASH_MEMORY_KIB + 1024,
            iterations: MAX_HASH_ITERATIONS + 1,
            parallelism: 1,
            ..cheap
        };
        assert_eq!(big.ceiling().memory_kib, big.memory_kib);
        assert_eq!(big.ceiling().iterations, big.iterations);
        assert_eq!(cheap.ceiling().memory_kib, MAX_HASH_MEMORY_KIB);
        assert_eq!(big.max_memory_bytes(), u64::from(big.memory_kib) * 1024);
        let at_ceiling = good.replace("m=1024,t=1,p=1", "m=65536,t=10,p=8");
        assert!(credentials_from_phc(&at_ceiling, &cheap).is_ok());
    }

    #[test]
    fn weaker_credentials_need_an_upgrade_and_get_one() {
        let old = HashParams::cheap();
        let current = HashParams {
            memory_kib: 2048,
            iterations: 2,
            parallelism: 1,
            scram_iterations: 5000,
        };
        let mut creds = make_credentials("pw", &old).unwrap();
        creds.apop_secret = Some("apop".into());
        assert!(!needs_upgrade(&creds, &old));
        assert!(needs_upgrade(&creds, &current));
        // Only the SCRAM rounds below the configured ones.
        let scram_only = HashParams {
            scram_iterations: 5000,
            ..old
        };
        assert!(needs_upgrade(&creds, &scram_only));
        // A hash costlier than configured is kept.
        let lower = HashParams {
            memory_kib: 512,
            ..old
        };
        assert!(!needs_upgrade(&creds, &lower));

        let new = upgraded(&creds, b"pw", &current).unwrap();
        assert!(new.phc.contains("m=2048,t=2,p=1"), "{}", new.phc);
        assert_eq!(new.scram.as_ref().map(|k| k.iterations), Some(5000));
        assert_eq!(new.apop_secret.as_deref(), Some("apop"));
        assert!(verify_password(&new, b"pw", &current));
        assert!(!needs_upgrade(&new, &current));

        // An account made from a PHC hash alone gets SCRAM keys at its first password
        // login; a hash at least as costly as configured is kept.
        let phc_only = credentials_from_phc(&creds.phc, &old).unwrap();
        assert!(needs_upgrade(&phc_only, &old));
        let new = upgraded(&phc_only, b"pw", &old).unwrap();
        assert_eq!(new.phc, phc_only.phc);
        assert_eq!(
            new.scram.as_ref().map(|k| k.iterations),
            Some(old.scram_iterations)
        );
        assert!(!needs_upgrade(&new, &old));
        let new = upgraded(&phc_only, b"pw", &current).unwrap();
        assert!(new.phc.contains("m=2048,t=2,p=1"), "{}", new.phc);
        assert!(new.scram.is_some());
        assert!(!needs_upgrade(
            &Credentials {
                phc: "junk".into(),
                ..new
            },
            &current
        ));
    }

    #[test]
    fn invalid_params_are_rejected() {
        let cheap = HashParams::cheap();
        let cases = [
            HashParams {
                memory_kib: 0,
                ..cheap
            },
            HashParams {
                iterations: 0,
                ..cheap
            },
            HashParams {
                parallelism: 0,
                ..cheap
            },
            HashParams {
                memory_kib: 7,
                ..cheap
            },
            HashParams {
                scram_iterations: MIN_SCRAM_ITERATIONS - 1,
                ..cheap
            },
            HashParams {
                scram_iterations: 0,
                ..cheap
            },
        ];
        for params in cases {
            assert!(params.validate().is_err(), "{params:?}");
            assert!(
                matches!(make_credentials("pw", &params), Err(AuthError::Hash(_))),
                "{params:?}"
            );
        }
        assert!(cheap.validate().is_ok());
        assert!(HashParams::default().validate().is_ok());
    }

    #[test]
    fn dummy_verify_runs_with_good_and_bad_params() {
        dummy_verify(b"whatever", &HashParams::cheap());
        dummy_verify(
            b"",
            &HashParams {
                memory_kib: 0,
                ..HashParams::cheap()
            },
        );
    }

    #[test]
    fn debug_output_hides_secrets() {
        let creds = make_credentials("hunter2", &HashParams::cheap()).unwrap();
        let keys = creds.scram.clone().unwrap();
        let shown = format!("{creds:?} {keys:?}");
        assert!(!shown.contains("hunter2"));
        assert!(!shown.contains("argon2"));
        assert!(!shown.contains(&format!("{:?}", keys.stored_key)));
        assert!(shown.contains("iterations: 4096"), "{shown}");
    }

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let mac = hmac_sha256(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn credentials_survive_serde() {
        let creds = make_credentials("pw", &HashParams::cheap()).unwrap();
        let json = serde_json::to_string(&creds).unwrap();
        let back: Credentials = serde_json::from_str(&json).unwrap();
        assert!(back == creds);
        assert!(verify_password(&back, b"pw", &HashParams::cheap()));
        // Records stored before SCRAM keys became optional have the keys inline, the same
        // JSON as `Some`; records made from a PHC hash alone have none.
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert!(value["scram"]["stored_key"].is_array(), "{json}");
        for without in [
            serde_json::json!({"phc": creds.phc, "apop_secret": null}),
            serde_json::json!({"phc": creds.phc, "scram": null, "apop_secret": null}),
        ] {
            let back: Credentials = serde_json::from_value(without).unwrap();
            assert!(back.scram.is_none());
        }
    }
}
