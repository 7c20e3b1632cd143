//! The bytes of the mail protocols that every protocol shares, with no I/O: line
//! framing with limits (`line`), dot-unstuffing of received bodies (`dot`), CRLF
//! normalisation of stored messages (`crlf`) and mailbox-name syntax (`address`).
//! Pure: std, `bytes` and `thiserror` only — no tokio, no store, no tracing.

pub mod address;
pub mod crlf;
pub mod dot;
pub mod line;

pub use address::{Address, AddressError, POSTMASTER};
pub use crlf::CrlfNormalizer;
pub use dot::{DotUnstuffer, Unstuffed};
pub use line::{LineError, LineReader};
