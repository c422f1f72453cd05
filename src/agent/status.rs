//! What the agent tells the world: `GET /v1/status` (JSON) and
//! `GET /metrics` (Prometheus text format, version 0.0.4: also what is
//! pushed to a Pushgateway). Pure renderers over a snapshot.
//!
//! ```text
//! metrics = { "# HELP " name " " text "\n" "# TYPE " name " " type "\n" { sample } }
//! sample  = name [ "{" label "=\"" value "\"" { "," … } "}" ] " " number "\n"
//! value   = label text, `\` `"` and newline escaped (\\ \" \n), cut to LABEL_MAX bytes
//! ```

use super::machine::{Outcome, Phase, State};
use crate::api;

/// Progress of the current fetch.
pub use crate::api::Progress;

/// Everything status and metrics show.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub host: String,
    pub version: &'static str,
    pub current_system: Option<String>,
    pub booted_system: Option<String>,
    pub profile_system: Option<String>,
    pub state: State,
    pub progress: Progress,
    pub last_error: Option<String>,
    /// The last refused deploy request or polled document, and why.
    pub last_rejection: Option<String>,
    pub bytes_fetched_total: u64,
    pub poll_url: Option<String>,
    pub poll_last_check: Option<u64>,
    pub poll_error: Option<String>,
    pub started: u64,
    pub watchdog_pings: u64,
    pub rejected_requests: u64,
    /// Pushes to a Pushgateway, when one is configured.
    pub push: Option<api::Push>,
    /// The channel followed, when one (or a keys URL) is configured.
    pub channel: Option<api::Channel>,
}

/// Longest message (a reason, an error) status carries: they can hold text
/// from caches, documents and helpers' output.
const MESSAGE_MAX: usize = 2048;

/// An optional message, clipped to [`MESSAGE_MAX`].
fn msg(s: &Option<String>) -> Option<String> {
    s.as_deref().map(|s| crate::text::bound(s, MESSAGE_MAX).into_owned())
}

/// The status response; its JSON comes from [`api::Status`], which the
/// admin side reads back.
pub fn status(s: &Snapshot) -> api::Status {
    let st = &s.state;
    api::Status {
        host: s.host.clone(),
        version: s.version.to_owned(),
        current_system: msg(&s.current_system),
        booted_system: msg(&s.booted_system),
        profile_system: msg(&s.profile_system),
        phase: st.phase.name().to_owned(),
        highest_seq: st.highest_seq,
        progress: s.progress,
        job: st.job.as_ref().map(|j| api::Job {
            seq: j.seq,
            action: j.action.as_str().to_owned(),
            system: j.system.clone(),
            previous: msg(&j.previous),
            started: j.started,
            failure: msg(&j.failure),
            origin: Some(j.origin.as_str().to_owned()),
        }),
        health_deadline: match st.phase {
            Phase::Verifying { deadline } => Some(deadline),
            _ => None,
        },
        last_result: st.last.as_ref().map(|l| api::LastResult {
            seq: l.seq,
            action: l.action.as_str().to_owned(),
            system: l.system.clone(),
            outcome: l.outcome.as_str().to_owned(),
            reason: msg(&l.reason),
            finished: l.finished,
            origin: Some(l.origin.as_str().to_owned()),
        }),
        last_error: msg(&s.last_error),
        last_rejection: msg(&s.last_rejection),
        poll: api::Poll { url: msg(&s.poll_url), last_check: s.poll_last_check, error: msg(&s.poll_error) },
        started: s.started,
        push: s.push.as_ref().map(|p| api::Push {
            url: crate::text::bound(&p.url, MESSAGE_MAX).into_owned(),
            error: msg(&p.error),
            ..p.clone()
        }),
        channel: s.channel.as_ref().map(|c| api::Channel {
            url: msg(&c.url),
            failed_system: msg(&c.failed_system),
            error: msg(&c.error),
            keys_url: msg(&c.keys_url),
            keys_error: msg(&c.keys_error),
            ..c.clone()
        }),
    }
}

/// Longest label value: a store path is under 256 bytes; anything longer
/// is cut (on a character boundary), so one odd value cannot bloat every push.
const LABEL_MAX: usize = 512;

/// A label value in the text format's escaping: backslash, double quote
/// and line feed escaped; cut to [`LABEL_MAX`] bytes before escaping.
fn label(v: &str) -> String {
    let mut end = v.len().min(LABEL_MAX);
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(end + 8);
    for c in v.get(..end).unwrap_or_default().chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

const PHASES: [&str; 8] =
    ["idle", "fetching", "switching", "verifying", "committing", "rolling-back", "collecting", "awaiting-reboot"];

pub fn metrics(s: &Snapshot) -> String {
    let st = &s.state;
    let mut out = String::new();
    out +=
        "# HELP nixless_phase Current phase of the update state machine (1 = current).\n# TYPE nixless_phase gauge\n";
    for p in PHASES {
        out += &format!("nixless_phase{{phase=\"{p}\"}} {}\n", u8::from(st.phase.name() == p));
    }
    out += "# HELP nixless_highest_seq Highest deploy sequence number accepted.\n# TYPE nixless_highest_seq gauge\n";
    out += &format!("nixless_highest_seq {}\n", st.highest_seq);
    out += "# HELP nixless_deploys_total Finished deploys by outcome.\n# TYPE nixless_deploys_total counter\n";
    for (o, n) in Outcome::ALL.iter().zip(st.outcomes) {
        out += &format!("nixless_deploys_total{{outcome=\"{}\"}} {n}\n", o.as_str());
    }
    out += "# HELP nixless_last_result Outcome of the last finished deploy (1 = that outcome).\n# TYPE nixless_last_result gauge\n";
    for o in Outcome::ALL {
        let v = st.last.as_ref().is_some_and(|l| l.outcome == o);
        out += &format!("nixless_last_result{{outcome=\"{}\"}} {}\n", o.as_str(), u8::from(v));
    }
    if let Some(l) = &st.last {
        out += "# HELP nixless_last_result_timestamp_seconds When the last deploy finished.\n# TYPE nixless_last_result_timestamp_seconds gauge\n";
        out += &format!("nixless_last_result_timestamp_seconds {}\n", l.finished);
    }
    out += "# HELP nixless_bytes_fetched_total NAR bytes fetched and installed since start.\n# TYPE nixless_bytes_fetched_total counter\n";
    out += &format!("nixless_bytes_fetched_total {}\n", s.bytes_fetched_total);
    out += "# HELP nixless_fetch_progress_bytes Bytes of the current fetch done and in total.\n# TYPE nixless_fetch_progress_bytes gauge\n";
    out += &format!("nixless_fetch_progress_bytes{{kind=\"done\"}} {}\n", s.progress.bytes_done);
    out += &format!("nixless_fetch_progress_bytes{{kind=\"total\"}} {}\n", s.progress.bytes_total);
    out += "# HELP nixless_rejected_requests_total Deploy requests refused.\n# TYPE nixless_rejected_requests_total counter\n";
    out += &format!("nixless_rejected_requests_total {}\n", s.rejected_requests);
    out += "# HELP nixless_watchdog_pings_total systemd watchdog pings sent.\n# TYPE nixless_watchdog_pings_total counter\n";
    out += &format!("nixless_watchdog_pings_total {}\n", s.watchdog_pings);
    out += "# HELP nixless_poll_error 1 if the last poll of the deploy document failed.\n# TYPE nixless_poll_error gauge\n";
    out += &format!("nixless_poll_error {}\n", u8::from(s.poll_error.is_some()));
    out += "# HELP nixless_system_info The system each link points at (current, booted, profile); always 1.\n# TYPE nixless_system_info gauge\n";
    for (kind, sys) in [("current", &s.current_system), ("booted", &s.booted_system), ("profile", &s.profile_system)] {
        if let Some(sys) = sys {
            out += &format!("nixless_system_info{{kind=\"{kind}\",system=\"{}\"}} 1\n", label(sys));
        }
    }
    if let Some(l) = &st.last {
        out += "# HELP nixless_last_result_seq Sequence number of the last finished deploy.\n# TYPE nixless_last_result_seq gauge\n";
        out += &format!("nixless_last_result_seq {}\n", l.seq);
    }
    if let Some(l) = &st.last {
        out += "# HELP nixless_last_result_info The last finished deploy: outcome, system and origin; always 1.\n# TYPE nixless_last_result_info gauge\n";
        out += &format!(
            "nixless_last_result_info{{outcome=\"{}\",system=\"{}\",origin=\"{}\"}} 1\n",
            l.outcome.as_str(),
            label(&l.system),
            l.origin.as_str()
        );
    }
    if let Some(c) = s.channel.as_ref().filter(|c| c.seq.is_some()) {
        out += "# HELP nixless_channel_info The verified channel document held and this device's place in it; always 1.\n# TYPE nixless_channel_info gauge\n";
        out += &format!(
            "nixless_channel_info{{channel=\"{}\",group=\"{}\",wave=\"{}\",seq=\"{}\",system=\"{}\",decision=\"{}\"}} 1\n",
            label(c.name.as_deref().unwrap_or_default()),
            label(c.group.as_deref().unwrap_or_default()),
            c.wave.unwrap_or(0),
            c.seq.unwrap_or(0),
            label(c.system.as_deref().unwrap_or_default()),
            label(c.decision.as_deref().unwrap_or_default()),
        );
    }
    out += "# HELP nixless_push_errors_total Failed pushes to the Pushgateway since start.\n# TYPE nixless_push_errors_total counter\n";
    out += &format!("nixless_push_errors_total {}\n", s.push.as_ref().map_or(0, |p| p.errors));
    if let Some(t) = s.push.as_ref().and_then(|p| p.last_ok) {
        out += "# HELP nixless_last_push_timestamp_seconds When metrics were last pushed to the Pushgateway.\n# TYPE nixless_last_push_timestamp_seconds gauge\n";
        out += &format!("nixless_last_push_timestamp_seconds {t}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::machine::{step, Event, Timing};
    use crate::deploy::Action;

    #[test]
    fn status_is_json_and_metrics_are_prometheus() {
        let mut snap = Snapshot { host: "kiosk-\"7\"".into(), version: "0.1.0", ..Snapshot::default() };
        let ev = Event::Accepted {
            seq: 3,
            action: Action::Switch,
            system: "/nix/store/x".into(),
            previous: None,
            boot_id: None,
            origin: crate::agent::machine::Origin::Deploy,
        };
        snap.state = step(&snap.state, ev, 5, Timing { health_timeout_secs: 1, boot_when_inhibited: false }).0;
        snap.progress = Progress { paths_done: 1, paths_total: 4, bytes_done: 10, bytes_total: 40 };
        let j = crate::json::to_string(&status(&snap)).unwrap();
        assert!(
            j.contains("\"phase\":\"fetching\"") && j.contains("\"paths_total\":4") && j.contains("kiosk-\\\"7\\\""),
            "{j}"
        );
        // It reads back as what the admin side reads.
        let p: crate::api::Status = crate::json::from_slice_bounded(j.as_bytes()).unwrap();
        assert_eq!(p, status(&snap));
        assert_eq!((p.highest_seq, p.phase.as_str(), p.job.unwrap().seq), (3, "fetching", 3));
        let m = metrics(&snap);
        assert!(m.contains("nixless_phase{phase=\"fetching\"} 1\n"));
        assert!(m.contains("nixless_phase{phase=\"idle\"} 0\n"));
        for line in m.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok() && name.starts_with("nixless_"), "{line}");
        }
    }

    /// What a fleet view reads: the systems as info labels, escaped per the
    /// text format and bounded; the last outcome's seq; the push counters.
    #[test]
    fn fleet_metrics_escape_and_bound_label_values() {
        let odd = "/nix/store/x-a\\b\"c\nd";
        let snap = Snapshot {
            current_system: Some(odd.into()),
            booted_system: Some(format!("/nix/store/{}", "é".repeat(400))),
            push: Some(api::Push { url: "http://gw".into(), last_ok: Some(77), error: None, errors: 3 }),
            ..Snapshot::default()
        };
        let m = metrics(&snap);
        assert!(m.contains("nixless_system_info{kind=\"current\",system=\"/nix/store/x-a\\\\b\\\"c\\nd\"} 1\n"), "{m}");
        let booted = m.lines().find(|l| l.contains("kind=\"booted\"")).unwrap();
        assert!(booted.len() < LABEL_MAX + 64 && booted.ends_with("\"} 1"), "{booted}");
        assert!(!m.contains("kind=\"profile\""), "no profile link, no line");
        assert!(m.contains("nixless_push_errors_total 3\n") && m.contains("nixless_last_push_timestamp_seconds 77\n"));
        assert!(!m.contains("nixless_last_result_seq"), "no deploy yet");
        for line in m.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.rsplit_once(' ').is_some_and(|(_, v)| v.parse::<f64>().is_ok()), "{line}");
        }
        let s = status(&snap);
        assert_eq!(s.push.map(|p| (p.errors, p.last_ok)), Some((3, Some(77))));
        assert_eq!(status(&Snapshot::default()).push, None);
    }

    /// The names `nixless fleet status` and `rollout watch` read (issue 13):
    /// exactly these metric and label names, values escaped.
    #[test]
    fn channel_and_last_result_info() {
        use crate::agent::machine::{Last, Origin};
        let mut snap = Snapshot::default();
        assert!(!metrics(&snap).contains("nixless_channel_info"), "no channel, no line");
        snap.channel = Some(api::Channel { url: Some("file:///c".into()), ..api::Channel::default() });
        assert!(!metrics(&snap).contains("nixless_channel_info"), "no verified document held, no line");
        snap.channel = Some(api::Channel {
            name: Some("stable".into()),
            seq: Some(12),
            decision: Some("failed-before".into()),
            group: Some("kio\"sk".into()),
            wave: Some(2),
            system: Some("/nix/store/s".into()),
            ..api::Channel::default()
        });
        snap.state.last = Some(Last {
            seq: 12,
            action: crate::deploy::Action::Switch,
            system: "/nix/store/s\n".into(),
            outcome: Outcome::RolledBack,
            reason: None,
            finished: 3,
            origin: Origin::Channel,
        });
        let m = metrics(&snap);
        assert!(
            m.contains("nixless_channel_info{channel=\"stable\",group=\"kio\\\"sk\",wave=\"2\",seq=\"12\",system=\"/nix/store/s\",decision=\"failed-before\"} 1\n"),
            "{m}"
        );
        assert!(
            m.contains(
                "nixless_last_result_info{outcome=\"rolled-back\",system=\"/nix/store/s\\n\",origin=\"channel\"} 1\n"
            ),
            "{m}"
        );
        snap.channel = Some(api::Channel {
            name: Some("stable".into()),
            seq: Some(1),
            decision: Some("not-for-me".into()),
            ..api::Channel::default()
        });
        assert!(metrics(&snap).contains("nixless_channel_info{channel=\"stable\",group=\"\",wave=\"0\",seq=\"1\",system=\"\",decision=\"not-for-me\"} 1\n"));
    }

    /// Messages from caches, documents and helpers reach status whatever
    /// they hold: they come back intact (or clipped, when long) and the
    /// response stays one line of JSON.
    #[test]
    fn status_carries_hostile_and_long_messages() {
        use crate::json::HOSTILE;
        let long = format!("{HOSTILE}{}", "€".repeat(3 * MESSAGE_MAX));
        let snap = Snapshot {
            host: HOSTILE.into(),
            version: "0.1.0",
            current_system: Some(HOSTILE.into()),
            last_error: Some(long.clone()),
            last_rejection: Some(HOSTILE.into()),
            poll_url: Some(HOSTILE.into()),
            poll_error: Some(long),
            ..Snapshot::default()
        };
        let j = crate::json::to_string(&status(&snap)).unwrap();
        assert!(!j.bytes().any(|b| b < 0x20), "{j}");
        let back: crate::api::Status = crate::json::from_slice_bounded(j.as_bytes()).unwrap();
        assert_eq!((back.host.as_str(), back.current_system.as_deref()), (HOSTILE, Some(HOSTILE)));
        assert_eq!(back.last_rejection.as_deref(), Some(HOSTILE));
        let err = back.last_error.unwrap();
        assert!(err.starts_with(HOSTILE) && err.ends_with("bytes)"), "clipped: {err}");
        assert!(err.chars().count() < MESSAGE_MAX + 24, "{}", err.chars().count());
    }
}
