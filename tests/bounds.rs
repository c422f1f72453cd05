//! Bounds on numbers and nesting, through the real binary: the agent, its
//! config, `nixless deploy` and `nixless status` (issue 9, item 8).
//!
//! Each test failed on the code before the bounds: the agent died of a
//! stack overflow on a deep signed document and accepted seq 2^64 − 1,
//! `nixless status` died of one on a deep status body, a huge
//! `poll_interval_secs` was accepted, and any `--seq` was signed.

mod common;

use common::*;
use nixless::deploy::Action;
use nixless::deploy::{render, sign};
use nixless::nix::SecretKey;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

const HOST: &str = "kiosk-7";
/// 2^53 − 1, written out (not the crate's constant) so the test says the
/// bound itself.
const MAX_SEQ: u64 = 9_007_199_254_740_991;

fn stderr_lines(o: &Output) -> Vec<String> {
    stderr(o).lines().map(str::to_owned).collect()
}

/// An agent config in `dir` trusting `deploy_key`; `extra` is appended to
/// the object (`,"key":value…`).
fn write_config(dir: &Path, deploy_key: &SecretKey, port: u16, extra: &str) -> PathBuf {
    let cache_key = SecretKey::generate("cache-1").unwrap();
    let root = dir.join("root");
    fs::create_dir_all(&root).unwrap();
    let text = format!(
        r#"{{"host":"{HOST}","listen":["127.0.0.1:{port}"],"caches":["http://127.0.0.1:1"],"cache_keys":["{}"],"deploy_keys":["{}"],"root":"{}"{extra}}}"#,
        cache_key.public(),
        deploy_key.public(),
        root.display()
    );
    let path = dir.join("config.json");
    fs::write(&path, text).unwrap();
    path
}

fn spawn_agent(config: &Path) -> Child {
    Command::new(bin())
        .args(["agent", "--no-seccomp", "--config"])
        .arg(config)
        .env_remove("NIXLESS_LOG")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (bounded) for `child` to exit; kills it and fails if it does not.
fn wait_exit(child: &mut Child, within: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if start.elapsed() > within {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The agent, SIGKILLed on drop.
struct Agent {
    child: Child,
    port: u16,
}

impl Agent {
    fn start(config: &Path, port: u16) -> Agent {
        let mut a = Agent { child: spawn_agent(config), port };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            a.assert_alive("starting");
            assert!(start.elapsed() < Duration::from_secs(10), "agent did not listen within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        a
    }

    fn assert_alive(&mut self, when: &str) {
        if let Some(st) = self.child.try_wait().unwrap() {
            let mut log = String::new();
            let _ = self.child.stderr.take().unwrap().read_to_string(&mut log);
            panic!("agent exited while {when}: {st:?}\n{log}");
        }
    }

    /// One request on a fresh connection; returns status code and body.
    fn request(&mut self, head: &str, body: &[u8]) -> (u16, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        // The agent may answer and close before reading all of a refused body.
        let _ = s.write_all(head.as_bytes()).and_then(|_| s.write_all(body));
        let mut resp = Vec::new();
        let _ = s.read_to_end(&mut resp);
        let text = String::from_utf8_lossy(&resp).into_owned();
        let code = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        (code, body)
    }

    fn post_deploy(&mut self, body: &[u8], sig: &str) -> (u16, String) {
        let head = format!(
            "POST /v1/deploy HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nNixless-Signature: {sig}\r\n\r\n",
            body.len()
        );
        self.request(&head, body)
    }

    fn status(&mut self) -> String {
        let (code, body) = self.request("GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n", b"");
        assert_eq!(code, 200, "{body}");
        self.assert_alive("answering status");
        body
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A signed document with 2 000 000 nested arrays in an unknown field
/// (4 MB, under the default 4 MiB body limit) gets a 400 naming the depth,
/// and the agent keeps serving. Before, serde-json-core recursed into the
/// field and the agent died of a stack overflow.
#[test]
fn agent_refuses_deep_signed_document_and_stays_up() {
    let tmp = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("admin-1").unwrap();
    let port = free_port();
    let mut agent = Agent::start(&write_config(tmp.path(), &key, port, ""), port);
    let n = 2_000_000;
    let doc = format!(r#"{{"host":"{HOST}","seq":5,"action":"gc","x":{}{}}}"#, "[".repeat(n), "]".repeat(n));
    let (code, body) = agent.post_deploy(doc.as_bytes(), &sign(&key, doc.as_bytes()));
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("nested deeper than 32 levels"), "{body}");
    assert!(agent.status().contains(r#""highest_seq":0"#));
}

/// seq 2^53 − 1 is accepted, anything above refused with 400 and without
/// raising the highest accepted sequence. Before, 2^64 − 1 was accepted
/// and every later deploy was stale for good.
#[test]
fn agent_takes_seq_up_to_2_pow_53_minus_1() {
    let tmp = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("admin-1").unwrap();
    let port = free_port();
    let mut agent = Agent::start(&write_config(tmp.path(), &key, port, ""), port);
    for seq in [u64::MAX, MAX_SEQ + 1] {
        let doc = render(HOST, None, seq, Action::Gc, &[], &[]).unwrap();
        let (code, body) = agent.post_deploy(doc.as_bytes(), &sign(&key, doc.as_bytes()));
        assert_eq!(code, 400, "{seq}: {body}");
        assert!(body.contains("above the largest allowed, 9007199254740991"), "{body}");
    }
    assert!(agent.status().contains(r#""highest_seq":0"#));
    let doc = render(HOST, None, MAX_SEQ, Action::Gc, &[], &[]).unwrap();
    let (code, body) = agent.post_deploy(doc.as_bytes(), &sign(&key, doc.as_bytes()));
    assert_eq!(code, 202, "{body}");
    assert!(agent.status().contains(r#""highest_seq":9007199254740991"#));
}

/// An out-of-range number in the config stops the agent before it starts,
/// with one line naming the key and its range. Before, this config was
/// accepted and the agent panicked at its first poll (Instant + Duration
/// overflow); `max_body_bytes: 0` made every deploy 413.
#[test]
fn agent_refuses_config_numbers_out_of_range() {
    let tmp = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("admin-1").unwrap();
    let poll = r#","poll_url":"file:///nonexistent/doc.json""#;
    for (extra, want) in [
        (
            ",\"poll_interval_secs\":18446744073709551615",
            "poll_interval_secs must be 1..=604800, got 18446744073709551615",
        ),
        (",\"max_body_bytes\":0", "max_body_bytes must be 1024..=16777216, got 0"),
        (",\"retries\":-1", "retries must be 0..=100, got -1"),
    ] {
        let config = write_config(tmp.path(), &key, free_port(), &format!("{poll}{extra}"));
        let mut child = spawn_agent(&config);
        let st = wait_exit(&mut child, Duration::from_secs(10));
        let mut err = String::new();
        child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert_eq!(st.code(), Some(1), "{extra}: {st:?} {err}");
        assert_eq!(err, format!("nixless: error: {}: {want}\n", config.display()), "{extra}");
    }
}

fn keygen(dir: &Path) -> PathBuf {
    let keyfile = dir.join("admin-1.key");
    let out = nixless(&["keygen", "admin-1", "--out", keyfile.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    keyfile
}

fn deploy_out(keyfile: &Path, out: &Path, seq: u64, force: bool) -> Output {
    let seq = seq.to_string();
    let mut args =
        vec!["deploy", "--key", keyfile.to_str().unwrap(), "--host", HOST, "--action", "gc", "--seq", &seq, "--out"];
    args.push(out.to_str().unwrap());
    if force {
        args.push("--force");
    }
    nixless(&args)
}

/// `--seq` two days ahead is refused without `--force` (and nothing is
/// written), signed with it; above 2^53 − 1 is refused even forced.
#[test]
fn deploy_refuses_seq_far_ahead_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let keyfile = keygen(tmp.path());
    let out = tmp.path().join("doc.json");
    let ahead = now() + 2 * 86_400;

    let o = deploy_out(&keyfile, &out, ahead, false);
    assert_eq!(o.status.code(), Some(1));
    let lines = stderr_lines(&o);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with(&format!("nixless: error: --seq {ahead} is ")), "{lines:?}");
    assert!(lines[0].contains("ahead of now") && lines[0].contains("--force"), "{lines:?}");
    assert!(!out.exists() && !tmp.path().join("doc.json.sig").exists());

    let o = deploy_out(&keyfile, &out, ahead, true);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(fs::read_to_string(&out).unwrap().contains(&format!("\"seq\":{ahead}")));

    // Within a day needs no force.
    assert!(deploy_out(&keyfile, &out, now() + 3600, false).status.success());

    assert!(deploy_out(&keyfile, &out, MAX_SEQ, true).status.success());
    let o = deploy_out(&keyfile, &out, MAX_SEQ + 1, true);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr_lines(&o),
        ["nixless: error: --seq 9007199254740992: above 9007199254740991 (2^53-1), the largest an agent accepts"]
    );
}

/// Serves `body` as the answer to every request, on a loopback port.
fn serve_forever(body: Vec<u8>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).and_then(|_| conn.write_all(&body));
        }
    });
    port
}

/// A status body of 500 000 nested arrays (1 MB, under the 1 MiB limit)
/// is one error line and exit 1. Before, `nixless status` died of a stack
/// overflow in serde-json-core.
#[test]
fn status_refuses_deep_body_with_one_line() {
    let n = 500_000;
    let body = format!(r#"{{"host":"evil","x":{}{}}}"#, "[".repeat(n), "]".repeat(n));
    let url = format!("http://127.0.0.1:{}", serve_forever(body.into_bytes()));
    let o = nixless(&["status", &url]);
    assert_eq!(o.status.code(), Some(1), "{:?} {}", o.status, stderr(&o));
    assert_eq!(
        stderr_lines(&o),
        [format!("nixless: error: {url}: bad status JSON: arrays and objects nested deeper than 32 levels")]
    );
}

/// NarSize is any u64 a trusted cache signed: the plan's total saturates
/// instead of overflowing (a panic in debug builds; in release a wrapped,
/// tiny total that passes the agent's free-space check).
#[test]
fn plan_total_saturates() {
    use nixless::store::install::{Plan, PlanItem};
    let path = nixless::nix::StorePath::from_absolute("/nix/store/qx8l0zlfvk6k8whfjvianr1mywbz9k4v-x").unwrap();
    let item = PlanItem { path, cache: 0, narinfo: String::new(), nar_size: u64::MAX / 2 + 1, references: vec![] };
    let plan = Plan { items: vec![item.clone(), item], present: 0 };
    assert_eq!(plan.nar_bytes(), u64::MAX);
}

/// A state file naming a job with sequence 0 (damaged or planted: no
/// document with seq 0 is ever accepted) made the resumed fetch compute
/// `0 - 1` and the agent panic. It now fails that job and keeps serving.
#[test]
fn agent_survives_a_job_with_seq_0_in_its_state() {
    let tmp = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("admin-1").unwrap();
    let port = free_port();
    let config = write_config(tmp.path(), &key, port, r#","retries":0"#);
    let state_dir = tmp.path().join("root/var/lib/nixless");
    fs::create_dir_all(&state_dir).unwrap();
    let system = "/nix/store/qx8l0zlfvk6k8whfjvianr1mywbz9k4v-nixos-system-kiosk";
    fs::write(
        state_dir.join("state.json"),
        format!(
            r#"{{"version":1,"highest_seq":0,"next_switch_id":1,"phase":"fetching","job":{{"seq":0,"action":"switch","system":"{system}","previous":null,"started":0,"transitions":0,"failure":null,"boot_id":null}},"outcomes":[0,0,0,0,0,0]}}"#
        ),
    )
    .unwrap();
    let doc = render(HOST, Some(system), 0, Action::Switch, &[], &[]).unwrap();
    fs::write(state_dir.join("deploy.json"), &doc).unwrap();
    fs::write(state_dir.join("deploy.json.sig"), sign(&key, doc.as_bytes())).unwrap();
    let mut agent = Agent::start(&config, port);
    let start = Instant::now();
    while agent.status().contains(r#""phase":"fetching""#) {
        assert!(start.elapsed() < Duration::from_secs(30), "still fetching: {}", agent.status());
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.assert_alive("after the job");
}
