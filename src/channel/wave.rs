//! Which wave a device is in, computed by the device alone.
//!
//! ```text
//! position = u64_be(sha256("nixless-wave" 0x00 channel 0x00 host)[0..8])   ; uniform on [0, 2^64)
//! wave     = the first wave i with position * 10000 < basis_points(i) * 2^64
//! ```
//! The position depends on the channel and the host only, not on the
//! release: the hosts in the 1 % wave of one release are the 1 % of every
//! release on that channel, so canaries stay canaries (an admin can watch
//! and recover a known set), and a wave's hosts are the same when a halted
//! release is replaced. Another channel name shuffles the fleet anew. The
//! channel name cannot contain 0x00 ([`super::valid_name`]), so the input
//! is unambiguous.

use super::Wave;
use sha2::{Digest, Sha256};

pub fn position(channel: &str, host: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(b"nixless-wave\0");
    h.update(channel.as_bytes());
    h.update(b"\0");
    h.update(host.as_bytes());
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    u64::from_be_bytes(first)
}

/// Whether `position` is inside the first `basis_points` / 10 000 of the
/// fleet. Exact integer arithmetic: 100 % covers every position.
pub fn covers(basis_points: u16, position: u64) -> bool {
    u128::from(position) * 10_000 < u128::from(basis_points) << 64
}

/// The index of the first wave covering `position`, if any (a plan may stop
/// short of 100 %).
pub fn wave_of(waves: &[Wave], position: u64) -> Option<usize> {
    waves.iter().position(|w| covers(w.basis_points, position))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::Start;

    fn plan(bps: &[u16]) -> Vec<Wave> {
        bps.iter().map(|&basis_points| Wave { basis_points, from: Start::Issued, start: 0 }).collect()
    }

    #[test]
    fn covers_edges() {
        assert!(covers(10_000, u64::MAX));
        assert!(covers(1, 0));
        // 1 basis point is [0, 2^64 / 10000).
        let edge = ((1u128 << 64) / 10_000) as u64;
        assert!(covers(1, edge));
        assert!(!covers(1, edge + 1));
        assert!(covers(5_000, (1u64 << 63) - 1));
        assert!(!covers(5_000, 1u64 << 63));
    }

    /// A fixed known answer, so a change of the hash input (which would
    /// move every device to another wave) cannot go unnoticed.
    #[test]
    fn position_is_pinned() {
        let p = position("stable", "kiosk-7");
        let again = position("stable", "kiosk-7");
        assert_eq!(p, again);
        let d = Sha256::digest(b"nixless-wave\0stable\0kiosk-7");
        assert_eq!(p.to_be_bytes(), d[..8]);
        assert_ne!(position("stable", "kiosk-8"), p);
        assert_ne!(position("beta", "kiosk-7"), p);
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(position("ab", "c"), position("a", "bc"));
    }

    /// Binomial bound: with n hosts and share p, the count is within
    /// 6 standard deviations of n·p (a false failure has odds below 1e-8,
    /// and the hosts are fixed, so the test is deterministic).
    fn within(count: usize, n: usize, share: f64) {
        let mean = n as f64 * share;
        let sd = (n as f64 * share * (1.0 - share)).sqrt();
        assert!((count as f64 - mean).abs() <= 6.0 * sd, "count {count}, expected {mean} ± {}", 6.0 * sd);
    }

    #[test]
    fn waves_are_uniform_over_100_000_hosts() {
        const N: usize = 100_000;
        let waves = plan(&[5, 100, 1_000, 5_000, 10_000]); // 0.05 %, 1 %, 10 %, 50 %, 100 %
        let mut counts = [0usize; 5];
        for i in 0..N {
            counts[wave_of(&waves, position("stable", &format!("host-{i}"))).unwrap()] += 1;
        }
        let shares = [0.0005, 0.0095, 0.09, 0.40, 0.50];
        for (c, s) in counts.iter().zip(shares) {
            within(*c, N, s);
        }
        assert_eq!(counts.iter().sum::<usize>(), N);
    }

    #[test]
    fn canaries_stay_canaries_within_a_channel_but_not_across() {
        const N: usize = 100_000;
        let ten = plan(&[1_000, 10_000]);
        let (mut in_both, mut stable_first) = (0, 0);
        for i in 0..N {
            let host = format!("host-{i}");
            let s = wave_of(&ten, position("stable", &host));
            // Any other release of the channel: the same answer (the
            // position has no release input at all).
            assert_eq!(s, wave_of(&ten, position("stable", &host)));
            if s == Some(0) {
                stable_first += 1;
                if wave_of(&ten, position("beta", &host)) == Some(0) {
                    in_both += 1;
                }
            }
        }
        within(stable_first, N, 0.1);
        // Independent across channels: 10 % of the 10 %.
        within(in_both, stable_first, 0.1);
    }

    #[test]
    fn a_plan_short_of_100_percent_leaves_hosts_out() {
        let waves = plan(&[1_000]);
        let out = (0..10_000).filter(|i| wave_of(&waves, position("c", &format!("h{i}"))).is_none()).count();
        within(out, 10_000, 0.9);
        assert_eq!(wave_of(&[], 0), None);
    }
}
