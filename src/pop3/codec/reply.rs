//! POP3 replies as values. `Reply::write_to` is the only place POP3 reply bytes are made.

use bytes::BytesMut;
use std::borrow::Cow;

/// RFC 2449 / 3206 extended response codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RespCode {
    InUse,
    Auth,
    SysTemp,
    SysPerm,
    LoginDelay,
}

/// One message of a session's snapshot, as listings need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsgEntry {
    /// Exact octets RETR sends before dot-stuffing.
    pub octets: u64,
    /// Store id; with the maildrop's nonce it forms the UIDL.
    pub id: u64,
    pub deleted: bool,
}

/// What CAPA announces for the connection's current state.
#[derive(Debug, Clone, Copy)]
pub struct Capabilities<'a> {
    pub user: bool,
    pub stls: bool,
    pub sasl: &'a [&'a str],
    pub implementation: &'a str,
}

#[derive(Debug)]
pub enum Reply<'a> {
    Ok(Cow<'a, str>),
    Err(Option<RespCode>, Cow<'a, str>),
    Greeting { hostname: &'a str, apop_timestamp: Option<&'a str> },
    Challenge(&'a [u8]),
    Capa(Capabilities<'a>),
    Stat { count: usize, octets: u64 },
    Scan { msg: u32, octets: u64 },
    ScanListing(&'a [MsgEntry]),
    Unique { msg: u32, nonce: u32, id: u64 },
    UniqueListing { nonce: u32, msgs: &'a [MsgEntry] },
    MessageFollows { octets: u64 },
}

impl Reply<'_> {
    pub fn write_to(&self, out: &mut BytesMut) {
        let _ = out;
        todo!()
    }
}
