//! The PROXY protocol (v1 text and v2 binary, haproxy's `proxy-protocol.txt`) that a load
//! balancer sends before the client's first byte, naming the client's address. `decode`
//! is pure: it frames a header in the bytes received so far and says how many bytes it
//! took; the fields are checked by the `ppp` crate. `read_header` takes exactly those
//! bytes from a socket, so whatever follows (a TLS ClientHello, a POP3 command) stays for
//! the session. Whom to believe is decided by the caller (`net::client_addr`); this
//! module must not write to the socket, log or count.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Longest v1 header, CRLF included (the specification's limit).
pub const V1_MAX: usize = 107;
/// Most bytes of TLVs (after the addresses) accepted in a v2 header; larger is refused
/// before it is read.
pub const V2_MAX_TLV: usize = 4096;
/// The v2 signature, the first 12 bytes of every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version/command, family/protocol and the 16-bit length of what follows.
const V2_FIXED: usize = 16;
/// The largest v2 address block (two unix socket paths of 108 bytes).
const V2_MAX_ADDRESSES: usize = 216;
/// Longest header of either version accepted.
pub const MAX_HEADER: usize = V2_FIXED + V2_MAX_ADDRESSES + V2_MAX_TLV;
const V1_PREFIX: &[u8] = b"PROXY ";
/// Bytes looked at per read while framing a header.
const PEEK_CHUNK: usize = 512;

/// Why bytes are not a PROXY header.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("the connection does not start with a PROXY protocol header")]
    NotProxy,
    #[error("v1 header without CRLF within {V1_MAX} bytes")]
    V1TooLong,
    #[error("malformed v1 header: {0}")]
    V1(String),
    #[error("v2 header announces {0} bytes of TLVs (at most {V2_MAX_TLV})")]
    V2TooLarge(usize),
    #[error("malformed v2 header: {0}")]
    V2(#[from] ppp::v2::ParseError),
}

/// What `decode` made of the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// A header has begun; all these bytes belong to it and at most `at_most` more do.
    Incomplete { at_most: usize },
    /// A whole header of `len` bytes (anything after it is not the header's).
    Complete {
        /// The client's address, or `None` when the header names none (v2 `LOCAL`, e.g.
        /// the load balancer's health check; v1 `UNKNOWN`; v2 `UNSPEC` or unix
        /// families): the connection then speaks for the socket's peer.
        client: Option<SocketAddr>,
        len: usize,
    },
}

/// Frames and checks a header at the start of `buf`, the bytes received so far.
pub fn decode(buf: &[u8]) -> Result<Decoded, HeaderError> {
    match buf.first() {
        None => Ok(Decoded::Incomplete {
            at_most: MAX_HEADER,
        }),
        Some(b'\r') => decode_v2(buf),
        Some(b'P') => decode_v1(buf),
        Some(_) => Err(HeaderError::NotProxy),
    }
}

/// `buf` starts like `prefix` for as far as either goes.
fn starts_like(buf: &[u8], prefix: &[u8]) -> bool {
    let n = buf.len().min(prefix.len());
    buf[..n] == prefix[..n]
}

fn decode_v1(buf: &[u8]) -> Result<Decoded, HeaderError> {
    use ppp::v1::Addresses;
    if !starts_like(buf, V1_PREFIX) {
        return Err(HeaderError::NotProxy);
    }
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        if buf.len() >= V1_MAX {
            return Err(HeaderError::V1TooLong);
        }
        return Ok(Decoded::Incomplete {
            at_most: V1_MAX - buf.len(),
        });
    };
    let line = &window[..=lf];
    // One line ending in CRLF with no other CR: ppp cuts at the first CR, so this keeps
    // its idea of the header's end and ours the same.
    if !line.ends_with(b"\r\n") || line[..line.len() - 2].contains(&b'\r') {
        return Err(HeaderError::V1("the line does not end in CRLF".into()));
    }
    let header = ppp::v1::Header::try_from(line).map_err(|e| HeaderError::V1(e.to_string()))?;
    let client = match header.addresses {
        Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::Unknown => None,
    };
    Ok(Decoded::Complete {
        client,
        len: line.len(),
    })
}

fn decode_v2(buf: &[u8]) -> Result<Decoded, HeaderError> {
    use ppp::v2::{Addresses, Command, ParseError};
    if !starts_like(buf, &V2_SIGNATURE) {
        return Err(HeaderError::NotProxy);
    }
    if buf.len() < V2_FIXED {
        return Ok(Decoded::Incomplete {
            at_most: MAX_HEADER - buf.len(),
        });
    }
    // The fixed part alone: version, command, family and protocol are checked now, and
    // only a missing rest (`Partial`) is expected.
    match ppp::v2::Header::try_from(&buf[..V2_FIXED]) {
        Ok(_) | Err(ParseError::Partial(..)) => {}
        Err(e) => return Err(e.into()),
    }
    let length = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let addresses = match buf[13] >> 4 {
        0x1 => 12,
        0x2 => 36,
        0x3 => V2_MAX_ADDRESSES,
        _ => 0,
    };
    // ppp refused a length shorter than the family's addresses above.
    let tlvs = length.saturating_sub(addresses);
    if tlvs > V2_MAX_TLV {
        return Err(HeaderError::V2TooLarge(tlvs));
    }
    let total = V2_FIXED + length;
    if buf.len() < total {
        return Ok(Decoded::Incomplete {
            at_most: total - buf.len(),
        });
    }
    let header = ppp::v2::Header::try_from(&buf[..total])?;
    // TLVs are not used, but a header whose TLVs do not add up is malformed.
    for tlv in header.tlvs() {
        tlv?;
    }
    let client = match (header.command, header.addresses) {
        (Command::Proxy, Addresses::IPv4(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        (Command::Proxy, Addresses::IPv6(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        _ => None,
    };
    Ok(Decoded::Complete { client, len: total })
}

/// Why no client address came from a connection that had to send a header.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("connection closed after {0} bytes of a PROXY header")]
    Closed(usize),
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Header(#[from] HeaderError),
}

/// Reads the PROXY header that must start `stream`, within `timeout`, taking exactly its
/// bytes. `Ok(None)`: a valid header that names no client (keep the socket's peer).
pub async fn read_header(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<Option<SocketAddr>, ProxyError> {
    tokio::time::timeout(timeout, take_header(stream))
        .await
        .unwrap_or(Err(ProxyError::Timeout(timeout)))
}

async fn take_header(stream: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyError> {
    // Bytes are looked at with `peek` and taken only once `decode` has said they belong
    // to the header, so the socket is never read past its end.
    let mut seen = Vec::new();
    let mut chunk = [0u8; PEEK_CHUNK];
    let mut at_most = MAX_HEADER;
    loop {
        let taken = seen.len();
        let n = stream.peek(&mut chunk[..at_most.min(PEEK_CHUNK)]).await?;
        if n == 0 {
            return Err(ProxyError::Closed(taken));
        }
        seen.extend_from_slice(&chunk[..n]);
        match decode(&seen)? {
            Decoded::Complete { client, len } => {
                // `decode` found `seen[..taken]` incomplete, so the header ends in this
                // chunk: `taken < len <= taken + n`.
                stream.read_exact(&mut chunk[..len - taken]).await?;
                return Ok(client);
            }
            Decoded::Incomplete { at_most: more } => {
                // All of it is header: take it, so the next peek waits for new bytes.
                stream.read_exact(&mut chunk[..n]).await?;
                at_most = more;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv6Addr};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A v2 header built by hand from the specification (not with ppp, which parses it).
    fn v2(command: u8, family_protocol: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family_protocol);
        let len = u16::try_from(addresses.len() + tlvs.len()).expect("length");
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(addresses);
        h.extend_from_slice(tlvs);
        h
    }

    fn v2_ipv4(src: [u8; 4], port: u16, tlvs: &[u8]) -> Vec<u8> {
        let mut a = src.to_vec();
        a.extend_from_slice(&[10, 0, 0, 1]);
        a.extend_from_slice(&port.to_be_bytes());
        a.extend_from_slice(&995u16.to_be_bytes());
        v2(0x1, 0x11, &a, tlvs)
    }

    fn v2_ipv6(src: Ipv6Addr, port: u16) -> Vec<u8> {
        let mut a = src.octets().to_vec();
        a.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        a.extend_from_slice(&port.to_be_bytes());
        a.extend_from_slice(&110u16.to_be_bytes());
        v2(0x1, 0x21, &a, &[])
    }

    fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
        let mut t = vec![kind];
        t.extend_from_slice(&u16::try_from(value.len()).expect("tlv").to_be_bytes());
        t.extend_from_slice(value);
        t
    }

    fn addr(s: &str) -> Option<SocketAddr> {
        Some(s.parse().expect("socket address"))
    }

    /// Valid headers and the client each names.
    fn valid() -> Vec<(&'static str, Vec<u8>, Option<SocketAddr>)> {
        let aws_tlvs = [tlv(0xEA, b"\x01vpce-0123456789abcdef0"), tlv(0x04, b"")].concat();
        let mut unix = vec![0u8; V2_MAX_ADDRESSES];
        unix[..5].copy_from_slice(b"/sock");
        vec![
            (
                "v1 TCP4",
                b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 110\r\n".to_vec(),
                addr("203.0.113.7:51234"),
            ),
            (
                "v1 TCP6",
                b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 995\r\n".to_vec(),
                addr("[2001:db8::7]:4000"),
            ),
            (
                "v1 longest TCP6",
                b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n".to_vec(),
                Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from([0xffff; 8])), 65535)),
            ),
            ("v1 UNKNOWN", b"PROXY UNKNOWN\r\n".to_vec(), None),
            (
                "v1 UNKNOWN with addresses",
                b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
                None,
            ),
            (
                "v2 PROXY IPv4",
                v2_ipv4([203, 0, 113, 7], 51234, &[]),
                addr("203.0.113.7:51234"),
            ),
            (
                "v2 PROXY IPv6",
                v2_ipv6("2001:db8::7".parse().expect("v6"), 4000),
                addr("[2001:db8::7]:4000"),
            ),
            (
                "v2 PROXY IPv4 with TLVs",
                v2_ipv4([198, 51, 100, 9], 1, &aws_tlvs),
                addr("198.51.100.9:1"),
            ),
            (
                "v2 PROXY IPv4 with the most TLV bytes",
                v2_ipv4([198, 51, 100, 9], 2, &tlv(0x04, &[0; V2_MAX_TLV - 3])),
                addr("198.51.100.9:2"),
            ),
            ("v2 LOCAL", v2(0x0, 0x00, &[], &[]), None),
            (
                "v2 LOCAL with addresses",
                v2_ipv4([1, 2, 3, 4], 5, &[])
                    .iter()
                    .enumerate()
                    .map(|(i, &b)| if i == 12 { 0x20 } else { b })
                    .collect(),
                None,
            ),
            ("v2 PROXY UNSPEC", v2(0x1, 0x00, &[], &[]), None),
            ("v2 PROXY unix", v2(0x1, 0x31, &unix, &[]), None),
        ]
    }

    #[test]
    fn valid_headers_name_their_client() {
        for (name, header, client) in valid() {
            assert_eq!(
                decode(&header).expect(name),
                Decoded::Complete {
                    client,
                    len: header.len()
                },
                "{name}"
            );
        }
    }

    #[test]
    fn exactly_the_header_is_consumed() {
        let tls_hello = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01];
        for (name, header, client) in valid() {
            for rest in [
                &b"USER joe\r\n"[..],
                &tls_hello,
                b"\r\n\r\n\0\r\nQUIT\n",
                b"PROXY ",
            ] {
                let input = [&header[..], rest].concat();
                assert_eq!(
                    decode(&input).expect(name),
                    Decoded::Complete {
                        client,
                        len: header.len()
                    },
                    "{name} followed by {rest:?}"
                );
            }
        }
    }

    #[test]
    fn every_prefix_is_incomplete_and_bounds_the_rest() {
        // The header delivered a byte at a time: never an error, never complete early, and
        // the bound on what is left is never too small.
        for (name, header, _) in valid() {
            for cut in 0..header.len() {
                match decode(&header[..cut]) {
                    Ok(Decoded::Incomplete { at_most }) => assert!(
                        at_most >= header.len() - cut,
                        "{name} cut at {cut}: at_most {at_most}"
                    ),
                    other => panic!("{name} cut at {cut}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn bad_headers_are_refused() {
        let mut long_v1 = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2".to_vec();
        long_v1.resize(V1_MAX, b' ');
        let mut v1_no_crlf_within_limit = long_v1.clone();
        v1_no_crlf_within_limit.extend_from_slice(b"\r\n");
        let mut bad_version = v2_ipv4([1, 2, 3, 4], 5, &[]);
        bad_version[12] = 0x11;
        let mut bad_command = v2_ipv4([1, 2, 3, 4], 5, &[]);
        bad_command[12] = 0x22;
        let mut bad_family = v2_ipv4([1, 2, 3, 4], 5, &[]);
        bad_family[13] = 0x41;
        let mut short_for_family = v2(0x1, 0x21, &[0; 12], &[]);
        short_for_family.truncate(V2_FIXED + 12);
        let mut too_much_tlv = v2_ipv4([1, 2, 3, 4], 5, &[]);
        too_much_tlv[14..16].copy_from_slice(
            &u16::try_from(12 + V2_MAX_TLV + 1)
                .expect("len")
                .to_be_bytes(),
        );
        let mut largest_length = v2_ipv4([1, 2, 3, 4], 5, &[]);
        largest_length[14..16].copy_from_slice(&[0xff, 0xff]);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("a POP3 command", b"USER joe\r\n".to_vec()),
            ("a TLS ClientHello", vec![0x16, 0x03, 0x01, 0x00, 0xa5]),
            ("lower case", b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec()),
            ("PROXYZ", b"PROXYZ".to_vec()),
            (
                "v1 unknown protocol",
                b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
            ),
            ("v1 TCP4 with IPv6", b"PROXY TCP4 ::1 ::1 1 2\r\n".to_vec()),
            (
                "v1 TCP6 with IPv4",
                b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
            ),
            (
                "v1 bad address",
                b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n".to_vec(),
            ),
            (
                "v1 port too big",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n".to_vec(),
            ),
            (
                "v1 port with a leading zero",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n".to_vec(),
            ),
            (
                "v1 missing port",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n".to_vec(),
            ),
            (
                "v1 extra field",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n".to_vec(),
            ),
            (
                "v1 double space",
                b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
            ),
            ("v1 bare LF", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n".to_vec()),
            (
                "v1 CR inside",
                b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n".to_vec(),
            ),
            ("v1 no protocol", b"PROXY \r\n".to_vec()),
            (
                "v1 not UTF-8",
                b"PROXY TCP4 1.2.3.\xff 5.6.7.8 1 2\r\n".to_vec(),
            ),
            ("v1 without CRLF in 107 bytes", long_v1),
            ("v1 CRLF after 107 bytes", v1_no_crlf_within_limit),
            ("v2 bad signature", b"\r\n\r\n\0\r\nQUIT!".to_vec()),
            ("v2 version 1", bad_version),
            ("v2 command 2", bad_command),
            ("v2 family 4", bad_family),
            ("v2 length shorter than IPv6 addresses", short_for_family),
            ("v2 TLVs over the limit", too_much_tlv),
            ("v2 length 65535", largest_length),
            (
                "v2 TLV longer than the header",
                v2_ipv4([1, 2, 3, 4], 5, &[0x04, 0x00, 0x09, 1, 2]),
            ),
            ("v2 TLV cut short", v2_ipv4([1, 2, 3, 4], 5, &[0x04, 0x00])),
        ];
        for (name, input) in cases {
            assert!(decode(&input).is_err(), "{name}: {:?}", decode(&input));
        }
    }

    #[test]
    fn oversized_v2_is_refused_from_its_fixed_part() {
        // The TLV limit is applied before a single TLV byte is read.
        let mut h = v2_ipv4([1, 2, 3, 4], 5, &[]);
        h[14..16].copy_from_slice(&[0xff, 0xff]);
        assert!(matches!(
            decode(&h[..V2_FIXED]),
            Err(HeaderError::V2TooLarge(n)) if n == 0xffff - 12
        ));
    }

    #[test]
    fn garbage_is_refused_at_its_first_wrong_byte() {
        assert!(matches!(decode(b"G"), Err(HeaderError::NotProxy)));
        assert!(matches!(decode(b"PROXZ"), Err(HeaderError::NotProxy)));
        assert!(matches!(decode(b"\r\n\r\nX"), Err(HeaderError::NotProxy)));
        assert!(matches!(
            decode(b"\x16\x03\x01"),
            Err(HeaderError::NotProxy)
        ));
    }

    #[test]
    fn random_bytes_decide_once_and_never_overreach() {
        // Cheap fuzzing (fuzz/fuzz_targets/proxy_header.rs does it properly): every prefix
        // of pseudo-random input, with and without a v1 or v2 start. An incomplete header
        // never grows past MAX_HEADER; a complete one claims only bytes it was given; once
        // complete or refused, more bytes never change the answer.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for round in 0..3000 {
            let mut input = match round % 3 {
                0 => V2_SIGNATURE.to_vec(),
                1 => b"PROXY ".to_vec(),
                _ => Vec::new(),
            };
            if round % 5 == 0 {
                input.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c]);
            }
            for _ in 0..(round % 131) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                input.push(x as u8);
            }
            let mut decided: Option<Option<Decoded>> = None;
            for cut in 0..=input.len() {
                let got = decode(&input[..cut]).ok();
                match (decided, got) {
                    (Some(first), _) => assert_eq!(got, first, "{input:?} at {cut}"),
                    (None, Some(Decoded::Incomplete { at_most })) => {
                        assert!(at_most >= 1 && cut + at_most <= MAX_HEADER)
                    }
                    (None, Some(Decoded::Complete { len, .. })) => {
                        assert!(len > 0 && len <= cut);
                        decided = Some(got);
                    }
                    (None, None) => decided = Some(None),
                }
            }
        }
    }

    /// A connected pair over loopback: (client side, server side).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        client.set_nodelay(true).expect("nodelay");
        (client, server)
    }

    const AFTER: &[u8] = b"\x16\x03\x01 the session's own bytes";

    async fn rest_of(server: &mut TcpStream) -> Vec<u8> {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), server.read_to_end(&mut rest))
            .await
            .expect("read rest")
            .expect("read rest");
        rest
    }

    #[tokio::test]
    async fn read_header_leaves_what_follows_in_the_socket() {
        for (name, header, client) in valid() {
            let (mut c, mut s) = pair().await;
            c.write_all(&[&header[..], AFTER].concat())
                .await
                .expect("write");
            c.shutdown().await.expect("shutdown");
            let got = read_header(&mut s, Duration::from_secs(5)).await;
            assert_eq!(got.expect(name), client, "{name}");
            assert_eq!(rest_of(&mut s).await, AFTER, "{name}");
        }
    }

    #[tokio::test]
    async fn read_header_byte_at_a_time() {
        for (name, header, client) in valid()
            .into_iter()
            .filter(|(n, ..)| n.contains("TCP6") || n.contains("TLVs"))
        {
            let (mut c, mut s) = pair().await;
            let bytes = header.clone();
            let writer = tokio::spawn(async move {
                for b in bytes.iter().chain(AFTER) {
                    c.write_all(&[*b]).await.expect("write");
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
                c.shutdown().await.expect("shutdown");
            });
            let got = read_header(&mut s, Duration::from_secs(10)).await;
            assert_eq!(got.expect(name), client, "{name}");
            assert_eq!(rest_of(&mut s).await, AFTER, "{name}");
            writer.await.expect("writer");
        }
    }

    #[tokio::test]
    async fn read_header_errors() {
        // Garbage: refused without waiting for more.
        let (mut c, mut s) = pair().await;
        c.write_all(b"USER joe\r\n").await.expect("write");
        let got = read_header(&mut s, Duration::from_secs(5)).await;
        assert!(
            matches!(got, Err(ProxyError::Header(HeaderError::NotProxy))),
            "{got:?}"
        );

        // Half a header, then silence: the timeout.
        let (mut c, mut s) = pair().await;
        c.write_all(b"PROXY TCP4 1.2.3.4").await.expect("write");
        let started = std::time::Instant::now();
        let got = read_header(&mut s, Duration::from_millis(300)).await;
        assert!(matches!(got, Err(ProxyError::Timeout(_))), "{got:?}");
        assert!(started.elapsed() < Duration::from_secs(3));

        // Nothing at all, then silence.
        let (_c, mut s) = pair().await;
        let got = read_header(&mut s, Duration::from_millis(200)).await;
        assert!(matches!(got, Err(ProxyError::Timeout(_))), "{got:?}");

        // Half a v2 header, then the peer closes.
        let (mut c, mut s) = pair().await;
        let h = v2_ipv4([1, 2, 3, 4], 5, &[]);
        c.write_all(&h[..20]).await.expect("write");
        c.shutdown().await.expect("shutdown");
        let got = read_header(&mut s, Duration::from_secs(5)).await;
        assert!(matches!(got, Err(ProxyError::Closed(20))), "{got:?}");

        // A v1 line that never ends: refused at 107 bytes, not read further.
        let (mut c, mut s) = pair().await;
        c.write_all(&[b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat())
            .await
            .expect("write");
        let got = read_header(&mut s, Duration::from_secs(5)).await;
        assert!(
            matches!(got, Err(ProxyError::Header(HeaderError::V1TooLong))),
            "{got:?}"
        );
    }

    #[test]
    fn the_longest_v1_header_fits() {
        // The specification's worst case: UNKNOWN with two full IPv6 addresses.
        let longest = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(longest.len(), V1_MAX);
        assert_eq!(
            decode(longest).expect("longest"),
            Decoded::Complete {
                client: None,
                len: V1_MAX
            }
        );
    }
}
