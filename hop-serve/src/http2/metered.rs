//! The tokio backend's side of the meter (feature `tokio-baseline`): [`Metered`], the
//! connection's IO with the [`Meter`] between it and hyper, which sends what the meter queued
//! before hyper's writes and hands hyper the meter's frames before the client's; and
//! `watch_bodies`, the task-side watch that resets stalled request bodies as they fall due.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use super::meter::{flood, lock, Meter, Stall};

/// The tokio backend's HTTP/2 stream: the connection's IO with a [`Meter`] between it and
/// hyper (the reactor's `HopStream` does the same in place).
pub(crate) struct Metered<IO> {
    io: IO,
    meter: Arc<std::sync::Mutex<Meter>>,
}

impl<IO: tokio::io::AsyncWrite + Unpin> Metered<IO> {
    pub(crate) fn new(io: IO, meter: Arc<std::sync::Mutex<Meter>>) -> Self {
        Metered { io, meter }
    }

    /// Sends what the meter queued for the client; `Pending` while some of it is left (then
    /// nothing of hyper's may follow yet).
    fn poll_queued(&mut self, cx: &mut Context<'_>, m: &mut Meter) -> Poll<std::io::Result<()>> {
        while let Some(b) = m.to_write() {
            match std::pin::Pin::new(&mut self.io).poll_write(cx, b) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => m.wrote(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncRead
    for Metered<IO>
{
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let meter = this.meter.clone();
        {
            let mut m = lock(&meter);
            // SAFETY: `take_to_read` initializes the `n` bytes it reports, and only those are
            // marked initialized and filled.
            let n = m.take_to_read(unsafe { buf.unfilled_mut() });
            if n > 0 {
                unsafe { buf.assume_init(n) };
                buf.advance(n);
                let _ = this.poll_queued(cx, &mut m);
                return Poll::Ready(Ok(()));
            }
            let _ = this.poll_queued(cx, &mut m);
        }
        let before = buf.filled().len();
        std::task::ready!(std::pin::Pin::new(&mut this.io).poll_read(cx, buf))?;
        let mut m = lock(&meter);
        if m.on_read(&buf.filled()[before..]).is_err() {
            tracing::debug!("HTTP/2 control-frame flood; closing with GOAWAY");
            m.goaway();
            let _ = this.poll_queued(cx, &mut m);
            return Poll::Ready(Err(flood()));
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Metered<IO> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.poll_write_vectored(cx, &[std::io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let meter = this.meter.clone();
        let mut m = lock(&meter);
        std::task::ready!(this.poll_queued(cx, &mut m))?;
        let n = std::task::ready!(std::pin::Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
        m.on_written(bufs, n);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let meter = this.meter.clone();
        std::task::ready!(this.poll_queued(cx, &mut lock(&meter)))?;
        std::pin::Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The tokio backend's watch over a connection's stalled request bodies: resets them as they
/// fall due (see [`Meter::expire`]); completes only when one stalled mid-frame, to close the
/// connection.
pub(crate) async fn watch_bodies(meter: Arc<std::sync::Mutex<Meter>>) {
    loop {
        let due = std::future::poll_fn(|cx| {
            let mut m = lock(&meter);
            match m.next_due() {
                Some(due) => Poll::Ready(due),
                None => {
                    m.watch(cx.waker());
                    Poll::Pending
                }
            }
        })
        .await;
        tokio::time::sleep_until(due.into()).await;
        let stall = lock(&meter).expire(Instant::now());
        match stall {
            Stall::Close => {
                tracing::debug!("HTTP/2 request body stalled mid-frame; closing");
                return;
            }
            // hyper's connection, polled in this task, reads the resets.
            Stall::Reset => tokio::task::yield_now().await,
            Stall::None => {}
        }
    }
}
