//! The client side of one HTTP/1.1 connection, sans I/O: request bytes out,
//! response events in, for GET requests (all a binary cache needs) and
//! PUTs with a body (a Pushgateway's metrics).
//!
//! Grammar read (RFC 9112; only what a GET's response can carry):
//!
//! ```text
//! response     = status-line *( field-line CRLF ) CRLF [ body ]
//! status-line  = "HTTP/1." DIGIT SP 3DIGIT SP [ reason ] CRLF      (httparse)
//! body         = Content-Length bytes                               (1*DIGIT, ≤ u64, repeats must agree)
//!              / chunked                                            (Transfer-Encoding: chunked, last coding)
//!              / bytes until the server closes                      (neither header)
//! chunked      = *( chunk-size [ ext ] CRLF chunk-data CRLF ) "0" [ ext ] CRLF *( field-line CRLF ) CRLF
//! chunk-size   = 1*16HEXDIG
//! ```
//!
//! 1xx interim responses are skipped; 204, 304 and 1xx carry no body. The
//! head is bounded ([`MAX_HEAD`], at most [`MAX_HEADERS`] fields), as are a
//! chunk-size line and the trailer; a violation is a [`ProtoError`], never a
//! panic, and leaves the connection unusable. Responses follow one another
//! on the connection (pipelining): after [`Event::End`] the next head is read.
//!
//! Why our own and not `ureq-proto` (0.7, already linked through ureq): its
//! typestate `Call` serves one request at a time on a connection (no
//! pipelining, which is what saves the round trips on a slow link), copies
//! each body into an output buffer, and wants an `http::Request` per call.
//! What we need is this one small state machine over `httparse`.

use std::fmt;

/// Largest response head accepted (status line and fields).
pub const MAX_HEAD: usize = 32 << 10;
/// Most header fields in one head.
pub const MAX_HEADERS: usize = 64;
/// Longest chunk-size line (size, extensions and CRLF).
const MAX_CHUNK_LINE: usize = 1024;
/// Largest trailer section after the last chunk.
const MAX_TRAILER: usize = 8 << 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// The head grew past [`MAX_HEAD`] (or [`MAX_HEADERS`] fields) unfinished.
    HeadTooLarge,
    BadHead(String),
    BadContentLength,
    /// A transfer-coding other than a final `chunked`.
    UnsupportedEncoding(String),
    BadChunk(&'static str),
    /// The server closed the connection before the response was complete.
    Truncated {
        in_body: bool,
    },
    /// Bytes arrived that no request asked for.
    Unsolicited,
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::HeadTooLarge => write!(f, "response head larger than {MAX_HEAD} bytes or {MAX_HEADERS} fields"),
            ProtoError::BadHead(why) => write!(f, "malformed response head: {}", crate::text::clip(why, 200)),
            ProtoError::BadContentLength => write!(f, "malformed or conflicting Content-Length"),
            ProtoError::UnsupportedEncoding(e) => {
                write!(f, "unsupported Transfer-Encoding {:?}", crate::text::clip(e, 100))
            }
            ProtoError::BadChunk(why) => write!(f, "malformed chunked body: {why}"),
            ProtoError::Truncated { in_body: true } => write!(f, "connection closed in the middle of the body"),
            ProtoError::Truncated { in_body: false } => write!(f, "connection closed before a complete response head"),
            ProtoError::Unsolicited => write!(f, "the server sent bytes no request asked for"),
        }
    }
}

impl std::error::Error for ProtoError {}

/// What the body framing of a response is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

/// A parsed response head: only what the client acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub framing: Framing,
    /// First byte of a `206`'s `Content-Range: bytes FIRST-LAST/…`.
    pub range_start: Option<u64>,
    /// Whether the connection may carry another response after this one.
    pub keep_alive: bool,
    /// A redirect's `Location` (at most [`MAX_LOCATION`] bytes of visible ASCII).
    pub location: Option<String>,
}

/// Longest `Location` kept; a longer one is dropped (the redirect then
/// fails as an unexpected status).
pub const MAX_LOCATION: usize = 2048;

#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    Head(Head),
    /// Body bytes (never empty), a slice of the input.
    Data(&'a [u8]),
    /// The response is complete; `keep_alive` as in its head.
    End {
        keep_alive: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line.
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Fields after the last chunk, up to the empty line; bytes seen so far.
    Trailer(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Length {
        left: u64,
        keep_alive: bool,
    },
    Chunked {
        at: Chunk,
        keep_alive: bool,
    },
    UntilClose,
    /// Closed or broken: nothing more is read.
    Dead,
}

/// One connection's response reader; see the module.
#[derive(Debug)]
pub struct ClientConn {
    state: State,
    /// Requests sent whose response has not started yet (pipelining).
    awaiting: usize,
}

impl Default for ClientConn {
    fn default() -> Self {
        Self::new()
    }
}

impl ClientConn {
    pub fn new() -> Self {
        ClientConn { state: State::Head, awaiting: 0 }
    }

    /// Notes that a request was written: one more response to expect.
    pub fn sent(&mut self) {
        self.awaiting += 1;
    }

    /// Whether a response is being read or still expected.
    pub fn busy(&self) -> bool {
        self.awaiting > 0 || !matches!(self.state, State::Head | State::Dead)
    }

    /// Responses expected, including the one being read.
    pub fn in_flight(&self) -> usize {
        self.awaiting + usize::from(!matches!(self.state, State::Head | State::Dead))
    }

    pub fn is_dead(&self) -> bool {
        self.state == State::Dead
    }

    /// Whether body bytes of a response have started (a break now is mid-body).
    pub fn in_body(&self) -> bool {
        !matches!(self.state, State::Head | State::Dead)
    }

    /// Reads from `input`: how many bytes were used and at most one event.
    /// `(0, None)` means more input is needed (keep the unused bytes and call
    /// again with them and what follows). After an error the connection is dead.
    pub fn feed<'a>(&mut self, input: &'a [u8]) -> Result<(usize, Option<Event<'a>>), ProtoError> {
        let r = self.step(input);
        if r.is_err() {
            self.state = State::Dead;
        }
        r
    }

    fn step<'a>(&mut self, input: &'a [u8]) -> Result<(usize, Option<Event<'a>>), ProtoError> {
        match self.state {
            State::Dead => Ok((0, None)),
            State::Head => {
                if input.is_empty() {
                    return Ok((0, None));
                }
                if self.awaiting == 0 {
                    return Err(ProtoError::Unsolicited);
                }
                let Some((used, head)) = parse_head(input)? else {
                    return Ok((0, None));
                };
                if (100..200).contains(&head.status) {
                    // Interim (100 Continue, 103 Early Hints): the real one follows.
                    return Ok((used, None));
                }
                self.awaiting -= 1;
                let ka = head.keep_alive;
                self.state = match head.framing {
                    _ if head.status == 204 || head.status == 304 => State::Length { left: 0, keep_alive: ka },
                    Framing::Length(n) => State::Length { left: n, keep_alive: ka },
                    Framing::Chunked => State::Chunked { at: Chunk::Size, keep_alive: ka },
                    Framing::UntilClose => State::UntilClose,
                };
                Ok((used, Some(Event::Head(head))))
            }
            State::Length { left: 0, keep_alive } => {
                self.finish(keep_alive);
                Ok((0, Some(Event::End { keep_alive })))
            }
            State::Length { left, keep_alive } => {
                let n = clamp(left, input.len());
                if n == 0 {
                    return Ok((0, None));
                }
                self.state = State::Length { left: left - n as u64, keep_alive };
                Ok((n, Some(Event::Data(&input[..n]))))
            }
            State::UntilClose => {
                if input.is_empty() {
                    return Ok((0, None));
                }
                Ok((input.len(), Some(Event::Data(input))))
            }
            State::Chunked { at, keep_alive } => self.chunked(at, keep_alive, input),
        }
    }

    fn finish(&mut self, keep_alive: bool) {
        self.state = if keep_alive { State::Head } else { State::Dead };
    }

    fn chunked<'a>(
        &mut self,
        at: Chunk,
        keep_alive: bool,
        input: &'a [u8],
    ) -> Result<(usize, Option<Event<'a>>), ProtoError> {
        let set = |s: &mut Self, at| s.state = State::Chunked { at, keep_alive };
        match at {
            Chunk::Size => {
                let Some(end) = find_crlf(input, MAX_CHUNK_LINE)? else { return Ok((0, None)) };
                let line = &input[..end];
                let digits = line.split(|b| *b == b';').next().unwrap_or(b"");
                let digits = trim_ows(digits);
                if digits.is_empty() || digits.len() > 16 {
                    return Err(ProtoError::BadChunk("bad chunk size"));
                }
                let mut size: u64 = 0;
                for d in digits {
                    let v = (*d as char).to_digit(16).ok_or(ProtoError::BadChunk("bad chunk size"))?;
                    size = (size << 4) | u64::from(v);
                }
                set(self, if size == 0 { Chunk::Trailer(0) } else { Chunk::Data(size) });
                Ok((end + 2, None))
            }
            Chunk::Data(left) => {
                let n = clamp(left, input.len());
                if n == 0 {
                    return Ok((0, None));
                }
                let left = left - n as u64;
                set(self, if left == 0 { Chunk::DataEnd } else { Chunk::Data(left) });
                Ok((n, Some(Event::Data(&input[..n]))))
            }
            Chunk::DataEnd => {
                if input.len() < 2 {
                    return Ok((0, None));
                }
                if &input[..2] != b"\r\n" {
                    return Err(ProtoError::BadChunk("no CRLF after chunk data"));
                }
                set(self, Chunk::Size);
                Ok((2, None))
            }
            Chunk::Trailer(seen) => {
                let Some(end) = find_crlf(input, MAX_TRAILER - seen)? else { return Ok((0, None)) };
                if end == 0 {
                    self.finish(keep_alive);
                    return Ok((2, Some(Event::End { keep_alive })));
                }
                set(self, Chunk::Trailer(seen + end + 2));
                Ok((end + 2, None))
            }
        }
    }

    /// The server closed the connection (after all its bytes were fed): the
    /// end of an until-close body, or an error if a response was cut short.
    /// The connection is dead afterwards.
    pub fn eof(&mut self) -> Result<Option<Event<'static>>, ProtoError> {
        let state = std::mem::replace(&mut self.state, State::Dead);
        match state {
            State::UntilClose => Ok(Some(Event::End { keep_alive: false })),
            State::Length { left: 0, .. } => Ok(Some(Event::End { keep_alive: false })),
            State::Head | State::Dead if self.awaiting == 0 => Ok(None),
            State::Head | State::Dead => Err(ProtoError::Truncated { in_body: false }),
            _ => Err(ProtoError::Truncated { in_body: true }),
        }
    }
}

fn clamp(left: u64, avail: usize) -> usize {
    usize::try_from(left).map_or(avail, |l| l.min(avail))
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

/// Index of the first CRLF within `limit` bytes; an error if none fits.
fn find_crlf(input: &[u8], limit: usize) -> Result<Option<usize>, ProtoError> {
    match input.windows(2).take(limit.saturating_sub(1)).position(|w| w == b"\r\n") {
        Some(i) => Ok(Some(i)),
        None if input.len() >= limit => Err(ProtoError::BadChunk("line too long")),
        None => Ok(None),
    }
}

/// Parses a complete head at the start of `input`, or `None` if more is needed.
fn parse_head(input: &[u8]) -> Result<Option<(usize, Head)>, ProtoError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut fields);
    let window = &input[..input.len().min(MAX_HEAD)];
    let used = match resp.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if input.len() >= MAX_HEAD => return Err(ProtoError::HeadTooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ProtoError::HeadTooLarge),
        Err(e) => return Err(ProtoError::BadHead(e.to_string())),
    };
    let status = resp.code.ok_or_else(|| ProtoError::BadHead("no status".into()))?;
    let http11 = resp.version == Some(1);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut close = !http11;
    let mut range_start = None;
    let mut location = None;
    for h in resp.headers.iter() {
        let value = trim_ows(h.value);
        if h.name.eq_ignore_ascii_case("content-length") {
            // Repeated fields or a list must all agree (RFC 9110 8.6).
            for part in value.split(|b| *b == b',') {
                let n = parse_u64(trim_ows(part)).ok_or(ProtoError::BadContentLength)?;
                if length.is_some_and(|l| l != n) {
                    return Err(ProtoError::BadContentLength);
                }
                length = Some(n);
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let codings: Vec<&[u8]> = value.split(|b| *b == b',').map(trim_ows).filter(|c| !c.is_empty()).collect();
            match codings.as_slice() {
                [c] if c.eq_ignore_ascii_case(b"chunked") && !chunked => chunked = true,
                _ => return Err(ProtoError::UnsupportedEncoding(String::from_utf8_lossy(value).into_owned())),
            }
        } else if h.name.eq_ignore_ascii_case("connection") {
            for opt in value.split(|b| *b == b',').map(trim_ows) {
                if opt.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if opt.eq_ignore_ascii_case(b"keep-alive") && !http11 {
                    close = false;
                }
            }
        } else if h.name.eq_ignore_ascii_case("location") {
            location = std::str::from_utf8(value)
                .ok()
                .filter(|v| !v.is_empty() && v.len() <= MAX_LOCATION && v.bytes().all(|b| b.is_ascii_graphic()))
                .map(str::to_owned);
        } else if h.name.eq_ignore_ascii_case("content-range") {
            range_start = value
                .strip_prefix(b"bytes ")
                .and_then(|v| v.split(|b| *b == b'-').next())
                .and_then(|v| parse_u64(trim_ows(v)));
        }
    }
    let framing = if chunked {
        // Both headers: the length is a smuggling attempt or a broken
        // proxy; the chunking wins and the connection goes (RFC 9112 6.3).
        if length.is_some() {
            close = true;
        }
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::Length(0)
    } else {
        close = true;
        Framing::UntilClose
    };
    Ok(Some((used, Head { status, framing, range_start, keep_alive: !close, location })))
}

fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest(pub &'static str);

impl fmt::Display for BadRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot send request: {}", self.0)
    }
}

/// Appends a GET request for `target` (origin-form: starts with `/`) to
/// `out`; `range_from` > 0 asks for the bytes from there on. Refuses
/// control characters and spaces, which would split or smuggle requests.
pub fn write_get(
    out: &mut Vec<u8>,
    host: &str,
    target: &str,
    range_from: u64,
    extra: &[(String, String)],
) -> Result<(), BadRequest> {
    write_head(out, "GET", host, target, extra)?;
    if range_from > 0 {
        out.extend_from_slice(format!("Range: bytes={range_from}-\r\n").as_bytes());
    }
    write_fields(out, extra);
    out.extend_from_slice(b"\r\n");
    Ok(())
}

/// Appends a PUT of `body` (of type `content_type`) to `target`, checked
/// as [`write_get`] checks; the length is always announced (no chunking:
/// a gateway or S3 wants it).
pub fn write_put(
    out: &mut Vec<u8>,
    host: &str,
    target: &str,
    content_type: &str,
    body: &[u8],
    extra: &[(String, String)],
) -> Result<(), BadRequest> {
    if content_type.bytes().any(|b| b.is_ascii_control()) {
        return Err(BadRequest("bad content type"));
    }
    write_head(out, "PUT", host, target, extra)?;
    write_fields(out, extra);
    out.extend_from_slice(format!("Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(body);
    Ok(())
}

/// The request line and the fields every request carries, after checking
/// them and `extra` (written by [`write_fields`]). Nothing is appended on an error.
fn write_head(
    out: &mut Vec<u8>,
    method: &str,
    host: &str,
    target: &str,
    extra: &[(String, String)],
) -> Result<(), BadRequest> {
    let clean = |s: &str| !s.bytes().any(|b| b.is_ascii_control() || b == b' ' || b >= 0x7f);
    if !target.starts_with('/') || !clean(target) {
        return Err(BadRequest("request target must be a path without spaces or control characters"));
    }
    if host.is_empty() || !clean(host) {
        return Err(BadRequest("bad host"));
    }
    for (k, v) in extra {
        if k.is_empty() || !clean(k) || k.contains(':') || v.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            return Err(BadRequest("bad header field"));
        }
    }
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(concat!("\r\nUser-Agent: nixless/", env!("CARGO_PKG_VERSION"), "\r\n").as_bytes());
    Ok(())
}

fn write_fields(out: &mut Vec<u8>, extra: &[(String, String)]) {
    for (k, v) in extra {
        out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
}

#[cfg(test)]
mod tests;
