//! The response body both backends hand to hyper ([`HopBody`]: the handler's, a panic while it
//! is polled turned into a body error, or the empty body of a `500`) and the error type boxed
//! errors are converted into ([`BoxError`]).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// The error type boxed errors are converted into.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project_lite::pin_project! {
    /// A response body: the handler's, or the empty body of a `500` after a panic.
    ///
    /// A panic while the handler's body is polled becomes a body error, so hyper closes the
    /// connection instead of the panic unwinding through the event loop.
    #[project = HopBodyProj]
    #[allow(missing_docs)]
    pub enum HopBody<B> {
        /// The handler's body.
        Inner { #[pin] body: B },
        /// No body.
        Empty,
    }
}

impl<B> Body for HopBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            HopBodyProj::Inner { body } => {
                match catch_unwind(AssertUnwindSafe(|| body.poll_frame(cx))) {
                    Ok(p) => {
                        if let Poll::Ready(Some(Ok(frame))) = &p {
                            if frame
                                .data_ref()
                                .is_some_and(|d| d.len() >= crate::rt::tasks::BULK_CHUNK)
                            {
                                crate::rt::tasks::note_bulk();
                            }
                        }
                        p.map(|f| f.map(|r| r.map_err(Into::into)))
                    }
                    Err(panic) => {
                        crate::logs::error_limited!(
                            panic = crate::logs::panic_message(&*panic),
                            "response body panicked; closing the connection"
                        );
                        Poll::Ready(Some(Err("response body panicked".into())))
                    }
                }
            }
            HopBodyProj::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            HopBody::Inner { body } => body.is_end_stream(),
            HopBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            HopBody::Inner { body } => body.size_hint(),
            HopBody::Empty => SizeHint::with_exact(0),
        }
    }
}
