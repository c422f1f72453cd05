//! The seccomp allowlist against what the binary really calls on an
//! architecture whose kernel is not here. Under qemu-user (tests/run.sh's
//! aarch64 step sets NIXLESS_TEST_RUNNER=qemu-aarch64-static) the filter
//! cannot be installed (qemu answers seccomp(2) with ENOSYS, and the x86_64
//! host kernel could not apply an aarch64 filter anyway), but qemu's
//! `-strace` prints every guest syscall by its target-architecture name. An
//! install (xz over file://, zstd over HTTP, a no-op reinstall) and a verify
//! must call nothing outside the allowlist build.rs compiled for this target
//! (`seccomp_syscalls.txt`): a call missing there would be SIGSYS on a
//! device. On a real kernel tests/seccomp.rs runs the filter itself, and
//! this test has nothing to add.

#![cfg(target_os = "linux")]

mod common;

use common::*;
use std::collections::BTreeSet;
use std::process::Command;

/// Called by musl's start-up code before main, so before the agent could
/// install its filter.
const BEFORE_MAIN: &[&str] = &["set_tid_address"];

fn qemu_runner() -> Option<String> {
    std::env::var("NIXLESS_TEST_RUNNER").ok().filter(|r| r.contains("qemu-"))
}

/// Runs nixless ARGS under `RUNNER -strace`; returns the syscall names seen.
/// qemu prints `PID name(args) = ret` on stderr; a syscall it cannot name is
/// `Unknown syscall N`, kept as such so it fails the comparison.
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
    let allowed: BTreeSet<&str> = include_str!(concat!(env!("OUT_DIR"), "/seccomp_syscalls.txt")).lines().collect();
    assert!(!allowed.is_empty(), "no seccomp allowlist for {}", std::env::consts::ARCH);

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
    let outside: Vec<&String> =
        seen.iter().filter(|s| !allowed.contains(s.as_str()) && !BEFORE_MAIN.contains(&s.as_str())).collect();
    assert!(
        outside.is_empty(),
        "{} syscalls outside the {} allowlist (SIGSYS on a device): {outside:?}",
        outside.len(),
        std::env::consts::ARCH
    );
}
