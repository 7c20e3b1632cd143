//! Mail coming in: LMTP (RFC 2033) for MTAs and inbound SMTP (RFC 5321) for hosted
//! domains, on one protocol core. `codec` parses commands and encodes replies, `core`
//! is the sans-IO state machine, `session` drives both over a socket and streams DATA
//! into the stores through `delivery`, and `forward` relays the recipients of another
//! replica's domains to their home.

pub mod codec;
pub mod core;
pub mod forward;
pub mod session;

pub use session::{refusal, run_forwarded, run_tcp, run_unix, Service};
