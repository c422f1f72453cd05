//! Real agent processes following a channel (issue 13 items 2 and 3): the
//! channel document is a file (file://) signed with `nixless sign`, the
//! closures come from a real Nix-built cache named by the channel's group
//! (the agent's own cache is an empty directory), and the test plays the
//! switch and health helpers (it writes their result files).
//!
//! Documents are published by renaming into place; the agent polls every
//! second. Every wait is for a condition the agent reports, bounded; no
//! test waits for time to pass.

mod common;

use common::*;
use nixless::api::Status;
use nixless::channel::wave;
use nixless::deploy::{render, sign, Action};
use nixless::nix::SecretKey;
use nixless::switch::protocol;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

const CHANNEL: &str = "stable";
const DAY: u64 = 86_400;

/// Where the admin publishes: a directory the agents read through file://,
/// and the admin's key files.
struct Publisher {
    dir: tempfile::TempDir,
    key: PathBuf,
    secret: SecretKey,
}

impl Publisher {
    fn new(name: &str) -> Publisher {
        let dir = tempfile::Builder::new().prefix("nixless-channel-").tempdir().unwrap();
        let key = dir.path().join(format!("{name}.key"));
        let out = nixless(&["keygen", name, "--out", key.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        let secret = SecretKey::parse(fs::read_to_string(&key).unwrap().trim()).unwrap();
        Publisher { dir, key, secret }
    }

    fn url(&self, file: &str) -> String {
        format!("file://{}", self.dir.path().join(file).display())
    }

    /// Signs `body` as `file` with `nixless sign` (it checks the document
    /// as a device will) and publishes both by rename.
    fn publish_with(&self, key: &Path, file: &str, body: &str) {
        let staging = self.dir.path().join("staging");
        fs::create_dir_all(&staging).unwrap();
        let doc = staging.join(file);
        fs::write(&doc, body).unwrap();
        let out = nixless(&["sign", "--key", key.to_str().unwrap(), doc.to_str().unwrap()]);
        assert!(out.status.success(), "nixless sign: {}\n{body}", stderr(&out));
        let sig = staging.join(format!("{file}.sig"));
        fs::rename(&sig, self.dir.path().join(format!("{file}.sig"))).unwrap();
        fs::rename(&doc, self.dir.path().join(file)).unwrap();
    }

    fn publish(&self, file: &str, body: &str) {
        self.publish_with(&self.key, file, body);
    }
}

/// A channel document for `stable` with one group, `kiosk`.
struct Doc<'a> {
    seq: u64,
    issued: u64,
    expires: u64,
    system: &'a str,
    /// The waves' JSON array.
    waves: String,
    group_halt: bool,
    /// The whole channel's halt.
    halt: bool,
    channel: &'a str,
}

impl<'a> Doc<'a> {
    fn new(seq: u64, system: &'a str) -> Doc<'a> {
        let t = now();
        Doc {
            seq,
            issued: t - 60,
            expires: t + 7 * DAY,
            system,
            waves: r#"[{"percent":100}]"#.into(),
            group_halt: false,
            halt: false,
            channel: CHANNEL,
        }
    }

    fn json(&self) -> String {
        let cache = format!("file://{}", fixtures().path("CACHE_ZSTD").display());
        format!(
            r#"{{"channel":"{}","seq":{},"issued":{},"expires":{},"halt":{},"groups":{{"kiosk":{{"system":"{}","action":"switch","caches":["{cache}"],"halt":{},"waves":{}}},"other":{{"system":"{}","action":"switch","waves":[{{"percent":100}}]}}}}}}"#,
            self.channel,
            self.seq,
            self.issued,
            self.expires,
            self.halt,
            self.system,
            self.group_halt,
            self.waves,
            self.system
        )
    }
}

/// A host of `stable` outside the first 1 % of the fleet (so in wave 2 of a
/// 1 % → 100 % plan), found with the agent's own position function.
fn wave_two_host() -> String {
    (0..10_000)
        .map(|i| format!("kiosk-{i}"))
        .find(|h| !wave::covers(100, wave::position(CHANNEL, h)))
        .expect("99 % of hosts qualify")
}

/// An agent with its own root, config and log, SIGKILLed and reaped on drop.
struct Agent {
    child: Child,
    tmp: tempfile::TempDir,
    port: u16,
    seccomp: bool,
}

impl Agent {
    /// `extra`: config keys, JSON, starting with a comma.
    fn start(host: &str, deploy_key: &SecretKey, extra: &str) -> Agent {
        Agent::start_with(host, deploy_key, extra, false)
    }

    /// With `seccomp`, under the agent's own filter (as in production).
    fn start_with(host: &str, deploy_key: &SecretKey, extra: &str, seccomp: bool) -> Agent {
        let f = fixtures();
        let tmp = tempfile::Builder::new().prefix("nixless-follow-").tempdir().unwrap();
        let port = free_port();
        let root = tmp.path().join("root");
        fs::create_dir_all(root.join("run")).unwrap();
        // The system running before: what a failed update rolls back to.
        std::os::unix::fs::symlink(f.get("P_FILE"), root.join("run/current-system")).unwrap();
        // The agent's own cache has nothing: closures come from the group's.
        let empty = tmp.path().join("empty-cache");
        fs::create_dir_all(&empty).unwrap();
        fs::write(empty.join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
        let config = tmp.path().join("config.json");
        // One check a second, unless the test sets its own interval.
        let interval = if extra.contains("poll_interval_secs") { "" } else { r#","poll_interval_secs":1"# };
        let text = format!(
            r#"{{"host":"{host}","listen":["127.0.0.1:{port}"],"caches":["file://{}"],"cache_keys":["{}"],"deploy_keys":["{}"],"root":"{}","retries":0,"health_check_network":false{interval}{extra}}}"#,
            empty.display(),
            f.get("PK_A"),
            deploy_key.public(),
            root.display(),
        );
        fs::write(&config, text).unwrap();
        let child = Agent::spawn(tmp.path(), seccomp);
        let mut a = Agent { child, tmp, port, seccomp };
        a.wait_serving();
        a
    }

    fn spawn(dir: &Path, seccomp: bool) -> Child {
        agent_command(Command::new(bin()), dir).args((!seccomp).then_some("--no-seccomp")).spawn().unwrap()
    }

    fn wait_serving(&mut self) {
        wait_until("the agent to serve status", Duration::from_secs(10), || {
            self.assert_alive();
            get(&format!("{}/v1/status", self.url())).filter(|(s, _)| *s == 200)
        });
    }

    /// SIGKILL, reap, start again on the same root and config.
    fn restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.child = Agent::spawn(self.tmp.path(), self.seccomp);
        self.wait_serving();
    }

    /// Follows the publisher's `stable.json` with tag `kiosk`.
    fn follow(host: &str, p: &Publisher, extra: &str) -> Agent {
        Agent::follow_with(host, p, extra, false)
    }

    fn follow_with(host: &str, p: &Publisher, extra: &str, seccomp: bool) -> Agent {
        let keys = format!(
            r#","channel_url":"{}","channel":"{CHANNEL}","tags":["nope","kiosk"]{extra}"#,
            p.url("stable.json")
        );
        Agent::start_with(host, &p.secret, &keys, seccomp)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn state_dir(&self) -> PathBuf {
        self.tmp.path().join("root/var/lib/nixless")
    }

    fn log(&self) -> String {
        agent_log(self.tmp.path())
    }

    fn assert_alive(&mut self) {
        assert_agent_alive(&mut self.child, self.tmp.path());
    }

    fn status(&mut self) -> Status {
        agent_status(&mut self.child, self.tmp.path(), self.port)
    }

    fn metrics(&self) -> String {
        get(&format!("{}/metrics", self.url())).expect("metrics answer").1
    }

    fn wait_status(&mut self, what: &str, pred: impl Fn(&Status) -> bool) -> Status {
        let mut last = None;
        let start = std::time::Instant::now();
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            if start.elapsed() > Duration::from_secs(60) {
                panic!("timed out waiting for {what}; last status {last:?}\n--- agent log ---\n{}", self.log());
            }
            last = Some(s);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for `n` more channel checks after the one status shows now.
    fn wait_checks(&mut self, n: u64) -> Status {
        let from = self.status().channel.and_then(|c| c.last_check).unwrap_or(0);
        self.wait_status(&format!("{n} more channel checks"), |s| {
            s.channel.as_ref().and_then(|c| c.last_check).is_some_and(|t| t >= from + n)
        })
    }

    fn channel(&mut self) -> nixless::api::Channel {
        self.status().channel.expect("status has a channel object")
    }

    fn state_json(&self) -> String {
        fs::read_to_string(self.state_dir().join("state.json")).unwrap_or_default()
    }

    /// The switch request the agent wrote: (id, step, system).
    fn request(&self) -> Option<protocol::Request> {
        protocol::read_request(&self.state_dir())
    }

    fn wait_request(&mut self, id: u64) -> protocol::Request {
        let what = format!("switch request {id}");
        wait_until(&what, Duration::from_secs(60), || {
            self.assert_alive();
            self.request().filter(|r| r.id == id)
        })
    }

    /// Plays the switch helper.
    fn switch_result(&self, id: u64, code: i32) {
        let o = protocol::Outcome { id, code: Some(code), tail: String::new() };
        let dir = protocol::dir(&self.state_dir());
        let tmp = dir.join(".result.json.tmp");
        fs::write(&tmp, o.to_json().unwrap()).unwrap();
        fs::rename(&tmp, dir.join("result.json")).unwrap();
    }

    fn store_is_empty(&self) -> bool {
        fs::read_dir(self.tmp.path().join("root/nix/store")).map_or(true, |mut d| d.next().is_none())
    }

    fn post(&self, key: &SecretKey, seq: u64, system: &str) -> u16 {
        let body = render(&self.host(), Some(system), seq, Action::Switch, &[], &[]).unwrap();
        let r = http()
            .post(&format!("{}/v1/deploy", self.url()))
            .header("Nixless-Signature", &sign(key, body.as_bytes()))
            .header("Content-Type", "application/json")
            .send(body.as_bytes())
            .unwrap();
        r.status().as_u16()
    }

    fn host(&self) -> String {
        let config = fs::read_to_string(self.tmp.path().join("config.json")).unwrap();
        let rest = config.split_once(r#""host":""#).unwrap().1;
        rest.split_once('"').unwrap().0.to_owned()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("chmod").args(["-R", "u+w"]).arg(self.tmp.path()).status();
    }
}

/// A device in wave 1 deploys the group's system from the group's cache,
/// through the same switch / health / commit as a signed deploy; the job
/// is the channel's (it does not raise the deploy documents' sequence);
/// afterwards the document is already running and nothing starts again.
#[test]
fn wave_one_deploys_and_commits() {
    let f = fixtures();
    let system = f.get("TOP");
    let p = Publisher::new("admin-1");
    p.publish("stable.json", &Doc::new(7, system).json());
    // Under the seccomp filter: reading the channel, keeping its document
    // and the record are all within the allowlist.
    let mut a = Agent::follow_with("kiosk-1", &p, "", true);
    let s = a.wait_status("the channel job to switch", |s| s.phase == "switching");
    let job = s.job.unwrap();
    assert_eq!((job.seq, job.action.as_str(), job.system.as_str()), (7, "switch", system));
    assert_eq!(job.origin.as_deref(), Some("channel"));
    assert_eq!(s.highest_seq, 0, "a channel job is not a deploy document's sequence");
    let c = s.channel.unwrap();
    assert_eq!(
        (c.seq, c.decision.as_deref(), c.group.as_deref(), c.wave, c.system.as_deref()),
        (Some(7), Some("deploy"), Some("kiosk"), Some(1), Some(system))
    );
    let m = a.metrics();
    let info = format!(
        "nixless_channel_info{{channel=\"stable\",group=\"kiosk\",wave=\"1\",seq=\"7\",system=\"{system}\",decision=\"deploy\"}} 1\n"
    );
    assert!(m.contains(&info), "{m}");
    assert_store_sound(&a.tmp.path().join("root"), &f.path("CACHE_ZSTD"));

    let r = a.wait_request(1);
    assert_eq!((r.step.as_str(), r.system.as_str()), ("test", system));
    a.switch_result(1, 0);
    let r = a.wait_request(2);
    assert_eq!((r.step.as_str(), r.system.as_str()), ("boot", system));
    a.switch_result(2, 0);
    let s = a.wait_status("the channel job to commit", |s| s.phase == "idle" && s.last_result.is_some());
    let last = s.last_result.unwrap();
    assert_eq!((last.seq, last.outcome.as_str(), last.system.as_str()), (7, "committed", system), "{:?}", last.reason);
    assert_eq!((s.highest_seq, last.origin.as_deref()), (0, Some("channel")));
    let m = a.metrics();
    let info = format!("nixless_last_result_info{{outcome=\"committed\",system=\"{system}\",origin=\"channel\"}} 1\n");
    assert!(m.contains(&info), "{m}");

    // The same document again: the profile now boots it, so it is already
    // running; no new job, no new switch request.
    let s = a.wait_status("already-running", |s| {
        s.channel.as_ref().and_then(|c| c.decision.as_deref()) == Some("already-running")
    });
    assert_eq!(s.channel.unwrap().wave, Some(1), "the wave is shown for a device already running it");
    let state = a.state_json();
    a.wait_checks(2);
    assert_eq!((a.status().phase.as_str(), a.request().map(|r| r.id)), ("idle", Some(2)));
    assert_eq!(a.state_json(), state);
    assert!(a.state_json().contains(r#""channel":{"seq":7"#), "{}", a.state_json());
}

/// A device in wave 2 waits while its wave is closed (status says until
/// when), and deploys once a newer document opens the wave. A halt in
/// between stops it although its wave is open.
#[test]
fn a_later_wave_waits_and_a_halt_stops_it() {
    let f = fixtures();
    let system = f.get("TOP");
    let p = Publisher::new("admin-1");
    let host = wave_two_host();
    let opens = now() + 3 * DAY;
    let mut d = Doc::new(1, system);
    d.waves = format!(r#"[{{"percent":1}},{{"percent":100,"start":{opens}}}]"#);
    p.publish("stable.json", &d.json());
    let mut a = Agent::follow(&host, &p, "");
    let c = a.wait_status("wait", |s| s.channel.as_ref().and_then(|c| c.decision.as_deref()) == Some("wait")).channel;
    let c = c.unwrap();
    assert_eq!((c.group.as_deref(), c.wave, c.until, c.seq), (Some("kiosk"), Some(2), Some(opens), Some(1)));
    let m = a.metrics();
    assert!(m.contains(&format!("wave=\"2\",seq=\"1\",system=\"{system}\",decision=\"wait\"}} 1\n")), "{m}");
    a.wait_checks(2);
    assert!(a.store_is_empty() && a.request().is_none() && a.status().phase == "idle");

    // Seq 2 opens wave 2 now, but halts the group: nothing starts.
    let mut d = Doc::new(2, system);
    d.waves = r#"[{"percent":1},{"percent":100,"soak_secs":0}]"#.into();
    d.group_halt = true;
    p.publish("stable.json", &d.json());
    let c = a.wait_status("halted", |s| s.channel.as_ref().and_then(|c| c.decision.as_deref()) == Some("halted"));
    assert_eq!(c.channel.unwrap().seq, Some(2));
    let out = nixless(&["status", &a.url()]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("\nHOST             CHANNEL               SEQ GROUP"), "{text}");
    let row = text.lines().filter(|l| l.starts_with(&format!("{host} "))).nth(1).unwrap_or_else(|| panic!("{text}"));
    assert_eq!(
        row.split_whitespace().take(6).collect::<Vec<_>>(),
        [host.as_str(), "stable", "2", "kiosk", "2", "halted"]
    );
    a.wait_checks(2);
    assert!(a.store_is_empty() && a.request().is_none() && a.status().phase == "idle", "{}", a.log());

    // Seq 3: the same plan without the halt: the device deploys.
    d.seq = 3;
    d.group_halt = false;
    p.publish("stable.json", &d.json());
    let r = a.wait_request(1);
    assert_eq!((r.step.as_str(), r.system.as_str()), ("test", system));
    let c = a.channel();
    assert_eq!((c.seq, c.decision.as_deref(), c.wave, c.until), (Some(3), Some("deploy"), Some(2), None));
}

/// A waiting device checks again when its wave opens, not at its next
/// interval (an hour here): the wave opens seconds after the document is
/// published, and the device deploys well within the hour.
#[test]
fn a_waiting_device_checks_again_when_its_wave_opens() {
    let f = fixtures();
    let p = Publisher::new("admin-1");
    let mut d = Doc::new(1, f.get("TOP"));
    let opens = now() + 4;
    d.waves = format!(r#"[{{"percent":100,"start":{opens}}}]"#);
    p.publish("stable.json", &d.json());
    let mut a = Agent::follow("kiosk-1", &p, r#","poll_interval_secs":3600"#);
    let first = a.wait_status("a first check", |s| s.channel.as_ref().is_some_and(|c| c.last_check.is_some()));
    let c = first.channel.unwrap();
    if c.decision.as_deref() == Some("wait") {
        assert_eq!(c.until, Some(opens));
    }
    let s = a.wait_status("the deploy at the wave's opening", |s| {
        s.channel.as_ref().and_then(|c| c.decision.as_deref()) == Some("deploy")
    });
    assert!(s.channel.unwrap().last_check.unwrap() >= opens);
    assert_eq!(a.wait_request(1).step.as_str(), "test");
}

/// A plan that stops short of the device's position leaves it out: it
/// shows not-in-plan with wave 0 and no system, and does nothing.
#[test]
fn a_device_past_the_plan_is_not_in_it() {
    let f = fixtures();
    let p = Publisher::new("admin-1");
    let mut d = Doc::new(1, f.get("TOP"));
    d.waves = r#"[{"percent":1}]"#.into();
    p.publish("stable.json", &d.json());
    let mut a = Agent::follow(&wave_two_host(), &p, "");
    let s =
        a.wait_status("not-in-plan", |s| s.channel.as_ref().and_then(|c| c.decision.as_deref()) == Some("not-in-plan"));
    let c = s.channel.unwrap();
    assert_eq!((c.group.as_deref(), c.wave, c.system.as_deref()), (Some("kiosk"), Some(0), Some("")));
    let m = a.metrics();
    assert!(
        m.contains("nixless_channel_info{channel=\"stable\",group=\"kiosk\",wave=\"0\",seq=\"1\",system=\"\",decision=\"not-in-plan\"} 1\n"),
        "{m}"
    );
    a.wait_checks(2);
    assert!(a.store_is_empty() && a.request().is_none() && a.status().phase == "idle");
}

/// A whole-channel halt (`"halt": true`) stops a device that has not
/// started, whatever its group says.
#[test]
fn a_channel_halt_stops_a_device_not_yet_started() {
    let f = fixtures();
    let p = Publisher::new("admin-1");
    let mut d = Doc::new(4, f.get("TOP"));
    d.waves = format!(r#"[{{"percent":100,"start":{}}}]"#, now() + DAY);
    p.publish("stable.json", &d.json());
    let mut a = Agent::follow("kiosk-1", &p, "");
    a.wait_status("wait", |s| s.channel.as_ref().and_then(|c| c.decision.as_deref()) == Some("wait"));
    // Seq 5 opens the wave and halts the channel.
    d.seq = 5;
    d.halt = true;
    d.waves = r#"[{"percent":100}]"#.into();
    p.publish("stable.json", &d.json());
    let s = a.wait_status("halted", |s| s.channel.as_ref().and_then(|c| c.decision.as_deref()) == Some("halted"));
    assert_eq!(s.channel.unwrap().seq, Some(5));
    a.wait_checks(2);
    assert!(a.store_is_empty() && a.request().is_none() && a.status().phase == "idle");
}

/// Expiry with the clock floor: a document valid by the wall clock is
/// refused once the device has seen a newer `issued` (persisted, so a
/// restart with a reset clock keeps it) or when the config's floor is past
/// its expiry. Refusals change nothing and say so in one line.
#[test]
fn an_expired_document_is_refused_by_the_clock_floor() {
    let f = fixtures();
    let system = f.get("TOP");
    let p = Publisher::new("admin-1");
    // Seq 1, issued half an hour ahead of this clock (nixless sign allows
    // up to an hour): the device's floor moves there. Not for this device's
    // tags, so nothing is deployed.
    let t = now();
    let mut d = Doc::new(1, system);
    d.issued = t + 1800;
    d.expires = t + DAY;
    p.publish("stable.json", &d.json().replace("\"kiosk\"", "\"elsewhere\""));
    let mut a = Agent::follow("kiosk-1", &p, "");
    let c =
        a.wait_status("not-for-me", |s| s.channel.as_ref().and_then(|c| c.decision.as_deref()) == Some("not-for-me"));
    assert_eq!(c.channel.as_ref().unwrap().clock_floor, t + 1800);
    assert!(a.metrics().contains(
        "nixless_channel_info{channel=\"stable\",group=\"\",wave=\"0\",seq=\"1\",system=\"\",decision=\"not-for-me\"} 1\n"
    ));
    let state = a.state_json();
    assert!(state.contains(&format!("\"clock_floor\":{}", t + 1800)), "{state}");

    // Seq 2 expires ten minutes from now by the wall clock, but before the
    // floor: refused as expired, and nothing changes.
    let mut d = Doc::new(2, system);
    d.issued = t - DAY;
    d.expires = t + 600;
    p.publish("stable.json", &d.json());
    let c = a.wait_status("an expiry refusal", |s| {
        s.channel.as_ref().and_then(|c| c.error.as_deref()).is_some_and(|e| e.contains("expired"))
    });
    let c = c.channel.unwrap();
    let err = c.error.unwrap();
    assert!(err.contains(&format!("document expired at {} (now {})", t + 600, t + 1800)), "{err}");
    assert_eq!((c.seq, c.decision.as_deref()), (Some(1), Some("not-for-me")), "the held document is unchanged");
    assert_eq!(a.state_json(), state);
    assert_eq!(a.log().matches("document expired").count(), 1, "logged once, not per check:\n{}", a.log());
    assert!(a.store_is_empty());

    // A fresh device whose config floor is past the document's expiry
    // refuses it without ever having seen a newer one.
    let mut b = Agent::follow("kiosk-2", &p, &format!(r#","clock_floor":{}"#, t + 601));
    let s = b.wait_status("an expiry refusal", |s| {
        s.channel.as_ref().and_then(|c| c.error.as_deref()).is_some_and(|e| e.contains("expired"))
    });
    assert_eq!(s.channel.as_ref().and_then(|c| c.seq), None, "no document held");
    assert!(b.store_is_empty() && b.request().is_none() && b.state_json().is_empty());
}

/// A system whose health check fails is rolled back and recorded as
/// failed: the next checks of the same document do not try it again.
#[test]
fn a_failed_system_is_not_retried() {
    let f = fixtures();
    let system = f.get("TOP");
    let p = Publisher::new("admin-1");
    p.publish("stable.json", &Doc::new(3, system).json());
    let extra = r#","health_units":["app.service"],"health_timeout_secs":5"#;
    let mut a = Agent::follow("kiosk-1", &p, extra);
    let r = a.wait_request(1);
    assert_eq!(r.step.as_str(), "test");
    a.switch_result(1, 0);
    // Play the health helper: the unit failed.
    let dir = a.state_dir();
    let id = wait_until("a health request", Duration::from_secs(30), || protocol::read_health_request(&dir));
    let o = protocol::Outcome { id, code: Some(3), tail: "app.service: failed".into() };
    protocol::write_health_result(&dir, &o).unwrap();
    let r = a.wait_request(2);
    assert_eq!((r.step.as_str(), r.system.as_str()), ("rollback-test", f.get("P_FILE")));
    a.switch_result(2, 0);
    let s = a.wait_status("rolled back", |s| s.phase == "idle" && s.last_result.is_some());
    let last = s.last_result.unwrap();
    assert_eq!((last.seq, last.outcome.as_str()), (3, "rolled-back"), "{:?}", last.reason);
    assert!(last.reason.unwrap_or_default().contains("health check failed"));
    assert!(a.metrics().contains(&format!(
        "nixless_last_result_info{{outcome=\"rolled-back\",system=\"{system}\",origin=\"channel\"}} 1\n"
    )));
    let s = a.wait_status("failed-before", |s| {
        s.channel.as_ref().and_then(|c| c.decision.as_deref()) == Some("failed-before")
    });
    let c = s.channel.unwrap();
    assert_eq!(c.wave, Some(1));
    // Status says what the record keeps: the document accepted and the
    // system not retried; so does `nixless status`'s channel table.
    assert_eq!((c.accepted_seq, c.failed_system.as_deref()), (Some(3), Some(system)));
    assert!(c.expires.is_some_and(|t| t > now()), "{c:?}");
    let out = nixless(&["status", &a.url()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let row = text.lines().filter(|l| l.starts_with("kiosk-1 ")).nth(1).unwrap_or_else(|| panic!("{text}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[..6], ["kiosk-1", "stable", "3", "kiosk", "1", "failed-before"], "{text}");
    assert!(row.contains(&format!("; not retrying {system}")) && row.contains(" expires in "), "{text}");
    let state = a.state_json();
    assert!(state.contains(&format!(r#""failed":"{system}""#)), "{state}");
    a.wait_checks(3);
    assert_eq!(a.request().map(|r| r.id), Some(2), "no new switch request");
    assert_eq!((a.status().phase.as_str(), a.state_json()), ("idle", state.clone()));
    // Nor after a restart: the record is in the state file.
    a.restart();
    a.wait_status("failed-before after a restart", |s| {
        s.channel.as_ref().and_then(|c| c.decision.as_deref()) == Some("failed-before")
    });
    a.wait_checks(2);
    assert_eq!(a.request().map(|r| r.id), Some(2), "no new switch request");
    assert_eq!((a.status().phase.as_str(), a.state_json()), ("idle", state));
}

/// A key rotation document signed with the current key makes the new key
/// the one deploy POSTs (and channel documents) are checked with; the old
/// key, not in the new set, is refused from then on.
#[test]
fn a_key_rotation_makes_a_new_key_valid_for_deploys() {
    let f = fixtures();
    let p = Publisher::new("admin-1");
    let next = Publisher::new("admin-2");
    let t = now();
    let rotation = nixless::channel::keys::render(1, t - 60, t + 30 * DAY, &[next.secret.public()]).unwrap();
    let keys_url = p.url("keys.json");
    let mut a = Agent::start("kiosk-1", &p.secret, &format!(r#","keys_url":"{keys_url}""#));
    // Before: admin-2 is a stranger.
    assert_eq!(a.post(&next.secret, 1, f.get("TOP")), 401);
    p.publish("keys.json", &rotation);
    let s = a.wait_status("the rotation", |s| s.channel.as_ref().and_then(|c| c.keys_seq) == Some(1));
    assert_eq!(s.channel.unwrap().keys_error, None);
    assert!(
        a.log().contains("deploy keys rotated (rotation seq 1, signed by admin-1): trusting admin-2"),
        "{}",
        a.log()
    );
    assert_eq!(a.post(&p.secret, 2, f.get("TOP")), 401, "the retired key is refused");
    assert_eq!(a.post(&next.secret, 3, "/nix/store/00000000000000000000000000000000-missing"), 202);
    let s = a.wait_status("the deploy to fail", |s| s.last_result.is_some() && s.phase == "idle");
    assert_eq!(s.highest_seq, 3);
    // The rotation survives a restart (it is in the state file).
    a.restart();
    assert_eq!(a.post(&p.secret, 4, f.get("TOP")), 401);
    assert_eq!(a.post(&next.secret, 5, "/nix/store/00000000000000000000000000000000-missing"), 202);
}

/// A replayed older channel document (validly signed) is refused, as is
/// one for another channel and one with a bad signature; none changes the
/// record or the decision held.
#[test]
fn a_replayed_older_document_is_refused() {
    let f = fixtures();
    let system = f.get("TOP");
    let p = Publisher::new("admin-1");
    let mut d = Doc::new(5, system);
    d.waves = format!(r#"[{{"percent":100,"start":{}}}]"#, now() + DAY);
    let seq4 = {
        let mut old = Doc::new(4, system);
        old.waves = r#"[{"percent":100}]"#.into();
        old.json()
    };
    p.publish("stable.json", &d.json());
    let mut a = Agent::follow("kiosk-1", &p, "");
    a.wait_status("seq 5 held", |s| s.channel.as_ref().and_then(|c| c.seq) == Some(5));
    let state = a.state_json();
    assert!(state.contains(r#""channel":{"seq":5"#), "{state}");

    p.publish("stable.json", &seq4);
    let s = a.wait_status("the replay refused", |s| {
        s.channel.as_ref().and_then(|c| c.error.as_deref()).is_some_and(|e| e.contains("sequence 4"))
    });
    let c = s.channel.unwrap();
    assert!(c.error.unwrap().contains("sequence 4 is below the one last accepted from this channel, 5"));
    assert_eq!((c.seq, c.decision.as_deref()), (Some(5), Some("wait")));

    let mut beta = Doc::new(6, system);
    beta.channel = "beta";
    p.publish("stable.json", &beta.json());
    a.wait_status("the other channel refused", |s| {
        s.channel.as_ref().and_then(|c| c.error.as_deref()).is_some_and(|e| e.contains("for channel \"beta\""))
    });

    let stranger = Publisher::new("admin-1");
    p.publish_with(&stranger.key, "stable.json", &Doc::new(7, system).json());
    a.wait_status("the bad signature refused", |s| {
        s.channel.as_ref().and_then(|c| c.error.as_deref()).is_some_and(|e| e.contains("signature"))
    });
    assert_eq!(a.state_json(), state);
    assert!(a.store_is_empty() && a.request().is_none() && a.status().phase == "idle");
    assert_eq!(a.channel().seq, Some(5));
}

/// README's release script for an admin's CI (`examples/fleet-release.sh`)
/// end to end: real `nix copy` pushes the closure to a new cache with the
/// cache key, the script writes the channel document, `nixless sign
/// --publish` checks, signs and publishes it; a device following the
/// channel deploys the group's system from that cache and commits it.
#[test]
fn the_readme_release_script_publishes_what_a_device_follows() {
    let f = fixtures();
    let system = f.get("TOP");
    let p = Publisher::new("admin-1");
    let cache = tempfile::Builder::new().prefix("nixless-release-cache-").tempdir().unwrap();
    let cache_url = format!("file://{}", cache.path().display());
    let run = |args: &[&str]| {
        Command::new("bash")
            .arg(repo().join("examples/fleet-release.sh"))
            .args(args)
            .env("CACHE", &cache_url)
            .env("CACHE_KEY", target_dir().join("fixtures/keys/a.sk"))
            .env("ADMIN_KEY", &p.key)
            .env("PUBLISH", p.dir.path().join("stable.json"))
            .env("CHANNEL", CHANNEL)
            .env("DEVICE_CACHES", format!(r#"["{cache_url}"]"#))
            .env("WAVES", r#"[{"percent": 100}]"#)
            .env("NIXLESS", bin())
            .env_remove("PROMETHEUS")
            .output()
            .unwrap()
    };
    // Refused before anything is pushed or published: not a store path.
    let out = run(&["kiosk=/tmp/x"]);
    assert!(!out.status.success() && stderr(&out).contains("kiosk: not a store path"), "{}", stderr(&out));
    assert!(!p.dir.path().join("stable.json").exists() && fs::read_dir(cache.path()).unwrap().next().is_none());

    let out = run(&[&format!("kiosk={system}"), &format!("other={}", f.get("P_FILE"))]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(stderr(&out).contains("published"), "{}", stderr(&out));
    let hash = &system["/nix/store/".len()..][..32];
    assert!(cache.path().join(format!("{hash}.narinfo")).exists(), "nix copy pushed the system");

    let mut a = Agent::follow("kiosk-1", &p, "");
    let s = a.wait_status("the channel job to switch", |s| s.phase == "switching");
    assert_eq!(s.job.unwrap().system, system);
    assert_eq!(s.channel.unwrap().group.as_deref(), Some("kiosk"));
    assert_store_sound(&a.tmp.path().join("root"), cache.path());
    for id in [1, 2] {
        let r = a.wait_request(id);
        assert_eq!(r.system, system);
        a.switch_result(id, 0);
    }
    let s = a.wait_status("the channel job to commit", |s| s.phase == "idle" && s.last_result.is_some());
    let last = s.last_result.unwrap();
    assert_eq!((last.outcome.as_str(), last.system.as_str()), ("committed", system), "{:?}", last.reason);
}
