//! Taking an HTTP connection over with a read handler: "after this response, the socket is a
//! read-handler connection". One mechanism serves both users:
//! - a hijack ([`crate::Hijack::on_read`]) takes over once hyper has written a `101` and
//!   finished the connection with an upgrade: the socket is taken back from the upgrade;
//! - an SSE subscription ([`crate::sse::Subscription::response`]) takes over once hyper has
//!   written the `200` head and asks for the body: the socket is taken back with
//!   `into_parts`.
//!
//! Either way the takeover waits on the connection ([`super::current::Current::takeover`])
//! until the driver sees its moment, and bytes read and not yet used go to the handler first.

use std::future::Future;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::upgrade::OnUpgrade;

use super::stream::HopStream;
use crate::handler::Handler;

/// A read handler waiting for its connection.
pub(crate) struct Takeover {
    handler: Box<dyn Handler>,
    when: When,
}

enum When {
    /// When hyper has finished the connection with this upgrade.
    Upgrade(OnUpgrade),
    /// When hyper has written the response head (`true` once it has).
    Head(bool),
}

/// A handler and the connection's unused input, ready to run.
pub(crate) struct Taken {
    pub(crate) handler: Box<dyn Handler>,
    pub(crate) leftover: Bytes,
}

impl Takeover {
    /// Takes over when hyper finishes the connection with `on_upgrade`.
    pub(crate) fn after_upgrade(handler: Box<dyn Handler>, on_upgrade: OnUpgrade) -> Self {
        Takeover {
            handler,
            when: When::Upgrade(on_upgrade),
        }
    }

    /// Takes over once hyper has written the response head ([`Takeover::head_written`]).
    pub(crate) fn after_head(handler: Box<dyn Handler>) -> Self {
        Takeover {
            handler,
            when: When::Head(false),
        }
    }

    /// The handler and the upgrade it waits for, for a task to run instead (a hijack used
    /// outside its connection's drive).
    pub(crate) fn into_upgrade(self) -> (Box<dyn Handler>, OnUpgrade) {
        match self.when {
            When::Upgrade(on_upgrade) => (self.handler, on_upgrade),
            When::Head(_) => unreachable!("only a hijack's takeover has an upgrade"),
        }
    }

    /// hyper has written the response head and polls the body.
    pub(crate) fn head_written(&mut self) {
        if let When::Head(written) = &mut self.when {
            *written = true;
        }
    }

    /// Whether hyper, still running, has written the head this takeover waits for.
    pub(crate) fn head_is_out(&self) -> bool {
        matches!(self.when, When::Head(true))
    }

    /// Takes the socket back from hyper's parts (`into_parts`) after the head is out.
    pub(crate) fn into_taken(self, io: HopStream, read_buf: Bytes) -> Taken {
        Taken {
            handler: self.handler,
            leftover: io.release(read_buf),
        }
    }

    /// Takes the socket back from the upgrade, after hyper finished the connection; `None`
    /// if this takeover was not waiting for an upgrade (the connection simply ended).
    pub(crate) fn after_finish(self) -> Option<Result<Taken, &'static str>> {
        let When::Upgrade(mut on_upgrade) = self.when else {
            return None;
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let upgraded = match std::pin::Pin::new(&mut on_upgrade).poll(&mut cx) {
            Poll::Ready(Ok(u)) => u,
            Poll::Ready(Err(_)) => return Some(Err("the upgrade failed")),
            Poll::Pending => return Some(Err("the upgrade was not ready")),
        };
        Some(match upgraded.downcast::<HopStream>() {
            Ok(parts) => Ok(Taken {
                handler: self.handler,
                leftover: parts.io.release(parts.read_buf),
            }),
            Err(_) => Err("the upgraded stream is not hop's"),
        })
    }
}
