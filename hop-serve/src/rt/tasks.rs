//! The poller's local tasks: futures spawned on a poller thread, kept in its slab beside the
//! connections and woken by the same keyed wakers. They never leave their poller, so they need
//! not be `Send`. A task may belong to a connection (its owner): it is dropped when that
//! connection closes, as hyper's HTTP/2 streams are when their connection goes. Graceful
//! shutdown waits for tasks without an owner until the drain timeout, then drops them.

use std::any::Any;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};

use super::wake::{self, Key};

/// A spawned future and the connection it belongs to.
pub(crate) struct Task {
    future: Pin<Box<dyn Future<Output = ()>>>,
    /// The connection the task belongs to, if any.
    pub(crate) owner: Option<Key>,
}

impl Task {
    /// Polls the task with its own waker: `Ready` once it has finished, or panicked (the
    /// panic is handed back for the poller to log and count).
    ///
    /// What it spawns meanwhile through [`LocalExec`] belongs to its owner too (hyper's HTTP/2
    /// stream task spawns the task that sends a CONNECT tunnel's data): under the key the owner
    /// has on this poller, which, for a connection handed over from another poller, is not the
    /// one its executor was made with.
    pub(crate) fn poll(&mut self, key: Key) -> Poll<Result<(), Box<dyn Any + Send>>> {
        let waker = key.waker();
        let mut cx = Context::from_waker(&waker);
        let future = &mut self.future;
        let mut poll = || catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(&mut cx)));
        let polled = match self.owner {
            Some(owner) => driving(owner, poll),
            None => poll(),
        };
        match polled {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(())) => Poll::Ready(Ok(())),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// Spawns `future` on this thread's poller, belonging to the connection `owner` if given; the
/// future is handed back if no poller runs on this thread. The task is first polled at the
/// poller's next turn.
pub(crate) fn spawn_local<F>(future: F, owner: Option<Key>) -> Result<(), F>
where
    F: Future<Output = ()> + 'static,
{
    if wake::current_poller().is_none() {
        return Err(future);
    }
    SPAWNED.with(|s| {
        s.borrow_mut().push(Task {
            future: Box::pin(future),
            owner,
        })
    });
    Ok(())
}

thread_local! {
    /// Tasks spawned on this thread's poller that it has not taken yet.
    static SPAWNED: std::cell::RefCell<Vec<Task>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A response body on this thread produced a large chunk since [`take_bulk`] last looked.
    static BULK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A chunk at least this large makes the task that produced it hand its connection back to be
/// driven at once (see [`note_bulk`]).
pub(crate) const BULK_CHUNK: usize = 16 * 1024;

/// Notes that a response body produced a chunk of [`BULK_CHUNK`] or more. The poller then
/// writes it out before it runs the next task: a connection's streams that send large bodies
/// to a peer that reads slowly finish one after another, rather than each holding a part of its
/// body (and its buffers) while their frames take turns. Small responses keep sharing writes.
pub(crate) fn note_bulk() {
    BULK.with(|b| b.set(true));
}

/// Whether a large chunk was produced since the last call; clears the note.
pub(crate) fn take_bulk() -> bool {
    BULK.with(|b| b.replace(false))
}

/// Whether tasks were spawned on this thread since [`take_spawned`] last took them (an HTTP/2
/// connection whose drive started streams is not between streams, though its entry owns no
/// task yet).
pub(crate) fn spawned_pending() -> bool {
    SPAWNED.with(|s| !s.borrow().is_empty())
}

/// Moves the tasks spawned on this thread since the last call into `into`.
pub(crate) fn take_spawned(into: &mut Vec<Task>) {
    SPAWNED.with(|s| into.append(&mut s.borrow_mut()));
}

/// hyper's executor on a poller (`hyper::rt::Executor`): each future becomes a local task that
/// belongs to the connection being driven ([`driving`]), or to the owner of the task being
/// polled ([`Task::poll`]), or else to the one the executor was made for (if it is still on
/// this poller).
///
/// HTTP/2 connections are its user: each stream is a task that belongs to its connection. hyper
/// spawns a stream while its connection is polled, so a connection handed to another poller
/// (between streams) has its next streams spawned there, under the key it has there.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LocalExec {
    owner: Option<Key>,
}

thread_local! {
    /// The connection whose hyper state this poller thread is polling, if any (see [`driving`]).
    static DRIVING: std::cell::Cell<Option<Key>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` (a poll of connection `key`'s hyper state) with `key` as the owner of the tasks
/// hyper spawns meanwhile. `f` must not unwind (the caller catches panics inside it).
pub(crate) fn driving<R>(key: Key, f: impl FnOnce() -> R) -> R {
    let outer = DRIVING.with(|d| d.replace(Some(key)));
    let r = f();
    DRIVING.with(|d| d.set(outer));
    r
}

impl LocalExec {
    /// An executor whose tasks belong to connection `owner`.
    pub(crate) fn new(owner: Option<Key>) -> Self {
        LocalExec { owner }
    }
}

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future<Output = ()> + 'static,
{
    fn execute(&self, future: F) {
        // The connection or owned task being polled; else the one the executor was made for,
        // if it is still on this poller (a connection handed to another poller has another key
        // there: its task would be dropped as an orphan, so it runs unowned instead).
        let owner = DRIVING.with(|d| d.get()).or_else(|| {
            self.owner
                .filter(|o| wake::current_poller() == Some(o.poller()))
        });
        if spawn_local(future, owner).is_err() {
            // hyper calls its executor while the connection is polled, which is on its poller.
            tracing::error!("a poller's executor was used off its poller; the future is dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::rc::Rc;
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::Full;
    use hyper::body::Incoming;
    use hyper::rt::Executor;

    use super::*;
    use crate::conn::current;

    /// Says `what` when dropped.
    struct Signal(mpsc::Sender<&'static str>, &'static str);

    impl Drop for Signal {
        fn drop(&mut self) {
            let _ = self.0.send(self.1);
        }
    }

    fn on_poller() -> &'static str {
        match std::thread::current().name() {
            Some(n) if n.starts_with("hop-poller") => "ran on the poller",
            _ => "ran elsewhere",
        }
    }

    /// Sends a request for `path` and reads the response's end.
    fn get(stream: &mut TcpStream, path: &str) {
        write!(stream, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"ok") {
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn local_tasks_run_on_their_poller_and_go_with_their_connection() {
        let (tx, rx) = mpsc::channel::<&'static str>();
        let tx = Arc::new(Mutex::new(tx));
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let tx = tx.lock().unwrap().clone();
            let owner = current::key();
            match req.uri().path() {
                "/sleep" => {
                    // Not `Send`: it never leaves its poller.
                    let local = Rc::new(tx);
                    let task = async move {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        let _ = local.send(on_poller());
                    };
                    assert!(spawn_local(task, owner).is_ok());
                }
                "/forever" => {
                    let signal = Signal(tx, "dropped with its connection");
                    let task = async move {
                        let _signal = signal;
                        std::future::pending::<()>().await
                    };
                    assert!(spawn_local(task, owner).is_ok());
                }
                "/exec" => LocalExec::new(owner).execute(async move {
                    let _ = tx.send("executed");
                }),
                "/panic" => {
                    let task = async { panic!("a local task panics") };
                    assert!(spawn_local(task, None).is_ok());
                }
                _ => {}
            }
            async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok")))) }
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let serve = crate::Server::builder()
            .backend(crate::Backend::Reactor)
            .pollers(1)
            .serve(listener, svc);
        let handle = serve.handle();
        let server = std::thread::spawn(move || serve.run());
        let wait = Duration::from_secs(10);

        let mut c = TcpStream::connect(addr).unwrap();
        get(&mut c, "/sleep");
        assert_eq!(rx.recv_timeout(wait), Ok("ran on the poller"));
        get(&mut c, "/exec");
        assert_eq!(rx.recv_timeout(wait), Ok("executed"));
        get(&mut c, "/forever");
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        drop(c);
        assert_eq!(rx.recv_timeout(wait), Ok("dropped with its connection"));

        let mut c = TcpStream::connect(addr).unwrap();
        get(&mut c, "/panic");
        let t0 = std::time::Instant::now();
        while handle.stats().panics == 0 {
            assert!(t0.elapsed() < wait, "the task's panic was not counted");
            std::thread::sleep(Duration::from_millis(5));
        }
        // The poller, and the connection that spawned the task, serve on.
        get(&mut c, "/sleep");
        assert_eq!(rx.recv_timeout(wait), Ok("ran on the poller"));
        // A task that outlives its connection's requests is not a connection.
        assert_eq!(handle.stats().active, 1);

        handle.shutdown();
        server.join().unwrap().unwrap();
    }
}
