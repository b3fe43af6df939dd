//! Unit tests of permessage-deflate: negotiation and the compression round trip.

use super::*;

fn offer(h: &str) -> Option<String> {
    let mut headers = HeaderMap::new();
    headers.insert(header::SEC_WEBSOCKET_EXTENSIONS, h.parse().unwrap());
    negotiate(&Deflate::default(), &headers).map(|(_, v)| v.to_str().unwrap().to_owned())
}

#[test]
fn negotiation_follows_rfc_7692() {
    let base = "permessage-deflate; client_no_context_takeover";
    assert_eq!(offer("permessage-deflate").as_deref(), Some(base));
    assert_eq!(
        offer("permessage-deflate; client_max_window_bits").as_deref(),
        Some(base)
    );
    assert_eq!(
        offer("permessage-deflate; client_max_window_bits=10").unwrap(),
        format!("{base}; client_max_window_bits=10")
    );
    assert_eq!(
        offer("permessage-deflate; server_max_window_bits=8").unwrap(),
        format!("{base}; server_max_window_bits=8")
    );
    assert_eq!(
        offer("permessage-deflate; server_no_context_takeover").unwrap(),
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    );
    // Bad offers are skipped; the next acceptable one in the client's order is taken.
    assert_eq!(
        offer("permessage-deflate; server_max_window_bits=16, permessage-deflate; x=1, permessage-deflate; server_max_window_bits=\"9\"").unwrap(),
        format!("{base}; server_max_window_bits=9")
    );
    for bad in [
        "permessage-deflate; server_max_window_bits",
        "permessage-deflate; server_max_window_bits=7",
        "permessage-deflate; client_max_window_bits=010",
        "permessage-deflate; server_no_context_takeover=1",
        "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
        "x-webkit-deflate-frame",
    ] {
        assert_eq!(offer(bad), None, "{bad}");
    }
}

#[test]
fn messages_round_trip_through_history() {
    let (mut server, _) = accept(&Deflate::default(), &Offer::default()).unwrap();
    // A client with full context takeover decodes what the server sends.
    let mut client = Decompress::new(false);
    for i in 0..200 {
        let msg = format!(
            "{{\"type\":\"tick\",\"seq\":{i},\"price\":\"{}.25\"}}",
            1000 + i
        );
        let (z, _) = server.compress(msg.as_bytes());
        assert_eq!(
            inflate_all(&mut client, &z, 1 << 20).unwrap(),
            msg.as_bytes()
        );
    }
}

#[test]
fn connections_sharing_a_thread_keep_their_own_context() {
    let mut conns: Vec<_> = (0..3)
        .map(|_| {
            let (codec, _) = accept(&Deflate::default(), &Offer::default()).unwrap();
            (codec, Decompress::new(false))
        })
        .collect();
    // Runs of one connection (the thread's stream goes on) and alternation (it restarts
    // from the history) both decode with each client's own window.
    for i in 0..300usize {
        let k = if i < 100 { i / 34 } else { i % 3 };
        let (server, client) = &mut conns[k];
        let msg = format!(
            "{{\"conn\":{k},\"seq\":{i},\"text\":\"{}\"}}",
            "ab".repeat(i % 50)
        );
        let (z, _) = server.compress(msg.as_bytes());
        assert_eq!(
            inflate_all(client, &z, 1 << 20).unwrap(),
            msg.as_bytes(),
            "{i}"
        );
    }
}

#[test]
fn history_keeps_the_last_bytes() {
    let mut h = History::new(10).unwrap();
    h.remember(b"abc");
    h.remember(b"defgh");
    assert_eq!(h.bytes(), b"abcdefgh");
    h.remember(b"ijkl");
    assert_eq!(h.bytes(), b"cdefghijkl");
    h.remember(b"0123456789abc");
    assert_eq!(h.bytes(), b"3456789abc");
    h.remember(b"");
    assert_eq!(h.bytes(), b"3456789abc");
}

#[test]
fn a_bomb_stops_at_the_limit() {
    let (mut codec, _) = accept(&Deflate::default(), &Offer::default()).unwrap();
    let codec2 = &mut codec;
    let zeros = vec![0u8; 10 << 20];
    let (z, _) = codec2.compress(&zeros);
    assert!(z.len() < 20_000);
    assert_eq!(codec2.decompress(&z, 1 << 20), Err(InflateError::TooLarge));
    assert_eq!(
        codec2.decompress(b"\xff\xff\xff", 1 << 20),
        Err(InflateError::Invalid)
    );
}
