//! A Dovecot passwd-file (`migrate::dovecot::parse_passwd`) and the password fields of its
//! accounts (`auth::credentials_from_dovecot`, `credentials_from_stored_hash`, and the
//! legacy-hash check and verification behind `check_credentials` and `verify_password`).
//! Properties: no panics; every line that is neither blank nor a comment gives one result,
//! in line order, and an account is what a plain reading of its fields says (lower-cased
//! local part, the password and home fields as written, no local part twice); `Debug`
//! never shows a password; errors name the line, the user and the domain only, and an
//! import error the scheme only (never the hash or password). An imported field gives
//! credentials the server's own check accepts, and a hash field gives the same
//! credentials through both import paths; for a stored `{SCHEME}data` legacy hash the
//! server's check and the import agree, and one the check refuses never verifies. The first account's field `{FUZZ-WRITE}password` (a scheme Dovecot does not
//! have, so the import refuses it as unknown) is a password to hash with the crates' own
//! writers (SHA-crypt at 1 000 to 1 700 rounds, bcrypt at cost 4, the salt from the
//! user name): imported, that hash verifies the password and no other.
//! Argon2 runs at 8 KiB and one pass; verification runs only on hashes of at most 2 000
//! SHA-crypt rounds or bcrypt cost 5, so an execution stays within a few milliseconds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailgate::auth::{
    check_credentials, credentials_from_dovecot, credentials_from_stored_hash, is_legacy,
    needs_upgrade, scheme, verify_password, Credentials, HashParams, MIN_SCRAM_ITERATIONS,
};
use mailgate::migrate::dovecot::{parse_passwd, PasswdEntry, MAX_PASSWD_LINE};

const DOMAIN: &str = "example.org";
/// The cheapest costs the server accepts: a plaintext import hashes at these.
const PARAMS: HashParams = HashParams {
    memory_kib: 8,
    iterations: 1,
    parallelism: 1,
    scram_iterations: MIN_SCRAM_ITERATIONS,
};
/// Accounts whose password field is imported per execution (a plaintext one costs a
/// PBKDF2 of 4 096 rounds).
const IMPORTED: usize = 4;
const LEGACY: [&str; 5] = [
    "SHA512-CRYPT",
    "SHA256-CRYPT",
    "BLF-CRYPT",
    "MD5-CRYPT",
    "YESCRYPT",
];
/// The stand-in scheme of a password to hash with the crates' writers.
const WRITE: &str = "{FUZZ-WRITE}";
const CRYPT64: &[u8] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The scheme as the errors show it: at most 32 characters, non-printable ones as `?`,
/// upper-cased (the `ImportHashError` contract).
fn shown_scheme(field: &str) -> String {
    let Some(rest) = field.strip_prefix('{') else {
        return "CRYPT".into();
    };
    let scheme = rest.split_once('}').map_or(rest, |(s, _)| s);
    let shown: String = scheme
        .chars()
        .take(32)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect();
    shown.to_ascii_uppercase()
}

/// The hash or password part of a field: after `{SCHEME}`, or all of it.
fn secret(field: &str) -> &str {
    match field.strip_prefix('{') {
        Some(rest) => rest.split_once('}').map_or(rest, |(_, d)| d),
        None => field,
    }
}

/// An import error names the scheme, never the hash or password: its message is short,
/// and holds no part of the secret that has a character the message's own text cannot
/// (the messages are ASCII, but for the `…` of a cut scheme; the shown scheme is ASCII),
/// so a message containing such a secret can only be echoing it. A plain substring test
/// would not do: libFuzzer learns the message's words from the comparison itself.
fn assert_not_echoed(message: &str, field: &str) {
    assert!(message.len() < 250, "{message}");
    let secret = secret(field);
    if secret.chars().any(|c| !c.is_ascii() && c != '\u{2026}') {
        assert!(!message.contains(secret), "{message:?} echoes its field");
    }
}

/// Whether verifying `data` (a crypt string) costs at most 2 000 SHA-crypt rounds or
/// bcrypt cost 5, or is MD5-crypt (1 000 MD5 rounds); the import refuses costlier ones
/// only above its own, far higher, ceilings. yescrypt (16 MiB and up) is only checked.
fn cheap_to_verify(data: &str) -> bool {
    if data.starts_with("$1$") {
        return true;
    }
    if let Some(rest) = data
        .strip_prefix("$6$")
        .or_else(|| data.strip_prefix("$5$"))
    {
        return rest
            .strip_prefix("rounds=")
            .and_then(|r| r.split('$').next())
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n <= 2_000);
    }
    ["$2a$", "$2b$", "$2y$"]
        .iter()
        .any(|p| data.starts_with(p))
        .then(|| data.get(4..6).and_then(|c| c.parse::<u32>().ok()))
        .flatten()
        .is_some_and(|cost| cost <= 5)
}

/// The passwd-file line `line` (1-based) of `text`, without its line end.
fn line_of(text: &[u8], line: usize) -> &[u8] {
    let raw = text
        .split(|&b| b == b'\n')
        .nth(line - 1)
        .expect("line exists");
    raw.strip_suffix(b"\r").unwrap_or(raw)
}

fn check_entry(text: &[u8], entry: &PasswdEntry) {
    let line = std::str::from_utf8(line_of(text, entry.line)).expect("an account is UTF-8");
    let fields: Vec<&str> = line.split(':').collect();
    assert!((2..=8).contains(&fields.len()));
    let user = fields[0];
    let local = match user.rsplit_once('@') {
        Some((local, domain)) => {
            assert!(domain.eq_ignore_ascii_case(DOMAIN));
            local
        }
        None => user,
    };
    assert_eq!(entry.local, local.to_ascii_lowercase());
    assert!(!entry.local.is_empty() && !entry.local.starts_with('.'));
    assert!(!entry.local.contains(['/', '\\', '@']));
    assert_eq!(entry.password, fields[1]);
    assert!(!entry.password.is_empty());
    assert_eq!(entry.home, fields.get(5).copied().unwrap_or(""));
    assert_eq!(
        format!("{entry:?}"),
        format!(
            "PasswdEntry {{ line: {}, local: {:?}, password: \"<redacted>\", home: {:?} }}",
            entry.line, entry.local, entry.home
        )
    );
}

/// The field through the import, as `mailgate import dovecot` and the server see it.
fn import(field: &str) {
    let shown = shown_scheme(field);
    let plaintext = ["PLAIN", "CLEAR", "CLEARTEXT"]
        .iter()
        .any(|p| shown == *p || shown.starts_with(&format!("{p}.")));
    let creds = match credentials_from_dovecot(field, &PARAMS) {
        Ok(creds) => creds,
        Err(e) => {
            assert_not_echoed(&e.to_string(), field);
            if !plaintext {
                let stored = credentials_from_stored_hash(field, &PARAMS);
                assert!(stored.is_err() || !field.starts_with('{'), "{e}");
            }
            return;
        }
    };
    if let Err(e) = check_credentials(&creds, &PARAMS) {
        panic!("the server refuses what the import made of {shown}: {e}");
    }
    if plaintext {
        assert_eq!(scheme(&creds), "ARGON2ID");
        assert!(creds.scram.is_some() && !is_legacy(&creds));
        assert!(!needs_upgrade(&creds, &PARAMS));
        if shown == "PLAIN" || shown == "CLEAR" || shown == "CLEARTEXT" {
            let password = secret(field).as_bytes();
            assert!(verify_password(&creds, password, &PARAMS));
            assert!(!verify_password(
                &creds,
                &[password, b"!"].concat(),
                &PARAMS
            ));
        }
        return;
    }
    assert!(creds.scram.is_none() && creds.apop_secret.is_none());
    assert!(needs_upgrade(&creds, &PARAMS));
    let data = secret(field);
    match scheme(&creds) {
        "ARGON2ID" | "ARGON2I" => assert_eq!(creds.phc, data),
        legacy => {
            assert!(LEGACY.contains(&legacy) && is_legacy(&creds));
            assert_eq!(creds.phc, format!("{{{legacy}}}{data}"));
        }
    }
    // A field the CLI imports is accepted the same way from a provisioning file.
    if field.starts_with('{') {
        match credentials_from_stored_hash(field, &PARAMS) {
            Ok(stored) => assert!(stored == creds),
            Err(e) => panic!("{shown} imported but refused as a stored hash: {e}"),
        }
    }
}

/// `data` stored under each legacy scheme, as an admin client may send it: the server's
/// check agrees with the import, and what it refuses never verifies.
fn stored_legacy(data: &str, password: &[u8]) {
    for canonical in LEGACY {
        let phc = format!("{{{canonical}}}{data}");
        let creds = Credentials {
            phc: phc.clone(),
            scram: None,
            apop_secret: None,
        };
        assert_eq!(scheme(&creds), canonical);
        let checked = check_credentials(&creds, &PARAMS);
        match credentials_from_stored_hash(&phc, &PARAMS) {
            Ok(imported) => {
                assert!(checked.is_ok() && imported == creds, "{canonical}");
            }
            Err(e) => {
                assert!(checked.is_err(), "{canonical}: {e}");
                assert_not_echoed(&e.to_string(), &phc);
            }
        }
        if let Err(e) = checked {
            assert_not_echoed(&e.to_string(), &phc);
            assert!(!verify_password(&creds, password, &PARAMS));
        } else if cheap_to_verify(data) {
            // No oracle for a fuzzed hash: it must only verify without panicking.
            verify_password(&creds, password, &PARAMS);
        }
    }
}

/// `password` hashed by the crates' writers with a salt and cost from `salt_from`, then
/// imported: it verifies that password and no other.
fn written(password: &str, salt_from: &str, pick: usize) {
    let salt: String = salt_from
        .bytes()
        .take(16)
        .map(|b| char::from(CRYPT64[usize::from(b) % 64]))
        .collect();
    let rounds = 1_000 + 100 * (password.len() % 8);
    let field = match pick % 3 {
        0 => {
            let params = sha_crypt::Sha512Params::new(rounds).expect("rounds in range");
            let hash = sha_crypt::sha512_crypt_b64(password.as_bytes(), salt.as_bytes(), &params)
                .expect("SHA-512-crypt");
            format!("{{SHA512-CRYPT}}$6$rounds={rounds}${salt}${hash}")
        }
        1 => {
            let params = sha_crypt::Sha256Params::new(rounds).expect("rounds in range");
            let hash = sha_crypt::sha256_crypt_b64(password.as_bytes(), salt.as_bytes(), &params)
                .expect("SHA-256-crypt");
            format!("{{CRYPT}}$5$rounds={rounds}${salt}${hash}")
        }
        _ => {
            let mut raw = [0u8; 16];
            for (r, b) in raw.iter_mut().zip(salt_from.bytes().cycle()) {
                *r = b;
            }
            let parts = bcrypt::hash_with_salt(password, 4, raw).expect("bcrypt");
            format!(
                "{{BLF-CRYPT}}{}",
                parts.format_for_version(bcrypt::Version::TwoY)
            )
        }
    };
    let creds = match credentials_from_dovecot(&field, &PARAMS) {
        Ok(creds) => creds,
        Err(e) => panic!("a hash the crate wrote is refused: {e}"),
    };
    assert!(check_credentials(&creds, &PARAMS).is_ok());
    // crypt(3) ends a password at NUL, so no crypt-style hash accepts one that has it.
    assert_eq!(
        verify_password(&creds, password.as_bytes(), &PARAMS),
        !password.contains('\0')
    );
    let wrong = format!("x{password}");
    assert!(!verify_password(&creds, wrong.as_bytes(), &PARAMS));
}

fuzz_target!(|data: &[u8]| {
    let results = parse_passwd(data, DOMAIN);
    let lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    let counted = lines
        .iter()
        .map(|raw| raw.strip_suffix(b"\r").unwrap_or(raw))
        .filter(|raw| match std::str::from_utf8(raw) {
            Ok(text) => {
                raw.len() > MAX_PASSWD_LINE
                    || (!text.trim().is_empty() && !text.trim_start().starts_with('#'))
            }
            Err(_) => true,
        })
        .count();
    assert_eq!(results.len(), counted);
    let mut last = 0;
    let mut locals = Vec::new();
    for result in &results {
        let line = match result {
            Ok(entry) => {
                check_entry(data, entry);
                assert!(!locals.contains(&entry.local), "{} twice", entry.local);
                locals.push(entry.local.clone());
                entry.line
            }
            Err(e) => {
                let message = e.to_string();
                let line = message
                    .strip_prefix("line ")
                    .and_then(|m| m.split(':').next())
                    .and_then(|n| n.parse::<usize>().ok())
                    .expect("errors start with their line");
                // Only the line, the user field (or its local part) and the domain are
                // named, so the password field never is.
                if let Some(user) = e.user() {
                    let raw = line_of(data, line);
                    let text = std::str::from_utf8(raw).expect("a named user is UTF-8");
                    let field = text.split(':').next().expect("split gives one part");
                    let local = field.rsplit_once('@').map_or(field, |(l, _)| l);
                    assert!(user == field || user == local.to_ascii_lowercase(), "{e}");
                    let rest = message
                        .replace(&format!("{user:?}"), "")
                        .replace(DOMAIN, "");
                    assert!(rest.is_ascii() && rest.len() < 120, "{message}");
                } else {
                    assert!(message.is_ascii() && message.len() < 120, "{message}");
                }
                line
            }
        };
        assert!(line > last && line <= lines.len());
        last = line;
    }

    let entries: Vec<&PasswdEntry> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    for entry in entries.iter().take(IMPORTED) {
        import(&entry.password);
    }
    if let Some(first) = entries.first() {
        let field = &first.password;
        if let Some(password) = field.strip_prefix(WRITE) {
            written(password, &first.local, first.line);
        }
        stored_legacy(secret(field), first.local.as_bytes());
    }
});
