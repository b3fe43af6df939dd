//! Looking at what a new TCP or Unix connection has sent without taking it ([`Peek`],
//! `MSG_PEEK`): its first bytes, to tell HTTP/1.1 from HTTP/2 ([`sniff_peeked`]), and its PROXY
//! protocol header, of which exactly its bytes are then taken ([`read_proxy_header`]).

use std::io;
use std::os::fd::AsRawFd;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncRead;

use crate::http2::{sniff, Proto, PREFACE};
use crate::proxy::{Failure, ProxyHeader};

/// A stream whose waiting bytes can be peeked at: TCP and Unix sockets.
pub(super) trait Peek: AsRawFd {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Runs `f`, clearing read readiness if it returns `WouldBlock`.
    fn try_read_io(&self, f: impl FnOnce() -> io::Result<usize>) -> io::Result<usize>;
}

impl Peek for tokio::net::TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::TcpStream::poll_read_ready(self, cx)
    }
    fn try_read_io(&self, f: impl FnOnce() -> io::Result<usize>) -> io::Result<usize> {
        self.try_io(tokio::io::Interest::READABLE, f)
    }
}

impl Peek for tokio::net::UnixStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::UnixStream::poll_read_ready(self, cx)
    }
    fn try_read_io(&self, f: impl FnOnce() -> io::Result<usize>) -> io::Result<usize> {
        self.try_io(tokio::io::Interest::READABLE, f)
    }
}

/// Copies the bytes waiting on `io` into `dst` without taking them, once there are some.
async fn peek(io: &impl Peek, dst: &mut [u8]) -> io::Result<usize> {
    let fd = io.as_raw_fd();
    std::future::poll_fn(|cx| loop {
        std::task::ready!(io.poll_read_ready(cx))?;
        let peeked = io.try_read_io(|| {
            // SAFETY: `recv(2)` writes at most `dst.len()` bytes into `dst`, initialized memory
            // borrowed here; `fd` is open while `io` is borrowed.
            let n = unsafe { libc::recv(fd, dst.as_mut_ptr().cast(), dst.len(), libc::MSG_PEEK) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match peeked {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return Poll::Ready(r),
        }
    })
    .await
}

/// Peeks at a new connection's first bytes until they tell HTTP/1.1 from HTTP/2; `None` if
/// the connection ends first.
pub(super) async fn sniff_peeked(io: &impl Peek) -> io::Result<Option<Proto>> {
    let mut first = [0u8; PREFACE.len()];
    let mut pause = Duration::from_millis(1);
    loop {
        let n = peek(io, &mut first).await?;
        if n == 0 {
            return Ok(None);
        }
        if let Some(p) = sniff(&first[..n]) {
            return Ok(Some(p));
        }
        // Part of the preface: the socket stays readable, so a peek would return the same bytes
        // at once; wait a little before looking again (a client that splits the preface is
        // rare).
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Reads a PROXY protocol header off `io`: peeks until it is whole (the spec's limits bound
/// what is looked at: `proxy::MAX_HEADER`), then takes exactly its bytes, so that what follows
/// reaches TLS or HTTP untouched. No time limit here: the caller sets it.
pub(super) async fn read_proxy_header<T>(io: &mut T) -> Result<ProxyHeader, Failure>
where
    T: Peek + AsyncRead + Unpin,
{
    use crate::proxy::{parse, Parsed, V1_MAX};
    use tokio::io::AsyncReadExt;
    // Enough for any v1 header and a v2 header's fixed part; more once v2 says how much.
    let mut buf = vec![0u8; V1_MAX];
    let mut pause = Duration::from_millis(1);
    loop {
        let n = peek(io, &mut buf).await.map_err(Failure::Io)?;
        if n == 0 {
            return Err(Failure::Closed);
        }
        match parse(&buf[..n])? {
            Parsed::Header(header, len) => {
                io.read_exact(&mut buf[..len])
                    .await
                    .map_err(|_| Failure::Closed)?;
                return Ok(header);
            }
            // More than was looked at may be there already.
            Parsed::Need(more) if n == buf.len() => buf.resize(more, 0),
            Parsed::Need(_) => {
                // Part of a header: the socket stays readable, so a peek would return the same
                // bytes at once; wait a little before looking again (as `sniff_peeked`).
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
        }
    }
}
