//! hop-load: the load generator behind `benches/compare.sh`.
//!
//! Every mode is an async function that returns its result as a JSON object (the binary prints
//! it as one line with `--json`, or as text). Modes that take a `server_pid` also sample the
//! server from /proc (CPU, RSS, threads).

pub mod chart;
pub mod h2c;
pub mod modes;
pub mod paced;
pub mod tls;
pub mod util;

pub use modes::*;
