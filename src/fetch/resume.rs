//! A response body that survives a broken connection.
//!
//! When a read fails mid-body (reset, timeout, short body), the request is
//! sent again with `Range: bytes=<received>-` after a backoff. A `206`
//! whose `Content-Range` starts at the right byte continues the stream; a
//! server that ignores `Range` and answers `200` is re-read from zero with
//! the first `<received>` bytes discarded (see [`Fetcher::open`]); either
//! way the reader above sees one unbroken byte stream, and the FileHash and
//! NarHash checks further up catch a server that changed the file between
//! attempts. Every read also calls the fetcher's tick, which is how the
//! agent keeps its watchdog fed during long downloads.

use super::{Answer, Fetcher};
use std::io::{self, Read};

pub struct ResumableBody<'f> {
    fetcher: &'f mut Fetcher,
    idx: usize,
    rel: String,
    inner: Box<dyn Read + Send>,
    pos: u64,
    resumes_left: u32,
    /// How many times the body was resumed (for tests and stats).
    pub resumes: u32,
}

impl<'f> ResumableBody<'f> {
    /// Opens `rel` in cache `idx`; `None` if the cache does not have it.
    pub fn open(fetcher: &'f mut Fetcher, idx: usize, rel: &str) -> Result<Option<Self>, super::FetchError> {
        let inner = match fetcher.open(idx, rel, 0, None)? {
            Answer::Found(r) => r,
            Answer::Missing => return Ok(None),
        };
        let resumes_left = fetcher.options().retries;
        Ok(Some(ResumableBody { fetcher, idx, rel: rel.to_owned(), inner, pos: 0, resumes_left, resumes: 0 }))
    }

    pub fn url(&self) -> String {
        format!("{}/{}", self.fetcher.cache_url(self.idx), self.rel)
    }

    fn reopen(&mut self, cause: &io::Error) -> io::Result<()> {
        let is_file = matches!(self.fetcher.cache_url(self.idx), super::CacheUrl::File(_));
        if self.resumes_left == 0 || is_file {
            return Err(io::Error::new(cause.kind(), format!("{}: {cause}", self.url())));
        }
        self.resumes_left -= 1;
        self.resumes += 1;
        log::warn!("{}: {cause}; resuming at byte {}", self.url(), self.pos);
        let backoff = self.fetcher.options().backoff;
        self.fetcher.sleep(backoff);
        match self.fetcher.open(self.idx, &self.rel, self.pos, None) {
            Ok(Answer::Found(r)) => {
                self.inner = r;
                Ok(())
            }
            Ok(Answer::Missing) => {
                Err(io::Error::new(io::ErrorKind::NotFound, format!("{}: vanished mid-download", self.url())))
            }
            Err(e) => Err(io::Error::other(e.to_string())),
        }
    }
}

impl Read for ResumableBody<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.fetcher.tick();
        // The transport ticks while this read waits on the server.
        let _scope = self.fetcher.scope(None);
        loop {
            match self.inner.read(buf) {
                Ok(n) => {
                    self.pos += n as u64;
                    // Progress since the last break: the resume budget is
                    // for consecutive failures, not for a long, flaky
                    // download as a whole.
                    if n > 0 {
                        self.resumes_left = self.fetcher.options().retries;
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => self.reopen(&e)?,
            }
        }
    }
}
