//! A fleet on one machine (issue 13 item 5): N real agents (each its own
//! root, state dir, port and host name) follow one file:// channel, fetch
//! small Nix-built closures from one nginx cache, and push their metrics
//! to a real Pushgateway that a real Prometheus scrapes every second
//! (`honor_labels: true`, as the README sets it up). The test publishes a
//! good release in three waves (5 % → 30 % → 100 %), then a bad one whose
//! health check fails: `nixless rollout watch` halts it during wave 1.
//!
//! N is `NIXLESS_FLEET_AGENTS` (default 20: the default tier; the slower
//! tier runs 200; 0 skips). The test plays the switch and health helpers
//! for every agent in one thread sweeping all state dirs (as tests/channel.rs
//! plays them for one), failing the health check of the bad release only.
//! nginx serves the cache under `/h/HOST/`, one prefix per agent, so its
//! access log says which host fetched what.
//!
//! Every wait is for a condition (agent statuses, Prometheus answers, the
//! watcher's exit), bounded by its own limit and by the test's hard
//! deadline (`NIXLESS_FLEET_DEADLINE_SECS`, default 600). Every child is
//! killed on drop (also on panic), and by the kernel if this process dies
//! (`PR_SET_PDEATHSIG`). Measurements (RSS of the agents, load on the
//! cache, wall time) are printed, never asserted.

mod common;

use common::*;
use nixless::api::Status;
use nixless::channel::wave;
use nixless::switch::protocol;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHANNEL: &str = "stable";
/// The plan of both releases, in basis points (5 % → 30 % → 100 %).
const PLAN: [u16; 3] = [500, 3_000, 10_000];
/// Soak between the good release's waves: long enough that each wave is
/// seen waiting first, short enough for the test.
const GOOD_SOAK: u64 = 8;
/// Soak before the bad release's wave 2: the watcher must halt within it.
/// Wave 1 takes the health timeout (5 s) plus a push, a scrape and a
/// watcher round; 45 s leaves room for 200 agents on two busy cores.
const BAD_SOAK: u64 = 45;

/// A command whose child the kernel kills if this test process dies
/// (SIGKILL from a CI timeout skips every Drop).
fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    // SAFETY: prctl is async-signal-safe; nothing else runs in the child.
    unsafe {
        c.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}

/// The test's hard deadline: every wait ends by it, naming what it waited for.
struct Deadline {
    start: Instant,
    end: Instant,
}

impl Deadline {
    fn new() -> Deadline {
        let secs = std::env::var("NIXLESS_FLEET_DEADLINE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(600);
        let start = Instant::now();
        Deadline { start, end: start + Duration::from_secs(secs) }
    }

    /// Polls `f` every 200 ms until it gives a value, for at most `bound`
    /// and never past the test's deadline.
    fn wait<T>(&self, what: &str, bound: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let until = (Instant::now() + bound).min(self.end);
        loop {
            if let Some(v) = f() {
                return v;
            }
            if Instant::now() >= until {
                let why = if until == self.end { "the fleet test's hard deadline passed" } else { "timed out" };
                panic!("{why} after {:.0} s waiting for {what}", self.start.elapsed().as_secs_f64());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn secs(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
}

/// A child process killed and reaped on drop.
struct Server {
    child: Child,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nginx in the foreground (one process, killable by pid) serving `cache`
/// under `/h/HOST/…`, logging `URI STATUS BYTES` per request.
struct Cache {
    _server: Server,
    dir: tempfile::TempDir,
    port: u16,
}

impl Cache {
    fn start(cache: &Path, d: &Deadline) -> Cache {
        let dir = tempfile::Builder::new().prefix("nixless-fleet-nginx-").tempdir().unwrap();
        let w = dir.path().display();
        let port = free_port();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_rlimit_nofile 8192;\npid {w}/nginx.pid;\nerror_log {w}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  types {{ text/x-nix-narinfo narinfo; }}\n  default_type application/octet-stream;\n\
               log_format fleet '$request_uri $status $body_bytes_sent';\n  access_log {w}/access.log fleet;\n\
               client_body_temp_path {w}/body;\n  proxy_temp_path {w}/proxy;\n  fastcgi_temp_path {w}/fastcgi;\n\
               uwsgi_temp_path {w}/uwsgi;\n  scgi_temp_path {w}/scgi;\n\
               sendfile on;\n  keepalive_timeout 65s;\n  keepalive_requests 100000;\n\
               server {{\n    listen 127.0.0.1:{port};\n    root {};\n\
                 location ~ ^/h/[A-Za-z0-9.-]+(/.*)$ {{ try_files $1 =404; }}\n    location / {{ return 404; }}\n  }}\n}}\n",
            cache.display()
        );
        fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let child = command("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (apt-get install nginx-light)");
        let mut server = Server { child, _dir: None };
        d.wait("nginx to listen", Duration::from_secs(30), || {
            if let Ok(Some(st)) = server.child.try_wait() {
                let log = fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
                panic!("nginx exited: {st}\n{log}");
            }
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Cache { _server: server, dir, port }
    }

    fn url(&self, host: &str) -> String {
        format!("http://127.0.0.1:{}/h/{host}", self.port)
    }

    /// (host, path under the cache, status, bytes) per logged request.
    fn log(&self) -> Vec<(String, String, u16, u64)> {
        let text = fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut f = l.split(' ');
                let uri = f.next()?.strip_prefix("/h/")?;
                let (host, path) = uri.split_once('/')?;
                Some((host.to_owned(), path.to_owned(), f.next()?.parse().ok()?, f.next()?.parse().ok()?))
            })
            .collect()
    }
}

/// The shared Pushgateway + Prometheus (its processes die with this one).
struct Stack(common::prom::Stack);

impl std::ops::Deref for Stack {
    type Target = common::prom::Stack;
    fn deref(&self) -> &common::prom::Stack {
        &self.0
    }
}

fn stack() -> Option<Stack> {
    common::prom::Stack::start(|p| command(p)).map(Stack)
}

impl Stack {
    /// Waits until Prometheus answers `q` with `want`. On a timeout the
    /// message has the last answer and how the scrapes went (a scrape
    /// slower than its interval is the usual cause with many hosts).
    fn wait_for_count(&self, d: &Deadline, q: &str, want: usize, fleet: &Fleet) {
        let want = want.to_string();
        let mut last = None;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            d.wait(&format!("prometheus: {q} == {want}"), Duration::from_secs(120), || {
                last = self.value(q);
                (last.as_deref() == Some(want.as_str())).then_some(())
            })
        }));
        if let Err(e) = r {
            eprintln!(
                "last answer: {last:?}; up: {:?}; scrape_duration_seconds: {:?}; scrape_samples_scraped: {:?}\n{}",
                self.value("up"),
                self.value("scrape_duration_seconds"),
                self.value("scrape_samples_scraped"),
                fleet.push_report()
            );
            std::panic::resume_unwind(e);
        }
    }
}

/// The admin's side: a key, and a directory the agents read through file://.
struct Publisher {
    dir: tempfile::TempDir,
    key: PathBuf,
    public: String,
}

impl Publisher {
    fn new() -> Publisher {
        let dir = tempfile::Builder::new().prefix("nixless-fleet-channel-").tempdir().unwrap();
        let key = dir.path().join("admin.key");
        let out = nixless(&["keygen", "admin-1", "--out", key.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        let sk = nixless::nix::SecretKey::parse(fs::read_to_string(&key).unwrap().trim()).unwrap();
        Publisher { dir, key, public: sk.public().to_string() }
    }

    fn doc(&self) -> PathBuf {
        self.dir.path().join("stable.json")
    }

    /// What the agents poll, and where the watcher reads and publishes.
    fn url(&self) -> String {
        format!("file://{}", self.doc().display())
    }

    /// Signs with `nixless sign` and publishes by rename, signature first.
    fn publish(&self, body: &str) {
        let staging = self.dir.path().join("staging");
        fs::create_dir_all(&staging).unwrap();
        let doc = staging.join("stable.json");
        fs::write(&doc, body).unwrap();
        let out = nixless(&["sign", "--key", self.key.to_str().unwrap(), doc.to_str().unwrap()]);
        assert!(out.status.success(), "nixless sign: {}\n{body}", stderr(&out));
        fs::rename(staging.join("stable.json.sig"), self.dir.path().join("stable.json.sig")).unwrap();
        fs::rename(&doc, self.doc()).unwrap();
    }
}

/// The channel document: group `kiosk` runs `system` in the three waves of
/// [`PLAN`], each `soak` seconds after the one before.
fn channel_doc(seq: u64, issued: u64, system: &str, soak: u64) -> String {
    format!(
        r#"{{"channel":"{CHANNEL}","seq":{seq},"issued":{issued},"expires":{},"groups":{{"kiosk":{{"system":"{system}","action":"switch","waves":[{{"percent":{}}},{{"percent":{},"soak_secs":{soak}}},{{"percent":{},"soak_secs":{soak}}}]}}}}}}"#,
        issued + 7 * 86_400,
        PLAN[0] / 100,
        PLAN[1] / 100,
        PLAN[2] / 100
    )
}

/// N host names and their 1-based waves, from the agent's own position
/// function: at least 2 in wave 1, a quarter in wave 2, the rest in wave 3
/// (the first names that fall in each, so the set is fixed).
fn hosts(n: usize) -> Vec<(String, usize)> {
    let want = [(n * 5 / 100).max(2), n / 4, 0];
    let want = [want[0], want[1], n - want[0] - want[1]];
    let mut have = [0usize; 3];
    let mut out = vec![];
    for i in 0.. {
        if out.len() == n {
            break;
        }
        let name = format!("kiosk-{i:05}");
        let p = wave::position(CHANNEL, &name);
        let w = PLAN.iter().position(|&bp| wave::covers(bp, p)).unwrap();
        if have[w] < want[w] {
            have[w] += 1;
            out.push((name, w + 1));
        }
    }
    out
}

struct Agent {
    child: Child,
    tmp: tempfile::TempDir,
    host: String,
    wave: usize,
    port: u16,
}

impl Agent {
    fn root(&self) -> PathBuf {
        self.tmp.path().join("root")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.tmp.path().join("agent.log")).unwrap_or_default()
    }

    /// (VmRSS, Pss, Pss_Anon) in KiB: RSS counts the binary's shared
    /// pages once per agent; Pss splits them, so its sum is what the fleet
    /// costs the machine.
    fn memory_kib(&self) -> Option<(u64, u64, u64)> {
        let pid = self.child.id();
        let field = |text: &str, key: &str| -> Option<u64> {
            let v = text.lines().find_map(|l| l.strip_prefix(key))?;
            v.trim().trim_end_matches("kB").trim().parse().ok()
        };
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
        Some((field(&status, "VmRSS:")?, field(&rollup, "Pss:")?, field(&rollup, "Pss_Anon:")?))
    }

    /// Starts the agent in `dir` listening on `port`, its log appended to.
    fn spawn(dir: &Path, port: u16) -> Child {
        let config = fs::read_to_string(dir.join("config.template")).unwrap().replace("PORT", &port.to_string());
        fs::write(dir.join("config.json"), config).unwrap();
        agent_command(command(agent_bin()), dir).spawn().unwrap()
    }

    /// Not exited (an exited child stays a zombie until reaped on drop:
    /// state Z in /proc/PID/stat, after the parenthesised name).
    fn alive(&self) -> bool {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    }

    fn store_has(&self, path: &str) -> bool {
        self.root().join(path.trim_start_matches('/')).symlink_metadata().is_ok()
    }
}

/// A free loopback port no other agent of this fleet was given (the
/// kernel may hand a released port out again at once).
fn unique_port(taken: &mut std::collections::HashSet<u16>) -> u16 {
    loop {
        let p = free_port();
        if taken.insert(p) {
            return p;
        }
    }
}

/// The agents' binary: the test build, or `NIXLESS_FLEET_AGENT_BIN` (to
/// measure the memory of a release build, which the test build's debug
/// info and missing optimisation inflate).
fn agent_bin() -> String {
    std::env::var("NIXLESS_FLEET_AGENT_BIN").unwrap_or_else(|_| bin().to_owned())
}

/// The agents, killed and reaped on drop (also on panic).
struct Fleet {
    agents: Vec<Agent>,
    http: ureq::Agent,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for a in &mut self.agents {
            let _ = a.child.kill();
        }
        for a in &mut self.agents {
            let _ = a.child.wait();
            let _ = Command::new("chmod").args(["-R", "u+w"]).arg(a.tmp.path()).status();
        }
    }
}

impl Fleet {
    #[allow(clippy::too_many_arguments)]
    fn start(d: &Deadline, n: usize, before: &str, cache: &Cache, p: &Publisher, gateway: &str, poll: u64) -> Fleet {
        let f = fixtures();
        let mut agents = vec![];
        let mut ports = std::collections::HashSet::new();
        for (host, wave) in hosts(n) {
            let tmp = tempfile::Builder::new().prefix("nixless-fleet-agent-").tempdir().unwrap();
            let root = tmp.path().join("root");
            fs::create_dir_all(root.join("run")).unwrap();
            std::os::unix::fs::symlink(before, root.join("run/current-system")).unwrap();
            let config = format!(
                r#"{{"host":"{host}","listen":["127.0.0.1:PORT"],"caches":["{}"],"cache_keys":["{}"],"deploy_keys":["{}"],"root":"{}","health_check_network":false,"poll_interval_secs":{poll},"channel_url":"{}","channel":"{CHANNEL}","tags":["kiosk"],"health_units":["app.service"],"health_timeout_secs":5,"pushgateway_url":"{gateway}","push_interval_secs":10}}"#,
                cache.url(&host),
                f.get("PK_A"),
                p.public,
                root.display(),
                p.url(),
            );
            fs::write(tmp.path().join("config.template"), config).unwrap();
            let port = unique_port(&mut ports);
            let child = Agent::spawn(tmp.path(), port);
            agents.push(Agent { child, tmp, host, wave, port });
        }
        let mut fleet = Fleet { agents, http: http() };
        let mut serving = vec![false; n];
        let mut restarts = 0;
        d.wait(&format!("{n} agents to serve their status"), Duration::from_secs(120), || {
            for (i, up) in serving.iter_mut().enumerate() {
                if *up {
                    continue;
                }
                let a = &mut fleet.agents[i];
                // A port picked free may be taken before the agent binds
                // it (by any process's outgoing connection): another one.
                if !a.alive() {
                    let log = a.log();
                    assert!(log.contains("Address in use") && restarts < 20, "agent {} died\n{log}", a.host);
                    restarts += 1;
                    let _ = a.child.wait();
                    a.port = unique_port(&mut ports);
                    a.child = Agent::spawn(a.tmp.path(), a.port);
                    continue;
                }
                *up = fleet.status(i).is_some_and(|s| s.host == fleet.agents[i].host);
            }
            serving.iter().all(|s| *s).then_some(())
        });
        if restarts > 0 {
            eprintln!("fleet: {restarts} agent(s) started again on another port (theirs was taken)");
        }
        fleet
    }

    fn status(&self, i: usize) -> Option<Status> {
        let url = format!("http://127.0.0.1:{}/v1/status", self.agents[i].port);
        let mut r = self.http.get(&url).call().ok()?;
        let body = r.body_mut().read_to_string().ok()?;
        nixless::json::from_slice_bounded::<Status>(body.as_bytes()).ok()
    }

    /// Waits until every agent's status passes `pred`; on timeout names
    /// the first agent that does not, with its status and log.
    fn wait_all(
        &self,
        d: &Deadline,
        what: &str,
        bound: Duration,
        pred: impl Fn(&Agent, &Status) -> bool,
    ) -> Vec<Status> {
        let n = self.agents.len();
        let mut done: Vec<Option<Status>> = vec![None; n];
        let msg = format!("every agent: {what}");
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            d.wait(&msg, bound, || {
                for (i, slot) in done.iter_mut().enumerate() {
                    if slot.is_some() {
                        continue;
                    }
                    let a = &self.agents[i];
                    // A dead agent fails at once, with its log.
                    if !a.alive() {
                        panic!("agent {} died\n--- log ---\n{}", a.host, a.log());
                    }
                    *slot = self.status(i).filter(|s| pred(a, s));
                }
                if done.iter().all(Option::is_some) {
                    return Some(());
                }
                None
            })
        }));
        if let Err(e) = result {
            let pending: Vec<&Agent> =
                self.agents.iter().zip(&done).filter(|(_, s)| s.is_none()).map(|(a, _)| a).collect();
            let first = pending.first().map(|a| (a.host.clone(), a.log())).unwrap_or_default();
            let last = pending.first().and_then(|a| {
                let i = self.agents.iter().position(|b| b.host == a.host)?;
                self.status(i)
            });
            eprintln!(
                "{} of {n} agents not there; first: {} last status {last:?}\n--- its log ---\n{}",
                pending.len(),
                first.0,
                first.1
            );
            std::panic::resume_unwind(e);
        }
        done.into_iter().map(Option::unwrap).collect()
    }

    /// How the agents' pushes went, by their statuses (for a failure message).
    fn push_report(&self) -> String {
        let now = now();
        let mut errors = BTreeMap::<String, usize>::new();
        let (mut failing, mut ages) = (0, vec![]);
        for i in 0..self.agents.len() {
            let Some(p) = self.status(i).and_then(|s| s.push) else { continue };
            if let Some(e) = p.error {
                failing += 1;
                *errors.entry(e).or_default() += 1;
            }
            ages.push(p.last_ok.map_or(u64::MAX, |t| now.saturating_sub(t)));
        }
        ages.sort_unstable();
        let errors: Vec<String> = errors.into_iter().take(5).map(|(e, k)| format!("{k}× {e}")).collect();
        format!(
            "pushes: {failing} agents failing; seconds since the last good push: min {:?}, median {:?}, max {:?}; errors: {errors:?}",
            ages.first(),
            ages.get(ages.len() / 2),
            ages.last()
        )
    }

    fn memory(&self) -> Memory {
        let m: Vec<(u64, u64, u64)> = self.agents.iter().filter_map(Agent::memory_kib).collect();
        Memory {
            agents: m.len(),
            rss_sum: m.iter().map(|m| m.0).sum(),
            rss_max: m.iter().map(|m| m.0).max().unwrap_or(0),
            pss_sum: m.iter().map(|m| m.1).sum(),
            anon_sum: m.iter().map(|m| m.2).sum(),
        }
    }
}

/// The agents' memory, KiB.
struct Memory {
    agents: usize,
    rss_sum: u64,
    rss_max: u64,
    pss_sum: u64,
    anon_sum: u64,
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let mib = |k: u64| k as f64 / 1024.0;
        write!(
            f,
            "{} agents: RSS sum {:.1} MiB, max {:.1} MiB; PSS sum {:.1} MiB (anonymous {:.1} MiB, {:.2} MiB per agent)",
            self.agents,
            mib(self.rss_sum),
            mib(self.rss_max),
            mib(self.pss_sum),
            mib(self.anon_sum),
            mib(self.anon_sum) / self.agents.max(1) as f64
        )
    }
}

/// What the helper player saw, per host.
#[derive(Default, Clone)]
struct Played {
    switch_requests: usize,
    health_requests: usize,
}

/// Plays the switch and health helpers for every agent, one sweep over all
/// state dirs every 100 ms: a switch step succeeds and (for `test` and
/// `rollback-test`) moves the root's /run/current-system as the real
/// helper's `switch-to-configuration test` does; a health check fails
/// while the host runs `bad`.
struct Player {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Played>>>,
    seen: Arc<std::sync::Mutex<Vec<Played>>>,
}

impl Player {
    fn start(fleet: &Fleet, bad: &str) -> Player {
        let stop = Arc::new(AtomicBool::new(false));
        let roots: Vec<PathBuf> = fleet.agents.iter().map(Agent::root).collect();
        let seen = Arc::new(std::sync::Mutex::new(vec![Played::default(); roots.len()]));
        let (stop2, seen2, bad) = (stop.clone(), seen.clone(), bad.to_owned());
        let thread = std::thread::spawn(move || {
            let n = roots.len();
            let mut answered = vec![0u64; n];
            let mut health = vec![0u64; n];
            let mut running: Vec<Option<String>> = vec![None; n];
            while !stop2.load(Ordering::Relaxed) {
                for (i, root) in roots.iter().enumerate() {
                    let state = root.join("var/lib/nixless");
                    if let Some(r) = protocol::read_request(&state).filter(|r| r.id > answered[i]) {
                        if matches!(r.step, protocol::Step::Test | protocol::Step::RollbackTest) {
                            let tmp = root.join("run/.current-system.tmp");
                            let _ = fs::remove_file(&tmp);
                            std::os::unix::fs::symlink(&r.system, &tmp).unwrap();
                            fs::rename(&tmp, root.join("run/current-system")).unwrap();
                            running[i] = Some(r.system.clone());
                        }
                        let o = protocol::Outcome { id: r.id, code: Some(0), tail: String::new() };
                        protocol::write_result(&state, &o).unwrap();
                        answered[i] = r.id;
                        seen2.lock().unwrap()[i].switch_requests += 1;
                    }
                    if let Some(id) = protocol::read_health_request(&state).filter(|id| *id > health[i]) {
                        let failing = running[i].as_deref() == Some(bad.as_str());
                        let o = if failing {
                            protocol::Outcome { id, code: Some(3), tail: "app.service: failed".into() }
                        } else {
                            protocol::Outcome { id, code: Some(0), tail: String::new() }
                        };
                        protocol::write_health_result(&state, &o).unwrap();
                        health[i] = id;
                        seen2.lock().unwrap()[i].health_requests += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            seen2.lock().unwrap().clone()
        });
        Player { stop, thread: Some(thread), seen }
    }

    fn seen(&self) -> Vec<Played> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Player {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `nixless fleet status --json`, as the test reads it.
#[derive(serde::Deserialize, Debug)]
#[allow(dead_code)]
struct Summary {
    time: u64,
    hosts: usize,
    silent_after: u64,
    systems: Vec<Count>,
    phases: Vec<Count>,
    outcomes: Vec<Count>,
    channels: Vec<ChannelCount>,
    silent: Vec<Silent>,
}

#[derive(serde::Deserialize, Debug, PartialEq)]
struct Count {
    key: String,
    hosts: usize,
}

#[derive(serde::Deserialize, Debug)]
#[allow(dead_code)]
struct ChannelCount {
    channel: String,
    seq: u64,
    group: String,
    wave: u32,
    decision: String,
    hosts: usize,
}

#[derive(serde::Deserialize, Debug)]
#[allow(dead_code)]
struct Silent {
    host: String,
    secs: Option<u64>,
}

fn fleet_status(s: &Stack) -> (Summary, String) {
    let out = nixless(&["fleet", "status", "--prometheus", &s.prometheus, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let sum = nixless::json::from_slice_bounded::<Summary>(text.trim().as_bytes())
        .unwrap_or_else(|e| panic!("fleet status --json: {e}: {text}"));
    (sum, text)
}

fn count(c: &[Count], key: &str) -> usize {
    c.iter().filter(|c| c.key == key).map(|c| c.hosts).sum()
}

/// Requests and bytes from the cache's log, from entry `from` on.
fn load(log: &[(String, String, u16, u64)], from: usize) -> (usize, u64) {
    let l = &log[from.min(log.len())..];
    (l.len(), l.iter().map(|e| e.3).sum())
}

fn nar_paths(cache: &Path, closure: &[String]) -> Vec<String> {
    let mut out = vec![];
    for p in closure {
        out.push(format!("{}.narinfo", hash_part(p)));
        out.push(narinfo_field(cache, p, "URL"));
    }
    out
}

#[test]
fn a_fleet_rolls_out_in_waves_and_a_bad_release_is_halted_in_wave_one() {
    let n: usize = match std::env::var("NIXLESS_FLEET_AGENTS") {
        Ok(v) => v.parse().expect("NIXLESS_FLEET_AGENTS: a number of agents"),
        Err(_) => 20,
    };
    if n == 0 {
        eprintln!("SKIP: NIXLESS_FLEET_AGENTS=0");
        return;
    }
    assert!((10..=2000).contains(&n), "NIXLESS_FLEET_AGENTS={n}: expected 10 to 2000");
    let d = Deadline::new();
    let f = fixtures();
    let Some(s) = stack() else { return };
    let cache_dir = f.path("CACHE_ZSTD");
    let before = f.get("P_FILE");
    let good = f.get("P_CHAIN_A");
    let bad = f.get("P_DIAMOND_TOP");
    let good_closure = closure_of(good);
    let bad_closure = closure_of(bad);
    assert!(good_closure.iter().all(|p| !bad_closure.contains(p)), "the two releases share no path");
    let cache = Cache::start(&cache_dir, &d);
    let p = Publisher::new();
    // The running system, for everyone: a baseline every agent reports.
    p.publish(&channel_doc(1, now(), before, 1));
    let poll = if n > 50 { 2 } else { 1 };
    let fleet = Fleet::start(&d, n, before, &cache, &p, &s.gateway, poll);
    let player = Player::start(&fleet, bad);
    let started = d.secs();
    let waves: BTreeMap<usize, usize> = fleet.agents.iter().fold(BTreeMap::new(), |mut m, a| {
        *m.entry(a.wave).or_default() += 1;
        m
    });
    let w1 = waves[&1];
    eprintln!("fleet: {n} agents up in {started:.1} s, waves {waves:?}, polling every {poll} s");
    fleet.wait_all(&d, "seq 1, already running", Duration::from_secs(120), |_, s| {
        s.channel.as_ref().is_some_and(|c| c.seq == Some(1) && c.decision.as_deref() == Some("already-running"))
    });
    let mem_idle = fleet.memory();

    // 1. The good release, in three waves.
    let t_good = d.secs();
    let log_good = cache.log().len();
    let issued = now();
    p.publish(&channel_doc(2, issued, good, GOOD_SOAK));
    // Later waves are seen waiting for their start first (the soak holds).
    let first = fleet.wait_all(&d, "seq 2 read", Duration::from_secs(60), |_, s| {
        s.channel.as_ref().is_some_and(|c| c.seq == Some(2))
    });
    for (a, s) in fleet.agents.iter().zip(&first) {
        let c = s.channel.as_ref().unwrap();
        assert_eq!(c.wave, Some(a.wave as u64), "{}: the test and the agent agree on its wave", a.host);
    }
    let done = fleet.wait_all(&d, "the good release committed", Duration::from_secs(180), |_, s| {
        s.phase == "idle"
            && s.last_result.as_ref().is_some_and(|r| r.seq == 2 && r.outcome == "committed" && r.system == good)
            && s.channel.as_ref().is_some_and(|c| c.decision.as_deref() == Some("already-running"))
    });
    let good_secs = d.secs() - t_good;
    eprintln!("fleet: the good release committed on {n} hosts in {good_secs:.1} s");
    for (a, s) in fleet.agents.iter().zip(&done) {
        assert_eq!(s.current_system.as_deref(), Some(good), "{}", a.host);
        let r = s.last_result.as_ref().unwrap();
        // A wave's hosts finish after their wave opens: the soak held them.
        let opens = issued + GOOD_SOAK * (a.wave as u64 - 1);
        assert!(
            r.finished >= opens,
            "{} (wave {}) finished at {} before its wave opened at {opens}",
            a.host,
            a.wave,
            r.finished
        );
    }
    let mem_busy = fleet.memory();
    let good_load = load(&cache.log(), log_good);
    // Prometheus has them all; fleet status agrees.
    s.wait_for_count(
        &d,
        &format!("count(nixless_last_result_info{{job=\"nixless\",outcome=\"committed\",system=\"{good}\"}})"),
        n,
        &fleet,
    );
    s.wait_for_count(
        &d,
        "count(nixless_channel_info{job=\"nixless\",seq=\"2\",decision=\"already-running\"})",
        n,
        &fleet,
    );
    let (sum, text) = fleet_status(&s);
    assert_eq!(sum.hosts, n, "{text}");
    assert_eq!(sum.systems, vec![Count { key: good.into(), hosts: n }], "{text}");
    assert_eq!(count(&sum.outcomes, "committed"), n, "{text}");
    for (w, k) in &waves {
        let c = sum.channels.iter().find(|c| c.seq == 2 && c.wave as usize == *w && c.decision == "already-running");
        assert_eq!(c.map(|c| c.hosts), Some(*k), "wave {w}: {text}");
    }
    let out = nixless(&[
        "rollout",
        "watch",
        "--prometheus",
        &s.prometheus,
        "--channel-doc",
        &p.url(),
        "--key",
        p.key.to_str().unwrap(),
        "--publish",
        &p.url(),
        "--once",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("rollout complete"), "{}", stderr(&out));
    let played_good = player.seen();

    // 2. The bad release: its health check fails; the watcher halts it.
    let t_bad = d.secs();
    let log_bad = cache.log().len();
    let issued = now();
    let wave2_opens = issued + BAD_SOAK;
    p.publish(&channel_doc(3, issued, bad, BAD_SOAK));
    let watch_log = p.dir.path().join("watch.log");
    let mut watch = Server {
        child: command(bin())
            .args(["rollout", "watch", "--prometheus", &s.prometheus, "--channel-doc", &p.url()])
            .arg("--key")
            .arg(&p.key)
            .args(["--publish", &p.url()])
            .args(["--max-failure-rate", "0.5", "--min-hosts", &w1.to_string()])
            .args(["--interval", "1", "--deadline", &BAD_SOAK.to_string()])
            // This test is about the failure rate: wave 1's news is due only
            // 5 s before wave 2 opens (by default half the soak, which a
            // loaded machine's slow wave 1 could reach first).
            .args(["--lead", "5"])
            .stdout(Stdio::null())
            .stderr(fs::File::create(&watch_log).unwrap())
            .spawn()
            .unwrap(),
        _dir: None,
    };
    let code = d.wait("rollout watch to end", Duration::from_secs(BAD_SOAK + 30), || watch.child.try_wait().unwrap());
    let wlog = fs::read_to_string(&watch_log).unwrap();
    assert_eq!(code.code(), Some(3), "rollout watch:\n{wlog}");
    assert!(wlog.contains("HALTED group(s) kiosk of channel stable (seq 4)"), "{wlog}");
    assert!(
        wlog.contains(&format!("wave 1 of group kiosk: {w1} of {w1} finished hosts failed, more than 0.5")),
        "{wlog}"
    );
    let halted_at = d.secs() - t_bad;
    eprintln!("fleet: rollout watch halted the bad release {halted_at:.1} s after it was published");
    // Every host holds the halt, and has checked it after wave 2 would
    // have opened: wave 2 never started.
    let after =
        fleet.wait_all(&d, "seq 4 halted, checked after wave 2's start", Duration::from_secs(BAD_SOAK + 60), |_, s| {
            s.phase == "idle"
                && s.channel.as_ref().is_some_and(|c| {
                    c.seq == Some(4)
                        && c.decision.as_deref() == Some("halted")
                        && c.last_check.is_some_and(|t| t > wave2_opens)
                })
        });
    let bad_secs = d.secs() - t_bad;
    let played = player.seen();
    let log = cache.log();
    let bad_files = nar_paths(&cache_dir, &bad_closure);
    for ((a, s), (pg, pb)) in fleet.agents.iter().zip(&after).zip(played_good.iter().zip(&played)) {
        let r = s.last_result.as_ref().unwrap();
        let fetched: Vec<&String> =
            log.iter().filter(|e| e.0 == a.host && bad_files.contains(&e.1)).map(|e| &e.1).collect();
        if a.wave == 1 {
            // Tried, failed its health check, rolled back to the good one.
            assert_eq!(
                (r.seq, r.outcome.as_str(), r.system.as_str()),
                (3, "rolled-back", bad),
                "{}: {:?}",
                a.host,
                r.reason
            );
            assert!(r.reason.as_deref().unwrap_or_default().contains("health check failed"), "{:?}", r.reason);
            assert_eq!(s.current_system.as_deref(), Some(good), "{} rolled back", a.host);
            assert_eq!(fs::read_link(a.root().join("run/current-system")).unwrap(), Path::new(good));
            assert!(a.store_has(bad), "{} fetched the bad release", a.host);
            assert!(!fetched.is_empty());
        } else {
            // Never started: same result, no helper request, nothing fetched.
            assert_eq!((r.seq, r.outcome.as_str(), r.system.as_str()), (2, "committed", good), "{}", a.host);
            assert_eq!(
                (pb.switch_requests, pb.health_requests),
                (pg.switch_requests, pg.health_requests),
                "{}",
                a.host
            );
            assert!(fetched.is_empty(), "{} (wave {}) fetched {fetched:?}", a.host, a.wave);
            assert!(bad_closure.iter().all(|q| !a.store_has(q)), "{} has part of the bad release", a.host);
        }
    }
    // Prometheus and fleet status agree.
    s.wait_for_count(&d, "count(nixless_last_result_info{job=\"nixless\",outcome=\"rolled-back\"})", w1, &fleet);
    s.wait_for_count(&d, "count(nixless_channel_info{job=\"nixless\",seq=\"4\",decision=\"halted\"})", n, &fleet);
    let (sum, text) = fleet_status(&s);
    assert_eq!(sum.hosts, n, "{text}");
    assert_eq!(sum.systems, vec![Count { key: good.into(), hosts: n }], "{text}");
    assert_eq!((count(&sum.outcomes, "committed"), count(&sum.outcomes, "rolled-back")), (n - w1, w1), "{text}");
    let halted: usize = sum.channels.iter().filter(|c| c.seq == 4 && c.decision == "halted").map(|c| c.hosts).sum();
    assert_eq!(halted, n, "{text}");
    let bad_load = load(&log, log_bad);
    drop(player);

    // The numbers (printed, never asserted).
    let total = load(&log, 0);
    let report = format!(
        "fleet of {n} agents (waves {waves:?}, poll {poll} s), wall time {:.1} s (start {started:.1} s, good release {good_secs:.1} s, \
         bad release halted after {halted_at:.1} s, settled {bad_secs:.1} s)\n\
         memory idle: {mem_idle}\nmemory after the good release: {mem_busy}\nagent binary: {}\n\
         cache: {} requests, {} bytes in all; good release {} requests, {} bytes; bad release {} requests, {} bytes\n",
        d.secs(),
        agent_bin(),
        total.0,
        total.1,
        good_load.0,
        good_load.1,
        bad_load.0,
        bad_load.1,
    );
    eprint!("{report}");
    let _ = fs::write(target_dir().join(format!("fleet-rollout-{n}.txt")), report);
}
