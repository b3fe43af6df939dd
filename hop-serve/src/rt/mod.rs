//! What a poller thread offers the connections on it, below the connections themselves: keyed
//! wakers, the local run queue and the cross-thread wake queue ([`wake`]), the mailbox that
//! letters for read-handler connections wait in ([`mail`]: one per poller, in its
//! `wake::Remote`, or a connection's own when it runs as a task), the timer heap ([`timer`]),
//! local tasks ([`tasks`]), and what the pollers share to spread connections over themselves
//! ([`balance`]). Nothing here knows what a connection is; the poller (`crate::reactor`) owns
//! one of each and the connections (`crate::conn`, `crate::handler`) use them.

pub(crate) mod balance;
pub(crate) mod mail;
pub(crate) mod tasks;
pub(crate) mod timer;
pub(crate) mod wake;
