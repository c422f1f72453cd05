//! Small one-off requests for a loop that must never block: GETs of
//! documents (a polled deploy document, a channel, a key rotation, their
//! signatures, a cache's `nix-cache-info`) and PUTs (the Pushgateway's
//! metrics), over the [`crate::net::engine`] the loop turns with its own
//! sockets. Submit, turn, take what finished: nothing here waits except
//! in the engine's `poll(2)`, bounded by the caller, and nothing calls
//! back into the caller.
//!
//! The rules are the blocking fetcher's ([`super::Fetcher::get_url`],
//! [`super::Fetcher::put_url`]), so a caller moved here sees the same
//! results and the same error lines:
//!
//! ```text
//! GET url, limit    file://  read directly (missing: None), at most limit bytes
//!                   http(s):// and s3:// (credentials from crate::auth, signed per attempt)
//!                     200 → the body (more than limit: TooLarge)   404, 410 → None
//!                     401, 403 → Denied (with the S3 <Code> of the first 4 KiB)
//!                     5xx, 429, 408, no answer → retried after 250 ms, 500 ms, … (Options::retries)
//!                     any other status → Http
//!                   one overall deadline, retries included: small_fetch_deadline, plus (with
//!                   `grow`) a second per SLOW_LINK_BYTES_PER_SEC of the announced length
//! PUT url, body     one attempt within small_fetch_deadline; any status is an answer:
//!                   (status, first PUT_ANSWER bytes, or the S3 <Code> of a refusal)
//! ```
//!
//! Budgets: a body is kept up to its limit (a GET's `limit`, 4 KiB of a
//! refusal, nothing of other statuses beyond [`DISCARD_MAX`]); requests at
//! most [`MAX_CALLS`] at once (a caller's bug, not the network, would pass it).

use super::{
    denied_code, read_local, transient_status, FetchError, Options, DENIED_BODY, PUT_ANSWER, SLOW_LINK_BYTES_PER_SEC,
};
use crate::net::engine::{self, Engine, Handler, NetError, Origin, ReqId};
use crate::net::http1::{Framing, Head};
use rustix::event::PollFlags;
use rustix::fd::BorrowedFd;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Bytes of an answer nobody reads (a 404 page, a redirect) taken off the
/// connection before it is closed instead.
pub const DISCARD_MAX: usize = 64 << 10;
/// Requests in progress at once.
pub const MAX_CALLS: usize = 64;
/// Redirects a GET follows (ureq's agent, which these requests left,
/// followed them too).
pub const MAX_REDIRECTS: u32 = 5;
/// How long an engine's name lookups (it keeps them for its life) and idle
/// connections are reused: an idle client older than this starts afresh,
/// so a long-running agent follows a poll URL's or gateway's DNS changes.
pub const REUSE_FOR: Duration = Duration::from_secs(60);

/// Names one request until it is taken back with [`Oneshot::take_done`].
pub type Ticket = u64;

/// What a finished request gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Done {
    /// A GET's body; `None`: 404, 410 or a missing file.
    Doc(Option<Vec<u8>>),
    /// A PUT's status and the first bytes of the answer (an S3 refusal's code).
    Put(u16, String),
}

enum Kind {
    Get { limit: u64, grow: bool },
    Put { content_type: String, body: Vec<u8> },
}

struct Call {
    url: String,
    kind: Kind,
    start: Instant,
    /// The overall deadline, from `start`.
    allowed: Duration,
    attempt: u32,
    delay: Duration,
    /// Waiting out a backoff until then.
    retry_at: Option<Instant>,
    req: Option<ReqId>,
    redirects: u32,
}

impl Call {
    fn deadline(&self) -> Instant {
        self.start + self.allowed
    }

    fn deadline_error(&self) -> FetchError {
        FetchError::Deadline { url: self.url.clone(), after: self.allowed }
    }
}

/// One response being received.
struct Resp {
    /// A GET's limit (`None`: a PUT).
    get_limit: Option<u64>,
    status: Option<u16>,
    announced: Option<u64>,
    location: Option<String>,
    body: Vec<u8>,
    /// Bytes kept of this answer; the rest is discarded up to [`DISCARD_MAX`].
    keep: usize,
    seen: usize,
    too_large: bool,
}

#[derive(Default)]
struct Inbox {
    resps: BTreeMap<ReqId, Resp>,
    done: Vec<(ReqId, Result<(), NetError>)>,
}

impl Handler for Inbox {
    fn head(&mut self, id: ReqId, head: &Head) -> bool {
        let Some(r) = self.resps.get_mut(&id) else { return false };
        r.status = Some(head.status);
        r.location = head.location.clone();
        r.announced = match head.framing {
            Framing::Length(n) => Some(n),
            _ => None,
        };
        let put_answer = PUT_ANSWER.max(DENIED_BODY) as usize;
        r.keep = match (r.get_limit, head.status) {
            // A GET answered so is tried again (a PUT's answer is its result).
            (Some(_), s) if transient_status(s) => return false,
            (Some(limit), 200) => usize::try_from(limit).unwrap_or(usize::MAX).saturating_add(1),
            (Some(_), 401 | 403) => DENIED_BODY as usize,
            (Some(_), _) => 0,
            (None, _) => put_answer,
        };
        true
    }

    fn data(&mut self, id: ReqId, bytes: &[u8]) -> bool {
        let Some(r) = self.resps.get_mut(&id) else { return false };
        r.seen = r.seen.saturating_add(bytes.len());
        let room = r.keep.saturating_sub(r.body.len());
        r.body.extend_from_slice(&bytes[..room.min(bytes.len())]);
        if r.get_limit.is_some_and(|l| r.status == Some(200) && r.body.len() as u64 > l) {
            r.too_large = true;
            return false;
        }
        r.seen <= r.keep.saturating_add(DISCARD_MAX)
    }

    fn done(&mut self, id: ReqId, result: Result<(), NetError>) {
        self.done.push((id, result));
    }
}

/// See the module.
pub struct Oneshot {
    engine: Engine,
    /// When `engine` was made (see [`REUSE_FOR`]).
    born: Instant,
    inbox: Inbox,
    opts: Options,
    calls: BTreeMap<Ticket, Call>,
    by_req: BTreeMap<ReqId, Ticket>,
    next: Ticket,
    finished: VecDeque<(Ticket, Result<Done, FetchError>)>,
}

impl Oneshot {
    pub fn new(opts: Options) -> Oneshot {
        Oneshot {
            engine: Self::engine(&opts),
            born: Instant::now(),
            inbox: Inbox::default(),
            opts,
            calls: BTreeMap::new(),
            by_req: BTreeMap::new(),
            next: 1,
            finished: VecDeque::new(),
        }
    }

    fn engine(opts: &Options) -> Engine {
        Engine::new(engine::Config {
            // One-off documents: a connection each is plenty, no pipelining
            // (a PUT must not wait behind a trickling GET).
            conns_per_origin: 4,
            pipeline: 1,
            connect_timeout: opts.connect_timeout,
            read_timeout: opts.read_timeout,
            trust: opts.trust.clone(),
            ..engine::Config::default()
        })
    }

    /// GETs `url` (`http(s)://`, `s3://` or `file://`), up to `limit`
    /// bytes; with `grow`, the deadline grows with the announced length.
    pub fn get(&mut self, url: &str, limit: u64, grow: bool) -> Ticket {
        self.add(url, Kind::Get { limit, grow })
    }

    /// PUTs `body` to `url` (`http(s)://` or `s3://`), one attempt.
    pub fn put(&mut self, url: &str, content_type: &str, body: Vec<u8>) -> Ticket {
        self.add(url, Kind::Put { content_type: content_type.to_owned(), body })
    }

    fn add(&mut self, url: &str, kind: Kind) -> Ticket {
        let ticket = self.next;
        self.next += 1;
        let start = Instant::now();
        let call = Call {
            url: url.to_owned(),
            kind,
            start,
            allowed: self.opts.small_fetch_deadline,
            attempt: 0,
            delay: self.opts.backoff,
            retry_at: None,
            req: None,
            redirects: 0,
        };
        if self.calls.len() >= MAX_CALLS {
            let msg = format!("more than {MAX_CALLS} requests at once");
            self.finished.push_back((ticket, Err(FetchError::Transport { url: call.url, msg })));
            return ticket;
        }
        if let Some(path) = url.strip_prefix("file://") {
            let res = match &call.kind {
                Kind::Get { limit, .. } => read_local(url, std::path::Path::new(path), *limit).map(Done::Doc),
                Kind::Put { .. } => Err(FetchError::Transport { url: call.url, msg: "cannot PUT to a file".into() }),
            };
            self.finished.push_back((ticket, res));
            return ticket;
        }
        if self.calls.is_empty() && self.born.elapsed() >= REUSE_FOR {
            self.engine = Self::engine(&self.opts);
            self.born = Instant::now();
        }
        self.calls.insert(ticket, call);
        self.send(ticket);
        ticket
    }

    /// Submits the call's next attempt to the engine, or finishes it.
    fn send(&mut self, ticket: Ticket) {
        let Some(call) = self.calls.get_mut(&ticket) else { return };
        call.retry_at = None;
        let (method, hash) = match &call.kind {
            Kind::Get { .. } => ("GET", crate::auth::sigv4::EMPTY_SHA256.to_owned()),
            Kind::Put { body, .. } => ("PUT", crate::auth::sigv4::sha256_hex(body)),
        };
        let url = call.url.clone();
        // Signed per attempt: an S3 signature carries the time.
        let prepared = crate::auth::prepare_payload(method, &url, crate::clock::now(), &self.opts.credentials, &hash)
            .map_err(|e| FetchError::Auth { url: url.clone(), msg: e.to_string() })
            .and_then(|p| {
                split_url(&p.url).map(|t| (p, t)).map_err(|msg| FetchError::Transport { url: url.clone(), msg })
            });
        let (prepared, (origin, target)) = match prepared {
            Ok(x) => x,
            Err(e) => return self.finish(ticket, Err(e)),
        };
        let mut headers = Vec::new();
        for (name, value) in prepared.headers {
            if name.eq_ignore_ascii_case("host") {
                // The engine sends the origin's authority; a signed Host
                // naming another would fail the signature, so say so.
                if !value.eq_ignore_ascii_case(&origin.authority) {
                    let msg = format!("signed for host {value}, sent to {}", origin.authority);
                    return self.finish(ticket, Err(FetchError::Auth { url, msg }));
                }
                continue;
            }
            headers.push((name.to_owned(), value));
        }
        let o = self.engine.origin_for(origin);
        let deadline = Some(call.deadline());
        let (id, get_limit) = match &call.kind {
            Kind::Get { limit, .. } => (self.engine.submit(o, target, headers, 0, deadline, true), Some(*limit)),
            Kind::Put { content_type, body } => {
                let put = (content_type.clone(), body.clone());
                (self.engine.submit_put(o, target, headers, put, deadline), None)
            }
        };
        call.req = Some(id);
        self.by_req.insert(id, ticket);
        let resp = Resp {
            get_limit,
            status: None,
            announced: None,
            location: None,
            body: Vec::new(),
            keep: 0,
            seen: 0,
            too_large: false,
        };
        self.inbox.resps.insert(id, resp);
    }

    fn finish(&mut self, ticket: Ticket, res: Result<Done, FetchError>) {
        if let Some(call) = self.calls.remove(&ticket) {
            if let Some(id) = call.req {
                self.by_req.remove(&id);
                self.inbox.resps.remove(&id);
            }
        }
        self.finished.push_back((ticket, res));
    }

    /// Requests not finished (taken or not).
    pub fn busy(&self) -> bool {
        !self.calls.is_empty()
    }

    /// Whether finished requests wait to be taken.
    pub fn has_done(&self) -> bool {
        !self.finished.is_empty()
    }

    /// The next finished request.
    pub fn take_done(&mut self) -> Option<(Ticket, Result<Done, FetchError>)> {
        self.finished.pop_front()
    }

    /// For another loop's `poll(2)`: the descriptors to wait on and when
    /// [`Oneshot::turn`] is due at the latest (a backoff's end among them).
    pub fn interest(&self) -> (Vec<(BorrowedFd<'_>, PollFlags)>, Option<Instant>) {
        let (fds, due) = self.engine.interest();
        let retries = self.calls.values().filter_map(|c| c.retry_at);
        let due = due.into_iter().chain(retries).min();
        let due = if self.finished.is_empty() { due } else { Some(Instant::now()) };
        (fds, due)
    }

    /// One round: the engine's (waiting up to `max_wait`, less if a
    /// deadline or backoff ends sooner, also for the caller's `extra`
    /// descriptors: whether any is ready), then what arrived is sorted
    /// into finished requests and retries.
    pub fn turn(&mut self, max_wait: Duration, extra: &[(BorrowedFd<'_>, PollFlags)]) -> bool {
        let now = Instant::now();
        let next_retry = self.calls.values().filter_map(|c| c.retry_at).min();
        let mut wait = next_retry.map_or(max_wait, |t| max_wait.min(t.saturating_duration_since(now)));
        if !self.finished.is_empty() {
            wait = Duration::ZERO;
        }
        let ready = self.engine.turn_with(&mut self.inbox, wait, extra);
        let done = std::mem::take(&mut self.inbox.done);
        for (id, result) in done {
            self.answered(id, result);
        }
        self.grow_deadlines();
        let now = Instant::now();
        let due: Vec<Ticket> =
            self.calls.iter().filter(|(_, c)| c.retry_at.is_some_and(|t| now >= t)).map(|(t, _)| *t).collect();
        for t in due {
            if self.calls.get(&t).is_some_and(|c| now >= c.deadline()) {
                let e = self.calls[&t].deadline_error();
                self.finish(t, Err(e));
            } else {
                self.send(t);
            }
        }
        ready
    }

    /// A document announcing its length earns more time on a slow link
    /// (as [`super::Fetcher::get_url`] gives it).
    fn grow_deadlines(&mut self) {
        for call in self.calls.values_mut() {
            let Kind::Get { limit, grow: true } = call.kind else { continue };
            let Some(id) = call.req else { continue };
            let Some(announced) = self.inbox.resps.get(&id).filter(|r| r.status == Some(200)).and_then(|r| r.announced)
            else {
                continue;
            };
            let allowed =
                self.opts.small_fetch_deadline + Duration::from_secs(announced.min(limit) / SLOW_LINK_BYTES_PER_SEC);
            if allowed != call.allowed {
                call.allowed = allowed;
                self.engine.set_deadline(id, Some(call.deadline()));
            }
        }
    }

    /// The engine is done with request `id`: a result, or a retry.
    fn answered(&mut self, id: ReqId, result: Result<(), NetError>) {
        let Some(ticket) = self.by_req.remove(&id) else { return };
        let resp = self.inbox.resps.remove(&id);
        let Some(call) = self.calls.get_mut(&ticket) else { return };
        call.req = None;
        let url = call.url.clone();
        let status = resp.as_ref().and_then(|r| r.status);
        let too_large = resp.as_ref().is_some_and(|r| r.too_large);
        let location = resp.as_ref().and_then(|r| r.location.clone());
        // A GET's redirect is followed (not an S3 one: its signed headers,
        // a session token among them, must not go to another host), with
        // the credentials of where it leads, within the same deadline.
        let redirect = matches!(status, Some(301 | 302 | 303 | 307 | 308))
            && !call_is_put(call)
            && !url.starts_with("s3://")
            && matches!(result, Ok(()) | Err(NetError::Stopped));
        if let (true, Some(to)) = (redirect, location.as_deref().and_then(|l| resolve(&url, l))) {
            if call.redirects < MAX_REDIRECTS {
                call.redirects += 1;
                call.url = to;
                return self.send(ticket);
            }
        }
        let body = resp.map(|r| r.body).unwrap_or_default();
        // Ok: the call's result; Err: what failed, if no retry comes.
        let outcome = match (result, status) {
            (Err(NetError::Deadline), _) => Ok(Err(call.deadline_error())),
            (Err(NetError::Stopped), _) if too_large => {
                let limit = match call.kind {
                    Kind::Get { limit, .. } => limit,
                    Kind::Put { .. } => 0,
                };
                Ok(Err(FetchError::TooLarge { url, limit }))
            }
            (_, Some(s)) if transient_status(s) && !call_is_put(call) => Err(FetchError::Http { url, status: s }),
            // Stopped here: the unread rest of an answer was cut off.
            (Ok(()) | Err(NetError::Stopped), Some(s)) => Ok(classify(call, s, body)),
            (Ok(()), None) => Err(FetchError::Transport { url, msg: "no response".into() }),
            (Err(e), _) => Err(FetchError::Transport { url, msg: e.to_string() }),
        };
        let retryable = match outcome {
            Ok(res) => return self.finish(ticket, res),
            Err(e) => e,
        };
        // One attempt for a PUT (the next push is its retry).
        let now = Instant::now();
        if call_is_put(call) {
            let e = if now >= call.deadline() { call.deadline_error() } else { retryable };
            return self.finish(ticket, Err(e));
        }
        if now >= call.deadline() {
            let e = call.deadline_error();
            return self.finish(ticket, Err(e));
        }
        if call.attempt >= self.opts.retries {
            return self.finish(ticket, Err(retryable));
        }
        log::warn!("{retryable}; retrying in {:?}", call.delay);
        call.attempt += 1;
        call.retry_at = Some(now + call.delay.min(call.deadline().saturating_duration_since(now)));
        call.delay *= 2;
    }
}

fn call_is_put(call: &Call) -> bool {
    matches!(call.kind, Kind::Put { .. })
}

/// A complete answer with `status` and the kept `body`, by the module's table.
fn classify(call: &Call, status: u16, body: Vec<u8>) -> Result<Done, FetchError> {
    let url = call.url.clone();
    match (&call.kind, status) {
        (Kind::Put { .. }, s) => match denied_code(&body).filter(|_| s >= 400) {
            Some(code) => Ok(Done::Put(s, code)),
            None => Ok(Done::Put(s, crate::text::clip_bytes(&body, PUT_ANSWER as usize))),
        },
        (Kind::Get { .. }, 200) => Ok(Done::Doc(Some(body))),
        (Kind::Get { .. }, 404 | 410) => Ok(Done::Doc(None)),
        (Kind::Get { .. }, 401 | 403) => Err(FetchError::Denied { what: url, status, code: denied_code(&body) }),
        (Kind::Get { .. }, _) => Err(FetchError::Http { url, status }),
    }
}

/// Where a `Location` from `base` leads: an absolute `http(s)://` URL, or
/// a reference resolved against `base` (RFC 3986 5.2, without dot segments:
/// a server naming one gets it sent as written).
fn resolve(base: &str, location: &str) -> Option<String> {
    if location.starts_with("http://") || location.starts_with("https://") {
        return Some(location.to_owned());
    }
    let (scheme, rest) = base.split_once("://")?;
    let (authority, tail) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    if let Some(net) = location.strip_prefix("//") {
        return Some(format!("{scheme}://{net}"));
    }
    if location.starts_with('/') {
        return Some(format!("{scheme}://{authority}{location}"));
    }
    if location.contains("://") {
        return None;
    }
    let path = tail.split(['?', '#']).next().unwrap_or("");
    let dir = path.rsplit_once('/').map_or("/", |(d, _)| d);
    let dir = dir.trim_end_matches('/');
    Some(format!("{scheme}://{authority}{dir}/{location}"))
}

/// `scheme://authority[/path][?query][#fragment]` → the origin and the
/// request target (`/` when the path is empty; the fragment dropped).
fn split_url(url: &str) -> Result<(Origin, String), String> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| format!("{url:?}: not a URL"))?;
    let rest = rest.split('#').next().unwrap_or(rest);
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, target) = rest.split_at(end);
    let (origin, _) = Origin::parse(&format!("{scheme}://{authority}"))?;
    let target = match target {
        "" => "/".to_owned(),
        t if t.starts_with('?') => format!("/{t}"),
        t => t.to_owned(),
    };
    Ok((origin, target))
}

#[cfg(test)]
mod tests;
