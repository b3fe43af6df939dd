//! The TCP options hop sets on the sockets it serves: on each listening socket (`TCP_FASTOPEN`,
//! `TCP_DEFER_ACCEPT`) and on each accepted connection (keepalive time, interval and count).
//!
//! [`TcpTuning`] holds what the [`Builder`](crate::Builder) was given, already clamped into the
//! ranges Linux accepts, so that applying it can neither fail loudly nor overflow. Both backends
//! apply it the same way; an option the kernel refuses is logged once per listener at debug
//! level and otherwise ignored (as with `TCP_NODELAY`), since a server that cannot tune a socket
//! can still serve it.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

/// Linux keeps `TCP_KEEPIDLE` and `TCP_KEEPINTVL` in whole seconds, 1 to 32,767.
const MAX_KEEPALIVE_SECS: u64 = 32_767;
/// Linux's limit for `TCP_KEEPCNT`.
const MAX_KEEPALIVE_RETRIES: u32 = 127;

/// TCP options for listening and accepted sockets; all off by default (the kernel's defaults).
#[derive(Clone, Debug, Default)]
pub(crate) struct TcpTuning {
    /// `SO_KEEPALIVE` with `TCP_KEEPIDLE`: probes after this much silence.
    pub(crate) keepalive_time: Option<Duration>,
    /// `TCP_KEEPINTVL`: between unanswered probes.
    pub(crate) keepalive_interval: Option<Duration>,
    /// `TCP_KEEPCNT`: unanswered probes before the kernel gives the connection up.
    pub(crate) keepalive_retries: Option<u32>,
    /// `TCP_FASTOPEN` on the listener: how many pending fast-open requests it may hold.
    pub(crate) fastopen: Option<u32>,
    /// `TCP_DEFER_ACCEPT` on the listener: a connection is handed to `accept` only once it has
    /// sent data, or after about this long.
    pub(crate) defer_accept: Option<Duration>,
}

/// A duration as whole seconds in `1..=max` (zero rounds up: the kernel takes no zero).
pub(crate) fn clamp_secs(t: Duration, max: u64) -> Duration {
    Duration::from_secs(t.as_secs().clamp(1, max))
}

impl TcpTuning {
    pub(crate) fn set_keepalive_time(&mut self, t: Option<Duration>) {
        self.keepalive_time = t.map(|t| clamp_secs(t, MAX_KEEPALIVE_SECS));
    }

    pub(crate) fn set_keepalive_interval(&mut self, t: Option<Duration>) {
        self.keepalive_interval = t.map(|t| clamp_secs(t, MAX_KEEPALIVE_SECS));
    }

    pub(crate) fn set_keepalive_retries(&mut self, n: Option<u32>) {
        self.keepalive_retries = n.map(|n| n.clamp(1, MAX_KEEPALIVE_RETRIES));
    }

    pub(crate) fn set_fastopen(&mut self, queue: Option<u32>) {
        // The kernel reads an int; zero turns it off.
        self.fastopen = queue.filter(|&q| q > 0).map(|q| q.min(i32::MAX as u32));
    }

    pub(crate) fn set_defer_accept(&mut self, t: Option<Duration>) {
        self.defer_accept = t.map(|t| clamp_secs(t, i32::MAX as u64));
    }

    /// What accepted sockets get: `None` when keepalive is not asked for at all.
    pub(crate) fn keepalive(&self) -> Option<TcpKeepalive> {
        if self.keepalive_time.is_none()
            && self.keepalive_interval.is_none()
            && self.keepalive_retries.is_none()
        {
            return None;
        }
        let mut ka = TcpKeepalive::new();
        if let Some(t) = self.keepalive_time {
            ka = ka.with_time(t);
        }
        if let Some(t) = self.keepalive_interval {
            ka = ka.with_interval(t);
        }
        if let Some(n) = self.keepalive_retries {
            ka = ka.with_retries(n);
        }
        Some(ka)
    }

    /// Sets the listening socket's options (each listener of each poller, inherited ones too).
    pub(crate) fn apply_listener(&self, sock: SockRef<'_>) {
        if let Some(q) = self.fastopen {
            if let Err(e) = setsockopt_int(&sock, libc::TCP_FASTOPEN, q as libc::c_int) {
                tracing::debug!(error = %e, "TCP_FASTOPEN refused");
            }
        }
        if let Some(t) = self.defer_accept {
            let secs = t.as_secs().min(i32::MAX as u64) as libc::c_int;
            if let Err(e) = setsockopt_int(&sock, libc::TCP_DEFER_ACCEPT, secs) {
                tracing::debug!(error = %e, "TCP_DEFER_ACCEPT refused");
            }
        }
    }
}

/// Sets an `IPPROTO_TCP` option that takes an int (socket2 has no setter for these two).
fn setsockopt_int(sock: &SockRef<'_>, opt: libc::c_int, value: libc::c_int) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the borrow's life; the option value is a live int whose
    // size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            opt,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_clamped_into_the_kernels_ranges() {
        let mut t = TcpTuning::default();
        assert!(t.keepalive().is_none());
        t.set_keepalive_time(Some(Duration::MAX));
        t.set_keepalive_interval(Some(Duration::ZERO));
        t.set_keepalive_retries(Some(u32::MAX));
        t.set_fastopen(Some(u32::MAX));
        t.set_defer_accept(Some(Duration::MAX));
        assert_eq!(t.keepalive_time, Some(Duration::from_secs(32_767)));
        assert_eq!(t.keepalive_interval, Some(Duration::from_secs(1)));
        assert_eq!(t.keepalive_retries, Some(127));
        assert_eq!(t.fastopen, Some(i32::MAX as u32));
        assert_eq!(t.defer_accept, Some(Duration::from_secs(i32::MAX as u64)));
        assert!(t.keepalive().is_some());
        t.set_fastopen(Some(0));
        assert_eq!(t.fastopen, None);
    }

    #[test]
    fn a_listener_takes_the_options() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut t = TcpTuning::default();
        t.set_fastopen(Some(64));
        t.set_defer_accept(Some(Duration::from_secs(5)));
        t.apply_listener(SockRef::from(&l));
        use std::os::fd::AsRawFd;
        let get = |opt| {
            let mut v: libc::c_int = -1;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: a live int and its size, on an open descriptor.
            let rc = unsafe {
                libc::getsockopt(
                    l.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    opt,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            assert_eq!(rc, 0);
            v
        };
        assert_eq!(get(libc::TCP_FASTOPEN), 64);
        // The kernel keeps it as SYN-ACK retransmits and reports it back rounded up.
        assert!(get(libc::TCP_DEFER_ACCEPT) >= 5);
    }
}
