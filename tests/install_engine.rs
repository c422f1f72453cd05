//! `nixless install` on the network engine (issue 11): many requests in
//! flight over several connections, against a loopback server that answers
//! slowly and out of order, drops connections, or lacks files. Real
//! Nix-built fixtures; installed paths checked with `nix hash path`; no
//! spool or temp may be left behind (`assert_store_sound`).

mod common;

use common::*;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Default)]
struct Behaviour {
    /// Up to this long before each answer, varying by path (so answers on
    /// different connections overtake each other).
    max_delay_ms: u64,
    /// Request paths answered 404.
    missing: BTreeSet<String>,
    /// Request paths whose body is cut at the file's middle (a resume
    /// beyond it gets nothing) and the connection closed.
    cut_always: BTreeSet<String>,
    /// Request paths cut at 1 MiB the first time only.
    cut_once: BTreeSet<String>,
}

#[derive(Default)]
struct Counts {
    connections: AtomicUsize,
    open: AtomicUsize,
    most_open: AtomicUsize,
    requests: Mutex<Vec<String>>,
    ranges: AtomicUsize,
}

/// A keep-alive HTTP/1.1 file server, a thread per connection, reading
/// pipelined requests one after another.
fn serve(root: PathBuf, b: Behaviour) -> (String, Arc<Counts>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    let cut_done = Arc::new(Mutex::new(BTreeSet::new()));
    std::thread::spawn(move || {
        for conn in listener.incoming().take(2000) {
            let Ok(mut conn) = conn else { return };
            let (root, b, c, cut_done) = (root.clone(), b.clone(), c.clone(), cut_done.clone());
            c.connections.fetch_add(1, Ordering::SeqCst);
            let now = c.open.fetch_add(1, Ordering::SeqCst) + 1;
            c.most_open.fetch_max(now, Ordering::SeqCst);
            std::thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(20)));
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    let path = line.split(' ').nth(1).unwrap_or("/").to_owned();
                    let mut range = 0usize;
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                            range = v.trim().trim_end_matches('-').parse().unwrap_or(0);
                        }
                    }
                    c.requests.lock().unwrap().push(path.clone());
                    if range > 0 {
                        c.ranges.fetch_add(1, Ordering::SeqCst);
                    }
                    let spread = path.bytes().fold(7u64, |h, x| h.wrapping_mul(31).wrapping_add(x as u64));
                    if b.max_delay_ms > 0 {
                        std::thread::sleep(Duration::from_millis(spread % b.max_delay_ms));
                    }
                    let body = match std::fs::read(root.join(path.trim_start_matches('/'))) {
                        Ok(body) if !b.missing.contains(&path) => body,
                        _ => {
                            let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
                            continue;
                        }
                    };
                    let start = range.min(body.len());
                    let (status, extra) = if start > 0 {
                        (
                            "206 Partial Content",
                            format!("Content-Range: bytes {start}-{}/{}\r\n", body.len() - 1, body.len()),
                        )
                    } else {
                        ("200 OK", String::new())
                    };
                    let rest = &body[start..];
                    let _ = write!(conn, "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{extra}\r\n", rest.len());
                    let cut = if b.cut_always.contains(&path) {
                        // Never past the middle of the file, whatever the range.
                        Some((body.len() / 2).saturating_sub(start))
                    } else if b.cut_once.contains(&path) && cut_done.lock().unwrap().insert(path.clone()) {
                        Some(rest.len().min(1 << 20))
                    } else {
                        None
                    };
                    match cut {
                        Some(n) => {
                            let _ = conn.write_all(&rest[..n]);
                            break;
                        }
                        None => {
                            let _ = conn.write_all(rest);
                        }
                    }
                }
                let _ = conn.shutdown(std::net::Shutdown::Both);
                c.open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (url, counts)
}

fn root() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("nixless-root-").tempdir().unwrap()
}

fn install(root: &Path, url: &str, key: &str, paths: &[&str]) -> std::process::Output {
    let mut args = vec!["install".to_string()];
    args.extend(install_args(root, &[url.to_owned()], key, paths, 2));
    nixless(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn nar_request(cache: &Path, store_path: &str) -> String {
    format!("/{}", narinfo_field(cache, store_path, "URL"))
}

fn one_error_line(out: &std::process::Output, needle: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "expected failure: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("nixless: warning:")).collect();
    assert_eq!(lines.len(), 1, "want one error line, got: {err}");
    assert!(lines[0].starts_with("nixless: error: ") && lines[0].contains(needle), "{:?} lacks {needle:?}", lines[0]);
}

/// Answers delayed by up to 150 ms, differently per path: the closure is
/// installed exactly (every path checked by Nix), over several connections
/// at once, each narinfo and NAR asked for once.
#[test]
fn slow_out_of_order_answers_install_the_exact_closure() {
    let f = fixtures();
    let cache = f.path("CACHE_ZSTD");
    let closure = f.closure();
    let (url, counts) = serve(cache.clone(), Behaviour { max_delay_ms: 150, ..Behaviour::default() });
    let r = root();
    let out = install(r.path(), &url, f.get("PK_A"), &[f.get("TOP")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(assert_store_sound(r.path(), &cache).len(), closure.len());
    let reqs = counts.requests.lock().unwrap().clone();
    // Two paths of the fixtures have the same NAR (same URL): one request per path.
    assert_eq!(reqs.len(), 1 + 2 * closure.len(), "{reqs:?}");
    let narinfos: Vec<&String> = reqs.iter().filter(|r| r.ends_with(".narinfo")).collect();
    assert_eq!(narinfos.iter().collect::<BTreeSet<_>>().len(), closure.len(), "{reqs:?}");
    let most = counts.most_open.load(Ordering::SeqCst);
    assert!(most >= 2, "only {most} connection(s) at once");
    assert!(counts.connections.load(Ordering::SeqCst) <= 8, "more than 8 connections");
}

/// A reference whose narinfo no cache has: one clear error, nothing of the
/// chain above it installed, no temp or spool left.
#[test]
fn a_missing_reference_fails_cleanly() {
    let f = fixtures();
    let cache = f.path("CACHE_ZSTD");
    let missing = format!("/{}.narinfo", hash_part(f.get("P_CHAIN_C")));
    let (url, _) = serve(cache.clone(), Behaviour { missing: [missing].into(), ..Behaviour::default() });
    let r = root();
    let out = install(r.path(), &url, f.get("PK_A"), &[f.get("P_CHAIN_A")]);
    one_error_line(&out, &format!("{}: not found in any cache", f.get("P_CHAIN_C")));
    assert!(assert_store_sound(r.path(), &cache).is_empty());
}

/// A NAR cut short on every attempt: after the retries, one error naming
/// the break; the path is not installed and no spool is left.
#[test]
fn a_nar_truncated_every_time_fails_cleanly() {
    let f = fixtures();
    let cache = f.path("CACHE_ZSTD");
    let big = f.get("P_BIG");
    let (url, counts) =
        serve(cache.clone(), Behaviour { cut_always: [nar_request(&cache, big)].into(), ..Behaviour::default() });
    let r = root();
    let out = install(r.path(), &url, f.get("PK_A"), &[f.get("TOP")]);
    one_error_line(&out, "connection closed in the middle of the body");
    let present = assert_store_sound(r.path(), &cache);
    let base = big.rsplit('/').next().unwrap();
    assert!(!present.iter().any(|p| p == base));
    // The first attempt (to the middle) and two resumes that get nothing
    // (--retries 2). More when a close with pipelined requests unread turns
    // into a reset that loses bytes before the middle: a resume that then
    // makes progress earns its budget back, as it should.
    let ranges = counts.ranges.load(Ordering::SeqCst);
    assert!((2..=8).contains(&ranges), "{ranges} range requests");
}

/// A connection dropped in the middle of the big NAR while other
/// downloads go on: it resumes where the spool ends, and all installs.
#[test]
fn a_connection_dropped_mid_body_resumes() {
    let f = fixtures();
    let cache = f.path("CACHE_ZSTD");
    let big = f.get("P_BIG");
    let (url, counts) = serve(
        cache.clone(),
        Behaviour { cut_once: [nar_request(&cache, big)].into(), max_delay_ms: 30, ..Behaviour::default() },
    );
    let r = root();
    let out = install(r.path(), &url, f.get("PK_A"), &[f.get("TOP")]);
    assert!(out.status.success(), "{}", stderr(&out));
    // At byte 1048576, or a little before if the close became a reset
    // (pipelined requests unread) that lost the last bytes in flight.
    assert!(stderr(&out).contains("resuming at byte "), "{}", stderr(&out));
    assert_eq!(counts.ranges.load(Ordering::SeqCst), 1);
    assert_eq!(assert_store_sound(r.path(), &cache).len(), f.closure().len());
}

/// `--connections` is ranged: 0 or more than 64 is one line, and nothing is created.
#[test]
fn connections_out_of_range_are_refused() {
    let f = fixtures();
    let r = root();
    let rp = r.path().join("never-created");
    let cache = format!("file://{}", f.path("CACHE_ZSTD").display());
    for n in ["0", "65"] {
        let args = ["install", "--root", rp.to_str().unwrap(), "--cache", &cache, "--trusted-key", f.get("PK_A")];
        let mut args = args.to_vec();
        args.extend(["--connections", n, f.get("TOP")]);
        let out = nixless(&args);
        assert!(!out.status.success(), "--connections {n}");
        assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
        assert!(stderr(&out).contains(&format!("--connections {n}: expected 1 to 64")), "{}", stderr(&out));
        assert!(!rp.exists());
    }
}
