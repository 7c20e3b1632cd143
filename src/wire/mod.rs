//! The bytes of the mail protocols that every protocol shares, with no I/O: line
//! framing with limits (`line`), dot-unstuffing of received bodies (`dot`), CRLF
//! normalisation of stored messages (`crlf`), mailbox-name syntax (`address`) and the
//! unique-id of a stored message (`uidl`).
//! Pure: std, `bytes` and `thiserror` only — no tokio, no store, no tracing.

pub mod address;
pub mod crlf;
pub mod dot;
pub mod line;
pub mod uidl;

pub use address::{Address, AddressError, POSTMASTER};
pub use crlf::CrlfNormalizer;
pub use dot::{DotUnstuffer, Unstuffed};
pub use line::{LineError, LineReader};
pub use uidl::{uidl, validate_uidl, UidlError, Uidls};
