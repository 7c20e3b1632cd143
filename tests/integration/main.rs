//! Integration tests: a real mailgate server on 127.0.0.1 ephemeral ports (started in
//! this process through `app::start`, or as the `mailgate serve` binary where signals,
//! `kill -9` or the process itself are tested), real TLS with a test CA, real clients
//! (Python poplib, curl) as well as a raw client for byte-exact and hostile cases, a real
//! redis-server for the replica tests (with a replica and three sentinels for the failover
//! test), and private Postfix instances and swaks for mail coming in; `tls_tools` loads
//! certificates made by `openssl` and `certs/make-dev-certs.sh` through the library. One
//! binary keeps link time down.

mod common;

mod auth_limits;
mod bounds;
mod cli;
mod cli_errors;
mod clients;
mod cluster;
mod config_example;
mod crash;
mod diskfull;
mod helm;
mod hostile;
mod import;
mod last;
mod layers;
mod metrics;
mod moves;
mod pop3;
mod postfix;
mod provision;
mod proxy;
mod replicas;
mod sentinel;
mod smtp;
mod smtp_probes;
mod store_format;
mod store_open;
mod tls_rotation;
mod tls_tools;
