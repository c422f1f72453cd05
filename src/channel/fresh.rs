//! Freshness: what time it is, for a device that may have no real-time
//! clock.
//!
//! ```text
//! floor         = max(BUILD_FLOOR, config clock_floor?, persisted floor)
//! effective_now = max(wall clock, floor)
//! on a verified document: floor = max(floor, issued)       ; persisted
//! expired       = effective_now >= expires
//! ```
//! A board without an RTC boots at 1970 (or at its last shutdown, with
//! systemd's timesyncd clock file) until NTP answers, if it ever does. Left
//! at 1970, every document would be unexpired, and a captured old one could
//! be replayed forever. The floor fixes that:
//!
//! - Only a signed `issued` advances it. It is time an admin's key vouches
//!   for (the admin side refuses to sign one more than an hour ahead of its
//!   clock, [`super::MAX_ISSUED_AHEAD_SECS`]); the wall clock never
//!   advances it, because a clock glitch to 2099 would otherwise be
//!   persisted and refuse every real document until 2099. No maximum step:
//!   a device shelved for a year must accept the first document it sees
//!   after, and the step is as trustworthy as the key that signed it.
//! - Once a device has verified a document issued at T, no document that
//!   expired before T is accepted again, whatever its clock says.
//! - What remains: a device that has never verified a document, with no
//!   clock, accepts a captured document that had not expired at its floor.
//!   The floor therefore starts at build time: [`BUILD_FLOOR`] (when this
//!   source was released) and, tighter, the config's `clock_floor`, which
//!   the NixOS module sets from the configuration's own date (a flake's
//!   `self.lastModified`). Files in the Nix store all have mtime 1, so no
//!   file date on the device can serve. Such a replay can only offer a
//!   release that was current within [`super::MAX_VALIDITY_SECS`] of the
//!   image's build, signed for the device's channel — a downgrade at worst
//!   to what the image could already have shipped.

/// 2026-12-01T00:00:00Z, before this code was written: no device running
/// it believes an earlier time. Raise it with each release.
pub const BUILD_FLOOR: u64 = 1_796_083_200;

/// The device's idea of the earliest time it can be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    floor: u64,
}

impl Clock {
    /// `persisted` is the floor saved by an earlier run (0 if none),
    /// `config` the config's `clock_floor`.
    pub fn new(persisted: u64, config: Option<u64>) -> Clock {
        Clock { floor: BUILD_FLOOR.max(persisted).max(config.unwrap_or(0)) }
    }

    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// The time decisions use: the wall clock, never earlier than the floor.
    pub fn now(&self, wall: u64) -> u64 {
        wall.max(self.floor)
    }

    /// Takes a verified document's `issued` as a lower bound for the time.
    /// Returns whether the floor moved (and must be persisted).
    pub fn observe(&mut self, issued: u64) -> bool {
        let moved = issued > self.floor;
        self.floor = self.floor.max(issued);
        moved
    }
}

/// Whether a document valid until `expires` has expired at `now` (the
/// effective time, [`Clock::now`]). `expires` is the first second it is no
/// longer valid.
pub fn expired(expires: u64, now: u64) -> bool {
    now >= expires
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    #[test]
    fn floor_is_the_largest_of_build_config_and_persisted() {
        assert_eq!(Clock::new(0, None).floor(), BUILD_FLOOR);
        assert_eq!(Clock::new(BUILD_FLOOR + 5, Some(BUILD_FLOOR + 3)).floor(), BUILD_FLOOR + 5);
        assert_eq!(Clock::new(1, Some(BUILD_FLOOR + 3)).floor(), BUILD_FLOOR + 3);
        // BUILD_FLOOR is a date in the past of this code's tests, and not
        // absurdly far.
        assert_eq!(BUILD_FLOOR % DAY, 0);
    }

    #[test]
    fn a_1970_clock_reads_as_the_floor_and_a_good_clock_as_itself() {
        let c = Clock::new(0, None);
        assert_eq!(c.now(0), BUILD_FLOOR);
        assert_eq!(c.now(BUILD_FLOOR + 10), BUILD_FLOOR + 10);
    }

    #[test]
    fn only_newer_documents_move_the_floor() {
        let mut c = Clock::new(0, None);
        assert!(c.observe(BUILD_FLOOR + DAY));
        assert!(!c.observe(BUILD_FLOOR + DAY));
        assert!(!c.observe(BUILD_FLOOR));
        assert_eq!(c.floor(), BUILD_FLOOR + DAY);
        // A year's jump is taken whole (a shelved device catching up).
        assert!(c.observe(BUILD_FLOOR + 365 * DAY));
        assert_eq!(c.now(0), BUILD_FLOOR + 365 * DAY);
    }

    /// The replay the floor exists for: a device whose clock reset to 1970
    /// is offered a captured document that expired long ago.
    #[test]
    fn replay_to_a_reset_clock_is_expired_after_one_newer_document() {
        let old_issued = BUILD_FLOOR + 10 * DAY;
        let old_expires = old_issued + 7 * DAY;
        let mut c = Clock::new(0, None);
        // Never having seen anything newer, at 1970 it is unexpired: the
        // documented remaining hole, bounded by the build floor.
        assert!(!expired(old_expires, c.now(0)));
        c.observe(BUILD_FLOOR + 30 * DAY);
        assert!(expired(old_expires, c.now(0)));
        // Persisted and restored (reboot, clock back at 1970).
        let c = Clock::new(c.floor(), None);
        assert!(expired(old_expires, c.now(0)));
        // A config floor after the old document's expiry closes the hole
        // even for a device that never saw a document.
        assert!(expired(old_expires, Clock::new(0, Some(old_expires)).now(0)));
    }

    #[test]
    fn expiry_is_exclusive() {
        assert!(!expired(100, 99));
        assert!(expired(100, 100));
        assert!(expired(100, u64::MAX));
    }
}
