//! Read handlers: raw TCP protocols (and hijacked HTTP connections) served on the event loop
//! with callbacks, netpoll's `OnRequest` for Rust.
//!
//! A [`Handler`] is called when bytes arrive ([`Handler::on_read`] gets every unread byte and
//! consumes what it can parse), when the connection can take more output
//! ([`Handler::on_writable`]), at end of input, at shutdown and at close. It never blocks, and no
//! task or thread is spent per connection under the reactor backend. Output goes into a bounded
//! buffer that the loop flushes; a [`ConnHandle`] writes to or closes the connection from any
//! thread. Buffers are taken when bytes arrive or output is queued and given back when they are
//! empty, so an idle connection holds none.
//!
//! ```
//! use bytes::BytesMut;
//! use hop::tcp::{Conn, Handler};
//!
//! struct Echo;
//!
//! impl Handler for Echo {
//!     fn on_read(&mut self, conn: &mut Conn, input: &mut BytesMut) -> std::io::Result<()> {
//!         let n = input.len().min(conn.write_capacity());
//!         conn.write(&input.split_to(n))?;
//!         Ok(())
//!     }
//! }
//!
//! # fn main() -> std::io::Result<()> {
//! let listener = std::net::TcpListener::bind("127.0.0.1:0")?; // any free port
//! let serve = hop::tcp::serve(listener, |_conn: hop::IncomingStream<'_>| Echo);
//! # let (addr, handle) = (serve.local_addr()?, serve.handle());
//! # let client = std::thread::spawn(move || {
//! #     use std::io::{Read, Write};
//! #     let mut s = std::net::TcpStream::connect(addr).unwrap();
//! #     s.write_all(b"hello, loop").unwrap();
//! #     let mut echo = [0; 11];
//! #     s.read_exact(&mut echo).unwrap();
//! #     drop(s);
//! #     handle.shutdown();
//! #     echo
//! # });
//! serve.run()
//! # ?;
//! # assert_eq!(&client.join().unwrap(), b"hello, loop");
//! # Ok(())
//! # }
//! ```
//!
//! Under the tokio backend the same handlers run with one tokio task per connection.

pub use crate::handler::{CloseReason, Conn, ConnHandle, Handler, WriteError};
pub use crate::server::serve_tcp as serve;
