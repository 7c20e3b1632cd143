//! The server side of SCRAM-SHA-256 driven by fuzzed client messages. The input is a
//! client-first message, a newline, and a client-final template in which `\0N`, `\0C` and
//! `\0P` stand for the server's combined nonce, the channel-binding value the server
//! expects and a correct proof (after `,p=`), so the fuzzer reaches the proof check.
//! Properties: no panics; a parsed client-first has a non-empty prepared name and a
//! printable nonce that the server-first message extends; the well-formed final of a
//! client that knows the password always succeeds with the right server signature, and
//! with one proof bit flipped fails as a bad proof; a fuzzed final succeeds only when it
//! carries the correct proof for what it signs, and never against the stand-in keys of
//! an unknown user. The fixture credential uses the fewest PBKDF2 rounds the server allows,
//! derived once per process, so an execution costs a few HMACs.
#![no_main]

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use mailgate::auth::scram::{fake_keys, ClientFirst, ScramFailure, ServerFirst};
use mailgate::auth::{ScramKeys, MIN_SCRAM_ITERATIONS};
use sha2::{Digest, Sha256};
use std::sync::OnceLock;

const PASSWORD: &[u8] = b"pencil";
const SALT: &[u8] = b"fuzz-fixture-slt";
const SERVER_SECRET: [u8; 32] = [7; 32];

struct Fixture {
    keys: ScramKeys,
    /// What a client that knows the password derives: HMAC(SaltedPassword, "Client Key").
    client_key: [u8; 32],
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let keys = ScramKeys::derive(PASSWORD, SALT, MIN_SCRAM_ITERATIONS);
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(PASSWORD, SALT, MIN_SCRAM_ITERATIONS, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        assert_eq!(
            <[u8; 32]>::from(Sha256::digest(client_key)),
            keys.stored_key
        );
        Fixture { keys, client_key }
    })
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// The exchange as the client sees it after the server-first message.
struct Exchange<'a> {
    bare: &'a str,
    server_first: String,
    nonce: String,
    channel_binding: String,
}

impl Exchange<'_> {
    fn auth_message(&self, without_proof: &[u8]) -> Vec<u8> {
        let mut m = format!("{},{},", self.bare, self.server_first).into_bytes();
        m.extend_from_slice(without_proof);
        m
    }

    /// The proof a client with the password sends for a final message `without_proof`.
    fn proof(&self, without_proof: &[u8]) -> [u8; 32] {
        let f = fixture();
        let signature = hmac(&f.keys.stored_key, &self.auth_message(without_proof));
        let mut proof = f.client_key;
        for (p, s) in proof.iter_mut().zip(signature) {
            *p ^= s;
        }
        proof
    }

    fn server_final(&self, without_proof: &[u8]) -> String {
        let signature = hmac(
            &fixture().keys.server_key,
            &self.auth_message(without_proof),
        );
        format!("v={}", BASE64.encode(signature))
    }

    /// The template with its stand-ins filled in.
    fn fill(&self, template: &[u8]) -> Vec<u8> {
        let filled = replace(template, b"\0N", self.nonce.as_bytes());
        let filled = replace(&filled, b"\0C", self.channel_binding.as_bytes());
        match find(&filled, b",p=\0P") {
            Some(at) => {
                let proof = BASE64.encode(self.proof(&filled[..at]));
                replace(&filled, b"\0P", proof.as_bytes())
            }
            None => filled,
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn replace(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut rest = haystack;
    while let Some(at) = find(rest, needle) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(with);
        rest = &rest[at + needle.len()..];
    }
    out.extend_from_slice(rest);
    out
}

/// Starts an exchange with `keys` and checks the server-first message.
fn start<'a>(client: &ClientFirst, text: &'a str, keys: ScramKeys) -> (ServerFirst, Exchange<'a>) {
    let iterations = keys.iterations;
    let salt = BASE64.encode(&keys.salt);
    let server = ServerFirst::new(client, keys);
    let mut attributes = server.message.split(',');
    let nonce = attributes.next().and_then(|a| a.strip_prefix("r="));
    let nonce = nonce.expect("server-first starts with r=").to_owned();
    assert!(nonce.len() > client.nonce().len() && nonce.starts_with(client.nonce()));
    assert!(nonce.bytes().all(|b| b.is_ascii_graphic() && b != b','));
    assert_eq!(attributes.next(), Some(format!("s={salt}").as_str()));
    assert_eq!(attributes.next(), Some(format!("i={iterations}").as_str()));
    assert_eq!(attributes.next(), None);
    // invariant: a parsed client-first has a gs2-header of two comma-ended parts.
    let (flag, rest) = text.split_once(',').expect("gs2 flag");
    let (authz, bare) = rest.split_once(',').expect("gs2 authzid");
    let exchange = Exchange {
        bare,
        server_first: server.message.clone(),
        nonce,
        channel_binding: BASE64.encode(format!("{flag},{authz},")),
    };
    (server, exchange)
}

fuzz_target!(|data: &[u8]| {
    let (first, template) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let client = match ClientFirst::parse(first) {
        Ok(client) => client,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    // invariant: a parsed message is UTF-8.
    let text = std::str::from_utf8(first).expect("parsed client-first is UTF-8");
    assert!(!client.username.is_empty());
    assert!(client.authzid.as_ref().is_none_or(|a| !a.is_empty()));
    let keys = fixture().keys.clone();

    // A client that knows the password gets in, and a flipped proof bit keeps it out.
    let (server, ex) = start(&client, text, keys.clone());
    let without_proof = format!("c={},r={}", ex.channel_binding, ex.nonce);
    let proof = ex.proof(without_proof.as_bytes());
    let good = format!("{without_proof},p={}", BASE64.encode(proof));
    assert_eq!(
        server.finish(good.as_bytes()),
        Ok(ex.server_final(without_proof.as_bytes()))
    );
    let (server, ex) = start(&client, text, keys.clone());
    let without_proof = format!("c={},r={}", ex.channel_binding, ex.nonce);
    let mut flipped = ex.proof(without_proof.as_bytes());
    flipped[usize::from(data[0]) % 32] ^= 1 << (data.len() % 8);
    let bad = format!("{without_proof},p={}", BASE64.encode(flipped));
    assert_eq!(server.finish(bad.as_bytes()), Err(ScramFailure::BadProof));

    // The fuzzed final: success only with the correct proof of what it signs.
    let (server, ex) = start(&client, text, keys.clone());
    let message = ex.fill(template);
    if let Ok(server_final) = server.finish(&message) {
        let text = std::str::from_utf8(&message).expect("accepted final is UTF-8");
        let (without_proof, proof) = text.rsplit_once(",p=").expect("accepted final has a proof");
        assert_eq!(proof, BASE64.encode(ex.proof(without_proof.as_bytes())));
        assert_eq!(server_final, ex.server_final(without_proof.as_bytes()));
    }

    // An unknown user's stand-in keys accept nothing.
    let fake = fake_keys(&client.username, &SERVER_SECRET, MIN_SCRAM_ITERATIONS);
    let (server, ex) = start(&client, text, fake);
    assert!(server.finish(&ex.fill(template)).is_err());
});
