//! The HTTP/2 client connection preface, and what a connection's first bytes say about the
//! protocol it speaks ([`sniff`]): HTTP/2 with prior knowledge, or HTTP/1.x. Both backends peek
//! them before they pick hyper's connection.

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub(crate) const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a connection speaks, as its first bytes tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proto {
    Http1,
    Http2,
}

/// What the first bytes of a connection say: `Http2` on the whole preface, `Http1` at the
/// first byte that differs from it, `None` while they are a strict prefix of it (a short read
/// never decides).
pub(crate) fn sniff(first: &[u8]) -> Option<Proto> {
    let n = first.len().min(PREFACE.len());
    if first[..n] != PREFACE[..n] {
        Some(Proto::Http1)
    } else if n == PREFACE.len() {
        Some(Proto::Http2)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniff_decides_on_the_whole_preface_or_the_first_difference() {
        assert_eq!(sniff(b""), None);
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(sniff(PREFACE), Some(Proto::Http2));
        let mut more = PREFACE.to_vec();
        more.extend_from_slice(&[0, 0, 0, 4]);
        assert_eq!(sniff(&more), Some(Proto::Http2));
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Some(Proto::Http1));
        assert_eq!(sniff(b"P"), None);
        assert_eq!(sniff(b"POST"), Some(Proto::Http1));
        assert_eq!(sniff(b"PRI * HTTP/1.1"), Some(Proto::Http1));
    }
}
