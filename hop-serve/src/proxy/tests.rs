//! Unit tests of the PROXY protocol header parser.

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
