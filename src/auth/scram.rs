//! The server side of SCRAM-SHA-256 (RFC 5802, 7677) without channel binding.
//! Pure message handling: no I/O, no logging; proofs are compared in constant time.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{hmac_sha256, AuthError, ScramKeys};

/// Longest client message accepted. Real ones are far shorter; the cap bounds the work a
/// hostile client can cause.
pub const MAX_MESSAGE_LEN: usize = 2048;

/// Random bytes appended to the client nonce (base64-encoded, so never a comma).
const SERVER_NONCE_LEN: usize = 24;

/// Bytes of salt `fake_keys` hands out, matching what real credentials use.
const FAKE_SALT_LEN: usize = 16;

/// The parsed client-first message.
pub struct ClientFirst {
    /// The authentication identity, with `=2C`/`=3D` decoded and SASLprep applied
    /// (RFC 5802 §5.1), so a name a client did not prepare finds the same account.
    pub username: String,
    /// The authorization identity (`a=`), decoded and prepared like `username`. The
    /// caller refuses one that names anybody else (`super::is_own_authzid`).
    pub authzid: Option<String>,
    client_nonce: String,
    /// `client-first-message-bare`, the start of the AuthMessage both sides sign.
    bare: String,
    /// The gs2-header exactly as sent: the client-final `c=` attribute must echo it.
    gs2_header: String,
}

impl ClientFirst {
    pub fn parse(msg: &[u8]) -> Result<ClientFirst, AuthError> {
        let text = message_text(msg)?;
        let (cbind_flag, rest) = text
            .split_once(',')
            .ok_or(AuthError::Malformed("SCRAM gs2-header is incomplete"))?;
        match cbind_flag {
            // "y": the client could bind but believes we cannot, which is true (RFC 5802 §6).
            "n" | "y" => {}
            flag if flag.starts_with("p=") => {
                return Err(AuthError::Malformed("SCRAM channel binding is not offered"));
            }
            _ => {
                return Err(AuthError::Malformed(
                    "SCRAM channel-binding flag is invalid",
                ))
            }
        }
        let (authz, bare) = rest
            .split_once(',')
            .ok_or(AuthError::Malformed("SCRAM gs2-header is incomplete"))?;
        let authzid = match authz {
            "" => None,
            a => Some(prepare_name(&decode_saslname(
                a.strip_prefix("a=")
                    .ok_or(AuthError::Malformed("SCRAM authzid is invalid"))?,
            )?)?),
        };
        let gs2_header = &text[..text.len() - bare.len()];

        let mut attributes = bare.split(',');
        let first = attributes.next().unwrap_or_default();
        if first.starts_with("m=") {
            return Err(AuthError::Malformed(
                "SCRAM mandatory extension is not supported",
            ));
        }
        let username = prepare_name(&decode_saslname(
            first
                .strip_prefix("n=")
                .ok_or(AuthError::Malformed("SCRAM username is missing"))?,
        )?)?;
        let client_nonce = attributes
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(AuthError::Malformed("SCRAM client nonce is missing"))?;
        if !is_valid_nonce(client_nonce) {
            return Err(AuthError::Malformed("SCRAM client nonce is invalid"));
        }
        check_extensions(attributes)?;

        Ok(ClientFirst {
            username,
            authzid,
            client_nonce: client_nonce.to_owned(),
            bare: bare.to_owned(),
            gs2_header: gs2_header.to_owned(),
        })
    }
}

/// The exchange after the server-first message was sent.
pub struct ServerFirst {
    keys: ScramKeys,
    /// `client-first-message-bare "," server-first-message`.
    auth_message_prefix: String,
    /// Client nonce followed by the server's part.
    nonce: String,
    /// The `c=` value the client-final message must carry: base64 of the gs2-header.
    channel_binding: String,
    /// The server-first message to send to the client.
    pub message: String,
}

impl ServerFirst {
    /// Makes the server-first message for `client` with `keys` (real or `fake_keys`).
    pub fn new(client: &ClientFirst, keys: ScramKeys) -> ServerFirst {
        let mut random = [0u8; SERVER_NONCE_LEN];
        OsRng.fill_bytes(&mut random);
        Self::with_nonce(client, keys, &BASE64.encode(random))
    }

    /// `new` with a chosen server nonce suffix, which must be printable ASCII without commas;
    /// lets tests replay published exchanges.
    pub(crate) fn with_nonce(client: &ClientFirst, keys: ScramKeys, suffix: &str) -> ServerFirst {
        debug_assert!(is_valid_nonce(suffix), "server nonce suffix {suffix:?}");
        let nonce = format!("{}{suffix}", client.client_nonce);
        let message = format!(
            "r={nonce},s={},i={}",
            BASE64.encode(&keys.salt),
            keys.iterations
        );
        ServerFirst {
            keys,
            auth_message_prefix: format!("{},{message}", client.bare),
            nonce,
            channel_binding: BASE64.encode(&client.gs2_header),
            message,
        }
    }

    /// Verifies the client-final message. `Ok(server_final)` carries `v=...` to send.
    pub fn finish(self, client_final: &[u8]) -> Result<String, ScramFailure> {
        let text = message_text(client_final).map_err(|_| ScramFailure::Malformed)?;
        // The proof is the last attribute (RFC 5802 §7) and base64 never holds a comma.
        let (without_proof, proof) = text.rsplit_once(",p=").ok_or(ScramFailure::Malformed)?;
        let proof: [u8; 32] = BASE64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramFailure::Malformed)?;

        let mut attributes = without_proof.split(',');
        let channel_binding = attributes
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(ScramFailure::Malformed)?;
        if channel_binding != self.channel_binding {
            return Err(ScramFailure::Malformed);
        }
        let nonce = attributes
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(ScramFailure::Malformed)?;
        if nonce != self.nonce {
            return Err(ScramFailure::Malformed);
        }
        check_extensions(attributes).map_err(|_| ScramFailure::Malformed)?;

        let auth_message = format!("{},{without_proof}", self.auth_message_prefix);
        let client_signature = hmac_sha256(&self.keys.stored_key, &[auth_message.as_bytes()]);
        let mut client_key = proof;
        for (k, s) in client_key.iter_mut().zip(client_signature) {
            *k ^= s;
        }
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        if !bool::from(stored_key.ct_eq(&self.keys.stored_key)) {
            return Err(ScramFailure::BadProof);
        }
        let server_signature = hmac_sha256(&self.keys.server_key, &[auth_message.as_bytes()]);
        Ok(format!("v={}", BASE64.encode(server_signature)))
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum ScramFailure {
    Malformed,
    BadProof,
}

/// Deterministic stand-in keys for an unknown user, so the exchange looks the same.
///
/// The salt depends only on the name and the server secret, so asking twice about one
/// unknown name shows the same salt, as a real account would. The keys are HMAC outputs
/// nobody knows a SHA-256 preimage for, so no proof can ever match them.
pub fn fake_keys(username: &str, server_secret: &[u8; 32], iterations: u32) -> ScramKeys {
    let name = username.as_bytes();
    let salt = hmac_sha256(server_secret, &[b"salt", name]);
    ScramKeys {
        salt: salt[..FAKE_SALT_LEN].to_vec(),
        iterations,
        stored_key: hmac_sha256(server_secret, &[b"stored-key", name]),
        server_key: hmac_sha256(server_secret, &[b"server-key", name]),
    }
}

impl ClientFirst {
    #[doc(hidden)]
    pub fn nonce(&self) -> &str {
        &self.client_nonce
    }
}

/// The message as text: bounded, UTF-8 and free of NUL, which no SCRAM attribute allows.
fn message_text(msg: &[u8]) -> Result<&str, AuthError> {
    if msg.len() > MAX_MESSAGE_LEN {
        return Err(AuthError::Malformed("SCRAM message is too long"));
    }
    let text =
        std::str::from_utf8(msg).map_err(|_| AuthError::Malformed("SCRAM message is not UTF-8"))?;
    if text.contains('\0') {
        return Err(AuthError::Malformed("SCRAM message contains NUL"));
    }
    Ok(text)
}

/// Decodes a `saslname` (RFC 5802 §7): non-empty, with `,` and `=` sent as `=2C` and `=3D`.
fn decode_saslname(raw: &str) -> Result<String, AuthError> {
    if raw.is_empty() {
        return Err(AuthError::Malformed("SCRAM name is empty"));
    }
    let mut name = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(at) = rest.find('=') {
        name.push_str(&rest[..at]);
        let escape = rest.get(at..at + 3);
        name.push(match escape {
            Some("=2C") => ',',
            Some("=3D") => '=',
            _ => return Err(AuthError::Malformed("SCRAM name has an invalid escape")),
        });
        rest = &rest[at + 3..];
    }
    name.push_str(rest);
    Ok(name)
}

/// SASLprep (RFC 4013) of a received name; a name with prohibited characters (controls,
/// unassigned code points, bidi errors) names nobody, nor does one that SASLprep maps to
/// nothing (only soft hyphens, say): RFC 5802's names are never empty.
fn prepare_name(name: &str) -> Result<String, AuthError> {
    let prepared = stringprep::saslprep(name)
        .map_err(|_| AuthError::Malformed("SCRAM name fails SASLprep"))?;
    if prepared.is_empty() {
        return Err(AuthError::Malformed("SCRAM name is empty after SASLprep"));
    }
    Ok(prepared.into_owned())
}

/// `printable` of RFC 5802 §7: visible ASCII except the comma.
fn is_valid_nonce(nonce: &str) -> bool {
    !nonce.is_empty()
        && nonce
            .bytes()
            .all(|b| matches!(b, 0x21..=0x2b | 0x2d..=0x7e))
}

/// Optional extensions are ignored, but each must at least be `ALPHA "=" value`.
fn check_extensions<'a>(attributes: impl Iterator<Item = &'a str>) -> Result<(), AuthError> {
    for attribute in attributes {
        match attribute.as_bytes() {
            [name, b'=', _, ..] if name.is_ascii_alphabetic() => {}
            _ => return Err(AuthError::Malformed("SCRAM extension is invalid")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const RFC_SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const RFC_SALT: &str = "W22ZaJ0SNY7soEsUEjb6gQ==";
    const RFC_SERVER_FIRST: &str = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                                    s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const RFC_CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                                    p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const RFC_SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_keys() -> ScramKeys {
        ScramKeys::derive(b"pencil", &BASE64.decode(RFC_SALT).unwrap(), 4096)
    }

    fn rfc_exchange() -> ServerFirst {
        let client = ClientFirst::parse(RFC_CLIENT_FIRST.as_bytes()).unwrap();
        ServerFirst::with_nonce(&client, rfc_keys(), RFC_SERVER_NONCE)
    }

    /// A minimal client: the final message for `password` after `server_first`.
    fn client_final(password: &[u8], client_first: &str, server_first: &str) -> String {
        let (gs2_header, bare) = {
            let mut parts = client_first.splitn(3, ',');
            let (flag, authz) = (parts.next().unwrap(), parts.next().unwrap());
            (
                format!("{flag},{authz},"),
                parts.next().unwrap().to_string(),
            )
        };
        let attr = |key: &str| {
            server_first
                .split(',')
                .find_map(|a| a.strip_prefix(key))
                .unwrap()
                .to_string()
        };
        let salt = BASE64.decode(attr("s=")).unwrap();
        let iterations: u32 = attr("i=").parse().unwrap();
        let without_proof = format!("c={},r={}", BASE64.encode(&gs2_header), attr("r="));
        let auth_message = format!("{bare},{server_first},{without_proof}");
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password, &salt, iterations, &mut salted);
        let client_key = hmac_sha256(&salted, &[b"Client Key"]);
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let signature = hmac_sha256(&stored_key, &[auth_message.as_bytes()]);
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature)
            .map(|(k, s)| k ^ s)
            .collect();
        format!("{without_proof},p={}", BASE64.encode(proof))
    }

    #[test]
    fn rfc_7677_example_exchange() {
        let client = ClientFirst::parse(RFC_CLIENT_FIRST.as_bytes()).unwrap();
        assert_eq!(client.username, "user");
        assert_eq!(client.authzid, None);
        assert_eq!(client.nonce(), "rOprNGfwEbeRWgbNEkqO");
        let server = ServerFirst::with_nonce(&client, rfc_keys(), RFC_SERVER_NONCE);
        assert_eq!(server.message, RFC_SERVER_FIRST);
        assert_eq!(
            client_final(b"pencil", RFC_CLIENT_FIRST, &server.message),
            RFC_CLIENT_FINAL
        );
        assert_eq!(
            server.finish(RFC_CLIENT_FINAL.as_bytes()).unwrap(),
            RFC_SERVER_FINAL
        );
    }

    #[test]
    fn full_exchange_with_random_nonce_and_salt() {
        let creds =
            crate::auth::make_credentials("s3cret", &crate::auth::HashParams::cheap()).unwrap();
        for first in [
            "n,,n=alice,r=abc",
            "y,,n=alice,r=x+y/z",
            "n,a=boss,n=alice,r=!~",
            "n,,n=alice,r=abc,x=ext",
        ] {
            let client = ClientFirst::parse(first.as_bytes()).unwrap();
            let server = ServerFirst::new(&client, creds.scram.clone().unwrap());
            let nonce = server
                .message
                .split(',')
                .next()
                .unwrap()
                .strip_prefix("r=")
                .unwrap();
            assert!(nonce.starts_with(client.nonce()) && nonce.len() == client.nonce().len() + 32);
            assert!(is_valid_nonce(nonce), "{nonce}");
            let final_msg = client_final(b"s3cret", first, &server.message);
            assert!(
                server
                    .finish(final_msg.as_bytes())
                    .unwrap()
                    .starts_with("v="),
                "{first}"
            );
        }
    }

    #[test]
    fn server_nonces_are_fresh() {
        let client = ClientFirst::parse(RFC_CLIENT_FIRST.as_bytes()).unwrap();
        let a = ServerFirst::new(&client, rfc_keys());
        let b = ServerFirst::new(&client, rfc_keys());
        assert_ne!(a.message, b.message);
    }

    #[test]
    fn parses_names_authzid_and_escapes() {
        let cases = [
            ("n,,n=user,r=abc", "user", None, "abc"),
            ("y,,n=user,r=abc", "user", None, "abc"),
            ("n,a=admin,n=user,r=abc", "user", Some("admin"), "abc"),
            (
                "n,a=ad=3Dm=2Cin,n=us=2Cer=3D,r=abc",
                "us,er=",
                Some("ad=m,in"),
                "abc",
            ),
            ("n,,n==3D=3D,r=abc", "==", None, "abc"),
            ("n,,n=jörg,r=abc", "jörg", None, "abc"),
            // SASLprep (RFC 4013 §3): soft hyphen mapped to nothing, NFKC, non-ASCII
            // space to space.
            ("n,,n=I\u{00AD}X,r=abc", "IX", None, "abc"),
            ("n,a=\u{2168},n=\u{FF4A}oe,r=abc", "joe", Some("IX"), "abc"),
            ("n,,n=a\u{00A0}b,r=abc", "a b", None, "abc"),
            ("n,,n=user,r=abc,e=1,f==", "user", None, "abc"),
            (
                "n,,n=user@example.org,r=!\"#$%&'()*+-./:;<=>?@[\\]^_`{|}~",
                "user@example.org",
                None,
                "!\"#$%&'()*+-./:;<=>?@[\\]^_`{|}~",
            ),
        ];
        for (input, username, authzid, nonce) in cases {
            let client =
                ClientFirst::parse(input.as_bytes()).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(client.username, username, "{input}");
            assert_eq!(client.authzid.as_deref(), authzid, "{input}");
            assert_eq!(client.nonce(), nonce, "{input}");
        }
    }

    #[test]
    fn rejects_malformed_client_first() {
        let too_long = format!("n,,n=user,r={}", "a".repeat(MAX_MESSAGE_LEN));
        let cases: Vec<&[u8]> = vec![
            b"",
            b"n",
            b"n,",
            b"n,,",
            b"garbage",
            b"\xff\xfe",
            b"p=tls-unique,,n=user,r=abc",
            b"p=tls-server-end-point,a=x,n=user,r=abc",
            b"x,,n=user,r=abc",
            b"N,,n=user,r=abc",
            b"n,b=admin,n=user,r=abc",
            b"n,a=,n=user,r=abc",
            b"n,a=bad=escape,n=user,r=abc",
            // Prohibited by SASLprep: a control character, an unassigned code point,
            // mixed bidi directions; a name of nothing but soft hyphens.
            b"n,,n=us\x07er,r=abc",
            "n,,n=u\u{0221},r=abc".as_bytes(),
            "n,,n=\u{0627}1,r=abc".as_bytes(),
            "n,a=x\u{0007},n=user,r=abc".as_bytes(),
            "n,,n=\u{00AD},r=abc".as_bytes(),
            "n,,n=\u{00AD}\u{00AD},r=abc".as_bytes(),
            "n,a=\u{00AD},n=user,r=abc".as_bytes(),
            b"n,,m=ext,n=user,r=abc",
            b"n,,n=,r=abc",
            b"n,,n=user",
            b"n,,n=user,",
            b"n,,n=user,r=",
            b"n,,n=user,r=a b",
            b"n,,n=user,r=abc\x7f",
            b"n,,n=user,r=caf\xc3\xa9",
            b"n,,r=abc,n=user",
            b"n,,user,r=abc",
            b"n,,n=us=2cer,r=abc",
            b"n,,n=us=41er,r=abc",
            b"n,,n=user=,r=abc",
            b"n,,n=user=2,r=abc",
            b"n,,n=us\0er,r=abc",
            b"n,,n=user,r=abc,",
            b"n,,n=user,r=abc,1=x",
            b"n,,n=user,r=abc,ext",
            b"n,,n=user,r=abc,e=",
            b"n,,n=user,s=abc",
            too_long.as_bytes(),
        ];
        for input in cases {
            assert!(
                matches!(ClientFirst::parse(input), Err(AuthError::Malformed(_))),
                "{input:?}"
            );
        }
    }

    #[test]
    fn channel_binding_header_must_be_echoed() {
        let combined = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let proof = "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        // "eSws" is base64("y,,"), "biwsCg==" adds a newline, "bixhPXgs" is "n,a=x,".
        for cbind in [
            "eSws",
            "biwsCg==",
            "bixhPXgs",
            "",
            "biws=",
            "BIWS",
            "cD10bHMtdW5pcXVlLCw=",
        ] {
            let msg = format!("c={cbind},r={combined},{proof}");
            assert_eq!(
                rfc_exchange().finish(msg.as_bytes()),
                Err(ScramFailure::Malformed),
                "{cbind}"
            );
        }
    }

    #[test]
    fn y_flag_needs_its_own_header_echoed() {
        let first = "y,,n=user,r=abc";
        let client = ClientFirst::parse(first.as_bytes()).unwrap();
        let server = ServerFirst::new(&client, rfc_keys());
        let good = client_final(b"pencil", first, &server.message);
        assert!(good.starts_with("c=eSws,"), "{good}");
        let lying = good.replacen("c=eSws", "c=biws", 1);
        assert_eq!(
            server.finish(lying.as_bytes()),
            Err(ScramFailure::Malformed)
        );
    }

    #[test]
    fn nonce_must_be_the_combined_one() {
        let client_nonce = "rOprNGfwEbeRWgbNEkqO";
        let combined = format!("{client_nonce}{RFC_SERVER_NONCE}");
        let proof = "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        let wrong = [
            client_nonce.to_string(),
            format!("{combined}x"),
            combined[..combined.len() - 1].to_string(),
            combined.to_ascii_lowercase(),
            format!("{client_nonce}%hvYDpWUa2RaTCAfuxFIlj)hNlF$k1"),
            String::new(),
        ];
        for nonce in wrong {
            let msg = format!("c=biws,r={nonce},{proof}");
            assert_eq!(
                rfc_exchange().finish(msg.as_bytes()),
                Err(ScramFailure::Malformed),
                "{nonce}"
            );
        }
    }

    #[test]
    fn bad_proofs_are_rejected() {
        let without_proof = RFC_CLIENT_FINAL.rsplit_once(",p=").unwrap().0;
        let mut flipped = BASE64
            .decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
            .unwrap();
        flipped[31] ^= 1;
        let wrong_password = client_final(b"pencil2", RFC_CLIENT_FIRST, RFC_SERVER_FIRST);
        let cases = [
            format!("{without_proof},p={}", BASE64.encode(&flipped)),
            format!("{without_proof},p={}", BASE64.encode([0u8; 32])),
            wrong_password,
            // The RFC proof signs no extension, so adding one changes the AuthMessage.
            format!("{without_proof},x=1,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="),
        ];
        for msg in cases {
            assert_eq!(
                rfc_exchange().finish(msg.as_bytes()),
                Err(ScramFailure::BadProof),
                "{msg}"
            );
        }
    }

    #[test]
    fn extensions_in_client_final_are_signed_and_accepted() {
        let first = "n,,n=user,r=abc";
        let client = ClientFirst::parse(first.as_bytes()).unwrap();
        let server = ServerFirst::new(&client, rfc_keys());
        let plain = client_final(b"pencil", first, &server.message);
        let (without_proof, _) = plain.rsplit_once(",p=").unwrap();
        // Recompute the proof over an AuthMessage that includes the extension.
        let with_ext = format!("{without_proof},x=yes");
        let bare = "n=user,r=abc";
        let auth_message = format!("{bare},{},{with_ext}", server.message);
        let salted = {
            let mut out = [0u8; 32];
            pbkdf2::pbkdf2_hmac::<Sha256>(
                b"pencil",
                &BASE64.decode(RFC_SALT).unwrap(),
                4096,
                &mut out,
            );
            out
        };
        let client_key = hmac_sha256(&salted, &[b"Client Key"]);
        let signature = hmac_sha256(&rfc_keys().stored_key, &[auth_message.as_bytes()]);
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature)
            .map(|(k, s)| k ^ s)
            .collect();
        let msg = format!("{with_ext},p={}", BASE64.encode(proof));
        assert!(server.finish(msg.as_bytes()).is_ok());
    }

    #[test]
    fn rejects_malformed_client_final() {
        let combined = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let proof = "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        let too_long = format!(
            "c=biws,r={combined},x={},p={proof}",
            "a".repeat(MAX_MESSAGE_LEN)
        );
        let cases = [
            String::new(),
            "garbage".to_string(),
            format!("c=biws,r={combined}"),
            format!("c=biws,r={combined},p="),
            format!("c=biws,r={combined},p={}", &proof[..proof.len() - 1]),
            format!("c=biws,r={combined},p={}", BASE64.encode([0u8; 31])),
            format!("c=biws,r={combined},p={}", BASE64.encode([0u8; 33])),
            format!("c=biws,r={combined},p=!!!notbase64!!!"),
            format!("c=biws,r={combined},p={proof},x=trailing"),
            format!("r={combined},c=biws,p={proof}"),
            format!("c=biws,p={proof}"),
            format!("r={combined},p={proof}"),
            format!("c=biws,r={combined},,p={proof}"),
            format!("c=biws,r={combined},1=x,p={proof}"),
            format!("c=biws,r={combined},x=,p={proof}"),
            format!("c=biws,r={combined},p={proof}\0"),
            format!("c=biws,r={combined}, p={proof}"),
            too_long,
        ];
        for msg in cases {
            assert_eq!(
                rfc_exchange().finish(msg.as_bytes()),
                Err(ScramFailure::Malformed),
                "{msg}"
            );
        }
        assert_eq!(
            rfc_exchange().finish(b"c=biws,\xff,p=x"),
            Err(ScramFailure::Malformed)
        );
    }

    #[test]
    fn fake_keys_are_stable_per_name_and_never_verify() {
        let secret = [7u8; 32];
        let a = fake_keys("ghost", &secret, 4096);
        assert!(a == fake_keys("ghost", &secret, 4096));
        assert_eq!(a.salt.len(), FAKE_SALT_LEN);
        assert_eq!(a.iterations, 4096);
        assert_ne!(a.salt, fake_keys("ghost2", &secret, 4096).salt);
        assert_ne!(a.salt, fake_keys("ghost", &[8u8; 32], 4096).salt);
        assert_ne!(a.stored_key, a.server_key);
        assert_eq!(fake_keys("ghost", &secret, 10_000).iterations, 10_000);

        let first = "n,,n=ghost,r=clientnonce";
        let client = ClientFirst::parse(first.as_bytes()).unwrap();
        for password in [&b"pencil"[..], b"", b"ghost"] {
            let server = ServerFirst::new(&client, fake_keys(&client.username, &secret, 4096));
            assert!(server
                .message
                .contains(&format!(",s={},i=4096", BASE64.encode(&a.salt))));
            let msg = client_final(password, first, &server.message);
            assert_eq!(server.finish(msg.as_bytes()), Err(ScramFailure::BadProof));
        }
    }

    #[test]
    fn saslname_decoding() {
        let ok = [
            ("a", "a"),
            ("=2C", ","),
            ("=3D", "="),
            ("a=2Cb=3Dc", "a,b=c"),
            ("ü=2C", "ü,"),
        ];
        for (raw, decoded) in ok {
            assert_eq!(decode_saslname(raw).unwrap(), decoded);
        }
        for raw in ["", "=", "=2", "=2c", "=3d", "=20", "a=", "=ü2C", "==2C"] {
            assert!(decode_saslname(raw).is_err(), "{raw}");
        }
    }
}
