//! The agent's repeating checks as pure rules: when the poll of
//! `poll_url`, the channel/keys follow and the Pushgateway push are next
//! due, with jitter so a fleet started together spreads out; the rate
//! limits (watchdog pings); and how long the loop may
//! sleep. The loop owns the clock and passes the time in, so every rule
//! here is tested without sleeping.
//!
//! ```text
//! Schedule  next = now + interval + jitter      jitter ∈ [0, interval/10] ms, xorshift64
//!           due(now) ⇔ next unset ∨ now ≥ next
//!           open_at(t): next = min(next, t)     (a channel wave opening earlier)
//! Every     due(now) ⇔ never done ∨ now − last ≥ interval
//! sleep     min(cap, soonest deadline − now)
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

/// A rate limit: something done at most once per interval (the watchdog
/// ping). Never done yet means due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Every {
    interval: Duration,
    last: Option<Instant>,
}

impl Every {
    /// Due at once.
    pub fn new(interval: Duration) -> Every {
        Every { interval, last: None }
    }

    /// Done at `now`: next due one interval later.
    pub fn starting(interval: Duration, now: Instant) -> Every {
        Every { interval, last: Some(now) }
    }

    /// Whether a whole interval has passed since it was last done.
    pub fn due(&self, now: Instant) -> bool {
        self.last.is_none_or(|t| now.saturating_duration_since(t) >= self.interval)
    }

    pub fn done(&mut self, now: Instant) {
        self.last = Some(now);
    }

    /// How long until it is due (zero: now).
    pub fn until(&self, now: Instant) -> Duration {
        self.last.map_or(Duration::ZERO, |t| after(t, self.interval).saturating_duration_since(now))
    }
}

/// How long the loop may sleep at `now`: until the soonest of `deadlines`
/// (one already past: not at all), and never longer than `cap` (results
/// the loop reads from files, such as the switch helper's, have no fd to
/// wake it, so it looks at least every `cap`).
pub fn sleep(now: Instant, cap: Duration, deadlines: impl IntoIterator<Item = Option<Instant>>) -> Duration {
    deadlines.into_iter().flatten().map(|d| d.saturating_duration_since(now)).fold(cap, Duration::min)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_limit_is_due_at_once_then_once_per_interval() {
        let t0 = Instant::now();
        let iv = Duration::from_millis(50);
        let mut e = Every::new(iv);
        assert!(e.due(t0));
        assert_eq!(e.until(t0), Duration::ZERO);
        e.done(t0);
        assert!(!e.due(t0 + iv - Duration::from_millis(1)));
        assert_eq!(e.until(t0 + Duration::from_millis(20)), Duration::from_millis(30));
        assert!(e.due(t0 + iv), "due exactly one interval later");
        assert_eq!(e.until(t0 + 2 * iv), Duration::ZERO);
        let s = Every::starting(iv, t0);
        assert!(!s.due(t0) && s.due(t0 + iv));
        assert!(!s.due(t0.checked_sub(Duration::from_secs(1)).unwrap_or(t0)), "a clock that went back waits");
    }

    #[test]
    fn the_loop_sleeps_until_the_soonest_deadline_within_its_cap() {
        let t0 = Instant::now();
        let cap = Duration::from_millis(500);
        let s = |d: u64| Some(t0 + Duration::from_millis(d));
        assert_eq!(sleep(t0, cap, []), cap);
        assert_eq!(sleep(t0, cap, [None, None]), cap);
        assert_eq!(sleep(t0, cap, [s(900), None]), cap);
        assert_eq!(sleep(t0, cap, [s(900), s(120), s(300)]), Duration::from_millis(120));
        assert_eq!(sleep(t0 + Duration::from_millis(200), cap, [s(120)]), Duration::ZERO, "overdue: do not sleep");
    }

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
