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
mod tests;
