//! The seccomp allowlist against what the binary really calls on an
//! architecture whose kernel is not here. Under qemu-user (tests/run.sh's
//! aarch64 step sets NIXLESS_TEST_RUNNER=qemu-aarch64-static) the filter
//! cannot be installed (qemu answers seccomp(2) with ENOSYS, and the x86_64
//! host kernel could not apply an aarch64 filter anyway), but qemu's
//! `-strace` prints every guest syscall by its target-architecture name. An
//! install (xz over file://, zstd over HTTP, a no-op reinstall) and a verify
//! must call nothing outside the allowlist build.rs compiled for this target
//! (`seccomp_syscalls.txt`): a call missing there would be SIGSYS on a
//! device. Likewise the agent, from the moment it would install the filter:
//! sd_notify READY and watchdog pings, status over HTTP, a signed deploy
//! that installs a closure and writes the switch request, SIGTERM. On a real kernel tests/seccomp.rs runs the filter itself, and
//! this test has nothing to add.

#![cfg(target_os = "linux")]

mod common;

use common::*;
use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Called by musl's start-up code before main, so before the agent could
/// install its filter.
const BEFORE_MAIN: &[&str] = &["set_tid_address"];

fn qemu_runner() -> Option<String> {
    std::env::var("NIXLESS_TEST_RUNNER").ok().filter(|r| r.contains("qemu-"))
}

/// Runs nixless ARGS under `RUNNER -strace`; returns the syscall names seen.
fn traced(runner: &str, args: &[&str]) -> BTreeSet<String> {
    let out = Command::new(runner)
        .arg("-strace")
        .arg(env!("CARGO_BIN_EXE_nixless"))
        .args(args)
        .env_remove("NIXLESS_LOG")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "nixless {args:?} failed under {runner} -strace:\n{}", tail(&text));
    syscall_names(&text)
}

/// qemu prints `PID name(args) = ret` on stderr, the program's own stderr
/// inline; a syscall it cannot name is `Unknown syscall N`, kept as such so
/// it fails the comparison.
fn syscall_names(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for line in text.lines() {
        if let Some(n) = line.find("Unknown syscall") {
            seen.insert(line[n..].to_owned());
            continue;
        }
        let Some((pid, rest)) = line.split_once(' ') else { continue };
        let Some((name, _)) = rest.split_once('(') else { continue };
        let is_name =
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) && is_name {
            seen.insert(name.to_owned());
        }
    }
    seen
}

fn allowlist() -> BTreeSet<&'static str> {
    let allowed: BTreeSet<&str> = include_str!(concat!(env!("OUT_DIR"), "/seccomp_syscalls.txt")).lines().collect();
    assert!(!allowed.is_empty(), "no seccomp allowlist for {}", std::env::consts::ARCH);
    allowed
}

fn assert_allowed(seen: &BTreeSet<String>, what: &str) {
    let allowed = allowlist();
    let outside: Vec<&String> =
        seen.iter().filter(|s| !allowed.contains(s.as_str()) && !BEFORE_MAIN.contains(&s.as_str())).collect();
    assert!(
        outside.is_empty(),
        "{what}: {} syscalls outside the {} allowlist (SIGSYS on a device): {outside:?}",
        outside.len(),
        std::env::consts::ARCH
    );
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[test]
fn install_and_verify_call_only_allowed_syscalls_under_qemu() {
    let Some(runner) = qemu_runner() else {
        eprintln!("skipped: NIXLESS_TEST_RUNNER is not qemu-user; on a real kernel tests/seccomp.rs runs the filter");
        return;
    };
    let f = fixtures();
    let nginx = Nginx::start(&f.path("CACHE_ZSTD"));
    let dir = tempfile::Builder::new().prefix("nixless-qemu-strace-").tempdir().unwrap();
    let key = f.get("PK_A");
    let top = f.get("TOP");
    let mut seen = BTreeSet::new();
    let file_root = dir.path().join("file");
    let http_root = dir.path().join("http");
    let xz = format!("file://{}", f.path("CACHE_XZ").display());
    for (root, cache) in [(&file_root, &xz), (&http_root, &nginx.url()), (&http_root, &nginx.url())] {
        let root = root.to_str().unwrap();
        seen.extend(traced(&runner, &["install", "--root", root, "--cache", cache, "--trusted-key", key, top]));
    }
    seen.extend(traced(&runner, &["verify", "--root", http_root.to_str().unwrap()]));

    // The trace was read: the store writes and the HTTP fetch are in it.
    for expected in ["openat", "renameat2", "connect"] {
        assert!(seen.contains(expected), "{expected} not seen in the trace: {seen:?}");
    }
    assert_allowed(&seen, "install and verify");
}

/// Receives notifications until one equals `want` (bounded).
fn wait_notification(sock: &UnixDatagram, want: &str, log: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            if &buf[..n] == want.as_bytes() {
                return;
            }
        }
    }
    panic!("no {want} from the agent within 60 s:\n{}", tail(&std::fs::read_to_string(log).unwrap_or_default()));
}

#[test]
fn agent_calls_only_allowed_syscalls_after_setup_under_qemu() {
    let Some(runner) = qemu_runner() else {
        eprintln!("skipped: NIXLESS_TEST_RUNNER is not qemu-user; on a real kernel tests/seccomp.rs runs the filter");
        return;
    };
    let f = fixtures();
    let nginx = Nginx::start(&f.path("CACHE_ZSTD"));
    let dir = tempfile::Builder::new().prefix("nixless-qemu-agent-").tempdir().unwrap();
    let keyfile = dir.path().join("admin.key");
    let out = nixless(&["keygen", "admin-1", "--out", keyfile.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let pubkey = std::fs::read_to_string(format!("{}.pub", keyfile.display())).unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let port = free_port();
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"host":"kiosk-7","listen":["127.0.0.1:{port}"],"caches":["{}"],"cache_keys":["{}"],"deploy_keys":["{}"],"root":"{}","retries":1}}"#,
            nginx.url(),
            f.get("PK_A"),
            pubkey.trim(),
            root.display()
        ),
    )
    .unwrap();
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let log = dir.path().join("trace.log");
    // --no-seccomp: under qemu seccomp(2) is ENOSYS; the trace shows what the
    // filter would have seen.
    let mut agent = Command::new(&runner)
        .arg("-strace")
        .arg(env!("CARGO_BIN_EXE_nixless"))
        .args(["agent", "--config", config.to_str().unwrap(), "--no-seccomp"])
        .env("NIXLESS_LOG", "info")
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "2000000")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_notification(&notify, "READY=1", &log);

    let out = nixless(&["status", &format!("http://127.0.0.1:{port}")]);
    assert!(out.status.success(), "status: {}", stderr(&out));
    let url = format!("http://127.0.0.1:{port}");
    let args = ["deploy", "--key", keyfile.to_str().unwrap(), "--host", "kiosk-7", "--system", f.get("TOP")];
    let out = nixless(&[&args[..], &["--seq", "1", "--agent", &url, "--no-wait"]].concat());
    assert!(out.status.success(), "deploy: {}", stderr(&out));
    // The closure is installed and the switch requested: the agent's whole
    // deploy path up to the oneshot unit ran.
    let request = root.join("var/lib/nixless/switch/request.json");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !request.exists() {
        assert!(
            Instant::now() < deadline,
            "no switch request within 120 s:\n{}",
            tail(&std::fs::read_to_string(&log).unwrap())
        );
        assert!(
            agent.try_wait().unwrap().is_none(),
            "agent exited:\n{}",
            tail(&std::fs::read_to_string(&log).unwrap())
        );
        wait_notification(&notify, "WATCHDOG=1", &log);
    }
    wait_notification(&notify, "WATCHDOG=1", &log);
    // SIGTERM: the agent's orderly exit is traced too.
    let _ = Command::new("kill").arg("-TERM").arg(agent.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(60);
    while agent.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = agent.kill();
            panic!("agent did not exit on SIGTERM within 60 s");
        }
        let _ = notify.recv(&mut [0u8; 4096]); // bounded wait (500 ms read timeout)
    }

    let text = std::fs::read_to_string(&log).unwrap();
    // Only what follows set-up counts: the filter is installed right after
    // the agent logs where it listens.
    let from = text.find("listening on").unwrap_or_else(|| panic!("no \"listening on\" in the log:\n{}", tail(&text)));
    let seen = syscall_names(&text[from..]);
    for expected in ["accept4", "openat", "renameat2", "connect", "sendto"] {
        assert!(seen.contains(expected), "{expected} not seen in the agent's trace: {seen:?}");
    }
    assert_allowed(&seen, "agent");
}
