//! `nixless rollout watch`: follows a channel's rollout in Prometheus and
//! halts it when a wave fails too often, or when a wave has not reported
//! by the time the next one opens ([`super::rollout`] decides; with
//! `--on-no-news warn` the second only warns, loudly, every round).
//!
//! Each round, at most every `interval`: read and verify the channel
//! document (with the public half of the signing key: a document the
//! watcher did not sign is not one it may halt), query Prometheus, judge.
//! Every round ends by `deadline`; a round that fails (Prometheus down, a
//! document being replaced) is retried at the next one, and the last error
//! is the exit's when the deadline passes.
//!
//! Exit codes: [`EXIT_COMPLETE`], [`EXIT_HALTED`], [`EXIT_ERROR`],
//! [`EXIT_DEADLINE`].

use super::rollout::{self, Verdict};
use crate::channel;
use crate::nix::{SecretKey, TrustedKeys};
use std::time::{Duration, Instant};

/// Every wave's hosts are done and nothing was halted; or `--once` with
/// nothing to do.
pub const EXIT_COMPLETE: i32 = 0;
pub const EXIT_ERROR: i32 = 1;
/// The watcher published a halt, or the channel was halted already.
pub const EXIT_HALTED: i32 = 3;
/// The deadline passed with the rollout still going (nothing to halt).
pub const EXIT_DEADLINE: i32 = 4;

pub struct Opts {
    pub prometheus: String,
    pub channel_doc: String,
    pub key: std::path::PathBuf,
    pub publish: String,
    pub max_failure_rate: f64,
    pub min_hosts: usize,
    pub news: rollout::NewsRule,
    /// Warn instead of halting on no news.
    pub warn_only: bool,
    pub interval: Duration,
    pub once: bool,
    pub deadline: Duration,
}

/// What one round found.
enum Round {
    Done(i32),
    Again,
}

pub fn main(o: Opts) -> i32 {
    match run(o) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nixless: error: {e}");
            EXIT_ERROR
        }
    }
}

fn run(o: Opts) -> Result<i32, String> {
    if !(0.0..1.0).contains(&o.max_failure_rate) {
        return Err(format!("--max-failure-rate {}: expected 0 <= rate < 1", o.max_failure_rate));
    }
    if !(1..=1_000_000).contains(&o.min_hosts) {
        return Err(format!("--min-hosts {}: expected 1 to 1000000", o.min_hosts));
    }
    if !(1..=30 * 86_400).contains(&o.news.stale_after) {
        return Err(format!("--stale-after {}: expected 1 to 2592000 s", o.news.stale_after));
    }
    if !(o.news.min_reported > 0.0 && o.news.min_reported <= 1.0) {
        return Err(format!("--min-reported {}: expected 0 < share <= 1", o.news.min_reported));
    }
    if o.news.lead > crate::channel::MAX_SOAK_SECS {
        return Err(format!("--lead {}: at most {} s", o.news.lead, crate::channel::MAX_SOAK_SECS));
    }
    if !(1..=86_400).contains(&o.interval.as_secs()) || o.deadline.as_secs() > 30 * 86_400 {
        return Err("--interval: 1 to 86400 s; --deadline: at most 30 days".into());
    }
    let text = std::fs::read_to_string(&o.key).map_err(|e| format!("{}: {e}", o.key.display()))?;
    let key = SecretKey::parse(&text).map_err(|e| format!("{}: {e}", o.key.display()))?;
    let end = Instant::now() + o.deadline;
    // Prometheus's last answer, judged again (aging) while it gives none.
    let mut last: Vec<super::view::Host> = Vec::new();
    loop {
        // Each request of the round ends by the deadline (at least a second
        // to try), and credentials are read anew (a rotated key file).
        let left = end.saturating_duration_since(Instant::now()).min(super::QUERY_DEADLINE).max(Duration::from_secs(1));
        let err = match super::fetcher(left).and_then(|mut f| round(&o, &key, &mut f, left, &mut last)) {
            Ok(Round::Done(code)) => return Ok(code),
            Ok(Round::Again) if o.once => return Ok(EXIT_COMPLETE),
            Ok(Round::Again) => None,
            Err(e) if o.once => return Err(e),
            Err(e) => {
                eprintln!("nixless: {e} (retrying)");
                Some(e)
            }
        };
        let next = Instant::now() + o.interval;
        if next >= end {
            return match err {
                Some(e) => Err(format!("deadline of {} s passed; last error: {e}", o.deadline.as_secs())),
                None => {
                    eprintln!("nixless: deadline of {} s passed, rollout still in progress", o.deadline.as_secs());
                    Ok(EXIT_DEADLINE)
                }
            };
        }
        std::thread::sleep(o.interval);
    }
}

/// One round. `last`: the hosts of Prometheus's last answer. When
/// Prometheus gives none (down, or too far behind to answer within the
/// deadline: the same overload that makes its data stale), they are
/// judged again at this round's time: their pushes age, and a wave that
/// owes news gets a halt (no news is not good news) instead of retries
/// until the next wave has opened. Anything else waits for an answer.
fn round(
    o: &Opts,
    key: &SecretKey,
    f: &mut crate::fetch::Fetcher,
    left: Duration,
    last: &mut Vec<super::view::Host>,
) -> Result<Round, String> {
    let (body, sig) = super::publish::read(f, &o.channel_doc, channel::sign::MAX_FILE)?;
    let name = channel::parse(&body).map_err(|e| format!("{}: {e}", o.channel_doc))?.channel;
    let keys = TrustedKeys::new(vec![key.public()]);
    let v = channel::verify(&body, sig.as_deref(), &keys, &name).map_err(|e| format!("{}: {e}", o.channel_doc))?;
    let now = crate::clock::now();
    if channel::fresh::expired(v.doc.expires, now) {
        return Err(format!("{}: expired at {} (now {now}); devices refuse it", o.channel_doc, v.doc.expires));
    }
    let d = &v.doc;
    let rules = rollout::Rules { max_rate: o.max_failure_rate, min_hosts: o.min_hosts, news: o.news };
    let samples = match super::query(f, &o.prometheus, left) {
        Ok(s) => s,
        Err(e) => {
            let r = rollout::rollout(d, last, now, o.news.stale_after);
            return match rollout::judge(d, &r, now, &rules) {
                Verdict::NoNews { groups, because } => {
                    let why =
                        format!(" (judged on Prometheus's last answer; this round: {})", crate::text::clip(&e, 256));
                    match no_news(o, key, f, d, &groups, &because, now, &why)? {
                        Round::Again => Err(e),
                        done => Ok(done),
                    }
                }
                _ => Err(e),
            };
        }
    };
    let (hosts, _) = super::view::hosts(&samples);
    let r = rollout::rollout(d, &hosts, now, o.news.stale_after);
    *last = hosts;
    eprintln!(
        "nixless: channel {} seq {}: {} hosts report it, {} still on an older document{}; {}",
        d.channel,
        d.seq,
        r.on_channel,
        r.pending,
        if r.ahead > 0 { format!(", {} on a NEWER one (re-reading)", r.ahead) } else { String::new() },
        freshness(&r, now, o.news.stale_after)
    );
    for w in &r.waves {
        eprintln!("nixless:   {}", rollout::describe(w));
    }
    let rules = rollout::Rules { max_rate: o.max_failure_rate, min_hosts: o.min_hosts, news: o.news };
    match rollout::judge(d, &r, now, &rules) {
        Verdict::Halt { groups, because } => {
            let halt = rollout::halt_doc(d, &groups, now);
            let out = channel::render(&halt).map_err(|e| e.to_string())?;
            let (_, sig) = channel::issue(out.as_bytes(), key, now)?;
            super::publish::publish(f, &o.publish, out.as_bytes(), &sig)?;
            eprintln!(
                "nixless: HALTED group(s) {} of channel {} (seq {}): wave {} of group {}: {} of {} finished hosts failed, \
                 more than {}; wrote {}",
                groups.join(", "),
                d.channel,
                halt.seq,
                because.wave,
                because.group,
                because.failed,
                because.finished(),
                o.max_failure_rate,
                o.publish.split('?').next().unwrap_or_default()
            );
            Ok(Round::Done(EXIT_HALTED))
        }
        Verdict::NoNews { groups, because } => no_news(o, key, f, d, &groups, &because, now, ""),
        Verdict::Halted => {
            eprintln!("nixless: channel {} seq {} is halted already", d.channel, d.seq);
            Ok(Round::Done(EXIT_HALTED))
        }
        Verdict::Complete { halted } => {
            eprintln!("nixless: channel {} seq {}: rollout complete", d.channel, d.seq);
            Ok(Round::Done(if halted { EXIT_HALTED } else { EXIT_COMPLETE }))
        }
        Verdict::InProgress => Ok(Round::Again),
    }
}

/// Halts `groups` for the silence of `because` (or, `--on-no-news warn`,
/// warns of each and goes on), saying why in one line; `why` is appended
/// to the reason.
#[allow(clippy::too_many_arguments)]
fn no_news(
    o: &Opts,
    key: &SecretKey,
    f: &mut crate::fetch::Fetcher,
    d: &channel::Doc,
    groups: &[String],
    because: &[rollout::Silence],
    now: u64,
    why: &str,
) -> Result<Round, String> {
    if o.warn_only {
        for s in because {
            eprintln!("nixless: WARNING: {}{why}; NOT halting (--on-no-news warn)", rollout::explain(s, now, &o.news));
        }
        return Ok(Round::Again);
    }
    let halt = rollout::halt_doc(d, groups, now);
    let out = channel::render(&halt).map_err(|e| e.to_string())?;
    let (_, sig) = channel::issue(out.as_bytes(), key, now)?;
    super::publish::publish(f, &o.publish, out.as_bytes(), &sig)?;
    let more = if because.len() > 1 { format!(" (and {} more)", because.len() - 1) } else { String::new() };
    eprintln!(
        "nixless: HALTED group(s) {} of channel {} (seq {}): {}{why}{more}; wrote {}",
        groups.join(", "),
        d.channel,
        halt.seq,
        rollout::explain(&because[0], now, &o.news),
        o.publish.split('?').next().unwrap_or_default()
    );
    Ok(Round::Done(EXIT_HALTED))
}

/// How recent the data is, for the round's first line: the newest push
/// and how many hosts are stale; STALE in capitals when nothing is fresh.
fn freshness(r: &rollout::Rollout, now: u64, stale_after: u64) -> String {
    let newest = match r.newest_push {
        Some(t) if (now as f64) >= t => format!("newest push {} s ago", (now as f64 - t) as u64),
        Some(_) => "newest push in the future (clocks differ)".to_owned(),
        None => "no push time known".to_owned(),
    };
    match r.stale {
        0 => newest,
        n if n == r.on_channel => format!("{newest}: STALE, no host pushed in the last {stale_after} s"),
        n => format!("{newest}; {n} of {} hosts STALE (no push in the last {stale_after} s)", r.on_channel),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_round_line_says_how_fresh_the_data_is() {
        let r = |stale, on_channel, newest| rollout::Rollout {
            stale,
            on_channel,
            newest_push: newest,
            ..Default::default()
        };
        assert_eq!(freshness(&r(0, 3, Some(990.5)), 1000, 900), "newest push 9 s ago");
        assert_eq!(
            freshness(&r(1, 3, Some(990.0)), 1000, 900),
            "newest push 10 s ago; 1 of 3 hosts STALE (no push in the last 900 s)"
        );
        assert_eq!(
            freshness(&r(3, 3, Some(10.0)), 1000, 900),
            "newest push 990 s ago: STALE, no host pushed in the last 900 s"
        );
        assert_eq!(freshness(&r(0, 0, None), 1000, 900), "no push time known");
        assert_eq!(freshness(&r(0, 1, Some(2000.0)), 1000, 900), "newest push in the future (clocks differ)");
    }
}
