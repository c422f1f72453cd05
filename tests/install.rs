//! `nixless install` end to end, against closures built and published by
//! real Nix (see tests/support/fixtures.sh), served by nginx on loopback or
//! read from file:// caches. Installed paths are checked with real Nix
//! (`nix hash path`) against the cache's NarHash.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn root() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("nixless-root-").tempdir().unwrap()
}

fn install(root: &Path, caches: &[String], key: &str, paths: &[&str]) -> std::process::Output {
    let mut args = vec!["install".to_string()];
    args.extend(install_args(root, caches, key, paths, 2));
    nixless(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn file_url(p: &Path) -> String {
    format!("file://{}", p.display())
}

fn store_entries(root: &Path) -> Vec<String> {
    match std::fs::read_dir(root.join("nix/store")) {
        Ok(rd) => {
            let mut v: Vec<String> = rd.map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
            v.sort();
            v
        }
        Err(_) => vec![],
    }
}

/// A failed install: non-zero exit, one `nixless: error:` line that
/// contains `needle`, a sound store without `absent`.
fn assert_refused(out: &std::process::Output, needle: &str, root: &Path, cache: &Path, absent: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "expected failure, got success: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("nixless: warning:")).collect();
    assert_eq!(lines.len(), 1, "want one error line, got: {err}");
    assert!(lines[0].starts_with("nixless: error: "), "{err}");
    assert!(lines[0].contains(needle), "error {:?} does not mention {needle:?}", lines[0]);
    let present = assert_store_sound(root, cache);
    let base = absent.rsplit('/').next().unwrap();
    assert!(!present.iter().any(|p| p == base), "{base} was installed despite the error");
}

#[test]
fn installs_real_closures_from_every_compression_and_transport() {
    let f = fixtures();
    let top = f.get("TOP");
    let closure = f.closure();
    let nginx = Nginx::start(&f.path("CACHE_ZSTD"));
    for (cache, url) in [
        ("CACHE_ZSTD", file_url(&f.path("CACHE_ZSTD"))),
        ("CACHE_XZ", file_url(&f.path("CACHE_XZ"))),
        ("CACHE_NONE", file_url(&f.path("CACHE_NONE"))),
        ("CACHE_ZSTD", nginx.url()),
    ] {
        let r = root();
        let out = install(r.path(), std::slice::from_ref(&url), f.get("PK_A"), &[top]);
        assert!(out.status.success(), "{url}: {}", stderr(&out));
        let present = assert_store_sound(r.path(), &f.path(cache));
        assert_eq!(present.len(), closure.len(), "{url}");
        let summary = stderr(&out);
        assert!(summary.contains(&format!("installed {} paths", closure.len())), "{summary}");

        // Already there: nothing fetched.
        let again = install(r.path(), std::slice::from_ref(&url), f.get("PK_A"), &[top]);
        assert!(again.status.success());
        assert!(stderr(&again).contains(&format!("installed 0 paths ({} already present)", 1)), "{}", stderr(&again));

        let v = nixless(&["verify", "--root", r.path().to_str().unwrap()]);
        assert!(v.status.success(), "{}", stderr(&v));
        assert!(stderr(&v).contains(&format!("{} paths verified", closure.len())));
    }
}

#[test]
fn installs_special_shapes_exactly() {
    let f = fixtures();
    let r = root();
    let cache = f.path("CACHE_ZSTD");
    let paths = ["P_FILE", "P_EXEC_FILE", "P_SYMLINK", "P_SELFREF", "P_DEEP", "P_NAMES", "P_DIR"];
    let args: Vec<&str> = paths.iter().map(|k| f.get(k)).collect();
    let out = install(r.path(), &[file_url(&cache)], f.get("PK_A"), &args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_store_sound(r.path(), &cache);
    let store = r.path().join("nix/store");
    let base = |k: &str| f.get(k).rsplit('/').next().unwrap().to_owned();
    assert!(std::fs::symlink_metadata(store.join(base("P_FILE"))).unwrap().is_file());
    assert!(std::fs::symlink_metadata(store.join(base("P_SYMLINK"))).unwrap().file_type().is_symlink());
    assert_eq!(
        std::fs::read_link(store.join(base("P_SYMLINK"))).unwrap(),
        std::fs::read_link(f.get("P_SYMLINK")).unwrap()
    );
}

#[test]
fn caches_are_tried_in_order_and_fall_through() {
    let f = fixtures();
    let empty = tempfile::tempdir().unwrap();
    std::fs::write(empty.path().join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
    let missing_dir = "file:///nonexistent/nixless-cache".to_string();
    let r = root();
    let caches =
        [missing_dir, file_url(empty.path()), file_url(&f.path("CACHE_EVIL")), file_url(&f.path("CACHE_ZSTD"))];
    let out = install(r.path(), &caches, f.get("PK_A"), &[f.get("P_DIAMOND_TOP")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(assert_store_sound(r.path(), &f.path("CACHE_ZSTD")).len(), 4);

    // Key B's cache is only trusted with key B.
    let r = root();
    let out = install(r.path(), &[file_url(&f.path("CACHE_B"))], f.get("PK_B"), &[f.get("P_CHAIN_A")]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn untrusted_unsigned_and_missing_are_refused() {
    let f = fixtures();
    let top = f.get("TOP");
    for cache in ["CACHE_EVIL", "CACHE_UNSIGNED"] {
        let r = root();
        let out = install(r.path(), &[file_url(&f.path(cache))], f.get("PK_A"), &[top]);
        assert_refused(&out, "no valid signature by a trusted cache key", r.path(), &f.path(cache), top);
        assert!(store_entries(r.path()).is_empty());
    }
    // A well-formed path that no cache has.
    let r = root();
    let nowhere = "/nix/store/00000000000000000000000000000000-nowhere";
    let nginx = Nginx::start(&f.path("CACHE_ZSTD"));
    let out = install(r.path(), &[nginx.url(), file_url(&f.path("CACHE_XZ"))], f.get("PK_A"), &[nowhere]);
    assert_refused(&out, "not found in any cache", r.path(), &f.path("CACHE_ZSTD"), nowhere);
    assert!(store_entries(r.path()).is_empty());
    // Nothing listening.
    let r = root();
    let out = install(r.path(), &[format!("http://127.0.0.1:{}", free_port())], f.get("PK_A"), &[top]);
    assert_refused(&out, "not found in any cache (unreachable", r.path(), &f.path("CACHE_ZSTD"), top);
}

/// A private copy of a cache, to tamper with.
struct Tampered {
    dir: tempfile::TempDir,
}

impl Tampered {
    fn of(cache: &Path) -> Tampered {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(cache, dir.path());
        Tampered { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn narinfo_path(&self, p: &str) -> PathBuf {
        self.path().join(format!("{}.narinfo", hash_part(p)))
    }

    fn edit_narinfo(&self, p: &str, edit: impl FnOnce(String) -> String) {
        let np = self.narinfo_path(p);
        let text = std::fs::read_to_string(&np).unwrap();
        std::fs::write(&np, edit(text)).unwrap();
    }

    /// Re-signs a narinfo with the fixtures' key A after an edit, so only
    /// the NAR checks can catch the lie.
    fn resign(&self, p: &str) {
        let sk_text = std::fs::read_to_string(fixtures().path("FIXTURES").join("keys/a.sk")).unwrap();
        let sk = nixless::nix::SecretKey::parse(&sk_text).unwrap();
        self.edit_narinfo(p, |text| {
            let kept: Vec<&str> = text.lines().filter(|l| !l.starts_with("Sig: ")).collect();
            let kept = kept.join("\n") + "\n";
            let ni = nixless::nix::NarInfo::parse(&kept, None).unwrap();
            format!("{kept}Sig: {}\n", sk.sign(ni.fingerprint().as_bytes()))
        });
    }

    fn nar_file(&self, p: &str) -> PathBuf {
        let text = std::fs::read_to_string(self.narinfo_path(p)).unwrap();
        let url = text.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap();
        self.path().join(url)
    }

    fn flip_byte(&self, p: &str, at_fraction: f64) {
        let nar = self.nar_file(p);
        let mut bytes = std::fs::read(&nar).unwrap();
        let i = ((bytes.len() as f64) * at_fraction) as usize;
        bytes[i] ^= 0x40;
        std::fs::write(&nar, bytes).unwrap();
    }
}

fn set_field(text: String, field: &str, value: &str) -> String {
    text.lines()
        .map(|l| if l.starts_with(&format!("{field}: ")) { format!("{field}: {value}") } else { l.to_owned() })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

#[test]
fn tampered_caches_are_refused_and_leave_nothing_partial() {
    let f = fixtures();
    let key = f.get("PK_A");
    let big = f.get("P_BIG");
    let file = f.get("P_FILE");
    let top = f.get("TOP");
    let nar_size = |c: &Path, p: &str| narinfo_field(c, p, "NarSize").parse::<u64>().unwrap();

    type Case = (&'static str, &'static str, Box<dyn Fn(&Tampered)>, &'static str);
    let cases: Vec<Case> = vec![
        ("CACHE_ZSTD", "P_BIG", Box::new(move |t| t.flip_byte(big, 0.5)), "mismatch"),
        ("CACHE_XZ", "P_BIG", Box::new(move |t| t.flip_byte(big, 0.3)), "xz: "),
        ("CACHE_NONE", "P_BIG", Box::new(move |t| t.flip_byte(big, 0.5)), "NarHash mismatch"),
        // A flip in NAR structure (no compression to catch it first).
        ("CACHE_NONE", "P_FILE", Box::new(move |t| t.flip_byte(file, 0.9)), "invalid NAR at byte"),
        (
            "CACHE_ZSTD",
            "TOP",
            Box::new(move |t| t.edit_narinfo(top, |s| s.replace("NarSize: ", "NarSize: 1"))),
            "no valid signature",
        ),
        (
            "CACHE_ZSTD",
            "TOP",
            Box::new(move |t| t.edit_narinfo(top, |s| format!("{s}NarSize: 5\n"))),
            "field NarSize repeated",
        ),
        (
            "CACHE_ZSTD",
            "TOP",
            Box::new(move |t| t.edit_narinfo(top, |s| s.replace("\nCompression: zstd", ""))),
            "bzip2",
        ),
        (
            "CACHE_ZSTD",
            "TOP",
            Box::new(move |t| t.edit_narinfo(top, |s| s.replace("\nCompression: zstd", "\nCompression: br"))),
            "\"br\"",
        ),
        (
            "CACHE_NONE",
            "P_FILE",
            Box::new(move |t| {
                let n = nar_size(t.path(), file);
                t.edit_narinfo(file, |s| set_field(s, "NarSize", &(n + 8).to_string()));
                t.resign(file);
            }),
            "NarSize mismatch",
        ),
        (
            "CACHE_NONE",
            "P_BIG",
            Box::new(move |t| {
                let n = nar_size(t.path(), big);
                t.edit_narinfo(big, |s| {
                    set_field(set_field(s, "NarSize", &(n / 2).to_string()), "FileSize", &n.to_string())
                });
                t.resign(big);
            }),
            "NAR exceeds",
        ),
        (
            "CACHE_ZSTD",
            "P_BIG",
            Box::new(move |t| t.edit_narinfo(big, |s| set_field(s, "FileSize", "1000"))),
            "file exceeds",
        ),
        (
            "CACHE_XZ",
            "P_BIG",
            Box::new(move |t| t.edit_narinfo(big, |s| set_field(s, "FileSize", "5000"))),
            "file exceeds the 5000 bytes",
        ),
        (
            "CACHE_ZSTD",
            "P_FILE",
            Box::new(move |t| {
                // Another path's (validly signed) NAR behind this narinfo.
                let other = t.nar_file(f.get("P_EXEC_FILE"));
                std::fs::copy(other, t.nar_file(file)).unwrap();
            }),
            "exceeds",
        ),
        (
            "CACHE_ZSTD",
            "P_FILE",
            Box::new(move |t| {
                let theirs = std::fs::read_to_string(t.narinfo_path(f.get("P_EXEC_FILE"))).unwrap();
                std::fs::write(t.narinfo_path(file), theirs).unwrap();
            }),
            "expected",
        ),
        ("CACHE_ZSTD", "P_FILE", Box::new(move |t| std::fs::remove_file(t.nar_file(file)).unwrap()), "missing"),
        (
            "CACHE_ZSTD",
            "P_BIG",
            Box::new(move |t| {
                let nar = t.nar_file(big);
                let len = std::fs::metadata(&nar).unwrap().len();
                std::fs::OpenOptions::new().write(true).open(&nar).unwrap().set_len(len / 2).unwrap();
            }),
            "",
        ),
    ];
    for (i, (cache, target, tamper, needle)) in cases.into_iter().enumerate() {
        let t = Tampered::of(&f.path(cache));
        tamper(&t);
        let r = root();
        let out = install(r.path(), &[file_url(t.path())], key, &[f.get(target)]);
        eprintln!("case {i} ({cache} {target}): {}", stderr(&out).trim());
        assert_refused(&out, needle, r.path(), &f.path(cache), f.get(target));
    }
}

/// A tiny HTTP/1.1 file server on loopback that misbehaves on purpose.
#[derive(Clone, Default)]
struct Flaky {
    /// Cut the first response for a NAR after this many body bytes.
    cut_first_nar_after: Option<usize>,
    /// Answer 200 with the whole file even when asked for a range.
    ignore_range: bool,
    /// Answer the first N requests with 500.
    fail_first: usize,
}

struct FlakyServer {
    port: u16,
    requests: Arc<AtomicUsize>,
    ranges: Arc<AtomicUsize>,
}

fn serve_flaky(root: PathBuf, cfg: Flaky) -> FlakyServer {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let requests = Arc::new(AtomicUsize::new(0));
    let ranges = Arc::new(AtomicUsize::new(0));
    let (rq, rg) = (requests.clone(), ranges.clone());
    std::thread::spawn(move || {
        let mut cut_done = false;
        // Bounded: a test never needs more than this many connections.
        for conn in listener.incoming().take(10_000) {
            let Ok(mut conn) = conn else { break };
            let n = rq.fetch_add(1, Ordering::SeqCst);
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split(' ').nth(1).unwrap_or("/").split('?').next().unwrap().to_owned();
            let mut range_start = None;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range_start = v.trim().trim_end_matches('-').parse::<usize>().ok();
                }
            }
            if range_start.is_some() {
                rg.fetch_add(1, Ordering::SeqCst);
            }
            if n < cfg.fail_first {
                let _ = conn.write_all(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                continue;
            }
            let Ok(body) = std::fs::read(root.join(path.trim_start_matches('/'))) else {
                let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                continue;
            };
            let (status, start) = match range_start {
                Some(s) if !cfg.ignore_range && s < body.len() => ("206 Partial Content", s),
                _ => ("200 OK", 0),
            };
            let mut head =
                format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len() - start);
            if start > 0 {
                head += &format!("Content-Range: bytes {start}-{}/{}\r\n", body.len() - 1, body.len());
            }
            head += "\r\n";
            let _ = conn.write_all(head.as_bytes());
            let mut slice = &body[start..];
            if path.starts_with("/nar/") && !cut_done {
                if let Some(cut) = cfg.cut_first_nar_after {
                    if cut < slice.len() {
                        cut_done = true;
                        slice = &slice[..cut];
                    }
                }
            }
            let _ = conn.write_all(slice);
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
    });
    FlakyServer { port, requests, ranges }
}

#[test]
fn resumes_a_download_cut_mid_body() {
    let f = fixtures();
    let cache = f.path("CACHE_ZSTD");
    for ignore_range in [false, true] {
        let srv =
            serve_flaky(cache.clone(), Flaky { cut_first_nar_after: Some(1 << 20), ignore_range, ..Flaky::default() });
        let r = root();
        let out = install(r.path(), &[format!("http://127.0.0.1:{}", srv.port)], f.get("PK_A"), &[f.get("P_BIG")]);
        assert!(out.status.success(), "ignore_range={ignore_range}: {}", stderr(&out));
        assert!(stderr(&out).contains("resuming at byte"), "{}", stderr(&out));
        assert_eq!(srv.ranges.load(Ordering::SeqCst), 1, "one Range request");
        assert_eq!(assert_store_sound(r.path(), &cache).len(), 1);
    }
}

#[test]
fn retries_transient_server_errors() {
    let f = fixtures();
    let cache = f.path("CACHE_ZSTD");
    let srv = serve_flaky(cache.clone(), Flaky { fail_first: 2, ..Flaky::default() });
    let r = root();
    let out = install(r.path(), &[format!("http://127.0.0.1:{}", srv.port)], f.get("PK_A"), &[f.get("P_CHAIN_A")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(srv.requests.load(Ordering::SeqCst) > 2);
    assert_eq!(assert_store_sound(r.path(), &cache).len(), 3);
}

#[test]
fn bad_arguments_are_one_line_errors_and_touch_nothing() {
    let f = fixtures();
    let r = root();
    let rp = r.path().join("never-created");
    let rs = rp.to_str().unwrap();
    let good_cache = file_url(&f.path("CACHE_ZSTD"));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["install", "--root", rs, "--cache", &good_cache, "--trusted-key", f.get("PK_A"), "/nix/store/short-x"],
            "invalid hash part",
        ),
        (
            vec!["install", "--root", rs, "--cache", &good_cache, "--trusted-key", f.get("PK_A"), "/tmp/x"],
            "not a path directly below /nix/store",
        ),
        (
            vec!["install", "--root", rs, "--cache", &good_cache, "--trusted-key", "nokey", f.get("TOP")],
            "--trusted-key",
        ),
        (vec!["install", "--root", rs, "--cache", &good_cache, f.get("TOP")], "no trusted cache key"),
        (
            vec!["install", "--root", rs, "--cache", "ftp://x", "--trusted-key", f.get("PK_A"), f.get("TOP")],
            "expected http://",
        ),
        (vec!["install", "--root", rs, "--trusted-key", f.get("PK_A"), f.get("TOP")], "no cache given"),
    ];
    for (args, needle) in cases {
        let out = nixless(&args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        assert!(!rp.exists(), "{args:?} created the root");
    }
}

#[test]
fn kill_9_at_random_moments_then_rerun_completes() {
    let f = fixtures();
    let cache = f.path("CACHE_ZSTD");
    let closure = f.closure();
    // Throttled so the install spans a second or two and kills land inside it.
    let nginx = Nginx::start_throttled(&cache, "8m");
    let r = root();
    let url = nginx.url();
    let rs = r.path().to_str().unwrap().to_owned();
    // A fixed pseudo-random sequence (xorshift): reproducible kill points.
    let mut seed: u64 = 0x9e3779b97f4a7c15;
    let mut kills_mid_install = 0;
    for _ in 0..8 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay_ms = 50 + seed % 1500;
        let mut child = std::process::Command::new(bin())
            .args(["install", "--root", &rs, "--cache", &url, "--trusted-key", f.get("PK_A"), f.get("TOP")])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        if child.try_wait().unwrap().is_none() {
            kills_mid_install += 1;
        }
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        // Whatever is in the store now is complete; temps may be left.
        check_complete_ignoring_temps(r.path(), &cache);
    }
    assert!(kills_mid_install >= 4, "only {kills_mid_install} kills landed mid-install");
    let out = install(r.path(), &[url], f.get("PK_A"), &[f.get("TOP")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(assert_store_sound(r.path(), &cache).len(), closure.len());
}

fn check_complete_ignoring_temps(root: &Path, cache: &Path) {
    let Ok(rd) = std::fs::read_dir(root.join("nix/store")) else {
        return;
    };
    for e in rd {
        let name = e.unwrap().file_name().into_string().unwrap();
        if name.starts_with(".nixless-tmp-") {
            continue;
        }
        let p = root.join("nix/store").join(&name);
        assert_eq!(
            format!("sha256:{}", nix_hash_path(&p)),
            narinfo_field(cache, &name, "NarHash"),
            "{name} after kill"
        );
    }
}
