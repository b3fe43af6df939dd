//! The PROXY protocol (HAProxy's, versions 1 and 2), turned on with
//! [`Builder::proxy_protocol`](crate::Builder::proxy_protocol): this module owns the header's
//! strict parser (`parse`, bounded: at most `MAX_HEADER` bytes are ever looked at), the
//! request extension a handler reads it from ([`ProxyHeader`], with its TLVs), and why a header
//! was refused (counted and logged here for both backends). Reading the header off a
//! socket is each backend's own business (`conn::proxy` on the reactor, `baseline` on tokio):
//! both peek, parse, then take exactly the header's bytes, so what follows it reaches TLS or
//! HTTP untouched.
//!
//! ```
//! use axum::{routing::get, Extension, Router};
//! use axum::extract::ConnectInfo;
//! use std::net::SocketAddr;
//!
//! async fn ip(ConnectInfo(addr): ConnectInfo<SocketAddr>) -> String {
//!     addr.to_string() // the client's address as the proxy saw it
//! }
//!
//! async fn via(Extension(h): Extension<hop::proxy::ProxyHeader>) -> String {
//!     format!("{:?} {:?}", h.destination(), h.authority())
//! }
//!
//! # #[tokio::main]
//! # async fn main() -> std::io::Result<()> {
//! let app = Router::new().route("/ip", get(ip)).route("/via", get(via));
//! let listener = std::net::TcpListener::bind("127.0.0.1:0")?; // any free port
//! # // The test: two requests, each after the PROXY v1 header a proxy sends first.
//! # let addr = listener.local_addr()?;
//! # let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! # let client = std::thread::spawn(move || {
//! #     let _stop = stop; // the server stops when this thread ends, a panic included
//! #     let get = |path: &str| {
//! #         use std::io::{Read, Write};
//! #         let mut s = std::net::TcpStream::connect(addr).unwrap();
//! #         s.write_all(b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\n").unwrap();
//! #         write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
//! #         let mut answer = String::new();
//! #         s.read_to_string(&mut answer).unwrap();
//! #         answer
//! #     };
//! #     (get("/ip"), get("/via"))
//! # });
//! hop::Server::builder()
//!     .proxy_protocol(true)
//!     .serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
//! #   .with_graceful_shutdown(async { let _ = stopped.await; })
//!     .await
//! # ?;
//! # let (ip, via) = client.join().unwrap();
//! # assert!(ip.starts_with("HTTP/1.1 200") && ip.ends_with("\r\n203.0.113.7:56324"), "{ip}");
//! # assert!(via.ends_with("\r\nSome(192.0.2.1:443) None"), "{via}");
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::Arc;

/// The longest v1 header, `CRLF` included (the spec's figure).
pub(crate) const V1_MAX: usize = 107;

/// The v2 header's fixed part: the signature, version and command, family and length.
const V2_FIXED: usize = 16;

/// The v2 signature.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Most bytes of a v2 header after its fixed part (addresses and TLVs) that hop accepts.
///
/// The spec lets the length field say up to 65,535; a receiver may refuse what it will not
/// hold. 4 KiB is over ten times what senders put there in practice (216 bytes for the largest
/// address block, AF_UNIX; HAProxy's TLVs: ALPN, authority, a unique id of at most 128 bytes, the
/// TLS sub-TLVs; a cloud load balancer's endpoint id), and it bounds what one connection makes
/// a poller copy while it waits for the header: a peer cannot make hop look at more.
pub const MAX_V2_BODY: usize = 4096;

/// The most bytes any header can take ([`MAX_V2_BODY`] past the fixed part).
pub(crate) const MAX_HEADER: usize = V2_FIXED + MAX_V2_BODY;

/// TLV type: the application protocol the client negotiated (ALPN), e.g. `h2`.
pub const TLV_ALPN: u8 = 0x01;
/// TLV type: the host name the client asked for (TLS SNI, or HTTP's authority), UTF-8.
pub const TLV_AUTHORITY: u8 = 0x02;
/// TLV type: a CRC32c of the whole header (hop checks it, and refuses a header it does not
/// match).
pub const TLV_CRC32C: u8 = 0x03;
/// TLV type: padding, to be ignored.
pub const TLV_NOOP: u8 = 0x04;
/// TLV type: an opaque id the proxy gave the connection (HAProxy's `unique-id`), at most 128
/// bytes.
pub const TLV_UNIQUE_ID: u8 = 0x05;
/// TLV type: the client's TLS session (`PP2_TYPE_SSL`; its value holds sub-TLVs).
pub const TLV_SSL: u8 = 0x20;
/// TLV type: the network namespace the connection was accepted in.
pub const TLV_NETNS: u8 = 0x30;

/// The PROXY protocol version a header came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Version {
    /// The text header, `PROXY TCP4 ...\r\n`.
    V1,
    /// The binary header.
    V2,
}

/// A connection's PROXY protocol header, in every request's extensions when
/// [`Builder::proxy_protocol`](crate::Builder::proxy_protocol) is on (axum:
/// `Extension<hop::proxy::ProxyHeader>`; cloning is cheap).
///
/// Its [`source`](Self::source) is what `ConnectInfo<SocketAddr>` (and
/// [`IncomingStream::remote_addr`](crate::IncomingStream::remote_addr)) report. A header that
/// carries no address (v2 `LOCAL`, a proxy's health check; v1 `UNKNOWN`; v2 `AF_UNSPEC` or
/// `AF_UNIX`) leaves them the socket's own peer, and `source` is `None`.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyHeader(Arc<Header>);

#[derive(PartialEq, Eq)]
struct Header {
    version: Version,
    local: bool,
    source: Option<SocketAddr>,
    destination: Option<SocketAddr>,
    /// The v2 TLVs, as sent (checked to be whole TLVs).
    tlvs: Box<[u8]>,
}

impl ProxyHeader {
    /// The protocol version of the header.
    pub fn version(&self) -> Version {
        self.0.version
    }

    /// A v2 `LOCAL` header: the proxy opened the connection on its own behalf (a health check);
    /// it carries no client address.
    pub fn is_local(&self) -> bool {
        self.0.local
    }

    /// The client's address, as the proxy saw it: `None` if the header carries none.
    pub fn source(&self) -> Option<SocketAddr> {
        self.0.source
    }

    /// The address the client connected to (the proxy's side): `None` if the header carries
    /// none.
    pub fn destination(&self) -> Option<SocketAddr> {
        self.0.destination
    }

    /// The v2 TLVs as they were sent (empty for v1): type, 2-byte big-endian length, value,
    /// one after the other.
    pub fn raw_tlvs(&self) -> &[u8] {
        &self.0.tlvs
    }

    /// The v2 TLVs, in the order they were sent.
    pub fn tlvs(&self) -> Tlvs<'_> {
        Tlvs(&self.0.tlvs)
    }

    /// The value of the first TLV of type `kind`.
    pub fn tlv(&self, kind: u8) -> Option<&[u8]> {
        self.tlvs().find(|t| t.kind == kind).map(|t| t.value)
    }

    /// The ALPN protocol the client negotiated with the proxy ([`TLV_ALPN`]).
    pub fn alpn(&self) -> Option<&[u8]> {
        self.tlv(TLV_ALPN)
    }

    /// The host name the client asked the proxy for ([`TLV_AUTHORITY`]), if it is UTF-8.
    pub fn authority(&self) -> Option<&str> {
        self.tlv(TLV_AUTHORITY)
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The proxy's id for the connection ([`TLV_UNIQUE_ID`]).
    pub fn unique_id(&self) -> Option<&[u8]> {
        self.tlv(TLV_UNIQUE_ID)
    }
}

impl fmt::Debug for ProxyHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyHeader")
            .field("version", &self.0.version)
            .field("local", &self.0.local)
            .field("source", &self.0.source)
            .field("destination", &self.0.destination)
            .field("tlvs", &self.tlvs().count())
            .finish()
    }
}

/// One v2 TLV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tlv<'a> {
    /// Its type (`TLV_*`, or a proxy's own).
    pub kind: u8,
    /// Its value.
    pub value: &'a [u8],
}

/// The TLVs of a [`ProxyHeader`] ([`ProxyHeader::tlvs`]).
#[derive(Debug, Clone)]
pub struct Tlvs<'a>(&'a [u8]);

impl<'a> Iterator for Tlvs<'a> {
    type Item = Tlv<'a>;

    fn next(&mut self) -> Option<Tlv<'a>> {
        // Whole TLVs only: checked when the header was parsed.
        let (kind, value, rest) = split_tlv(self.0)?;
        self.0 = rest;
        Some(Tlv { kind, value })
    }
}

/// The first TLV of `buf` and what follows it; `None` if `buf` does not start with a whole one.
fn split_tlv(buf: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let [kind, hi, lo, rest @ ..] = buf else {
        return None;
    };
    let len = usize::from(u16::from_be_bytes([*hi, *lo]));
    (len <= rest.len()).then(|| (*kind, &rest[..len], &rest[len..]))
}

/// What [`parse`] made of the bytes it was shown.
#[derive(Debug)]
pub(crate) enum Parsed {
    /// A whole header, and how many bytes it took.
    Header(ProxyHeader, usize),
    /// Not all there yet: show at most this many bytes next time (always more than were shown,
    /// never more than [`MAX_HEADER`]).
    Need(usize),
}

/// Why a header was refused (for the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Invalid(pub(crate) &'static str);

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// Parses the header at the start of `buf`, strictly: anything the spec does not allow is
/// [`Invalid`], including bytes that cannot start a header (the spec forbids guessing that a
/// connection without one is a direct client).
pub(crate) fn parse(buf: &[u8]) -> Result<Parsed, Invalid> {
    match buf.first() {
        None => Ok(Parsed::Need(V1_MAX)),
        Some(b'P') => parse_v1(buf),
        Some(b'\r') => parse_v2(buf),
        Some(_) => Err(Invalid("no PROXY protocol header")),
    }
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, Invalid> {
    const PREFIX: &[u8] = b"PROXY ";
    let n = buf.len().min(PREFIX.len());
    if buf[..n] != PREFIX[..n] {
        return Err(Invalid("no PROXY protocol header"));
    }
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        if window.len() >= V1_MAX {
            return Err(Invalid("v1 header longer than 107 bytes"));
        }
        if let Some(bad) = window.iter().position(|&b| !(b' '..=b'~').contains(&b)) {
            // Only a CR may come before the LF, as its last byte.
            if !(window[bad] == b'\r' && bad + 1 == window.len()) {
                return Err(Invalid("v1 header with a byte outside printable ASCII"));
            }
        }
        return Ok(Parsed::Need(V1_MAX));
    };
    if lf == 0 || window[lf - 1] != b'\r' {
        return Err(Invalid("v1 header not ended by CRLF"));
    }
    let line = &window[PREFIX.len().min(lf - 1)..lf - 1];
    if line.iter().any(|&b| !(b' '..=b'~').contains(&b)) {
        return Err(Invalid("v1 header with a byte outside printable ASCII"));
    }
    // Printable ASCII, so UTF-8.
    let line = std::str::from_utf8(line).map_err(|_| Invalid("v1 header not ASCII"))?;
    let mut fields = line.split(' ');
    let proto = fields.next().unwrap_or("");
    let (source, destination) = match proto {
        // The spec: the receiver ignores whatever follows UNKNOWN up to the CRLF.
        "UNKNOWN" => (None, None),
        "TCP4" | "TCP6" => {
            let f: Vec<&str> = fields.collect();
            let [src, dst, sport, dport] = f[..] else {
                return Err(Invalid("v1 header without exactly four address fields"));
            };
            let ip = |s: &str| -> Result<IpAddr, Invalid> {
                let ip = if proto == "TCP4" {
                    s.parse::<Ipv4Addr>().map(IpAddr::V4)
                } else {
                    s.parse::<Ipv6Addr>().map(IpAddr::V6)
                };
                ip.map_err(|_| Invalid("v1 header with a bad address"))
            };
            let (src, dst) = (ip(src)?, ip(dst)?);
            let (sport, dport) = (port(sport)?, port(dport)?);
            (
                Some(SocketAddr::new(src, sport)),
                Some(SocketAddr::new(dst, dport)),
            )
        }
        _ => return Err(Invalid("v1 header with an unknown protocol")),
    };
    let header = Header {
        version: Version::V1,
        local: false,
        source,
        destination,
        tlvs: Box::default(),
    };
    Ok(Parsed::Header(ProxyHeader(Arc::new(header)), lf + 1))
}

/// A v1 port: 0 to 65535 in decimal, without a sign or a leading zero.
fn port(s: &str) -> Result<u16, Invalid> {
    let bad = Invalid("v1 header with a bad port");
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad);
    }
    if s.len() > 1 && s.starts_with('0') {
        return Err(bad);
    }
    s.parse().map_err(|_| bad)
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, Invalid> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] != V2_SIGNATURE[..n] {
        return Err(Invalid("no PROXY protocol header"));
    }
    if buf.len() < V2_FIXED {
        return Ok(Parsed::Need(V2_FIXED));
    }
    let (ver_cmd, fam) = (buf[12], buf[13]);
    if ver_cmd >> 4 != 2 {
        return Err(Invalid("v2 header with a version other than 2"));
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(Invalid("v2 header with an unknown command")),
    };
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > MAX_V2_BODY {
        return Err(Invalid("v2 header longer than hop accepts"));
    }
    let total = V2_FIXED + len;
    if buf.len() < total {
        return Ok(Parsed::Need(total));
    }
    let body = &buf[V2_FIXED..total];
    let mut header = Header {
        version: Version::V2,
        local,
        source: None,
        destination: None,
        tlvs: Box::default(),
    };
    if local {
        // The spec: the receiver uses the real endpoints and skips the rest of the block,
        // the family included.
        return Ok(Parsed::Header(ProxyHeader(Arc::new(header)), total));
    }
    let transport = fam & 0x0f;
    if transport > 2 {
        return Err(Invalid("v2 header with an unknown transport"));
    }
    let addr_len = match fam >> 4 {
        // AF_UNSPEC: the real endpoints are used, the block is skipped.
        0 => return Ok(Parsed::Header(ProxyHeader(Arc::new(header)), total)),
        1 => 12,
        2 => 36,
        3 => 216,
        _ => return Err(Invalid("v2 header with an unknown address family")),
    };
    if transport != 1 {
        return Err(Invalid("v2 header for a transport other than a stream"));
    }
    if body.len() < addr_len {
        return Err(Invalid("v2 header shorter than its addresses"));
    }
    let (addrs, tlvs) = body.split_at(addr_len);
    match fam >> 4 {
        1 => {
            let ip = |i: usize| Ipv4Addr::new(addrs[i], addrs[i + 1], addrs[i + 2], addrs[i + 3]);
            let port = |i: usize| u16::from_be_bytes([addrs[i], addrs[i + 1]]);
            header.source = Some(SocketAddrV4::new(ip(0), port(8)).into());
            header.destination = Some(SocketAddrV4::new(ip(4), port(10)).into());
        }
        2 => {
            let ip = |i: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&addrs[i..i + 16]);
                Ipv6Addr::from(b)
            };
            let port = |i: usize| u16::from_be_bytes([addrs[i], addrs[i + 1]]);
            header.source = Some(SocketAddrV6::new(ip(0), port(32), 0, 0).into());
            header.destination = Some(SocketAddrV6::new(ip(16), port(34), 0, 0).into());
        }
        // AF_UNIX: paths, which a `SocketAddr` cannot hold; the real endpoints are used.
        _ => {}
    }
    check_tlvs(&buf[..total], V2_FIXED + addr_len)?;
    header.tlvs = tlvs.into();
    Ok(Parsed::Header(ProxyHeader(Arc::new(header)), total))
}

/// Checks that `header[from..]` is whole TLVs, and the header's CRC32c if one carries it.
fn check_tlvs(header: &[u8], from: usize) -> Result<(), Invalid> {
    let mut at = from;
    while at < header.len() {
        let Some((kind, value, _)) = split_tlv(&header[at..]) else {
            return Err(Invalid("v2 header with a truncated TLV"));
        };
        let value_at = at + 3;
        if kind == TLV_CRC32C {
            let [a, b, c, d] = value else {
                return Err(Invalid("v2 header with a CRC32c TLV not 4 bytes long"));
            };
            let sent = u32::from_be_bytes([*a, *b, *c, *d]);
            // Over the whole header, the checksum's own value taken as zeros.
            let mut crc = Crc32c::new();
            crc.update(&header[..value_at]);
            crc.update(&[0; 4]);
            crc.update(&header[value_at + 4..]);
            if crc.finish() != sent {
                return Err(Invalid("v2 header whose CRC32c does not match"));
            }
        }
        at = value_at + value.len();
    }
    Ok(())
}

/// CRC-32C (Castagnoli, reflected), bit by bit: headers are small and checked once.
struct Crc32c(u32);

impl Crc32c {
    fn new() -> Self {
        Crc32c(!0)
    }

    fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 ^= u32::from(b);
            for _ in 0..8 {
                let mask = (self.0 & 1).wrapping_neg();
                self.0 = (self.0 >> 1) ^ (0x82F6_3B78 & mask);
            }
        }
    }

    fn finish(&self) -> u32 {
        !self.0
    }
}

/// Counts and logs a header that was refused (malformed, missing, cut short or too slow);
/// `peer` is the socket's own (the only one known then).
pub(crate) fn refused(ctl: &crate::settings::Control, peer: &dyn fmt::Debug, why: &Failure) {
    ctl.proxy_header_failures
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    crate::logs::warn_limited!(
        peer = ?peer,
        "PROXY protocol header refused: {}; closing",
        crate::logs::Clip(why)
    );
}

/// Why a connection's header was not read.
#[derive(Debug)]
pub(crate) enum Failure {
    Invalid(Invalid),
    /// The peer closed before a whole header.
    Closed,
    /// Not whole within the time limit.
    TimedOut,
    Io(std::io::Error),
}

impl From<Invalid> for Failure {
    fn from(e: Invalid) -> Self {
        Failure::Invalid(e)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Invalid(e) => e.fmt(f),
            Failure::Closed => f.write_str("the peer closed before a whole header"),
            Failure::TimedOut => f.write_str("none within header_read_timeout"),
            Failure::Io(e) => write!(f, "reading failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(buf: &[u8]) -> (ProxyHeader, usize) {
        match parse(buf) {
            Ok(Parsed::Header(h, n)) => (h, n),
            other => panic!("{other:?} for {buf:?}"),
        }
    }

    fn invalid(buf: &[u8]) -> Invalid {
        match parse(buf) {
            Err(e) => e,
            other => panic!("{other:?} for {buf:?}"),
        }
    }

    fn need(buf: &[u8]) -> usize {
        match parse(buf) {
            Ok(Parsed::Need(n)) => {
                assert!(n > buf.len() && n <= MAX_HEADER, "{n} for {}", buf.len());
                n
            }
            other => panic!("{other:?} for {buf:?}"),
        }
    }

    /// A v2 header: `ver_cmd`, `fam`, the body after the fixed part.
    fn v2(ver_cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(ver_cmd);
        h.push(fam);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    fn inet4_body() -> Vec<u8> {
        let mut b = vec![192, 0, 2, 7, 10, 0, 0, 1];
        b.extend_from_slice(&51234u16.to_be_bytes());
        b.extend_from_slice(&443u16.to_be_bytes());
        b
    }

    #[test]
    fn v1_tcp4_and_tcp6_and_what_follows_is_left() {
        let buf = b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 443\r\nGET / HTTP/1.1\r\n";
        let (h, n) = header(buf);
        assert_eq!(&buf[n..], b"GET / HTTP/1.1\r\n");
        assert_eq!(h.version(), Version::V1);
        assert_eq!(h.source(), Some("192.0.2.7:51234".parse().unwrap()));
        assert_eq!(h.destination(), Some("10.0.0.1:443".parse().unwrap()));
        assert!(!h.is_local());
        assert_eq!(h.tlvs().count(), 0);

        let buf = b"PROXY TCP6 2001:db8::1 ::1 65535 0\r\n";
        let (h, n) = header(buf);
        assert_eq!(n, buf.len());
        assert_eq!(h.source(), Some("[2001:db8::1]:65535".parse().unwrap()));
        assert_eq!(h.destination(), Some("[::1]:0".parse().unwrap()));
    }

    #[test]
    fn v1_unknown_keeps_no_address() {
        for buf in [
            &b"PROXY UNKNOWN\r\n"[..],
            b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
        ] {
            let (h, n) = header(buf);
            assert_eq!(n, buf.len());
            assert_eq!(h.source(), None);
            assert_eq!(h.destination(), None);
        }
    }

    #[test]
    fn v1_longest_header_fits_and_one_more_byte_does_not() {
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(V1_MAX - 2, b'x');
        line.extend_from_slice(b"\r\n");
        assert_eq!(header(&line).1, V1_MAX);
        let mut long = line[..V1_MAX - 2].to_vec();
        long.extend_from_slice(b"x\r\n");
        assert_eq!(invalid(&long).0, "v1 header longer than 107 bytes");
    }

    #[test]
    fn v1_partial_waits_for_more() {
        let full = b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 443\r\n";
        for i in 0..full.len() {
            assert_eq!(need(&full[..i]), V1_MAX, "after {i} bytes");
        }
    }

    #[test]
    fn v1_malformed_is_refused() {
        for buf in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"PROXX",
            b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\r\r\n",
            b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n",
            b"PROXY TCP4  1.2.3.4 1.2.3.4 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 \r\n",
            b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.256 1.2.3.4 1 2\r\n",
            b"PROXY TCP4 01.2.3.4 1.2.3.4 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 +1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 -1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\x00\r\n",
            b"PROXY TCP4 1.2.3\x00",
            b"PROXY \r\n",
            b"PROXY\r\n",
        ] {
            invalid(buf);
        }
    }

    #[test]
    fn v2_inet4_inet6_with_tlvs() {
        let mut body = inet4_body();
        body.extend_from_slice(&[TLV_ALPN, 0, 2, b'h', b'2']);
        body.extend_from_slice(&[TLV_AUTHORITY, 0, 11]);
        body.extend_from_slice(b"example.com");
        body.extend_from_slice(&[0xe0, 0, 0]);
        let mut buf = v2(0x21, 0x11, &body);
        let len = buf.len();
        buf.extend_from_slice(b"PRI * HTTP/2.0");
        let (h, n) = header(&buf);
        assert_eq!(n, len);
        assert_eq!(h.version(), Version::V2);
        assert_eq!(h.source(), Some("192.0.2.7:51234".parse().unwrap()));
        assert_eq!(h.destination(), Some("10.0.0.1:443".parse().unwrap()));
        assert_eq!(h.alpn(), Some(&b"h2"[..]));
        assert_eq!(h.authority(), Some("example.com"));
        assert_eq!(h.unique_id(), None);
        let kinds: Vec<u8> = h.tlvs().map(|t| t.kind).collect();
        assert_eq!(kinds, [TLV_ALPN, TLV_AUTHORITY, 0xe0]);
        assert_eq!(h.tlv(0xe0), Some(&[][..]));
        assert_eq!(h.raw_tlvs(), &body[12..]);

        let mut body = Vec::new();
        body.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        body.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        body.extend_from_slice(&[0, 80, 1, 187]);
        let (h, _) = header(&v2(0x21, 0x21, &body));
        assert_eq!(h.source(), Some("[2001:db8::7]:80".parse().unwrap()));
        assert_eq!(h.destination(), Some("[::1]:443".parse().unwrap()));
    }

    #[test]
    fn v2_local_unspec_and_unix_keep_the_real_address() {
        // LOCAL: the block is skipped, whatever it holds.
        let (h, n) = header(&v2(0x20, 0x11, &[1, 2, 3]));
        assert_eq!(n, 19);
        assert!(h.is_local());
        assert_eq!(h.source(), None);
        let (h, _) = header(&v2(0x20, 0x00, &[]));
        assert!(h.is_local());
        // AF_UNSPEC with PROXY.
        let (h, _) = header(&v2(0x21, 0x00, &[9; 7]));
        assert!(!h.is_local());
        assert_eq!(h.source(), None);
        // AF_UNIX: two 108-byte paths.
        let (h, _) = header(&v2(0x21, 0x31, &[0; 216]));
        assert_eq!(h.source(), None);
    }

    #[test]
    fn v2_partial_waits_for_more() {
        let mut body = inet4_body();
        body.extend_from_slice(&[TLV_NOOP, 0, 3, 0, 0, 0]);
        let full = v2(0x21, 0x11, &body);
        for i in 0..full.len() {
            let n = need(&full[..i]);
            assert!(n <= full.len().max(V1_MAX), "after {i}: {n}");
        }
        assert_eq!(need(&full[..16]), full.len());
    }

    #[test]
    fn v2_malformed_is_refused() {
        let body = inet4_body();
        for buf in [
            // Signature, version, command, family, transport.
            v2(0x21, 0x11, &body)
                .iter()
                .enumerate()
                .map(|(i, &b)| if i == 5 { b'x' } else { b })
                .collect(),
            v2(0x11, 0x11, &body),
            v2(0x31, 0x11, &body),
            v2(0x22, 0x11, &body),
            v2(0x2f, 0x11, &body),
            v2(0x21, 0x41, &body),
            v2(0x21, 0x13, &body),
            v2(0x21, 0x12, &body),
            v2(0x21, 0x10, &body),
            // Too short for its addresses.
            v2(0x21, 0x11, &body[..11]),
            v2(0x21, 0x21, &body),
            // A truncated TLV.
            v2(0x21, 0x11, &[&body[..], &[1, 0, 5, b'h']].concat()),
            v2(0x21, 0x11, &[&body[..], &[1, 0]].concat()),
        ] {
            invalid(&buf);
        }
        // A length over the cap, refused from the fixed part alone.
        let mut big = v2(0x21, 0x11, &[]);
        big[14..16].copy_from_slice(&((MAX_V2_BODY + 1) as u16).to_be_bytes());
        assert_eq!(invalid(&big).0, "v2 header longer than hop accepts");
        let mut most = v2(0x21, 0x11, &body);
        most[14..16].copy_from_slice(&(MAX_V2_BODY as u16).to_be_bytes());
        assert_eq!(need(&most), MAX_HEADER);
        let mut full = most.clone();
        full.extend_from_slice(&[TLV_NOOP, 0x0f, 0xf1]);
        full.resize(MAX_HEADER, 0);
        assert_eq!(header(&full).1, MAX_HEADER);
    }

    #[test]
    fn crc32c_is_checked() {
        let mut c = Crc32c::new();
        c.update(b"123456789");
        assert_eq!(c.finish(), 0xE306_9283);

        let mut body = inet4_body();
        body.extend_from_slice(&[TLV_CRC32C, 0, 4, 0, 0, 0, 0]);
        let mut buf = v2(0x21, 0x11, &body);
        let mut c = Crc32c::new();
        c.update(&buf);
        let at = buf.len() - 4;
        buf[at..].copy_from_slice(&c.finish().to_be_bytes());
        header(&buf);
        buf[at] ^= 1;
        assert_eq!(invalid(&buf).0, "v2 header whose CRC32c does not match");
    }

    #[test]
    fn any_bytes_parse_without_panic_and_within_bounds() {
        // A small deterministic fuzz: prefixes of valid headers with bytes flipped.
        let mut seeds = vec![
            b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 443\r\n".to_vec(),
            b"PROXY TCP6 2001:db8::1 ::1 65535 0\r\n".to_vec(),
        ];
        let mut body = inet4_body();
        body.extend_from_slice(&[TLV_ALPN, 0, 2, b'h', b'2', TLV_CRC32C, 0, 4, 1, 2, 3, 4]);
        seeds.push(v2(0x21, 0x11, &body));
        let mut x: u32 = 0x1234_5678;
        for seed in &seeds {
            for _ in 0..2000 {
                let mut b = seed.clone();
                for _ in 0..3 {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    let i = x as usize % b.len();
                    b[i] = (x >> 8) as u8;
                }
                let cut = (x >> 16) as usize % (b.len() + 1);
                match parse(&b[..cut]) {
                    Ok(Parsed::Header(_, n)) => assert!(n <= cut),
                    Ok(Parsed::Need(n)) => assert!(n > cut && n <= MAX_HEADER),
                    Err(_) => {}
                }
            }
        }
    }
}
