//! What a poller thread offers the connections on it, below the connections themselves: keyed
//! wakers, the local run queue and the cross-thread wake queue ([`wake`]), the timer heap
//! ([`timer`]), local tasks ([`tasks`]), and what the pollers share to spread connections over
//! themselves ([`balance`]). Nothing here knows what a
//! connection is; the poller (`crate::reactor`) owns one of each and the connections
//! (`crate::conn`) use them.

pub(crate) mod balance;
pub(crate) mod tasks;
pub(crate) mod timer;
pub(crate) mod wake;
