//! `nixless fleet status` and `nixless rollout watch` against a real
//! Prometheus (Debian's `prometheus`) scraping a real Pushgateway
//! (Debian's `prometheus-pushgateway`) with `honor_labels: true`, as the
//! README sets them up. Twenty fake hosts push their metric groups with
//! HTTP PUTs, as agents do; their channel labels (group, wave, decision)
//! come from the channel core's own `decide` on the signed document, so
//! they are what real devices would report. Every wait is for a condition
//! (Prometheus answering a query with the expected count), bounded.

mod common;

use common::prom::Stack;
use common::*;
use nixless::channel::{self, Decision, Device, Record};
use nixless::nix::{SecretKey, TrustedKeys};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const NEW: &str = "/nix/store/qx8l0zlfvk6k8whfjvianr1mywbz9k4v-nixos-system-kiosk-2";
const OLD: &str = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-nixos-system-kiosk-1";

/// A child process killed and reaped (by its own pid) on drop.
struct Server(Child, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn stack() -> Option<Stack> {
    Stack::start(|p| Command::new(p))
}

/// What one fake device pushes: the agent's own renderer for the base
/// metrics, and the two info metrics of the channel-following agent.
fn metrics(h: &FakeHost, now: u64) -> String {
    let snap = nixless::agent::status::Snapshot {
        host: h.name.clone(),
        current_system: Some(h.current.to_owned()),
        push: Some(nixless::api::Push {
            url: "x".into(),
            last_ok: Some(h.pushed.unwrap_or(now)),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut m = nixless::agent::status::metrics(&snap);
    m += "# TYPE nixless_channel_info gauge\n";
    m += &format!(
        "nixless_channel_info{{channel=\"stable\",group=\"{}\",wave=\"{}\",seq=\"{}\",system=\"{NEW}\",decision=\"{}\"}} 1\n",
        h.group, h.wave, h.seq, h.decision
    );
    if let Some((outcome, system)) = h.last {
        m += "# TYPE nixless_last_result_info gauge\n";
        m += &format!("nixless_last_result_info{{outcome=\"{outcome}\",system=\"{system}\",origin=\"channel\"}} 1\n");
    }
    m
}

#[derive(Clone)]
struct FakeHost {
    name: String,
    group: &'static str,
    wave: usize,
    seq: u64,
    decision: &'static str,
    current: &'static str,
    last: Option<(&'static str, &'static str)>,
    /// Last push time, if not now (a silent host).
    pushed: Option<u64>,
}

struct Channel {
    _dir: tempfile::TempDir,
    key: PathBuf,
    doc: PathBuf,
    sk: SecretKey,
    now: u64,
}

/// The channel document: group kiosk, 25 % then 100 % an hour later.
fn channel_doc() -> Channel {
    let now = nixless::clock::now();
    channel_doc_at(now, 3600)
}

/// The channel document issued at `issued`, wave 2 opening `soak` s later.
fn channel_doc_at(issued: u64, soak: u64) -> Channel {
    let dir = tempfile::tempdir().unwrap();
    let sk = SecretKey::generate("admin-1").unwrap();
    let key = dir.path().join("admin.sk");
    fs::write(&key, format!("{sk}\n")).unwrap();
    let now = nixless::clock::now();
    let doc = dir.path().join("stable.json");
    fs::write(
        &doc,
        format!(
            r#"{{"channel": "stable", "seq": 5, "issued": {issued}, "expires": {},
  "groups": {{"kiosk": {{"system": "{NEW}", "action": "switch",
    "waves": [{{"percent": 25}}, {{"percent": 100, "soak_secs": {soak}}}]}}}}}}
"#,
            now + 86_400
        ),
    )
    .unwrap();
    let out = nixless(&["sign", "--key", key.to_str().unwrap(), doc.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    Channel { _dir: dir, key, doc, sk, now }
}

fn verified(c: &Channel, path: &Path) -> channel::Verified {
    let body = fs::read(path).unwrap();
    let sig = fs::read(format!("{}.sig", path.display())).unwrap();
    channel::verify(&body, Some(&sig), &TrustedKeys::new(vec![c.sk.public()]), "stable").unwrap()
}

/// 20 hosts as devices would report the document: the first 5 of wave 1
/// (`failed` of them rolled back, the rest committed) and the first 15 of
/// wave 2 (waiting an hour); the last two of wave 2 silent for 2000 s.
fn fleet(c: &Channel, failed: usize) -> Vec<FakeHost> {
    let v = verified(c, &c.doc);
    let tags = ["kiosk".to_owned()];
    let (mut w1, mut w2) = (vec![], vec![]);
    for i in 0.. {
        if w1.len() == 5 && w2.len() == 15 {
            break;
        }
        let name = format!("kiosk-{i}");
        let dev = Device { host: &name, tags: &tags, running: Some(OLD), profile: Some(OLD) };
        match channel::decide(&v, &dev, &Record::default(), c.now).unwrap() {
            Decision::Deploy { wave: 1, .. } if w1.len() < 5 => {
                let last = if w1.len() < failed { ("rolled-back", NEW) } else { ("committed", NEW) };
                let current = if last.0 == "committed" { NEW } else { OLD };
                w1.push(FakeHost {
                    name,
                    group: "kiosk",
                    wave: 1,
                    seq: 5,
                    decision: "deploy",
                    current,
                    last: Some(last),
                    pushed: None,
                })
            }
            Decision::Wait { wave: 2, .. } if w2.len() < 15 => w2.push(FakeHost {
                name,
                group: "kiosk",
                wave: 2,
                seq: 5,
                decision: "wait",
                current: OLD,
                last: None,
                pushed: (w2.len() >= 13).then_some(c.now - 2000),
            }),
            _ => {}
        }
    }
    w1.extend(w2);
    w1
}

fn push_all(s: &Stack, hosts: &[FakeHost], now: u64) {
    for h in hosts {
        s.push(&h.name, &metrics(h, now));
    }
}

/// `rollout watch --prometheus P --channel-doc DOC --key KEY --publish DEST EXTRA…`.
fn watch_args(prometheus: &str, doc: &Path, key: &Path, publish: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> =
        ["rollout", "watch", "--prometheus", prometheus, "--channel-doc"].iter().map(|a| a.to_string()).collect();
    v.extend([doc.display().to_string(), "--key".into(), key.display().to_string()]);
    v.extend(["--publish".to_string(), publish.to_string()]);
    v.extend(extra.iter().map(|a| a.to_string()));
    v
}

fn run_watch(prometheus: &str, doc: &Path, key: &Path, publish: &str, extra: &[&str]) -> Output {
    let args = watch_args(prometheus, doc, key, publish, extra);
    nixless(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn watch(s: &Stack, c: &Channel, publish: &str, rate: &str) -> Output {
    run_watch(&s.prometheus, &c.doc, &c.key, publish, &["--max-failure-rate", rate, "--once"])
}

#[test]
fn fleet_status_and_rollout_watch_on_real_prometheus() {
    let Some(s) = stack() else { return };
    // Nothing pushed yet: zero hosts, and a hint at the usual cause.
    let out = nixless(&["fleet", "status", "--prometheus", &s.prometheus]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("0 hosts, 0 silent"));
    assert!(stderr(&out).contains("honor_labels: true"), "{}", stderr(&out));
    let c = channel_doc();
    let hosts = fleet(&c, 1);
    push_all(&s, &hosts, c.now);
    s.wait_for("count(nixless_channel_info{job=\"nixless\"})", "20");
    s.wait_for("count(nixless_last_result_info{job=\"nixless\"})", "5");

    // Fleet status, JSON: counts per system, outcome, channel wave, silent.
    let out = nixless(&["fleet", "status", "--prometheus", &s.prometheus, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let j = String::from_utf8(out.stdout).unwrap();
    assert!(j.contains("\"hosts\":20,\"silent_after\":900,"), "{j}");
    assert!(
        j.contains(&format!("\"systems\":[{{\"key\":\"{OLD}\",\"hosts\":16}},{{\"key\":\"{NEW}\",\"hosts\":4}}]")),
        "{j}"
    );
    assert!(j.contains("\"phases\":[{\"key\":\"idle\",\"hosts\":20}]"), "{j}");
    assert!(
        j.contains("\"outcomes\":[{\"key\":\"-\",\"hosts\":15},{\"key\":\"committed\",\"hosts\":4},{\"key\":\"rolled-back\",\"hosts\":1}]"),
        "{j}"
    );
    assert!(
        j.contains(
            "{\"channel\":\"stable\",\"seq\":5,\"group\":\"kiosk\",\"wave\":1,\"decision\":\"deploy\",\"hosts\":5}"
        ),
        "{j}"
    );
    assert!(
        j.contains(
            "{\"channel\":\"stable\",\"seq\":5,\"group\":\"kiosk\",\"wave\":2,\"decision\":\"wait\",\"hosts\":15}"
        ),
        "{j}"
    );
    let silent: Vec<&str> = hosts.iter().filter(|h| h.pushed.is_some()).map(|h| h.name.as_str()).collect();
    assert_eq!(silent.len(), 2);
    for h in &silent {
        assert!(j.contains(&format!("{{\"host\":\"{h}\",\"secs\":")), "{h} silent: {j}");
    }
    assert_eq!(j.matches("\"secs\":").count(), 2, "{j}");
    // A longer silence allowed: nobody is silent. The table form.
    let out = nixless(&["fleet", "status", "--prometheus", &s.prometheus, "--silent-after", "100000"]);
    let t = String::from_utf8(out.stdout).unwrap();
    assert!(t.starts_with("20 hosts, 0 silent for more than 100000 s\n"), "{t}");
    assert!(t.contains(&format!("{OLD:<72} 16\n")), "{t}");

    // 1 of 5 finished hosts failed: 20 %, not above 0.25. No halt, no file.
    let halt = c.doc.with_file_name("halt.json");
    let out = watch(&s, &c, halt.to_str().unwrap(), "0.25");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("group kiosk wave 1: 4 ok, 1 failed, 0 running, 0 waiting"), "{}", stderr(&out));
    assert!(!halt.exists());

    // Above 0.1: halted, exit 3, a signed halt document at seq 6.
    let out = watch(&s, &c, halt.to_str().unwrap(), "0.1");
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("HALTED group(s) kiosk of channel stable (seq 6)"), "{}", stderr(&out));
    let v = verified(&c, &halt);
    assert_eq!((v.doc.seq, v.doc.groups[0].halt), (6, true));
    // A wave-2 device that has not started: Halted, not Wait.
    let w2 = hosts.iter().find(|h| h.wave == 2).unwrap();
    let tags = ["kiosk".to_owned()];
    let dev = Device { host: &w2.name, tags: &tags, running: Some(OLD), profile: Some(OLD) };
    let rec = Record { seq: 5, ..Record::default() };
    assert_eq!(channel::decide(&v, &dev, &rec, nixless::clock::now()), Ok(Decision::Halted));
    // Watching the halted document: halted already, exit 3, nothing new.
    let before = fs::read(&halt).unwrap();
    let again = run_watch(&s.prometheus, &halt, &c.key, halt.to_str().unwrap(), &["--once"]);
    assert_eq!(again.status.code(), Some(3), "{}", stderr(&again));
    assert_eq!(fs::read(&halt).unwrap(), before);

    // Every host done (wave 1 committed, wave 2 running the release):
    // complete, exit 0, without --once too.
    let done: Vec<FakeHost> = hosts
        .iter()
        .map(|h| FakeHost {
            decision: "already-running",
            current: NEW,
            last: Some(("committed", NEW)),
            pushed: None,
            ..h.clone()
        })
        .collect();
    push_all(&s, &done, c.now);
    s.wait_for("count(nixless_channel_info{job=\"nixless\",decision=\"already-running\"})", "20");
    s.wait_for("count(nixless_last_result_info{job=\"nixless\",outcome=\"committed\"})", "20");
    let out =
        run_watch(&s.prometheus, &c.doc, &c.key, halt.to_str().unwrap(), &["--interval", "1", "--deadline", "60"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("rollout complete"), "{}", stderr(&out));
}

/// Pushes every host of `hosts` to the gateway every half second, as
/// agents on a schedule do, until dropped; the hosts of wave 1 only while
/// `wave1` holds (then they are dead: no more pushes).
struct Pusher {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    wave1: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pusher {
    fn start(gateway: &str, hosts: Vec<FakeHost>) -> Pusher {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let (stop, wave1) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(true)));
        let (s, w) = (stop.clone(), wave1.clone());
        let gateway = gateway.to_owned();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let alive = w.load(Ordering::SeqCst);
                for h in hosts.iter().filter(|h| alive || h.wave != 1) {
                    // A failed push is the test's to notice (Prometheus
                    // then never shows the host); no panic in the thread.
                    let _ = http()
                        .put(&format!("{gateway}/metrics/job/nixless/host/{}", h.name))
                        .header("Content-Type", "text/plain; version=0.0.4")
                        .send(metrics(h, nixless::clock::now()).as_bytes());
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        Pusher { stop, wave1, thread: Some(thread) }
    }

    fn kill_wave1(&self) {
        self.wave1.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Pusher {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// No news is not good news (the last session's 1000-agent run: the
/// gateway fell behind, watch saw stale data and never halted while the
/// next wave opened). Wave 2 opens about two minutes from now; wave 1's
/// five hosts committed and keep pushing. Watch, looping, sees fresh news
/// and goes on; then wave 1's agents die: once their last push is older
/// than --stale-after (15 s: room for a loaded machine), watch halts the group before wave 2 opens, saying
/// why in one line. With --on-no-news warn it only warns.
#[test]
fn rollout_watch_halts_when_a_wave_goes_silent_before_the_next_opens() {
    let Some(s) = stack() else { return };
    let now = nixless::clock::now();
    let c = channel_doc_at(now - 1000, 1120);
    let opens = now + 120;
    let hosts = fleet(&c, 0);
    let pusher = Pusher::start(&s.gateway, hosts.clone());
    s.wait_for("count(push_time_seconds{job=\"nixless\"} > time() - 5)", "20");
    s.wait_for("count(nixless_last_result_info{job=\"nixless\",outcome=\"committed\"})", "5");
    let halt = c.doc.with_file_name("halt.json");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v = watch_args(&s.prometheus, &c.doc, &c.key, halt.to_str().unwrap(), &["--stale-after", "15"]);
        v.extend(extra.iter().map(|a| a.to_string()));
        v
    };
    // Wave 1's news is due (wave 2 opens within the default 600 s lead)
    // and fresh: no halt.
    let out = Command::new(bin()).args(args(&["--once"])).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(e.contains("group kiosk wave 1: 5 ok, 0 failed, 0 running, 0 waiting\n"), "{e}");
    assert!(!e.contains("STALE") && !e.contains("no news") && !halt.exists(), "{e}");
    // The watcher, looping as an admin runs it; then wave 1 dies.
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut watcher = Server(
        Command::new(bin())
            .args(args(&["--interval", "1", "--deadline", "100"]))
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap(),
        tempfile::tempdir().unwrap(),
    );
    pusher.kill_wave1();
    // Two seconds more than --stale-after: the watcher's clock is read in
    // whole seconds, Prometheus's is not.
    s.wait_for("count(push_time_seconds{job=\"nixless\"} < time() - 17)", "5");
    // Warn only: a loud line, exit 0, nothing published by this one.
    let out = Command::new(bin()).args(args(&["--once", "--on-no-news", "warn"])).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(e.contains("5 of 20 hosts STALE (no push in the last 15 s)"), "{e}");
    assert!(e.contains("group kiosk wave 1: 5 ok, 0 failed, 0 running, 0 waiting, 5 STALE\n"), "{e}");
    assert!(
        e.contains(
            "nixless: WARNING: no news from wave 1 of group kiosk: 0 of its 5 hosts reported a result on the release \
             in the last 15 s (need 90%); wave 2 opens in "
        ) && e.contains("NOT halting (--on-no-news warn)"),
        "{e}"
    );
    // The looping watcher halts, before wave 2 opens.
    let status = wait_until("the watcher to exit", Duration::from_secs(120), || watcher.0.try_wait().unwrap());
    let halted_at = nixless::clock::now();
    let e = fs::read_to_string(log.path()).unwrap();
    assert_eq!(status.code(), Some(3), "{e}");
    assert!(halted_at < opens, "halted at {halted_at}, wave 2 opened at {opens}: {e}");
    let lines: Vec<&str> = e.lines().filter(|l| l.contains("HALTED")).collect();
    assert_eq!(lines.len(), 1, "{e}");
    assert!(
        lines[0].starts_with(
            "nixless: HALTED group(s) kiosk of channel stable (seq 6): no news from wave 1 of group kiosk: 0 of its 5 \
             hosts reported a result on the release in the last 15 s (need 90%); wave 2 opens in "
        ),
        "{e}"
    );
    let v = verified(&c, &halt);
    assert_eq!((v.doc.seq, v.doc.groups[0].halt), (6, true));
    // A wave-2 device that has not started: Halted, not Wait.
    let w2 = hosts.iter().find(|h| h.wave == 2).unwrap();
    let tags = ["kiosk".to_owned()];
    let dev = Device { host: &w2.name, tags: &tags, running: Some(OLD), profile: Some(OLD) };
    let rec = Record { seq: 5, ..Record::default() };
    assert_eq!(channel::decide(&v, &dev, &rec, nixless::clock::now()), Ok(Decision::Halted));
    drop(pusher);
}

/// Prometheus gives no answer (down, or too far behind to answer in time)
/// while wave 1 owes news: that is no news too. Its last answer (none
/// here) is judged again, and the group halted, in one line; warn mode
/// warns and reports the error.
#[test]
fn no_answer_from_prometheus_is_no_news_when_a_wave_is_due() {
    let now = nixless::clock::now();
    let c = channel_doc_at(now - 1000, 1120);
    let dead = format!("http://127.0.0.1:{}", free_port());
    let halt = c.doc.with_file_name("halt.json");
    let run = |extra: &[&str]| {
        let mut args = vec!["--once"];
        args.extend_from_slice(extra);
        run_watch(&dead, &c.doc, &c.key, halt.to_str().unwrap(), &args)
    };
    let out = run(&["--on-no-news", "warn"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.starts_with(
            "nixless: WARNING: no news from wave 1 of group kiosk: none of its hosts reports the channel; wave 2 opens in "
        ) && e.contains("NOT halting (--on-no-news warn)\nnixless: error: Prometheus at "),
        "{e}"
    );
    assert!(!halt.exists());
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let e = stderr(&out);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.starts_with(
            "nixless: HALTED group(s) kiosk of channel stable (seq 6): no news from wave 1 of group kiosk: none of its \
             hosts reports the channel; wave 2 opens in "
        ) && e.contains(&format!(" s (judged on Prometheus's last answer; this round: Prometheus at {dead}: GET ")),
        "{e}"
    );
    assert!(verified(&c, &halt).doc.groups[0].halt);
}

/// Errors: one line, the right exit code, nothing published.
#[test]
fn watch_errors_are_one_line() {
    let c = channel_doc();
    let port = free_port();
    let dead = format!("http://127.0.0.1:{port}");
    let halt = c.doc.with_file_name("halt.json");
    let run = |doc: &Path, extra: &[&str]| run_watch(&dead, doc, &c.key, halt.to_str().unwrap(), extra);
    // Prometheus down, --once: error at once.
    let out = run(&c.doc, &["--once"]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(e.lines().count() == 1 && e.starts_with(&format!("nixless: error: Prometheus at {dead}: GET")), "{e}");
    // Looping: retried until the deadline, then the last error.
    let out = run(&c.doc, &["--interval", "1", "--deadline", "2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("deadline of 2 s passed; last error: Prometheus at"), "{}", stderr(&out));
    // A document signed by another key: not ours to halt.
    let other = SecretKey::generate("admin-2").unwrap();
    let sig = nixless::deploy::sign(&other, &fs::read(&c.doc).unwrap());
    fs::write(format!("{}.sig", c.doc.display()), format!("{sig}\n")).unwrap();
    let out = run(&c.doc, &["--once"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("admin-2"), "{}", stderr(&out));
    let out = run(&c.doc, &["--once", "--max-failure-rate", "1.5"]);
    assert!(stderr(&out).contains("--max-failure-rate 1.5"), "{}", stderr(&out));
    for (bad, says) in [
        (&["--on-no-news", "shrug"][..], "--on-no-news shrug: expected halt or warn"),
        (&["--min-reported", "0"], "--min-reported 0: expected 0 < share <= 1"),
        (&["--stale-after", "0"], "--stale-after 0: expected 1 to 2592000 s"),
    ] {
        let out = run(&c.doc, &[&["--once"][..], bad].concat());
        assert_eq!((out.status.code(), stderr(&out)), (Some(1), format!("nixless: error: {says}\n")));
    }
    assert!(!halt.exists());
    // Fleet status against nothing.
    let out = nixless(&["fleet", "status", "--prometheus", &dead]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
}

/// A Prometheus that refuses the query (an HTTP server answering with
/// Prometheus's error JSON) and one that sends garbage: one line each.
#[test]
fn prometheus_errors_are_named() {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let answers = [
        (400, r#"{"status":"error","errorType":"bad_data","error":"invalid parameter \"query\""}"#.to_owned()),
        (200, format!("{{\"x\":{}", "[".repeat(100_000))),
    ];
    let server = std::thread::spawn(move || {
        for (status, body) in answers {
            let (mut c, _) = listener.accept().unwrap();
            let _ = read_request_path(&mut c);
            let _ =
                write!(c, "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        }
    });
    let url = format!("http://127.0.0.1:{port}");
    let out = nixless(&["fleet", "status", "--prometheus", &url]);
    assert_eq!(
        stderr(&out),
        format!("nixless: error: Prometheus at {url}: query refused (bad_data): invalid parameter \"query\"\n")
    );
    let out = nixless(&["fleet", "status", "--prometheus", &url]);
    assert_eq!(
        stderr(&out),
        format!(
            "nixless: error: Prometheus at {url}: malformed answer: arrays and objects nested deeper than 32 levels\n"
        )
    );
    server.join().unwrap();
}

fn moto_available() -> bool {
    Command::new("python3")
        .args(["-c", "import moto.server, boto3"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// An object of moto's bucket, read with boto3 (the standard client, not
/// ours), signed with `key`.
fn s3_get(endpoint: &str, key: (&str, &str), bucket: &str, object: &str) -> Vec<u8> {
    let script = "import boto3,sys\nfrom botocore.config import Config\n\
        s3=boto3.client('s3',endpoint_url=sys.argv[1],region_name='us-east-1',aws_access_key_id=sys.argv[2],\
        aws_secret_access_key=sys.argv[3],config=Config(s3={'addressing_style':'path'},signature_version='s3v4'))\n\
        sys.stdout.buffer.write(s3.get_object(Bucket=sys.argv[4],Key=sys.argv[5])['Body'].read())\n";
    let out = Command::new("python3").args(["-c", script, endpoint, key.0, key.1, bucket, object]).output().unwrap();
    assert!(out.status.success(), "s3 get {object}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// The channel document read from S3 and the halt published back over it
/// with SigV4-signed PUTs (payload hash signed), against moto's S3 server
/// with authentication on; a wrong secret is one 403 line and changes
/// nothing.
#[test]
fn rollout_watch_reads_and_halts_on_s3() {
    if !moto_available() {
        eprintln!("SKIPPED: python3 with moto[server] and boto3 is not installed (tests/run.sh installs them)");
        return;
    }
    let Some(s) = stack() else { return };
    let c = channel_doc();
    push_all(&s, &fleet(&c, 2), c.now);
    let port = free_port();
    let mlog = tempfile::NamedTempFile::new().unwrap();
    let _moto = Server(
        Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .env_remove("INITIAL_NO_AUTH_ACTION_COUNT")
            .stdout(mlog.reopen().unwrap())
            .stderr(mlog.reopen().unwrap())
            .spawn()
            .unwrap(),
        tempfile::tempdir().unwrap(),
    );
    wait_until("moto's S3 server", Duration::from_secs(60), || std::net::TcpStream::connect(("127.0.0.1", port)).ok());
    let endpoint = format!("http://127.0.0.1:{port}");
    // The bucket and a user whose key signs everything from here on; the
    // channel document and its signature uploaded by boto3.
    let up = tempfile::tempdir().unwrap();
    fs::create_dir(up.path().join("channels")).unwrap();
    fs::copy(&c.doc, up.path().join("channels/stable.json")).unwrap();
    fs::copy(format!("{}.sig", c.doc.display()), up.path().join("channels/stable.json.sig")).unwrap();
    let out = Command::new("python3")
        .arg(repo().join("tests/support/s3_publish.py"))
        .args([endpoint.as_str(), "fleet"])
        .arg(up.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "s3_publish.py: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let (key_id, secret) = stdout.trim().split_once(' ').unwrap();
    let url = format!("s3://fleet/channels/stable.json?endpoint={endpoint}&region=us-east-1");
    s.wait_for("count(nixless_last_result_info{job=\"nixless\",outcome=\"rolled-back\"})", "2");
    let watch_s3 = |secret: &str| {
        Command::new(bin())
            .args(["rollout", "watch", "--prometheus", &s.prometheus, "--channel-doc", &url])
            .args(["--key", c.key.to_str().unwrap(), "--publish", &url, "--once"])
            .env("AWS_ACCESS_KEY_ID", key_id)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .env_remove("AWS_SHARED_CREDENTIALS_FILE")
            .env("HOME", up.path())
            .output()
            .unwrap()
    };
    let wrong = "WrongSecretKey0123456789abcdefghijklmnopq";
    let out = watch_s3(wrong);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(e.lines().count() == 1 && e.contains("403 Forbidden (SignatureDoesNotMatch)") && !e.contains(wrong), "{e}");
    let out = watch_s3(secret);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let body = s3_get(&endpoint, (key_id, secret), "fleet", "channels/stable.json");
    let sig = s3_get(&endpoint, (key_id, secret), "fleet", "channels/stable.json.sig");
    let v = channel::verify(&body, Some(&sig), &TrustedKeys::new(vec![c.sk.public()]), "stable").unwrap();
    assert_eq!((v.doc.seq, v.doc.groups[0].halt), (6, true));
    // Read back by the watcher itself: halted already.
    let out = watch_s3(secret);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("seq 6 is halted already"), "{}", stderr(&out));
}

/// An S3 PUT signs the SHA-256 of its body (S3 refuses a body whose hash
/// is not the signed `x-amz-content-sha256`: XAmzContentSHA256Mismatch;
/// moto does not check it, so the request itself is checked here).
#[test]
fn s3_puts_sign_their_body_hash() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        while !req.ends_with(b"{\"halt\":true}") {
            let n = c.read(&mut buf).unwrap();
            assert!(n > 0, "request ended early: {}", String::from_utf8_lossy(&req));
            req.extend_from_slice(&buf[..n]);
        }
        c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
        String::from_utf8(req).unwrap()
    });
    let env = |k: &str| match k {
        "AWS_ACCESS_KEY_ID" => Some("AKID".to_owned()),
        "AWS_SECRET_ACCESS_KEY" => Some("SECRET".to_owned()),
        _ => None,
    };
    let creds = nixless::auth::Credentials::load(&nixless::auth::Sources::default(), &env).unwrap();
    let opts = nixless::fetch::Options { credentials: std::sync::Arc::new(creds), ..Default::default() };
    let mut f = nixless::fetch::Fetcher::new(opts);
    let url = format!("s3://b/stable.json?endpoint=http://127.0.0.1:{port}");
    let (status, _) = f.put_url(&url, "application/json", b"{\"halt\":true}").unwrap();
    assert_eq!(status, 200);
    let req = server.join().unwrap().to_ascii_lowercase();
    let want = nixless::auth::sigv4::sha256_hex(b"{\"halt\":true}");
    assert!(req.starts_with("put /b/stable.json http/1.1\r\n"), "{req}");
    assert!(req.contains(&format!("\r\nx-amz-content-sha256: {want}\r\n")), "{req}");
    assert!(req.contains("signedheaders=host;x-amz-content-sha256;x-amz-date,"), "{req}");
}

/// `--publish http(s)://…`: two PUTs, the signature first, each body whole.
#[test]
fn http_publish_puts_the_signature_then_the_document() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let mut seen = vec![];
        for _ in 0..2 {
            let (mut c, _) = listener.accept().unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            // The head, then Content-Length bytes of body.
            let body_len = |req: &[u8]| {
                let text = String::from_utf8_lossy(req).to_ascii_lowercase();
                let (head, _) = text.split_once("\r\n\r\n")?;
                let len =
                    head.lines().find_map(|l| l.strip_prefix("content-length: "))?.trim().parse::<usize>().ok()?;
                Some(head.len() + 4 + len)
            };
            while body_len(&req).is_none_or(|n| req.len() < n) {
                let n = c.read(&mut buf).unwrap();
                assert!(n > 0);
                req.extend_from_slice(&buf[..n]);
            }
            c.write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
            let text = String::from_utf8(req).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            seen.push((head.lines().next().unwrap().to_owned(), body.to_owned()));
        }
        seen
    });
    let mut f = nixless::fleet::fetcher(Duration::from_secs(10)).unwrap();
    let dest = format!("http://127.0.0.1:{port}/ch/stable.json");
    nixless::fleet::publish::publish(&mut f, &dest, b"{\"seq\":6}", "admin-1:c2ln").unwrap();
    let seen = server.join().unwrap();
    assert_eq!(seen[0], ("PUT /ch/stable.json.sig HTTP/1.1".to_owned(), "admin-1:c2ln\n".to_owned()));
    assert_eq!(seen[1], ("PUT /ch/stable.json HTTP/1.1".to_owned(), "{\"seq\":6}".to_owned()));
}
