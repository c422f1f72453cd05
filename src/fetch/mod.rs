//! The I/O edge towards binary caches: `http://`, `https://`, `s3://` and
//! `file://`, tried in priority order, through one ureq agent whose idle connections
//! are reused (keep-alive) across narinfo and NAR requests.
//!
//! Transient failures (connection errors, timeouts, 5xx, 429) are retried
//! with exponential backoff; a NAR download that breaks mid-body resumes
//! with an HTTP `Range` request (see [`resume`]). A 404 means "not in this
//! cache" and falls through to the next one.
//!
//! Every wait on the network ticks (see [`ticking`]): the caller's tick runs
//! at least every 50 ms whatever the server does. Small documents (narinfo,
//! `nix-cache-info`, a polled deploy document and its signature) also have
//! an overall deadline, retries included, so a server that trickles bytes
//! cannot hold a fetch open for longer than [`Options::small_fetch_deadline`].
//!
//! The agent's loop does not use this blocking fetcher for its small
//! requests: [`oneshot`] gives the same rules on the network engine,
//! without blocking and without ticks.
//!
//! Private caches: every request goes through [`crate::auth::prepare`]
//! (netrc, bearer tokens, S3 signatures); a 401 or 403 is one line naming
//! the cache and, for S3, the error code the server gave.

pub mod decompress;
pub mod oneshot;
pub mod pipeline;
pub mod resume;
pub mod ticking;

use crate::auth::{self, Credentials};
use crate::nix::cache_info;
use crate::nix::StorePath;
use std::cell::RefCell;
use std::io::{self, Read};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ureq::unversioned::resolver::DefaultResolver;
use ureq::unversioned::transport::{ConnectProxyConnector, Connector, RustlsConnector};

/// Largest narinfo accepted: a path with thousands of references fits.
pub const MAX_NARINFO: u64 = 1 << 20;

/// The slowest link a polled document must still arrive over: beyond the
/// small-fetch deadline, each 8 KiB its `Content-Length` announces adds a
/// second. A document that embeds a closure's narinfos (for slow links) is
/// about 1 MB: 15 s + 2 min. A trickling server is still cut off, and the
/// loop ticks throughout either way.
pub const SLOW_LINK_BYTES_PER_SEC: u64 = 8 << 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheUrl {
    /// `http(s)://host[:port]/prefix`, without a trailing slash.
    Http(String),
    /// `file:///dir`: a cache on a local or removable disk.
    File(PathBuf),
    /// `s3://bucket[?params]` (see [`auth::s3`]), without a trailing slash.
    S3(String),
}

impl CacheUrl {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim_end_matches('/');
        if let Some(path) = s.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(format!("cache URL {s:?}: file:// needs an absolute path"));
            }
            Ok(CacheUrl::File(PathBuf::from(path)))
        } else if s.starts_with("http://") || s.starts_with("https://") {
            if s.contains('?') || s.contains('#') {
                return Err(format!("cache URL {s:?}: query strings are not supported"));
            }
            // A password in the URL would be shown wherever the URL is.
            let authority = s.split_once("://").map_or("", |(_, r)| r.split('/').next().unwrap_or(""));
            if authority.contains('@') {
                return Err("cache URL: user or password in the URL; put them in a netrc file instead".into());
            }
            Ok(CacheUrl::Http(s.to_owned()))
        } else if s.starts_with("s3://") {
            let url = CacheUrl::S3(s.to_owned());
            auth::s3::target(&url.join("nix-cache-info")).map_err(|e| format!("cache URL {s:?}: {e}"))?;
            Ok(url)
        } else {
            Err(format!("cache URL {s:?}: expected http://, https://, s3:// or file://"))
        }
    }

    /// The URL of `rel` in this cache (for `s3://`, the key goes before the
    /// parameters).
    pub fn join(&self, rel: &str) -> String {
        match self {
            CacheUrl::Http(base) => format!("{base}/{rel}"),
            CacheUrl::File(p) => format!("file://{}/{rel}", p.display()),
            // A `?` in `rel` (a narinfo's URL) is part of the key, as in
            // Nix's S3 store: the cache's parameters, or a bare `?`, follow
            // it, so `auth::s3::target` never reads the key's as parameters.
            CacheUrl::S3(s) => match s.split_once('?') {
                Some((bucket, params)) => format!("{}/{rel}?{params}", bucket.trim_end_matches('/')),
                None if rel.contains('?') => format!("{s}/{rel}?"),
                None => format!("{s}/{rel}"),
            },
        }
    }
}

impl std::fmt::Display for CacheUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheUrl::Http(u) => f.write_str(u),
            CacheUrl::File(p) => write!(f, "file://{}", p.display()),
            CacheUrl::S3(u) => f.write_str(u),
        }
    }
}

#[derive(Debug)]
pub enum FetchError {
    /// The cache is for another store directory, or its nix-cache-info is garbage.
    CacheInfo {
        cache: String,
        msg: String,
    },
    /// No cache has the path (each answered 404, or could not be reached).
    NotFound {
        path: String,
        unreachable: Vec<String>,
    },
    Http {
        url: String,
        status: u16,
    },
    Transport {
        url: String,
        msg: String,
    },
    TooLarge {
        url: String,
        limit: u64,
    },
    /// A small document did not arrive whole within its overall deadline.
    Deadline {
        url: String,
        after: Duration,
    },
    /// The request could not be authorised (no credentials for it).
    Auth {
        url: String,
        msg: String,
    },
    /// 401 or 403: `what` names the cache (or the URL), `code` is the S3
    /// error code from the answer, if any.
    Denied {
        what: String,
        status: u16,
        code: Option<String>,
    },
}

impl std::fmt::Display for FetchError {
    /// URLs and messages may carry a cache's text (a narinfo's URL, an
    /// answer's words): clipped and escaped, so an error stays one bounded line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::text::clip;
        const URL: usize = 512;
        const MSG: usize = 512;
        match self {
            FetchError::CacheInfo { cache, msg } => {
                write!(f, "cache {}: {}", clip(&cache.to_string(), URL), clip(msg, MSG))
            }
            FetchError::NotFound { path, unreachable } => {
                write!(f, "{path}: not found in any cache")?;
                if !unreachable.is_empty() {
                    let list: Vec<String> = unreachable.iter().take(8).map(|u| clip(u, MSG)).collect();
                    write!(f, " (unreachable: {})", list.join("; "))?;
                }
                Ok(())
            }
            FetchError::Http { url, status } => write!(f, "GET {}: HTTP {status}", clip(url, URL)),
            FetchError::Transport { url, msg } => write!(f, "GET {}: {}", clip(url, URL), clip(msg, MSG)),
            FetchError::TooLarge { url, limit } => {
                write!(f, "GET {}: larger than {limit} bytes", clip(url, URL))
            }
            FetchError::Deadline { url, after } => {
                write!(
                    f,
                    "GET {}: no complete answer within {} s (overall deadline)",
                    clip(url, URL),
                    after.as_secs_f32()
                )
            }
            FetchError::Auth { url, msg } => write!(f, "GET {}: {}", clip(url, URL), clip(msg, MSG)),
            FetchError::Denied { what, status, code } => {
                let reason = if *status == 401 { "Unauthorized" } else { "Forbidden" };
                write!(f, "{}: {status} {reason}", clip(what, URL))?;
                match code {
                    Some(c) => write!(f, " ({})", clip(c, 64)),
                    None => Ok(()),
                }
            }
        }
    }
}

impl std::error::Error for FetchError {}

/// Knobs for the network side.
#[derive(Debug, Clone)]
pub struct Options {
    pub connect_timeout: Duration,
    /// Longest silence while reading a response, after which the read fails
    /// (and a NAR download resumes).
    pub read_timeout: Duration,
    /// Retries of one request after a transient failure.
    pub retries: u32,
    /// First backoff; doubled on each retry.
    pub backoff: Duration,
    /// Longest a small document (narinfo, nix-cache-info, a polled deploy
    /// document or signature) may take, retries included.
    pub small_fetch_deadline: Duration,
    /// For private caches (netrc, bearer tokens, S3 keys).
    pub credentials: Arc<Credentials>,
    /// The authorities `https://` caches are checked against.
    pub trust: crate::net::tls::Trust,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            retries: 4,
            backoff: Duration::from_millis(250),
            small_fetch_deadline: Duration::from_secs(15),
            credentials: Arc::new(Credentials::default()),
            trust: crate::net::tls::Trust::WebPki,
        }
    }
}

/// A ureq agent over ureq's default chain with its blocking TCP transport
/// swapped for the ticking one (TLS wraps it, so https ticks too). The admin
/// side uses it as well, so only one TCP transport is linked in.
pub fn http_agent(config: ureq::config::Config) -> ureq::Agent {
    let connector =
        ().chain(ConnectProxyConnector::default()).chain(ticking::TickingConnector).chain(RustlsConnector::default());
    ureq::Agent::with_parts(config, connector, DefaultResolver::default())
}

/// A response that answered: its status and body.
pub(crate) enum Answer {
    Found(Box<dyn Read + Send>),
    /// 404/410, or a missing file.
    Missing,
}

/// How one cache is doing in this run.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Health {
    Unchecked,
    Ok,
    /// Not usable this run (unreachable or no nix-cache-info), with why.
    Down(String),
}

pub struct Fetcher {
    agent: ureq::Agent,
    caches: Vec<(CacheUrl, Health)>,
    opts: Options,
    /// Called during every wait (network, backoff) so a supervisor can keep
    /// pinging; shared with the transport through [`ticking::Scope`].
    tick: ticking::Hook,
}

/// An HTTP status worth asking again for (server trouble, rate limits,
/// timeouts): the one rule of every client here.
pub(crate) fn transient_status(status: u16) -> bool {
    status >= 500 || status == 429 || status == 408
}

/// A local (`file://`) document of at most `limit` bytes; `None` if there
/// is no such file. `url` names it in errors.
pub(crate) fn read_local(url: &str, path: &std::path::Path, limit: u64) -> Result<Option<Vec<u8>>, FetchError> {
    let err = |e: io::Error| FetchError::Transport { url: url.to_owned(), msg: e.to_string() };
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    let mut buf = Vec::new();
    io::Read::read_to_end(&mut io::Read::take(f, limit.saturating_add(1)), &mut buf).map_err(err)?;
    if buf.len() as u64 > limit {
        return Err(FetchError::TooLarge { url: url.to_owned(), limit });
    }
    Ok(Some(buf))
}

impl Fetcher {
    pub fn new(caches: Vec<CacheUrl>, opts: Options) -> Self {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(opts.connect_timeout))
            .timeout_per_read(Some(opts.read_timeout))
            .timeout_recv_response(Some(opts.read_timeout))
            .max_idle_connections_per_host(4)
            .user_agent(concat!("nixless/", env!("CARGO_PKG_VERSION")))
            .tls_config(ureq::tls::TlsConfig::builder().root_certs(crate::net::tls::ureq_roots(&opts.trust)).build())
            .build();
        let agent = http_agent(config);
        Fetcher {
            agent,
            caches: caches.into_iter().map(|c| (c, Health::Unchecked)).collect(),
            opts,
            tick: Rc::new(RefCell::new(Box::new(|| {}))),
        }
    }

    /// Installs a function called during waits and long transfers.
    pub fn set_tick(&mut self, tick: Box<dyn FnMut()>) {
        self.tick = Rc::new(RefCell::new(tick));
    }

    pub fn tick(&mut self) {
        // Busy means this call came from inside the tick itself.
        if let Ok(mut f) = self.tick.try_borrow_mut() {
            f()
        }
    }

    /// Makes the network waits of this thread tick, and end at `deadline`,
    /// until the scope is dropped.
    pub(crate) fn scope(&self, deadline: Option<Instant>) -> ticking::Scope {
        ticking::enter(Some(self.tick.clone()), deadline)
    }

    /// The deadline of a small fetch starting now.
    fn small_deadline(&self) -> Instant {
        Instant::now() + self.opts.small_fetch_deadline
    }

    fn deadline_error(&self, url: &str, after: Duration) -> FetchError {
        FetchError::Deadline { url: url.to_owned(), after }
    }

    pub fn cache_count(&self) -> usize {
        self.caches.len()
    }

    pub fn cache_url(&self, idx: usize) -> &CacheUrl {
        &self.caches[idx].0
    }

    pub(crate) fn options(&self) -> &Options {
        &self.opts
    }

    pub(crate) fn sleep(&mut self, d: Duration) {
        // Sleep in slices so the tick keeps running through long backoffs.
        let mut left = d;
        while !left.is_zero() {
            let step = left.min(ticking::SLICE);
            std::thread::sleep(step);
            left -= step;
            self.tick();
        }
    }

    /// One GET with retries on transient failures, all before `deadline`
    /// if there is one. `offset` > 0 asks for a range; the caller checks
    /// which it got through the returned status.
    pub(crate) fn get_http(
        &mut self,
        url: &str,
        offset: u64,
        deadline: Option<Instant>,
    ) -> Result<(u16, ureq::http::Response<ureq::Body>), FetchError> {
        let _scope = self.scope(deadline);
        let passed = || deadline.is_some_and(|d| Instant::now() >= d);
        let mut delay = self.opts.backoff;
        let mut attempt = 0;
        loop {
            // Signed per attempt: an S3 signature carries the time.
            let now =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            let prepared = auth::prepare("GET", url, now, &self.opts.credentials)
                .map_err(|e| FetchError::Auth { url: url.to_owned(), msg: e.to_string() })?;
            let mut req = self.agent.get(&prepared.url);
            for (name, value) in &prepared.headers {
                req = req.header(*name, value);
            }
            if offset > 0 {
                req = req.header("Range", format!("bytes={offset}-"));
            }
            if url.starts_with("s3://") {
                // The signed Host and x-amz-* headers (a session token among
                // them) must not follow a redirect to another host; ureq
                // drops only Authorization.
                req = req.config().max_redirects(0).build();
            }
            let outcome = match req.call() {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    if !transient_status(status) {
                        return Ok((status, resp));
                    }
                    FetchError::Http { url: url.to_owned(), status }
                }
                Err(e) => FetchError::Transport { url: url.to_owned(), msg: e.to_string() },
            };
            if passed() {
                return Err(self.deadline_error(url, self.opts.small_fetch_deadline));
            }
            if attempt >= self.opts.retries {
                return Err(outcome);
            }
            log::warn!("{outcome}; retrying in {delay:?}");
            attempt += 1;
            self.sleep(deadline.map_or(delay, |d| delay.min(d.saturating_duration_since(Instant::now()))));
            if passed() {
                return Err(self.deadline_error(url, self.opts.small_fetch_deadline));
            }
            delay *= 2;
        }
    }

    /// Reads `rel` (relative to cache `idx`) whole, up to `limit` bytes,
    /// within the small-fetch deadline.
    fn get_small(&mut self, idx: usize, rel: &str, limit: u64) -> Result<Option<Vec<u8>>, FetchError> {
        let deadline = self.small_deadline();
        let _scope = self.scope(Some(deadline));
        let url = self.caches[idx].0.join(rel);
        match self.open(idx, rel, 0, Some(deadline))? {
            Answer::Missing => Ok(None),
            Answer::Found(body) => {
                self.read_small(&url, body, limit, (deadline, self.opts.small_fetch_deadline)).map(Some)
            }
        }
    }

    /// Reads a small body whole, up to `limit` bytes; the caller holds a
    /// scope with `deadline`, which is `allowed` after the fetch started.
    fn read_small(
        &self,
        url: &str,
        body: Box<dyn Read>,
        limit: u64,
        (deadline, allowed): (Instant, Duration),
    ) -> Result<Vec<u8>, FetchError> {
        let mut buf = Vec::new();
        if let Err(e) = body.take(limit + 1).read_to_end(&mut buf) {
            if Instant::now() >= deadline {
                return Err(self.deadline_error(url, allowed));
            }
            return Err(FetchError::Transport { url: url.to_owned(), msg: e.to_string() });
        }
        if buf.len() as u64 > limit {
            return Err(FetchError::TooLarge { url: url.to_owned(), limit });
        }
        Ok(buf)
    }

    /// Opens `rel` in cache `idx` from byte `offset` (which must be honoured:
    /// a server ignoring Range has its first `offset` bytes skipped). The
    /// response head (and any skipped bytes) must arrive before `deadline`.
    pub(crate) fn open(
        &mut self,
        idx: usize,
        rel: &str,
        offset: u64,
        deadline: Option<Instant>,
    ) -> Result<Answer, FetchError> {
        match self.caches[idx].0.clone() {
            CacheUrl::File(dir) => {
                // A query string means nothing to a directory.
                let rel = rel.split(['?', '#']).next().unwrap_or(rel);
                let path = dir.join(rel);
                let io_err = |e: io::Error| FetchError::Transport {
                    url: format!("file://{}", path.display()),
                    msg: e.to_string(),
                };
                match std::fs::File::open(&path) {
                    Ok(mut f) => {
                        if offset > 0 {
                            io::Seek::seek(&mut f, io::SeekFrom::Start(offset)).map_err(io_err)?;
                        }
                        Ok(Answer::Found(Box::new(f)))
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Answer::Missing),
                    Err(e) => Err(io_err(e)),
                }
            }
            cache @ (CacheUrl::Http(_) | CacheUrl::S3(_)) => {
                let url = cache.join(rel);
                let _scope = self.scope(deadline);
                let (status, resp) = self.get_http(&url, offset, deadline)?;
                match status {
                    200 | 206 => {
                        let got_range = status == 206;
                        if offset > 0 && got_range {
                            let start = resp
                                .headers()
                                .get("content-range")
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.strip_prefix("bytes "))
                                .and_then(|v| v.split('-').next())
                                .and_then(|v| v.parse::<u64>().ok());
                            if start != Some(offset) {
                                return Err(FetchError::Transport {
                                    url,
                                    msg: format!(
                                        "asked for bytes from {offset}, got Content-Range starting at {start:?}"
                                    ),
                                });
                            }
                        }
                        let mut body: Box<dyn Read + Send> = Box::new(resp.into_body().into_reader());
                        if offset > 0 && !got_range {
                            // The server ignored Range: start over from zero
                            // on the wire, skipping what we already have.
                            log::info!("{url}: server ignored Range, re-reading {offset} bytes");
                            let skipped = io::copy(&mut (&mut body).take(offset), &mut io::sink())
                                .map_err(|e| FetchError::Transport { url: url.clone(), msg: e.to_string() })?;
                            if skipped != offset {
                                return Err(FetchError::Transport {
                                    url,
                                    msg: "body shorter than on the first attempt".into(),
                                });
                            }
                        }
                        Ok(Answer::Found(body))
                    }
                    404 | 410 => Ok(Answer::Missing),
                    401 | 403 => Err(denied(format!("cache {cache}"), status, resp)),
                    _ => Err(FetchError::Http { url, status }),
                }
            }
        }
    }

    /// GETs an absolute `http(s)://` or `file:///` URL, up to `limit` bytes;
    /// `None` on 404 or a missing file. For deploy documents and their
    /// signatures (poll mode), within the small-fetch deadline extended for
    /// the announced length (see [`SLOW_LINK_BYTES_PER_SEC`]).
    pub fn get_url(&mut self, url: &str, limit: u64) -> Result<Option<Vec<u8>>, FetchError> {
        let start = Instant::now();
        let mut allowed = self.opts.small_fetch_deadline;
        let _scope = self.scope(Some(start + allowed));
        let body: Box<dyn Read> = if let Some(path) = url.strip_prefix("file://") {
            match std::fs::File::open(path) {
                Ok(f) => Box::new(f),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(FetchError::Transport { url: url.to_owned(), msg: e.to_string() }),
            }
        } else {
            let (status, resp) = self.get_http(url, 0, Some(start + allowed))?;
            match status {
                200 => {
                    let announced = resp
                        .headers()
                        .get("content-length")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                    allowed += Duration::from_secs(announced.min(limit) / SLOW_LINK_BYTES_PER_SEC);
                    Box::new(resp.into_body().into_reader())
                }
                404 | 410 => return Ok(None),
                401 | 403 => return Err(denied(url.to_owned(), status, resp)),
                _ => return Err(FetchError::Http { url: url.to_owned(), status }),
            }
        };
        let _body_scope = self.scope(Some(start + allowed));
        self.read_small(url, body, limit, (start + allowed, allowed)).map(Some)
    }

    /// PUTs `body` to an absolute `http(s)://` or `s3://` URL (a Pushgateway group, a halt document):
    /// one attempt, with credentials as for a GET, ending at the small-fetch
    /// deadline. Returns the status and the first [`PUT_ANSWER`] bytes of
    /// the answer (a gateway says there why it refused a push).
    pub fn put_url(&mut self, url: &str, content_type: &str, body: &[u8]) -> Result<(u16, String), FetchError> {
        let deadline = self.small_deadline();
        let _scope = self.scope(Some(deadline));
        let now = crate::clock::now();
        let hash = auth::sigv4::sha256_hex(body);
        let prepared = auth::prepare_payload("PUT", url, now, &self.opts.credentials, &hash)
            .map_err(|e| FetchError::Auth { url: url.to_owned(), msg: e.to_string() })?;
        let mut req = self.agent.put(&prepared.url).header("content-type", content_type);
        for (name, value) in &prepared.headers {
            req = req.header(*name, value);
        }
        if url.starts_with("s3://") {
            // As for a GET: signed headers never follow a redirect.
            req = req.config().max_redirects(0).build();
        }
        let resp = match req.send(body) {
            Ok(resp) => resp,
            Err(_) if Instant::now() >= deadline => {
                return Err(self.deadline_error(url, self.opts.small_fetch_deadline))
            }
            Err(e) => return Err(FetchError::Transport { url: url.to_owned(), msg: e.to_string() }),
        };
        let status = resp.status().as_u16();
        let mut answer = Vec::new();
        // Best effort: the status is the result; the words only explain it.
        // An S3 error document says it in its <Code> (the rest is XML noise
        // and request ids), the same word a refused GET shows.
        let _ = resp.into_body().into_reader().take(PUT_ANSWER.max(DENIED_BODY)).read_to_end(&mut answer);
        if let Some(code) = denied_code(&answer).filter(|_| status >= 400) {
            return Ok((status, code));
        }
        Ok((status, crate::text::clip_bytes(&answer, PUT_ANSWER as usize)))
    }

    /// Whether cache `idx` answers at all (its nix-cache-info), uncached:
    /// the health check's "can I still reach my cache".
    pub fn probe(&mut self, idx: usize) -> Result<(), FetchError> {
        match self.get_small(idx, "nix-cache-info", 64 << 10)? {
            Some(_) => Ok(()),
            None => Err(FetchError::Http { url: self.caches[idx].0.join("nix-cache-info"), status: 404 }),
        }
    }

    /// Checks cache `idx`'s nix-cache-info once per run. A wrong StoreDir is
    /// an error; an unreachable cache is skipped for this run.
    fn check(&mut self, idx: usize) -> Result<bool, FetchError> {
        match &self.caches[idx].1 {
            Health::Ok => return Ok(true),
            Health::Down(_) => return Ok(false),
            Health::Unchecked => {}
        }
        let cache = self.caches[idx].0.to_string();
        let health = match self.get_small(idx, "nix-cache-info", 64 << 10) {
            Ok(Some(bytes)) => {
                let text = String::from_utf8_lossy(&bytes);
                cache_info::parse(&text)
                    .map_err(|e| FetchError::CacheInfo { cache: cache.clone(), msg: e.to_string() })?;
                Health::Ok
            }
            Ok(None) => Health::Down(format!("{cache}: no nix-cache-info (not a binary cache)")),
            Err(e) => Health::Down(e.to_string()),
        };
        if let Health::Down(why) = &health {
            log::warn!("skipping cache for this run: {why}");
        }
        let ok = health == Health::Ok;
        self.caches[idx].1 = health;
        Ok(ok)
    }

    /// Finds `path`'s narinfo in the first cache from index `from` on that
    /// has it: the text and the index of that cache.
    pub fn narinfo(&mut self, path: &StorePath, from: usize) -> Result<(usize, String), FetchError> {
        let rel = format!("{}.narinfo", path.hash_part());
        let mut unreachable = Vec::new();
        for idx in from..self.caches.len() {
            if !self.check(idx)? {
                if let Health::Down(why) = &self.caches[idx].1 {
                    unreachable.push(why.clone());
                }
                continue;
            }
            match self.get_small(idx, &rel, MAX_NARINFO) {
                Ok(Some(bytes)) => {
                    let text = String::from_utf8(bytes).map_err(|_| FetchError::Transport {
                        url: self.caches[idx].0.join(&rel),
                        msg: "narinfo is not UTF-8".into(),
                    })?;
                    return Ok((idx, text));
                }
                Ok(None) => continue,
                Err(e @ FetchError::TooLarge { .. }) => return Err(e),
                Err(e) => unreachable.push(e.to_string()),
            }
        }
        Err(FetchError::NotFound { path: path.to_string(), unreachable })
    }
}

/// A 401/403, with the S3 error code of its body (`<Code>…</Code>`) if
/// there is one: read up to 4 KiB, and kept only if it looks like a code,
/// so nothing else the server echoes (a canonical request, a header) is shown.
fn denied(what: String, status: u16, resp: ureq::http::Response<ureq::Body>) -> FetchError {
    let mut body = Vec::new();
    let _ = resp.into_body().into_reader().take(DENIED_BODY).read_to_end(&mut body);
    FetchError::Denied { what, status, code: denied_code(&body) }
}

/// How much of an answer to a PUT is kept.
pub const PUT_ANSWER: u64 = 512;

/// How much of a 401/403 answer is read for its error code.
pub(crate) const DENIED_BODY: u64 = 4096;

/// The S3 error code (`<Code>…</Code>`) of a 401/403 answer's first
/// [`DENIED_BODY`] bytes, kept only if it looks like a code.
pub(crate) fn denied_code(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    text.split_once("<Code>")
        .and_then(|(_, r)| r.split_once("</Code>"))
        .map(|(c, _)| c.to_owned())
        .filter(|c| !c.is_empty() && c.len() <= 64 && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::io::Write;
    use std::net::TcpListener;

    /// A narinfo's URL may carry a query (Nix allows one, and its S3 store
    /// takes it as part of the key). Joined to an S3 cache it must stay in
    /// the key: as parameters, `endpoint=` would send the signed request
    /// (and any session token) to the cache's writer's host of choice, and
    /// `profile=` would pick other credentials.
    #[test]
    fn a_query_in_a_narinfo_url_stays_in_the_key() {
        let rel = "nar/x.nar?endpoint=evil.example&scheme=http&profile=admin&priority=";
        for (cache, host) in [
            ("s3://b?region=eu-west-1", "s3.eu-west-1.amazonaws.com"),
            ("s3://b", "s3.us-east-1.amazonaws.com"),
            ("s3://b?endpoint=minio.lan:9000&scheme=http", "minio.lan:9000"),
        ] {
            let url = CacheUrl::parse(cache).unwrap().join(rel);
            let t = crate::auth::s3::target(&url).unwrap();
            assert_eq!((t.host.as_str(), t.profile.as_deref()), (host, None), "{url}");
            assert_eq!(
                t.canonical_uri,
                "/b/nar/x.nar%3Fendpoint%3Devil.example%26scheme%3Dhttp%26profile%3Dadmin%26priority%3D"
            );
        }
        // An object URL without a query is unchanged.
        let t = crate::auth::s3::target(&CacheUrl::parse("s3://b").unwrap().join("nar/y.nar")).unwrap();
        assert_eq!(t.url, "https://s3.us-east-1.amazonaws.com/b/nar/y.nar");
    }

    /// Serves one connection: a complete head announcing `len` bytes, then
    /// a body byte every 100 ms, never finishing (until the client goes away).
    fn trickling_body_server(len: u64) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/doc.json", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            let Ok((mut c, _)) = listener.accept() else { return };
            let mut head = [0u8; 4096];
            let _ = c.read(&mut head);
            let _ = c.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n{{").as_bytes());
            while c.write_all(b" ").is_ok() {
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        url
    }

    /// A fetcher with a 1.5 s small-fetch deadline, no retries, counting ticks.
    fn counting_fetcher() -> (Fetcher, Rc<Cell<u32>>) {
        let opts = Options { small_fetch_deadline: Duration::from_millis(1500), retries: 0, ..Options::default() };
        let mut f = Fetcher::new(vec![], opts);
        let ticks = Rc::new(Cell::new(0u32));
        let t = ticks.clone();
        f.set_tick(Box::new(move || t.set(t.get() + 1)));
        (f, ticks)
    }

    /// The fetch ends on its deadline, having ticked all along (a tick at
    /// least every 50 ms while waiting; 10 in 1.5 s leaves slack for the host).
    fn assert_deadline_with_ticks(f: &mut Fetcher, ticks: &Cell<u32>, url: &str) {
        assert_deadline_after(f, ticks, url, "1.5");
    }

    fn assert_deadline_after(f: &mut Fetcher, ticks: &Cell<u32>, url: &str, secs: &str) {
        let err = f.get_url(url, 1 << 20).unwrap_err();
        assert!(matches!(err, FetchError::Deadline { .. }), "{err}");
        assert!(err.to_string().contains(&format!("within {secs} s (overall deadline)")), "{err}");
        assert!(ticks.get() >= 10, "{} ticks", ticks.get());
    }

    #[test]
    fn a_trickling_body_ends_at_the_deadline_and_ticks_throughout() {
        let url = trickling_body_server(1000);
        let (mut f, ticks) = counting_fetcher();
        assert_deadline_with_ticks(&mut f, &ticks, &url);
    }

    /// A document announcing 8 KiB gets one more second (a slow link must
    /// still deliver a large one); the announcement is capped by the limit.
    #[test]
    fn the_deadline_grows_with_the_announced_length() {
        let (mut f, ticks) = counting_fetcher();
        assert_deadline_after(&mut f, &ticks, &trickling_body_server(SLOW_LINK_BYTES_PER_SEC), "2.5");
        let (mut f, ticks) = counting_fetcher();
        let err = f.get_url(&trickling_body_server(u64::MAX), 100).unwrap_err();
        assert!(err.to_string().contains("within 1.5 s (overall deadline)"), "{err}");
        assert!(ticks.get() >= 10);
    }

    /// TLS sits above the ticking transport: a server that accepts and
    /// never answers the ClientHello is waited on in ticks too.
    #[test]
    fn a_silent_https_server_ends_at_the_deadline_and_ticks_throughout() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://{}/doc.json", listener.local_addr().unwrap());
        let held = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
        let (mut f, ticks) = counting_fetcher();
        assert_deadline_with_ticks(&mut f, &ticks, &url);
        drop(held.join());
    }

    /// A server that refuses with 403 and echoes the request (headers
    /// included, as some servers' error pages do): the error names the cache
    /// and the S3 code, and never carries the token it was sent.
    #[test]
    fn a_403_names_the_cache_and_code_but_not_the_secret() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}/private", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let mut head = [0u8; 4096];
            let n = c.read(&mut head).unwrap();
            let req = String::from_utf8_lossy(&head[..n]).into_owned();
            let body = format!("<Error><Code>SignatureDoesNotMatch</Code><Message>{req}</Message></Error>");
            let _ = c.write_all(
                format!("HTTP/1.1 403 Forbidden\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes(),
            );
            req
        });
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tok"), "TOPSECRET-token-1234\n").unwrap();
        let src =
            auth::Sources { bearer_token_files: vec![(base.clone(), dir.path().join("tok"))], ..Default::default() };
        let credentials = Arc::new(Credentials::load(&src, &|_| None).unwrap());
        let mut f = Fetcher::new(
            vec![CacheUrl::parse(&base).unwrap()],
            Options { retries: 0, credentials, ..Options::default() },
        );
        let err = f.probe(0).unwrap_err().to_string();
        assert!(server.join().unwrap().contains("Bearer TOPSECRET-token-1234"), "the token was sent");
        assert_eq!(err, format!("cache {base}: 403 Forbidden (SignatureDoesNotMatch)"));
    }

    /// The agent's installer reads NARs through this Fetcher. A narinfo's
    /// URL (not covered by its signature) with a query naming another
    /// endpoint: the signed request still goes to the cache's endpoint, for
    /// the key with the query in it, and nothing connects to the other.
    #[test]
    fn a_query_in_a_narinfo_url_does_not_move_a_signed_s3_request() {
        let good = TcpListener::bind("127.0.0.1:0").unwrap();
        let evil = TcpListener::bind("127.0.0.1:0").unwrap();
        evil.set_nonblocking(true).unwrap();
        let cache = format!("s3://b?endpoint=http://{}", good.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            let (mut c, _) = good.accept().unwrap();
            let mut head = [0u8; 4096];
            let n = c.read(&mut head).unwrap();
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nNAR");
            String::from_utf8_lossy(&head[..n]).into_owned()
        });
        let env = |k: &str| match k {
            "AWS_ACCESS_KEY_ID" => Some("AKID".to_owned()),
            "AWS_SECRET_ACCESS_KEY" => Some("SECRET".to_owned()),
            "AWS_SESSION_TOKEN" => Some("SESSION".to_owned()),
            _ => None,
        };
        let credentials = Arc::new(Credentials::load(&auth::Sources::default(), &env).unwrap());
        let mut f = Fetcher::new(
            vec![CacheUrl::parse(&cache).unwrap()],
            Options { retries: 0, credentials, ..Options::default() },
        );
        let rel = format!("nar/x.nar?endpoint={}&scheme=http&priority=", evil.local_addr().unwrap());
        let got = f.open(0, &rel, 0, Some(Instant::now() + Duration::from_secs(5)));
        assert!(evil.accept().is_err(), "a request went to the narinfo's endpoint");
        let Ok(Answer::Found(mut body)) = got else { panic!("{:?}", got.err()) };
        let mut nar = String::new();
        body.read_to_string(&mut nar).unwrap();
        assert_eq!(nar, "NAR");
        let req = server.join().unwrap();
        let key = auth::sigv4::uri_encode(&rel, true);
        assert!(req.starts_with(&format!("GET /b/{key} HTTP/1.1\r\n")), "{req}");
        assert!(key.contains("%3Fendpoint%3D127.0.0.1%3A") && req.contains("x-amz-security-token: SESSION"), "{req}");
    }

    #[test]
    fn cache_urls_with_passwords_are_refused() {
        let e = CacheUrl::parse("https://alice:hunter2@cache.example").unwrap_err();
        assert!(e.contains("netrc") && !e.contains("hunter2"), "{e}");
        let s3 = CacheUrl::parse("s3://b?endpoint=http://127.0.0.1:9000&region=r").unwrap();
        assert_eq!(s3.join("nar/x.nar"), "s3://b/nar/x.nar?endpoint=http://127.0.0.1:9000&region=r");
        assert_eq!(s3.to_string(), "s3://b?endpoint=http://127.0.0.1:9000&region=r");
        assert!(CacheUrl::parse("s3://b?regoin=x").unwrap_err().contains("unknown parameter"));
    }

    /// A connect that hangs (the listener's backlog is full, so the kernel
    /// drops our SYNs) is waited on in ticks too.
    #[test]
    fn a_hanging_connect_ends_at_the_deadline_and_ticks_throughout() {
        let (addr, _held) = ticking::tests::hanging_addr();
        let (mut f, ticks) = counting_fetcher();
        assert_deadline_with_ticks(&mut f, &ticks, &format!("http://{addr}/doc.json"));
    }

    /// A refused PUT to S3 shows the error document's code, not its XML.
    #[test]
    fn a_refused_put_answers_with_the_s3_error_code() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/bucket/doc.json", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for body in [
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied</Message><RequestId>4442587FB7D0A2F9</RequestId></Error>",
                "plain words",
            ] {
                let Ok((mut c, _)) = listener.accept() else { return };
                let mut head = [0u8; 8192];
                let _ = c.read(&mut head);
                let _ = c.write_all(
                    format!("HTTP/1.1 403 Forbidden\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                        .as_bytes(),
                );
            }
        });
        let mut f = Fetcher::new(vec![], Options { retries: 0, ..Options::default() });
        assert_eq!(f.put_url(&url, "text/plain", b"x").unwrap(), (403, "AccessDenied".to_owned()));
        assert_eq!(f.put_url(&url, "text/plain", b"x").unwrap(), (403, "plain words".to_owned()));
    }
}
