//! The one streaming pass from a cache to the store:
//!
//! ```text
//! body ─▶ FileSize cap ─▶ decompress ─▶ NarSize cap + NarHash ─▶ NAR parser ─▶ sink
//! ```
//!
//! The narinfo's FileHash is not computed (nor zstd's frame checksum, see
//! [`decompress`]): the signature covers NarHash, not FileHash, so a cache
//! that can change the file can change FileHash too, and NarHash is checked
//! over every decompressed byte. They cost a fifth of an install's CPU and
//! proved nothing more. FileSize stays: it bounds what is read.
//!
//! Nothing here holds more than a fixed buffer: bytes flow through in
//! [`CHUNK`]-sized pieces. Only when the whole stream has been read are the
//! sizes and hashes compared; until then the sink has only written into a
//! temporary directory that the caller throws away on any error.

use super::decompress::{self, Unsupported};
use super::FetchError;
use crate::nar::{Event, NarError, Parser};
use crate::nix::{NarInfo, Sha256};
use sha2::{Digest, Sha256 as Hasher};
use std::cell::RefCell;
use std::io::{self, Read};
use std::rc::Rc;

pub const CHUNK: usize = 256 << 10;

#[derive(Debug)]
pub enum PipelineError {
    Fetch(FetchError),
    /// The narinfo named a NAR the cache does not have.
    MissingNar {
        url: String,
    },
    Unsupported(Unsupported),
    /// Reading or decompressing failed (after any resumes).
    Read {
        url: String,
        source: io::Error,
    },
    /// More bytes than the narinfo announced: cut off.
    TooLong {
        what: &'static str,
        limit: u64,
    },
    Size {
        what: &'static str,
        expected: u64,
        got: u64,
    },
    Hash {
        what: &'static str,
        expected: Sha256,
        got: Sha256,
    },
    Nar(NarError),
}

impl std::fmt::Display for PipelineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PipelineError::Fetch(e) => e.fmt(f),
            PipelineError::MissingNar { url } => {
                write!(f, "{url}: NAR named by the narinfo is missing (404)")
            }
            PipelineError::Unsupported(e) => e.fmt(f),
            PipelineError::Read { url, source } => write!(f, "{url}: {source}"),
            PipelineError::TooLong { what, limit } => {
                write!(f, "{what} exceeds the {limit} bytes the narinfo announced; cut off")
            }
            PipelineError::Size { what, expected, got } => {
                write!(f, "{what} mismatch: narinfo says {expected} bytes, got {got}")
            }
            PipelineError::Hash { what, expected, got } => {
                write!(f, "{what} mismatch: narinfo says {expected}, got {got}")
            }
            PipelineError::Nar(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for PipelineError {}

/// Counts and caps what passes through.
struct Metered<R> {
    inner: R,
    count: u64,
    limit: Option<u64>,
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if let Some(limit) = self.limit {
            if self.count > limit {
                // A kind of its own survives decoders that re-wrap errors.
                return Err(io::Error::new(io::ErrorKind::FileTooLarge, CutOff(limit)));
            }
        }
        Ok(n)
    }
}

#[derive(Debug)]
struct CutOff(u64);

impl std::fmt::Display for CutOff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "file exceeds FileSize {}", self.0)
    }
}

impl std::error::Error for CutOff {}

fn digest(h: Hasher) -> Sha256 {
    Sha256(h.finalize().into())
}

/// What a successful pass moved.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub file_bytes: u64,
    pub nar_bytes: u64,
}

/// The pass stepped to its end in one call: what the stepped pass must equal.
#[cfg(test)]
fn process<R: Read>(
    body: R,
    url: &str,
    info: &NarInfo<'_>,
    sink: &mut dyn FnMut(Event<'_>) -> Result<(), NarError>,
    progress: &mut dyn FnMut(u64),
) -> Result<Stats, PipelineError> {
    let mut pass = Pass::new(body, url, info)?;
    while !pass.step(usize::MAX, sink, progress)? {}
    pass.finish()
}

/// The byte source as the decoder and the pass share it: the decoder
/// reads through one handle, the pass drains what the decoder left and
/// reads the counters through the other.
struct SharedBody<R>(Rc<RefCell<Metered<R>>>);

impl<R: Read> Read for SharedBody<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.borrow_mut().read(buf)
    }
}

/// One NAR's pass, advanced a bounded number of bytes at a time
/// ([`Pass::step`]), so a caller with other work (an event loop) never
/// waits for a whole large NAR to be decompressed and unpacked. Same
/// checks, in the same order, as a single call of [`process`] (which is
/// this, stepped to the end).
pub struct Pass<'r, R> {
    file: Rc<RefCell<Metered<R>>>,
    decoder: Box<dyn Read + 'r>,
    url: String,
    file_limit: u64,
    file_size: Option<u64>,
    nar_size: u64,
    nar_hash: Sha256,
    nar_hasher: Hasher,
    nar_bytes: u64,
    parser: Parser,
    buf: Vec<u8>,
    eof: bool,
}

impl<'r, R: Read + 'r> Pass<'r, R> {
    pub fn new(body: R, url: &str, info: &NarInfo<'_>) -> Result<Self, PipelineError> {
        let file = Rc::new(RefCell::new(Metered { inner: body, count: 0, limit: info.file_size }));
        let decoder =
            decompress::decoder(&info.compression, SharedBody(file.clone())).map_err(PipelineError::Unsupported)?;
        Ok(Pass {
            file,
            decoder,
            url: url.to_owned(),
            file_limit: info.file_size.unwrap_or(0),
            file_size: info.file_size,
            nar_size: info.nar_size,
            nar_hash: info.nar_hash,
            nar_hasher: Hasher::new(),
            nar_bytes: 0,
            parser: Parser::new(),
            buf: vec![0u8; CHUNK],
            eof: false,
        })
    }

    fn read_err(&self, e: io::Error) -> PipelineError {
        if e.kind() == io::ErrorKind::FileTooLarge {
            return PipelineError::TooLong { what: "file", limit: self.file_limit };
        }
        PipelineError::Read { url: self.url.clone(), source: e }
    }

    /// Moves at most `budget` NAR bytes (and at least one byte, unless the
    /// source is done) through the pass; `true` once the whole source has
    /// been read.
    pub fn step(
        &mut self,
        budget: usize,
        sink: &mut dyn FnMut(Event<'_>) -> Result<(), NarError>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<bool, PipelineError> {
        let mut moved = 0usize;
        while !self.eof {
            let want = self.buf.len().min(budget - moved).max(1);
            let n = match self.decoder.read(&mut self.buf[..want]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.read_err(e)),
            };
            self.nar_bytes += n as u64;
            if self.nar_bytes > self.nar_size {
                return Err(PipelineError::TooLong { what: "NAR", limit: self.nar_size });
            }
            let chunk = &self.buf[..n];
            self.nar_hasher.update(chunk);
            self.parser.feed(chunk, sink).map_err(PipelineError::Nar)?;
            progress(n as u64);
            moved = moved.saturating_add(n);
            if moved >= budget {
                return Ok(false);
            }
        }
        // Whatever the decoder left unread (it may stop at a frame's end)
        // still belongs to the file: read it so FileSize covers
        // every byte and the connection can go back to the pool.
        let drained = io::copy(&mut SharedBody(self.file.clone()), &mut io::sink());
        drained.map_err(|e| self.read_err(e))?;
        Ok(true)
    }

    /// The checks once everything has been read.
    pub fn finish(self) -> Result<Stats, PipelineError> {
        self.parser.finish().map_err(|e| PipelineError::Nar(NarError::Parse(e)))?;
        if self.nar_bytes != self.nar_size {
            return Err(PipelineError::Size { what: "NarSize", expected: self.nar_size, got: self.nar_bytes });
        }
        let got = digest(self.nar_hasher);
        if got != self.nar_hash {
            return Err(PipelineError::Hash { what: "NarHash", expected: self.nar_hash, got });
        }
        drop(self.decoder);
        let file = self.file.borrow_mut();
        if let Some(expected) = self.file_size {
            if file.count != expected {
                return Err(PipelineError::Size { what: "FileSize", expected, got: file.count });
            }
        }
        Ok(Stats { file_bytes: file.count, nar_bytes: self.nar_bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nar::write::{encode, Node};

    fn info_text(nar: &[u8], compression: &str, file: &[u8]) -> String {
        let nar_hash = Sha256(Hasher::digest(nar).into()).to_nix32();
        let file_hash = Sha256(Hasher::digest(file).into()).to_nix32();
        format!(
            "StorePath: /nix/store/qx8l0zlfvk6k8whfjvianr1mywbz9k4v-hello-test\nURL: nar/x.nar\nCompression: {compression}\n\
             FileHash: sha256:{file_hash}\nFileSize: {}\nNarHash: sha256:{nar_hash}\nNarSize: {}\nReferences: \n",
            file.len(),
            nar.len()
        )
    }

    /// Issue 11: the agent's loop unpacks a NAR a bounded slice per turn.
    /// Every step moves at most its budget of NAR bytes, and the stepped
    /// pass checks and delivers exactly what one whole pass does.
    #[test]
    fn a_stepped_pass_moves_at_most_its_budget_and_equals_the_whole_pass() {
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let nar = encode(&Node::dir(vec![(b"a", Node::file(&big)), (b"b", Node::exe(b"#!/bin/sh\n"))]));
        let text = info_text(&nar, "none", &nar);
        let info = NarInfo::parse(&text, None).unwrap();
        // What the events say, whatever the chunking of the data.
        fn record(out: &mut Vec<u8>, ev: Event<'_>) {
            match ev {
                Event::Data(d) => out.extend_from_slice(d),
                other => out.extend_from_slice(format!("{other:?}").as_bytes()),
            }
        }
        let mut whole = Vec::new();
        let mut sink = |ev: Event<'_>| {
            record(&mut whole, ev);
            Ok(())
        };
        let stats = process(&nar[..], "test", &info, &mut sink, &mut |_| {}).unwrap();
        assert_eq!(stats.nar_bytes, nar.len() as u64);

        let mut stepped = Vec::new();
        let mut pass = Pass::new(&nar[..], "test", &info).unwrap();
        let mut steps = 0;
        loop {
            let mut moved = 0u64;
            let mut sink = |ev: Event<'_>| {
                record(&mut stepped, ev);
                Ok(())
            };
            let done = pass.step(10_000, &mut sink, &mut |n| moved += n).unwrap();
            assert!(moved <= 10_000, "a step moved {moved} bytes");
            steps += 1;
            if done {
                break;
            }
        }
        assert!(steps > nar.len() / 10_000, "{steps} steps");
        let stats = pass.finish().unwrap();
        assert_eq!(stats.nar_bytes, nar.len() as u64);
        assert!(stepped == whole, "the stepped pass delivered other events than the whole pass");
    }

    /// The stepped pass keeps every check: a NAR that does not match its
    /// NarHash fails at the end, after being stepped through.
    #[test]
    fn a_stepped_pass_still_checks_the_nar_hash() {
        let nar = encode(&Node::file(b"hello"));
        let mut bad = nar.clone();
        let at = bad.windows(5).position(|w| w == b"hello").unwrap();
        bad[at] = b'j';
        let text = info_text(&nar, "none", &bad);
        let info = NarInfo::parse(&text, None).unwrap();
        let mut pass = Pass::new(&bad[..], "test", &info).unwrap();
        let mut sink = |_: Event<'_>| Ok(());
        let r = (|| {
            while !pass.step(8, &mut sink, &mut |_| {})? {}
            Ok::<_, PipelineError>(())
        })();
        let err = match r {
            Ok(()) => pass.finish().unwrap_err(),
            Err(e) => e,
        };
        assert!(matches!(err, PipelineError::Hash { what: "NarHash", .. }), "{err}");
    }
}
