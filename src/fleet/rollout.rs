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
//! ```
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
    /// Up to [`MAX_NAMED`] failed hosts, for the log line.
    pub failed_hosts: Vec<String>,
}

/// Most failed hosts named per wave.
pub const MAX_NAMED: usize = 10;

impl WaveStat {
    pub fn finished(&self) -> usize {
        self.ok + self.failed
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
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
}

pub fn rollout(doc: &Doc, hosts: &[Host]) -> Rollout {
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
        if c.seq < doc.seq {
            r.pending += 1;
            continue;
        }
        if c.seq > doc.seq {
            r.ahead += 1;
            continue;
        }
        let Some(w) = r.waves.iter_mut().find(|w| w.group == c.group && w.wave as u64 == u64::from(c.wave)) else {
            continue; // not-for-me, not-in-plan, or a wave the document does not have
        };
        let last = h.last.as_ref().filter(|l| l.system == w.system);
        if last.is_some_and(|l| l.outcome == "committed") || c.decision == "already-running" {
            w.ok += 1;
        } else if last.is_some_and(|l| l.failed()) || c.decision == "failed-before" {
            w.failed += 1;
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

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Halt these groups: the first failing wave is `because`.
    Halt {
        groups: Vec<String>,
        because: WaveStat,
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

pub fn judge(doc: &Doc, r: &Rollout, max_rate: f64, min_hosts: usize) -> Verdict {
    let live = |tag: &str| !doc.halt && doc.groups.iter().any(|g| g.tag == tag && !g.halt);
    if !doc.groups.iter().any(|g| live(&g.tag)) {
        return Verdict::Halted;
    }
    if let Some(bad) = r
        .waves
        .iter()
        .find(|w| live(&w.group) && w.finished() >= min_hosts.max(1) && passes(w.failed, w.finished(), max_rate))
    {
        let groups = doc
            .groups
            .iter()
            .filter(|g| live(&g.tag) && g.system.to_absolute() == bad.system)
            .map(|g| g.tag.clone())
            .collect();
        return Verdict::Halt { groups, because: bad.clone() };
    }
    let busy = r.waves.iter().any(|w| live(&w.group) && (w.waiting > 0 || w.running > 0));
    if r.on_channel == 0 || r.pending > 0 || r.ahead > 0 || busy {
        return Verdict::InProgress;
    }
    Verdict::Complete { halted: doc.groups.iter().any(|g| g.halt) }
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
            ..Host::default()
        }
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
        let r = rollout(&doc(), &hosts);
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
        assert_eq!(judge(&d, &rollout(&d, &fleet(1)), 0.1, 1), Verdict::InProgress);
        // 2 of 10 is: both groups running S halt, not the other.
        match judge(&d, &rollout(&d, &fleet(2)), 0.1, 1) {
            Verdict::Halt { groups, because } => {
                assert_eq!(groups, ["kiosk", "till"]);
                assert_eq!((because.wave, because.failed), (1, 2));
            }
            v => panic!("{v:?}"),
        }
        // Not enough finished hosts yet.
        assert_eq!(judge(&d, &rollout(&d, &fleet(2)), 0.1, 11), Verdict::InProgress);
        // Exactly at the boundary with a rate that is not a binary fraction.
        assert!(!passes(3, 10, 0.3) && passes(4, 10, 0.3) && !passes(0, 0, 0.0) && passes(1, 1, 0.0));
    }

    #[test]
    fn completes_when_every_host_is_done() {
        let d = doc();
        let all_ok: Vec<Host> =
            (0..4).map(|i| host(&format!("h{i}"), 5, "kiosk", 1 + (i % 2), "deploy", Some(("committed", S)))).collect();
        assert_eq!(judge(&d, &rollout(&d, &all_ok), 0.1, 1), Verdict::Complete { halted: false });
        assert_eq!(judge(&d, &rollout(&d, &[]), 0.1, 1), Verdict::InProgress, "nobody reports: not complete");
        let mut ahead = all_ok.clone();
        ahead[0].channel.as_mut().unwrap().seq = 6;
        assert_eq!(judge(&d, &rollout(&d, &ahead), 0.1, 1), Verdict::InProgress);
        let mut h = d.clone();
        h.halt = true;
        assert_eq!(judge(&h, &rollout(&h, &all_ok), 0.1, 1), Verdict::Halted);
        // A group halted before does not count as running, nor does its
        // failure rate call for another halt.
        let mut g = d.clone();
        g.groups[0].halt = true;
        let mut hosts = fleet(5);
        hosts.retain(|h| h.channel.as_ref().unwrap().wave == 1);
        assert_eq!(judge(&g, &rollout(&g, &hosts), 0.1, 1), Verdict::Complete { halted: true });
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
