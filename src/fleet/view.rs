//! The fleet as Prometheus sees it: the samples of one instant query
//! ([`QUERY`]) folded into one [`Host`] per `host` label, and the counts
//! `nixless fleet status` shows. Pure.
//!
//! ```text
//! nixless_phase{phase}                      == 1 : the phase
//! nixless_system_info{kind="current",system}      : the running system
//! nixless_last_result_info{outcome,system,origin} : the last finished deploy
//! nixless_channel_info{channel,group,wave,seq,system,decision}
//!                                                  : the channel decision
//! nixless_last_push_timestamp_seconds              : when it last pushed (its clock)
//! push_time_seconds                                : when the Pushgateway last took
//!                                                    its push (the gateway's clock)
//! ```
//! A series without a `host` label is not an agent's and is skipped. When
//! one host has two series of one metric (Prometheus keeps a series for
//! its lookback window after a scrape stops showing it only when the
//! target vanished, so this is rare), the channel series with the highest
//! `seq` wins and otherwise the first.

use super::prom::Sample;
use std::collections::BTreeMap;

/// Everything the fleet commands read, in one query, restricted to the
/// agents' job; phases only where current (1), not the 0s of the others.
pub const QUERY: &str = concat!(
    "{job=\"nixless\",__name__=~\"nixless_(system_info|last_result_info|channel_info|last_push_timestamp_seconds)|push_time_seconds\"}",
    " or nixless_phase{job=\"nixless\"} == 1"
);

/// Outcomes (`Outcome::as_str`) that count as a failed release.
pub const FAILED: [&str; 4] = ["failed", "rolled-back", "rollback-failed", "rejected"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastResult {
    pub outcome: String,
    pub system: String,
    pub origin: String,
}

impl LastResult {
    pub fn failed(&self) -> bool {
        FAILED.contains(&self.outcome.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelInfo {
    pub channel: String,
    /// "" when the device is in no group.
    pub group: String,
    /// 1-based; 0 when in no group or not in the plan (or unreadable).
    pub wave: u32,
    pub seq: u64,
    pub system: String,
    pub decision: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Host {
    pub host: String,
    pub phase: Option<String>,
    pub current: Option<String>,
    pub last: Option<LastResult>,
    pub channel: Option<ChannelInfo>,
    pub last_push: Option<f64>,
    /// The Pushgateway's `push_time_seconds` for the host's group.
    pub pushed: Option<f64>,
}

impl Host {
    /// When the host's data last arrived: the Pushgateway's time (the
    /// admin's clock, and it moves only when a push gets through), else the
    /// agent's own (a device without a real-time clock may be far off).
    pub fn push_time(&self) -> Option<f64> {
        self.pushed.or(self.last_push)
    }
}

/// The hosts of an answer, sorted by name, and the evaluation time (the
/// newest sample time; 0 without samples).
pub fn hosts(samples: &[Sample]) -> (Vec<Host>, f64) {
    let mut by: BTreeMap<&str, Host> = BTreeMap::new();
    let mut time: f64 = 0.0;
    for s in samples {
        let Some(host) = s.label("host") else { continue };
        time = time.max(s.time);
        let h = by.entry(host).or_insert_with(|| Host { host: host.to_owned(), ..Host::default() });
        let l = |n: &str| s.label(n).unwrap_or_default().to_owned();
        match s.label("__name__").unwrap_or_default() {
            "nixless_phase" if s.value == 1.0 => {
                h.phase.get_or_insert_with(|| l("phase"));
            }
            "nixless_system_info" if s.label("kind") == Some("current") => {
                h.current.get_or_insert_with(|| l("system"));
            }
            "nixless_last_result_info" => {
                h.last.get_or_insert_with(|| LastResult {
                    outcome: l("outcome"),
                    system: l("system"),
                    origin: l("origin"),
                });
            }
            "nixless_channel_info" => {
                let c = ChannelInfo {
                    channel: l("channel"),
                    group: l("group"),
                    wave: l("wave").parse().unwrap_or(0),
                    seq: l("seq").parse().unwrap_or(0),
                    system: l("system"),
                    decision: l("decision"),
                };
                if h.channel.as_ref().is_none_or(|have| c.seq > have.seq) {
                    h.channel = Some(c);
                }
            }
            "nixless_last_push_timestamp_seconds" if s.value.is_finite() => {
                h.last_push.get_or_insert(s.value);
            }
            "push_time_seconds" if s.value.is_finite() => {
                h.pushed.get_or_insert(s.value);
            }
            _ => {}
        }
    }
    (by.into_values().collect(), time)
}

/// A host that has not pushed for more than `after` seconds at `now`, or
/// never (no push time): the time since, if known.
pub fn silent(h: &Host, now: f64, after: u64) -> Option<Option<f64>> {
    match h.last_push {
        Some(t) if now - t > after as f64 => Some(Some(now - t)),
        Some(_) => None,
        None => Some(None),
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Count {
    pub key: String,
    pub hosts: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct ChannelCount {
    pub channel: String,
    pub seq: u64,
    pub group: String,
    pub wave: u32,
    pub decision: String,
    pub hosts: usize,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Silent {
    pub host: String,
    /// Seconds since the last push; absent when the host never reported one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secs: Option<u64>,
}

/// What `nixless fleet status` shows (and writes as JSON).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Prometheus's evaluation time, Unix seconds.
    pub time: u64,
    pub hosts: usize,
    pub silent_after: u64,
    /// By current system.
    pub systems: Vec<Count>,
    pub phases: Vec<Count>,
    /// By the last result's outcome.
    pub outcomes: Vec<Count>,
    pub channels: Vec<ChannelCount>,
    pub silent: Vec<Silent>,
}

/// Equal keys counted, in key order. Sorted, then counted in runs: the
/// keys are label values devices push (one device can push a Pushgateway
/// group per made-up host), so they may be as many as the series; a sorted
/// Vec grown by insertion took 80 s for 200 000 distinct keys.
fn tally<K: Ord>(keys: impl Iterator<Item = K>) -> Vec<(K, usize)> {
    let mut all: Vec<K> = keys.collect();
    all.sort_unstable();
    let mut out: Vec<(K, usize)> = Vec::new();
    for k in all {
        match out.last_mut() {
            Some((have, n)) if *have == k => *n += 1,
            _ => out.push((k, 1)),
        }
    }
    out
}

fn counts<'a>(keys: impl Iterator<Item = &'a str>) -> Vec<Count> {
    tally(keys).into_iter().map(|(k, n)| Count { key: k.to_owned(), hosts: n }).collect()
}

pub fn summary(hosts: &[Host], now: f64, silent_after: u64) -> Summary {
    let unknown = "-";
    let ch = tally(
        hosts
            .iter()
            .filter_map(|h| h.channel.as_ref())
            .map(|c| (c.channel.as_str(), c.seq, c.group.as_str(), c.wave, c.decision.as_str())),
    );
    Summary {
        time: if now.is_finite() && now > 0.0 { now as u64 } else { 0 },
        hosts: hosts.len(),
        silent_after,
        systems: counts(hosts.iter().map(|h| h.current.as_deref().unwrap_or(unknown))),
        phases: counts(hosts.iter().map(|h| h.phase.as_deref().unwrap_or(unknown))),
        outcomes: counts(hosts.iter().map(|h| h.last.as_ref().map_or(unknown, |l| l.outcome.as_str()))),
        channels: ch
            .into_iter()
            .map(|((channel, seq, group, wave, decision), hosts)| ChannelCount {
                channel: channel.to_owned(),
                seq,
                group: group.to_owned(),
                wave,
                decision: decision.to_owned(),
                hosts,
            })
            .collect(),
        silent: hosts
            .iter()
            .filter_map(|h| {
                silent(h, now, silent_after).map(|s| Silent { host: h.host.clone(), secs: s.map(|t| t as u64) })
            })
            .collect(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample(name: &str, host: &str, labels: &[(&str, &str)], value: f64) -> Sample {
        let mut l = vec![("__name__".to_owned(), name.to_owned()), ("host".to_owned(), host.to_owned())];
        l.extend(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Sample { labels: l, time: 1000.0, value }
    }

    #[test]
    fn folds_samples_per_host_and_counts() {
        let s = vec![
            sample("nixless_phase", "a", &[("phase", "idle")], 1.0),
            sample("nixless_phase", "a", &[("phase", "fetching")], 0.0),
            sample("nixless_system_info", "a", &[("kind", "booted"), ("system", "/nix/store/old")], 1.0),
            sample("nixless_system_info", "a", &[("kind", "current"), ("system", "/nix/store/new")], 1.0),
            sample("nixless_last_push_timestamp_seconds", "a", &[], 990.0),
            sample("nixless_last_push_timestamp_seconds", "b", &[], 10.0),
            sample("push_time_seconds", "a", &[("instance", "")], 995.0),
            sample(
                "nixless_last_result_info",
                "b",
                &[("outcome", "rolled-back"), ("system", "/s"), ("origin", "channel")],
                1.0,
            ),
            sample(
                "nixless_channel_info",
                "b",
                &[("channel", "c"), ("seq", "4"), ("wave", "1"), ("group", "g"), ("decision", "deploy")],
                1.0,
            ),
            sample(
                "nixless_channel_info",
                "b",
                &[("channel", "c"), ("seq", "5"), ("wave", "2"), ("group", "g"), ("decision", "wait")],
                1.0,
            ),
            sample("nixless_phase", "c", &[("phase", "fetching")], 1.0),
            // Not an agent's.
            Sample { labels: vec![("__name__".into(), "nixless_phase".into())], time: 5000.0, value: 1.0 },
        ];
        let (hosts, now) = hosts(&s);
        assert_eq!(now, 1000.0);
        assert_eq!(hosts.iter().map(|h| h.host.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(hosts[0].phase.as_deref(), Some("idle"));
        assert_eq!(hosts[0].current.as_deref(), Some("/nix/store/new"));
        // The gateway's push time first, the agent's without one.
        assert_eq!((hosts[0].push_time(), hosts[1].push_time(), hosts[2].push_time()), (Some(995.0), Some(10.0), None));
        assert!(hosts[1].last.as_ref().unwrap().failed());
        assert_eq!(hosts[1].channel.as_ref().map(|c| (c.seq, c.wave)), Some((5, 2)), "the newest document wins");
        let sum = summary(&hosts, now, 900);
        assert_eq!(sum.hosts, 3);
        let c = |v: &[Count]| v.iter().map(|c| (c.key.clone(), c.hosts)).collect::<Vec<_>>();
        assert_eq!(c(&sum.systems), [("-".into(), 2), ("/nix/store/new".into(), 1)]);
        assert_eq!(c(&sum.phases), [("-".into(), 1), ("fetching".into(), 1), ("idle".into(), 1)]);
        assert_eq!(c(&sum.outcomes), [("-".into(), 2), ("rolled-back".into(), 1)]);
        assert_eq!(sum.channels.len(), 1);
        assert_eq!((sum.channels[0].wave, sum.channels[0].decision.as_str()), (2, "wait"));
        // b pushed 990 s ago (> 900), c never; a 10 s ago.
        assert_eq!(sum.silent, [Silent { host: "b".into(), secs: Some(990) }, Silent { host: "c".into(), secs: None }]);
        let j = crate::json::to_string(&sum).unwrap();
        assert!(
            j.contains(r#""channels":[{"channel":"c","seq":5,"group":"g","wave":2,"decision":"wait","hosts":1}]"#),
            "{j}"
        );
    }

    /// A bench, not a check (run with `--ignored --nocapture`, in release):
    /// `summary` of `N` (default 200 000) hosts with distinct label values,
    /// in the order that was worst for insertion into a sorted Vec. Prints
    /// the time; 80 s before the tally sorted, 0.1 s after.
    #[test]
    #[ignore]
    fn bench_summary_of_many_distinct_labels() {
        let n: usize = std::env::var("N").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
        let hosts: Vec<Host> = (0..n)
            .map(|i| Host {
                host: format!("h{i:07}"),
                current: Some(format!("/nix/store/{:07}", n - i)),
                phase: Some(format!("p{:07}", n - i)),
                channel: Some(ChannelInfo {
                    channel: format!("c{:07}", n - i),
                    group: String::new(),
                    wave: 0,
                    seq: 0,
                    system: String::new(),
                    decision: String::new(),
                }),
                ..Host::default()
            })
            .collect();
        let t = std::time::Instant::now();
        let s = summary(&hosts, 1.0, 1);
        eprintln!("summary of {n} hosts with distinct labels: {:?}", t.elapsed());
        assert_eq!((s.systems.len(), s.channels.len()), (n, n));
    }

    #[test]
    fn hostile_labels_do_not_break_anything() {
        let s = vec![
            sample("nixless_channel_info", "x", &[("seq", "-1"), ("wave", "99999999999999999999")], 1.0),
            sample("nixless_last_push_timestamp_seconds", "x", &[], f64::NAN),
            Sample { labels: vec![], time: f64::INFINITY, value: 1.0 },
        ];
        let (hosts, now) = hosts(&s);
        assert_eq!(hosts[0].channel.as_ref().map(|c| (c.seq, c.wave)), Some((0, 0)));
        assert_eq!(hosts[0].last_push, None);
        let sum = summary(&hosts, now, 1);
        assert_eq!(sum.silent.len(), 1);
    }
}
