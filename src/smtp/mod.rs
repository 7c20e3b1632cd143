//! Mail coming in: LMTP (RFC 2033) for MTAs and inbound SMTP (RFC 5321) for hosted
//! domains, on one protocol core. `codec` parses commands and encodes replies, `core`
//! is the sans-IO state machine, `session` drives both over a socket and streams DATA
//! into the stores through `delivery`.

pub mod codec;
pub mod core;
pub mod session;

pub use session::{refusal, run_tcp, run_unix, Service};
