//! systemd notifications: READY once listening, STATUS lines saying what
//! the agent does, WATCHDOG pings at half of `WATCHDOG_USEC`. Without
//! systemd (`NOTIFY_SOCKET` unset) every call is a no-op.
//!
//! Sent with `MSG_DONTWAIT` on one socket kept open: the sd-notify crate
//! sends blocking, so a manager that stops reading the socket (its queue
//! holds ~10 datagrams) would freeze the whole agent loop on the next ping.
//! A notification that does not fit is dropped and counted; the loop goes on.

use rustix::fd::OwnedFd;
use rustix::net::{self as rnet, AddressFamily, SendFlags, SocketAddrUnix, SocketFlags, SocketType};
use std::time::{Duration, Instant};

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
    /// Ping interval (half the watchdog timeout), if the watchdog is on.
    interval: Option<Duration>,
    last_ping: Option<Instant>,
    last_status: String,
    pub pings: u64,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let target = Target::from_env();
        let interval = if target.is_some() { sd_notify::watchdog_enabled().map(|d| d / 2) } else { None };
        Notifier { target, dropped: 0, interval, last_ping: None, last_status: String::new(), pings: 0 }
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

    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.interval
    }

    pub fn ready(&mut self) {
        if let Err(e) = self.send("READY=1") {
            log::warn!("sd_notify READY: {e}");
        }
        self.ping();
    }

    pub fn status(&mut self, s: &str) {
        if self.target.is_some() && s != self.last_status {
            // One line: systemd reads STATUS= up to the newline.
            let _ = self.send(&format!("STATUS={}", crate::text::clip(s, 200)));
            self.last_status = s.to_owned();
        }
    }

    fn ping(&mut self) {
        if self.interval.is_some() {
            let _ = self.send("WATCHDOG=1");
            self.pings += 1;
        }
        self.last_ping = Some(Instant::now());
    }

    /// Pings if half the watchdog period has passed since the last ping.
    pub fn ping_if_due(&mut self) {
        if let Some(iv) = self.interval {
            if self.last_ping.is_none_or(|t| t.elapsed() >= iv) {
                self.ping();
            }
        }
    }

    /// How long the loop may sleep before the next ping is due.
    pub fn until_due(&self) -> Option<Duration> {
        let iv = self.interval?;
        Some(match self.last_ping {
            Some(t) => iv.saturating_sub(t.elapsed()),
            None => Duration::ZERO,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

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
            interval: Some(Duration::ZERO),
            last_ping: None,
            last_status: String::new(),
            pings: 0,
        };
        // Far more than the socket's queue holds (net.unix.max_dgram_qlen).
        for _ in 0..10_000 {
            n.ping();
        }
        assert_eq!(n.pings, 10_000);
        assert!(n.dropped > 0, "the queue filled and the rest was dropped, not waited for");
        let mut buf = [0u8; 64];
        let got = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..got], b"WATCHDOG=1");
    }
}
