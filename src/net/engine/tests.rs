//! The engine against real sockets on loopback: servers that answer out of
//! order, slowly, cut bodies, close, or stay silent.

use super::*;
use std::collections::HashMap;
use std::io::BufReader;
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

/// What a test server does with one request.
enum Reply {
    /// A 200 with this body, after waiting for the go signal if any.
    Body(Vec<u8>),
    /// Waits until told to answer (so answers come out of order).
    Held(Vec<u8>, mpsc::Receiver<()>),
    /// Announces `len` bytes, sends `sent`, closes.
    Cut {
        len: usize,
        sent: usize,
    },
    Status(u16),
    Silent,
}

/// A server thread per connection; `reply` maps a request path to a reply.
/// Returns the port and the count of connections accepted.
fn serve(reply: impl Fn(&str) -> Reply + Send + Sync + 'static, close_after_each: bool) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let conns = Arc::new(AtomicUsize::new(0));
    let count = conns.clone();
    let reply = Arc::new(reply);
    std::thread::spawn(move || {
        for conn in listener.incoming().take(1000) {
            let Ok(mut conn) = conn else { return };
            count.fetch_add(1, Ordering::SeqCst);
            let reply = reply.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                loop {
                    let Some(path) = crate::net::testutil::read_request_target(&mut reader) else { return };
                    let close = if close_after_each { "Connection: close\r\n" } else { "" };
                    let body = match reply(&path) {
                        Reply::Body(b) => b,
                        Reply::Held(b, go) => {
                            let _ = go.recv();
                            b
                        }
                        Reply::Cut { len, sent } => {
                            let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n");
                            let _ = conn.write_all(&vec![b'x'; sent]);
                            return;
                        }
                        Reply::Status(s) => {
                            let _ = write!(conn, "HTTP/1.1 {s} X\r\nContent-Length: 0\r\n{close}\r\n");
                            continue;
                        }
                        Reply::Silent => {
                            std::thread::sleep(Duration::from_secs(30));
                            return;
                        }
                    };
                    let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{close}\r\n", body.len());
                    let _ = conn.write_all(&body);
                    if close_after_each {
                        return;
                    }
                }
            });
        }
    });
    (port, conns)
}

/// Collects what the engine reports, per request.
#[derive(Default)]
struct Collect {
    status: HashMap<ReqId, u16>,
    bodies: HashMap<ReqId, Vec<u8>>,
    done: HashMap<ReqId, Result<(), NetError>>,
    order: Vec<ReqId>,
}

impl Handler for Collect {
    fn head(&mut self, id: ReqId, head: &Head) -> bool {
        self.status.insert(id, head.status);
        true
    }
    fn data(&mut self, id: ReqId, bytes: &[u8]) -> bool {
        self.bodies.entry(id).or_default().extend_from_slice(bytes);
        true
    }
    fn done(&mut self, id: ReqId, result: Result<(), NetError>) {
        assert!(self.done.insert(id, result).is_none(), "request {id} done twice");
        self.order.push(id);
    }
}

fn origin(port: u16) -> Origin {
    Origin::parse(&format!("http://127.0.0.1:{port}")).unwrap().0
}

/// Turns until every request is done or `limit` passes (a bound, not a timing).
fn run_until_done(e: &mut Engine, h: &mut Collect, ids: &[ReqId], limit: Duration) {
    let start = Instant::now();
    while ids.iter().any(|id| !h.done.contains_key(id)) {
        assert!(start.elapsed() < limit, "not done within {limit:?}: {} left", e.in_flight());
        e.turn(h, Duration::from_millis(50));
    }
}

fn body_for(path: &str) -> Vec<u8> {
    path.repeat(1 + path.len() * 37 % 5000).into_bytes()
}

#[test]
fn origins_parse() {
    let (o, p) = Origin::parse("https://cache.example/sub/dir/").unwrap();
    assert_eq!(
        (o.tls, o.host.as_str(), o.port, o.authority.as_str(), p.as_str()),
        (true, "cache.example", 443, "cache.example", "/sub/dir")
    );
    let (o, p) = Origin::parse("http://[::1]:8080").unwrap();
    assert_eq!((o.host.as_str(), o.port, o.authority.as_str(), p.as_str()), ("::1", 8080, "[::1]:8080", ""));
    for bad in ["ftp://x", "http://", "http://h:0", "http://h:99999", "http://u@h/", "http://h:x/", "http://[::1/"] {
        assert!(Origin::parse(bad).is_err(), "{bad}");
    }
}

/// Requests spread over connections, some answered only after later ones:
/// every body reaches its own request, and the work used several connections.
#[test]
fn out_of_order_answers_on_many_connections_reach_their_requests() {
    let (tx, rx) = mpsc::channel::<mpsc::Receiver<()>>();
    let rx = std::sync::Mutex::new(rx);
    let (port, conns) = serve(
        move |path| {
            if path.starts_with("/held") {
                Reply::Held(body_for(path), rx.lock().unwrap().recv().unwrap())
            } else {
                Reply::Body(body_for(path))
            }
        },
        false,
    );
    let mut gates = Vec::new();
    for _ in 0..3 {
        let (go, wait) = mpsc::channel();
        tx.send(wait).unwrap();
        gates.push(go);
    }
    let mut e = Engine::new(Config { conns_per_origin: 4, pipeline: 4, ..Config::default() });
    let o = e.add_origin(origin(port));
    let mut h = Collect::default();
    let mut paths = HashMap::new();
    let mut ids = Vec::new();
    for i in 0..3 {
        let p = format!("/held/{i}");
        let id = e.submit(o, p.clone(), Vec::new(), 0, None, true);
        paths.insert(id, p);
        ids.push(id);
    }
    for i in 0..40 {
        let p = format!("/n/{i}");
        let id = e.submit(o, p.clone(), Vec::new(), 0, None, i % 2 == 0);
        paths.insert(id, p);
        ids.push(id);
    }
    // Everything not behind a held one completes first.
    let free: Vec<ReqId> = ids[3..].to_vec();
    let start = Instant::now();
    while free.iter().filter(|id| h.done.contains_key(id)).count() < 20 {
        assert!(start.elapsed() < Duration::from_secs(20));
        e.turn(&mut h, Duration::from_millis(50));
    }
    assert!(ids[..3].iter().all(|id| !h.done.contains_key(id)), "a held request finished before its release");
    for go in gates.into_iter().rev() {
        go.send(()).unwrap();
    }
    run_until_done(&mut e, &mut h, &ids, Duration::from_secs(20));
    for id in &ids {
        assert_eq!(h.done[id], Ok(()), "{}", paths[id]);
        assert_eq!(h.status[id], 200);
        assert_eq!(h.bodies[id], body_for(&paths[id]), "{}", paths[id]);
    }
    let used = conns.load(Ordering::SeqCst);
    assert!((2..=4).contains(&used), "{used} connections");
    assert_eq!(e.in_flight(), 0);
}

/// A body cut short fails that request only; the others, pipelined behind
/// it or on other connections, still complete.
#[test]
fn a_connection_dropped_mid_body_fails_only_its_request() {
    let (port, _) = serve(
        |path| if path == "/cut" { Reply::Cut { len: 100_000, sent: 5000 } } else { Reply::Body(body_for(path)) },
        false,
    );
    let mut e = Engine::new(Config { conns_per_origin: 2, pipeline: 4, ..Config::default() });
    let o = e.add_origin(origin(port));
    let mut h = Collect::default();
    let cut = e.submit(o, "/cut".into(), Vec::new(), 0, None, false);
    let others: Vec<ReqId> = (0..12).map(|i| e.submit(o, format!("/ok/{i}"), Vec::new(), 0, None, false)).collect();
    let mut all = others.clone();
    all.push(cut);
    run_until_done(&mut e, &mut h, &all, Duration::from_secs(20));
    assert_eq!(h.done[&cut], Err(NetError::Proto(ProtoError::Truncated { in_body: true })));
    assert_eq!(h.bodies[&cut].len(), 5000);
    for (i, id) in others.iter().enumerate() {
        assert_eq!(h.done[id], Ok(()), "/ok/{i}");
        assert_eq!(h.bodies[id], body_for(&format!("/ok/{i}")));
    }
}

/// A server that closes after every response: pipelined requests go back
/// to the queue and all complete; then no more pipelining to it.
#[test]
fn a_server_closing_after_each_response_still_serves_all() {
    let (port, conns) = serve(|path| Reply::Body(body_for(path)), true);
    let mut e = Engine::new(Config { conns_per_origin: 2, pipeline: 8, ..Config::default() });
    let o = e.add_origin(origin(port));
    let mut h = Collect::default();
    let ids: Vec<ReqId> = (0..30).map(|i| e.submit(o, format!("/c/{i}"), Vec::new(), 0, None, false)).collect();
    run_until_done(&mut e, &mut h, &ids, Duration::from_secs(20));
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(h.done[id], Ok(()));
        assert_eq!(h.bodies[id], body_for(&format!("/c/{i}")));
    }
    assert!(conns.load(Ordering::SeqCst) >= 30);
}

#[test]
fn statuses_deadlines_and_refusals_are_reported() {
    let (port, _) = serve(
        |path| match path {
            "/404" => Reply::Status(404),
            "/500" => Reply::Status(500),
            "/silent" => Reply::Silent,
            p => Reply::Body(body_for(p)),
        },
        false,
    );
    let mut e = Engine::new(Config::default());
    let o = e.add_origin(origin(port));
    let mut h = Collect::default();
    let missing = e.submit(o, "/404".into(), Vec::new(), 0, None, true);
    let failing = e.submit(o, "/500".into(), Vec::new(), 0, None, true);
    let silent = e.submit(o, "/silent".into(), Vec::new(), 0, Some(Instant::now() + Duration::from_millis(300)), true);
    let injected = e.submit(o, "/a\r\nX: y".into(), Vec::new(), 0, None, true);
    run_until_done(&mut e, &mut h, &[missing, failing, silent, injected], Duration::from_secs(10));
    assert_eq!((h.status[&missing], &h.done[&missing]), (404, &Ok(())));
    assert_eq!((h.status[&failing], &h.done[&failing]), (500, &Ok(())));
    assert_eq!(h.done[&silent], Err(NetError::Deadline));
    assert!(matches!(h.done[&injected], Err(NetError::BadRequest(_))));

    // Nothing listens there.
    let free = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let o2 = e.add_origin(origin(free));
    let refused = e.submit(o2, "/x".into(), Vec::new(), 0, None, false);
    run_until_done(&mut e, &mut h, &[refused], Duration::from_secs(10));
    assert!(matches!(&h.done[&refused], Err(NetError::Connect(m)) if m.contains("refused")), "{:?}", h.done[&refused]);
}

/// Read silence is bounded too, without any per-request deadline.
#[test]
fn a_silent_connection_times_out() {
    let (port, _) = serve(|_| Reply::Silent, false);
    let mut e = Engine::new(Config { read_timeout: Duration::from_millis(300), ..Config::default() });
    let o = e.add_origin(origin(port));
    let mut h = Collect::default();
    let id = e.submit(o, "/x".into(), Vec::new(), 0, None, false);
    run_until_done(&mut e, &mut h, &[id], Duration::from_secs(10));
    assert_eq!(h.done[&id], Err(NetError::Silent(Duration::from_millis(300))));
    assert_eq!(e.connections(), 0);
}

/// An https origin whose server speaks garbage: a TLS error, not a hang or panic.
#[test]
fn tls_to_a_garbage_server_fails_cleanly() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Ok((mut c, _)) = listener.accept() {
            let _ = c.write_all(b"HTTP/1.1 400 This is not TLS\r\n\r\n");
            std::thread::sleep(Duration::from_secs(2));
        }
    });
    let mut e = Engine::new(Config::default());
    let o = e.add_origin(Origin::parse(&format!("https://localhost:{port}")).unwrap().0);
    let mut h = Collect::default();
    let id = e.submit(o, "/x".into(), Vec::new(), 0, None, false);
    run_until_done(&mut e, &mut h, &[id], Duration::from_secs(10));
    assert!(matches!(&h.done[&id], Err(NetError::Tls(_))), "{:?}", h.done[&id]);
}

/// Issue 11: the agent's loop waits in the engine's one `poll(2)`, which
/// must also wake for the loop's own sockets (the HTTP server's) while a
/// response is still outstanding. Without them in the poll set the turn
/// would sleep its whole wait and report nothing ready.
#[test]
fn a_turn_also_wakes_for_the_callers_descriptors() {
    use rustix::fd::AsFd;
    use std::os::unix::net::UnixStream;
    let (port, _) = serve(|_| Reply::Silent, false);
    let mut e = Engine::new(Config { read_timeout: Duration::from_secs(120), ..Config::default() });
    let o = e.add_origin(origin(port));
    let mut h = Collect::default();
    let id = e.submit(o, "/silent".into(), Vec::new(), 0, None, false);
    let (ours, peer) = UnixStream::pair().unwrap();
    // Nothing ready on ours yet: the request goes out, nothing is reported.
    while e.connections() == 0 {
        assert!(!e.turn_with(&mut h, Duration::from_millis(10), &[(ours.as_fd(), PollFlags::IN)]));
    }
    (&peer).write_all(b"x").unwrap();
    let ready = e.turn_with(&mut h, Duration::from_secs(60), &[(ours.as_fd(), PollFlags::IN)]);
    assert!(ready, "the caller's descriptor was ready");
    assert!(!h.done.contains_key(&id), "the request is still outstanding");
    assert_eq!(e.in_flight(), 1);
}

/// Another loop's poll waits on what [`Engine::interest`] names: a request
/// not placed yet makes the engine due now; a connecting socket wants to
/// write; once the request is out and unanswered, the socket wants to read
/// and the silence deadline is when the engine is due. Polling those and
/// turning without a wait delivers the answer.
#[test]
fn interest_names_what_another_loop_must_poll() {
    let (port, _) = serve(|_| Reply::Status(204), false);
    let mut e = Engine::new(Config { read_timeout: Duration::from_secs(120), ..Config::default() });
    let o = e.add_origin(origin(port));
    assert_eq!(e.origin_for(origin(port)), o, "one origin per scheme, host and port");
    let mut h = Collect::default();
    let id = e.submit(o, "/x".into(), Vec::new(), 0, None, false);
    let (fds, due) = e.interest();
    assert!(fds.is_empty() && due.is_some_and(|d| d <= Instant::now()), "pending: due now");
    e.turn(&mut h, Duration::ZERO);
    let start = Instant::now();
    while !h.done.contains_key(&id) {
        assert!(start.elapsed() < Duration::from_secs(10));
        let (fds, due) = e.interest();
        assert_eq!(fds.len(), 1, "the one connection");
        assert!(due.is_some_and(|d| d > Instant::now() + Duration::from_secs(60)), "the silence deadline");
        let mut pfds: Vec<PollFd> = fds.iter().map(|(fd, f)| PollFd::from_borrowed_fd(*fd, *f)).collect();
        rustix::event::poll(&mut pfds, None).unwrap();
        drop(pfds);
        drop(fds);
        e.turn(&mut h, Duration::ZERO);
    }
    assert_eq!(h.status[&id], 204);
    assert_eq!(e.interest().1, None, "idle: nothing due");
}

/// A resolver configuration in `dir`: `resolv.conf` naming 127.0.0.1 (on
/// `port`), and `hosts`.
fn resolver(dir: &std::path::Path, options: &str, hosts: &str, port: u16) -> crate::net::resolve::Files {
    std::fs::write(dir.join("resolv.conf"), format!("nameserver 127.0.0.1\n{options}\n")).unwrap();
    std::fs::write(dir.join("hosts"), hosts).unwrap();
    crate::net::resolve::Files { resolv_conf: dir.join("resolv.conf"), hosts: dir.join("hosts"), port }
}

/// A nameserver thread: A queries get 127.0.0.1, AAAA queries NXDOMAIN;
/// returns its port and how many queries it answered.
fn nameserver() -> (u16, Arc<AtomicUsize>) {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = sock.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let answered = count.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        for _ in 0..100 {
            let Ok((n, from)) = sock.recv_from(&mut buf) else { return };
            let mut r = buf[..n].to_vec();
            let qtype = u16::from_be_bytes([r[n - 4], r[n - 3]]);
            r[2] = 0x81;
            r[3] = 0x80;
            if qtype == crate::net::dns::TYPE_A {
                r[7] = 1;
                r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 1]);
            } else {
                r[3] = 0x83;
            }
            let _ = sock.send_to(&r, from);
            answered.fetch_add(1, Ordering::SeqCst);
        }
    });
    (port, count)
}

/// Names are looked up without blocking: from the hosts file, and from a
/// nameserver polled with the connections; the name is asked for once per
/// origin, however many requests wait for it.
#[test]
fn names_resolve_from_hosts_and_from_a_nameserver() {
    let (http, _) = serve(|p| Reply::Body(body_for(p)), false);
    let dir = tempfile::tempdir().unwrap();
    let (dns, queries) = nameserver();
    let files = resolver(dir.path(), "options timeout:30 attempts:1", "127.0.0.1 pinned.nixless.test\n", dns);
    let mut e = Engine::new(Config { resolver: files, ..Config::default() });
    let pinned = e.add_origin(Origin::parse(&format!("http://pinned.nixless.test:{http}")).unwrap().0);
    let asked = e.add_origin(Origin::parse(&format!("http://cache.nixless.test:{http}")).unwrap().0);
    let mut h = Collect::default();
    let ids: Vec<ReqId> = (0..6)
        .map(|i| e.submit(if i % 2 == 0 { pinned } else { asked }, format!("/n{i}"), Vec::new(), 0, None, i < 2))
        .collect();
    run_until_done(&mut e, &mut h, &ids, Duration::from_secs(20));
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(h.done[id], Ok(()), "request {i}");
        assert_eq!(h.bodies[id], body_for(&format!("/n{i}")));
    }
    assert_eq!(queries.load(Ordering::SeqCst), 2, "one A and one AAAA query for the one name asked for");
}

/// A nameserver that never answers: the requests of its origin fail with
/// one line when the lookup's deadline passes, no turn waits for it, and
/// the other origin is served meanwhile.
#[test]
fn a_silent_nameserver_fails_its_origin_and_stalls_no_turn() {
    let (http, _) = serve(|p| Reply::Body(body_for(p)), false);
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let files = resolver(
        dir.path(),
        "options timeout:3 attempts:2",
        "127.0.0.1 pinned.nixless.test\n",
        silent.local_addr().unwrap().port(),
    );
    let mut e = Engine::new(Config { resolver: files, ..Config::default() });
    let lost = e.add_origin(Origin::parse(&format!("http://lost.nixless.test:{http}")).unwrap().0);
    let pinned = e.add_origin(Origin::parse(&format!("http://pinned.nixless.test:{http}")).unwrap().0);
    let mut h = Collect::default();
    let a = e.submit(lost, "/a".into(), Vec::new(), 0, None, true);
    let b = e.submit(lost, "/b".into(), Vec::new(), 0, None, false);
    let c = e.submit(pinned, "/c".into(), Vec::new(), 0, None, false);
    run_until_done(&mut e, &mut h, &[a, b, c], Duration::from_secs(20));
    // A lookup that blocked would hold the dispatch of `a` until its end,
    // and `c` after it; here `c` is served while the name is asked for.
    let pos = |id| h.order.iter().position(|x| *x == id).unwrap();
    assert!(pos(c) < pos(a) && pos(c) < pos(b), "order {:?}", h.order);
    assert_eq!(h.done[&c], Ok(()));
    let port = silent.local_addr().unwrap().port();
    for id in [a, b] {
        let want = format!("name lookup failed: lost.nixless.test: no answer from 127.0.0.1:{port} within 3 s");
        assert_eq!(h.done[&id].as_ref().unwrap_err().to_string(), want);
    }
    let mut buf = [0u8; 512];
    silent.set_nonblocking(true).unwrap();
    let mut sent = 0;
    while silent.recv_from(&mut buf).is_ok() {
        sent += 1;
    }
    // A and AAAA, sent again at half the timeout (attempts:2) unless the
    // loop only came back after the deadline: never more.
    assert!(sent == 2 || sent == 4, "{sent} queries");
}
