//! The sans-IO POP3 codec: line framing, command parsing, reply encoding and
//! dot-stuffing. Pure: std and `bytes` only — no tokio, no store, no tracing.

pub mod body;
pub mod command;
pub mod line;
pub mod reply;

pub use body::{BodyEncoder, BodyOptions, DotUnstuffer, Unstuffed};
pub use command::{verb_of, Command, ParseError, VERBS};
pub use line::{LineError, LineReader, MAX_COMMAND_LINE, MAX_SASL_LINE};
pub use reply::{format_uid, write_uid, Capabilities, MsgEntry, Reply, RespCode, UID_LEN};
