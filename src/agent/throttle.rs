//! The auth throttle: a peer whose deploy requests were refused for their
//! signature [`FAILURES_PER_WINDOW`] times within [`WINDOW`] (counted from
//! its first refusal) gets 429 until the window ends. Per peer, so a
//! stranger hammering bad signatures cannot lock the admin out; at most
//! [`PEERS`] peers are tracked (the one whose window started first is
//! forgotten to make room). Pure: the time is an argument.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Deploy requests with a bad signature allowed per window before 429.
pub const FAILURES_PER_WINDOW: u32 = 20;
pub const WINDOW: Duration = Duration::from_secs(60);
/// Peers tracked at once (bounded memory).
pub const PEERS: usize = 1024;

#[derive(Debug, Default)]
pub struct AuthThrottle {
    /// Refusals per peer in its current window, and when the window started.
    peers: BTreeMap<IpAddr, (u32, Instant)>,
}

impl AuthThrottle {
    /// Whether `peer` is refused now (its window's refusals used up). A
    /// window that has ended is forgotten.
    pub fn limited(&mut self, peer: IpAddr, now: Instant) -> bool {
        let Some((n, since)) = self.peers.get(&peer) else { return false };
        if now.saturating_duration_since(*since) > WINDOW {
            self.peers.remove(&peer);
            false
        } else {
            *n >= FAILURES_PER_WINDOW
        }
    }

    /// Counts a refused signature from `peer`.
    pub fn failed(&mut self, peer: IpAddr, now: Instant) {
        if self.peers.len() >= PEERS && !self.peers.contains_key(&peer) {
            if let Some(oldest) = self.peers.iter().min_by_key(|(_, (_, t))| *t).map(|(ip, _)| *ip) {
                self.peers.remove(&oldest);
            }
        }
        let e = self.peers.entry(peer).or_insert((0, now));
        e.0 = e.0.saturating_add(1);
    }

    /// Peers tracked (for tests).
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(n))
    }

    #[test]
    fn a_peer_is_limited_after_its_failures_and_only_within_the_window() {
        let mut t = AuthThrottle::default();
        let t0 = Instant::now();
        for i in 0..FAILURES_PER_WINDOW {
            assert!(!t.limited(ip(1), t0), "after {i} failures");
            t.failed(ip(1), t0);
        }
        assert!(t.limited(ip(1), t0));
        assert!(t.limited(ip(1), t0 + WINDOW));
        assert!(!t.limited(ip(2), t0), "another peer is not limited");
        assert!(!t.limited(ip(1), t0 + WINDOW + Duration::from_millis(1)), "the window ended");
        assert!(t.is_empty(), "an ended window is forgotten");
    }

    #[test]
    fn the_window_counts_from_the_first_failure() {
        let mut t = AuthThrottle::default();
        let t0 = Instant::now();
        t.failed(ip(1), t0);
        for _ in 1..FAILURES_PER_WINDOW {
            t.failed(ip(1), t0 + WINDOW / 2);
        }
        assert!(t.limited(ip(1), t0 + WINDOW / 2));
        assert!(!t.limited(ip(1), t0 + WINDOW + Duration::from_secs(1)));
    }

    #[test]
    fn memory_is_bounded_by_forgetting_the_oldest_window() {
        let mut t = AuthThrottle::default();
        let t0 = Instant::now();
        for i in 0..PEERS as u32 {
            t.failed(ip(i), t0 + Duration::from_millis(u64::from(i)));
        }
        assert_eq!(t.len(), PEERS);
        t.failed(ip(u32::MAX), t0 + Duration::from_secs(5));
        assert_eq!(t.len(), PEERS);
        assert!(!t.peers.contains_key(&ip(0)), "the oldest window was forgotten");
        assert!(t.peers.contains_key(&ip(1)) && t.peers.contains_key(&ip(u32::MAX)));
    }
}
