//! The agent's repeating checks as pure rules: when the poll of
//! `poll_url`, the channel/keys follow and the Pushgateway push are next
//! due, with jitter so a fleet started together spreads out. The loop owns
//! the clock and passes the time in, so every rule here is tested without
//! sleeping.
//!
//! ```text
//! next = now + interval + jitter          jitter ∈ [0, interval/10] ms, xorshift64
//! due(now)  ⇔  next is unset  ∨  now ≥ next
//! open_at(t): next = min(next, t)         (a channel wave opening earlier)
//! ```

use std::time::{Duration, Instant};

/// Longest delay a schedule adds to an instant. The config bounds every
/// interval far below this (`config::BOUNDS`); the cap keeps `Instant +
/// Duration` from overflowing whatever a caller passes.
const FAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// `now + d`, never panicking: `d` is capped at [`FAR`].
pub fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d.min(FAR)).unwrap_or(now)
}

/// A xorshift64 generator for schedule jitter. Not for secrets: it only
/// has to differ between devices (seeded from the time and the pid).
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    /// Zero is xorshift's fixed point (no jitter ever), so the low bit is set.
    pub fn new(seed: u64) -> Jitter {
        Jitter(seed | 1)
    }

    /// The next pseudo-random delay in `[0, interval / 10]`, in whole ms.
    pub fn next(&mut self, interval: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let tenth = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX) / 10;
        Duration::from_millis(self.0 % tenth.saturating_add(1))
    }
}

/// When a repeating check is next due. Unset means due now (a check not
/// yet run since start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Schedule {
    next: Option<Instant>,
}

impl Schedule {
    /// Due at once (the first check at start).
    pub fn now() -> Schedule {
        Schedule { next: None }
    }

    pub fn due(&self, now: Instant) -> bool {
        self.next.is_none_or(|t| now >= t)
    }

    /// The check ran at `now`: the next is one interval plus jitter later.
    pub fn ran(&mut self, now: Instant, interval: Duration, jitter: &mut Jitter) {
        let j = jitter.next(interval);
        self.next = Some(after(after(now, interval), j));
    }

    /// Something opens at `at` (a channel's wave): check then if that is
    /// sooner than the schedule says.
    pub fn open_at(&mut self, at: Instant) {
        self.next = Some(self.next.map_or(at, |n| n.min(at)));
    }

    /// When the check is next due (None: now).
    pub fn next(&self) -> Option<Instant> {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_a_tenth_of_the_interval_and_varies() {
        let mut j = Jitter::new(0);
        let iv = Duration::from_secs(300);
        let seen: Vec<Duration> = (0..1000).map(|_| j.next(iv)).collect();
        assert!(seen.iter().all(|d| *d <= iv / 10));
        let distinct: std::collections::BTreeSet<_> = seen.iter().collect();
        assert!(distinct.len() > 900, "a zero seed still jitters: {} distinct", distinct.len());
        // Intervals under 10 ms have no room for jitter; none overflow.
        assert_eq!(Jitter::new(5).next(Duration::from_millis(9)), Duration::ZERO);
        assert!(Jitter::new(5).next(Duration::MAX) <= Duration::MAX / 10);
    }

    #[test]
    fn two_devices_seeded_apart_spread_out() {
        let iv = Duration::from_secs(300);
        let (mut a, mut b) = (Jitter::new(1_700_000_000 ^ (100 << 20)), Jitter::new(1_700_000_000 ^ (101 << 20)));
        assert!((0..10).any(|_| a.next(iv) != b.next(iv)));
    }

    #[test]
    fn a_schedule_is_due_at_start_then_after_its_interval_and_jitter() {
        let t0 = Instant::now();
        let iv = Duration::from_secs(60);
        let mut s = Schedule::now();
        assert!(s.due(t0), "due at start");
        s.ran(t0, iv, &mut Jitter::new(42));
        let next = s.next().unwrap();
        assert!(next >= t0 + iv && next <= t0 + iv + iv / 10, "{:?}", next - t0);
        assert!(!s.due(t0 + iv - Duration::from_millis(1)));
        assert!(!s.due(next - Duration::from_millis(1)));
        assert!(s.due(next), "due exactly at its time");
        assert!(s.due(next + iv));
    }

    #[test]
    fn an_opening_brings_the_check_forward_never_back() {
        let t0 = Instant::now();
        let mut s = Schedule::now();
        s.ran(t0, Duration::from_secs(300), &mut Jitter::new(1));
        let scheduled = s.next().unwrap();
        s.open_at(t0 + Duration::from_secs(10));
        assert_eq!(s.next(), Some(t0 + Duration::from_secs(10)));
        s.open_at(t0 + Duration::from_secs(400));
        assert_eq!(s.next(), Some(t0 + Duration::from_secs(10)), "a later opening changes nothing");
        assert!(scheduled > t0 + Duration::from_secs(10));
        let mut fresh = Schedule::now();
        fresh.open_at(t0 + Duration::from_secs(5));
        assert!(!fresh.due(t0) && fresh.due(t0 + Duration::from_secs(5)));
    }

    #[test]
    fn huge_intervals_do_not_overflow() {
        let t0 = Instant::now();
        let mut s = Schedule::now();
        s.ran(t0, Duration::MAX, &mut Jitter::new(3));
        assert!(!s.due(t0 + Duration::from_secs(3600)));
        assert_eq!(after(t0, Duration::MAX), after(t0, FAR));
    }
}
