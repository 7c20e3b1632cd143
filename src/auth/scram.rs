//! The server side of SCRAM-SHA-256 (RFC 5802, 7677) without channel binding.

use super::{AuthError, ScramKeys};

/// The parsed client-first message.
pub struct ClientFirst {
    /// The authentication identity, with `=2C`/`=3D` decoded.
    pub username: String,
    pub authzid: Option<String>,
    client_nonce: String,
    bare: String,
}

impl ClientFirst {
    pub fn parse(msg: &[u8]) -> Result<ClientFirst, AuthError> {
        let _ = msg;
        todo!()
    }
}

/// The exchange after the server-first message was sent.
pub struct ServerFirst {
    keys: ScramKeys,
    auth_message_prefix: String,
    nonce: String,
    /// The server-first message to send to the client.
    pub message: String,
}

impl ServerFirst {
    /// Makes the server-first message for `client` with `keys` (real or `fake_keys`).
    pub fn new(client: &ClientFirst, keys: ScramKeys) -> ServerFirst {
        let _ = (client, keys);
        todo!()
    }

    /// Verifies the client-final message. `Ok(server_final)` carries `v=...` to send.
    pub fn finish(self, client_final: &[u8]) -> Result<String, ScramFailure> {
        let _ = (client_final, &self.keys, &self.auth_message_prefix, &self.nonce);
        todo!()
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum ScramFailure {
    Malformed,
    BadProof,
}

/// Deterministic stand-in keys for an unknown user, so the exchange looks the same.
pub fn fake_keys(username: &str, server_secret: &[u8; 32], iterations: u32) -> ScramKeys {
    let _ = (username, server_secret, iterations);
    todo!()
}

impl ClientFirst {
    #[doc(hidden)]
    pub fn nonce(&self) -> &str {
        let _ = &self.bare;
        &self.client_nonce
    }
}
