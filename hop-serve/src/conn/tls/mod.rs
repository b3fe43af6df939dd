//! TLS on a connection's socket: a rustls `UnbufferedServerConnection` over the socket's
//! descriptor, with the buffers it reads from and writes to owned here, so that an idle
//! connection gives them back ([`Tls::release`]) and keeps only rustls's session state (its
//! keys). Buffers given back wait on a short per-thread list for the next connection that
//! needs some, so that a parked connection's wake allocates none.
//!
//! A [`Tls`] lives in the connection's [`Fd`](super::fd::Fd), so whoever reads and writes
//! the socket (hyper through a `HopStream`, an upgrade's task, a read handler) goes through it
//! without knowing: reads hand out decrypted bytes, writes take plaintext and leave records in
//! the outgoing buffer, and every write and flush sends those on before it takes more. The
//! socket is reached through the [`Transport`] the caller passes in, which keeps its readiness
//! flags, so this module knows nothing of them.
//!
//! rustls's unbuffered API gives no SNI name, so the ClientHello is read for it by rustls's
//! `Acceptor` on the side, during the handshake only.
//!
//! Input is read ahead: a request that arrives in the handshake's last flight, or pipelined
//! requests in one read, are records in the incoming buffer (or decrypted bytes a read had no
//! room for) while the socket has nothing more to read. A read serves those first, before the socket is
//! looked at, and [`Tls::has_plaintext`] keeps the connection counted as readable until they
//! are taken.
//!
//! The buffers, their bounds and the per-thread list of spare ones are `bufs`'s (which knows
//! nothing of rustls's states); this file is the connection's state machine over them.

use std::io::{self, IoSlice, Write};
use std::mem::MaybeUninit;

use rustls::server::{Acceptor, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};

mod bufs;

use bufs::{
    copy, give_back, take_spare, Bufs, Out, BUFFER_LIMIT, INCOMING_MAX, OUT_MAX, READ_SIZE,
    RECORD_OVERHEAD, RECORD_SIZE,
};

/// A connection's TLS state (see the module docs).
pub(crate) struct Tls {
    conn: UnbufferedServerConnection,
    /// The buffers, while the connection reads or writes: `None` while it is idle (boxed, so
    /// that an idle connection keeps a pointer for them).
    bufs: Option<Box<Bufs>>,
    /// The server name the client asked for (SNI).
    sni: Option<Box<str>>,
    /// Reads the ClientHello for its SNI name: made for the first bytes that come, dropped once
    /// it has the whole ClientHello (which usually comes in one read).
    hello: Option<Box<Acceptor>>,
    /// The ClientHello has been read for the SNI name (or could not be).
    hello_read: bool,
    /// The peer sent `close_notify`: reads are at their end.
    peer_closed: bool,
    /// `close_notify` has been queued.
    closing: bool,
    /// rustls failed: every read and write fails the same way.
    error: Option<Box<rustls::Error>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("handshaking", &self.conn.is_handshaking())
            .field("closing", &self.closing)
            .field("error", &self.error)
            .finish()
    }
}

/// What one `process_tls_records` call was asked for.
enum Job<'a, 'b> {
    /// Nothing but progress: plaintext goes to [`Tls::plain`].
    Progress,
    /// Plaintext into this buffer (what does not fit goes to [`Tls::plain`]); `.1` counts it.
    Read(&'a mut [MaybeUninit<u8>], &'b mut usize),
    /// This plaintext, encrypted into the outgoing buffer once rustls may send it; `.1` is set.
    Write(&'a [u8], &'b mut bool),
    /// `close_notify` into the outgoing buffer, once rustls may send it.
    Close,
}

/// The socket, as TLS reads and writes it (through the caller's view of it).
pub(crate) trait Transport: Write {
    /// Reads into `dst`, which need not be initialized; how many bytes it read (and
    /// initialized).
    fn recv(&mut self, dst: &mut [MaybeUninit<u8>]) -> io::Result<usize>;
}

/// Where one `process_tls_records` call left the connection.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Step {
    /// Something was done (output encoded, plaintext taken): call again.
    Again,
    /// Plaintext was taken.
    Read,
    /// rustls needs more input to go on with the handshake.
    Input,
    /// Nothing more to take: application data may be sent (and what came was done).
    Ready,
    /// Both sides have sent `close_notify`.
    Closed,
}

impl Tls {
    pub(crate) fn new(conn: UnbufferedServerConnection) -> Tls {
        Tls {
            conn,
            bufs: None,
            sni: None,
            hello: None,
            hello_read: false,
            peer_closed: false,
            closing: false,
            error: None,
        }
    }

    /// What the handshake agreed on.
    pub(crate) fn info(&self) -> crate::tls::TlsInfo {
        crate::tls::TlsInfo::new(self.sni.as_deref(), &self.conn)
    }

    /// Whether ALPN agreed on `proto`.
    pub(crate) fn alpn_is(&self, proto: &[u8]) -> bool {
        self.conn.alpn_protocol() == Some(proto)
    }

    /// The handshake is not done yet.
    pub(crate) fn handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Decrypted bytes are waiting to be read (or an error, which a read reports).
    pub(crate) fn has_plaintext(&mut self) -> bool {
        let Some(b) = &self.bufs else {
            return false;
        };
        if b.taken < b.plain.len() {
            return true;
        }
        if b.incoming.is_empty() || self.conn.is_handshaking() {
            return false;
        }
        match self.run(&mut Job::Progress) {
            Ok(_) => self.bufs.as_ref().is_some_and(|b| b.taken < b.plain.len()),
            Err(_) => true,
        }
    }

    /// Encrypted output is waiting to be sent.
    pub(crate) fn has_output(&self) -> bool {
        self.bufs.as_ref().is_some_and(|b| b.sent < b.end)
    }

    /// Gives back the buffers if they hold nothing (the connection is idle): what stays is
    /// rustls's session state.
    pub(crate) fn release(&mut self) {
        if let Some(b) = self.bufs.take_if(|b| b.is_empty()) {
            give_back(b);
        }
    }

    /// Drives the handshake over `io`: `Ok(true)` once it is done, `Ok(false)` while it waits
    /// for the socket, an error if it failed (the alert, if any, is sent first) or the peer
    /// closed.
    pub(crate) fn handshake(&mut self, io: &mut impl Transport) -> io::Result<bool> {
        loop {
            let step = self.run(&mut Job::Progress);
            let sent = self.send(io)?;
            step?;
            if !self.conn.is_handshaking() {
                // The SNI name is known by now (a ClientHello that the Acceptor could not
                // read has none rustls would take).
                self.hello = None;
                self.hello_read = true;
                if let Some(b) = &mut self.bufs {
                    if b.incoming.is_empty() {
                        // A client that waits before its first request keeps no buffer for
                        // its input meanwhile.
                        b.incoming = Vec::new();
                    }
                }
                // What is left to send (session tickets) goes with the first flush.
                return Ok(true);
            }
            if !sent {
                self.release();
                return Ok(false);
            }
            match self.fill(io) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed during the TLS handshake",
                    ))
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // While the client answers, the connection holds no buffer.
                    self.release();
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads decrypted bytes into `dst`: those already decrypted or read first, then what the
    /// socket has. `Ok(0)` is the end of input, whether the peer sent `close_notify` or just
    /// closed (a normal close, as browsers and curl do it); `WouldBlock` when nothing is there.
    pub(crate) fn read(
        &mut self,
        io: &mut impl Transport,
        dst: &mut [MaybeUninit<u8>],
    ) -> io::Result<usize> {
        if dst.is_empty() {
            return Ok(0);
        }
        if let Some(b) = &mut self.bufs {
            if b.taken < b.plain.len() {
                let n = copy(&b.plain[b.taken..], dst);
                b.taken += n;
                if b.taken == b.plain.len() {
                    b.plain.clear();
                    b.taken = 0;
                }
                return Ok(n);
            }
        }
        // With no input held and no close from the peer, rustls has nothing to give before new
        // input (it holds no plaintext and no output between calls): the socket comes first.
        let mut to_socket = self.error.is_none()
            && !self.peer_closed
            && !self.conn.is_handshaking()
            && self.bufs.as_ref().is_none_or(|b| b.incoming.is_empty());
        loop {
            if std::mem::take(&mut to_socket) && self.fill(io)? == 0 {
                return Ok(0);
            }
            let mut n = 0;
            let step = self.run(&mut Job::Read(dst, &mut n));
            if self.has_output() {
                // Records rustls answers with (a key update) go out now if the socket takes
                // them, else with the next write or flush.
                let _ = self.send(io);
            }
            match step? {
                Step::Read if n > 0 => return Ok(n),
                // Empty records: go on.
                Step::Read => continue,
                Step::Closed => return Ok(0),
                _ if self.peer_closed => return Ok(0),
                _ => {}
            }
            if self.fill(io)? == 0 {
                return Ok(0);
            }
        }
    }

    /// Takes plaintext from `bufs` for encryption, after sending the records already made;
    /// `WouldBlock` if the outgoing buffer is at its limit because the socket is full. What it
    /// took is sent at once if the socket has room, else by the next write or flush.
    pub(crate) fn write(
        &mut self,
        io: &mut impl Transport,
        bufs: &[IoSlice<'_>],
    ) -> io::Result<usize> {
        self.send(io)?;
        let held = self.bufs.as_ref().map_or(0, |b| b.end - b.sent);
        let room = BUFFER_LIMIT.saturating_sub(held);
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Ok(0);
        }
        if room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let joined;
        let data: &[u8] = match bufs.iter().filter(|b| !b.is_empty()).count() {
            1 => bufs.iter().find(|b| !b.is_empty()).map_or(&[], |b| &b[..]),
            _ => {
                // Several slices go out as one record (hyper's chunk head, data and tail).
                let mut v = Vec::with_capacity(total.min(room));
                for b in bufs {
                    let take = b.len().min(room - v.len());
                    v.extend_from_slice(&b[..take]);
                }
                joined = v;
                &joined
            }
        };
        let data = &data[..data.len().min(room)];
        let mut done = false;
        loop {
            match self.run(&mut Job::Write(data, &mut done))? {
                Step::Ready => break,
                Step::Closed => return Err(io::ErrorKind::BrokenPipe.into()),
                Step::Input => return Err(io::ErrorKind::NotConnected.into()),
                Step::Again | Step::Read => {}
            }
        }
        let n = if done { data.len() } else { 0 };
        self.send(io)?;
        Ok(n)
    }

    /// Sends the records held: `Ok(true)` when none is left, `Ok(false)` if the socket is full.
    pub(crate) fn send(&mut self, io: &mut impl Write) -> io::Result<bool> {
        let Some(b) = &mut self.bufs else {
            return Ok(true);
        };
        while b.sent < b.end {
            match io.write(&b.out[b.sent..b.end]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => b.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        b.sent = 0;
        b.end = 0;
        Ok(true)
    }

    /// Queues `close_notify` (once, after the handshake) and sends what it can.
    pub(crate) fn close(&mut self, io: &mut impl Write) {
        if !self.closing && self.error.is_none() && !self.conn.is_handshaking() {
            self.closing = true;
            for _ in 0..64 {
                match self.run(&mut Job::Close) {
                    Ok(Step::Again | Step::Read) => {}
                    _ => break,
                }
            }
        }
        let _ = self.send(io);
    }

    /// Reads what the socket has into the incoming buffer (`Ok(0)`: the peer closed), and,
    /// while the SNI name is not known, lets the `Acceptor` read it too.
    fn fill(&mut self, io: &mut impl Transport) -> io::Result<usize> {
        let b = self.bufs.get_or_insert_with(take_spare);
        b.compact();
        let held = b.incoming.len();
        if held >= INCOMING_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a TLS message larger than rustls takes",
            ));
        }
        b.incoming.reserve(READ_SIZE);
        let room = b.incoming.capacity().min(INCOMING_MAX) - held;
        let n = io.recv(&mut b.incoming.spare_capacity_mut()[..room])?;
        // Checked, not assumed: `Transport` is a safe trait.
        assert!(
            n <= room,
            "a transport reported more bytes than it had room for"
        );
        // SAFETY: `recv` initialized the first `n` bytes of the spare capacity, `n <= room`
        // (checked above; not clearing the room first is measured: it was a tenth of a parked
        // connection's wake).
        unsafe { b.incoming.set_len(held + n) };
        if !self.hello_read && n > 0 {
            let hello = self.hello.get_or_insert_with(Box::default);
            let mut new = &b.incoming[held..];
            let mut read = true;
            while !new.is_empty() && read {
                read = matches!(hello.read_tls(&mut new), Ok(r) if r > 0);
            }
            match hello.accept() {
                Ok(Some(accepted)) => {
                    self.sni = accepted.client_hello().server_name().map(Into::into);
                    self.hello = None;
                    self.hello_read = true;
                }
                Ok(None) if read => {}
                _ => {
                    self.hello = None;
                    self.hello_read = true;
                }
            }
        }
        Ok(n)
    }

    /// Calls rustls over the input held until it has done `job` or needs the socket; on a
    /// rustls error, queues the alert rustls made for it and fails from then on.
    fn run(&mut self, job: &mut Job<'_, '_>) -> io::Result<Step> {
        if let Some(e) = &self.error {
            return Err(io::Error::new(io::ErrorKind::InvalidData, (**e).clone()));
        }
        loop {
            match self.step(job) {
                Ok(Step::Again) => continue,
                Ok(Step::Read) if matches!(job, Job::Progress) => continue,
                Ok(step) => return Ok(step),
                Err(e) => {
                    // The alert rustls queued for the error comes out as `EncodeTlsData`,
                    // which comes before any input is looked at again (which could make
                    // rustls fail, and alert, once more).
                    for _ in 0..8 {
                        if !self.conn.wants_write() || self.step(&mut Job::Progress).is_err() {
                            break;
                        }
                    }
                    self.error = Some(Box::new(e.clone()));
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                }
            }
        }
    }

    /// One `process_tls_records` call over the input held, its state handled for `job`.
    fn step(&mut self, job: &mut Job<'_, '_>) -> Result<Step, rustls::Error> {
        let b = &mut **self.bufs.get_or_insert_with(take_spare);
        let UnbufferedStatus { discard, state } =
            self.conn.process_tls_records(&mut b.incoming[b.start..]);
        let out = Out {
            buf: &mut b.out,
            sent: &mut b.sent,
            end: &mut b.end,
        };
        let step = match state {
            Err(e) => Err(e),
            Ok(ConnectionState::ReadTraffic(mut r)) => {
                let mut step = Ok(Step::Read);
                while let Some(record) = r.next_record() {
                    match record {
                        Ok(record) => take(record.payload, job, &mut b.plain),
                        Err(e) => step = Err(e),
                    }
                }
                step
            }
            Ok(ConnectionState::ReadEarlyData(mut r)) => {
                let mut step = Ok(Step::Read);
                while let Some(record) = r.next_record() {
                    match record {
                        Ok(record) => take(record.payload, job, &mut b.plain),
                        Err(e) => step = Err(e),
                    }
                }
                step
            }
            Ok(ConnectionState::EncodeTlsData(_)) if *out.end - *out.sent > OUT_MAX => {
                Err(rustls::Error::General("TLS output beyond its bound".into()))
            }
            Ok(ConnectionState::EncodeTlsData(mut e)) => out
                .append(0, |buf| match e.encode(buf) {
                    Ok(n) => Ok(Ok(n)),
                    Err(EncodeError::InsufficientSize(s)) => Ok(Err(s.required_size)),
                    Err(EncodeError::AlreadyEncoded) => {
                        Err(rustls::Error::General("a TLS record encoded twice".into()))
                    }
                })
                .map(|()| Step::Again),
            Ok(ConnectionState::TransmitTlsData(t)) => {
                // The records are in the outgoing buffer, which goes out before anything
                // encoded after them.
                t.done();
                Ok(Step::Again)
            }
            Ok(ConnectionState::BlockedHandshake) => Ok(Step::Input),
            Ok(ConnectionState::PeerClosed) => {
                self.peer_closed = true;
                Ok(Step::Again)
            }
            Ok(ConnectionState::Closed) => Ok(Step::Closed),
            Ok(ConnectionState::WriteTraffic(mut w)) => match job {
                Job::Write(data, done) if !**done => {
                    // Room for the records, so that rustls encrypts at the first call.
                    let hint = data.len() + RECORD_OVERHEAD * (data.len() / RECORD_SIZE + 1);
                    out.append(hint, |buf| encrypted(w.encrypt(data, buf)))
                        .map(|()| {
                            **done = true;
                            Step::Ready
                        })
                }
                Job::Close => out
                    .append(RECORD_OVERHEAD, |buf| encrypted(w.queue_close_notify(buf)))
                    .map(|()| Step::Ready),
                _ => Ok(Step::Ready),
            },
            Ok(_) => Err(rustls::Error::General(
                "an unknown state of rustls's unbuffered connection".into(),
            )),
        };
        b.discard(discard);
        step
    }
}

impl Drop for Tls {
    /// Gives the buffers back for another connection if they hold nothing.
    fn drop(&mut self) {
        self.release();
    }
}

/// Hands a record's plaintext to a read job; what it has no room for (all of it, for any
/// other job) is kept in `plain`.
fn take(payload: &[u8], job: &mut Job<'_, '_>, plain: &mut Vec<u8>) {
    let n = match job {
        Job::Read(dst, count) => {
            let n = copy(payload, &mut dst[**count..]);
            **count += n;
            n
        }
        _ => 0,
    };
    plain.extend_from_slice(&payload[n..]);
}

/// An encryption's result for [`Out::append`].
fn encrypted(r: Result<usize, EncryptError>) -> Result<Result<usize, usize>, rustls::Error> {
    match r {
        Ok(n) => Ok(Ok(n)),
        Err(EncryptError::InsufficientSize(s)) => Ok(Err(s.required_size)),
        Err(EncryptError::EncryptExhausted) => Err(rustls::Error::EncryptError),
    }
}
