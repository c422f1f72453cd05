//! Nothing the agent's loop waits on is unbounded (issue 9, item 4).
//!
//! A real agent process polls, or fetches from, a server that trickles a
//! few bytes of its answer and then holds the connection open (sending one
//! byte now and then, so a per-read timeout never fires) until the test
//! releases it. While the server holds, the agent must answer
//! `GET /v1/status` and keep pinging the systemd watchdog (a datagram
//! socket the test binds as `NOTIFY_SOCKET`); then the fetch must fail on
//! its overall deadline, say so, and the agent carries on.
//!
//! Every wait is on a condition, bounded by a generous timeout.

mod common;

use common::*;
use nixless::deploy::Action;
use nixless::deploy::{render, sign};
use nixless::nix::SecretKey;
use serde::Deserialize;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

const HOST: &str = "kiosk-7";
/// A valid store path no cache has: the agent asks the caches for it.
const MISSING: &str = "/nix/store/00000000000000000000000000000000-nixless-missing";
/// The fetcher's default overall deadline for a small document.
const DEADLINE_SECS: u64 = 15;
/// A trickled head is also bounded by the receive-response timeout, which
/// is `read_timeout_secs` (5 s by default); 30 s leaves the deadline to act.
const SLOW_READS: &str = r#","read_timeout_secs":30"#;
/// Bound on every wait below, well past the deadline.
const PATIENCE: Duration = Duration::from_secs(40);

// ---------------------------------------------------------------------------
// The trickling server.

/// What the server does with a request for a path.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Serve {
    /// Answers at once, with this body.
    Fast(&'static str),
    /// Sends part of the head, then holds.
    TrickleHead,
    /// Sends a complete head (Content-Length 1000) and part of the body,
    /// then holds.
    TrickleBody,
}

/// An HTTP server on loopback whose connections, once holding, stay open
/// (a byte every 300 ms) until [`Trickler::release`] or the peer closes.
struct Trickler {
    port: u16,
    /// Connections holding right now.
    holding: Arc<AtomicUsize>,
    /// Connections that have ever reached holding: a stale connection the
    /// server has not yet noticed is closed still counts in `holding`, so
    /// "a new fetch is held" is `held` growing, not `holding > 0`.
    held: Arc<AtomicUsize>,
    /// Requests seen (paths), in order.
    seen: Arc<Mutex<Vec<String>>>,
    released: Arc<AtomicBool>,
}

impl Trickler {
    fn start(route: fn(&str) -> Serve) -> Trickler {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let holding = Arc::new(AtomicUsize::new(0));
        let held = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let released = Arc::new(AtomicBool::new(false));
        let (h, t, s, r) = (holding.clone(), held.clone(), seen.clone(), released.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(c) = conn else { continue };
                if r.load(Ordering::SeqCst) {
                    break;
                }
                let (h, t, s, r) = (h.clone(), t.clone(), s.clone(), r.clone());
                std::thread::spawn(move || serve_one(c, route, &h, &t, &s, &r));
            }
        });
        Trickler { port, holding, held, seen, released }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn holding(&self) -> usize {
        self.holding.load(Ordering::SeqCst)
    }

    fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    fn requests(&self, suffix: &str) -> usize {
        self.seen.lock().unwrap().iter().filter(|p| p.ends_with(suffix)).count()
    }

    fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

impl Drop for Trickler {
    fn drop(&mut self) {
        self.release();
    }
}

fn serve_one(
    mut c: TcpStream,
    route: fn(&str) -> Serve,
    holding: &AtomicUsize,
    held: &AtomicUsize,
    seen: &Mutex<Vec<String>>,
    released: &AtomicBool,
) {
    let Some(path) = read_request_path(&mut c) else { return };
    seen.lock().unwrap().push(path.clone());
    let prefix = match route(&path) {
        Serve::Fast(body) => {
            let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            let _ = c.write_all(resp.as_bytes());
            return;
        }
        // A header line that never ends: still a valid partial head.
        Serve::TrickleHead => "HTTP/1.1 200 OK\r\nX-Trickle: ".to_owned(),
        Serve::TrickleBody => "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{\"seq\":".to_owned(),
    };
    // The first bytes one at a time, then one every 300 ms: never silent
    // for long enough to trip a per-read timeout.
    for byte in prefix.bytes() {
        if c.write_all(&[byte]).is_err() {
            return;
        }
        sleep(Duration::from_millis(20));
    }
    holding.fetch_add(1, Ordering::SeqCst);
    held.fetch_add(1, Ordering::SeqCst);
    while !released.load(Ordering::SeqCst) {
        if c.write_all(b"a").is_err() {
            break;
        }
        sleep(Duration::from_millis(300));
    }
    holding.fetch_sub(1, Ordering::SeqCst);
}

// ---------------------------------------------------------------------------
// The agent, with a watchdog the test listens to.

#[derive(Deserialize, Debug)]
struct Poll {
    last_check: Option<u64>,
    error: Option<String>,
}

#[derive(Deserialize, Debug)]
struct Last {
    outcome: String,
    reason: Option<String>,
}

#[derive(Deserialize, Debug)]
struct Status {
    phase: String,
    last_result: Option<Last>,
    poll: Poll,
}

struct Agent {
    child: Child,
    port: u16,
    log: PathBuf,
    /// `WATCHDOG=1` pings as they arrive.
    pings: mpsc::Receiver<()>,
    _tmp: tempfile::TempDir,
    key: SecretKey,
}

impl Agent {
    /// Starts an agent over `cache` with `extra` config keys (JSON,
    /// each with a leading comma) and a 2 s watchdog; waits until it listens.
    fn start(cache: &str, extra: &str) -> Agent {
        let tmp = tempfile::Builder::new().prefix("nixless-deadlines-").tempdir().unwrap();
        let key = SecretKey::generate("admin-1").unwrap();
        let cache_key = SecretKey::generate("cache-1").unwrap();
        let port = free_port();
        let root = tmp.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        let config = tmp.path().join("config.json");
        let text = format!(
            r#"{{"host":"{HOST}","listen":["127.0.0.1:{port}"],"caches":["{cache}"],"cache_keys":["{}"],"deploy_keys":["{}"],"root":"{}","retries":1{extra}}}"#,
            cache_key.public(),
            key.public(),
            root.display(),
        );
        std::fs::write(&config, text).unwrap();
        let notify = tmp.path().join("notify.sock");
        let pings = listen_for_pings(UnixDatagram::bind(&notify).unwrap());
        let log = tmp.path().join("agent.log");
        let child = Command::new(bin())
            .args(["agent", "--no-seccomp", "--config"])
            .arg(&config)
            .env_remove("NIXLESS_LOG")
            .env_remove("WATCHDOG_PID")
            .env("NOTIFY_SOCKET", &notify)
            .env("WATCHDOG_USEC", "2000000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut a = Agent { child, port, log, pings, _tmp: tmp, key };
        wait_until("the agent to listen", Duration::from_secs(10), || {
            a.assert_alive("starting");
            TcpStream::connect_timeout(&addr(port), Duration::from_millis(200)).ok()
        });
        a
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_alive(&mut self, when: &str) {
        if let Some(st) = self.child.try_wait().unwrap() {
            panic!("agent exited while {when}: {st:?}\n--- agent log ---\n{}", self.log());
        }
    }

    /// `GET /v1/status`. The read timeout only bounds the test: before the
    /// fix the loop was blocked for the whole fetch (30 s and more).
    fn status(&mut self) -> Status {
        self.assert_alive("asked for status");
        let mut s = TcpStream::connect_timeout(&addr(self.port), Duration::from_secs(2)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
        let mut buf = Vec::new();
        let res = s.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf).into_owned();
        assert!(text.starts_with("HTTP/1.1 200"), "no status answer ({res:?}): {text:?}\n{}", self.log());
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        let mut scratch = vec![0u8; body.len()];
        serde_json_core::from_slice_escaped::<Status>(body.as_bytes(), &mut scratch)
            .unwrap_or_else(|e| panic!("status is not the expected JSON ({e}): {body}"))
            .0
    }

    fn wait_status(&mut self, what: &str, pred: impl Fn(&Status) -> bool) -> Status {
        let start = Instant::now();
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}; last {s:?}\n{}", self.log());
            sleep(Duration::from_millis(100));
        }
    }

    /// Forgets the pings received so far.
    fn forget_pings(&mut self) {
        while self.pings.try_recv().is_ok() {}
    }

    /// Waits for the next watchdog ping (WatchdogSec is 2 s: one is due
    /// every second).
    fn watchdog_ping(&mut self) {
        if let Err(e) = self.pings.recv_timeout(Duration::from_secs(10)) {
            panic!("no watchdog ping within 10 s ({e})\n{}", self.log());
        }
    }

    fn deploy(&mut self, system: &str) {
        let body = render(HOST, Some(system), 5, Action::Switch, &[], &[]).unwrap();
        let sig = sign(&self.key, body.as_bytes());
        let req = format!(
            "POST /v1/deploy HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nNixless-Signature: {sig}\r\n\r\n{body}",
            body.len()
        );
        let mut s = TcpStream::connect_timeout(&addr(self.port), Duration::from_secs(2)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("HTTP/1.1 202"), "deploy not accepted: {text}");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads the notify socket in a thread, as systemd does: a socket nobody
/// reads fills up and blocks the sender. Sends `()` for each `WATCHDOG=1`.
fn listen_for_pings(sock: UnixDatagram) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = sock.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "WATCHDOG=1") && tx.send(()).is_err() {
                return;
            }
        }
    });
    rx
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// While `server` holds the agent's `nth` held fetch (1-based): status
/// answers, and three watchdog pings arrive, each time with the server
/// still holding (so the answer did not wait for the fetch to give up).
fn assert_loop_alive_while_held(agent: &mut Agent, server: &Trickler, nth: usize, phase: &str) {
    wait_until("the server to hold a fetch", PATIENCE, || (server.held() >= nth).then_some(()));
    agent.forget_pings();
    for _ in 0..3 {
        let s = agent.status();
        assert_eq!(s.phase, phase, "{s:?}");
        agent.watchdog_ping();
        assert!(server.holding() > 0, "the fetch ended before the loop answered\n{}", agent.log());
    }
}

fn deadline_message(msg: Option<&str>, path: &str) -> bool {
    msg.is_some_and(|m| m.contains(path) && m.contains(&format!("within {DEADLINE_SECS} s (overall deadline)")))
}

// ---------------------------------------------------------------------------

/// A poll URL whose body trickles: status and the watchdog live on, the
/// poll fails on the deadline with a clear error, and the agent polls again.
#[test]
fn a_trickling_poll_url_does_not_block_the_loop() {
    let server = Trickler::start(|_| Serve::TrickleBody);
    let extra = format!(r#","poll_url":"{}/doc.json","poll_interval_secs":1"#, server.url());
    let mut agent = Agent::start("file:///nonexistent-nixless-cache", &extra);
    assert_loop_alive_while_held(&mut agent, &server, 1, "idle");
    let s = agent.wait_status("the poll deadline error", |s| deadline_message(s.poll.error.as_deref(), "/doc.json"));
    assert!(s.poll.last_check.is_some(), "{s:?}");
    // And it polls again (and is held again) with the loop alive.
    assert_loop_alive_while_held(&mut agent, &server, 2, "idle");
    assert!(server.requests("/doc.json") >= 2);
    agent.assert_alive("polling again");
}

/// A cache whose `nix-cache-info` head trickles, during a deploy: status
/// (phase fetching) and the watchdog live on; the fetch fails naming the
/// deadline; the agent is idle and serving afterwards.
#[test]
fn a_trickling_cache_info_does_not_block_a_deploy() {
    let server = Trickler::start(|_| Serve::TrickleHead);
    let mut agent = Agent::start(&server.url(), SLOW_READS);
    agent.deploy(MISSING);
    assert_loop_alive_while_held(&mut agent, &server, 1, "fetching");
    let s = agent.wait_status("the failed fetch", |s| s.phase == "idle" && s.last_result.is_some());
    let last = s.last_result.as_ref().unwrap();
    assert_eq!(last.outcome, "failed", "{s:?}");
    assert!(deadline_message(last.reason.as_deref(), "/nix-cache-info"), "{s:?}");
    agent.assert_alive("after the failed fetch");
}

/// The same with a healthy `nix-cache-info` and a trickling narinfo.
#[test]
fn a_trickling_narinfo_does_not_block_a_deploy() {
    let server = Trickler::start(|p| match p {
        "/nix-cache-info" => Serve::Fast("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"),
        _ => Serve::TrickleHead,
    });
    let mut agent = Agent::start(&server.url(), SLOW_READS);
    agent.deploy(MISSING);
    assert_loop_alive_while_held(&mut agent, &server, 1, "fetching");
    assert_eq!(server.requests(".narinfo"), 1);
    let s = agent.wait_status("the failed fetch", |s| s.phase == "idle" && s.last_result.is_some());
    let last = s.last_result.as_ref().unwrap();
    assert_eq!(last.outcome, "failed", "{s:?}");
    assert!(deadline_message(last.reason.as_deref(), ".narinfo"), "{s:?}");
    agent.assert_alive("after the failed fetch");
}
