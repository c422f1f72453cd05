//! A channel's rollout as Prometheus sees it, and when to halt it. Pure.
//!
//! ```text
//! host of wave (G, N) = reports channel_info{channel=C, seq=S, group=G, wave=N}
//!                       (C, S: the current document's)
//! ok       = its last result is `committed` for G's system, or decision already-running
//! failed   = its last result is a failure (view::FAILED) for G's system, or decision failed-before
//! waiting  = decision wait (its wave has not opened)
//! running  = decision deploy, no result for G's system yet
//! pending  = reports channel C with an older seq (has not read the document yet)
//! rate     = failed / (ok + failed)
//! halt G   ⇔ some wave of a group with G's system has ok + failed >= min_hosts and rate > max_rate
//! complete ⇔ some host reports C; no pending, waiting or running host; no newer seq seen
//!
//! fresh    = now - push time <= stale_after        (push time: view::Host::push_time)
//! members  = every host above in wave (G, N), pending ones included (their
//!            wave computed here from host and channel, as the device will)
//! reported = members that are ok or failed, and fresh
//! due      = now >= start(N+1) - min(lead, (start(N+1) - start(N)) / 2);
//!            never when wave N+1 opens together with N
//! no news  ⇔ N is due and not: reported >= min_reported * members, members > 0
//!            (members = 0 passes when C has hosts and G's would put fewer
//!            than EMPTY_EXPECTED in the wave: a small wave may be empty)
//! halt G   ⇔ no news from some wave of G (after the rate rule, and after
//!            complete: a finished rollout has nobody left to stop)
//! ```
//! No news is not good news: a wave whose hosts stopped reporting (dead,
//! or a Pushgateway or Prometheus that fell behind) looks exactly like a
//! wave that is fine but slow, and the next wave opens on its schedule
//! whatever the watcher knows. So before it opens, the previous waves must
//! have spoken, recently, on this release. `lead` leaves the halt time to
//! reach devices (they poll every `poll_interval_secs`); a soak shorter
//! than twice the lead is split in half, so the hosts get time to report.
//! Not checked while hosts report a newer document (the watcher's is
//! outdated; a halt of it would be refused) or once the last wave opened
//! (nothing left to hold: the rate rule still halts what has not started).
//! Waves are computed by the devices (the `wave` label), not here: the
//! watcher and the fleet agree by construction, and a device that cannot
//! compute its wave cannot be counted in one.
//!
//! The halt: every group whose system is the failing one gets `halt`
//! (another group may run the same release on other hardware), the other
//! groups keep rolling out. The document is the current one with
//! `seq + 1` and `issued = now`; its `expires` is kept (a halt does not
//! extend a release's life, and devices forget a channel when it expires
//! anyway); every wave's start is written as an absolute `start`, because
//! `soak_secs` counts from `issued` and moving `issued` would delay the
//! groups that keep going. Fields the parser ignores are not carried over.

use super::view::Host;
use crate::channel::{Doc, Start};

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct WaveStat {
    pub group: String,
    /// 1-based.
    pub wave: usize,
    pub system: String,
    pub ok: usize,
    pub failed: usize,
    pub waiting: usize,
    pub running: usize,
    /// Told to halt (the document or group halts).
    pub halted: usize,
    /// Still on an older document; their wave computed from host and channel.
    pub pending: usize,
    /// Members ok or failed, with fresh data.
    pub reported: usize,
    /// Members whose last push is older than `stale_after`, or unknown.
    pub stale: usize,
    /// Up to [`MAX_NAMED`] failed hosts, for the log line.
    pub failed_hosts: Vec<String>,
}

/// Most failed hosts named per wave.
pub const MAX_NAMED: usize = 10;

impl WaveStat {
    pub fn finished(&self) -> usize {
        self.ok + self.failed
    }

    /// Every host known to be in the wave.
    pub fn members(&self) -> usize {
        self.ok + self.failed + self.halted + self.waiting + self.running + self.pending
    }
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Rollout {
    pub channel: String,
    pub seq: u64,
    /// Every wave of every group, in document order.
    pub waves: Vec<WaveStat>,
    /// Hosts on the channel still at an older sequence.
    pub pending: usize,
    /// Hosts on the channel at a newer sequence than the document read.
    pub ahead: usize,
    /// Hosts reporting the channel at all.
    pub on_channel: usize,
    /// Of those, hosts whose last push is older than `stale_after`, or unknown.
    pub stale: usize,
    /// The newest push time of a host on the channel (Unix seconds).
    pub newest_push: Option<f64>,
}

/// Whether `h`'s data is no older than `stale_after` at `now`. Without
/// any push time it is not: no news.
pub fn fresh(h: &Host, now: u64, stale_after: u64) -> bool {
    h.push_time().is_some_and(|t| now as f64 - t <= stale_after as f64)
}

/// The rollout of `doc` as `hosts` report it at `now`.
pub fn rollout(doc: &Doc, hosts: &[Host], now: u64, stale_after: u64) -> Rollout {
    let mut r = Rollout { channel: doc.channel.clone(), seq: doc.seq, ..Rollout::default() };
    for g in &doc.groups {
        for w in 1..=g.waves.len() {
            r.waves.push(WaveStat {
                group: g.tag.clone(),
                wave: w,
                system: g.system.to_absolute(),
                ..WaveStat::default()
            });
        }
    }
    for h in hosts {
        let Some(c) = h.channel.as_ref().filter(|c| c.channel == doc.channel) else { continue };
        r.on_channel += 1;
        let fresh = fresh(h, now, stale_after);
        if !fresh {
            r.stale += 1;
        }
        if let Some(t) = h.push_time() {
            r.newest_push = Some(r.newest_push.map_or(t, |n| n.max(t)));
        }
        if c.seq < doc.seq {
            r.pending += 1;
            // The group it was in by the older document (tags rarely
            // change), the wave the device will compute for this one.
            let wave = doc.groups.iter().find(|g| g.tag == c.group).and_then(|g| {
                crate::channel::wave::wave_of(&g.waves, crate::channel::wave::position(&doc.channel, &h.host))
            });
            if let Some(w) = wave.and_then(|i| r.waves.iter_mut().find(|w| w.group == c.group && w.wave == i + 1)) {
                w.pending += 1;
                w.stale += usize::from(!fresh);
            }
            continue;
        }
        if c.seq > doc.seq {
            r.ahead += 1;
            continue;
        }
        let Some(w) = r.waves.iter_mut().find(|w| w.group == c.group && w.wave as u64 == u64::from(c.wave)) else {
            continue; // not-for-me, not-in-plan, or a wave the document does not have
        };
        w.stale += usize::from(!fresh);
        let last = h.last.as_ref().filter(|l| l.system == w.system);
        if last.is_some_and(|l| l.outcome == "committed") || c.decision == "already-running" {
            w.ok += 1;
            w.reported += usize::from(fresh);
        } else if last.is_some_and(|l| l.failed()) || c.decision == "failed-before" {
            w.failed += 1;
            w.reported += usize::from(fresh);
            if w.failed_hosts.len() < MAX_NAMED {
                w.failed_hosts.push(h.host.clone());
            }
        } else if c.decision == "halted" {
            w.halted += 1;
        } else if c.decision == "wait" {
            w.waiting += 1;
        } else {
            w.running += 1;
        }
    }
    r
}

/// When the watcher wants news of a wave (see the module comment).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NewsRule {
    /// Data older than this (seconds) is no news.
    pub stale_after: u64,
    /// Share of a wave's hosts that must have reported, 0 < share <= 1.
    pub min_reported: f64,
    /// Seconds before the next wave opens by which the news must be in.
    pub lead: u64,
}

impl Default for NewsRule {
    /// Three missed pushes at the agent's default `push_interval_secs`
    /// (300); nine hosts in ten (one flaky device in a 1 % wave of 1000
    /// does not stop a rollout, two do); two default poll intervals
    /// (300 s each) for the halt to reach every device.
    fn default() -> NewsRule {
        NewsRule { stale_after: 900, min_reported: 0.9, lead: 600 }
    }
}

/// A wave whose hosts have not spoken in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Silence {
    pub group: String,
    /// 1-based: the wave that has not reported.
    pub wave: usize,
    pub reported: usize,
    pub members: usize,
    /// When the next wave opens (Unix seconds; maybe past).
    pub opens: u64,
}

/// A wave with no known host is believed empty only while the group's
/// known hosts would put fewer than this many in it (the chance that a
/// wave expecting 5 is empty by the hash's luck is below 1 %).
pub const EMPTY_EXPECTED: f64 = 5.0;

/// Every wave of a live group that owes news at `now` and has not given
/// it ([`NewsRule`], the module comment). Pure: time is an argument.
pub fn no_news(doc: &Doc, r: &Rollout, now: u64, rule: &NewsRule) -> Vec<Silence> {
    let mut out = Vec::new();
    if r.ahead > 0 {
        return out;
    }
    for g in doc.groups.iter().filter(|g| !doc.halt && !g.halt) {
        let stats: Vec<&WaveStat> = r.waves.iter().filter(|w| w.group == g.tag).collect();
        let known: usize = stats.iter().map(|w| w.members()).sum();
        let last_bp = g.waves.last().map_or(10_000, |w| w.basis_points).max(1);
        for (i, pair) in g.waves.windows(2).enumerate() {
            let (this, next) = (&pair[0], &pair[1]);
            let gap = next.start.saturating_sub(this.start);
            if gap == 0 || now.saturating_add(rule.lead.min(gap / 2)) < next.start {
                continue;
            }
            let Some(w) = stats.iter().find(|w| w.wave == i + 1) else { continue };
            let members = w.members();
            let ok = if members == 0 {
                let prev_bp = if i == 0 { 0 } else { g.waves[i - 1].basis_points };
                let share = f64::from(this.basis_points.saturating_sub(prev_bp)) / f64::from(last_bp);
                r.on_channel > 0 && (known as f64) * share < EMPTY_EXPECTED
            } else {
                enough(w.reported, members, rule.min_reported)
            };
            if !ok {
                out.push(Silence {
                    group: g.tag.clone(),
                    wave: w.wave,
                    reported: w.reported,
                    members,
                    opens: next.start,
                });
            }
        }
    }
    out
}

/// Whether `reported` of `members` is at least `share` (a hair of slack,
/// so 9 of 10 at 0.9 passes whatever the float rounding).
fn enough(reported: usize, members: usize, share: f64) -> bool {
    (reported as f64) >= share * members as f64 - 1e-9
}

/// What [`judge`] weighs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rules {
    pub max_rate: f64,
    pub min_hosts: usize,
    pub news: NewsRule,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Halt these groups: the first failing wave is `because`.
    Halt {
        groups: Vec<String>,
        because: WaveStat,
    },
    /// Halt these groups: their waves in `because` owe news (the first
    /// one is named).
    NoNews {
        groups: Vec<String>,
        because: Vec<Silence>,
    },
    /// Every group halts already (the document or each group).
    Halted,
    /// Every host is done, and nothing to halt. `halted`: some group was
    /// halted before.
    Complete {
        halted: bool,
    },
    InProgress,
}

/// Whether `failed` of `finished` passes `max_rate` (exact: no float
/// rounding decides a halt at the boundary).
fn passes(failed: usize, finished: usize, max_rate: f64) -> bool {
    finished > 0 && (failed as f64) > max_rate * finished as f64
}

pub fn judge(doc: &Doc, r: &Rollout, now: u64, rules: &Rules) -> Verdict {
    let live = |tag: &str| !doc.halt && doc.groups.iter().any(|g| g.tag == tag && !g.halt);
    if !doc.groups.iter().any(|g| live(&g.tag)) {
        return Verdict::Halted;
    }
    if let Some(bad) = r.waves.iter().find(|w| {
        live(&w.group) && w.finished() >= rules.min_hosts.max(1) && passes(w.failed, w.finished(), rules.max_rate)
    }) {
        let groups = doc
            .groups
            .iter()
            .filter(|g| live(&g.tag) && g.system.to_absolute() == bad.system)
            .map(|g| g.tag.clone())
            .collect();
        return Verdict::Halt { groups, because: bad.clone() };
    }
    let busy = r.waves.iter().any(|w| live(&w.group) && (w.waiting > 0 || w.running > 0));
    if r.on_channel > 0 && r.pending == 0 && r.ahead == 0 && !busy {
        return Verdict::Complete { halted: doc.groups.iter().any(|g| g.halt) };
    }
    let silent = no_news(doc, r, now, &rules.news);
    if !silent.is_empty() {
        let mut groups: Vec<String> = silent.iter().map(|s| s.group.clone()).collect();
        groups.dedup();
        return Verdict::NoNews { groups, because: silent };
    }
    Verdict::InProgress
}

/// One line: why a wave is no news.
pub fn explain(s: &Silence, now: u64, rule: &NewsRule) -> String {
    let when = match s.opens.checked_sub(now) {
        Some(0) | None => format!("wave {} opened {} s ago", s.wave + 1, now - s.opens),
        Some(left) => format!("wave {} opens in {left} s", s.wave + 1),
    };
    let heard = if s.members == 0 {
        "none of its hosts reports the channel".to_owned()
    } else {
        format!(
            "{} of its {} hosts reported a result on the release in the last {} s (need {}%)",
            s.reported,
            s.members,
            rule.stale_after,
            (rule.min_reported * 100.0).round()
        )
    };
    format!("no news from wave {} of group {}: {heard}; {when}", s.wave, s.group)
}

/// The halt document for `groups` of `doc` (see the module comment), to
/// be rendered, checked and signed by [`crate::channel::issue`].
pub fn halt_doc(doc: &Doc, groups: &[String], now: u64) -> Doc {
    let mut d = doc.clone();
    d.seq = doc.seq.saturating_add(1);
    d.issued = now.max(doc.issued);
    for g in &mut d.groups {
        if groups.contains(&g.tag) {
            g.halt = true;
        }
        for w in &mut g.waves {
            w.from = Start::At(w.start);
        }
    }
    d
}

/// One line per wave, for the watcher's log.
pub fn describe(w: &WaveStat) -> String {
    let mut s = format!(
        "group {} wave {}: {} ok, {} failed, {} running, {} waiting",
        w.group, w.wave, w.ok, w.failed, w.running, w.waiting
    );
    if w.halted > 0 {
        s += &format!(", {} halted", w.halted);
    }
    if w.pending > 0 {
        s += &format!(", {} on an older document", w.pending);
    }
    if w.stale > 0 {
        s += &format!(", {} STALE", w.stale);
    }
    if !w.failed_hosts.is_empty() {
        s += &format!(
            " (failed: {})",
            w.failed_hosts.iter().map(|h| crate::text::clip(h, 64)).collect::<Vec<_>>().join(", ")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::view::{ChannelInfo, LastResult};

    const S: &str = "/nix/store/qx8l0zlfvk6k8whfjvianr1mywbz9k4v-nixos-system-kiosk";
    const T: u64 = 1_800_000_000;

    pub fn doc() -> Doc {
        let body = format!(
            r#"{{"channel":"stable","seq":5,"issued":{T},"expires":{},"groups":{{
            "kiosk":{{"system":"{S}","action":"switch","waves":[{{"percent":10}},{{"percent":100,"soak_secs":3600}}]}},
            "till":{{"system":"{S}","action":"boot","waves":[{{"percent":100}}]}},
            "other":{{"system":"/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x","action":"switch","waves":[{{"percent":100,"start":{}}}]}}}}}}"#,
            T + 86_400,
            T + 100
        );
        crate::channel::parse(body.as_bytes()).unwrap()
    }

    fn host(name: &str, seq: u64, group: &str, wave: u32, decision: &str, last: Option<(&str, &str)>) -> Host {
        Host {
            host: name.into(),
            channel: Some(ChannelInfo {
                channel: "stable".into(),
                group: group.into(),
                wave,
                seq,
                system: S.into(),
                decision: decision.into(),
            }),
            last: last.map(|(o, s)| LastResult { outcome: o.into(), system: s.into(), origin: "channel".into() }),
            pushed: Some(T as f64),
            ..Host::default()
        }
    }

    fn roll(d: &Doc, hosts: &[Host]) -> Rollout {
        rollout(d, hosts, T + 10, 900)
    }

    fn rules(max_rate: f64, min_hosts: usize) -> Rules {
        Rules { max_rate, min_hosts, news: NewsRule::default() }
    }

    /// 10 hosts in kiosk wave 1: `failed` of them rolled back, the rest
    /// committed; 5 in wave 2 waiting.
    fn fleet(failed: usize) -> Vec<Host> {
        let mut v: Vec<Host> = (0..10)
            .map(|i| {
                let o = if i < failed { "rolled-back" } else { "committed" };
                host(&format!("w1-{i}"), 5, "kiosk", 1, "deploy", Some((o, S)))
            })
            .collect();
        v.extend((0..5).map(|i| host(&format!("w2-{i}"), 5, "kiosk", 2, "wait", None)));
        v
    }

    #[test]
    fn counts_each_wave() {
        let mut hosts = fleet(2);
        hosts.push(host("old-seq", 4, "kiosk", 1, "deploy", None));
        hosts.push(host("running", 5, "kiosk", 1, "deploy", Some(("committed", "/nix/store/previous"))));
        hosts.push(host("done-before", 5, "kiosk", 1, "already-running", None));
        hosts.push(host("failed-before", 5, "kiosk", 1, "failed-before", Some(("committed", "/nix/store/y"))));
        hosts.push(host("nowave", 5, "kiosk", 0, "not-in-plan", None));
        hosts.push(host("other-channel", 5, "kiosk", 1, "deploy", None));
        hosts.last_mut().unwrap().channel.as_mut().unwrap().channel = "beta".into();
        hosts.push(Host { host: "no-channel".into(), ..Host::default() });
        let r = roll(&doc(), &hosts);
        let w1 = &r.waves[0];
        assert_eq!((w1.group.as_str(), w1.wave), ("kiosk", 1));
        assert_eq!((w1.ok, w1.failed, w1.running, w1.waiting), (9, 3, 1, 0));
        assert_eq!(w1.failed_hosts, ["w1-0", "w1-1", "failed-before"]);
        assert_eq!((r.waves[1].waiting, r.pending, r.ahead, r.on_channel), (5, 1, 0, 20));
        assert_eq!(r.waves.len(), 4);
    }

    #[test]
    fn halts_above_the_threshold_only() {
        let d = doc();
        // 1 of 10 is 10 %: not above 0.1.
        assert_eq!(judge(&d, &roll(&d, &fleet(1)), T + 10, &rules(0.1, 1)), Verdict::InProgress);
        // 2 of 10 is: both groups running S halt, not the other.
        match judge(&d, &roll(&d, &fleet(2)), T + 10, &rules(0.1, 1)) {
            Verdict::Halt { groups, because } => {
                assert_eq!(groups, ["kiosk", "till"]);
                assert_eq!((because.wave, because.failed), (1, 2));
            }
            v => panic!("{v:?}"),
        }
        // Not enough finished hosts yet.
        assert_eq!(judge(&d, &roll(&d, &fleet(2)), T + 10, &rules(0.1, 11)), Verdict::InProgress);
        // Exactly at the boundary with a rate that is not a binary fraction.
        assert!(!passes(3, 10, 0.3) && passes(4, 10, 0.3) && !passes(0, 0, 0.0) && passes(1, 1, 0.0));
    }

    #[test]
    fn completes_when_every_host_is_done() {
        let d = doc();
        let all_ok: Vec<Host> =
            (0..4).map(|i| host(&format!("h{i}"), 5, "kiosk", 1 + (i % 2), "deploy", Some(("committed", S)))).collect();
        assert_eq!(judge(&d, &roll(&d, &all_ok), T + 10, &rules(0.1, 1)), Verdict::Complete { halted: false });
        assert_eq!(
            judge(&d, &roll(&d, &[]), T + 10, &rules(0.1, 1)),
            Verdict::InProgress,
            "nobody reports: not complete"
        );
        let mut ahead = all_ok.clone();
        ahead[0].channel.as_mut().unwrap().seq = 6;
        assert_eq!(judge(&d, &roll(&d, &ahead), T + 10, &rules(0.1, 1)), Verdict::InProgress);
        let mut h = d.clone();
        h.halt = true;
        assert_eq!(judge(&h, &roll(&h, &all_ok), T + 10, &rules(0.1, 1)), Verdict::Halted);
        // A group halted before does not count as running, nor does its
        // failure rate call for another halt.
        let mut g = d.clone();
        g.groups[0].halt = true;
        let mut hosts = fleet(5);
        hosts.retain(|h| h.channel.as_ref().unwrap().wave == 1);
        assert_eq!(judge(&g, &roll(&g, &hosts), T + 10, &rules(0.1, 1)), Verdict::Complete { halted: true });
    }

    /// `fleet(0)` (10 committed in kiosk wave 1, 5 waiting in wave 2) with
    /// the first `fresh` hosts of wave 1 pushing at `at`, the rest at T.
    fn pushed(fresh: usize, at: u64) -> Vec<Host> {
        let mut v = fleet(0);
        for h in v.iter_mut().take(fresh) {
            h.pushed = Some(at as f64);
        }
        v
    }

    fn silence(reported: usize, members: usize) -> Silence {
        Silence { group: "kiosk".into(), wave: 1, reported, members, opens: T + 3600 }
    }

    fn verdict(d: &Doc, hosts: &[Host], now: u64) -> Verdict {
        judge(d, &rollout(d, hosts, now, 900), now, &rules(0.1, 1))
    }

    /// Wave 2 of kiosk opens at T + 3600; with the default lead of 600 s
    /// the news of wave 1 is due at T + 3000.
    #[test]
    fn no_news_halts_before_the_next_wave_opens() {
        let d = doc();
        let due = T + 3000;
        let no_news = |s: Silence| Verdict::NoNews { groups: vec!["kiosk".into()], because: vec![s] };
        // Fresh news from all ten: going on, before and when due.
        assert_eq!(verdict(&d, &pushed(10, due - 10), due), Verdict::InProgress);
        // Stale (last pushed at T), but not due yet: the schedule decides
        // when silence matters, not the watcher's first look.
        assert_eq!(verdict(&d, &pushed(0, 0), due - 1), Verdict::InProgress);
        assert_eq!(verdict(&d, &pushed(0, 0), due), no_news(silence(0, 10)));
        // Still halted after wave 2 opened: it stops whoever has not started.
        assert_eq!(verdict(&d, &pushed(0, 0), T + 4000), no_news(silence(0, 10)));
        // 9 of 10 is the default 90 %; 8 is not.
        assert_eq!(verdict(&d, &pushed(9, due), due), Verdict::InProgress);
        assert_eq!(verdict(&d, &pushed(8, due), due), no_news(silence(8, 10)));
        // Fresh, but no result on the release yet: no news of it either.
        let mut running = pushed(10, due);
        for h in running.iter_mut().take(5) {
            h.last = None;
        }
        assert_eq!(verdict(&d, &running, due), no_news(silence(5, 10)));
        // Hosts of wave 1 still on the older document are in it (their
        // wave computed from host and channel, as the device will).
        let mut v = pushed(10, due);
        let late: Vec<Host> = (0..)
            .map(|i| host(&format!("late-{i}"), 4, "kiosk", 1, "deploy", None))
            .filter(|h| crate::channel::wave::position("stable", &h.host) < u64::MAX / 10)
            .take(3)
            .map(|h| Host { pushed: Some(due as f64), ..h })
            .collect();
        v.extend(late);
        assert_eq!(verdict(&d, &v, due), no_news(silence(10, 13)));
        // Prometheus (or the gateway) lost everything: no news at all.
        match verdict(&d, &[], due) {
            Verdict::NoNews { because, .. } => {
                assert_eq!(because, [silence(0, 0)]);
                assert_eq!(
                    explain(&because[0], due, &NewsRule::default()),
                    "no news from wave 1 of group kiosk: none of its hosts reports the channel; wave 2 opens in 600 s"
                );
            }
            v => panic!("{v:?}"),
        }
        // A newer document seen: the watcher's is outdated, no halt of it.
        let mut ahead = pushed(0, 0);
        ahead[0].channel.as_mut().unwrap().seq = 6;
        assert_eq!(verdict(&d, &ahead, due), Verdict::InProgress);
        // A failure rate above the threshold is the reason given first.
        let mut failing = pushed(0, 0);
        failing[0].last.as_mut().unwrap().outcome = "rolled-back".into();
        failing[1].last.as_mut().unwrap().outcome = "rolled-back".into();
        assert!(matches!(verdict(&d, &failing, due), Verdict::Halt { .. }));
        // A halted group owes nothing.
        let mut h = d.clone();
        h.groups[0].halt = true;
        assert_eq!(verdict(&h, &pushed(0, 0), due), Verdict::Complete { halted: true });
        // Every host done: complete, even on old news (nobody left to stop).
        let done: Vec<Host> = pushed(0, 0).into_iter().filter(|h| h.channel.as_ref().unwrap().wave == 1).collect();
        assert_eq!(verdict(&d, &done, due), Verdict::Complete { halted: false });
        // The line says why.
        assert_eq!(
            explain(&silence(8, 10), T + 4000, &NewsRule::default()),
            "no news from wave 1 of group kiosk: 8 of its 10 hosts reported a result on the release in the last 900 s \
             (need 90%); wave 2 opened 400 s ago"
        );
    }

    #[test]
    fn no_news_rule_edges() {
        let plan = |soak: u64| {
            let body = format!(
                r#"{{"channel":"stable","seq":5,"issued":{T},"expires":{},"groups":{{
                "kiosk":{{"system":"{S}","action":"switch","waves":[{{"percent":10}},{{"percent":100,"soak_secs":{soak}}}]}}}}}}"#,
                T + 86_400
            );
            crate::channel::parse(body.as_bytes()).unwrap()
        };
        let rule = NewsRule::default();
        let silent = |d: &Doc, hosts: &[Host], now: u64| no_news(d, &rollout(d, hosts, now, 900), now, &rule);
        // A soak shorter than twice the lead: news due half way.
        let d = plan(60);
        let quiet: Vec<Host> = fleet(0).into_iter().map(|h| Host { pushed: None, ..h }).collect();
        assert!(silent(&d, &quiet, T + 29).is_empty());
        assert_eq!(silent(&d, &quiet, T + 30).len(), 1);
        // Waves opening together: nothing to hold, nothing owed.
        assert!(silent(&plan(0), &[], T + 5000).is_empty());
        // The last wave owes nothing (no wave after it): `till` and
        // `other` of doc() have one wave each and no hosts.
        let s = silent(&doc(), &[], T + 5000);
        assert_eq!(s.iter().map(|s| s.group.as_str()).collect::<Vec<_>>(), ["kiosk"]);
        // An empty 10 % wave is believed when the group's known hosts would
        // put fewer than EMPTY_EXPECTED in it, not when they would put more.
        let wave2 = |n: usize| -> Vec<Host> {
            (0..n)
                .map(|i| Host { pushed: Some(T as f64), ..host(&format!("h{i}"), 5, "kiosk", 2, "wait", None) })
                .collect()
        };
        assert!(silent(&d, &wave2(20), T + 30).is_empty(), "2 expected");
        assert_eq!(silent(&d, &wave2(100), T + 30).len(), 1, "10 expected");
        // A stricter share, and a share of 1: every host.
        let all = NewsRule { min_reported: 1.0, ..rule };
        let d = doc();
        assert_eq!(no_news(&d, &rollout(&d, &pushed(9, T + 3000), T + 3000, 900), T + 3000, &all).len(), 1);
        assert!(no_news(&d, &rollout(&d, &pushed(10, T + 3000), T + 3000, 900), T + 3000, &all).is_empty());
        // The freshness boundary: exactly stale_after old is fresh.
        let h = Host { pushed: Some((T - 900) as f64), ..Host::default() };
        assert!(fresh(&h, T, 900) && !fresh(&h, T + 1, 900));
        assert!(!fresh(&Host::default(), T, 900), "no push time is no news");
        let agent_only = Host { last_push: Some(T as f64), ..Host::default() };
        assert!(fresh(&agent_only, T, 900));
    }

    #[test]
    fn the_status_lines_say_what_is_stale() {
        let d = doc();
        let mut hosts = pushed(3, T + 3000);
        hosts.push(Host { pushed: Some((T + 3000) as f64), ..host("late", 4, "kiosk", 1, "deploy", None) });
        let r = rollout(&d, &hosts, T + 3000, 900);
        assert_eq!((r.stale, r.on_channel, r.newest_push), (12, 16, Some((T + 3000) as f64)));
        let w1 = describe(&r.waves[0]);
        let w2 = describe(&r.waves[1]);
        let pending = if w1.contains("older") { &w1 } else { &w2 };
        assert!(pending.contains(", 1 on an older document"), "{w1} / {w2}");
        assert!(
            w1.starts_with("group kiosk wave 1: 10 ok, 0 failed, 0 running, 0 waiting") && w1.contains(", 7 STALE"),
            "{w1}"
        );
        assert!(w2.ends_with(", 5 STALE"), "{w2}");
    }

    #[test]
    fn the_halt_document_halts_and_keeps_the_other_groups_on_time() {
        let d = doc();
        let now = T + 7_000;
        let h = halt_doc(&d, &["kiosk".into(), "till".into()], now);
        let body = crate::channel::render(&h).unwrap();
        let sk = crate::nix::SecretKey::generate("admin-1").unwrap();
        let (back, sig) = crate::channel::issue(body.as_bytes(), &sk, now).unwrap();
        assert_eq!((back.seq, back.issued, back.expires, back.halt), (6, now, d.expires, false));
        assert_eq!(back.groups.iter().map(|g| g.halt).collect::<Vec<_>>(), [true, true, false]);
        // Every wave starts when it did, soak or not.
        for (a, b) in back.groups.iter().zip(&d.groups) {
            assert_eq!(
                a.waves.iter().map(|w| w.start).collect::<Vec<_>>(),
                b.waves.iter().map(|w| w.start).collect::<Vec<_>>()
            );
        }
        // A device not yet started, in the halted group: Halted. In the
        // other group: its wave as before.
        let keys = crate::nix::TrustedKeys::new(vec![sk.public()]);
        let v = crate::channel::verify(body.as_bytes(), Some(sig.as_bytes()), &keys, "stable").unwrap();
        let tags = ["kiosk".to_owned()];
        let dev = crate::channel::Device { host: "never-started", tags: &tags, running: None, profile: None };
        let rec = crate::channel::Record { seq: 5, ..Default::default() };
        assert_eq!(crate::channel::decide(&v, &dev, &rec, now), Ok(crate::channel::Decision::Halted));
        let tags = ["other".to_owned()];
        let dev = crate::channel::Device { tags: &tags, ..dev };
        assert_eq!(crate::channel::decide(&v, &dev, &rec, now).unwrap().name(), "deploy");
    }
}
