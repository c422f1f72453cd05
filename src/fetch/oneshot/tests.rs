//! Against loopback servers (threads speaking HTTP/1.1 on real sockets).

use super::*;
use crate::auth::{Credentials, Sources};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    line: String,
    headers: Vec<String>,
    body: Vec<u8>,
}

enum Reply {
    Bytes(Vec<u8>),
    /// A head announcing `len` bytes and one byte every 100 ms (until the
    /// client goes away).
    Trickle(u64),
}

fn answer(status: &str, body: &str) -> Reply {
    Reply::Bytes(format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}", body.len()).into_bytes())
}

/// Serves connections (keep-alive) on loopback with `reply`; the requests seen.
fn serve(reply: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (log, reply) = (seen.clone(), Arc::new(reply));
    let count = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for c in listener.incoming() {
            let Ok(c) = c else { return };
            let (log, reply, count) = (log.clone(), reply.clone(), count.clone());
            std::thread::spawn(move || one_connection(c, &*reply, &log, &count));
        }
    });
    (base, seen)
}

fn one_connection(c: TcpStream, reply: &dyn Fn(&Seen, usize) -> Reply, log: &Mutex<Vec<Seen>>, n: &AtomicUsize) {
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut w = c;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut headers = Vec::new();
        let mut len = 0;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end().to_owned();
            if h.is_empty() {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
            headers.push(h);
        }
        let mut body = vec![0; len];
        std::io::Read::read_exact(&mut r, &mut body).unwrap();
        let seen = Seen { line: line.trim_end().to_owned(), headers, body };
        log.lock().unwrap().push(seen.clone());
        match reply(&seen, n.fetch_add(1, Ordering::SeqCst)) {
            Reply::Bytes(b) => {
                if w.write_all(&b).is_err() {
                    return;
                }
            }
            Reply::Trickle(len) => {
                let _ = w.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n{{").as_bytes());
                while w.write_all(b" ").is_ok() {
                    std::thread::sleep(Duration::from_millis(100));
                }
                return;
            }
        }
    }
}

fn opts() -> Options {
    Options { retries: 0, backoff: Duration::from_millis(20), ..Options::default() }
}

/// Turns (10 ms at most each) until `ticket` finishes; how many turns it took.
fn run(o: &mut Oneshot, ticket: Ticket) -> (Result<Done, FetchError>, u32) {
    let (mut all, turns) = run_all(o, &[ticket]);
    (all.remove(0), turns)
}

/// Turns until all of `tickets` finished: their results in that order.
fn run_all(o: &mut Oneshot, tickets: &[Ticket]) -> (Vec<Result<Done, FetchError>>, u32) {
    let start = Instant::now();
    let mut turns = 0;
    let mut got = BTreeMap::new();
    while got.len() < tickets.len() {
        while let Some((t, res)) = o.take_done() {
            got.insert(t, res);
        }
        if got.len() == tickets.len() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no result");
        o.turn(Duration::from_millis(10), &[]);
        turns += 1;
    }
    (tickets.iter().map(|t| got.remove(t).unwrap()).collect(), turns)
}

fn doc(res: Result<Done, FetchError>) -> Option<Vec<u8>> {
    match res {
        Ok(Done::Doc(d)) => d,
        other => panic!("{other:?}"),
    }
}

#[test]
fn documents_missing_refused_and_too_large() {
    let (base, _) = serve(|s, _| match s.line.split(' ').nth(1).unwrap() {
        "/doc.json?v=1" => answer("200 OK", "{\"seq\":1}"),
        "/big" => answer("200 OK", &"x".repeat(5000)),
        "/gone" => answer("410 Gone", "gone"),
        "/denied" => answer("403 Forbidden", "<Error><Code>AccessDenied</Code><Message>no</Message></Error>"),
        "/teapot" => answer("418 I'm a teapot", ""),
        _ => answer("404 Not Found", "no such thing"),
    });
    let mut o = Oneshot::new(opts());
    // All in flight at once, on one origin.
    let t: Vec<Ticket> = ["/doc.json?v=1#frag", "/missing", "/gone", "/big", "/denied", "/teapot"]
        .iter()
        .map(|p| o.get(&format!("{base}{p}"), 4096, true))
        .collect();
    let mut r = run_all(&mut o, &t).0.into_iter();
    assert_eq!(doc(r.next().unwrap()).unwrap(), b"{\"seq\":1}");
    assert_eq!(doc(r.next().unwrap()), None);
    assert_eq!(doc(r.next().unwrap()), None);
    let e = r.next().unwrap().unwrap_err();
    assert_eq!(e.to_string(), format!("GET {base}/big: larger than 4096 bytes"));
    let e = r.next().unwrap().unwrap_err();
    assert_eq!(e.to_string(), format!("{base}/denied: 403 Forbidden (AccessDenied)"));
    let e = r.next().unwrap().unwrap_err();
    assert_eq!(e.to_string(), format!("GET {base}/teapot: HTTP 418"));
    assert!(!o.busy());
}

#[test]
fn files_are_read_directly_within_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("d.json"), "doc").unwrap();
    let mut o = Oneshot::new(opts());
    let url = format!("file://{}/d.json", dir.path().display());
    let t = o.get(&url, 3, false);
    assert_eq!(doc(run(&mut o, t).0).unwrap(), b"doc");
    let t = o.get(&url, 2, false);
    assert!(matches!(run(&mut o, t).0, Err(FetchError::TooLarge { limit: 2, .. })));
    let t = o.get(&format!("file://{}/none", dir.path().display()), 3, false);
    assert_eq!(doc(run(&mut o, t).0), None);
}

/// 5xx and 429 are retried with backoff, within the deadline; a refused
/// connection too, until the retries run out.
#[test]
fn transient_failures_are_retried() {
    let (base, seen) = serve(|_, n| if n < 2 { answer("503 Busy", "later") } else { answer("200 OK", "ok") });
    let mut o = Oneshot::new(Options { retries: 2, ..opts() });
    let t = o.get(&format!("{base}/d"), 100, false);
    assert_eq!(doc(run(&mut o, t).0).unwrap(), b"ok");
    assert_eq!(seen.lock().unwrap().len(), 3);

    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/d", closed.local_addr().unwrap());
    drop(closed);
    let t = o.get(&url, 100, false);
    let e = run(&mut o, t).0.unwrap_err();
    assert!(matches!(&e, FetchError::Transport { .. }) && e.to_string().starts_with(&format!("GET {url}: ")), "{e}");
}

/// A body that trickles ends at the overall deadline, and the loop turns
/// all along (each turn returns: nothing blocks).
#[test]
fn a_trickling_body_ends_at_the_deadline_without_blocking_a_turn() {
    let (base, _) = serve(|_, _| Reply::Trickle(1000));
    let mut o = Oneshot::new(Options { small_fetch_deadline: Duration::from_millis(1500), ..opts() });
    let t = o.get(&format!("{base}/doc.json"), 1 << 20, true);
    let (res, turns) = run(&mut o, t);
    let e = res.unwrap_err();
    assert_eq!(e.to_string(), format!("GET {base}/doc.json: no complete answer within 1.5 s (overall deadline)"));
    assert!(turns >= 10, "{turns} turns");
    // Announcing 8 KiB earns a second more; the limit caps what counts.
    let (base, _) = serve(|_, _| Reply::Trickle(SLOW_LINK_BYTES_PER_SEC));
    let t = o.get(&format!("{base}/doc.json"), 1 << 20, true);
    assert!(run(&mut o, t).0.unwrap_err().to_string().contains("within 2.5 s"));
    let t = o.get(&format!("{base}/doc.json"), 100, true);
    assert!(run(&mut o, t).0.unwrap_err().to_string().contains("within 1.5 s"));
}

/// A PUT carries its body, type and credentials; any status is an
/// answer, an S3 refusal shown by its code.
#[test]
fn puts_send_their_body_and_read_the_answer() {
    let (base, seen) = serve(|s, _| match s.body.as_slice() {
        b"refuse" => answer(
            "403 Forbidden",
            "<?xml version=\"1.0\"?>\n<Error><Code>AccessDenied</Code><RequestId>4442587FB7D0A2F9</RequestId></Error>",
        ),
        b"bad" => answer("400 Bad Request", "text format parsing error in line 1"),
        b"oops" => answer("500 Internal Server Error", "oops!"),
        _ => answer("200 OK", ""),
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tok"), "T0KEN\n").unwrap();
    let src = Sources { bearer_token_files: vec![(base.clone(), dir.path().join("tok"))], ..Default::default() };
    let credentials = Arc::new(Credentials::load(&src, &|_| None).unwrap());
    let mut o = Oneshot::new(Options { credentials, ..opts() });
    let url = format!("{base}/metrics/job/nixless/host/h");
    let t = o.put(&url, "text/plain; version=0.0.4", b"a 1\n".to_vec());
    assert_eq!(run(&mut o, t).0.unwrap(), Done::Put(200, String::new()));
    let s = seen.lock().unwrap()[0].clone();
    assert_eq!(s.line, "PUT /metrics/job/nixless/host/h HTTP/1.1");
    assert_eq!(s.body, b"a 1\n");
    assert!(s.headers.contains(&"authorization: Bearer T0KEN".to_owned()), "{s:?}");
    assert!(s.headers.contains(&"Content-Type: text/plain; version=0.0.4".to_owned()), "{s:?}");
    let t = o.put(&url, "text/plain", b"refuse".to_vec());
    assert_eq!(run(&mut o, t).0.unwrap(), Done::Put(403, "AccessDenied".into()));
    let t = o.put(&url, "text/plain", b"bad".to_vec());
    assert_eq!(run(&mut o, t).0.unwrap(), Done::Put(400, "text format parsing error in line 1".into()));
    // A 5xx is an answer too, not retried: the gateway's words are kept.
    let t = o.put(&url, "text/plain", b"oops".to_vec());
    assert_eq!(run(&mut o, t).0.unwrap(), Done::Put(500, "oops!".into()));
    assert_eq!(seen.lock().unwrap().len(), 4);
}

/// A PUT is tried once: a gateway that is down is one error.
#[test]
fn a_put_is_tried_once() {
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/m", closed.local_addr().unwrap());
    drop(closed);
    let mut o = Oneshot::new(Options { retries: 3, ..opts() });
    let t = o.put(&url, "text/plain", Vec::new());
    let e = run(&mut o, t).0.unwrap_err();
    assert!(e.to_string().contains("connect"), "{e}");
}

/// An `s3://` document goes to its endpoint, signed, with the signed
/// Host the engine's own.
#[test]
fn s3_documents_are_signed_for_their_endpoint() {
    let (base, seen) = serve(|_, _| answer("200 OK", "doc"));
    let endpoint = base.trim_start_matches("http://");
    let env = |k: &str| match k {
        "AWS_ACCESS_KEY_ID" => Some("AKID".to_owned()),
        "AWS_SECRET_ACCESS_KEY" => Some("SECRET".to_owned()),
        _ => None,
    };
    let credentials = Arc::new(Credentials::load(&Sources::default(), &env).unwrap());
    let mut o = Oneshot::new(Options { credentials, ..opts() });
    let t = o.get(&format!("s3://bucket/dir/d.json?endpoint={endpoint}&scheme=http&region=r"), 100, true);
    assert_eq!(doc(run(&mut o, t).0).unwrap(), b"doc");
    let s = seen.lock().unwrap()[0].clone();
    assert_eq!(s.line, "GET /bucket/dir/d.json HTTP/1.1");
    assert!(s.headers.contains(&format!("Host: {endpoint}")), "{s:?}");
    assert!(s.headers.iter().any(|h| h.starts_with("authorization: AWS4-HMAC-SHA256 Credential=AKID/")), "{s:?}");
    // Without keys: one line saying so, nothing sent.
    let mut o = Oneshot::new(opts());
    let t = o.get(&format!("s3://bucket/d.json?endpoint={endpoint}&scheme=http"), 100, true);
    assert!(matches!(run(&mut o, t).0, Err(FetchError::Auth { .. })));
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[test]
fn urls_split_into_origin_and_target() {
    let (o, t) = split_url("https://h.example:8443?x=1").unwrap();
    assert_eq!((o.tls, o.host.as_str(), o.port, t.as_str()), (true, "h.example", 8443, "/?x=1"));
    assert_eq!(split_url("http://h/a/b/?q#f").unwrap().1, "/a/b/?q");
    assert_eq!(split_url("http://h").unwrap().1, "/");
    assert!(split_url("http://u@h/").is_err() && split_url("ftp://h/").is_err() && split_url("h/x").is_err());
}

/// A GET follows redirects (absolute, path-absolute and relative ones, as
/// ureq did for the agent's documents), up to [`MAX_REDIRECTS`]; a loop
/// ends as the redirect's status.
#[test]
fn redirects_are_followed_a_few_times() {
    let (base, seen) = serve(|s, _| {
        let to = |l: &str| {
            Reply::Bytes(format!("HTTP/1.1 302 Found\r\nLocation: {l}\r\nContent-Length: 3\r\n\r\nmoo").into_bytes())
        };
        match s.line.split(' ').nth(1).unwrap() {
            "/a/doc.json" => to("/b/doc.json"),
            "/b/doc.json" => to("c.json"),
            "/b/c.json" => answer("200 OK", "here"),
            "/loop" => to("/loop"),
            _ => answer("404 Not Found", ""),
        }
    });
    let mut o = Oneshot::new(opts());
    let t = o.get(&format!("{base}/a/doc.json"), 100, true);
    assert_eq!(doc(run(&mut o, t).0).unwrap(), b"here");
    let t = o.get(&format!("{base}/loop"), 100, true);
    let e = run(&mut o, t).0.unwrap_err();
    assert_eq!(e.to_string(), format!("GET {base}/loop: HTTP 302"));
    let loops = seen.lock().unwrap().iter().filter(|s| s.line.contains("/loop")).count();
    assert_eq!(loops, 1 + MAX_REDIRECTS as usize);
}

#[test]
fn locations_resolve_against_the_url() {
    assert_eq!(resolve("http://h:1/a/b?q", "c").unwrap(), "http://h:1/a/c");
    assert_eq!(resolve("http://h:1/a/b", "/c?d").unwrap(), "http://h:1/c?d");
    assert_eq!(resolve("http://h:1", "c").unwrap(), "http://h:1/c");
    assert_eq!(resolve("https://h/a", "//g/x").unwrap(), "https://g/x");
    assert_eq!(resolve("https://h/a", "http://g/x").unwrap(), "http://g/x");
    assert_eq!(resolve("https://h/a", "file:///etc/passwd"), None);
}
