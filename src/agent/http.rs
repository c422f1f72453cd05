//! A minimal HTTP/1.1 server for the single-threaded agent.
//!
//! The endpoint is reachable by anyone on the network, so everything here is built to
//! refuse hostile input cheaply: the request head is capped at `max_header_bytes`, the
//! body at `max_body_bytes` (checked against `Content-Length` before a single body byte
//! is read), a whole request must arrive within `request_timeout`, and at most
//! [`MAX_ACCEPT_PER_ROUND`] connections are accepted per [`Server::poll`] round so a
//! connection flood cannot starve the rest of the agent loop.
//!
//! Memory and the front door, whatever strangers send:
//! - No body byte is read before [`Handler::head`] has seen the complete head and let
//!   it through (the agent checks path, method and that the signature header names a
//!   trusted key there). A refused request is answered at once; its body is drained
//!   and discarded (lingering close, bounded), never buffered.
//! - Bodies being received share one budget (`body_budget`, counted by their announced
//!   `Content-Length`): a request that would exceed it gets `503` before its body is read.
//! - At most `max_connections` connections are *active* (not yet answered); at most
//!   `max_connections_per_peer` of them from one peer address. A connection that has been
//!   answered and is only lingering does not count (they have their own cap). When a new
//!   connection finds its peer's share or the table full, the oldest connection that has
//!   not yet sent a complete head (its peer's own first, then anyone's) is closed with a
//!   canned `503` to make room, so idle or trickling clients cannot lock out a client that
//!   sends its request; only when every active connection is past its head is the new one
//!   refused with the canned `503`. Finished connections are reaped before accepting.
//!
//! There are no threads and no async runtime: listeners and connections are
//! non-blocking and [`Server::poll`] waits on all of them with `poll(2)`, then does every
//! bit of non-blocking work available and returns. One request per connection; every
//! response carries `Connection: close`.
//!
//! Protocol choices:
//! - Only HTTP/1.0 and HTTP/1.1 (`httparse` refuses anything else → `400`).
//! - Bodies only via `Content-Length`. Any `Transfer-Encoding` is refused with `501`
//!   (chunked is not implemented; send `Content-Length`). Invalid or conflicting
//!   `Content-Length` values → `400`; too large → `413` straight after the head.
//! - `Expect: 100-continue` (HTTP/1.1 only) is honoured: `100 Continue` is sent only once
//!   the announced length has been accepted, so a client that waits is never made to
//!   upload a body we would refuse. Any other expectation → `417`.
//! - Bytes after the first complete request (pipelining) are ignored; the connection is
//!   closed after the response. To avoid turning unread input into a TCP reset that could
//!   destroy the response in flight, a finished connection shuts down its write side and
//!   then briefly drains (and discards) input until the peer closes ("lingering close";
//!   bounded in time and bytes).

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::net::{self as rnet, AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

/// Maximum number of request headers (`httparse` header slots).
pub const MAX_HEADERS: usize = 32;
/// Maximum number of connections accepted (including those refused with `503`) per round.
pub const MAX_ACCEPT_PER_ROUND: usize = 64;
/// Maximum bytes read from one connection per round, so one fast client can't hog a round.
const MAX_READ_PER_ROUND: usize = 256 * 1024;
/// Upper bound on how long a finished connection is drained before it is closed.
const LINGER_TIME: Duration = Duration::from_secs(2);
/// Upper bound on how many bytes a finished connection may make us drain.
const LINGER_MAX_BYTES: usize = 1024 * 1024;
/// How long to stop accepting after running out of file descriptors / memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
const LISTEN_BACKLOG: i32 = 128;
const SCRATCH_BYTES: usize = 16 * 1024;

/// Canned answer for connections over `max_connections`: no parsing, no allocation.
const BUSY_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
Content-Type: application/json\r\n\
Content-Length: 23\r\n\
Connection: close\r\n\
Retry-After: 1\r\n\
\r\n\
{\"error\":\"server busy\"}";

const CONTINUE_RESPONSE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Resource limits; see the module documentation.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Request line plus headers, including the terminating empty line.
    pub max_header_bytes: usize,
    /// Largest accepted `Content-Length`.
    pub max_body_bytes: usize,
    /// The whole request must arrive within this time from accept; a response must be
    /// fully written within this time from being queued.
    pub request_timeout: Duration,
    /// Active (not yet answered) connections at once; see the module documentation.
    pub max_connections: usize,
    /// Active connections from one peer address.
    pub max_connections_per_peer: usize,
    /// Announced body bytes of all requests being received, together.
    pub body_budget: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 8192,
            max_body_bytes: 4 * 1024 * 1024,
            request_timeout: Duration::from_secs(10),
            max_connections: 32,
            max_connections_per_peer: 8,
            body_budget: 8 * 1024 * 1024,
        }
    }
}

/// The application's side of the server.
pub trait Handler {
    /// Sees each request once its head is complete and valid, before a single body byte
    /// (`body_len` announced) is read or buffered; `Err` answers it at once. The default
    /// lets everything through.
    fn head(&mut self, req: &Request, body_len: usize) -> Result<(), Response> {
        let _ = (req, body_len);
        Ok(())
    }

    /// Answers a complete request.
    fn request(&mut self, req: &Request) -> Response;
}

impl<F: FnMut(&Request) -> Response> Handler for F {
    fn request(&mut self, req: &Request) -> Response {
        self(req)
    }
}

/// A complete request, as handed to the handler.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Request path without the query (origin form; absolute-form targets are reduced to
    /// their path). `*` for `OPTIONS *`.
    pub path: String,
    /// Everything after the first `?`, if there was one (not decoded).
    pub query: Option<String>,
    /// Header names lowercased, values raw, in arrival order.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub peer: SocketAddr,
}

impl Request {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_slice())
    }
}

/// A response to queue. `Content-Length` and `Connection: close` are always added by the
/// server; extra `headers` with invalid names/values or naming `Content-Length`,
/// `Transfer-Encoding` or `Connection` are dropped (with a warning).
#[derive(Debug, Clone)]
pub struct Response {
    /// Final status, 200..=599 (anything else is sent as 500).
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Response {
    pub fn json(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Response { status, content_type: "application/json", body: body.into(), headers: Vec::new() }
    }

    pub fn text(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Response { status, content_type: "text/plain; charset=utf-8", body: body.into(), headers: Vec::new() }
    }

    /// `{"error": msg}` ([`crate::api::Error`]).
    pub fn error(status: u16, msg: &str) -> Self {
        Response::json_of(status, &crate::api::Error { error: msg.to_owned(), seq: None })
    }

    /// `v` as a JSON body; one past [`crate::json::MAX_OUTPUT`] is a 500
    /// saying so.
    pub fn json_of<T: serde::Serialize>(status: u16, v: &T) -> Self {
        match crate::json::to_string(v) {
            Ok(body) => Response::json(status, body),
            Err(e) => Response::text(500, e.to_string()),
        }
    }

    /// Serializes status line, headers and (unless `head_only`) the body.
    fn serialize(&self, head_only: bool) -> Vec<u8> {
        let status = if (200..=599).contains(&self.status) {
            self.status
        } else {
            log::warn!("http: handler returned invalid status {}; sending 500", self.status);
            500
        };
        let content_type = if valid_header_value(self.content_type) {
            self.content_type
        } else {
            log::warn!("http: invalid content type dropped");
            "application/octet-stream"
        };
        let body_len = if head_only { 0 } else { self.body.len() };
        let mut out = Vec::with_capacity(160 + body_len);
        // Writing into a Vec cannot fail.
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            status,
            reason(status),
            content_type,
            self.body.len()
        );
        for (name, value) in &self.headers {
            let framing =
                ["content-length", "transfer-encoding", "connection"].iter().any(|f| name.eq_ignore_ascii_case(f));
            if framing || !valid_header_name(name) || !valid_header_value(value) {
                log::warn!("http: response header {name:?} dropped");
                continue;
            }
            let _ = write!(out, "{name}: {value}\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// The server: listeners plus the open connections.
pub struct Server {
    listeners: Vec<TcpListener>,
    conns: Vec<Conn>,
    limits: Limits,
    accept_paused_until: Option<Instant>,
    scratch: Vec<u8>,
}

impl Server {
    /// Binds one listener per address (`SO_REUSEADDR`; IPv6 sockets are `IPV6_V6ONLY`, so
    /// `[::]` and `0.0.0.0` can be bound side by side). All sockets are non-blocking and
    /// close-on-exec.
    pub fn bind(addrs: &[SocketAddr], limits: Limits) -> io::Result<Server> {
        if addrs.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "http: no listen address given"));
        }
        let mut listeners = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let listener =
                bind_one(addr).map_err(|e| io::Error::new(e.kind(), format!("http: listen on {addr}: {e}")))?;
            listeners.push(listener);
        }
        Ok(Server { listeners, conns: Vec::new(), limits, accept_paused_until: None, scratch: vec![0; SCRATCH_BYTES] })
    }

    /// The bound addresses (useful after binding port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    /// All file descriptors (listeners first, then connections), for callers that want to
    /// wait in their own `poll` and then call [`Server::poll`] with `Duration::ZERO`.
    /// Note that connections also have deadlines, so such a caller should not sleep for
    /// long without calling [`Server::poll`].
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        self.listeners.iter().map(|l| l.as_fd()).chain(self.conns.iter().map(|c| c.stream.as_fd())).collect()
    }

    /// What [`Server::poll`] would wait on, for a caller that waits in its
    /// own `poll(2)` (with other sockets) and then calls
    /// [`Server::poll`] with `Duration::ZERO`: the descriptors with the
    /// events wanted, and `timeout` shortened to the nearest deadline.
    pub fn interest(&self, timeout: Duration) -> (Vec<(BorrowedFd<'_>, PollFlags)>, Duration) {
        let now = Instant::now();
        let accepting = self.accept_paused_until.is_none_or(|t| now >= t);
        let listeners = self.listeners.iter().filter(|_| accepting).map(|l| (l.as_fd(), PollFlags::IN));
        let conns = self.conns.iter().map(|c| (c.stream.as_fd(), c.interest()));
        (listeners.chain(conns).collect(), self.wait_time(timeout, now))
    }

    /// Number of open connections (including those finishing their response).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Connections not yet answered (what `max_connections` bounds).
    pub fn active_count(&self) -> usize {
        self.conns.iter().filter(|c| c.active()).count()
    }

    /// Announced body bytes of the requests being received.
    fn body_reserved(&self) -> usize {
        self.conns.iter().map(Conn::body_reserved).fold(0usize, usize::saturating_add)
    }

    /// Waits up to `timeout` (`Duration::ZERO` = don't block; the wait is shortened to the
    /// nearest connection deadline) for activity on the listeners and connections, then
    /// does every bit of non-blocking work available: accept new connections, read, parse,
    /// time out, write queued responses, close finished connections. For each complete
    /// request it calls `handler` once and queues the response. Returns after one round.
    ///
    /// Errors on individual connections are logged at debug level and the connection is
    /// dropped; only errors of `poll(2)` itself or fatal listener errors are returned.
    pub fn poll(&mut self, timeout: Duration, handler: &mut dyn Handler) -> io::Result<()> {
        let now = Instant::now();
        let wait = self.wait_time(timeout, now);
        let accepting = self.accept_paused_until.is_none_or(|t| now >= t);
        {
            let mut fds = Vec::with_capacity(self.listeners.len() + self.conns.len());
            if accepting {
                fds.extend(self.listeners.iter().map(|l| PollFd::new(l, PollFlags::IN)));
            }
            fds.extend(self.conns.iter().map(|c| PollFd::new(&c.stream, c.interest())));
            // A wait too long for a timespec means "forever".
            let ts = Timespec::try_from(wait).ok();
            match rustix::event::poll(&mut fds, ts.as_ref()) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }

        let now = Instant::now();
        // Reap first, so answered and closed connections make room for new ones.
        self.step_from(0, now, handler);
        self.accept_new(now, handler)
    }

    /// Steps the connections from index `first` on, dropping the finished ones.
    fn step_from(&mut self, first: usize, now: Instant, handler: &mut dyn Handler) {
        let mut reserved = self.body_reserved();
        let limits = &self.limits;
        let scratch = &mut self.scratch;
        let mut i = first;
        while i < self.conns.len() {
            if self.conns[i].step(now, limits, &mut *handler, scratch, &mut reserved) {
                i += 1;
            } else {
                self.conns.remove(i);
            }
        }
    }

    fn wait_time(&self, timeout: Duration, now: Instant) -> Duration {
        let mut wait = timeout;
        if let Some(t) = self.accept_paused_until {
            wait = wait.min(t.saturating_duration_since(now));
        }
        for c in &self.conns {
            if let Some(d) = c.deadline() {
                wait = wait.min(d.saturating_duration_since(now));
            }
        }
        wait
    }

    fn accept_new(&mut self, now: Instant, handler: &mut dyn Handler) -> io::Result<()> {
        if let Some(t) = self.accept_paused_until {
            if now < t {
                return Ok(());
            }
            self.accept_paused_until = None;
        }
        let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
        let mut attempts = 0;
        for li in 0..self.listeners.len() {
            while attempts < MAX_ACCEPT_PER_ROUND {
                attempts += 1;
                match rnet::acceptfrom_with(&self.listeners[li], flags) {
                    Ok((fd, peer)) => {
                        let peer = peer
                            .and_then(|p| SocketAddr::try_from(p).ok())
                            .unwrap_or(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)));
                        if !make_room(&mut self.conns, peer.ip(), &self.limits) {
                            log::debug!("http: {peer}: every connection is past its head; refusing with 503");
                            reject_busy(fd);
                            continue;
                        }
                        self.conns.push(Conn {
                            stream: TcpStream::from(fd),
                            peer,
                            request_deadline: now.checked_add(self.limits.request_timeout),
                            state: State::Head { buf: Vec::new(), newline_seen: false },
                        });
                        // Read it at once: a client that sent its request with the connect
                        // is past its head before the next arrival could evict it.
                        self.step_from(self.conns.len() - 1, now, handler);
                    }
                    Err(Errno::AGAIN) => break,
                    Err(Errno::INTR) => {}
                    Err(e @ (Errno::MFILE | Errno::NFILE | Errno::NOBUFS | Errno::NOMEM)) => {
                        log::warn!("http: accept: {e}; pausing accepts");
                        self.accept_paused_until = now.checked_add(ACCEPT_BACKOFF);
                        return Ok(());
                    }
                    Err(e @ (Errno::BADF | Errno::INVAL | Errno::NOTSOCK | Errno::FAULT)) => {
                        return Err(io::Error::new(io::Error::from(e).kind(), format!("http: accept: {e}")));
                    }
                    // Errors belonging to the connection being accepted (ECONNABORTED, ...).
                    Err(e) => log::debug!("http: accept: {e}"),
                }
            }
            if attempts >= MAX_ACCEPT_PER_ROUND {
                break;
            }
        }
        Ok(())
    }
}

/// Makes room for one more connection from `ip`: closes the oldest connection that
/// has not sent a complete head (from `ip` first if it is at its share, else anyone's if
/// the table is full), and the oldest lingering one if too many linger. `false` when the
/// new connection must be refused.
fn make_room(conns: &mut Vec<Conn>, ip: IpAddr, limits: &Limits) -> bool {
    let lingering = conns.iter().filter(|c| !c.active()).count();
    if lingering >= limits.max_connections.max(1) {
        if let Some(i) = conns.iter().position(|c| !c.active()) {
            conns.remove(i);
        }
    }
    let from_peer = conns.iter().filter(|c| c.active() && c.peer.ip() == ip).count();
    if from_peer >= limits.max_connections_per_peer.max(1) {
        return evict_oldest_in_head(conns, |c| c.peer.ip() == ip);
    }
    let active = conns.iter().filter(|c| c.active()).count();
    if active >= limits.max_connections.max(1) {
        return evict_oldest_in_head(conns, |_| true);
    }
    true
}

fn evict_oldest_in_head(conns: &mut Vec<Conn>, pick: impl Fn(&Conn) -> bool) -> bool {
    // `conns` is in accept order, so the first match is the oldest.
    let Some(i) = conns.iter().position(|c| matches!(c.state, State::Head { .. }) && pick(c)) else {
        return false;
    };
    let old = conns.remove(i);
    log::debug!("http: {}: closed to make room (no complete request head yet)", old.peer);
    reject_busy(OwnedFd::from(old.stream));
    true
}

/// Best effort, never blocks: write the canned 503, let the peer see EOF, drain whatever
/// already arrived (so closing doesn't turn into a reset) and close.
fn reject_busy(fd: OwnedFd) {
    let _ = rnet::send(&fd, BUSY_RESPONSE, SendFlags::NOSIGNAL);
    let _ = rnet::shutdown(&fd, rnet::Shutdown::Write);
    let mut sink = [0u8; 2048];
    let _ = rnet::recv(&fd, &mut sink[..], RecvFlags::DONTWAIT);
}

fn bind_one(addr: &SocketAddr) -> io::Result<TcpListener> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    };
    let fd = rnet::socket_with(family, SocketType::STREAM, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC, None)?;
    rnet::sockopt::set_socket_reuseaddr(&fd, true)?;
    if addr.is_ipv6() {
        rnet::sockopt::set_ipv6_v6only(&fd, true)?;
    }
    rnet::bind(&fd, addr)?;
    rnet::listen(&fd, LISTEN_BACKLOG)?;
    Ok(TcpListener::from(fd))
}

struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    /// The whole request must have arrived by then (`None`: far beyond representable).
    request_deadline: Option<Instant>,
    state: State,
}

enum State {
    /// Reading the request head; `buf` never exceeds `max_header_bytes`.
    Head { buf: Vec<u8>, newline_seen: bool },
    /// Reading `want` body bytes into `req.body`; `interim` is the unsent rest of a
    /// `100 Continue`.
    Body { req: Request, want: usize, interim: &'static [u8] },
    /// Writing `out[pos..]`.
    Write { out: Vec<u8>, pos: usize, deadline: Option<Instant> },
    /// Response sent and write side shut down; discarding input until the peer closes.
    Linger { deadline: Instant, drained: usize },
}

/// What a state step decided.
enum Flow {
    /// Nothing more to do this round; keep the connection.
    Wait,
    /// Drop the connection.
    Close,
    /// Move to this state and keep going.
    Next(State),
}

/// Result of trying to parse the buffered head.
enum Head {
    Partial,
    Invalid(u16, &'static str),
    Complete { req: Request, consumed: usize, content_length: usize, expect_continue: bool },
}

impl Conn {
    /// Not yet answered: what the connection limits count.
    fn active(&self) -> bool {
        !matches!(self.state, State::Linger { .. })
    }

    /// The announced body length of a request being received.
    fn body_reserved(&self) -> usize {
        match &self.state {
            State::Body { want, .. } => *want,
            _ => 0,
        }
    }

    fn interest(&self) -> PollFlags {
        match &self.state {
            State::Head { .. } | State::Linger { .. } => PollFlags::IN,
            State::Body { interim, .. } if !interim.is_empty() => PollFlags::IN | PollFlags::OUT,
            State::Body { .. } => PollFlags::IN,
            State::Write { .. } => PollFlags::OUT,
        }
    }

    fn deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Head { .. } | State::Body { .. } => self.request_deadline,
            State::Write { deadline, .. } => *deadline,
            State::Linger { deadline, .. } => Some(*deadline),
        }
    }

    /// Advances the connection as far as possible without blocking. Returns whether to
    /// keep it.
    fn step(
        &mut self,
        now: Instant,
        limits: &Limits,
        handler: &mut dyn Handler,
        scratch: &mut [u8],
        reserved: &mut usize,
    ) -> bool {
        // States only move forward (Head → Body → Write → Linger), so this terminates.
        loop {
            let flow = match &mut self.state {
                State::Head { buf, newline_seen } => {
                    let io = Io { stream: &mut self.stream, now, limits, scratch };
                    let flow = read_head(io, self.peer, buf, newline_seen, handler, reserved);
                    match flow {
                        Flow::Wait if expired(self.request_deadline, now) => {
                            log::debug!("http: {}: request head timed out", self.peer);
                            Flow::Next(respond(&Response::error(408, "request timeout"), false, now, limits))
                        }
                        flow => flow,
                    }
                }
                State::Body { req, want, interim } => {
                    let flow = read_body(&mut self.stream, req, *want, interim, now, limits, handler, scratch);
                    if !matches!(flow, Flow::Wait) {
                        // Leaving the body state: its share of the budget is free again.
                        *reserved = reserved.saturating_sub(*want);
                    }
                    match flow {
                        Flow::Wait if expired(self.request_deadline, now) => {
                            log::debug!("http: {}: request body timed out", self.peer);
                            let mut state = respond(&Response::error(408, "request timeout"), false, now, limits);
                            prepend_interim(&mut state, interim);
                            Flow::Next(state)
                        }
                        flow => flow,
                    }
                }
                State::Write { out, pos, deadline } => {
                    if expired(*deadline, now) {
                        log::debug!("http: {}: response write timed out", self.peer);
                        Flow::Close
                    } else {
                        write_out(&mut self.stream, self.peer, out, pos, now, limits)
                    }
                }
                State::Linger { deadline, drained } => {
                    if now >= *deadline {
                        Flow::Close
                    } else {
                        drain(&mut self.stream, drained, scratch)
                    }
                }
            };
            match flow {
                Flow::Wait => return true,
                Flow::Close => return false,
                Flow::Next(state) => self.state = state,
            }
        }
    }
}

fn expired(deadline: Option<Instant>, now: Instant) -> bool {
    deadline.is_some_and(|d| now >= d)
}

/// Queues `resp` for writing.
fn respond(resp: &Response, head_only: bool, now: Instant, limits: &Limits) -> State {
    State::Write { out: resp.serialize(head_only), pos: 0, deadline: now.checked_add(limits.request_timeout) }
}

/// If a `100 Continue` was partially written, the rest must precede the final response.
fn prepend_interim(state: &mut State, interim: &[u8]) {
    if let State::Write { out, .. } = state {
        if !interim.is_empty() && interim.len() < CONTINUE_RESPONSE.len() {
            out.splice(0..0, interim.iter().copied());
        }
    }
}

/// Calls the handler on a complete request and queues its response.
fn dispatch(req: &Request, now: Instant, limits: &Limits, handler: &mut dyn Handler) -> State {
    let resp = handler.request(req);
    log::debug!("http: {} {} {} -> {}", req.peer, req.method, req.path, resp.status);
    respond(&resp, req.method == "HEAD", now, limits)
}

/// What reading from a connection needs besides its state.
struct Io<'a> {
    stream: &'a mut TcpStream,
    now: Instant,
    limits: &'a Limits,
    scratch: &'a mut [u8],
}

fn read_head(
    io: Io<'_>,
    peer: SocketAddr,
    buf: &mut Vec<u8>,
    newline_seen: &mut bool,
    handler: &mut dyn Handler,
    reserved: &mut usize,
) -> Flow {
    let Io { stream, now, limits, scratch } = io;
    let mut budget = MAX_READ_PER_ROUND;
    loop {
        let room = limits.max_header_bytes.saturating_sub(buf.len());
        if room == 0 {
            log::debug!("http: {peer}: request head too large");
            return Flow::Next(respond(&Response::error(431, "request header too large"), false, now, limits));
        }
        let want = room.min(scratch.len()).min(budget);
        if want == 0 {
            return Flow::Wait;
        }
        let n = match stream.read(&mut scratch[..want]) {
            Ok(0) => {
                if buf.is_empty() {
                    log::debug!("http: {peer}: closed without a request");
                } else {
                    log::debug!("http: {peer}: closed in the middle of the request head");
                }
                return Flow::Close;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flow::Wait,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::debug!("http: {peer}: read: {e}");
                return Flow::Close;
            }
        };
        budget -= n;
        let new = &scratch[..n];
        bounded_extend(buf, new, limits.max_header_bytes);
        // Re-parse while still on the request line (to refuse garbage at once) and
        // whenever a line ends (a complete head always ends with a newline).
        let has_newline = new.contains(&b'\n');
        if *newline_seen && !has_newline {
            continue;
        }
        *newline_seen |= has_newline;
        match parse_head(buf, peer, limits) {
            Head::Partial => {}
            Head::Invalid(status, msg) => {
                log::debug!("http: {peer}: refused with {status}: {msg}");
                return Flow::Next(respond(&Response::error(status, msg), false, now, limits));
            }
            Head::Complete { req, consumed, content_length, expect_continue } => {
                return start_body(
                    req,
                    buf.get(consumed..).unwrap_or_default(),
                    content_length,
                    expect_continue,
                    Io { stream, now, limits, scratch },
                    handler,
                    reserved,
                );
            }
        }
    }
}

/// A complete, valid head: ask the handler, check the body budget, then answer or
/// go on to read the body. Nothing of the body is buffered before both said yes.
fn start_body(
    mut req: Request,
    early: &[u8],
    content_length: usize,
    expect_continue: bool,
    io: Io<'_>,
    handler: &mut dyn Handler,
    reserved: &mut usize,
) -> Flow {
    let Io { now, limits, .. } = io;
    if let Err(resp) = handler.head(&req, content_length) {
        log::debug!("http: {}: {} {} refused at its head with {}", req.peer, req.method, req.path, resp.status);
        return Flow::Next(respond(&resp, req.method == "HEAD", now, limits));
    }
    // Body bytes that came with the head; anything beyond is ignored.
    let early = early.get(..early.len().min(content_length)).unwrap_or_default();
    if content_length > early.len() {
        if reserved.saturating_add(content_length) > limits.body_budget {
            log::debug!("http: {}: body budget spent; refusing with 503", req.peer);
            let mut resp = Response::error(503, "too many requests in flight; retry");
            resp.headers.push(("Retry-After".into(), "1".into()));
            return Flow::Next(respond(&resp, false, now, limits));
        }
        *reserved += content_length;
    }
    if content_length > 0 {
        req.body = Vec::with_capacity(early.len().max(content_length.min(SCRATCH_BYTES)));
        req.body.extend_from_slice(early);
    }
    if req.body.len() == content_length {
        return Flow::Next(dispatch(&req, now, limits, handler));
    }
    let interim = if expect_continue { CONTINUE_RESPONSE } else { &[] };
    Flow::Next(State::Body { req, want: content_length, interim })
}

#[allow(clippy::too_many_arguments)]
fn read_body(
    stream: &mut TcpStream,
    req: &mut Request,
    want: usize,
    interim: &mut &'static [u8],
    now: Instant,
    limits: &Limits,
    handler: &mut dyn Handler,
    scratch: &mut [u8],
) -> Flow {
    let peer = req.peer;
    while !interim.is_empty() {
        match stream.write(interim) {
            Ok(0) => return Flow::Close,
            Ok(n) => *interim = interim.get(n..).unwrap_or_default(),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::debug!("http: {peer}: write: {e}");
                return Flow::Close;
            }
        }
    }
    let mut budget = MAX_READ_PER_ROUND;
    loop {
        let missing = want.saturating_sub(req.body.len());
        if missing == 0 {
            let mut state = dispatch(req, now, limits, handler);
            prepend_interim(&mut state, interim);
            return Flow::Next(state);
        }
        let chunk = missing.min(scratch.len()).min(budget);
        if chunk == 0 {
            return Flow::Wait;
        }
        match stream.read(&mut scratch[..chunk]) {
            Ok(0) => {
                log::debug!("http: {peer}: closed in the middle of the request body");
                return Flow::Close;
            }
            Ok(n) => {
                budget -= n;
                bounded_extend(&mut req.body, &scratch[..n], want);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flow::Wait,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::debug!("http: {peer}: read: {e}");
                return Flow::Close;
            }
        }
    }
}

fn write_out(
    stream: &mut TcpStream,
    peer: SocketAddr,
    out: &[u8],
    pos: &mut usize,
    now: Instant,
    limits: &Limits,
) -> Flow {
    while let Some(rest) = out.get(*pos..).filter(|r| !r.is_empty()) {
        match stream.write(rest) {
            Ok(0) => return Flow::Close,
            Ok(n) => *pos += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flow::Wait,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::debug!("http: {peer}: write: {e}");
                return Flow::Close;
            }
        }
    }
    // Fully written: send FIN, then drain until the peer closes (lingering close).
    if let Err(e) = stream.shutdown(Shutdown::Write) {
        log::debug!("http: {peer}: shutdown: {e}");
        return Flow::Close;
    }
    let linger = LINGER_TIME.min(limits.request_timeout);
    match now.checked_add(linger) {
        Some(deadline) => Flow::Next(State::Linger { deadline, drained: 0 }),
        None => Flow::Close,
    }
}

fn drain(stream: &mut TcpStream, drained: &mut usize, scratch: &mut [u8]) -> Flow {
    let mut budget = MAX_READ_PER_ROUND;
    loop {
        if *drained >= LINGER_MAX_BYTES || budget == 0 {
            // Over the byte cap: give up; budget exhausted: continue next round.
            return if *drained >= LINGER_MAX_BYTES { Flow::Close } else { Flow::Wait };
        }
        let chunk = scratch.len().min(budget);
        match stream.read(&mut scratch[..chunk]) {
            Ok(0) => return Flow::Close,
            Ok(n) => {
                *drained += n;
                budget = budget.saturating_sub(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flow::Wait,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Flow::Close,
        }
    }
}

/// Appends `data` to `buf` without letting the capacity grow beyond `limit` (or beyond
/// what is needed, if that is more).
fn bounded_extend(buf: &mut Vec<u8>, data: &[u8], limit: usize) {
    let needed = buf.len().saturating_add(data.len());
    if needed > buf.capacity() {
        let target = buf.capacity().saturating_mul(2).max(needed).min(limit.max(needed));
        buf.reserve_exact(target - buf.len());
    }
    buf.extend_from_slice(data);
}

/// What the server makes of a buffered request head: `Ok(None)` while it is
/// incomplete, `Ok(Some((request, head bytes, Content-Length)))` once complete and
/// valid, `Err(status)` for what it refuses. The pure core of the server, public for
/// the fuzz targets.
pub fn parse_request_head(buf: &[u8], limits: &Limits) -> Result<Option<(Request, usize, usize)>, u16> {
    let peer = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1));
    match parse_head(buf, peer, limits) {
        Head::Partial => Ok(None),
        Head::Invalid(status, _) => Err(status),
        Head::Complete { req, consumed, content_length, .. } => Ok(Some((req, consumed, content_length))),
    }
}

fn parse_head(buf: &[u8], peer: SocketAddr, limits: &Limits) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let consumed = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(httparse::Error::TooManyHeaders) => return Head::Invalid(431, "too many headers"),
        Err(_) => return Head::Invalid(400, "malformed request"),
    };
    let (Some(method), Some(target), Some(version)) = (parsed.method, parsed.path, parsed.version) else {
        return Head::Invalid(400, "malformed request");
    };
    if version > 1 {
        return Head::Invalid(400, "unsupported HTTP version");
    }
    let Some(target) = origin_form(target) else {
        return Head::Invalid(400, "invalid request target");
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (target, None),
    };
    let headers: Vec<(String, Vec<u8>)> =
        parsed.headers.iter().map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec())).collect();
    let req = Request { method: method.to_owned(), path, query, headers, body: Vec::new(), peer };

    if req.header("transfer-encoding").is_some() {
        return Head::Invalid(501, "Transfer-Encoding is not supported; send Content-Length");
    }
    let content_length = match content_length(&req.headers) {
        Ok(n) => n.unwrap_or(0),
        Err(()) => return Head::Invalid(400, "invalid Content-Length"),
    };
    let content_length = match usize::try_from(content_length) {
        Ok(n) if n <= limits.max_body_bytes => n,
        _ => return Head::Invalid(413, "request body too large"),
    };
    // RFC 9110: a server must ignore 100-continue from HTTP/1.0 clients.
    let expect_continue = match req.header("expect") {
        Some(_) if version == 0 => false,
        Some(v) if trim_ows(v).eq_ignore_ascii_case(b"100-continue") => true,
        Some(_) => return Head::Invalid(417, "unsupported expectation"),
        None => false,
    };
    Head::Complete { req, consumed, content_length, expect_continue }
}

/// Reduces a request target to origin form (`/path?query`); `*` is kept. Absolute-form
/// (`http://host/path`) targets are reduced to their path. Anything else is invalid.
fn origin_form(target: &str) -> Option<String> {
    if target.starts_with('/') || target == "*" {
        return Some(target.to_owned());
    }
    let rest = ["http://", "https://"].iter().find_map(|scheme| {
        let prefix = target.get(..scheme.len())?;
        prefix.eq_ignore_ascii_case(scheme).then(|| target.get(scheme.len()..)).flatten()
    })?;
    match rest.find(['/', '?']).and_then(|i| rest.get(i..)) {
        Some(tail) if tail.starts_with('/') => Some(tail.to_owned()),
        Some(tail) => Some(format!("/{tail}")),
        None => Some("/".to_owned()),
    }
}

/// All `Content-Length` values (several headers and/or comma lists) must be plain digits
/// and agree. `Ok(None)` when absent. Values too large for `u64` saturate.
fn content_length(headers: &[(String, Vec<u8>)]) -> Result<Option<u64>, ()> {
    let mut found = None;
    for (_, value) in headers.iter().filter(|(n, _)| n == "content-length") {
        for part in value.split(|&b| b == b',') {
            let part = trim_ows(part);
            if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
                return Err(());
            }
            let n = part
                .iter()
                .try_fold(0u64, |acc, &d| acc.checked_mul(10)?.checked_add(u64::from(d - b'0')))
                .unwrap_or(u64::MAX);
            match found {
                Some(prev) if prev != n => return Err(()),
                _ => found = Some(n),
            }
        }
    }
    Ok(found)
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn valid_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn valid_header_value(value: &str) -> bool {
    value.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::net::ToSocketAddrs;
    use std::thread::{self, JoinHandle};

    const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);

    fn limits() -> Limits {
        Limits { request_timeout: Duration::from_secs(2), ..Limits::default() }
    }

    fn server(limits: Limits) -> (Server, SocketAddr) {
        let addr = "127.0.0.1:0".to_socket_addrs().unwrap().next().unwrap();
        let server = Server::bind(&[addr], limits).unwrap();
        let addr = server.local_addrs()[0];
        (server, addr)
    }

    fn connect(addr: SocketAddr) -> TcpStream {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(CLIENT_TIMEOUT)).unwrap();
        s
    }

    /// Reads until EOF, error or timeout.
    fn read_all(s: &mut TcpStream) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return out,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Drives the server until `done` or a safety deadline.
    fn drive(server: &mut Server, handler: &mut dyn Handler, done: &dyn Fn(&Server) -> bool) {
        let end = Instant::now() + Duration::from_secs(4);
        while !done(server) {
            assert!(Instant::now() < end, "test did not finish in time");
            server.poll(Duration::from_millis(5), handler).unwrap();
        }
    }

    fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
        thread::spawn(f)
    }

    /// One client thread sends `request` and reads the whole response.
    fn exchange(server: &mut Server, addr: SocketAddr, handler: &mut dyn Handler, request: &[u8]) -> Vec<u8> {
        let request = request.to_vec();
        let client = spawn(move || {
            let mut s = connect(addr);
            s.write_all(&request).unwrap();
            read_all(&mut s)
        });
        drive(server, handler, &|_| client.is_finished());
        client.join().unwrap()
    }

    fn status(resp: &[u8]) -> u16 {
        let line = resp.split(|&b| b == b'\r').next().unwrap_or_default();
        let text = std::str::from_utf8(line).unwrap();
        assert!(text.starts_with("HTTP/1.1 "), "bad response {text:?}");
        text.get(9..12).unwrap().parse().unwrap()
    }

    fn body(resp: &[u8]) -> &[u8] {
        let i = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        &resp[i + 4..]
    }

    fn head(resp: &[u8]) -> String {
        let i = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        String::from_utf8(resp[..i].to_vec()).unwrap()
    }

    fn ok_handler(req: &Request) -> Response {
        Response::text(200, format!("{} {}", req.method, req.path))
    }

    #[test]
    fn get_round_trip() {
        let (mut server, addr) = server(limits());
        let seen = RefCell::new(Vec::new());
        let mut handler = |req: &Request| {
            seen.borrow_mut().push(req.clone());
            let mut resp = Response::json(200, r#"{"ok":true}"#);
            resp.headers.push(("X-Extra".into(), "yes".into()));
            resp.headers.push(("Bad\r\nHeader".into(), "x".into()));
            resp.headers.push(("Content-Length".into(), "99".into()));
            resp
        };
        let resp = exchange(
            &mut server,
            addr,
            &mut handler,
            b"GET /status?a=1&b=2 HTTP/1.1\r\nHost: dev\r\nX-Foo:  Bar \r\n\r\n",
        );
        assert_eq!(status(&resp), 200);
        let h = head(&resp);
        assert!(h.contains("\r\nContent-Type: application/json\r\n"), "{h}");
        assert!(h.contains("\r\nContent-Length: 11\r\n"), "{h}");
        assert!(h.contains("\r\nConnection: close\r\n"), "{h}");
        assert!(h.contains("\r\nX-Extra: yes"), "{h}");
        assert!(!h.contains("Bad") && !h.contains("99"), "{h}");
        assert_eq!(body(&resp), br#"{"ok":true}"#);
        let seen = seen.borrow();
        assert_eq!(seen.len(), 1);
        let req = &seen[0];
        assert_eq!(req.method, "GET");
        assert_eq!(req.path, "/status");
        assert_eq!(req.query.as_deref(), Some("a=1&b=2"));
        assert_eq!(req.header("x-foo"), Some(&b"Bar"[..]));
        assert_eq!(req.header("X-FOO"), Some(&b"Bar"[..]));
        assert_eq!(req.header("host"), Some(&b"dev"[..]));
        assert_eq!(req.headers[0].0, "host");
        assert!(req.body.is_empty());
        assert!(req.peer.ip().is_loopback());
    }

    #[test]
    fn http10_head_and_absolute_form() {
        let (mut server, addr) = server(limits());
        let mut handler = ok_handler;
        let resp = exchange(&mut server, addr, &mut handler, b"GET /x HTTP/1.0\r\n\r\n");
        assert_eq!(status(&resp), 200);
        assert_eq!(body(&resp), b"GET /x");

        let resp = exchange(&mut server, addr, &mut handler, b"HEAD /y HTTP/1.1\r\n\r\n");
        assert_eq!(status(&resp), 200);
        assert!(head(&resp).contains("Content-Length: 7\r\n"));
        assert_eq!(body(&resp), b"");

        let resp = exchange(&mut server, addr, &mut handler, b"GET http://dev:8080/abs?q HTTP/1.1\r\n\r\n");
        assert_eq!(body(&resp), b"GET /abs");
    }

    #[test]
    fn post_with_body() {
        let (mut server, addr) = server(limits());
        let mut handler = |req: &Request| {
            let mut b = req.body.clone();
            b.reverse();
            Response::text(201, b)
        };
        let client = spawn(move || {
            let mut s = connect(addr);
            s.write_all(b"POST /deploy HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello").unwrap();
            thread::sleep(Duration::from_millis(50));
            s.write_all(b" world").unwrap();
            read_all(&mut s)
        });
        drive(&mut server, &mut handler, &|_| client.is_finished());
        let resp = client.join().unwrap();
        assert_eq!(status(&resp), 201);
        assert_eq!(body(&resp), b"dlrow olleh");

        // A larger body, arriving in many reads.
        let big: Vec<u8> = (0..1_000_000u32).map(|i| i as u8).collect();
        let mut req = format!("PUT /big HTTP/1.1\r\nContent-Length: {}\r\n\r\n", big.len()).into_bytes();
        req.extend_from_slice(&big);
        let mut handler = |req: &Request| Response::text(200, format!("{}", req.body.len()));
        let resp = exchange(&mut server, addr, &mut handler, &req);
        assert_eq!(body(&resp), b"1000000");
    }

    #[test]
    fn expect_100_continue() {
        let (mut server, addr) = server(Limits { max_body_bytes: 100, ..limits() });
        let calls = Cell::new(0);
        let mut handler = |req: &Request| {
            calls.set(calls.get() + 1);
            Response::text(200, req.body.clone())
        };
        let client = spawn(move || {
            let mut s = connect(addr);
            s.write_all(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n").unwrap();
            let mut interim = vec![0u8; CONTINUE_RESPONSE.len()];
            s.read_exact(&mut interim).unwrap();
            s.write_all(b"abcde").unwrap();
            (interim, read_all(&mut s))
        });
        drive(&mut server, &mut handler, &|_| client.is_finished());
        let (interim, resp) = client.join().unwrap();
        assert_eq!(interim, CONTINUE_RESPONSE);
        assert_eq!(status(&resp), 200);
        assert_eq!(body(&resp), b"abcde");

        // Too large: 413 instead of 100 Continue.
        let resp = exchange(
            &mut server,
            addr,
            &mut handler,
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 101\r\n\r\n",
        );
        assert_eq!(status(&resp), 413);
        // Unknown expectation.
        let resp = exchange(
            &mut server,
            addr,
            &mut handler,
            b"POST / HTTP/1.1\r\nExpect: teapot\r\nContent-Length: 1\r\n\r\nx",
        );
        assert_eq!(status(&resp), 417);
        assert_eq!(calls.get(), 1);
    }

    #[test]
    fn body_over_limit_is_413_without_handler() {
        let (mut server, addr) = server(Limits { max_body_bytes: 16, ..limits() });
        let calls = Cell::new(0);
        let mut handler = |_: &Request| {
            calls.set(calls.get() + 1);
            Response::text(200, "no")
        };
        // Only the head is sent: the answer must not wait for the body.
        let resp = exchange(&mut server, addr, &mut handler, b"POST / HTTP/1.1\r\nContent-Length: 1000\r\n\r\n");
        assert_eq!(status(&resp), 413);
        assert!(body(&resp).starts_with(b"{\"error\":"));
        // Absurd lengths too.
        let resp = exchange(
            &mut server,
            addr,
            &mut handler,
            b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999999\r\n\r\n",
        );
        assert_eq!(status(&resp), 413);
        // The client sending the body anyway still gets its 413 (lingering close).
        let mut req = b"POST / HTTP/1.1\r\nContent-Length: 200000\r\n\r\n".to_vec();
        req.resize(req.len() + 200_000, b'x');
        let resp = exchange(&mut server, addr, &mut handler, &req);
        assert_eq!(status(&resp), 413);
        assert_eq!(calls.get(), 0);
    }

    #[test]
    fn headers_over_limit_is_431() {
        let (mut server, addr) = server(Limits { max_header_bytes: 256, ..limits() });
        let calls = Cell::new(0);
        let mut handler = |_: &Request| {
            calls.set(calls.get() + 1);
            Response::text(200, "no")
        };
        let mut req = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        req.resize(req.len() + 1000, b'a');
        let resp = exchange(&mut server, addr, &mut handler, &req);
        assert_eq!(status(&resp), 431);

        let mut req = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..40 {
            req.extend_from_slice(format!("h{i}: v\r\n").as_bytes());
        }
        req.extend_from_slice(b"\r\n");
        let (mut server, addr) = self::server(limits());
        let resp = exchange(&mut server, addr, &mut handler, &req);
        assert_eq!(status(&resp), 431);
        assert_eq!(calls.get(), 0);
    }

    #[test]
    fn malformed_requests_are_400() {
        let (mut server, addr) = server(limits());
        let calls = Cell::new(0);
        let mut handler = |_: &Request| {
            calls.set(calls.get() + 1);
            Response::text(200, "no")
        };
        let cases: &[&[u8]] = &[
            b"\x00\x01\x02\xff garbage",
            b"hello there, this is not http at all",
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\0b\r\n\r\n",
            b"GET nopath HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n",
        ];
        for case in cases {
            let resp = exchange(&mut server, addr, &mut handler, case);
            assert_eq!(status(&resp), 400, "{:?}", String::from_utf8_lossy(case));
        }
        assert_eq!(calls.get(), 0);
        // Identical repeated lengths are fine.
        let resp = exchange(
            &mut server,
            addr,
            &mut handler,
            b"POST / HTTP/1.1\r\nContent-Length: 2, 2\r\nContent-Length: 2\r\n\r\nok",
        );
        assert_eq!(status(&resp), 200);
    }

    #[test]
    fn transfer_encoding_is_refused() {
        let (mut server, addr) = server(limits());
        let calls = Cell::new(0);
        let mut handler = |_: &Request| {
            calls.set(calls.get() + 1);
            Response::text(200, "no")
        };
        let resp = exchange(
            &mut server,
            addr,
            &mut handler,
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        );
        assert_eq!(status(&resp), 501);
        let resp = exchange(
            &mut server,
            addr,
            &mut handler,
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nhello",
        );
        assert_eq!(status(&resp), 501);
        assert_eq!(calls.get(), 0);
    }

    #[test]
    fn slow_client_gets_408_while_others_are_served() {
        let timeout = Duration::from_millis(500);
        let (mut server, addr) = server(Limits { request_timeout: timeout, ..limits() });
        let paths = RefCell::new(Vec::new());
        let mut handler = |req: &Request| {
            paths.borrow_mut().push(req.path.clone());
            Response::text(200, "fast")
        };
        let start = Instant::now();
        let slow = spawn(move || {
            let mut s = connect(addr);
            s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n").unwrap();
            let resp = read_all(&mut s);
            (resp, Instant::now())
        });
        let slow_body = spawn(move || {
            let mut s = connect(addr);
            s.write_all(b"POST /slow HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc").unwrap();
            read_all(&mut s)
        });
        let fast = spawn(move || {
            thread::sleep(Duration::from_millis(20));
            let mut s = connect(addr);
            s.write_all(b"GET /fast HTTP/1.1\r\n\r\n").unwrap();
            let resp = read_all(&mut s);
            (resp, Instant::now())
        });
        drive(&mut server, &mut handler, &|_| slow.is_finished() && fast.is_finished() && slow_body.is_finished());
        let (slow_resp, slow_at) = slow.join().unwrap();
        let (fast_resp, fast_at) = fast.join().unwrap();
        assert_eq!(status(&slow_resp), 408);
        assert_eq!(status(&slow_body.join().unwrap()), 408);
        assert_eq!(status(&fast_resp), 200);
        assert!(fast_at < slow_at);
        assert!(slow_at - start >= timeout);
        assert!(slow_at - start < Duration::from_millis(1500));
        assert_eq!(*paths.borrow(), ["/fast"]);
    }

    #[test]
    fn a_full_table_makes_room_by_closing_the_oldest_idle_connection() {
        let (mut server, addr) = server(Limits { max_connections: 2, ..limits() });
        let calls = Cell::new(0);
        let mut handler = |req: &Request| {
            calls.set(calls.get() + 1);
            ok_handler(req)
        };
        let mut idle: Vec<TcpStream> = (0..2).map(|_| connect(addr)).collect();
        for s in &mut idle {
            s.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        }
        drive(&mut server, &mut handler, &|s| s.connection_count() == 2);

        // Each arrival finds the table full and closes the oldest connection without a
        // complete head; one that sent its request is answered at once, so it is never
        // the one closed.
        let mut excess: Vec<TcpStream> = Vec::new();
        for i in 0..5 {
            let mut s = connect(addr);
            if i % 2 == 0 {
                s.write_all(b"GET /x HTTP/1.1\r\n\r\n").unwrap();
            }
            excess.push(s);
            let n = excess.len();
            drive(&mut server, &mut handler, &|s| s.connection_count() >= n.min(2) && s.active_count() <= 2);
        }
        for s in idle.iter().chain(&excess) {
            s.set_nonblocking(true).unwrap();
        }
        // Until every client but the last idle one has its answer waiting.
        let answered = |s: &TcpStream| s.peek(&mut [0u8; 1]).is_ok_and(|n| n > 0);
        drive(&mut server, &mut handler, &|_| idle.iter().chain(&excess).filter(|s| answered(s)).count() == 6);
        assert!(!answered(&excess[3]), "the newest idle connection is kept");
        assert_eq!(server.active_count(), 1);
        let mut got = Vec::new();
        for s in idle.iter_mut().chain(excess.iter_mut()) {
            s.set_nonblocking(false).unwrap();
            if answered(s) {
                got.push(status(&read_all(s)));
            } else {
                got.push(0);
            }
        }
        // idle[0], idle[1], excess[1] were closed to make room; the requests were served.
        assert_eq!(got, [503, 503, 200, 503, 200, 0, 200]);
        assert_eq!(calls.get(), 3);

        drop(excess);
        drive(&mut server, &mut handler, &|s| s.active_count() == 0);
        let resp = exchange(&mut server, addr, &mut handler, b"GET /after HTTP/1.1\r\n\r\n");
        assert_eq!(status(&resp), 200);
        assert_eq!(body(&resp), b"GET /after");
    }

    #[test]
    fn a_table_of_requests_past_their_head_refuses_newcomers() {
        let (mut server, addr) = server(Limits { max_connections: 2, ..limits() });
        let mut handler = ok_handler;
        // Two uploads in progress: past their head, so never closed to make room.
        let mut busy: Vec<TcpStream> = (0..2).map(|_| connect(addr)).collect();
        for s in &mut busy {
            s.write_all(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nab").unwrap();
        }
        drive(&mut server, &mut handler, &|s| s.body_reserved() == 20);
        let mut late = connect(addr);
        late.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        late.set_nonblocking(true).unwrap();
        drive(&mut server, &mut handler, &|_| late.peek(&mut [0u8; 1]).is_ok_and(|n| n > 0));
        late.set_nonblocking(false).unwrap();
        let resp = read_all(&mut late);
        assert_eq!(status(&resp), 503);
        assert_eq!(body(&resp), b"{\"error\":\"server busy\"}");
        assert_eq!(server.active_count(), 2);
    }

    /// A TCP connection to `addr` from the loopback address `from`.
    fn connect_from(from: [u8; 4], addr: SocketAddr) -> TcpStream {
        let fd = rnet::socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
        rnet::bind(&fd, &SocketAddr::from((from, 0))).unwrap();
        rnet::connect(&fd, &addr).unwrap();
        let s = TcpStream::from(fd);
        s.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
        s
    }

    #[test]
    fn one_peer_cannot_hold_more_than_its_share() {
        let limits = Limits { max_connections: 8, max_connections_per_peer: 3, ..limits() };
        let (mut server, addr) = server(limits);
        let mut handler = ok_handler;
        // A crowd from one address opens many idle connections: it keeps three.
        let crowd: Vec<TcpStream> = (0..10).map(|_| connect_from([127, 0, 0, 1], addr)).collect();
        drive(&mut server, &mut handler, &|s| s.connection_count() == 3 && s.active_count() == 3);
        for s in &crowd {
            s.set_nonblocking(true).unwrap();
        }
        let closed = crowd.iter().filter(|s| s.peek(&mut [0u8; 1]).is_ok_and(|n| n > 0)).count();
        assert_eq!(closed, 7, "the seven oldest got the canned 503");
        // Someone else is served, and so is the crowd's own newest request.
        let mut other = connect_from([127, 0, 0, 2], addr);
        other.write_all(b"GET /other HTTP/1.1\r\n\r\n").unwrap();
        let mut own = connect_from([127, 0, 0, 1], addr);
        own.write_all(b"GET /own HTTP/1.1\r\n\r\n").unwrap();
        other.set_nonblocking(true).unwrap();
        own.set_nonblocking(true).unwrap();
        let answered = |s: &TcpStream| s.peek(&mut [0u8; 1]).is_ok_and(|n| n > 0);
        drive(&mut server, &mut handler, &|_| answered(&other) && answered(&own));
        for (s, want) in [(&mut other, &b"GET /other"[..]), (&mut own, b"GET /own")] {
            s.set_nonblocking(false).unwrap();
            let resp = read_all(s);
            assert_eq!(status(&resp), 200);
            assert_eq!(body(&resp), want);
        }
        assert!(server.active_count() <= 3);
    }

    #[test]
    fn answered_connections_do_not_count() {
        let (mut server, addr) = server(Limits { max_connections: 2, ..limits() });
        let mut handler = ok_handler;
        // Clients that read their answer but never close: they linger, answered.
        let mut lingering = Vec::new();
        for i in 0..6 {
            let mut s = connect(addr);
            s.write_all(format!("GET /{i} HTTP/1.1\r\n\r\n").as_bytes()).unwrap();
            s.set_nonblocking(true).unwrap();
            drive(&mut server, &mut handler, &|_| s.peek(&mut [0u8; 1]).is_ok_and(|n| n > 0));
            s.set_nonblocking(false).unwrap();
            let mut first = [0u8; 12];
            s.read_exact(&mut first).unwrap();
            assert_eq!(&first, b"HTTP/1.1 200", "request {i}");
            lingering.push(s);
        }
        assert_eq!(server.active_count(), 0);
        assert!(server.connection_count() <= 2, "lingering ones have their own cap");
    }

    struct Gate<'a> {
        calls: &'a Cell<u32>,
    }

    impl Handler for Gate<'_> {
        fn head(&mut self, req: &Request, _body_len: usize) -> Result<(), Response> {
            match req.path.as_str() {
                "/open" => Ok(()),
                _ => Err(Response::error(401, "who are you")),
            }
        }
        fn request(&mut self, req: &Request) -> Response {
            self.calls.set(self.calls.get() + 1);
            Response::text(200, format!("{}", req.body.len()))
        }
    }

    #[test]
    fn a_head_refused_is_answered_before_any_body_is_read() {
        let (mut server, addr) = server(Limits { max_body_bytes: 1 << 20, ..limits() });
        let calls = Cell::new(0);
        let mut gate = Gate { calls: &calls };
        let mut s = connect(addr);
        s.write_all(b"POST /closed HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n").unwrap();
        s.set_nonblocking(true).unwrap();
        drive(&mut server, &mut gate, &|_| s.peek(&mut [0u8; 1]).is_ok_and(|n| n > 0));
        assert_eq!(server.body_reserved(), 0, "nothing reserved for a refused body");
        s.set_nonblocking(false).unwrap();
        let mut first = [0u8; 12];
        s.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"HTTP/1.1 401");
        assert_eq!(calls.get(), 0);
        // With Expect: 100-continue the client is never asked for the body.
        let resp = exchange(
            &mut server,
            addr,
            &mut gate,
            b"POST /closed HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n",
        );
        assert!(head(&resp).starts_with("HTTP/1.1 401"), "{}", head(&resp));
        let resp = exchange(&mut server, addr, &mut gate, b"POST /open HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc");
        assert_eq!(body(&resp), b"3");
        assert_eq!(calls.get(), 1);
    }

    #[test]
    fn bodies_in_flight_share_one_budget() {
        let (mut server, addr) = server(Limits { max_body_bytes: 100, body_budget: 200, ..limits() });
        let mut handler = |req: &Request| Response::text(200, format!("{}", req.body.len()));
        let mut uploads: Vec<TcpStream> = (0..2).map(|_| connect(addr)).collect();
        for s in &mut uploads {
            s.write_all(b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\n").unwrap();
        }
        drive(&mut server, &mut handler, &|s| s.body_reserved() == 200);
        let resp = exchange(&mut server, addr, &mut handler, b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n");
        assert_eq!(status(&resp), 503, "over the budget before a body byte is read");
        // A small body that came with its head takes no more memory: it passes.
        let resp = exchange(&mut server, addr, &mut handler, b"POST / HTTP/1.1\r\nContent-Length: 1\r\n\r\nx");
        assert_eq!(body(&resp), b"1");
        let resp = exchange(&mut server, addr, &mut handler, b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(body(&resp), b"0", "requests without a body still pass");
        // One upload finishes: its share is free again.
        uploads[0].write_all(&[b'a'; 100]).unwrap();
        drive(&mut server, &mut handler, &|s| s.body_reserved() == 100);
        let resp = exchange(&mut server, addr, &mut handler, b"POST / HTTP/1.1\r\nContent-Length: 1\r\n\r\nx");
        assert_eq!(body(&resp), b"1");
    }

    #[test]
    fn accepts_are_bounded_per_round() {
        let limits = Limits { max_connections: 1000, max_connections_per_peer: 1000, ..limits() };
        let (mut server, addr) = server(limits);
        let clients: Vec<TcpStream> = (0..MAX_ACCEPT_PER_ROUND + 10).map(|_| connect(addr)).collect();
        let mut handler = ok_handler;
        server.poll(Duration::from_millis(100), &mut handler).unwrap();
        assert_eq!(server.connection_count(), MAX_ACCEPT_PER_ROUND);
        server.poll(Duration::from_millis(100), &mut handler).unwrap();
        assert_eq!(server.connection_count(), MAX_ACCEPT_PER_ROUND + 10);
        drop(clients);
        drive(&mut server, &mut handler, &|s| s.connection_count() == 0);
    }

    #[test]
    fn disconnect_mid_request_is_harmless() {
        let (mut server, addr) = server(limits());
        let calls = Cell::new(0);
        let mut handler = |req: &Request| {
            calls.set(calls.get() + 1);
            ok_handler(req)
        };
        let mut clients = Vec::new();
        clients.push(connect(addr));
        let mut s = connect(addr);
        s.write_all(b"GET / HT").unwrap();
        clients.push(s);
        let mut s = connect(addr);
        s.write_all(b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc").unwrap();
        clients.push(s);
        // One that resets instead of closing.
        let mut s = connect(addr);
        s.write_all(b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc").unwrap();
        rnet::sockopt::set_socket_linger(&s, Some(Duration::ZERO)).unwrap();
        clients.push(s);
        drive(&mut server, &mut handler, &|s| s.connection_count() == 4);
        drop(clients);
        drive(&mut server, &mut handler, &|s| s.connection_count() == 0);

        // Disconnect while the response is being written (not read at all).
        let mut handler2 = |_: &Request| Response::text(200, vec![b'z'; 8 << 20]);
        let mut s = connect(addr);
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let until = Instant::now() + Duration::from_millis(50);
        drive(&mut server, &mut handler2, &|_| Instant::now() >= until);
        rnet::sockopt::set_socket_linger(&s, Some(Duration::ZERO)).unwrap();
        drop(s);
        drive(&mut server, &mut handler2, &|s| s.connection_count() == 0);

        assert_eq!(calls.get(), 0);
        let resp = exchange(&mut server, addr, &mut handler, b"GET /ok HTTP/1.1\r\n\r\n");
        assert_eq!(body(&resp), b"GET /ok");
    }

    #[test]
    fn unread_response_is_dropped_after_timeout() {
        let (mut server, addr) = server(Limits { request_timeout: Duration::from_millis(200), ..limits() });
        let mut handler = |_: &Request| Response::text(200, vec![b'z'; 64 << 20]);
        let mut s = connect(addr);
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let start = Instant::now();
        drive(&mut server, &mut handler, &|s| start.elapsed() > Duration::from_millis(20) && s.connection_count() == 0);
        assert!(start.elapsed() < Duration::from_millis(1500));
        drop(s);
    }

    #[test]
    fn pipelined_requests_are_ignored() {
        let (mut server, addr) = server(limits());
        let paths = RefCell::new(Vec::new());
        let mut handler = |req: &Request| {
            paths.borrow_mut().push((req.path.clone(), req.body.clone()));
            ok_handler(req)
        };
        let resp = exchange(
            &mut server,
            addr,
            &mut handler,
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        assert_eq!(status(&resp), 200);
        assert_eq!(resp.windows(9).filter(|w| w == b"HTTP/1.1 ").count(), 1);
        let resp = exchange(
            &mut server,
            addr,
            &mut handler,
            b"POST /p HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /c HTTP/1.1\r\n\r\n",
        );
        assert_eq!(body(&resp), b"POST /p");
        assert_eq!(*paths.borrow(), [("/a".to_string(), vec![]), ("/p".to_string(), b"abc".to_vec())]);
    }

    #[test]
    fn bind_v4_and_v6_same_port() {
        let v4: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let s = Server::bind(&[v4], limits()).unwrap();
        let port = s.local_addrs()[0].port();
        drop(s);
        let addrs: Vec<SocketAddr> =
            vec![format!("127.0.0.1:{port}").parse().unwrap(), format!("[::1]:{port}").parse().unwrap()];
        // ::1 may be unavailable in some sandboxes; only check what we can.
        if let Ok(s) = Server::bind(&addrs, limits()) {
            assert_eq!(s.local_addrs().len(), 2);
            assert_eq!(s.fds().len(), 2);
        }
        assert!(Server::bind(&[], limits()).is_err());
    }

    #[test]
    fn canned_and_serialized_responses_are_well_formed() {
        for resp in [BUSY_RESPONSE.to_vec(), Response::error(404, "x").serialize(false)] {
            let mut headers = [httparse::EMPTY_HEADER; 8];
            let mut parsed = httparse::Response::new(&mut headers);
            let n = match parsed.parse(&resp).unwrap() {
                httparse::Status::Complete(n) => n,
                httparse::Status::Partial => panic!("partial"),
            };
            let len = parsed
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .map(|h| std::str::from_utf8(h.value).unwrap().parse::<usize>().unwrap())
                .unwrap();
            assert_eq!(resp.len() - n, len);
            // Both bodies are what a client reads as an api::Error.
            let e: crate::api::Error = crate::json::from_slice_bounded(&resp[n..]).unwrap();
            assert!(e.error == "server busy" || e.error == "x", "{e:?}");
        }
        let busy = crate::api::Error { error: "server busy".into(), seq: None };
        assert!(
            BUSY_RESPONSE.ends_with(crate::json::to_string(&busy).unwrap().as_bytes()),
            "the canned body is serde's"
        );
        assert_eq!(status(&Response::text(99, "").serialize(false)), 500);
    }

    #[test]
    fn error_json_is_escaped() {
        let r = Response::error(400, "bad \"x\"\\\n\u{1}é");
        assert_eq!(r.content_type, "application/json");
        assert_eq!(std::str::from_utf8(&r.body).unwrap(), r#"{"error":"bad \"x\"\\\n\u0001é"}"#);
    }

    #[test]
    fn content_length_parsing() {
        let h = |v: &[&str]| -> Vec<(String, Vec<u8>)> {
            v.iter().map(|v| ("content-length".to_string(), v.as_bytes().to_vec())).collect()
        };
        assert_eq!(content_length(&h(&[])), Ok(None));
        assert_eq!(content_length(&h(&["0"])), Ok(Some(0)));
        assert_eq!(content_length(&h(&[" 12 "])), Ok(Some(12)));
        assert_eq!(content_length(&h(&["3, 3", "3"])), Ok(Some(3)));
        assert_eq!(content_length(&h(&["99999999999999999999999"])), Ok(Some(u64::MAX)));
        for bad in [&[""][..], &["+1"], &["1 2"], &["1,"], &["1", "2"], &["0x10"]] {
            assert_eq!(content_length(&h(bad)), Err(()), "{bad:?}");
        }
        assert_eq!(origin_form("/a?b").as_deref(), Some("/a?b"));
        assert_eq!(origin_form("HTTP://h:1").as_deref(), Some("/"));
        assert_eq!(origin_form("http://h?q").as_deref(), Some("/?q"));
        assert_eq!(origin_form("https://h/p").as_deref(), Some("/p"));
        assert_eq!(origin_form("ftp://h/p"), None);
        assert_eq!(origin_form("é"), None);
    }
}
