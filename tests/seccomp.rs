//! The seccomp allowlist (src/agent/seccomp.json, compiled by build.rs),
//! always exercised in a child process: `nixless __seccomp-selftest WHAT`
//! installs the filter and then does WHAT. Forbidden calls must kill the
//! process with SIGSYS; the agent's ordinary work, and a full `install`
//! against real Nix-built caches (file:// and nginx), must complete.
//!
//! x86_64 and aarch64, on a real kernel of that architecture: under
//! qemu-user (tests/run.sh's aarch64 step) the guest's syscalls reach the
//! x86_64 host kernel, which cannot apply an aarch64 filter, so run.sh
//! leaves this file out there.

#![cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))]

mod common;

use common::*;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output};

const SIGSYS: i32 = 31;

fn selftest(args: &[&str]) -> Output {
    Command::new(bin()).arg("__seccomp-selftest").args(args).env_remove("NIXLESS_LOG").output().unwrap()
}

fn root() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("nixless-seccomp-root-").tempdir().unwrap()
}

#[test]
fn filter_compiled_for_this_architecture() {
    let prog = nixless::agent::seccomp::program().expect("filter for this architecture");
    // Arch check, syscall load, one jump per allowed syscall at least.
    assert!(prog.len() > 60, "{} instructions", prog.len());
    assert!(prog.len() <= 4096);
}

#[test]
fn allowed_operations_survive() {
    let out = selftest(&["allowed"]);
    assert_eq!(out.status.code(), Some(0), "status {:?}: {}", out.status, stderr(&out));
}

#[test]
fn forbidden_calls_are_killed_with_sigsys() {
    for what in ["execve", "spawn", "fork", "clone", "ptrace", "socket-netlink", "ioctl-other", "mmap-exec"] {
        let out = selftest(&[what]);
        assert_eq!(out.status.signal(), Some(SIGSYS), "{what}: status {:?}: {}", out.status, stderr(&out));
    }
}

#[test]
fn panic_under_filter_is_not_a_seccomp_kill() {
    // Release (panic = "abort"): SIGABRT via tkill; test builds unwind and
    // exit 101. Either way the panic path itself must not hit the filter.
    let out = selftest(&["panic"]);
    assert!(
        out.status.signal() == Some(6) || out.status.code() == Some(101),
        "status {:?}: {}",
        out.status,
        stderr(&out)
    );
    assert!(stderr(&out).contains("deliberate panic"), "{}", stderr(&out));
}

#[test]
fn unknown_selftest_is_a_usage_error() {
    let out = selftest(&["no-such-thing"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

fn install_under_filter(root: &Path, caches: &[String], key: &str, paths: &[&str]) -> Output {
    let mut args = vec!["install".to_string(), "--".into()];
    args.extend(install_args(root, caches, key, paths, 1));
    selftest(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn assert_installed(out: &Output, root: &Path, cache: &Path) {
    assert!(
        out.status.success(),
        "install under seccomp: status {:?} (signal 31 = a syscall missing from seccomp.json): {}",
        out.status,
        stderr(out)
    );
    let f = fixtures();
    let present = assert_store_sound(root, cache);
    assert_eq!(present.len(), f.get("CLOSURE_SIZE").parse::<usize>().unwrap(), "{present:?}");
}

#[test]
fn install_xz_from_file_cache_under_filter() {
    let f = fixtures();
    let r = root();
    let cache = f.path("CACHE_XZ");
    let url = format!("file://{}", cache.display());
    let out = install_under_filter(r.path(), std::slice::from_ref(&url), f.get("PK_A"), &[f.get("TOP")]);
    assert_installed(&out, r.path(), &cache);
    // Again: everything present, nothing fetched.
    let out = install_under_filter(r.path(), &[url], f.get("PK_A"), &[f.get("TOP")]);
    assert_installed(&out, r.path(), &cache);
    rm_rf(r.path());
}

#[test]
fn install_zstd_over_http_under_filter() {
    let f = fixtures();
    let r = root();
    let cache = f.path("CACHE_ZSTD");
    let nginx = Nginx::start(&cache);
    let out = install_under_filter(r.path(), &[nginx.url()], f.get("PK_A"), &[f.get("TOP")]);
    assert_installed(&out, r.path(), &cache);
    rm_rf(r.path());
}

#[test]
fn install_with_refused_first_cache_under_filter() {
    // The first cache refuses connections: the connect error path (poll,
    // SO_ERROR) and the failover to the second cache run under the filter.
    let f = fixtures();
    let r = root();
    let cache = f.path("CACHE_ZSTD");
    let nginx = Nginx::start(&cache);
    let dead = format!("http://127.0.0.1:{}", free_port());
    let out = install_under_filter(r.path(), &[dead, nginx.url()], f.get("PK_A"), &[f.get("TOP")]);
    assert_installed(&out, r.path(), &cache);
    rm_rf(r.path());
}
