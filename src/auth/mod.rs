//! Credentials: argon2id password hashes with SCRAM-SHA-256 keys made beside them, SASL
//! PLAIN decoding, the SCRAM-SHA-256 server exchange and APOP digests.
//! Never logs or returns a secret; comparisons are constant-time.

pub mod apop;
pub mod cache;
pub mod plain;
pub mod pool;
pub mod scram;

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
pub use argon2::Block;
use argon2::{Algorithm, Argon2, Params, Version};
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bytes of random salt for both the argon2id hash and the SCRAM keys (RFC 9106 asks for 16).
const SALT_LEN: usize = 16;

/// The lowest SCRAM iteration count RFC 7677 §4 lets a server announce.
pub const MIN_SCRAM_ITERATIONS: u32 = 4096;

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
            scram_iterations: 4096,
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
///
/// The two use independent random salts, so the stored SCRAM salt says nothing about the
/// argon2id one.
pub fn make_credentials(password: &str, params: &HashParams) -> Result<Credentials, AuthError> {
    params.validate()?;
    let salt = SaltString::generate(&mut OsRng);
    let phc = params
        .argon2()?
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| AuthError::Hash(e.to_string()))?
        .to_string();
    let mut scram_salt = [0u8; SALT_LEN];
    OsRng.fill_bytes(&mut scram_salt);
    let scram = ScramKeys::derive(password.as_bytes(), &scram_salt, params.scram_iterations);
    Ok(Credentials {
        phc,
        scram,
        apop_secret: None,
    })
}

/// Checks a cleartext password against the argon2id hash (blocking, costly).
///
/// The costs come from the PHC string, so hashes made under older parameters still verify.
/// An unparsable hash never matches. The comparison is constant-time.
pub fn verify_password(creds: &Credentials, password: &[u8]) -> bool {
    verify_password_in(creds, password, &mut Vec::new())
}

/// `verify_password` with caller-owned argon2 working memory, grown as needed and kept,
/// so a long-lived hashing thread allocates its blocks once instead of per login (the
/// allocator would otherwise keep tens of MiB per thread arena).
pub fn verify_password_in(creds: &Credentials, password: &[u8], memory: &mut Vec<Block>) -> bool {
    let Ok(hash) = PasswordHash::new(&creds.phc) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (hash.salt, hash.hash) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(hash.algorithm) else {
        return false;
    };
    let version = match hash.version.map(Version::try_from) {
        None => Version::V0x13,
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let Ok(params) = Params::try_from(&hash) else {
        return false;
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let expected = expected.as_bytes();
    let Ok(params) = Params::new(
        params.m_cost(),
        params.t_cost(),
        params.p_cost(),
        Some(expected.len()),
    ) else {
        return false;
    };
    let blocks = params.block_count();
    if memory.len() < blocks {
        memory.resize(blocks, Block::default());
    }
    let mut out = vec![0u8; expected.len()];
    let argon2 = Argon2::new(algorithm, version, params);
    if argon2
        .hash_password_into_with_memory(password, salt, &mut out, &mut memory[..blocks])
        .is_err()
    {
        return false;
    }
    subtle::ConstantTimeEq::ct_eq(out.as_slice(), expected).into()
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
        assert!(verify_password(&creds, b"correct horse"));
        for wrong in [
            &b""[..],
            b"correct hors",
            b"correct horse ",
            b"Correct horse",
            b"\0",
        ] {
            assert!(!verify_password(&creds, wrong), "{wrong:?}");
        }
    }

    #[test]
    fn credentials_carry_matching_scram_keys() {
        let params = HashParams::cheap();
        let creds = make_credentials("pencil", &params).unwrap();
        assert_eq!(creds.scram.salt.len(), SALT_LEN);
        assert_eq!(creds.scram.iterations, params.scram_iterations);
        let again = ScramKeys::derive(b"pencil", &creds.scram.salt, creds.scram.iterations);
        assert!(again == creds.scram);
        let other = ScramKeys::derive(b"pencil!", &creds.scram.salt, creds.scram.iterations);
        assert!(other != creds.scram);
    }

    #[test]
    fn salts_differ_between_calls() {
        let a = make_credentials("same", &HashParams::cheap()).unwrap();
        let b = make_credentials("same", &HashParams::cheap()).unwrap();
        assert_ne!(a.phc, b.phc);
        assert_ne!(a.scram.salt, b.scram.salt);
        assert_ne!(a.scram.stored_key, b.scram.stored_key);
    }

    #[test]
    fn non_ascii_password_round_trips() {
        let creds = make_credentials("pässwörd ☃", &HashParams::cheap()).unwrap();
        assert!(verify_password(&creds, "pässwörd ☃".as_bytes()));
        assert!(!verify_password(&creds, b"passwort"));
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
        assert!(verify_password(&creds, b"pw"));
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
            assert!(!verify_password(&creds, b"pw"), "{phc:?}");
        }
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
        let shown = format!("{creds:?} {:?}", creds.scram);
        assert!(!shown.contains("hunter2"));
        assert!(!shown.contains("argon2"));
        assert!(!shown.contains(&format!("{:?}", creds.scram.stored_key)));
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
        assert!(verify_password(&back, b"pw"));
    }
}
