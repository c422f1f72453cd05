//! systemd notifications: READY once listening, STATUS lines saying what
//! the agent does, WATCHDOG pings at half of `WATCHDOG_USEC`. Without
//! systemd (`NOTIFY_SOCKET` unset) every call is a no-op.

use std::time::{Duration, Instant};

pub struct Notifier {
    enabled: bool,
    /// Ping interval (half the watchdog timeout), if the watchdog is on.
    interval: Option<Duration>,
    last_ping: Option<Instant>,
    last_status: String,
    pub pings: u64,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        let interval = if enabled { sd_notify::watchdog_enabled().map(|d| d / 2) } else { None };
        Notifier { enabled, interval, last_ping: None, last_status: String::new(), pings: 0 }
    }

    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.interval
    }

    pub fn ready(&mut self) {
        if self.enabled {
            if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
                log::warn!("sd_notify READY: {e}");
            }
        }
        self.ping();
    }

    pub fn status(&mut self, s: &str) {
        if self.enabled && s != self.last_status {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(s)]);
            self.last_status = s.to_owned();
        }
    }

    fn ping(&mut self) {
        if self.interval.is_some() {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
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
