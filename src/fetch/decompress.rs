//! Decompression of NAR files as caches store them: `none`, `zstd` (ruzstd,
//! concatenated frames followed; a frame's optional xxHash64 checksum is not
//! computed: it is not signed, and the signed NarHash is checked over the
//! same decompressed bytes, so it would add cost, not assurance), `xz`
//! (lzma-rust2: pure Rust, streams with a few MiB of state and a memory
//! limit, where lzma-rs buffers whole blocks). `bzip2`
//! (what Nix reads when `Compression` is absent or empty) and anything else are
//! refused with an error naming the method.

use crate::nix::Compression;
use ruzstd::decoding::FrameDecoder;
use std::io::{self, BufRead, BufReader, Read};

/// Largest zstd window accepted (zstd's `--long=27`); a hostile cache
/// cannot make us allocate more.
pub const ZSTD_MAX_WINDOW: u64 = 128 << 20;
/// Memory limit for the xz decoder in KiB (xz -9 needs 65 MiB of dictionary).
pub const XZ_MEM_LIMIT_KIB: u32 = 96 << 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported(pub String);

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 == "bzip2" {
            write!(f, "compression bzip2 (narinfo's Compression is bzip2, empty or absent, all bzip2 to Nix) is not supported; publish with compression=zstd, xz or none")
        } else {
            write!(f, "compression {:?} is not supported (zstd, xz, none are)", self.0)
        }
    }
}

impl std::error::Error for Unsupported {}

/// Wraps `body` in the decoder for `c`.
pub fn decoder<'r, R: Read + 'r>(c: &Compression, body: R) -> Result<Box<dyn Read + 'r>, Unsupported> {
    Ok(match c {
        Compression::None => Box::new(body),
        Compression::Zstd => Box::new(ZstdReader::new(body)),
        Compression::Xz => Box::new(Labelled("xz", lzma_rust2::XzReader::new_mem_limit(body, true, XZ_MEM_LIMIT_KIB))),
        other => return Err(Unsupported(other.as_str().to_owned())),
    })
}

/// Prefixes a decoder's errors with its name, so "invalid block checksum"
/// says which layer found it.
struct Labelled<R>(&'static str, R);

impl<R: Read> Read for Labelled<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.1.read(buf).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.0)))
    }
}

/// A zstd stream of one or more frames.
pub struct ZstdReader<R: Read> {
    source: BufReader<R>,
    frame: FrameDecoder,
    started: bool,
    /// The stream ended cleanly after a complete frame.
    done: bool,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl<R: Read> ZstdReader<R> {
    pub fn new(source: R) -> Self {
        let mut frame = FrameDecoder::new();
        frame.set_max_window_size(ZSTD_MAX_WINDOW);
        ZstdReader { source: BufReader::with_capacity(128 << 10, source), frame, started: false, done: false }
    }

    /// Starts the next frame, or notes a clean end of stream.
    fn next_frame(&mut self) -> io::Result<()> {
        if self.source.fill_buf()?.is_empty() {
            if !self.started {
                return Err(invalid("zstd: empty stream".into()));
            }
            self.done = true;
            return Ok(());
        }
        self.frame.reset(&mut self.source).map_err(|e| invalid(format!("zstd: {e}")))?;
        self.started = true;
        Ok(())
    }
}

impl<R: Read> Read for ZstdReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.done || buf.is_empty() {
                return Ok(0);
            }
            if !self.started {
                self.next_frame()?;
                continue;
            }
            if self.frame.can_collect() > 0 {
                return self.frame.read(buf);
            }
            if self.frame.is_finished() {
                self.next_frame()?;
                continue;
            }
            self.frame
                .decode_blocks(&mut self.source, ruzstd::decoding::BlockDecodingStrategy::UptoBytes(256 << 10))
                .map_err(|e| {
                if matches!(
                    &e,
                    ruzstd::decoding::errors::FrameDecoderError::FailedToReadBlockHeader(_)
                        | ruzstd::decoding::errors::FrameDecoderError::FailedToReadBlockBody(_)
                ) {
                    io::Error::new(io::ErrorKind::UnexpectedEof, format!("zstd: truncated: {e}"))
                } else {
                    invalid(format!("zstd: {e}"))
                }
            })?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bzip2_and_others_by_name() {
        let e = decoder(&Compression::Bzip2, &b""[..]).err().unwrap();
        // An empty or absent narinfo Compression parses as bzip2; say so.
        assert!(e.to_string().contains("bzip2") && e.to_string().contains("empty"), "{e}");
        let e = decoder(&Compression::Other("br".into()), &b""[..]).err().unwrap();
        assert!(e.to_string().contains("\"br\""));
    }

    #[test]
    fn zstd_garbage_and_empty_are_errors() {
        let mut out = Vec::new();
        assert!(ZstdReader::new(&b""[..]).read_to_end(&mut out).is_err());
        assert!(ZstdReader::new(&b"not zstd at all"[..]).read_to_end(&mut out).is_err());
    }
}
