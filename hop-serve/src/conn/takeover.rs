//! Taking an HTTP connection over with a read handler: "after this response, the socket is a
//! read-handler connection". One mechanism serves both users:
//! - a hijack ([`crate::Hijack::on_read`]) takes over once hyper has written a `101` and
//!   finished the connection with an upgrade: the socket is taken back from the upgrade;
//! - an SSE subscription ([`crate::sse::Subscription::response`]) takes over once hyper has
//!   written the `200` head and asks for the body: the socket is taken back with
//!   `into_parts`.
//!
//! Either way the takeover waits on the connection ([`super::current::Current::takeover`])
//! until the driver sees its moment. After an upgrade, bytes read and not yet used belong to
//! the new protocol: they go to the handler first. After a response head, they are a request
//! pipelined behind the one being answered, which the handler (it writes that response's body)
//! cannot serve: the takeover fails and the connection is closed, rather than the request be
//! dropped. A takeover that would lose output hyper still held fails too (see
//! [`HopStream::release`]). These are checked in release builds; the driver logs a failure.

use std::future::Future;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::upgrade::OnUpgrade;

use super::stream::HopStream;
use crate::handler::Protocol;
use crate::limits::OpenKind;

/// A read handler waiting for its connection.
pub(crate) struct Takeover {
    handler: Box<dyn Protocol>,
    when: When,
    /// What the connection counts as once taken over.
    kind: OpenKind,
}

enum When {
    /// When hyper has finished the connection with this upgrade.
    Upgrade(OnUpgrade),
    /// When hyper has written the response head (`true` once it has).
    Head(bool),
}

/// A handler and the connection's unused input, ready to run.
pub(crate) struct Taken {
    pub(crate) handler: Box<dyn Protocol>,
    pub(crate) leftover: Bytes,
    pub(crate) kind: OpenKind,
}

impl Takeover {
    /// Takes over when hyper finishes the connection with `on_upgrade`.
    /// `kind`: a WebSocket or another protocol.
    pub(crate) fn after_upgrade(
        handler: Box<dyn Protocol>,
        on_upgrade: OnUpgrade,
        kind: OpenKind,
    ) -> Self {
        Takeover {
            handler,
            when: When::Upgrade(on_upgrade),
            kind,
        }
    }

    /// Takes over once hyper has written the response head ([`Takeover::head_written`]).
    pub(crate) fn after_head(handler: Box<dyn Protocol>) -> Self {
        Takeover {
            handler,
            when: When::Head(false),
            kind: OpenKind::Sse,
        }
    }

    /// The handler and the upgrade it waits for, for a task to run instead (a hijack used
    /// outside its connection's drive).
    pub(crate) fn into_upgrade(self) -> (Box<dyn Protocol>, OnUpgrade) {
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

    /// Takes the socket back from hyper's parts (`into_parts`) after the head is out; an error
    /// (the connection must close) if a pipelined request or unsent output would be dropped.
    pub(crate) fn into_taken(self, io: HopStream, read_buf: Bytes) -> Result<Taken, &'static str> {
        let leftover = io.release(read_buf)?;
        if !leftover.is_empty() {
            return Err("a request pipelined behind a taken-over response would be dropped");
        }
        Ok(Taken {
            handler: self.handler,
            leftover,
            kind: self.kind,
        })
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
            Ok(parts) => parts.io.release(parts.read_buf).map(|leftover| Taken {
                handler: self.handler,
                leftover,
                kind: self.kind,
            }),
            Err(_) => Err("the upgraded stream is not hop's"),
        })
    }
}
