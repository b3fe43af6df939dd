//! hyper's timer on a poller ([`HopTimer`]), so that `header_read_timeout` works without tokio.
//!
//! A [`HopSleep`] polled during its connection's drive asks for a poll at its deadline
//! ([`Current::wake_at`](super::current::Current::wake_at)); the poller arms its timer with
//! that after the drive. hyper holds its header-read sleep exactly while it waits for a request
//! head, so the sleep also tells the driver when that is ([`Current::head_wait`]): what idle
//! parking needs to know. This is hyper's private behaviour: `conn::http` checks it with a debug
//! assertion when a request is dispatched, and a test parks a slow handler's connection only
//! if hyper changes it.
//!
//! [`Current::head_wait`]: super::current::Current::head_wait

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use super::current;
use crate::rt::wake::Key;

/// hyper's timer on the poller: see the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct HopTimer;

impl hyper::rt::Timer for HopTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let key = current::with_any(|c| {
            c.head_wait = true;
            c.key
        });
        Box::pin(HopSleep {
            deadline,
            key,
            fallback: None,
        })
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<HopSleep>() {
            Some(s) => s.get_mut().deadline = new_deadline,
            None => *sleep = self.sleep_until(new_deadline),
        }
    }
}

/// A sleep on the poller's timer; see [`HopTimer`].
pub(crate) struct HopSleep {
    deadline: Instant,
    /// The connection it was made for.
    key: Option<Key>,
    /// Used only if polled outside its connection's drive (hyper never does that).
    fallback: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Future for HopSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if Instant::now() >= this.deadline {
            return Poll::Ready(());
        }
        let deadline = this.deadline;
        if let Some(key) = this.key {
            if current::with(key, |c| c.wake_at(deadline)).is_some() {
                return Poll::Pending;
            }
        }
        this.fallback
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())))
            .as_mut()
            .poll(cx)
    }
}

impl hyper::rt::Sleep for HopSleep {}

impl Drop for HopSleep {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            current::with(key, |c| c.head_wait = false);
        }
    }
}
