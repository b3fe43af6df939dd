//! TLS on a connection's socket: a rustls `ServerConnection` used sans-IO (`read_tls`,
//! `process_new_packets`, `reader`, `writer`, `write_tls`) over the socket's descriptor.
//!
//! A [`Tls`] lives in the connection's [`Fd`](super::stream::Fd), so whoever reads and writes
//! the socket (hyper through a `HopStream`, an upgrade's task, a read handler) goes through it
//! without knowing: reads hand out decrypted bytes, writes take plaintext and leave records in
//! rustls's buffer, and every write and flush sends those on before it takes more. The socket
//! is reached through the `Read`/`Write` the caller passes in, which keep its readiness flags,
//! so this module knows nothing of them.
//!
//! rustls reads ahead: a request that arrives in the handshake's last flight, or pipelined
//! requests in one record, are decrypted bytes in its buffer while the socket has nothing more
//! to read. A read serves those first, before the socket is looked at, and
//! [`Tls::has_plaintext`] keeps the connection counted as readable until they are taken.

use std::io::{self, BufRead, IoSlice, Read, Write};
use std::mem::MaybeUninit;

use rustls::ServerConnection;

/// Bytes of encrypted output rustls may hold for a connection (records not yet sent, plus
/// plaintext written before the handshake finished): a write beyond it waits for the socket.
/// rustls's own default is 64 KiB.
const BUFFER_LIMIT: usize = 64 * 1024;

/// A connection's TLS state (see the module docs).
pub(crate) struct Tls {
    conn: ServerConnection,
    /// `close_notify` has been queued.
    closing: bool,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("handshaking", &self.conn.is_handshaking())
            .field("closing", &self.closing)
            .finish()
    }
}

impl Tls {
    pub(crate) fn new(mut conn: ServerConnection) -> Tls {
        conn.set_buffer_limit(Some(BUFFER_LIMIT));
        Tls {
            conn,
            closing: false,
        }
    }

    /// The rustls connection (what the handshake agreed on).
    pub(crate) fn conn(&self) -> &ServerConnection {
        &self.conn
    }

    /// The handshake is not done yet.
    pub(crate) fn handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Decrypted bytes are waiting to be read.
    pub(crate) fn has_plaintext(&mut self) -> bool {
        matches!(self.conn.reader().fill_buf(), Ok(b) if !b.is_empty())
    }

    /// Encrypted output is waiting to be sent.
    pub(crate) fn has_output(&self) -> bool {
        self.conn.wants_write()
    }

    /// Drives the handshake over `io`: `Ok(true)` once it is done, `Ok(false)` while it waits
    /// for the socket, an error if it failed (the alert, if any, is sent first) or the peer
    /// closed.
    pub(crate) fn handshake(&mut self, io: &mut (impl Read + Write)) -> io::Result<bool> {
        loop {
            let sent = self.send(io)?;
            if !self.conn.is_handshaking() {
                // What is left to send (session tickets) goes with the first flush.
                return Ok(true);
            }
            if !sent {
                return Ok(false);
            }
            match self.conn.read_tls(io) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed during the TLS handshake",
                    ))
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
            self.process(io)?;
        }
    }

    /// Reads decrypted bytes into `dst`: those rustls holds first, then what the socket has.
    /// `Ok(0)` is the end of input, whether the peer sent `close_notify` or just closed (a
    /// normal close, as browsers and curl do it); `WouldBlock` when nothing is there.
    pub(crate) fn read(
        &mut self,
        io: &mut (impl Read + Write),
        dst: &mut [MaybeUninit<u8>],
    ) -> io::Result<usize> {
        if dst.is_empty() {
            return Ok(0);
        }
        loop {
            let mut reader = self.conn.reader();
            match reader.fill_buf() {
                Ok([]) => return Ok(0),
                Ok(plain) => {
                    let n = plain.len().min(dst.len());
                    // SAFETY: `plain` holds at least `n` initialized bytes and `dst` has room
                    // for `n`; they are different buffers (rustls's and the caller's).
                    unsafe {
                        std::ptr::copy_nonoverlapping(plain.as_ptr(), dst.as_mut_ptr().cast(), n)
                    };
                    reader.consume(n);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            // Ok(0), the end of input, shows in the reader's answer next time round.
            self.conn.read_tls(io)?;
            self.process(io)?;
        }
    }

    /// Takes plaintext from `bufs` for encryption, after sending the records already made;
    /// `WouldBlock` if rustls's buffer is at its limit because the socket is full. What it
    /// took is sent at once if the socket has room, else by the next write or flush.
    pub(crate) fn write(
        &mut self,
        io: &mut (impl Read + Write),
        bufs: &[IoSlice<'_>],
    ) -> io::Result<usize> {
        self.send(io)?;
        let n = self.conn.writer().write_vectored(bufs)?;
        if n == 0 && bufs.iter().any(|b| !b.is_empty()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.send(io)?;
        Ok(n)
    }

    /// Sends the records rustls holds: `Ok(true)` when none is left, `Ok(false)` if the socket
    /// is full.
    pub(crate) fn send(&mut self, io: &mut impl Write) -> io::Result<bool> {
        while self.conn.wants_write() {
            match self.conn.write_tls(io) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Queues `close_notify` (once) and sends what it can.
    pub(crate) fn close(&mut self, io: &mut impl Write) {
        if !self.closing {
            self.closing = true;
            self.conn.send_close_notify();
        }
        let _ = self.send(io);
    }

    /// Decrypts what `read_tls` took in; on a TLS error, sends the alert rustls made for it.
    fn process(&mut self, io: &mut impl Write) -> io::Result<()> {
        if let Err(e) = self.conn.process_new_packets() {
            let _ = self.send(io);
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        // Records rustls answers with after the handshake (a key update) go out now if the
        // socket takes them, else with the next write or flush.
        if self.conn.wants_write() && !self.conn.is_handshaking() {
            let _ = self.send(io);
        }
        Ok(())
    }
}
