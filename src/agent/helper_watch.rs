//! Watching a request to the switch helper, as pure rules: when a switch
//! request has waited too long for its result (the switch deadline), and
//! when a request is written again (the nudge). The loop reads the files
//! and passes the time in; nothing here sleeps or reads a clock.
//!
//! Why nudge: systemd ignores path changes while the switch service runs,
//! so a request written just as the helper finished may never start it. A
//! request not started after [`NUDGE_AFTER`] is written again (same id: the
//! helper still runs it once), at most once per [`NUDGE_AFTER`]. Health
//! requests have the same race and the same rule ([`written_long_ago`]).
//!
//! The deadline counts from when this process issued (or, after a
//! restart, first saw) the request: it is not persisted, so a restart
//! gives a slow switch its whole time again rather than cutting it short.

use super::schedule::after;
use std::time::{Duration, Instant};

/// How long a request may wait for the helper before it is written again.
pub const NUDGE_AFTER: Duration = Duration::from_secs(5);

/// Whether a request written at `written` has waited longer than
/// [`NUDGE_AFTER`] at `now`.
pub fn written_long_ago(written: Instant, now: Instant) -> bool {
    now.saturating_duration_since(written) > NUDGE_AFTER
}

/// What is due for the pending switch request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Due {
    /// Write the request again (if the helper has not started it).
    pub nudge: bool,
    /// No result within the switch deadline: the switch counts as failed.
    pub timed_out: bool,
}

/// The pending switch request's clock.
#[derive(Debug, Clone, Default)]
pub struct SwitchWatch {
    /// The request watched and when it was issued (or first seen).
    current: Option<(u64, Instant)>,
    /// When a request was last written again (any id).
    last_nudge: Option<Instant>,
}

impl SwitchWatch {
    /// Request `id` was issued at `now`.
    pub fn issued(&mut self, id: u64, now: Instant) {
        self.current = Some((id, now));
    }

    /// Its result came: nothing is watched until the next request.
    pub fn done(&mut self) {
        self.current = None;
    }

    /// What is due at `now` for request `id` waiting for its result within
    /// `timeout`. A request not issued by this process (the agent
    /// restarted mid-switch) is watched from now. A timed-out request is
    /// no longer watched.
    pub fn check(&mut self, id: u64, now: Instant, timeout: Duration) -> Due {
        let since = match self.current {
            Some((sid, t)) if sid == id => t,
            _ => {
                self.current = Some((id, now));
                now
            }
        };
        let waited = now.saturating_duration_since(since);
        let nudge = waited > NUDGE_AFTER && self.last_nudge.is_none_or(|t| written_long_ago(t, now));
        let timed_out = waited > timeout;
        if timed_out {
            self.current = None;
        }
        Due { nudge, timed_out }
    }

    /// A nudge was due and the request not started: it was written again.
    pub fn nudged(&mut self, now: Instant) {
        self.last_nudge = Some(now);
    }

    /// The first millisecond at which the watched request is overdue, for
    /// the loop's sleep. Nudges are not deadlines: one that is due but not
    /// needed (the helper started) stays due, and waking for it would spin.
    pub fn deadline(&self, timeout: Duration) -> Option<Instant> {
        let (_, since) = self.current?;
        Some(after(since, timeout.saturating_add(Duration::from_millis(1))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(900);
    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_request_times_out_only_after_its_deadline() {
        let t0 = Instant::now();
        let mut w = SwitchWatch::default();
        w.issued(1, t0);
        assert!(!w.check(1, t0 + TIMEOUT, TIMEOUT).timed_out, "exactly at the deadline: not yet");
        assert!(w.check(1, t0 + TIMEOUT + MS, TIMEOUT).timed_out);
        // Timed out: not watched any more, so a late check starts over.
        assert_eq!(w.deadline(TIMEOUT), None);
    }

    #[test]
    fn a_request_from_before_a_restart_gets_its_whole_deadline_from_now() {
        let t0 = Instant::now();
        let mut w = SwitchWatch::default();
        assert_eq!(w.check(7, t0, TIMEOUT), Due::default());
        assert!(!w.check(7, t0 + TIMEOUT, TIMEOUT).timed_out);
        assert!(w.check(7, t0 + TIMEOUT + MS, TIMEOUT).timed_out);
    }

    #[test]
    fn a_new_id_restarts_the_clock() {
        let t0 = Instant::now();
        let mut w = SwitchWatch::default();
        w.issued(1, t0);
        let later = t0 + TIMEOUT;
        assert!(!w.check(2, later, TIMEOUT).timed_out, "request 2 is watched from when it was first seen");
        assert!(!w.check(2, later + TIMEOUT, TIMEOUT).timed_out);
        w.done();
        assert_eq!(w.deadline(TIMEOUT), None);
    }

    #[test]
    fn a_nudge_is_due_after_five_seconds_then_at_most_every_five() {
        let t0 = Instant::now();
        let mut w = SwitchWatch::default();
        w.issued(1, t0);
        assert!(!w.check(1, t0 + NUDGE_AFTER, TIMEOUT).nudge);
        let t1 = t0 + NUDGE_AFTER + MS;
        assert!(w.check(1, t1, TIMEOUT).nudge);
        w.nudged(t1);
        assert!(!w.check(1, t1 + NUDGE_AFTER, TIMEOUT).nudge, "not twice within five seconds");
        assert!(w.check(1, t1 + NUDGE_AFTER + MS, TIMEOUT).nudge);
        // Not nudged (the helper had started it): due again at the next check.
        assert!(w.check(1, t1 + NUDGE_AFTER + 2 * MS, TIMEOUT).nudge);
    }

    #[test]
    fn the_deadline_comes_first_when_it_is_shorter_than_a_nudge() {
        let t0 = Instant::now();
        let mut w = SwitchWatch::default();
        w.issued(1, t0);
        let short = Duration::from_secs(1);
        let deadline = w.deadline(short).unwrap();
        assert_eq!(deadline, t0 + short + MS);
        assert!(!w.check(1, deadline - MS, short).timed_out);
        assert_eq!(w.check(1, deadline, short), Due { nudge: false, timed_out: true }, "overdue at its deadline");
    }

    #[test]
    fn a_health_request_is_written_again_after_five_seconds() {
        let t0 = Instant::now();
        assert!(!written_long_ago(t0, t0 + NUDGE_AFTER));
        assert!(written_long_ago(t0, t0 + NUDGE_AFTER + MS));
        assert!(!written_long_ago(t0 + NUDGE_AFTER, t0), "a clock that went back is not a long wait");
    }
}
