//! The health checks after a switch (phase verifying), as pure rules: how
//! often a round runs, whether the network counts, when the health request
//! to the helper is written (again), and the verdict at the deadline. The
//! loop does the I/O (probes a cache, reads and writes the helper's files)
//! and passes the time and what it found in.
//!
//! ```text
//! round every HEALTH_EVERY:
//!   network  passes if reachable now, or if it does not count:
//!            counts ⇔ health_check_network ∧ net-before = "1"
//!   helper   passes if no health units/command are configured, or its
//!            result for our request id has code 0; another code: a new
//!            request next round
//! Healthy    once both passed
//! Unhealthy  at wall time > deadline (the machine's), naming the last failure
//! ```
//!
//! The net-before flag is the file `net-before` in the state dir: "1\n"
//! if a cache (or the poll URL) answered just before the `test` switch,
//! "0\n" if not. Only a network the device had before is a reason to roll
//! back when it is lost (pullnix's lesson); a missing or unreadable flag
//! means it did not.

use super::helper_watch::written_long_ago;
use super::machine::Event;
use super::schedule::after;
use crate::switch::protocol::Step;
use std::time::{Duration, Instant};

/// How often a round of health checks runs.
pub const HEALTH_EVERY: Duration = Duration::from_secs(2);
/// The net-before flag's file, in the state dir.
pub const NET_BEFORE: &str = "net-before";

/// The flag's bytes for whether the network was reachable before the switch.
pub fn net_before_flag(reachable: bool) -> &'static [u8] {
    if reachable {
        b"1\n"
    } else {
        b"0\n"
    }
}

/// Whether the flag file's bytes (None: no file) say the network was
/// reachable before the switch.
pub fn reachable_before(flag: Option<&[u8]>) -> bool {
    flag.is_some_and(|b| b.starts_with(b"1"))
}

/// Whether issuing switch request `step` records the net-before flag: only
/// the first `test` of a deploy, not one already on disk (`pending`: a
/// request or result with this id or a later one exists, so this is a
/// re-issue after a restart and the system may already have switched).
pub fn records_net_before(step: Step, pending: bool) -> bool {
    step == Step::Test && !pending
}

/// What to do about the health request to the helper this round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelperAction {
    /// Nothing configured for the helper to check: it passes.
    None,
    /// Write a new request, with an id above `last` (the highest request or
    /// result id on disk).
    Request,
    /// Write request `id` again (not answered within the nudge time), then
    /// look for its result.
    Rewrite(u64),
    /// Look for the result of request `id`.
    Await(u64),
}

/// Health checks in progress (phase verifying).
#[derive(Debug, Default)]
pub struct HealthRun {
    net_ok: bool,
    helper_ok: bool,
    helper_id: Option<u64>,
    /// When the health request was last written (to write it again).
    helper_written: Option<Instant>,
    next_check: Option<Instant>,
    last_failure: String,
}

impl HealthRun {
    /// Whether a round is due at `now`; if so, the next is [`HEALTH_EVERY`] later.
    pub fn round_due(&mut self, now: Instant) -> bool {
        if self.next_check.is_some_and(|t| now < t) {
            return false;
        }
        self.next_check = Some(after(now, HEALTH_EVERY));
        true
    }

    /// Whether the network still has to be probed this round; a network
    /// that does not count passes at once.
    pub fn network_pending(&mut self, check_network: bool, reachable_before: bool) -> bool {
        let counts = check_network && reachable_before;
        if !counts {
            self.net_ok = true;
        }
        !self.net_ok
    }

    /// The network probe's result.
    pub fn network_checked(&mut self, probe: Result<(), String>) {
        match probe {
            Ok(()) => self.net_ok = true,
            Err(e) => self.last_failure = format!("network unreachable since the switch: {e}"),
        }
    }

    /// What to do about the helper at `now`; `configured`: health units or
    /// a health command are set. `answered`: the id of the result on disk.
    pub fn helper_action(&mut self, configured: bool, answered: Option<u64>, now: Instant) -> HelperAction {
        if !self.helper_ok && !configured {
            self.helper_ok = true;
        }
        if self.helper_ok {
            return HelperAction::None;
        }
        match (self.helper_id, self.helper_written) {
            (None, _) => HelperAction::Request,
            (Some(id), Some(w)) if written_long_ago(w, now) && answered.is_none_or(|r| r < id) => {
                HelperAction::Rewrite(id)
            }
            (Some(id), _) => HelperAction::Await(id),
        }
    }

    /// Request `id` was written at `now` (a new one or again).
    pub fn helper_written(&mut self, id: u64, now: Instant) {
        self.helper_id = Some(id);
        self.helper_written = Some(now);
    }

    /// A new request could not be written.
    pub fn helper_write_failed(&mut self, e: &std::io::Error) {
        self.last_failure = format!("writing health request: {e}");
    }

    /// The helper's result for our request: code 0 passes; anything else
    /// is the failure to report, and a new request goes out next round.
    pub fn helper_result(&mut self, code: Option<i32>, tail: &str) {
        if code == Some(0) {
            self.helper_ok = true;
        } else {
            self.last_failure = tail.trim().to_owned();
            self.helper_id = None;
        }
    }

    /// The round's verdict at wall time `wall` (seconds), against the
    /// machine's `deadline`; None: check again next round.
    pub fn verdict(&self, wall: u64, deadline: u64, timeout: Duration) -> Option<Event> {
        if self.net_ok && self.helper_ok {
            return Some(Event::Healthy);
        }
        if wall > deadline {
            let why = if self.last_failure.is_empty() { "checks did not complete" } else { &self.last_failure };
            return Some(Event::Unhealthy(format!("not healthy within {} s: {why}", timeout.as_secs())));
        }
        None
    }

    /// When the next round is due (None: now).
    pub fn next(&self) -> Option<Instant> {
        self.next_check
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::helper_watch::NUDGE_AFTER;

    const T: Duration = Duration::from_secs(120);
    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_flag_round_trips_and_anything_else_means_unreachable() {
        assert!(reachable_before(Some(net_before_flag(true))));
        assert!(!reachable_before(Some(net_before_flag(false))));
        for other in [None, Some(&b""[..]), Some(b"yes"), Some(b"\n1"), Some(b"0")] {
            assert!(!reachable_before(other), "{other:?}");
        }
    }

    #[test]
    fn only_the_first_test_switch_records_the_flag() {
        assert!(records_net_before(Step::Test, false));
        assert!(!records_net_before(Step::Test, true), "a re-issue after a restart keeps the first flag");
        for s in [Step::RollbackTest, Step::Boot, Step::BootOnce, Step::BootConfirm, Step::BootRevert] {
            assert!(!records_net_before(s, false), "{s:?}");
        }
    }

    #[test]
    fn rounds_run_every_two_seconds() {
        let t0 = Instant::now();
        let mut h = HealthRun::default();
        assert!(h.round_due(t0));
        assert_eq!(h.next(), Some(t0 + HEALTH_EVERY));
        assert!(!h.round_due(t0 + HEALTH_EVERY - MS));
        assert!(h.round_due(t0 + HEALTH_EVERY));
    }

    #[test]
    fn the_network_counts_only_if_asked_and_it_was_there_before() {
        for (asked, before, counts) in
            [(false, false, false), (false, true, false), (true, false, false), (true, true, true)]
        {
            let mut h = HealthRun::default();
            assert_eq!(h.network_pending(asked, before), counts, "asked {asked}, before {before}");
        }
        let mut h = HealthRun::default();
        assert!(h.network_pending(true, true));
        h.network_checked(Err("connection refused".into()));
        assert!(h.network_pending(true, true), "still unreachable: probe again next round");
        assert_eq!(
            h.verdict(11, 10, T),
            Some(Event::Unhealthy(
                "not healthy within 120 s: network unreachable since the switch: connection refused".into()
            ))
        );
        h.network_checked(Ok(()));
        assert!(!h.network_pending(true, true));
    }

    #[test]
    fn the_helper_is_asked_then_nudged_then_a_failure_asks_again() {
        let t0 = Instant::now();
        let mut h = HealthRun::default();
        assert_eq!(h.helper_action(false, None, t0), HelperAction::None, "nothing configured passes");
        let mut h = HealthRun::default();
        assert_eq!(h.helper_action(true, None, t0), HelperAction::Request);
        h.helper_written(3, t0);
        assert_eq!(h.helper_action(true, None, t0 + NUDGE_AFTER), HelperAction::Await(3));
        assert_eq!(h.helper_action(true, Some(2), t0 + NUDGE_AFTER + MS), HelperAction::Rewrite(3));
        assert_eq!(h.helper_action(true, Some(3), t0 + NUDGE_AFTER + MS), HelperAction::Await(3), "answered");
        h.helper_result(Some(1), "  unit foo.service failed\n");
        assert_eq!(h.helper_action(true, Some(3), t0 + NUDGE_AFTER + MS), HelperAction::Request);
        assert_eq!(h.verdict(5, 10, T), None, "before the deadline: try again");
        assert_eq!(
            h.verdict(11, 10, T),
            Some(Event::Unhealthy("not healthy within 120 s: unit foo.service failed".into()))
        );
        h.helper_written(4, t0 + NUDGE_AFTER + MS);
        h.helper_result(Some(0), "");
        assert_eq!(h.helper_action(true, Some(4), t0 + 10 * NUDGE_AFTER), HelperAction::None);
    }

    #[test]
    fn healthy_once_both_pass_and_unhealthy_only_after_the_deadline() {
        let t0 = Instant::now();
        let mut h = HealthRun::default();
        h.network_pending(false, true);
        assert_eq!(h.helper_action(true, None, t0), HelperAction::Request);
        assert_eq!(h.verdict(10, 10, T), None, "at the deadline: not yet");
        assert_eq!(
            h.verdict(11, 10, T),
            Some(Event::Unhealthy("not healthy within 120 s: checks did not complete".into()))
        );
        h.helper_written(1, t0);
        h.helper_result(Some(0), "ok");
        assert_eq!(h.verdict(u64::MAX, 10, T), Some(Event::Healthy), "passing wins even late");
    }
}
