//! systemd notifications: READY once listening, STATUS lines saying what
//! the agent does, WATCHDOG pings at half of `WATCHDOG_USEC`. Without
//! systemd (`NOTIFY_SOCKET` unset) every call is a no-op.
//!
//! Sent with `MSG_DONTWAIT` on one socket kept open: the sd-notify crate
//! sends blocking, so a manager that stops reading the socket (its queue
//! holds ~10 datagrams) would freeze the whole agent loop on the next ping.
//! A notification that does not fit is dropped and counted; the loop goes on.

use super::schedule::Every;
use rustix::fd::OwnedFd;
use rustix::net::{self as rnet, AddressFamily, SendFlags, SocketAddrUnix, SocketFlags, SocketType};
use std::time::Instant;

/// Where notifications go: `NOTIFY_SOCKET`, a path or `@abstract` name.
struct Target {
    fd: OwnedFd,
    addr: SocketAddrUnix,
}

impl Target {
    fn from_env() -> Option<Target> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddrUnix::new_abstract_name(name),
            None => SocketAddrUnix::new(bytes),
        };
        let addr = addr.map_err(|e| log::warn!("NOTIFY_SOCKET: {e}")).ok()?;
        let fd = rnet::socket_with(AddressFamily::UNIX, SocketType::DGRAM, SocketFlags::CLOEXEC, None)
            .map_err(|e| log::warn!("NOTIFY_SOCKET: socket: {e}"))
            .ok()?;
        Some(Target { fd, addr })
    }

    fn send(&self, msg: &str) -> rustix::io::Result<()> {
        rnet::sendto(&self.fd, msg.as_bytes(), SendFlags::DONTWAIT | SendFlags::NOSIGNAL, &self.addr).map(|_| ())
    }
}

pub struct Notifier {
    target: Option<Target>,
    /// Notifications dropped because the manager's queue was full.
    pub dropped: u64,
    /// The ping schedule (half the watchdog timeout), if the watchdog is on.
    watchdog: Option<Every>,
    last_status: String,
    pub pings: u64,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let target = Target::from_env();
        let interval = if target.is_some() { sd_notify::watchdog_enabled().map(|d| d / 2) } else { None };
        Notifier { target, dropped: 0, watchdog: interval.map(Every::new), last_status: String::new(), pings: 0 }
    }

    /// Sends one notification without ever blocking.
    fn send(&mut self, msg: &str) -> Result<(), String> {
        let Some(t) = &self.target else { return Ok(()) };
        match t.send(msg) {
            Ok(()) => Ok(()),
            Err(e) => {
                if e == rustix::io::Errno::AGAIN {
                    self.dropped += 1;
                }
                Err(e.to_string())
            }
        }
    }

    pub fn ready(&mut self, now: Instant) {
        if let Err(e) = self.send("READY=1") {
            log::warn!("sd_notify READY: {e}");
        }
        self.ping(now);
    }

    pub fn status(&mut self, s: &str) {
        if self.target.is_some() && s != self.last_status {
            // One line: systemd reads STATUS= up to the newline.
            let _ = self.send(&format!("STATUS={}", crate::text::clip(s, 200)));
            self.last_status = s.to_owned();
        }
    }

    fn ping(&mut self, now: Instant) {
        if self.watchdog.is_some() {
            let _ = self.send("WATCHDOG=1");
            self.pings += 1;
        }
        if let Some(w) = self.watchdog.as_mut() {
            w.done(now);
        }
    }

    /// Pings if half the watchdog period has passed since the last ping.
    pub fn ping_if_due(&mut self, now: Instant) {
        if self.watchdog.is_some_and(|w| w.due(now)) {
            self.ping(now);
        }
    }

    /// When the next ping is due (None: no watchdog).
    pub fn next_ping(&self, now: Instant) -> Option<Instant> {
        self.watchdog.map(|w| super::schedule::after(now, w.until(now)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;

    #[test]
    fn the_watchdog_is_pinged_once_per_half_period() {
        let half = Duration::from_secs(1);
        let mut n = Notifier {
            target: None,
            dropped: 0,
            watchdog: Some(Every::new(half)),
            last_status: String::new(),
            pings: 0,
        };
        let t0 = Instant::now();
        assert_eq!(n.next_ping(t0), Some(t0), "due at once");
        n.ready(t0);
        assert_eq!(n.pings, 1);
        n.ping_if_due(t0 + half - Duration::from_millis(1));
        assert_eq!(n.pings, 1);
        assert_eq!(n.next_ping(t0 + Duration::from_millis(400)), Some(t0 + half));
        n.ping_if_due(t0 + half);
        assert_eq!(n.pings, 2);
        let mut off = Notifier { watchdog: None, ..n };
        off.ping_if_due(t0 + 10 * half);
        assert_eq!((off.pings, off.next_ping(t0)), (2, None), "no watchdog: no pings, no wake-ups");
    }

    #[test]
    fn a_manager_that_stops_reading_never_blocks_the_sender() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&path).unwrap();
        let target = Target {
            fd: rnet::socket(AddressFamily::UNIX, SocketType::DGRAM, None).unwrap(),
            addr: SocketAddrUnix::new(path.as_path()).unwrap(),
        };
        let mut n = Notifier {
            target: Some(target),
            dropped: 0,
            watchdog: Some(Every::new(Duration::ZERO)),
            last_status: String::new(),
            pings: 0,
        };
        // Far more than the socket's queue holds (net.unix.max_dgram_qlen).
        for _ in 0..10_000 {
            n.ping(Instant::now());
        }
        assert_eq!(n.pings, 10_000);
        assert!(n.dropped > 0, "the queue filled and the rest was dropped, not waited for");
        let mut buf = [0u8; 64];
        let got = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..got], b"WATCHDOG=1");
    }
}
