//! POP3 (RFC 1939, 2449, 2595, 5034): a pure `codec`; the `session` (connection, states,
//! the one gate and the one dispatch); `login` (USER/PASS, APOP, SASL, opening the
//! maildrop) behind the `accounts::Authenticator`; the listing commands in `maildrop`;
//! RETR/TOP streaming and UPDATE in `retrieve`; handing a session whose domain lives on
//! another replica to that home in `forward`. Nothing outside `codec` writes protocol
//! bytes.

pub mod accounts;
pub mod codec;
mod forward;
mod login;
pub mod maildrop;
mod retrieve;
pub mod session;

pub use accounts::{Accounts, Authenticator};
pub use session::{refusal, run, run_forwarded, Service};
