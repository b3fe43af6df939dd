//! What the request-body timeouts of both backends read off the HTTP/1.1 wire: the `408` sent
//! for a stalled body ([`TIMEOUT_408`]), a lower bound on a request head's size
//! ([`head_at_least`]), and the last bytes read ([`read_tail`]), which tell a chunked body's end
//! ([`ends_chunked`]).

use http::Request;

/// What a stalled request body is answered with on HTTP/1.1, before the response has started.
pub(crate) const TIMEOUT_408: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// A lower bound on the size of `req`'s head as it came on the wire: the request line and each
/// header line with the least whitespace the syntax allows.
pub(crate) fn head_at_least<B>(req: &Request<B>) -> u64 {
    let line = req.method().as_str().len()
        + req.uri().path_and_query().map_or(1, |p| p.as_str().len())
        + " HTTP/1.1\r\n ".len();
    let headers: usize = req
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + ":\r\n".len())
        .sum();
    (line + headers + 2) as u64
}

/// The last 8 bytes a connection has read, packed into a `u64` (the newest in the low byte),
/// after `read`: so that a chunked body's end is seen even when it comes split over reads.
pub(crate) fn read_tail(tail: u64, read: &[u8]) -> u64 {
    match read.last_chunk::<8>() {
        // The common case, one load: the newest byte last is the low byte, big-endian.
        Some(last) => u64::from_be_bytes(*last),
        None => read.iter().fold(tail, |t, &b| (t << 8) | u64::from(b)),
    }
}

/// Whether the bytes read so far (their [`read_tail`]) end a chunked body: its last chunk
/// (`0`, CRLF, CRLF) right after a CRLF, with no trailers.
pub(crate) fn ends_chunked(tail: u64) -> bool {
    const END: u64 = u64::from_be_bytes(*b"\0\r\n0\r\n\r\n");
    tail & 0x00ff_ffff_ffff_ffff == END
}

#[cfg(test)]
mod tests {
    use super::{ends_chunked, read_tail};

    fn tail_of(reads: &[&[u8]]) -> u64 {
        reads.iter().fold(0, |t, r| read_tail(t, r))
    }

    #[test]
    fn a_chunked_end_is_seen_whole_or_split_over_reads() {
        let head: &[u8] = b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n";
        assert!(ends_chunked(tail_of(&[head, b"3\r\nabc\r\n0\r\n\r\n"])));
        assert!(ends_chunked(tail_of(&[head, b"0\r\n\r\n"])));
        assert!(ends_chunked(tail_of(&[
            head,
            b"3\r\nabc\r\n0\r",
            b"\n",
            b"\r\n"
        ])));
        assert!(ends_chunked(tail_of(&[
            head,
            b"3\r\nabc\r\n",
            b"0",
            b"\r\n\r\n"
        ])));
        assert!(!ends_chunked(tail_of(&[head])));
        assert!(!ends_chunked(tail_of(&[head, b"3\r\nabc\r\n"])));
    }
}
