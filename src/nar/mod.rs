//! NAR: Nix's archive format. `parse` turns bytes into events, `unpack`
//! turns events into files, `write` goes the other way (for `verify` and
//! tests).

pub mod parse;
pub mod unpack;
pub mod write;

pub use parse::{Event, ParseError, Parser};
pub use unpack::{UnpackError, Unpacker};

/// A NAR that could not be unpacked: malformed, or a write failed.
#[derive(Debug)]
pub enum NarError {
    Parse(ParseError),
    Unpack(UnpackError),
}

impl From<ParseError> for NarError {
    fn from(e: ParseError) -> Self {
        NarError::Parse(e)
    }
}

impl From<UnpackError> for NarError {
    fn from(e: UnpackError) -> Self {
        NarError::Unpack(e)
    }
}

impl std::fmt::Display for NarError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NarError::Parse(e) => e.fmt(f),
            NarError::Unpack(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for NarError {}

/// Parses and unpacks a whole in-memory NAR as `name` inside `dir`.
pub fn unpack_bytes(dir: rustix::fd::BorrowedFd<'_>, name: &[u8], nar: &[u8]) -> Result<(), NarError> {
    let mut parser = Parser::new();
    let mut unpacker = Unpacker::new(dir, name);
    parser.feed(nar, &mut |ev| unpacker.event(ev).map_err(NarError::from))?;
    parser.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests;
