//! The sans-IO POP3 codec: command parsing, reply encoding and dot-stuffing (line
//! framing is `wire::line`'s). Pure: std and `bytes` only — no tokio, no store, no tracing.

pub mod body;
pub mod command;
pub mod reply;

pub use body::{BodyEncoder, BodyOptions};
pub use command::{verb_of, Command, ParseError, MAX_COMMAND_LINE, MAX_SASL_LINE, VERBS};
pub use reply::{Capabilities, ListingWriter, MsgEntry, Reply, RespCode};
