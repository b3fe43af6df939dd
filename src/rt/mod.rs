//! What a poller thread offers the connections on it, below the connections themselves: keyed
//! wakers, the local run queue and the cross-thread wake queue ([`wake`]), the timer heap
//! ([`timer`]) and local tasks ([`tasks`]). Nothing here knows what a
//! connection is; the poller (`crate::reactor`) owns one of each and the connections
//! (`crate::conn`) use them.

pub(crate) mod tasks;
pub(crate) mod timer;
pub(crate) mod wake;
