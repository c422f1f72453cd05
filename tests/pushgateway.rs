//! The agent pushing its metrics to a real Prometheus Pushgateway (Debian's
//! `prometheus-pushgateway`, run on a loopback port by the test). Debian's
//! build persists to /var/lib/prometheus/pushgateway.data by default, which
//! would share groups between runs: each gateway gets a file of its own.
//!
//! The agent runs under its seccomp filter, with a real Nix-built cache
//! (file://), and is SIGKILLed and reaped when its guard drops. Every wait
//! is for a condition, bounded.

mod common;

use common::*;
use nixless::api::Status;
use nixless::deploy::{render, sign, Action};
use nixless::nix::SecretKey;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const GATEWAY: &str = "/usr/bin/prometheus-pushgateway";
/// A host name that cannot be a URL path segment as it is: pushed to the
/// gateway's `host@base64` group, and shown there as itself.
const HOST: &str = "kiosk?7&x=y#z";
const MISSING: &str = "/nix/store/00000000000000000000000000000000-nixless-missing";

fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .new_agent()
}

fn get(url: &str) -> Option<(u16, String)> {
    get_as(url, None)
}

/// A GET with HTTP basic auth when `auth` is given ("user:password").
fn get_as(url: &str, auth: Option<&str>) -> Option<(u16, String)> {
    let mut req = http().get(url);
    if let Some(a) = auth {
        req = req.header("Authorization", format!("Basic {}", nixless::nix::base64::encode(a.as_bytes())));
    }
    let mut r = req.call().ok()?;
    Some((r.status().as_u16(), r.body_mut().read_to_string().ok()?))
}

/// The real gateway on a loopback port; killed and reaped on drop.
struct Gateway {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
    /// Basic auth ("user:password") the gateway requires, if any.
    auth: Option<&'static str>,
}

/// The gateway's users: `nixless`, password `pw` (a bcrypt hash, cost 4,
/// made with Python's crypt.crypt over libxcrypt; the gateway checks it).
const WEB_CONFIG: &str = "basic_auth_users:\n  nixless: $2b$04$oQm0W9Ckf5C9qzeT5WVkMeJVORUlA88negOwu.Oy.Jk4GR07TnWsO\n";

impl Gateway {
    fn start(port: u16) -> Option<Gateway> {
        Gateway::start_with(port, None)
    }

    /// With `auth`, the gateway requires that user (see [`WEB_CONFIG`]).
    fn start_with(port: u16, auth: Option<&'static str>) -> Option<Gateway> {
        if !Path::new(GATEWAY).exists() {
            eprintln!("SKIP: {GATEWAY} missing (apt-get install prometheus-pushgateway; tests/run.sh does)");
            return None;
        }
        let dir = tempfile::Builder::new().prefix("nixless-pushgateway-").tempdir().unwrap();
        let child = Command::new(GATEWAY)
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg(format!("--persistence.file={}", dir.path().join("data").display()))
            .args(auth.map(|_| {
                let web = dir.path().join("web.yml");
                fs::write(&web, WEB_CONFIG).unwrap();
                format!("--web.config.file={}", web.display())
            }))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let gw = Gateway { child, port, _dir: dir, auth };
        wait_until("the pushgateway to be ready", Duration::from_secs(20), || {
            get_as(&format!("{}/-/ready", gw.url()), gw.auth).filter(|(s, _)| *s == 200)
        });
        Some(gw)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The gateway's exposition lines of this host's group.
    fn host_lines(&self) -> Vec<String> {
        let Some((200, text)) = get_as(&format!("{}/metrics", self.url()), self.auth) else { return vec![] };
        let label = format!("host=\"{HOST}\"");
        text.lines().filter(|l| l.contains(&label) && l.contains("job=\"nixless\"")).map(str::to_owned).collect()
    }

    /// Waits until a line of this host's group starts with `name{`, has
    /// every label in `labels` and the value `value` (any value: "*").
    fn wait_for(&self, name: &str, labels: &[&str], value: &str) -> Vec<String> {
        let what = format!("{name} {labels:?} {value} on the gateway");
        wait_until(&what, Duration::from_secs(30), || {
            let lines = self.host_lines();
            let hit = lines.iter().any(|l| {
                l.starts_with(&format!("{name}{{"))
                    && labels.iter().all(|lb| l.contains(lb))
                    && l.rsplit_once(' ').is_some_and(|(_, v)| value == "*" || v == value)
            });
            hit.then_some(lines)
        })
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An agent with its own root, config and log.
struct Agent {
    child: Child,
    tmp: tempfile::TempDir,
    port: u16,
    key: SecretKey,
}

impl Agent {
    fn start(pushgateway: &str, interval: u64) -> Agent {
        Agent::start_with(pushgateway, interval, None)
    }

    /// With `netrc`, the agent's credentials file for the caches and the
    /// gateway.
    fn start_with(pushgateway: &str, interval: u64, netrc: Option<&str>) -> Agent {
        let f = fixtures();
        let tmp = tempfile::Builder::new().prefix("nixless-push-").tempdir().unwrap();
        let key = SecretKey::generate("admin-1").unwrap();
        let port = free_port();
        let root = tmp.path().join("root");
        fs::create_dir_all(root.join("run")).unwrap();
        std::os::unix::fs::symlink(f.get("P_FILE"), root.join("run/current-system")).unwrap();
        std::os::unix::fs::symlink(f.get("P_FILE"), root.join("run/booted-system")).unwrap();
        let config = tmp.path().join("config.json");
        let netrc_key = match netrc {
            Some(text) => {
                let path = tmp.path().join("netrc");
                fs::write(&path, text).unwrap();
                format!(r#","netrc_file":"{}""#, path.display())
            }
            None => String::new(),
        };
        let cache = format!("file://{}", f.path("CACHE_ZSTD").display());
        let text = format!(
            r#"{{"host":"{HOST}","listen":["127.0.0.1:{port}"],"caches":["{cache}"],"cache_keys":["{}"],"deploy_keys":["{}"],"root":"{}","retries":0,"pushgateway_url":"{pushgateway}","push_interval_secs":{interval}{netrc_key}}}"#,
            f.get("PK_A"),
            key.public(),
            root.display(),
        );
        fs::write(&config, text).unwrap();
        let child = agent_command(Command::new(bin()), tmp.path()).spawn().unwrap();
        let mut a = Agent { child, tmp, port, key };
        wait_until("the agent to serve status", Duration::from_secs(10), || {
            a.assert_alive();
            get(&format!("{}/v1/status", a.url())).filter(|(s, _)| *s == 200)
        });
        a
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        agent_log(self.tmp.path())
    }

    fn assert_alive(&mut self) {
        assert_agent_alive(&mut self.child, self.tmp.path());
    }

    fn status(&mut self) -> Status {
        self.assert_alive();
        let (code, body) = get(&format!("{}/v1/status", self.url())).expect("status answers");
        assert_eq!(code, 200, "{body}");
        nixless::json::from_slice_bounded::<Status>(body.as_bytes()).unwrap_or_else(|e| panic!("{e}: {body}"))
    }

    fn wait_status(&mut self, what: &str, pred: impl Fn(&Status) -> bool) -> Status {
        wait_until(what, Duration::from_secs(60), || Some(self.status()).filter(&pred))
    }

    fn deploy(&self, seq: u64, system: &str) {
        let body = render(HOST, Some(system), seq, Action::Switch, &[], &[]).unwrap();
        let sig = sign(&self.key, body.as_bytes());
        let r = http()
            .post(&format!("{}/v1/deploy", self.url()))
            .header("Nixless-Signature", &sig)
            .header("Content-Type", "application/json")
            .send(body.as_bytes())
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
    }

    /// The agent's log lines about pushing.
    fn push_lines(&self) -> Vec<String> {
        self.log().lines().filter(|l| l.contains("push to ")).map(str::to_owned).collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("chmod").args(["-R", "u+w"]).arg(self.tmp.path()).status();
    }
}

/// The first push (at start) puts the host's group on the gateway with its
/// systems and phase; a deploy's outcome is pushed as soon as it is known,
/// not at the next interval (a day here).
#[test]
fn pushes_at_start_and_after_every_outcome() {
    let Some(gw) = Gateway::start(free_port()) else { return };
    let mut agent = Agent::start(&gw.url(), 86_400);
    let current = fixtures().get("P_FILE");
    let system = format!("system=\"{current}\"");
    gw.wait_for("nixless_phase", &["phase=\"idle\""], "1");
    gw.wait_for("nixless_system_info", &["kind=\"current\"", &system], "1");
    gw.wait_for("nixless_system_info", &["kind=\"booted\"", &system], "1");
    gw.wait_for("nixless_last_push_timestamp_seconds", &[], "*");
    let s = agent.wait_status("a push recorded in status", |s| s.push.as_ref().is_some_and(|p| p.last_ok.is_some()));
    let p = s.push.unwrap();
    assert_eq!((p.url.as_str(), p.error, p.errors), (gw.url().as_str(), None, 0));
    assert!(gw.host_lines().iter().all(|l| !l.starts_with("nixless_last_result_seq")), "no deploy yet");

    agent.deploy(1, MISSING);
    let s = agent.wait_status("the deploy to fail", |s| s.last_result.is_some() && s.phase == "idle");
    assert_eq!(s.last_result.as_ref().map(|l| (l.seq, l.outcome.as_str())), Some((1, "failed")));
    gw.wait_for("nixless_last_result_seq", &[], "1");
    gw.wait_for("nixless_last_result", &["outcome=\"failed\""], "1");
    gw.wait_for("nixless_deploys_total", &["outcome=\"failed\""], "1");
    assert!(agent.push_lines().is_empty(), "no push errors: {:?}", agent.push_lines());
}

/// A minimal gateway that answers every request 500, until dropped.
fn failing_gateway(listener: TcpListener) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            // Read the head and the announced body, then answer.
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let mut want = None;
            while want.is_none_or(|w| buf.len() < w) {
                match c.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                if want.is_none() {
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        want = Some(end + 4 + len);
                    }
                }
            }
            if buf.starts_with(b"STOP") {
                return;
            }
            let _ = c.write_all(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\nConnection: close\r\n\r\noops!",
            );
        }
    })
}

/// A gateway that is down, then answers 500, then works: the agent keeps
/// serving status throughout, counts every failed push, logs each kind of
/// failure once (not once per interval), and says when pushing works again.
#[test]
fn a_failing_gateway_is_counted_logged_once_and_changes_nothing() {
    if !Path::new(GATEWAY).exists() {
        eprintln!("SKIP: {GATEWAY} missing");
        return;
    }
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut agent = Agent::start(&url, 10);
    let before = fs::read(agent.tmp.path().join("root/var/lib/nixless/state.json")).ok();
    // Down: two failed pushes (at start, then the schedule's).
    let s = agent.wait_status("two failed pushes", |s| s.push.as_ref().is_some_and(|p| p.errors >= 2));
    let p = s.push.unwrap();
    assert!(p.last_ok.is_none() && p.error.as_deref().is_some_and(|e| e.contains(&url)), "{p:?}");
    assert_eq!((s.phase.as_str(), s.last_error), ("idle", None));
    let lines = agent.push_lines();
    assert_eq!(lines.len(), 1, "one line for the same kind of failure: {lines:?}");
    let (code, metrics) = get(&format!("{}/metrics", agent.url())).unwrap();
    assert_eq!(code, 200);
    let errors: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("nixless_push_errors_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(errors >= 2, "{metrics}");

    // Answers 500: a new kind, one more line.
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let server = failing_gateway(listener);
    let s = agent.wait_status("a push answered 500", |s| {
        s.push.as_ref().and_then(|p| p.error.as_deref()).is_some_and(|e| e.contains("HTTP 500: oops!"))
    });
    let n = s.push.unwrap().errors;
    agent.wait_status("another push answered 500", |s| s.push.as_ref().is_some_and(|p| p.errors > n));
    let lines = agent.push_lines();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[1].contains("HTTP 500: oops!"), "{lines:?}");
    // Stop the fake (it answers no one after this) and start the real one.
    let mut stop = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stop.write_all(b"STOP").unwrap();
    drop(stop);
    server.join().unwrap();
    let gw = wait_until("the port to be free for the gateway", Duration::from_secs(10), || Gateway::start_on(port))
        .expect("the gateway binary is there");
    let s = agent.wait_status("a push to work again", |s| s.push.as_ref().is_some_and(|p| p.last_ok.is_some()));
    assert_eq!(s.push.as_ref().unwrap().error, None);
    gw.wait_for("nixless_push_errors_total", &[], &s.push.unwrap().errors.to_string());
    // A push may have found the port closed between the fake and the real
    // gateway: one more transport line at most.
    let lines = agent.push_lines();
    assert!((3..=4).contains(&lines.len()) && lines.last().unwrap().contains("working again"), "{lines:?}");
    // Nothing of the agent's state changed on account of the gateway.
    assert_eq!(fs::read(agent.tmp.path().join("root/var/lib/nixless/state.json")).ok(), before);
}

impl Gateway {
    /// [`Gateway::start`] on a port that may still be held: None to retry.
    fn start_on(port: u16) -> Option<Option<Gateway>> {
        TcpListener::bind(("127.0.0.1", port)).ok()?;
        Some(Gateway::start(port))
    }
}

/// A gateway behind basic auth: the agent's netrc (the caches' credentials)
/// opens it; a wrong password is a 401 in status, and nothing else changes.
#[test]
fn credentials_from_netrc_reach_the_gateway() {
    let Some(gw) = Gateway::start_with(free_port(), Some("nixless:pw")) else { return };
    assert_eq!(get(&format!("{}/metrics", gw.url())).map(|r| r.0), Some(401), "the gateway wants a password");
    let mut wrong = Agent::start_with(&gw.url(), 86_400, Some("machine 127.0.0.1 login nixless password nope\n"));
    let s = wrong.wait_status("a refused push", |s| s.push.as_ref().is_some_and(|p| p.errors >= 1));
    let err = s.push.unwrap().error.unwrap_or_default();
    assert!(err.contains("HTTP 401") && !err.contains("nope"), "{err}");
    drop(wrong);
    let mut agent = Agent::start_with(&gw.url(), 86_400, Some("machine 127.0.0.1 login nixless password pw\n"));
    gw.wait_for("nixless_phase", &["phase=\"idle\""], "1");
    let s = agent.wait_status("a push recorded", |s| s.push.as_ref().is_some_and(|p| p.last_ok.is_some()));
    assert_eq!(s.push.unwrap().errors, 0);
    assert!(!agent.log().contains("pw\n") && !agent.log().contains("password"), "{}", agent.log());
}
