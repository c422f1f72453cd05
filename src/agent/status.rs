//! What the agent tells the world: `GET /v1/status` (JSON) and
//! `GET /metrics` (Prometheus text format). Pure renderers over a snapshot.

use super::machine::{Outcome, Phase, State};
use crate::json::string as json_string;

/// Progress of the current fetch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub paths_done: u64,
    pub paths_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

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
}

/// Longest message (a reason, an error) status carries: they can hold text
/// from caches, documents and helpers' output.
const MESSAGE_MAX: usize = 2048;

fn opt_str(s: &Option<String>) -> String {
    s.as_deref().map(|s| json_string(&crate::text::bound(s, MESSAGE_MAX))).unwrap_or_else(|| "null".into())
}

fn opt_num(n: Option<u64>) -> String {
    n.map(|n| n.to_string()).unwrap_or_else(|| "null".into())
}

pub fn status_json(s: &Snapshot) -> String {
    let st = &s.state;
    let mut out = format!(
        "{{\"host\":{},\"version\":{},\"current_system\":{},\"booted_system\":{},\"profile_system\":{},\"phase\":\"{}\",\"highest_seq\":{},",
        json_string(&s.host),
        json_string(s.version),
        opt_str(&s.current_system),
        opt_str(&s.booted_system),
        opt_str(&s.profile_system),
        st.phase.name(),
        st.highest_seq
    );
    let p = &s.progress;
    out += &format!(
        "\"progress\":{{\"paths_done\":{},\"paths_total\":{},\"bytes_done\":{},\"bytes_total\":{}}},",
        p.paths_done, p.paths_total, p.bytes_done, p.bytes_total
    );
    match &st.job {
        Some(j) => {
            out += &format!(
                "\"job\":{{\"seq\":{},\"action\":\"{}\",\"system\":{},\"previous\":{},\"started\":{},\"failure\":{}}},",
                j.seq,
                j.action.as_str(),
                json_string(&j.system),
                opt_str(&j.previous),
                j.started,
                opt_str(&j.failure)
            );
        }
        None => out += "\"job\":null,",
    }
    if let Phase::Verifying { deadline } = st.phase {
        out += &format!("\"health_deadline\":{deadline},");
    }
    match &st.last {
        Some(l) => {
            out += &format!(
                "\"last_result\":{{\"seq\":{},\"action\":\"{}\",\"system\":{},\"outcome\":\"{}\",\"reason\":{},\"finished\":{}}},",
                l.seq,
                l.action.as_str(),
                json_string(&l.system),
                l.outcome.as_str(),
                opt_str(&l.reason),
                l.finished
            );
        }
        None => out += "\"last_result\":null,",
    }
    out += &format!(
        "\"last_error\":{},\"last_rejection\":{},\"poll\":{{\"url\":{},\"last_check\":{},\"error\":{}}},\"started\":{}}}",
        opt_str(&s.last_error),
        opt_str(&s.last_rejection),
        opt_str(&s.poll_url),
        opt_num(s.poll_last_check),
        opt_str(&s.poll_error),
        s.started
    );
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
        };
        snap.state = step(&snap.state, ev, 5, Timing { health_timeout_secs: 1, boot_when_inhibited: false }).0;
        snap.progress = Progress { paths_done: 1, paths_total: 4, bytes_done: 10, bytes_total: 40 };
        let j = status_json(&snap);
        assert!(
            j.contains("\"phase\":\"fetching\"") && j.contains("\"paths_total\":4") && j.contains("kiosk-\\\"7\\\""),
            "{j}"
        );
        // It is valid JSON: parse it back with the same JSON reader.
        #[derive(serde::Deserialize)]
        struct Probe {
            highest_seq: u64,
            phase: String,
        }
        let mut scratch = vec![0u8; j.len()];
        let (p, _): (Probe, _) = serde_json_core::from_slice_escaped(j.as_bytes(), &mut scratch).unwrap();
        assert_eq!((p.highest_seq, p.phase.as_str()), (3, "fetching"));
        let m = metrics(&snap);
        assert!(m.contains("nixless_phase{phase=\"fetching\"} 1\n"));
        assert!(m.contains("nixless_phase{phase=\"idle\"} 0\n"));
        for line in m.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok() && name.starts_with("nixless_"), "{line}");
        }
    }
}
