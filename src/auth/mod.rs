//! Credentials: argon2id password hashes with SCRAM-SHA-256 keys made beside them, SASL
//! PLAIN decoding, the SCRAM-SHA-256 server exchange and APOP digests.
//! Never logs or returns a secret; comparisons are constant-time.

pub mod apop;
pub mod plain;
pub mod scram;

use serde::{Deserialize, Serialize};

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

impl Default for HashParams {
    fn default() -> Self {
        Self { memory_kib: 19 * 1024, iterations: 2, parallelism: 1, scram_iterations: 4096 }
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

/// What an account stores about its secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// argon2id PHC string.
    pub phc: String,
    pub scram: ScramKeys,
    /// Shared secret for APOP, only for accounts that opted in (APOP needs it in clear).
    pub apop_secret: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

/// Hashes `password` with argon2id and derives the SCRAM keys from it (blocking, costly).
pub fn make_credentials(password: &str, params: &HashParams) -> Result<Credentials, AuthError> {
    let _ = (password, params);
    todo!()
}

/// Checks a cleartext password against the argon2id hash (blocking, costly).
pub fn verify_password(creds: &Credentials, password: &[u8]) -> bool {
    let _ = (creds, password);
    todo!()
}

/// Spends the same work as `verify_password` for an unknown user, so timing does not
/// reveal whether an account exists.
pub fn dummy_verify(password: &[u8], params: &HashParams) {
    let _ = (password, params);
    todo!()
}
