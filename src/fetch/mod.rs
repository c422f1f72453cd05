//! The I/O edge towards binary caches and documents: cache URLs
//! (`http://`, `https://`, `s3://`, `file://`), the fetch options and
//! errors every client shares, the NAR pipeline ([`pipeline`]), and two
//! clients with one set of rules (transient failures — connection errors,
//! timeouts, 5xx, 429, 408 — retried with exponential backoff; 404 is
//! "missing"; an overall deadline for small documents, so a server that
//! trickles bytes cannot hold one open past [`Options::small_fetch_deadline`]):
//!
//! - [`oneshot`]: requests in flight on the network engine, for the agent's
//!   loop (which never blocks); caches' narinfos and NARs go through the
//!   engine's install job (`store::parallel`).
//! - [`Fetcher`]: a blocking ureq client for the admin commands (fleet
//!   status, rollout watch, `sign --publish`), whose every wait — connect,
//!   write, read — ends at the call's deadline ([`transport`]).
//!
//! Private caches: every request goes through [`crate::auth::prepare`]
//! (netrc, bearer tokens, S3 signatures); a 401 or 403 is one line naming
//! the cache and, for S3, the error code the server gave.

pub mod decompress;
pub mod oneshot;
pub mod pipeline;
pub mod transport;

use crate::auth::{self, Credentials};
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ureq::unversioned::resolver::DefaultResolver;
use ureq::unversioned::transport::{ConnectProxyConnector, Connector, RustlsConnector};

/// Largest narinfo accepted: a path with thousands of references fits.
pub const MAX_NARINFO: u64 = 1 << 20;

/// The slowest link a polled document must still arrive over: beyond the
/// small-fetch deadline, each 8 KiB its `Content-Length` announces adds a
/// second. A document that embeds a closure's narinfos (for slow links) is
/// about 1 MB: 15 s + 2 min. A trickling server is still cut off.
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
/// swapped for one whose waits end at the thread's deadline (TLS wraps
/// it, so https ends there too). The admin side's other calls use it as
/// well, so only one TCP transport is linked in.
pub fn http_agent(config: ureq::config::Config) -> ureq::Agent {
    let connector =
        ().chain(ConnectProxyConnector::default())
            .chain(transport::DeadlineConnector)
            .chain(RustlsConnector::default());
    ureq::Agent::with_parts(config, connector, DefaultResolver::default())
}

/// The admin side's blocking HTTP client (see the module).
pub struct Fetcher {
    agent: ureq::Agent,
    opts: Options,
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
    pub fn new(opts: Options) -> Self {
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
        Fetcher { agent, opts }
    }

    /// Makes the network waits of this thread end at `deadline`, until
    /// the scope is dropped.
    pub(crate) fn scope(&self, deadline: Option<Instant>) -> transport::Scope {
        transport::enter(deadline)
    }

    /// The deadline of a small fetch starting now.
    fn small_deadline(&self) -> Instant {
        Instant::now() + self.opts.small_fetch_deadline
    }

    fn deadline_error(&self, url: &str, after: Duration) -> FetchError {
        FetchError::Deadline { url: url.to_owned(), after }
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
            std::thread::sleep(deadline.map_or(delay, |d| delay.min(d.saturating_duration_since(Instant::now()))));
            if passed() {
                return Err(self.deadline_error(url, self.opts.small_fetch_deadline));
            }
            delay *= 2;
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

    /// A fetcher with a 1.5 s small-fetch deadline and no retries.
    fn short_fetcher() -> Fetcher {
        Fetcher::new(Options { small_fetch_deadline: Duration::from_millis(1500), retries: 0, ..Options::default() })
    }

    /// The fetch ends on its deadline (`secs` after it started), whatever
    /// the server does: no wait inside it outlasts the deadline.
    fn assert_deadline_after(f: &mut Fetcher, url: &str, secs: &str) {
        let start = Instant::now();
        let err = f.get_url(url, 1 << 20).unwrap_err();
        assert!(matches!(err, FetchError::Deadline { .. }), "{err}");
        assert!(err.to_string().contains(&format!("within {secs} s (overall deadline)")), "{err}");
        let limit: f64 = secs.parse().unwrap();
        // Ended by the deadline, not by a socket timeout (5 s and more).
        assert!(start.elapsed() < Duration::from_secs_f64(limit + 2.0), "{:?}", start.elapsed());
    }

    #[test]
    fn a_trickling_body_ends_at_the_deadline() {
        let url = trickling_body_server(1000);
        assert_deadline_after(&mut short_fetcher(), &url, "1.5");
    }

    /// A document announcing 8 KiB gets one more second (a slow link must
    /// still deliver a large one); the announcement is capped by the limit.
    #[test]
    fn the_deadline_grows_with_the_announced_length() {
        assert_deadline_after(&mut short_fetcher(), &trickling_body_server(SLOW_LINK_BYTES_PER_SEC), "2.5");
        let err = short_fetcher().get_url(&trickling_body_server(u64::MAX), 100).unwrap_err();
        assert!(err.to_string().contains("within 1.5 s (overall deadline)"), "{err}");
    }

    /// TLS sits above the deadline transport: a server that accepts and
    /// never answers the ClientHello ends at the deadline too.
    #[test]
    fn a_silent_https_server_ends_at_the_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://{}/doc.json", listener.local_addr().unwrap());
        let held = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
        assert_deadline_after(&mut short_fetcher(), &url, "1.5");
        drop(held.join());
    }

    /// A server that refuses with 403 and echoes the request (headers
    /// included, as some servers' error pages do): the error names the URL
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
        let mut f = Fetcher::new(Options { retries: 0, credentials, ..Options::default() });
        let url = format!("{base}/doc.json");
        let err = f.get_url(&url, 4096).unwrap_err().to_string();
        assert!(server.join().unwrap().contains("Bearer TOPSECRET-token-1234"), "the token was sent");
        assert_eq!(err, format!("{url}: 403 Forbidden (SignatureDoesNotMatch)"));
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
    /// drops our SYNs) ends at the deadline too.
    #[test]
    fn a_hanging_connect_ends_at_the_deadline() {
        let (addr, _held) = transport::tests::hanging_addr();
        assert_deadline_after(&mut short_fetcher(), &format!("http://{addr}/doc.json"), "1.5");
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
        let mut f = Fetcher::new(Options { retries: 0, ..Options::default() });
        assert_eq!(f.put_url(&url, "text/plain", b"x").unwrap(), (403, "AccessDenied".to_owned()));
        assert_eq!(f.put_url(&url, "text/plain", b"x").unwrap(), (403, "plain words".to_owned()));
    }
}
