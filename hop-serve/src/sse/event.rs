//! An SSE event ([`Event`]) and its bytes on the wire: encoded once as `id:`, `event:`,
//! `retry:` and `data:` fields, framed as an HTTP/1.1 chunk where the response is chunked
//! (`frame`), and shared between the subscribers of one send (`Framed`). It knows nothing of
//! hubs or connections.

use std::fmt::Write as _;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

/// One event.
#[derive(Debug, Clone, Default)]
pub struct Event {
    id: Option<String>,
    event: Option<String>,
    data: String,
    retry: Option<Duration>,
}

impl Event {
    /// An event carrying `data`.
    ///
    /// `data` is split into lines the way an `EventSource` splits the stream (at CRLF, at a
    /// lone CR and at a lone LF), and each line is sent as its own `data:` field, so the client
    /// sees the lines joined by `\n`: `"a\r\nb\rc"` arrives as `"a\nb\nc"`. No line break in
    /// `data` can start another field or end the event early.
    pub fn new(data: impl Into<String>) -> Self {
        Event {
            data: data.into(),
            ..Event::default()
        }
    }

    /// Sets the event id (what a reconnecting client sends back as `Last-Event-ID`).
    ///
    /// # Panics
    ///
    /// Panics if `id` contains a line break (CR or LF) or a NUL character, as
    /// `axum::response::sse::Event::id` does: the line break would end the field (what follows
    /// would be read as further fields), and a client ignores an id containing NUL.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        let id = id.into();
        assert!(
            !id.contains(['\r', '\n', '\0']),
            "an SSE event id cannot contain CR, LF or NUL: {id:?}"
        );
        self.id = Some(id);
        self
    }

    /// Sets the event type.
    ///
    /// # Panics
    ///
    /// Panics if `name` contains a line break (CR or LF), as `axum::response::sse::Event::event`
    /// does: the line break would end the field and what follows would be read as further
    /// fields.
    pub fn event(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        assert!(
            !name.contains(['\r', '\n']),
            "an SSE event type cannot contain CR or LF: {name:?}"
        );
        self.event = Some(name);
        self
    }

    /// Sets the client's reconnection delay.
    pub fn retry(mut self, after: Duration) -> Self {
        self.retry = Some(after);
        self
    }

    pub(super) fn encode(&self) -> String {
        let mut s = String::with_capacity(self.data.len() + 32);
        if let Some(id) = &self.id {
            let _ = writeln!(s, "id: {id}");
        }
        if let Some(e) = &self.event {
            let _ = writeln!(s, "event: {e}");
        }
        if let Some(r) = self.retry {
            let _ = writeln!(s, "retry: {}", r.as_millis());
        }
        // Lines end at CRLF, CR or LF, as the client reads them.
        let mut rest = self.data.as_str();
        loop {
            let end = rest.find(['\r', '\n']);
            let _ = writeln!(s, "data: {}", &rest[..end.unwrap_or(rest.len())]);
            let Some(end) = end else { break };
            rest = rest[end..].strip_prefix("\r\n").unwrap_or(&rest[end + 1..]);
        }
        s.push('\n');
        s
    }
}

/// Frames `payload` as an HTTP/1.1 chunk (or not at all for HTTP/1.0, close-delimited).
pub(super) fn frame(payload: &[u8], chunked: bool) -> Bytes {
    if !chunked {
        return Bytes::copy_from_slice(payload);
    }
    let mut b = BytesMut::with_capacity(payload.len() + 12);
    let _ = std::fmt::Write::write_fmt(&mut Hex(&mut b), format_args!("{:x}\r\n", payload.len()));
    b.extend_from_slice(payload);
    b.extend_from_slice(b"\r\n");
    b.freeze()
}

struct Hex<'a>(&'a mut BytesMut);

impl std::fmt::Write for Hex<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// An event encoded once, framed as a chunk at most once: each subscriber gets a cheap clone.
pub(super) struct Framed {
    plain: Bytes,
    chunked: std::cell::OnceCell<Bytes>,
}

impl Framed {
    pub(super) fn new(event: &Event) -> Self {
        Framed {
            plain: Bytes::from(event.encode()),
            chunked: std::cell::OnceCell::new(),
        }
    }

    pub(super) fn get(&self, chunked: bool) -> Bytes {
        if chunked {
            self.chunked
                .get_or_init(|| frame(&self.plain, true))
                .clone()
        } else {
            self.plain.clone()
        }
    }
}
