//! mailgate: a TLS-first, multi-tenant mail gateway.
//!
//! The map of the crate:
//!
//! - [`config`]: the one `Config` tree (defaults < TOML < `MAILGATE_*` env), validated once.
//! - [`server`]: listeners, connection limits, the accept loops and graceful shutdown.
//! - [`proxy`]: the PROXY protocol (v1, v2) a load balancer sends first: a pure decoder
//!   and a reader that takes exactly the header's bytes from the socket.
//! - [`tls`]: rustls server configuration, SNI certificate selection and hot reload.
//! - [`pop3`]: the POP3 protocol — a pure `codec` (parser, replies, dot-stuffing) and the
//!   async `session` that drives it over a socket.
//! - [`smtp`]: mail coming in — LMTP for MTAs and inbound SMTP for hosted domains: a pure
//!   `codec` and `core` (state machine) and the async `session` that streams DATA into
//!   the stores.
//! - [`store`]: `Directory` of per-domain sled stores: accounts, maildrops, message bodies.
//! - [`locks`]: exclusive maildrop locks behind the `LockBackend` trait: in process for
//!   one replica, or in Redis (token-owned keys with a TTL) for several.
//! - [`throttle`]: failed-login counting per client IP and per name, in process or in Redis.
//! - [`redis_conn`]: the shared Redis connection: URL checks and redaction, reconnects, a
//!   bounded timeout on every call.
//! - [`auth`]: password hashing (argon2id), SCRAM-SHA-256 keys, SASL PLAIN and APOP checks.
//! - [`delivery`]: local delivery to one or more recipients, durable before it answers.
//! - [`message`]: pure helpers for RFC 5322 message bytes (CRLF normalisation at delivery).
//! - [`fsutil`]: atomic file writes (temporary file, fsync, rename, directory fsync) for
//!   the files mailgate makes itself: the self-signed certificate and the server secret.
//! - [`metrics`]: metric names, label sets and handles (one registry), and the HTTP
//!   endpoint for `/metrics`, `/healthz` and `/readyz`.
//! - [`admin`]: the admin socket through which the CLI talks to a running server.
//! - [`provision`]: domains and accounts (from PHC hashes) created at start when absent.

pub mod admin;
pub mod auth;
pub mod config;
pub mod delivery;
pub mod fsutil;
pub mod locks;
pub mod message;
pub mod metrics;
pub mod pop3;
pub mod provision;
pub mod proxy;
pub mod redis_conn;
pub mod server;
pub mod smtp;
pub mod store;
pub mod throttle;
pub mod tls;
