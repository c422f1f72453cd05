//! The agent fetches a deploy's closure on the network engine, stepped from
//! its own event loop (issue 11, items 1 and 2).
//!
//! A real agent process deploys from a cache served by a test server that
//! keeps every connection alive (pipelined requests answered in order) and,
//! while the test holds it, sends the head and the first bytes of each NAR
//! and then nothing more. So the number of NAR responses held open at once
//! is the number of NARs streaming at once. The old sequential fetcher had
//! one; the engine has one per bulk connection. While eight are held, the
//! agent must answer `GET /v1/status`. The deploy document carries the
//! closure's narinfos: none is asked of the cache, and one that fails its
//! signature check is never trusted (the cache is asked for that one).
//!
//! Every wait is on a condition, bounded by a generous timeout.

mod common;

use common::*;
use nixless::deploy::{render, sign, Action};
use nixless::nix::SecretKey;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::Duration;

const HOST: &str = "kiosk-7";
const PATIENCE: Duration = Duration::from_secs(60);

/// A keep-alive HTTP/1.1 server over a cache directory.
struct HoldingCache {
    port: u16,
    /// NAR responses started and not finished (held or sending).
    streaming: Arc<AtomicUsize>,
    /// Most NAR responses streaming at once.
    peak: Arc<AtomicUsize>,
    hold: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl HoldingCache {
    fn start(dir: &Path) -> HoldingCache {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let c = HoldingCache {
            port,
            streaming: Arc::default(),
            peak: Arc::default(),
            hold: Arc::new(AtomicBool::new(true)),
            seen: Arc::default(),
        };
        let (dir, streaming, peak, hold, seen) =
            (dir.to_owned(), c.streaming.clone(), c.peak.clone(), c.hold.clone(), c.seen.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (dir, streaming, peak, hold, seen) =
                    (dir.clone(), streaming.clone(), peak.clone(), hold.clone(), seen.clone());
                std::thread::spawn(move || serve_conn(conn, &dir, &streaming, &peak, &hold, &seen));
            }
        });
        c
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn streaming(&self) -> usize {
        self.streaming.load(Ordering::SeqCst)
    }

    fn release(&self) {
        self.hold.store(false, Ordering::SeqCst);
    }

    fn requests(&self, suffix: &str) -> Vec<String> {
        self.seen.lock().unwrap().iter().filter(|p| p.ends_with(suffix)).cloned().collect()
    }
}

/// Requests of one connection, answered in order until the client closes.
fn serve_conn(
    mut c: TcpStream,
    dir: &Path,
    streaming: &AtomicUsize,
    peak: &AtomicUsize,
    hold: &AtomicBool,
    seen: &Mutex<Vec<String>>,
) {
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match c.read(&mut b) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&b[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let path = head.split(' ').nth(1).unwrap_or("/").split('?').next().unwrap_or("/").to_owned();
        seen.lock().unwrap().push(path.clone());
        let body = match (path.contains(".."), fs::read(dir.join(path.trim_start_matches('/')))) {
            (false, Ok(body)) => body,
            _ => {
                if c.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n").is_err() {
                    return;
                }
                continue;
            }
        };
        let hdr = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
        if !path.starts_with("/nar/") {
            if c.write_all(hdr.as_bytes()).and_then(|()| c.write_all(&body)).is_err() {
                return;
            }
            continue;
        }
        let now = streaming.fetch_add(1, Ordering::SeqCst) + 1;
        peak.fetch_max(now, Ordering::SeqCst);
        let cut = body.len().min(16);
        let mut ok = c.write_all(hdr.as_bytes()).and_then(|()| c.write_all(&body[..cut])).is_ok();
        while ok && hold.load(Ordering::SeqCst) {
            sleep(Duration::from_millis(20));
        }
        ok = ok && c.write_all(&body[cut..]).is_ok();
        streaming.fetch_sub(1, Ordering::SeqCst);
        if !ok {
            return;
        }
    }
}

/// The agent process (no seccomp: tests/agent.rs covers that), killed on drop.
struct Agent {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Agent {
    fn start(dir: &Path, cache: &str, key: &SecretKey, extra: &str) -> Agent {
        Agent::start_env(dir, cache, key, extra, &[])
    }

    fn start_env(dir: &Path, cache: &str, key: &SecretKey, extra: &str, env: &[(&str, &Path)]) -> Agent {
        let f = fixtures();
        let port = free_port();
        let root = dir.join("root");
        fs::create_dir_all(&root).unwrap();
        let config = dir.join("config.json");
        let text = format!(
            r#"{{"host":"{HOST}","listen":["127.0.0.1:{port}"],"caches":["{cache}"],"cache_keys":["{}"],"deploy_keys":["{}"],"root":"{}"{extra}}}"#,
            f.get("PK_A"),
            key.public(),
            root.display()
        );
        fs::write(&config, text).unwrap();
        let log = dir.join("agent.log");
        let logf = fs::File::create(&log).unwrap();
        let child = Command::new(bin())
            .args(["agent", "--no-seccomp", "--config"])
            .arg(&config)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(logf))
            .spawn()
            .unwrap();
        let a = Agent { child, port, log };
        wait_until("the agent to listen", PATIENCE, || {
            TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).ok().map(|_| ())
        });
        a
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One request on a fresh connection; the status code and the body.
    fn request(&mut self, req: &[u8]) -> (u16, String) {
        assert!(self.child.try_wait().unwrap().is_none(), "the agent exited\n{}", self.log());
        let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], self.port))).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.write_all(req).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        (status, body)
    }

    fn status(&mut self) -> String {
        let (code, body) = self.request(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(code, 200, "{body}");
        body
    }

    fn deploy(&mut self, key: &SecretKey, system: &str, narinfos: &[String]) {
        let body = render(HOST, Some(system), 1, Action::Switch, &[], narinfos).unwrap();
        let sig = sign(key, body.as_bytes());
        let head = format!(
            "POST /v1/deploy HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nNixless-Signature: {sig}\r\n\r\n",
            body.len()
        );
        let (code, resp) = self.request(&[head.as_bytes(), body.as_bytes()].concat());
        assert_eq!(code, 202, "{resp}");
    }

    fn wait_phase(&mut self, phase: &str) -> String {
        let want = format!("\"phase\":\"{phase}\"");
        wait_until(&format!("phase {phase}"), PATIENCE, || {
            let s = self.status();
            s.contains(&want).then_some(s)
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The narinfos of TOP's closure, as a deploy document carries them.
fn closure_narinfos(cache: &Path) -> Vec<String> {
    let f = fixtures();
    closure_of(f.get("TOP"))
        .iter()
        .map(|p| fs::read_to_string(cache.join(format!("{}.narinfo", hash_part(p)))).unwrap())
        .collect()
}

struct Removable(tempfile::TempDir);

impl Drop for Removable {
    fn drop(&mut self) {
        // Store paths are read-only.
        let _ = Command::new("chmod").args(["-R", "u+w"]).arg(self.0.path()).status();
    }
}

/// Eight NARs stream at once from one agent thread, status answers while
/// they do, and a document's narinfos save every narinfo round trip.
#[test]
fn status_answers_while_eight_nars_stream() {
    let f = fixtures();
    let cache_dir = f.path("CACHE_ZSTD");
    let cache = HoldingCache::start(&cache_dir);
    let tmp = Removable(tempfile::tempdir().unwrap());
    let key = SecretKey::generate("admin-1").unwrap();
    // Twelve connections: the engine keeps a quarter free of NARs (for
    // narinfos), so nine may carry NARs at once.
    let mut agent = Agent::start(tmp.0.path(), &cache.url(), &key, r#","connections_per_cache":12"#);
    agent.deploy(&key, f.get("TOP"), &closure_narinfos(&cache_dir));
    wait_until("eight NARs streaming at once", PATIENCE, || (cache.streaming() >= 8).then_some(()));
    for _ in 0..3 {
        let s = agent.status();
        assert!(s.contains("\"phase\":\"fetching\""), "{s}");
        assert!(cache.streaming() >= 8, "the streams ended before status was answered\n{}", agent.log());
    }
    cache.release();
    agent.wait_phase("switching");
    assert!(cache.peak.load(Ordering::SeqCst) >= 8);
    assert_eq!(cache.requests(".narinfo"), Vec::<String>::new(), "the document carried every narinfo");
    assert_store_sound(&tmp.0.path().join("root"), &cache_dir);
}

/// A narinfo in the document whose signature does not verify is never
/// used: the agent says so, asks the cache for that one path, and installs.
#[test]
fn a_bad_narinfo_in_the_document_is_not_trusted() {
    let f = fixtures();
    let cache_dir = f.path("CACHE_ZSTD");
    let cache = HoldingCache::start(&cache_dir);
    cache.release();
    let tmp = Removable(tempfile::tempdir().unwrap());
    let key = SecretKey::generate("admin-1").unwrap();
    let mut agent = Agent::start(tmp.0.path(), &cache.url(), &key, "");
    let top = f.get("TOP");
    let mut narinfos = closure_narinfos(&cache_dir);
    let i = closure_of(top).iter().position(|p| p == top).unwrap();
    // A different size under the same signature: the signature no longer verifies.
    let size = narinfos[i].lines().find_map(|l| l.strip_prefix("NarSize: ")).unwrap().to_owned();
    let bigger = (size.parse::<u64>().unwrap() + 8).to_string();
    narinfos[i] = narinfos[i].replace(&format!("NarSize: {size}"), &format!("NarSize: {bigger}"));
    agent.deploy(&key, top, &narinfos);
    agent.wait_phase("switching");
    assert_eq!(cache.requests(".narinfo"), vec![format!("/{}.narinfo", hash_part(top))]);
    assert!(agent.log().contains("narinfo supplied with the deploy"), "{}", agent.log());
    assert_store_sound(&tmp.0.path().join("root"), &cache_dir);
}

/// A commit's durability wait does not stall the loop: the closure's
/// `syncfs` runs in a child process, here held before the call by the test
/// gate (`NIXLESS_TEST_FLUSH_GATE`, a FIFO). While it is held the agent
/// answers status, and no path of the closure is in the store yet (nothing
/// is renamed before its contents are durable); let go, the deploy
/// completes. (On the old code the `syncfs` ran in the loop itself: no
/// child ever reaches the gate.)
#[test]
fn status_answers_while_the_commit_flushes() {
    let f = fixtures();
    let cache_dir = f.path("CACHE_ZSTD");
    let cache = HoldingCache::start(&cache_dir);
    cache.release();
    let tmp = Removable(tempfile::tempdir().unwrap());
    let gate = tmp.0.path().join("flush-gate");
    let c = std::ffi::CString::new(gate.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string; mkfifo only creates the node.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let key = SecretKey::generate("admin-1").unwrap();
    let mut agent = Agent::start_env(tmp.0.path(), &cache.url(), &key, "", &[("NIXLESS_TEST_FLUSH_GATE", &gate)]);
    let top = f.get("TOP");
    agent.deploy(&key, top, &closure_narinfos(&cache_dir));
    // A writer can open the FIFO without blocking once the child has it open for reading.
    let mut w = wait_until("the commit's flush to reach the gate", PATIENCE, || {
        fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(&gate).ok()
    });
    for _ in 0..3 {
        let s = agent.status();
        assert!(s.contains("\"phase\":\"fetching\""), "{s}");
    }
    let store = tmp.0.path().join("root/nix/store");
    for p in closure_of(top) {
        let base = Path::new(&p).file_name().unwrap();
        assert!(!store.join(base).exists(), "{p} is in the store before its contents were made durable");
    }
    // Later flushes (the renames') find a regular file there and pass.
    let open = tmp.0.path().join("flush-gate.open");
    fs::write(&open, b"x").unwrap();
    fs::rename(&open, &gate).unwrap();
    w.write_all(b"x").unwrap();
    drop(w);
    agent.wait_phase("switching");
    assert_store_sound(&tmp.0.path().join("root"), &cache_dir);
}
