//! mailgate: a TLS-first, multi-tenant mail gateway.
//!
//! The map of the crate, bottom layer first. A module may use only the layers below its
//! own (`tests/integration/layers.rs` checks it):
//!
//! 1. [`wire`]: the protocols' shared bytes with no I/O: line framing, dot-unstuffing,
//!    CRLF normalisation, mailbox-name syntax. [`fsutil`]: atomic file writes (temporary
//!    file, fsync, rename, directory fsync) for the files mailgate makes itself.
//! 2. Libraries with no state of the server's: [`auth`] (argon2id, SCRAM-SHA-256 keys,
//!    SASL response lines, PLAIN and APOP checks), [`tls`] (rustls configuration, SNI
//!    certificates, hot reload, the self-signed certificate) and [`redis_conn`] (the shared
//!    Redis connection: URL checks and redaction, reconnects, a timeout on every call).
//! 3. [`config`]: the one `Config` tree (defaults < TOML < `MAILGATE_*` env), validated
//!    once, and the `Listener` kinds.
//! 4. [`metrics`]: metric names, label sets and typed recording methods (one registry),
//!    and the HTTP endpoint for `/metrics`, `/healthz` and `/readyz`.
//! 5. [`net`]: the connection layer: connection context, limits and admission, client
//!    address and PROXY header, TLS accept, buffered line I/O, refusals, session ids and
//!    spans. [`store`]: `Directory` of per-domain sled stores (accounts, maildrops,
//!    message bodies). [`locks`]: exclusive maildrop locks behind the `LockBackend`
//!    trait, in process or in Redis. [`throttle`]: failed-login counting per client IP
//!    and per name, in process or in Redis.
//! 6. [`delivery`]: local delivery to one or more recipients, durable before it answers,
//!    with recipient verdicts and the postmaster rule. [`provision`]: domains and
//!    accounts created at start when absent. [`migrate`]: importing another server's
//!    accounts and mail (Dovecot passwd-files and Maildirs, parsed sans-IO), read where
//!    the CLI runs and stored on the server with their UIDLs.
//! 7. [`cluster`]: several replicas serving the same domains: the home records in
//!    Redis, rendezvous placement, the mutual-TLS replica link and the forwarding
//!    preamble, and the one routing question (serve here, forward, or try later).
//! 8. The protocols: [`pop3`] (codec, session, login, maildrop commands, retrieval,
//!    forwarding to the home), [`smtp`] (LMTP and inbound SMTP: codec, sans-IO core,
//!    session, forwarding to homes) and [`admin`] (the socket through which the CLI
//!    talks to a running server, and admin requests between replicas).
//! 9. [`server`]: listeners, accept loops, what each listener serves, the replica
//!    listener, readiness, drain.
//! 10. [`app`]: start-up (`app::start` → `Running`), housekeeping.
//!
//! `main.rs` (the CLI) sits on top.

// The type checker proves each session task `Send` by walking its nested async fns (a
// POP3 session reaches tokio's TcpStream::connect through login and the forward to a
// home). It already sat between 100 and 128 levels (rustc's default), so small changes
// tip it over; 256 leaves room rather than contorting the code.
#![recursion_limit = "256"]

pub mod admin;
pub mod app;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod delivery;
pub mod fsutil;
pub mod locks;
pub mod metrics;
pub mod migrate;
pub mod net;
pub mod pop3;
pub mod provision;
pub mod redis_conn;
pub mod server;
pub mod smtp;
pub mod store;
pub mod throttle;
pub mod tls;
pub mod wire;
