//! Shared harness for the integration tests: real Nix-built fixtures
//! (`tests/support/fixtures.sh`), nginx on loopback, the built binary.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub const NIX_CONFIG: &str =
    "build-users-group =\nexperimental-features = nix-command\nsandbox = false\nsubstituters =";

pub mod prom;

pub struct Fixtures {
    pub vars: BTreeMap<String, String>,
}

impl Fixtures {
    pub fn get(&self, k: &str) -> &str {
        self.vars.get(k).unwrap_or_else(|| panic!("fixture variable {k} missing"))
    }

    pub fn path(&self, k: &str) -> PathBuf {
        PathBuf::from(self.get(k))
    }

    /// Every path in the closure of the top path.
    pub fn closure(&self) -> Vec<String> {
        closure_of(self.get("TOP"))
    }
}

pub fn closure_of(p: &str) -> Vec<String> {
    let out = nix(&["nix-store", "-qR", p]);
    String::from_utf8(out).unwrap().lines().map(str::to_owned).collect()
}

/// Builds (once per machine; fixtures.sh is idempotent and locked) and
/// loads the fixtures. Panics if Nix is missing: these tests need it.
pub fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| {
        let dir = target_dir().join("fixtures");
        let st = Command::new("bash")
            .arg(repo().join("tests/support/fixtures.sh"))
            .arg(&dir)
            .status()
            .expect("run fixtures.sh");
        assert!(st.success(), "fixtures.sh failed (is nix-bin installed? run .ci/run)");
        let text = std::fs::read_to_string(dir.join("env")).unwrap();
        let vars = text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
        Fixtures { vars }
    })
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("target"))
}

/// The nixless binary to run. With `NIXLESS_TEST_RUNNER` set (tests/run.sh's
/// aarch64 step: `qemu-aarch64-static`), a script next to the binary that
/// execs it through that runner, since a foreign binary runs on this machine
/// only through binfmt_misc, which may not be registered. Cargo's
/// `CARGO_TARGET_<triple>_RUNNER` runs the test binaries, not what they spawn.
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| match std::env::var("NIXLESS_TEST_RUNNER") {
        Ok(runner) if !runner.is_empty() => via_runner(&runner, env!("CARGO_BIN_EXE_nixless")),
        _ => env!("CARGO_BIN_EXE_nixless").to_owned(),
    })
}

fn via_runner(runner: &str, exe: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let script = format!("#!/bin/sh\nexec {} {} \"$@\"\n", quote(runner), quote(exe));
    let path = format!("{exe}-via-runner");
    // Several test binaries may write it at once: same bytes, atomic rename.
    let tmp = format!("{path}.{}", std::process::id());
    std::fs::write(&tmp, script).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// Runs a Nix command, panicking on failure; returns stdout.
pub fn nix(args: &[&str]) -> Vec<u8> {
    let out = Command::new(args[0]).args(&args[1..]).env("NIX_CONFIG", NIX_CONFIG).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// `nix hash path --base32` of a file system path.
pub fn nix_hash_path(p: &Path) -> String {
    let out = nix(&["nix", "hash", "path", "--base32", p.to_str().unwrap()]);
    String::from_utf8(out).unwrap().trim().to_owned()
}

/// Runs `nixless ARGS`.
pub fn nixless(args: &[&str]) -> Output {
    Command::new(bin()).args(args).env_remove("NIXLESS_LOG").output().unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The `NarHash` (nix32 part) of a path, from a cache dir's narinfo.
pub fn narinfo_field(cache: &Path, store_path: &str, field: &str) -> String {
    let base = store_path.rsplit('/').next().unwrap();
    let text = std::fs::read_to_string(cache.join(format!("{}.narinfo", &base[..32]))).unwrap();
    let line = text.lines().find(|l| l.starts_with(&format!("{field}: "))).unwrap();
    line[field.len() + 2..].to_owned()
}

/// Checks that everything in `<root>/nix/store` is a complete path: its NAR
/// hash (by real Nix) equals the cache's NarHash, its metadata is canonical,
/// and no temp entries are left. Returns the base names present.
pub fn assert_store_sound(root: &Path, cache: &Path) -> Vec<String> {
    let store = root.join("nix/store");
    let mut present = Vec::new();
    let Ok(rd) = std::fs::read_dir(&store) else {
        return present;
    };
    for e in rd {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(!name.starts_with('.'), "leftover temp {name} in {}", store.display());
        let p = store.join(&name);
        let want = narinfo_field(cache, &name, "NarHash");
        assert_eq!(format!("sha256:{}", nix_hash_path(&p)), want, "{name}");
        assert_canonical(&p);
        present.push(name);
    }
    present.sort();
    present
}

/// Modes 0444/0555 (dirs 0555), mtime 1, everywhere below `p`.
pub fn assert_canonical(p: &Path) {
    let md = std::fs::symlink_metadata(p).unwrap();
    assert_eq!(md.mtime(), 1, "mtime of {}", p.display());
    let mode = md.permissions().mode() & 0o7777;
    if md.is_dir() {
        assert_eq!(mode, 0o555, "{}", p.display());
        for e in std::fs::read_dir(p).unwrap() {
            assert_canonical(&e.unwrap().path());
        }
    } else if md.is_file() {
        assert!(mode == 0o444 || mode == 0o555, "{} has mode {mode:o}", p.display());
    }
}

/// A loopback port no other caller of this function — in this process or in
/// any other test process on the machine — holds, and free when handed out.
///
/// Binding port 0 and releasing it is not enough: the kernel hands the same
/// ephemeral port out again (to the next caller, or as the source port of
/// any outgoing connection) before the server meant for it has bound it; a
/// 200-agent fleet test met both. So ports come from below the ephemeral
/// range (`ip_local_port_range` starts at 32768 by default), and each is
/// claimed with `flock` on a file named after it: the lock lives as long as
/// this process (its descriptor is kept open on purpose) and the kernel drops
/// it when the process ends, however it ends.
pub fn free_port() -> u16 {
    use std::os::fd::AsFd;
    const FIRST: u16 = 20_000;
    const COUNT: u16 = 12_000;
    let dir = Path::new("/tmp/nixless-test-ports");
    std::fs::create_dir_all(dir).unwrap();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let start = (nanos ^ std::process::id().wrapping_mul(2_654_435_761)) % u32::from(COUNT);
    for i in 0..u32::from(COUNT) {
        let port = FIRST + ((start + i) % u32::from(COUNT)) as u16;
        let Ok(f) = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(port.to_string())) else {
            continue;
        };
        if rustix::fs::flock(f.as_fd(), rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            std::mem::forget(f);
            return port;
        }
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + COUNT);
}

/// nginx serving `root` on a loopback port, stopped on drop.
pub struct Nginx {
    pub port: u16,
    root: PathBuf,
}

impl Nginx {
    pub fn start(root: &Path) -> Nginx {
        Self::start_mode(root, &[])
    }

    pub fn start_throttled(root: &Path, rate: &str) -> Nginx {
        Self::start_mode(root, &[rate])
    }

    fn start_mode(root: &Path, rate: &[&str]) -> Nginx {
        let port = free_port();
        let mode = if rate.is_empty() { "start" } else { "start-throttled" };
        let st = Command::new("bash")
            .arg(repo().join("tests/support/nginx.sh"))
            .arg(mode)
            .arg(root)
            .arg(port.to_string())
            .args(rate)
            .status()
            .unwrap();
        assert!(st.success(), "nginx.sh {mode} failed");
        Nginx { port, root: root.to_owned() }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo().join("tests/support/nginx.sh"))
            .arg("stop")
            .arg(&self.root)
            .arg(self.port.to_string())
            .status();
    }
}

/// Copies a directory tree (a cache, to tamper with).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
}

/// The hash part (narinfo stem) of a store path.
pub fn hash_part(store_path: &str) -> &str {
    &store_path.rsplit('/').next().unwrap()[..32]
}

/// Makes a tree removable (store paths are read-only) and removes it.
pub fn rm_rf(p: &Path) {
    let _ = Command::new("chmod").args(["-R", "u+w"]).arg(p).status();
    let _ = std::fs::remove_dir_all(p);
}

/// The arguments of `nixless install` after the word `install`.
pub fn install_args(root: &Path, caches: &[String], key: &str, paths: &[&str], retries: u32) -> Vec<String> {
    let mut args = vec!["--root".to_string(), root.display().to_string(), "--retries".into(), retries.to_string()];
    for c in caches {
        args.push("--cache".into());
        args.push(c.clone());
    }
    args.push("--trusted-key".into());
    args.push(key.into());
    args.extend(paths.iter().map(|p| p.to_string()));
    args
}

/// A test server's side of a request: reads the head (bounded: 16 KiB, the
/// socket's read timeout) and returns the request path, `None` if the
/// client went away first.
pub fn read_request_path(c: &mut std::net::TcpStream) -> Option<String> {
    use std::io::Read;
    let _ = c.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut b = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
        match c.read(&mut b) {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&b[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head).lines().next().unwrap_or("").to_owned();
    Some(line.split(' ').nth(1).unwrap_or("/").to_owned())
}

/// Polls `f` every 20 ms until it gives a value; panics naming `what` after
/// `timeout` (a bound on the test, never the thing it checks).
pub fn wait_until<T>(what: &str, timeout: std::time::Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A child process killed and reaped on drop (servers run in the
/// foreground as our children, so nothing outlives a failed test).
pub struct Server(pub std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// nginx in the foreground (no master process: one child, killed on drop)
/// with its files in `dir` and `server` (the body of one `server { }`
/// block, which must listen on `port`) as its only site; returns once the
/// port accepts connections.
pub fn foreground_nginx(dir: &Path, port: u16, server: &str) -> Server {
    let user_line = if is_root() { "user root root;" } else { "" };
    let conf = format!(
        r#"{user_line}
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 64; }}
http {{
  default_type application/octet-stream;
  access_log {d}/access.log;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  server {{
{server}
  }}
}}
"#,
        d = dir.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let server = Server(
        Command::new("nginx")
            .args(["-p", &dir.display().to_string(), "-e", &format!("{}/error.log", dir.display()), "-c"])
            .arg(dir.join("nginx.conf"))
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("nginx (apt-get install nginx-light)"),
    );
    wait_until("nginx to listen", std::time::Duration::from_secs(60), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    server
}

/// The wall clock in Unix seconds (documents' `issued` and `expires`).
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// A test's HTTP client: statuses are answers, not errors; every request
/// ends within 10 s.
pub fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(10)))
        .build()
        .new_agent()
}

/// GET `url`: its status and body, or `None` if there was no answer.
pub fn get(url: &str) -> Option<(u16, String)> {
    let mut r = http().get(url).call().ok()?;
    Some((r.status().as_u16(), r.body_mut().read_to_string().ok()?))
}

/// `nixless agent --config DIR/config.json` (the binary `bin`), as a test
/// runs it: no inherited log level or systemd sockets, stderr appended to
/// `DIR/agent.log`. The caller adds flags (`--no-seccomp`) and spawns it.
pub fn agent_command(mut cmd: Command, dir: &Path) -> Command {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("agent.log")).unwrap();
    cmd.arg("agent")
        .arg("--config")
        .arg(dir.join("config.json"))
        .env_remove("NIXLESS_LOG")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    cmd
}

/// What a test agent wrote to `DIR/agent.log` (see [`agent_command`]).
pub fn agent_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
}

/// Panics, with the agent's log, if the agent running in `dir` has exited.
pub fn assert_agent_alive(child: &mut std::process::Child, dir: &Path) {
    if let Some(st) = child.try_wait().unwrap() {
        panic!("agent exited: {st:?}\n--- agent log ---\n{}", agent_log(dir));
    }
}

/// The running agent's `GET /v1/status` on `port`, parsed.
pub fn agent_status(child: &mut std::process::Child, dir: &Path, port: u16) -> nixless::api::Status {
    assert_agent_alive(child, dir);
    let (code, body) = get(&format!("http://127.0.0.1:{port}/v1/status")).expect("status answers");
    assert_eq!(code, 200, "{body}");
    nixless::json::from_slice_bounded(body.as_bytes()).unwrap_or_else(|e| panic!("{e}: {body}"))
}
