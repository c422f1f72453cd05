//! The files the agent and the switch helper exchange, under
//! `<state_dir>/switch/`:
//!
//! ```text
//! request.json  {"id":N,"step":STEP,"system":"/nix/store/…"}
//!               STEP: test|boot|rollback-test|boot-once|boot-confirm|boot-revert
//!               written by the agent (atomically); its appearance starts the
//!               oneshot nixless-switch.service through nixless-switch.path
//! started       "N\n": the helper began request N (durable before it runs
//!               anything, so a request is never carried out twice)
//! result.json   {"id":N,"code":C|null,"tail":"last lines of output"}
//!               written by the helper when switch-to-configuration exits
//!               (the helper's own codes: -2 REFUSED, -3 NO_ONE_SHOT,
//!               -4 INHIBITED)
//! health-request.json {"id":N}          the agent asks for the health checks
//! health-result.json  {"id":N,"code":C|null,"tail":"…"}
//! ```
//! The helper runs a request only if neither `started` nor `result.json`
//! names its id; the agent reads `result.json` and acts on the result for the
//! id it is waiting for, however often it restarted meanwhile. Each file is
//! one line of JSON written by serde from the struct its reader parses.

use crate::json::TooLarge;
use crate::store::fsutil;
use rustix::fd::AsFd;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const DIR: &str = "switch";
pub const REQUEST: &str = "request.json";
pub const STARTED: &str = "started";
pub const RESULT: &str = "result.json";
pub const HEALTH_REQUEST: &str = "health-request.json";
pub const HEALTH_RESULT: &str = "health-result.json";

/// The helper's code for a request it refused to run (the system is not
/// installed, the request is malformed): nothing was switched.
pub const REFUSED: i32 = -2;

/// The helper's code for a `boot-once` request where the bootloader has no
/// one-time entries (GRUB, extlinux, …): the new generation simply became
/// the default.
pub const NO_ONE_SHOT: i32 = -3;

/// The helper's code for a `test` or `switch` that switch-to-configuration
/// refused because `system.switch.inhibitors` changed (it exits 1, and
/// nothing was switched): the new system needs a reboot.
pub const INHIBITED: i32 = -4;

/// Which `switch-to-configuration` run a switch request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `test` of the new system: it runs, the boot default is unchanged.
    Test,
    /// `boot` of the committed system: the bootloader entry.
    Boot,
    /// `test` of the previous system, undoing a failed update.
    RollbackTest,
    /// A `boot` deploy: `boot` of the new system, then (systemd-boot) a
    /// one-time entry for it with the running system kept as the default.
    BootOnce,
    /// After a good first boot of a `boot` deploy: drop the one-time
    /// arrangement so the new generation is the default.
    BootConfirm,
    /// After a `boot` deploy failed: `switch` of the previous system (its
    /// generation becomes the boot default again).
    BootRevert,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Test => "test",
            Step::Boot => "boot",
            Step::RollbackTest => "rollback-test",
            Step::BootOnce => "boot-once",
            Step::BootConfirm => "boot-confirm",
            Step::BootRevert => "boot-revert",
        }
    }

    pub fn parse(s: &str) -> Option<Step> {
        Some(match s {
            "test" => Step::Test,
            "boot" => Step::Boot,
            "rollback-test" => Step::RollbackTest,
            "boot-once" => Step::BootOnce,
            "boot-confirm" => Step::BootConfirm,
            "boot-revert" => Step::BootRevert,
            _ => return None,
        })
    }

    /// The `switch-to-configuration` argument.
    pub fn stc_action(self) -> &'static str {
        match self {
            Step::Test | Step::RollbackTest => "test",
            Step::Boot | Step::BootOnce | Step::BootConfirm => "boot",
            Step::BootRevert => "switch",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: u64,
    pub step: Step,
    pub system: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub id: u64,
    pub code: Option<i32>,
    pub tail: String,
}

#[derive(Serialize, Deserialize)]
struct WireRequest {
    id: u64,
    step: String,
    system: String,
}

#[derive(Serialize, Deserialize)]
struct WireOutcome {
    id: u64,
    code: Option<i32>,
    tail: String,
}

pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join(DIR)
}

impl Request {
    /// One line of [`WireRequest`] JSON.
    pub fn to_json(&self) -> Result<String, TooLarge> {
        let w = WireRequest { id: self.id, step: self.step.as_str().to_owned(), system: self.system.clone() };
        line(&w)
    }

    pub fn parse(b: &[u8]) -> Result<Request, String> {
        let w: WireRequest = crate::json::from_slice_bounded(b).map_err(|e| e.to_string())?;
        let step = Step::parse(&w.step).ok_or(format!("unknown step {:?}", w.step))?;
        Ok(Request { id: w.id, step, system: w.system })
    }
}

impl Outcome {
    /// One line of [`WireOutcome`] JSON.
    pub fn to_json(&self) -> Result<String, TooLarge> {
        line(&WireOutcome { id: self.id, code: self.code, tail: self.tail.clone() })
    }

    pub fn parse(b: &[u8]) -> Result<Outcome, String> {
        let w: WireOutcome = crate::json::from_slice_bounded(b).map_err(|e| e.to_string())?;
        Ok(Outcome { id: w.id, code: w.code, tail: w.tail })
    }
}

/// `v` as JSON and a newline (the files are read by people too).
fn line<T: Serialize>(v: &T) -> Result<String, TooLarge> {
    crate::json::to_string(v).map(|s| s + "\n")
}

/// `health-request.json`.
#[derive(Serialize, Deserialize)]
struct HealthRequest {
    id: u64,
}

fn read(state_dir: &Path, name: &str) -> Option<Vec<u8>> {
    std::fs::read(dir(state_dir).join(name)).ok()
}

pub fn read_request(state_dir: &Path) -> Option<Request> {
    read(state_dir, REQUEST).and_then(|b| Request::parse(&b).ok())
}

pub fn read_result(state_dir: &Path) -> Option<Outcome> {
    read(state_dir, RESULT).and_then(|b| Outcome::parse(&b).ok())
}

pub fn read_started(state_dir: &Path) -> Option<u64> {
    read(state_dir, STARTED).and_then(|b| String::from_utf8(b).ok()).and_then(|s| s.trim().parse().ok())
}

fn write(state_dir: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    let d = dir(state_dir);
    fsutil::mkdir_p(&d)?;
    let fd = fsutil::open_dir(&d)?;
    fsutil::write_atomic(fd.as_fd(), name, data, true)
}

/// Writes request `req` unless it (or its result) is already there: safe
/// to call again after any crash, never re-issues a request that ran.
/// Returns whether it wrote.
pub fn ensure_request(state_dir: &Path, req: &Request) -> std::io::Result<bool> {
    let already = read_request(state_dir).is_some_and(|r| r.id >= req.id)
        || read_result(state_dir).is_some_and(|r| r.id >= req.id)
        || read_started(state_dir).is_some_and(|id| id >= req.id);
    if already {
        return Ok(false);
    }
    write(state_dir, REQUEST, req.to_json().map_err(std::io::Error::other)?.as_bytes())?;
    Ok(true)
}

/// Health requests carry only an id: the helper knows the checks from
/// the config. `{"id":N}`
pub fn write_health_request(state_dir: &Path, id: u64) -> std::io::Result<()> {
    write(state_dir, HEALTH_REQUEST, line(&HealthRequest { id }).map_err(std::io::Error::other)?.as_bytes())
}

pub fn read_health_request(state_dir: &Path) -> Option<u64> {
    let b = read(state_dir, HEALTH_REQUEST)?;
    crate::json::from_slice_bounded::<HealthRequest>(&b).ok().map(|w| w.id)
}

pub fn write_health_result(state_dir: &Path, o: &Outcome) -> std::io::Result<()> {
    write(state_dir, HEALTH_RESULT, o.to_json().map_err(std::io::Error::other)?.as_bytes())
}

pub fn read_health_result(state_dir: &Path) -> Option<Outcome> {
    read(state_dir, HEALTH_RESULT).and_then(|b| Outcome::parse(&b).ok())
}

/// Writes a request unconditionally (the agent's nudge; see daemon).
pub fn write_request(state_dir: &Path, req: &Request) -> std::io::Result<()> {
    write(state_dir, REQUEST, req.to_json().map_err(std::io::Error::other)?.as_bytes())
}

pub fn write_started(state_dir: &Path, id: u64) -> std::io::Result<()> {
    write(state_dir, STARTED, format!("{id}\n").as_bytes())
}

pub fn write_result(state_dir: &Path, o: &Outcome) -> std::io::Result<()> {
    write(state_dir, RESULT, o.to_json().map_err(std::io::Error::other)?.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_idempotent_requests() {
        let tmp = tempfile::tempdir().unwrap();
        let r = Request { id: 3, step: Step::Test, system: "/nix/store/x-\"y\"".into() };
        assert_eq!(Request::parse(r.to_json().unwrap().as_bytes()).unwrap(), r);
        assert!(ensure_request(tmp.path(), &r).unwrap());
        assert!(!ensure_request(tmp.path(), &r).unwrap(), "written once only");
        assert_eq!(read_request(tmp.path()), Some(r.clone()));
        let o = Outcome { id: 3, code: None, tail: "a\nb\\c".into() };
        write_result(tmp.path(), &o).unwrap();
        assert_eq!(read_result(tmp.path()), Some(o));
        // A lost request whose id already has a result is not re-issued.
        std::fs::remove_file(dir(tmp.path()).join(REQUEST)).unwrap();
        assert!(!ensure_request(tmp.path(), &r).unwrap());
        let next = Request { id: 4, ..r };
        assert!(ensure_request(tmp.path(), &next).unwrap());
    }

    /// The switch request/result files are read back from disk; a damaged
    /// or planted one must be an error, not a crash.
    #[test]
    fn every_file_reader_refuses_deep_json() {
        let deep = |fields: &str| format!(r#"{{{fields},"x":{}{}}}"#, "[".repeat(500_000), "]".repeat(500_000));
        let too_deep = "arrays and objects nested deeper than 32 levels";
        let e = Request::parse(deep(r#""id":1,"step":"test","system":"/x""#).as_bytes()).unwrap_err();
        assert_eq!(e, too_deep);
        let e = Outcome::parse(deep(r#""id":1,"code":0,"tail":"""#).as_bytes()).unwrap_err();
        assert_eq!(e, too_deep);
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir(tmp.path())).unwrap();
        let health = dir(tmp.path()).join(HEALTH_REQUEST);
        std::fs::write(&health, deep(r#""id":7"#)).unwrap();
        assert_eq!(read_health_request(tmp.path()), None);
        std::fs::write(&health, r#"{"id":7,"x":[[1]]}"#).unwrap();
        assert_eq!(read_health_request(tmp.path()), Some(7));
    }

    /// Each file reads back what was written, whatever the strings hold:
    /// a tail is a switch's output, a system comes from a signed document.
    #[test]
    fn files_roundtrip_hostile_strings_byte_for_byte() {
        use crate::json::HOSTILE;
        let tmp = tempfile::tempdir().unwrap();
        let r = Request { id: 9, step: Step::BootRevert, system: HOSTILE.into() };
        write_request(tmp.path(), &r).unwrap();
        assert_eq!(read_request(tmp.path()), Some(r));
        for o in [
            Outcome { id: 9, code: Some(INHIBITED), tail: HOSTILE.into() },
            Outcome { id: 10, code: None, tail: String::new() },
        ] {
            write_result(tmp.path(), &o).unwrap();
            assert_eq!(read_result(tmp.path()), Some(o.clone()));
            write_health_result(tmp.path(), &o).unwrap();
            assert_eq!(read_health_result(tmp.path()), Some(o));
        }
        write_health_request(tmp.path(), u64::MAX).unwrap();
        assert_eq!(read_health_request(tmp.path()), Some(u64::MAX));
        // The bytes as before the writers were serde's: one line, fields in
        // this order (the VM tests and people read these files).
        let read = |name| std::fs::read_to_string(dir(tmp.path()).join(name)).unwrap();
        assert_eq!(read(HEALTH_REQUEST), "{\"id\":18446744073709551615}\n");
        assert_eq!(read(RESULT), "{\"id\":10,\"code\":null,\"tail\":\"\"}\n");
        let r = Request { id: 1, step: Step::Test, system: "/nix/store/x".into() };
        assert_eq!(r.to_json().unwrap(), "{\"id\":1,\"step\":\"test\",\"system\":\"/nix/store/x\"}\n");
        let o = Outcome { id: 2, code: Some(-4), tail: "a\nb\"".into() };
        assert_eq!(o.to_json().unwrap(), "{\"id\":2,\"code\":-4,\"tail\":\"a\\nb\\\"\"}\n");
    }
}
