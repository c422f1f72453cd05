//! Many HTTP/1.1 requests in flight from one thread: one `poll(2)` round at
//! a time over up to N keep-alive connections per origin, non-blocking
//! connects, TLS through rustls (sans-IO too), per-request deadlines.
//!
//! The engine never blocks except in `poll` (bounded by the caller's wait).
//! Names are looked up by [`super::resolve`] (the `hosts` file, then UDP
//! queries polled with the connections), once per origin and engine. It
//! never calls back into its caller's loop: [`Engine::turn`] runs
//! one round and returns, delivering what arrived to a [`Handler`]; the
//! caller then does its own work (ticks, timers, new requests) and turns
//! again. A loop that polls for another engine too takes this one's
//! descriptors from [`Engine::interest`] and turns it without waiting.
//! Requests are GETs, or PUTs with a body ([`Engine::submit_put`]).
//!
//! Scheduling: a request goes to an idle connection of its origin, else a
//! new one (up to `conns_per_origin`), else it is pipelined behind the
//! shortest queue (up to `pipeline` deep). Urgent requests (narinfos) are
//! placed before the others. When a connection ends (the server closes it,
//! `Connection: close`, an error), the requests queued behind the failed
//! one were not answered and go back to the pending queue (a few times at
//! most); the failed one is reported to the handler, which decides about
//! retries.

use super::http1::{self, ClientConn, Event, Head, ProtoError};
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::fd::{AsFd, BorrowedFd};
use rustix::io::Errno;
use rustix::net::{AddressFamily, SocketFlags, SocketType};
use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bulk requests in flight on one connection: on a long round trip, small
/// NARs are latency-bound (requests in flight per RTT), big ones bandwidth-bound.
const BULK_DEPTH: usize = 8;
/// Bytes read from one connection per round before the others get a turn.
const READ_PER_TURN: usize = 256 << 10;
const READ_BUF: usize = 64 << 10;
/// How often an unanswered request goes back to the queue because its
/// connection closed under it, before that counts as its failure.
const MAX_REQUEUES: u8 = 4;

/// Where requests go: scheme, host and port of a cache URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub tls: bool,
    /// Host name or address, without brackets.
    pub host: String,
    pub port: u16,
    /// The `Host` field: the URL's authority.
    pub authority: String,
}

impl Origin {
    /// Splits `http(s)://authority/prefix` into the origin and the path
    /// prefix (`""` or `/…` without a trailing slash).
    pub fn parse(url: &str) -> Result<(Origin, String), String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("{url:?}: expected http:// or https://"));
        };
        let (authority, prefix) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let bad = || format!("{url:?}: bad host or port");
        if authority.is_empty() || authority.contains('@') {
            return Err(bad());
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(bad)?;
            (h, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port = match port {
            Some(p) => p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad)?,
            None if tls => 443,
            None => 80,
        };
        if host.is_empty() || host.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(bad());
        }
        let prefix = prefix.trim_end_matches('/').to_owned();
        Ok((Origin { tls, host: host.to_owned(), port, authority: authority.to_owned() }, prefix))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetError {
    Resolve(String),
    Connect(String),
    Tls(String),
    Proto(ProtoError),
    Io(String),
    /// Nothing arrived for this long while a response was due.
    Silent(Duration),
    Connecting(Duration),
    /// The request's own deadline passed.
    Deadline,
    BadRequest(http1::BadRequest),
    /// The handler asked to stop this response.
    Stopped,
}

impl std::fmt::Display for NetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetError::Resolve(e) => write!(f, "name lookup failed: {e}"),
            NetError::Connect(e) => write!(f, "connect failed: {e}"),
            NetError::Tls(e) => write!(f, "TLS: {e}"),
            NetError::Proto(e) => e.fmt(f),
            NetError::Io(e) => write!(f, "connection error: {e}"),
            NetError::Silent(d) => write!(f, "no data for {} s", d.as_secs_f32()),
            NetError::Connecting(d) => write!(f, "connect timed out after {} s", d.as_secs_f32()),
            NetError::Deadline => write!(f, "no complete answer before the deadline"),
            NetError::BadRequest(e) => e.fmt(f),
            NetError::Stopped => write!(f, "stopped"),
        }
    }
}

impl std::error::Error for NetError {}

/// What the engine tells its caller; body bytes are only valid during the call.
pub trait Handler {
    /// A response head arrived; `false` stops the response (its connection closes).
    fn head(&mut self, id: ReqId, head: &Head) -> bool;
    /// Body bytes; `false` stops the response.
    fn data(&mut self, id: ReqId, bytes: &[u8]) -> bool;
    /// The request is over: its response complete, or why not.
    fn done(&mut self, id: ReqId, result: Result<(), NetError>);
}

pub type ReqId = u64;

#[derive(Debug, Clone)]
pub struct Config {
    /// Connections per origin, 1..=64.
    pub conns_per_origin: usize,
    /// Urgent (small) requests in flight on one connection, 1..=32 (1: no
    /// pipelining); bulk ones pipeline at most [`BULK_DEPTH`] deep.
    pub pipeline: usize,
    pub connect_timeout: Duration,
    /// Longest silence while a response is due.
    pub read_timeout: Duration,
    /// The authorities `https://` origins are checked against.
    pub trust: super::tls::Trust,
    /// Where names are looked up.
    pub resolver: super::resolve::Files,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            conns_per_origin: 8,
            pipeline: 16,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            trust: super::tls::Trust::WebPki,
            resolver: super::resolve::Files::default(),
        }
    }
}

struct OriginState {
    origin: Origin,
    addrs: Option<Vec<SocketAddr>>,
    /// The name lookup in progress.
    lookup: Option<super::resolve::Lookup>,
    /// The lookup failed: requests dispatched in this turn fail with it
    /// (a later request starts a new lookup).
    lookup_failed: Option<String>,
    /// It answered `Connection: close` (or HTTP/1.0): one request per connection.
    closes: bool,
}

struct Req {
    origin: usize,
    target: String,
    /// Extra header fields (credentials), sent as given.
    headers: Vec<(String, String)>,
    range_from: u64,
    /// A PUT's content type and body (`None`: a GET).
    put: Option<(String, Vec<u8>)>,
    deadline: Option<Instant>,
    urgent: bool,
    conn: Option<usize>,
    requeues: u8,
}

#[derive(PartialEq, Eq)]
enum Phase {
    Connecting { addr: usize, since: Instant },
    Open,
}

struct Conn {
    origin: usize,
    sock: TcpStream,
    phase: Phase,
    tls: Option<Box<rustls::ClientConnection>>,
    proto: ClientConn,
    /// Plaintext received, not yet parsed (at most a head and a read).
    inbuf: Vec<u8>,
    /// Plaintext requests not yet handed to the socket (or to rustls).
    out: Vec<u8>,
    queue: VecDeque<ReqId>,
    /// How many requests in `queue` are not urgent.
    bulk: usize,
    last_io: Instant,
    served: u32,
}

pub struct Engine {
    cfg: Config,
    origins: Vec<OriginState>,
    conns: Vec<Option<Conn>>,
    reqs: BTreeMap<ReqId, Req>,
    pending: VecDeque<ReqId>,
    next_id: ReqId,
    tls: Option<Arc<rustls::ClientConfig>>,
    rbuf: Vec<u8>,
}

impl Engine {
    pub fn new(mut cfg: Config) -> Engine {
        cfg.conns_per_origin = cfg.conns_per_origin.clamp(1, 64);
        cfg.pipeline = cfg.pipeline.clamp(1, 32);
        Engine {
            cfg,
            origins: Vec::new(),
            conns: Vec::new(),
            reqs: BTreeMap::new(),
            pending: VecDeque::new(),
            next_id: 1,
            tls: None,
            rbuf: vec![0; READ_BUF],
        }
    }

    pub fn add_origin(&mut self, origin: Origin) -> usize {
        self.origins.push(OriginState { origin, addrs: None, lookup: None, lookup_failed: None, closes: false });
        self.origins.len() - 1
    }

    /// Queues a GET of `target` (a path) on `origin`, with extra header
    /// fields `headers` (checked when sent); bytes from `range_from` on.
    #[allow(clippy::too_many_arguments)]
    pub fn submit(
        &mut self,
        origin: usize,
        target: String,
        headers: Vec<(String, String)>,
        range_from: u64,
        deadline: Option<Instant>,
        urgent: bool,
    ) -> ReqId {
        let id = self.next_id;
        self.next_id += 1;
        let req = Req { origin, target, headers, range_from, put: None, deadline, urgent, conn: None, requeues: 0 };
        self.reqs.insert(id, req);
        self.enqueue(id, urgent, false);
        id
    }

    /// Queues a PUT of `body` (a `content_type`) to `target` on `origin`,
    /// placed as an urgent request. Like a GET it is sent again if its
    /// connection closes before any answer (PUT is idempotent).
    pub fn submit_put(
        &mut self,
        origin: usize,
        target: String,
        headers: Vec<(String, String)>,
        (content_type, body): (String, Vec<u8>),
        deadline: Option<Instant>,
    ) -> ReqId {
        let id = self.next_id;
        self.next_id += 1;
        let put = Some((content_type, body));
        let req = Req { origin, target, headers, range_from: 0, put, deadline, urgent: true, conn: None, requeues: 0 };
        self.reqs.insert(id, req);
        self.enqueue(id, true, false);
        id
    }

    /// Moves request `id`'s deadline (a document whose announced length
    /// earns it more time); nothing if it is over.
    pub fn set_deadline(&mut self, id: ReqId, deadline: Option<Instant>) {
        if let Some(r) = self.reqs.get_mut(&id) {
            r.deadline = deadline;
        }
    }

    /// The origin already added with `origin`'s scheme, host and port, or
    /// a new one: callers with many one-off URLs reuse connections and
    /// name lookups by it.
    pub fn origin_for(&mut self, origin: Origin) -> usize {
        match self.origins.iter().position(|o| o.origin == origin) {
            Some(i) => i,
            None => self.add_origin(origin),
        }
    }

    fn enqueue(&mut self, id: ReqId, urgent: bool, front: bool) {
        if front || urgent {
            // Urgent ones go before every non-urgent one, in order among themselves.
            let at = if front { 0 } else { self.pending.iter().take_while(|p| self.reqs[p].urgent).count() };
            self.pending.insert(at, id);
        } else {
            self.pending.push_back(id);
        }
    }

    /// The `Host` field of `origin`'s requests.
    pub fn authority(&self, origin: usize) -> &str {
        &self.origins[origin].origin.authority
    }

    /// Requests submitted and not yet done.
    pub fn in_flight(&self) -> usize {
        self.reqs.len()
    }

    /// Connections open or opening (for tests and stats).
    pub fn connections(&self) -> usize {
        self.conns.iter().flatten().count()
    }

    /// One round: place pending requests, send, wait up to `max_wait` for
    /// the sockets (less if a deadline comes sooner), read what arrived and
    /// hand it to `h`, enforce deadlines.
    pub fn turn(&mut self, h: &mut dyn Handler, max_wait: Duration) {
        self.turn_with(h, max_wait, &[]);
    }

    /// [`Engine::turn`] whose one `poll(2)` also waits on the caller's
    /// descriptors `extra` (an event loop's own sockets, with the events it
    /// wants): whether any of them is ready. The caller then serves them
    /// without blocking.
    pub fn turn_with(
        &mut self,
        h: &mut dyn Handler,
        max_wait: Duration,
        extra: &[(BorrowedFd<'_>, PollFlags)],
    ) -> bool {
        self.dispatch(h);
        for slot in 0..self.conns.len() {
            if self.is_open(slot) {
                self.flush(slot, h);
            }
        }
        let wait = self.next_deadline().map_or(max_wait, |d| max_wait.min(d.saturating_duration_since(Instant::now())));
        let (ready, extra_ready) = self.wait(wait, extra);
        for (slot, flags) in ready {
            if self.conns[slot].is_none() {
                continue;
            }
            if !self.is_open(slot) {
                self.finish_connect(slot, h);
                continue;
            }
            if flags.intersects(PollFlags::IN | PollFlags::ERR | PollFlags::HUP) {
                self.read(slot, h);
            }
            if self.conns[slot].is_some() && flags.contains(PollFlags::OUT) {
                self.flush(slot, h);
            }
        }
        self.advance_lookups();
        self.enforce_deadlines(h);
        extra_ready
    }

    /// Reads what the lookups received (cheap when nothing did), sends
    /// again when due; a finished lookup gives its origin addresses (the
    /// next round connects) or an error its requests get.
    fn advance_lookups(&mut self) {
        let now = Instant::now();
        for o in &mut self.origins {
            let Some(l) = &mut o.lookup else { continue };
            l.advance(now);
            match l.take_result() {
                None => {}
                Some(Ok(addrs)) => {
                    o.addrs = Some(addrs);
                    o.lookup = None;
                }
                Some(Err(e)) => {
                    o.lookup_failed = Some(e);
                    o.lookup = None;
                }
            }
        }
    }

    fn is_open(&self, slot: usize) -> bool {
        self.conns[slot].as_ref().is_some_and(|c| c.phase == Phase::Open)
    }

    fn next_deadline(&self) -> Option<Instant> {
        let reqs = self.reqs.values().filter_map(|r| r.deadline);
        let conns = self.conns.iter().flatten().filter_map(|c| match c.phase {
            Phase::Connecting { since, .. } => Some(since + self.cfg.connect_timeout),
            Phase::Open if !c.queue.is_empty() => Some(c.last_io + self.cfg.read_timeout),
            Phase::Open => None,
        });
        let lookups = self.origins.iter().filter_map(|o| o.lookup.as_ref().and_then(|l| l.next_wakeup()));
        reqs.chain(conns).chain(lookups).min()
    }

    /// What another loop's `poll(2)` must wait on for this engine: its
    /// sockets and lookups with the events each wants, and by when it must
    /// turn at the latest (now, with requests not placed yet). That loop
    /// then calls [`Engine::turn`] with no wait when any is ready or due.
    pub fn interest(&self) -> (Vec<(BorrowedFd<'_>, PollFlags)>, Option<Instant>) {
        let conns = self.conns.iter().flatten().map(|c| (c.sock.as_fd(), conn_flags(c)));
        let lookups = self.origins.iter().filter_map(|o| o.lookup.as_ref()).flat_map(|l| l.fds());
        let fds = conns.chain(lookups.map(|fd| (fd, PollFlags::IN))).collect();
        let due = if self.pending.is_empty() { self.next_deadline() } else { Some(Instant::now()) };
        (fds, due)
    }

    fn wait(&mut self, wait: Duration, extra: &[(BorrowedFd<'_>, PollFlags)]) -> (Vec<(usize, PollFlags)>, bool) {
        let mut slots = Vec::new();
        let mut fds = Vec::new();
        for (slot, c) in self.conns.iter().enumerate() {
            let Some(c) = c else { continue };
            slots.push(slot);
            fds.push(PollFd::new(&c.sock, conn_flags(c)));
        }
        for o in &self.origins {
            if let Some(l) = &o.lookup {
                fds.extend(l.fds().map(|fd| PollFd::from_borrowed_fd(fd, PollFlags::IN)));
            }
        }
        let lookup_fds = fds.len() - slots.len();
        let ours = fds.len();
        fds.extend(extra.iter().map(|(fd, flags)| PollFd::from_borrowed_fd(*fd, *flags)));
        if fds.is_empty() {
            // Nothing to wait on: the caller's own timers are what is next.
            if !wait.is_zero() && self.pending.is_empty() {
                std::thread::sleep(wait.min(Duration::from_millis(50)));
            }
            return (Vec::new(), false);
        }
        let ts = Timespec::try_from(wait).ok();
        match rustix::event::poll(&mut fds, ts.as_ref()) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => log::warn!("poll: {e}"),
        }
        let extra_ready = fds[ours..].iter().any(|f| !f.revents().is_empty());
        let ready = slots
            .into_iter()
            .zip(fds[..ours - lookup_fds].iter().map(|f| f.revents()))
            .filter(|(_, r)| !r.is_empty())
            .collect();
        (ready, extra_ready)
    }

    fn dispatch(&mut self, h: &mut dyn Handler) {
        let mut i = 0;
        while i < self.pending.len() {
            let id = self.pending[i];
            let (origin, urgent) = (self.reqs[&id].origin, self.reqs[&id].urgent);
            match self.pick_conn(origin, urgent) {
                Ok(Some(slot)) => {
                    self.pending.remove(i);
                    self.assign(slot, id, h);
                }
                Ok(None) => i += 1,
                Err(e) => {
                    self.pending.remove(i);
                    self.reqs.remove(&id);
                    h.done(id, Err(e));
                }
            }
        }
        for o in &mut self.origins {
            o.lookup_failed = None;
        }
    }

    /// Where a request goes. Urgent ones: an idle connection, else a new
    /// one, else pipelined behind the shortest queue that holds no bulk
    /// request (a narinfo must not wait behind a NAR: it is on the critical
    /// path; small answers pipeline deep). Bulk ones: an idle or new
    /// connection while bulk holds fewer than 3/4 of them (the rest stay
    /// free for the urgent), else pipelined up to [`BULK_DEPTH`] deep behind
    /// the shortest bulk queue (small NARs cost a round trip each, so many
    /// must be in flight). `None`: wait.
    fn pick_conn(&mut self, origin: usize, urgent: bool) -> Result<Option<usize>, NetError> {
        let n = self.cfg.conns_per_origin;
        // A quarter of the connections (at least one) stay free of bulk.
        let max_bulk = if n > 1 { n - (n / 4).max(1) } else { 1 };
        let depth = if self.origins[origin].closes { 1 } else { self.cfg.pipeline };
        let (mut count, mut bulk_conns) = (0, 0);
        let mut idle = None;
        let mut free_best: Option<(usize, usize)> = None;
        let mut bulk_best: Option<(usize, usize)> = None;
        let mut any_best: Option<(usize, usize)> = None;
        for (slot, c) in self.conns.iter().enumerate() {
            let Some(c) = c else { continue };
            if c.origin != origin || c.proto.is_dead() {
                continue;
            }
            count += 1;
            let load = c.queue.len();
            let better = |b: Option<(usize, usize)>| b.is_none_or(|(_, l)| load < l);
            if load == 0 && idle.is_none() {
                idle = Some(slot);
            }
            if better(any_best) {
                any_best = Some((slot, load));
            }
            if c.bulk > 0 {
                bulk_conns += 1;
                if better(bulk_best) {
                    bulk_best = Some((slot, load));
                }
            } else if better(free_best) {
                free_best = Some((slot, load));
            }
        }
        if urgent {
            if idle.is_some() {
                return Ok(idle);
            }
            if count < n {
                return self.open(origin);
            }
            let shared = if n == 1 { any_best } else { free_best };
            return Ok(shared.filter(|(_, l)| *l < depth).map(|(s, _)| s));
        }
        if bulk_conns < max_bulk {
            if idle.is_some() {
                return Ok(idle);
            }
            if count < n {
                return self.open(origin);
            }
        }
        Ok(bulk_best.filter(|(_, l)| *l < depth.min(BULK_DEPTH)).map(|(s, _)| s))
    }

    /// A new connection to `origin`; `None` while its name is looked up.
    fn open(&mut self, origin: usize) -> Result<Option<usize>, NetError> {
        let st = &mut self.origins[origin];
        if let Some(e) = &st.lookup_failed {
            return Err(NetError::Resolve(e.clone()));
        }
        if st.addrs.is_none() {
            if st.lookup.is_none() {
                let l =
                    super::resolve::Lookup::start(&st.origin.host, st.origin.port, &self.cfg.resolver, Instant::now());
                st.lookup = Some(l);
            }
            let Some(l) = st.lookup.as_mut() else { return Ok(None) };
            match l.take_result() {
                None => return Ok(None),
                Some(Ok(addrs)) => {
                    st.addrs = Some(addrs);
                    st.lookup = None;
                }
                Some(Err(e)) => {
                    st.lookup = None;
                    st.lookup_failed = Some(e.clone());
                    return Err(NetError::Resolve(e));
                }
            }
        }
        let addrs = st.addrs.clone().unwrap_or_default();
        let mut last = NetError::Connect("no address".into());
        for (i, addr) in addrs.iter().enumerate() {
            match start_connect(*addr) {
                Ok(sock) => {
                    let conn = Conn {
                        origin,
                        sock,
                        phase: Phase::Connecting { addr: i, since: Instant::now() },
                        tls: None,
                        proto: ClientConn::new(),
                        inbuf: Vec::new(),
                        out: Vec::new(),
                        queue: VecDeque::new(),
                        bulk: 0,
                        last_io: Instant::now(),
                        served: 0,
                    };
                    let slot = match self.conns.iter().position(Option::is_none) {
                        Some(s) => s,
                        None => {
                            self.conns.push(None);
                            self.conns.len() - 1
                        }
                    };
                    self.conns[slot] = Some(conn);
                    return Ok(Some(slot));
                }
                Err(e) => last = NetError::Connect(format!("{addr}: {e}")),
            }
        }
        Err(last)
    }

    fn assign(&mut self, slot: usize, id: ReqId, h: &mut dyn Handler) {
        let req = self.reqs.get_mut(&id).expect("pending request");
        let c = self.conns[slot].as_mut().expect("picked connection");
        let authority = &self.origins[req.origin].origin.authority;
        let written = match &req.put {
            None => http1::write_get(&mut c.out, authority, &req.target, req.range_from, &req.headers),
            Some((ctype, body)) => http1::write_put(&mut c.out, authority, &req.target, ctype, body, &req.headers),
        };
        if let Err(e) = written {
            self.reqs.remove(&id);
            h.done(id, Err(NetError::BadRequest(e)));
            return;
        }
        req.conn = Some(slot);
        c.proto.sent();
        if c.queue.is_empty() {
            // The silence clock starts with the first request in flight.
            c.last_io = Instant::now();
        }
        c.queue.push_back(id);
        c.bulk += usize::from(!req.urgent);
    }

    fn finish_connect(&mut self, slot: usize, h: &mut dyn Handler) {
        let c = self.conns[slot].as_mut().expect("live");
        let Phase::Connecting { addr, .. } = c.phase else { return };
        match rustix::net::sockopt::socket_error(&c.sock) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return self.retry_connect(slot, addr, e.to_string(), h),
            Err(e) => return self.retry_connect(slot, addr, e.to_string(), h),
        }
        let _ = c.sock.set_nodelay(true);
        c.phase = Phase::Open;
        c.last_io = Instant::now();
        let origin = &self.origins[c.origin].origin;
        if origin.tls {
            let config = self.tls.get_or_insert_with(|| super::tls::client_config(&self.cfg.trust)).clone();
            let tls = rustls::pki_types::ServerName::try_from(origin.host.clone())
                .map_err(|e| NetError::Tls(e.to_string()))
                .and_then(|name| rustls::ClientConnection::new(config, name).map_err(|e| NetError::Tls(e.to_string())));
            match tls {
                Ok(t) => c.tls = Some(Box::new(t)),
                Err(e) => return self.close(slot, Some(e), h),
            }
        }
        self.flush(slot, h);
    }

    /// The connect to address `addr` failed: the next address, or the end.
    fn retry_connect(&mut self, slot: usize, addr: usize, why: String, h: &mut dyn Handler) {
        let c = self.conns[slot].as_mut().expect("live");
        let addrs = self.origins[c.origin].addrs.clone().unwrap_or_default();
        let failed = addrs.get(addr).map_or_else(String::new, |a| format!("{a}: "));
        for (i, a) in addrs.iter().enumerate().skip(addr + 1) {
            if let Ok(sock) = start_connect(*a) {
                c.sock = sock;
                c.phase = Phase::Connecting { addr: i, since: Instant::now() };
                return;
            }
        }
        self.close(slot, Some(NetError::Connect(format!("{failed}{why}"))), h);
    }

    /// Sends what is queued; for TLS, also whatever rustls wants to send.
    fn flush(&mut self, slot: usize, h: &mut dyn Handler) {
        let c = self.conns[slot].as_mut().expect("live");
        let result = match &mut c.tls {
            None => write_some(&c.sock, &mut c.out),
            Some(tls) => {
                let mut r = Ok(());
                if !c.out.is_empty() {
                    // rustls holds plaintext until the handshake is done.
                    r = tls.writer().write_all(&c.out).map_err(|e| e.to_string());
                    c.out.clear();
                }
                while r.is_ok() && tls.wants_write() {
                    match tls.write_tls(&mut &c.sock) {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => r = Err(e.to_string()),
                    }
                }
                r
            }
        };
        if let Err(e) = result {
            self.close(slot, Some(NetError::Io(e)), h);
        }
    }

    fn read(&mut self, slot: usize, h: &mut dyn Handler) {
        let mut total = 0;
        while total < READ_PER_TURN {
            let Some(c) = self.conns[slot].as_mut() else { return };
            let n = match (&c.sock).read(&mut self.rbuf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.close(slot, Some(NetError::Io(e.to_string())), h),
            };
            total += n;
            c.last_io = Instant::now();
            let mut eof = n == 0;
            match &mut c.tls {
                None => c.inbuf.extend_from_slice(&self.rbuf[..n]),
                Some(tls) => match tls_in(tls, &self.rbuf[..n], &mut c.inbuf) {
                    Ok(closed) => eof |= closed,
                    Err(e) => {
                        let _ = tls.write_tls(&mut &c.sock);
                        return self.close(slot, Some(NetError::Tls(e)), h);
                    }
                },
            }
            self.parse(slot, h);
            if eof {
                return self.eof(slot, h);
            }
            if self.conns[slot].as_ref().is_some_and(|c| c.tls.as_ref().is_some_and(|t| t.wants_write())) {
                self.flush(slot, h);
            }
        }
    }

    /// Hands what the connection received to the handler, response by response.
    fn parse(&mut self, slot: usize, h: &mut dyn Handler) {
        let Some(c) = self.conns[slot].as_mut() else { return };
        let input = std::mem::take(&mut c.inbuf);
        let mut at = 0;
        let mut stop: Option<Option<NetError>> = None;
        loop {
            let c = self.conns[slot].as_mut().expect("live");
            let front = c.queue.front().copied();
            let (used, ev) = match c.proto.feed(&input[at..]) {
                Ok(x) => x,
                Err(e) => {
                    stop = Some(Some(NetError::Proto(e)));
                    break;
                }
            };
            at += used;
            let Some(ev) = ev else {
                if used == 0 {
                    break;
                }
                continue;
            };
            let Some(id) = front else {
                stop = Some(Some(NetError::Proto(ProtoError::Unsolicited)));
                break;
            };
            match ev {
                Event::Head(head) => {
                    if !h.head(id, &head) {
                        stop = Some(Some(NetError::Stopped));
                        break;
                    }
                }
                Event::Data(d) => {
                    if !h.data(id, d) {
                        stop = Some(Some(NetError::Stopped));
                        break;
                    }
                }
                Event::End { keep_alive } => {
                    c.queue.pop_front();
                    c.bulk -= usize::from(self.reqs.get(&id).is_some_and(|r| !r.urgent));
                    c.served += 1;
                    c.last_io = Instant::now();
                    self.reqs.remove(&id);
                    h.done(id, Ok(()));
                    if !keep_alive {
                        let origin = c.origin;
                        self.origins[origin].closes = true;
                        stop = Some(None);
                        break;
                    }
                }
            }
        }
        match stop {
            Some(err) => self.close(slot, err, h),
            None => {
                let c = self.conns[slot].as_mut().expect("live");
                c.inbuf = input;
                c.inbuf.drain(..at);
            }
        }
    }

    fn eof(&mut self, slot: usize, h: &mut dyn Handler) {
        let Some(c) = self.conns[slot].as_mut() else { return };
        match c.proto.eof() {
            Ok(Some(Event::End { .. })) => {
                if let Some(id) = c.queue.pop_front() {
                    self.reqs.remove(&id);
                    h.done(id, Ok(()));
                }
                self.close(slot, None, h);
            }
            Ok(_) => self.close(slot, None, h),
            Err(e) => self.close(slot, Some(NetError::Proto(e)), h),
        }
    }

    /// Closes a connection. The front request fails with `err` if it had
    /// started to be answered (or the error is not about the connection
    /// closing); the rest were not answered and are queued again.
    fn close(&mut self, slot: usize, err: Option<NetError>, h: &mut dyn Handler) {
        let Some(c) = self.conns[slot].take() else { return };
        let answered = c.proto.in_body();
        let reused = c.served > 0;
        let benign = matches!(err, Some(NetError::Proto(ProtoError::Truncated { in_body: false })) | None);
        for (i, id) in c.queue.into_iter().enumerate() {
            let Some(req) = self.reqs.get_mut(&id) else { continue };
            req.conn = None;
            let fail_now = i == 0 && err.is_some() && (answered || !(benign && reused));
            if fail_now || req.requeues >= MAX_REQUEUES {
                self.reqs.remove(&id);
                let e = err.clone().unwrap_or(NetError::Proto(ProtoError::Truncated { in_body: false }));
                h.done(id, Err(e));
            } else {
                // A clean close (Connection: close) costs the unanswered nothing.
                if err.is_some() {
                    req.requeues += 1;
                }
                let urgent = req.urgent;
                self.enqueue(id, urgent, true);
            }
        }
    }

    fn enforce_deadlines(&mut self, h: &mut dyn Handler) {
        let now = Instant::now();
        for slot in 0..self.conns.len() {
            let Some(c) = &self.conns[slot] else { continue };
            match c.phase {
                Phase::Connecting { since, addr } if now >= since + self.cfg.connect_timeout => {
                    let why = NetError::Connecting(self.cfg.connect_timeout).to_string();
                    self.retry_connect(slot, addr, why, h);
                }
                Phase::Open if !c.queue.is_empty() && now >= c.last_io + self.cfg.read_timeout => {
                    self.close(slot, Some(NetError::Silent(self.cfg.read_timeout)), h);
                }
                _ => {}
            }
        }
        let late: Vec<ReqId> =
            self.reqs.iter().filter(|(_, r)| r.deadline.is_some_and(|d| now >= d)).map(|(id, _)| *id).collect();
        for id in late {
            let Some(req) = self.reqs.get(&id) else { continue };
            match req.conn {
                Some(slot) => {
                    // A request cannot be taken back from a connection: close
                    // it, failing this one first; the others go back to the queue.
                    if let Some(c) = self.conns[slot].as_mut() {
                        c.queue.retain(|q| *q != id);
                        c.queue.push_front(id);
                    }
                    self.close(slot, Some(NetError::Deadline), h);
                    if self.reqs.remove(&id).is_some() {
                        h.done(id, Err(NetError::Deadline));
                    }
                }
                None => {
                    self.pending.retain(|p| *p != id);
                    self.reqs.remove(&id);
                    h.done(id, Err(NetError::Deadline));
                }
            }
        }
    }
}

/// The events a connection waits for: writable while connecting or with
/// bytes to send (TLS's own included), readable once open.
fn conn_flags(c: &Conn) -> PollFlags {
    match c.phase {
        Phase::Connecting { .. } => PollFlags::OUT,
        Phase::Open if !c.out.is_empty() || c.tls.as_ref().is_some_and(|t| t.wants_write()) => {
            PollFlags::IN | PollFlags::OUT
        }
        Phase::Open => PollFlags::IN,
    }
}

/// A non-blocking connect, in progress.
fn start_connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let family = if addr.is_ipv4() { AddressFamily::INET } else { AddressFamily::INET6 };
    let fd = rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC, None)?;
    match rustix::net::connect(&fd, &addr) {
        Ok(()) | Err(Errno::INPROGRESS) | Err(Errno::INTR) => Ok(TcpStream::from(fd)),
        Err(e) => Err(e.into()),
    }
}

/// Writes as much of `out` as the socket takes now.
fn write_some(sock: &TcpStream, out: &mut Vec<u8>) -> Result<(), String> {
    let mut sent = 0;
    while sent < out.len() {
        match (&*sock).write(&out[sent..]) {
            Ok(0) => return Err("connection closed while sending".into()),
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    out.drain(..sent);
    Ok(())
}

/// Feeds TLS records to rustls and appends the plaintext to `inbuf`;
/// whether the peer closed the TLS session.
fn tls_in(tls: &mut rustls::ClientConnection, mut bytes: &[u8], inbuf: &mut Vec<u8>) -> Result<bool, String> {
    let mut closed = false;
    loop {
        if !bytes.is_empty() {
            tls.read_tls(&mut bytes).map_err(|e| e.to_string())?;
        }
        tls.process_new_packets().map_err(|e| e.to_string())?;
        let mut plain = [0u8; 16 << 10];
        loop {
            match tls.reader().read(&mut plain) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => inbuf.extend_from_slice(&plain[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // A close without close_notify: the HTTP framing decides
                // whether the response was complete.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    closed = true;
                    break;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        if bytes.is_empty() || closed {
            return Ok(closed);
        }
    }
}

#[cfg(test)]
mod tests;
