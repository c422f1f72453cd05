//! The agent's state on disk: `<state_dir>/state.json`, replaced atomically
//! and durably (temp file, fsync, rename, fsync dir) at every transition,
//! so kill -9 or a power cut leaves the old or the new state, never a mix.
//! A small append-only event log (`events.log`) keeps the last transitions
//! for operators.
//!
//! ```text
//! {"version":1,"highest_seq":N,"next_switch_id":N,"phase":"idle|fetching|switching|verifying|committing|collecting",
//!  "step":"test|boot|rollback-test"?,"switch_id":N?,"deadline":N?,
//!  "job":{"seq","action","system","previous"?,"started","transitions","failure"?,"boot_id"?}?,
//!  "last":{"seq","action","system","outcome","reason"?,"finished"}?,
//!  "outcomes":[committed,rolled-back,rollback-failed,rejected,failed,collected],
//!  "clock_floor":N?,                                   ; newest verified `issued`
//!  "channel":{"seq":N,"digest":B64?,"failed":S?}?,      ; the channel Record
//!  "rotation":{"seq":N,"digest":B64,"base":B64,"keys":[S…]}?}
//! ```
//! `job` and `last` carry `"origin":"channel"` for a channel job (absent:
//! a deploy document). Every field added since version 1 is optional and
//! left out when empty, so an older state file reads as before and a
//! device that never followed a channel writes the same bytes as before.

use super::machine::{Job, Last, Origin, Outcome, Phase, State};
use crate::channel::keys::Applied;
use crate::channel::Record;
use crate::deploy::Action;
use crate::nix::base64;
use crate::store::fsutil;
use crate::switch::protocol::Step;
use rustix::fd::AsFd;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

pub const STATE_FILE: &str = "state.json";
pub const EVENT_LOG: &str = "events.log";
/// The event log is cut to its newest half past this size.
const EVENT_LOG_MAX: u64 = 256 << 10;

/// The state as written: [`Wire`], the struct [`from_json`] reads.
pub fn to_json(s: &State) -> Result<String, crate::json::TooLarge> {
    let (step, switch_id, deadline) = match &s.phase {
        Phase::Switching { step, id } => (Some(step.as_str().to_owned()), Some(*id), None),
        Phase::Verifying { deadline } => (None, None, Some(*deadline)),
        _ => (None, None, None),
    };
    let w = Wire {
        version: 1,
        highest_seq: s.highest_seq,
        next_switch_id: s.next_switch_id,
        phase: phase_key(&s.phase).to_owned(),
        step,
        switch_id,
        deadline,
        job: s.job.as_ref().map(|j| WireJob {
            seq: j.seq,
            action: j.action.as_str().to_owned(),
            system: j.system.clone(),
            previous: j.previous.clone(),
            started: j.started,
            transitions: j.transitions,
            failure: j.failure.clone(),
            boot_id: j.boot_id.clone(),
            booted_new: j.booted_new,
            origin: origin_out(j.origin),
        }),
        last: s.last.as_ref().map(|l| WireLast {
            seq: l.seq,
            action: l.action.as_str().to_owned(),
            system: l.system.clone(),
            outcome: l.outcome.as_str().to_owned(),
            reason: l.reason.clone(),
            finished: l.finished,
            origin: origin_out(l.origin),
        }),
        outcomes: s.outcomes.to_vec(),
        clock_floor: (s.clock_floor > 0).then_some(s.clock_floor),
        channel: (s.channel != Record::default()).then(|| WireChannel {
            seq: s.channel.seq,
            digest: s.channel.digest.map(|d| base64::encode(&d)),
            failed: s.channel.failed.clone(),
        }),
        rotation: s.rotation.as_ref().map(|a| WireRotation {
            seq: a.seq,
            digest: base64::encode(&a.digest),
            base: base64::encode(&a.base),
            keys: a.keys.clone(),
        }),
    };
    crate::json::to_string(&w)
}

/// The phase as stored (unlike `Phase::name`, rolling back is `switching`
/// with step `rollback-test`).
fn phase_key(p: &Phase) -> &'static str {
    match p {
        Phase::Idle => "idle",
        Phase::Fetching => "fetching",
        Phase::Switching { .. } => "switching",
        Phase::Verifying { .. } => "verifying",
        Phase::Committing => "committing",
        Phase::Collecting => "collecting",
        Phase::AwaitingReboot => "awaiting-reboot",
    }
}

fn origin_out(o: Origin) -> Option<String> {
    (o == Origin::Channel).then(|| o.as_str().to_owned())
}

fn origin_in(o: Option<&str>) -> Result<Origin, String> {
    match o {
        None | Some("deploy") => Ok(Origin::Deploy),
        Some("channel") => Ok(Origin::Channel),
        Some(o) => Err(format!("unknown origin {o:?}")),
    }
}

fn digest_in(what: &str, b: &str) -> Result<[u8; 32], String> {
    base64::decode_exact::<32>(b.as_bytes()).ok_or(format!("{what}: not 32 bytes of base64"))
}

#[derive(Serialize, Deserialize)]
struct WireChannel {
    seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failed: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct WireRotation {
    seq: u64,
    digest: String,
    base: String,
    keys: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct WireJob {
    seq: u64,
    action: String,
    system: String,
    previous: Option<String>,
    started: u64,
    transitions: u32,
    failure: Option<String>,
    boot_id: Option<String>,
    #[serde(default)]
    booted_new: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    origin: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct WireLast {
    seq: u64,
    action: String,
    system: String,
    outcome: String,
    reason: Option<String>,
    finished: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    origin: Option<String>,
}

/// `state.json`. Absent optional fields are left out, not `null`.
#[derive(Serialize, Deserialize)]
struct Wire {
    version: u32,
    highest_seq: u64,
    next_switch_id: u64,
    phase: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    step: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    switch_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    deadline: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    job: Option<WireJob>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last: Option<WireLast>,
    outcomes: Vec<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    clock_floor: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    channel: Option<WireChannel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rotation: Option<WireRotation>,
}

pub fn from_json(bytes: &[u8]) -> Result<State, String> {
    let w: Wire = crate::json::from_slice_bounded(bytes).map_err(|e| e.to_string())?;
    if w.version != 1 {
        return Err(format!("unknown state version {}", w.version));
    }
    let action = |a: &str| Action::parse(a).ok_or(format!("unknown action {a:?}"));
    let phase = match (w.phase.as_str(), &w.step, w.switch_id, w.deadline) {
        ("idle", ..) => Phase::Idle,
        ("fetching", ..) => Phase::Fetching,
        ("switching", Some(step), Some(id), _) => {
            Phase::Switching { step: Step::parse(step).ok_or(format!("unknown step {step:?}"))?, id }
        }
        ("verifying", _, _, Some(deadline)) => Phase::Verifying { deadline },
        ("committing", ..) => Phase::Committing,
        ("collecting", ..) => Phase::Collecting,
        ("awaiting-reboot", ..) => Phase::AwaitingReboot,
        (p, ..) => return Err(format!("bad phase {p:?}")),
    };
    let job = match w.job {
        Some(j) => Some(Job {
            seq: j.seq,
            action: action(&j.action)?,
            system: j.system,
            previous: j.previous,
            started: j.started,
            transitions: j.transitions,
            failure: j.failure,
            boot_id: j.boot_id,
            booted_new: j.booted_new,
            origin: origin_in(j.origin.as_deref())?,
        }),
        None => None,
    };
    let last = match w.last {
        Some(l) => Some(Last {
            seq: l.seq,
            action: action(&l.action)?,
            system: l.system,
            outcome: Outcome::parse(&l.outcome).ok_or(format!("unknown outcome {:?}", l.outcome))?,
            reason: l.reason,
            finished: l.finished,
            origin: origin_in(l.origin.as_deref())?,
        }),
        None => None,
    };
    let channel = match w.channel {
        Some(c) => Record {
            seq: c.seq,
            digest: c.digest.map(|d| digest_in("channel digest", &d)).transpose()?,
            failed: c.failed,
        },
        None => Record::default(),
    };
    let rotation = match w.rotation {
        Some(r) => Some(Applied {
            seq: r.seq,
            digest: digest_in("rotation digest", &r.digest)?,
            base: digest_in("rotation base", &r.base)?,
            keys: r.keys,
        }),
        None => None,
    };
    if phase != Phase::Idle && job.is_none() {
        return Err("a non-idle phase without a job".into());
    }
    let mut outcomes = [0u64; 6];
    for (slot, v) in outcomes.iter_mut().zip(w.outcomes) {
        *slot = v;
    }
    Ok(State {
        highest_seq: w.highest_seq,
        next_switch_id: w.next_switch_id.max(1),
        phase,
        job,
        last,
        outcomes,
        channel,
        clock_floor: w.clock_floor.unwrap_or(0),
        rotation,
    })
}

/// Reads the state; a missing file is a fresh device. A corrupt one is an
/// error: guessing could lose the highest sequence number.
pub fn load(state_dir: &Path) -> Result<State, String> {
    let p = state_dir.join(STATE_FILE);
    match std::fs::read(&p) {
        Ok(b) => from_json(&b).map_err(|e| format!("{}: {e}", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(e) => Err(format!("{}: {e}", p.display())),
    }
}

pub fn save(state_dir: &Path, s: &State) -> std::io::Result<()> {
    let dir = fsutil::open_dir(state_dir)?;
    let json = to_json(s).map_err(std::io::Error::other)?;
    fsutil::write_atomic(dir.as_fd(), STATE_FILE, json.as_bytes(), true)
}

/// Longest line the event log takes (its parts may come from clients).
const EVENT_LINE_MAX: usize = 2048;

/// Appends one line to the event log (best effort: a full disk loses the
/// line, never the agent). Past [`EVENT_LOG_MAX`] the log keeps its newest
/// half, cut at a line end found in the bytes, so no slicing lands inside
/// a character whatever the log holds.
pub fn log_event(state_dir: &Path, now: u64, line: &str) {
    let p = state_dir.join(EVENT_LOG);
    if std::fs::metadata(&p).map(|m| m.len() > EVENT_LOG_MAX).unwrap_or(false) {
        if let Ok(bytes) = std::fs::read(&p) {
            let keep = newest_half(&bytes);
            if let Ok(dir) = fsutil::open_dir(state_dir) {
                let _ = fsutil::write_atomic(dir.as_fd(), EVENT_LOG, keep, false);
            }
        }
    }
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&p) {
        let _ = writeln!(f, "{now} {}", crate::text::clip(line, EVENT_LINE_MAX));
    }
}

/// The lines wholly in the second half of `log`.
fn newest_half(log: &[u8]) -> &[u8] {
    let tail = log.get(log.len() / 2..).unwrap_or_default();
    match tail.iter().position(|&b| b == b'\n') {
        Some(i) => tail.get(i + 1..).unwrap_or_default(),
        None => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::machine::{step, Event, Timing};

    #[test]
    fn roundtrips_every_phase() {
        let t = Timing { health_timeout_secs: 30, boot_when_inhibited: false };
        let mut s = State::default();
        let events = vec![
            Event::Accepted {
                seq: 7,
                action: Action::Switch,
                system: "/nix/store/a-\"x\"".into(),
                previous: None,
                boot_id: Some("b\n1".into()),
                origin: Origin::Deploy,
            },
            Event::FetchOk,
            Event::SwitchResult { id: 1, code: Some(0), tail: String::new() },
            Event::Healthy,
            Event::CommitOk,
            Event::SwitchResult { id: 2, code: Some(1), tail: "bootloader \\ broke".into() },
        ];
        for ev in events {
            s = step(&s, ev, 42, t).0;
            let json = to_json(&s).unwrap();
            assert_eq!(from_json(json.as_bytes()).unwrap(), s, "{json}");
        }
        assert_eq!(s.last.as_ref().unwrap().outcome, Outcome::Failed);
    }

    /// Issue 13: what the device remembers of its channel, its clock floor,
    /// its rotated keys and a channel job's origin survive a save and a
    /// load; a state file without them (every earlier version) reads as
    /// none of them.
    #[test]
    fn channel_state_roundtrips() {
        let t = Timing { health_timeout_secs: 30, boot_when_inhibited: false };
        let mut s = State {
            clock_floor: 1_796_083_200,
            channel: Record { seq: 12, digest: Some([7; 32]), failed: Some("/nix/store/f".into()) },
            rotation: Some(Applied { seq: 2, digest: [3; 32], base: [4; 32], keys: vec!["new-1:abc=".into()] }),
            ..State::default()
        };
        let ev = Event::Accepted {
            seq: 12,
            action: Action::Boot,
            system: "/nix/store/s".into(),
            previous: None,
            boot_id: None,
            origin: Origin::Channel,
        };
        for ev in [ev, Event::FetchFailed("x".into())] {
            s = step(&s, ev, 9, t).0;
            let json = to_json(&s).unwrap();
            assert!(json.contains("\"origin\":\"channel\""), "{json}");
            assert_eq!(from_json(json.as_bytes()).unwrap(), s, "{json}");
        }
        assert_eq!(s.highest_seq, 0, "a channel job is not a deploy document's sequence");
        let old = br#"{"version":1,"highest_seq":5,"next_switch_id":2,"phase":"idle","outcomes":[0,0,0,0,0,0]}"#;
        let back = from_json(old).unwrap();
        assert_eq!((back.channel, back.clock_floor, back.rotation), (Record::default(), 0, None));
        let bad = br#"{"version":1,"highest_seq":5,"next_switch_id":2,"phase":"idle","outcomes":[],"channel":{"seq":1,"digest":"AAAA"}}"#;
        assert_eq!(from_json(bad).unwrap_err(), "channel digest: not 32 bytes of base64");
    }

    #[test]
    fn event_log_rotates_on_line_ends_whatever_it_holds() {
        let tmp = tempfile::tempdir().unwrap();
        // A client-supplied key name of multi-byte characters, as a bad
        // signature's log line would carry it (issue E.1: this aborted).
        let line = format!("deploy rejected: signed by unknown key {}", "€".repeat(8000));
        for i in 0..200 {
            log_event(tmp.path(), i, &line);
            let text = std::fs::read(tmp.path().join(EVENT_LOG)).unwrap();
            assert!(text.len() as u64 <= EVENT_LOG_MAX + 2 * EVENT_LINE_MAX as u64 * 4);
            let text = String::from_utf8(text).expect("the log stays UTF-8");
            assert!(text.lines().all(|l| l.split(' ').next().unwrap().parse::<u64>().is_ok()), "whole lines only");
        }
        // A log that is not UTF-8 at all (a damaged disk) rotates too.
        std::fs::write(tmp.path().join(EVENT_LOG), vec![0xe2u8; (EVENT_LOG_MAX + 10) as usize]).unwrap();
        log_event(tmp.path(), 1, "after");
        assert_eq!(std::fs::read_to_string(tmp.path().join(EVENT_LOG)).unwrap(), "1 after\n");
    }

    #[test]
    fn newest_half_cuts_after_a_newline() {
        assert_eq!(newest_half(b"aaaa\nbb\ncc\n"), b"cc\n");
        assert_eq!(newest_half(b"\xe2\x82\xac\xe2\x82\xac\n"), b"");
        assert_eq!(newest_half(b""), b"");
    }

    #[test]
    fn corrupt_state_is_an_error_and_missing_is_fresh() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(load(tmp.path()).unwrap(), State::default());
        std::fs::write(tmp.path().join(STATE_FILE), b"{\"version\":1,").unwrap();
        assert!(load(tmp.path()).is_err());
        let s = State { highest_seq: 99, ..State::default() };
        save(tmp.path(), &s).unwrap();
        assert_eq!(load(tmp.path()).unwrap().highest_seq, 99);
    }

    /// A damaged or planted state file is an error, not a crash.
    #[test]
    fn refuses_deep_json() {
        let deep = format!(r#"{{"version":1,"x":{}{}}}"#, "[".repeat(500_000), "]".repeat(500_000));
        assert_eq!(from_json(deep.as_bytes()).unwrap_err(), "arrays and objects nested deeper than 32 levels");
    }

    fn hostile_state(phase: Phase) -> State {
        use crate::json::HOSTILE;
        let h = || Some(HOSTILE.to_owned());
        State {
            highest_seq: (1 << 53) - 1,
            next_switch_id: u64::MAX,
            phase,
            job: Some(Job {
                seq: 9,
                action: Action::Boot,
                system: HOSTILE.into(),
                previous: h(),
                started: 1,
                transitions: u32::MAX,
                failure: h(),
                boot_id: h(),
                booted_new: true,
                origin: Origin::Channel,
            }),
            last: Some(Last {
                seq: 8,
                action: Action::Gc,
                system: HOSTILE.into(),
                outcome: Outcome::RollbackFailed,
                reason: h(),
                finished: 2,
                origin: Origin::Channel,
            }),
            outcomes: [1, 2, 3, 4, 5, u64::MAX],
            channel: Record { seq: (1 << 53) - 1, digest: Some([0xff; 32]), failed: h() },
            clock_floor: u64::MAX,
            rotation: Some(Applied {
                seq: 3,
                digest: [1; 32],
                base: [0; 32],
                keys: vec![HOSTILE.into(), "k:x".into()],
            }),
        }
    }

    /// Strings in the state come from documents, helpers' output and the
    /// kernel (boot id); every one survives a save and a load unchanged.
    #[test]
    fn hostile_strings_survive_save_and_load() {
        let tmp = tempfile::tempdir().unwrap();
        for phase in [
            Phase::Idle,
            Phase::Switching { step: Step::BootRevert, id: 3 },
            Phase::Verifying { deadline: u64::MAX },
            Phase::AwaitingReboot,
        ] {
            let s = hostile_state(phase);
            save(tmp.path(), &s).unwrap();
            let text = std::fs::read_to_string(tmp.path().join(STATE_FILE)).unwrap();
            assert!(!text.bytes().any(|b| b < 0x20), "one line: {text}");
            assert_eq!(load(tmp.path()).unwrap(), s, "{text}");
        }
    }

    /// The bytes are what the format!-built writer wrote before: fields in
    /// this order, absent ones left out, `null` for empty optional strings.
    #[test]
    fn state_file_bytes_are_unchanged() {
        let mut s = State { highest_seq: 5, next_switch_id: 2, ..State::default() };
        assert_eq!(
            to_json(&s).unwrap(),
            r#"{"version":1,"highest_seq":5,"next_switch_id":2,"phase":"idle","outcomes":[0,0,0,0,0,0]}"#
        );
        s.phase = Phase::Switching { step: Step::Test, id: 1 };
        s.job = Some(Job {
            seq: 5,
            action: Action::Switch,
            system: "/nix/store/a".into(),
            previous: None,
            started: 7,
            transitions: 2,
            failure: None,
            boot_id: Some("b".into()),
            booted_new: false,
            origin: Origin::Deploy,
        });
        s.last = Some(Last {
            seq: 4,
            action: Action::Boot,
            system: "/nix/store/b".into(),
            outcome: Outcome::Committed,
            reason: Some("q\"".into()),
            finished: 6,
            origin: Origin::Deploy,
        });
        assert_eq!(
            to_json(&s).unwrap(),
            r#"{"version":1,"highest_seq":5,"next_switch_id":2,"phase":"switching","step":"test","switch_id":1,"job":{"seq":5,"action":"switch","system":"/nix/store/a","previous":null,"started":7,"transitions":2,"failure":null,"boot_id":"b","booted_new":false},"last":{"seq":4,"action":"boot","system":"/nix/store/b","outcome":"committed","reason":"q\"","finished":6},"outcomes":[0,0,0,0,0,0]}"#
        );
    }
}
