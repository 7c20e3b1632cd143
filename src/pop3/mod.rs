//! POP3 (RFC 1939, 2449, 2595, 5034): a pure codec and the async session that drives it.
//! Nothing outside `codec` writes protocol bytes.

pub mod codec;
pub mod session;
