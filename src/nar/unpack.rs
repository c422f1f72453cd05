//! Turns parser events into files, safely against a hostile NAR.
//!
//! Every write is relative to a directory file descriptor the unpacker
//! created itself: `mkdirat`, `openat(O_CREAT | O_EXCL | O_NOFOLLOW)`,
//! `symlinkat`. A name is never resolved through anything but its parent's
//! fd, and nothing is ever opened that already existed, so a NAR cannot
//! write through a symlink it has just made (CVE-2024-45593) or escape the
//! target directory; the parser has already refused `..`, `/` and
//! duplicates, and this layer would refuse them again (EEXIST, ENOENT).
//!
//! Metadata is made canonical as it is written, the way Nix leaves a store
//! path: files 0444 or 0555, directories 0555 once their last child exists,
//! mtime 1 (the epoch plus one second) on everything, symlinks included.
//! Durability is the caller's job (one `syncfs` for a batch of paths).

use super::parse::Event;
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, Timespec, Timestamps};
use std::io::{self, Write};

/// Nix's store mtime.
pub const STORE_MTIME: i64 = 1;

const TIMES: Timestamps = Timestamps {
    last_access: Timespec { tv_sec: STORE_MTIME, tv_nsec: 0 },
    last_modification: Timespec { tv_sec: STORE_MTIME, tv_nsec: 0 },
};

/// An I/O failure while unpacking, with the entry it concerned.
#[derive(Debug)]
pub struct UnpackError {
    pub op: &'static str,
    pub path: String,
    pub source: io::Error,
}

impl std::fmt::Display for UnpackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Escaped: names may hold newlines; an error stays one line.
        if self.path.is_empty() {
            write!(f, "{} <root>: {}", self.op, self.source)
        } else {
            write!(f, "{} {:?}: {}", self.op, self.path, self.source)
        }
    }
}

impl std::error::Error for UnpackError {}

/// The directory the root goes into: borrowed, or owned by an unpacker
/// that outlives any one borrow (one advanced step by step from a loop).
enum Parent<'d> {
    Borrowed(BorrowedFd<'d>),
    Owned(OwnedFd),
}

pub struct Unpacker<'d> {
    parent: Parent<'d>,
    root_name: Vec<u8>,
    dirs: Vec<OwnedFd>,
    file: Option<std::fs::File>,
    /// Slash-joined path of the current entry, for errors.
    path: Vec<u8>,
    name_lens: Vec<usize>,
    bytes_written: u64,
}

impl<'d> Unpacker<'d> {
    /// Unpacks the NAR's root node as `root_name` inside `parent`, which
    /// must not exist yet.
    pub fn new(parent: BorrowedFd<'d>, root_name: &[u8]) -> Self {
        Unpacker::with_parent(Parent::Borrowed(parent), root_name)
    }

    fn with_parent(parent: Parent<'d>, root_name: &[u8]) -> Self {
        Unpacker {
            parent,
            root_name: root_name.to_vec(),
            dirs: Vec::new(),
            file: None,
            path: Vec::new(),
            name_lens: Vec::new(),
            bytes_written: 0,
        }
    }

    /// [`Unpacker::new`] holding its own descriptor of `parent`.
    pub fn owned(parent: OwnedFd, root_name: &[u8]) -> Unpacker<'static> {
        Unpacker::with_parent(Parent::Owned(parent), root_name)
    }

    /// File contents written so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    fn err(&self, op: &'static str, e: impl Into<io::Error>) -> UnpackError {
        UnpackError { op, path: String::from_utf8_lossy(&self.path).into_owned(), source: e.into() }
    }

    /// The directory a new node goes into, and the name it gets there.
    fn place<'n>(&'n self, name: &'n [u8]) -> (BorrowedFd<'n>, &'n [u8]) {
        match self.dirs.last() {
            Some(fd) => (fd.as_fd(), name),
            None => match &self.parent {
                Parent::Borrowed(fd) => (*fd, &self.root_name),
                Parent::Owned(fd) => (fd.as_fd(), &self.root_name),
            },
        }
    }

    fn enter(&mut self, name: &[u8]) {
        if !self.dirs.is_empty() {
            if !self.path.is_empty() {
                self.path.push(b'/');
            }
            self.path.extend_from_slice(name);
        }
        self.name_lens.push(name.len());
    }

    fn leave(&mut self) {
        let n = self.name_lens.pop().unwrap_or(0);
        let cut = self.path.len().saturating_sub(n);
        self.path.truncate(cut.saturating_sub(usize::from(cut > 0)));
    }

    pub fn event(&mut self, ev: Event<'_>) -> Result<(), UnpackError> {
        match ev {
            Event::Directory { name } => {
                let (at, n) = self.place(name);
                let made = rfs::mkdirat(at, n, Mode::from_raw_mode(0o755)).and_then(|()| {
                    rfs::openat(
                        at,
                        n,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                });
                self.enter(name);
                let fd = made.map_err(|e| self.err("create directory", e))?;
                self.dirs.push(fd);
            }
            Event::DirectoryEnd => {
                let fd = self.dirs.pop().expect("parser balances directories");
                // After the last child: creating children would bump mtime.
                rfs::fchmod(&fd, Mode::from_raw_mode(0o555))
                    .and_then(|()| rfs::futimens(&fd, &TIMES))
                    .map_err(|e| self.err("finish directory", e))?;
                if !self.dirs.is_empty() {
                    self.leave();
                }
            }
            Event::Regular { name, executable, size: _ } => {
                let (at, n) = self.place(name);
                let mode = if executable { 0o555 } else { 0o444 };
                let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                let made = rfs::openat(at, n, flags, Mode::from_raw_mode(mode));
                self.enter(name);
                let fd = made.map_err(|e| self.err("create file", e))?;
                // The umask may have cut bits from the creation mode.
                rfs::fchmod(&fd, Mode::from_raw_mode(mode)).map_err(|e| self.err("chmod", e))?;
                self.file = Some(std::fs::File::from(fd));
            }
            Event::Data(data) => {
                let f = self.file.as_mut().expect("data only inside a file");
                if let Err(e) = f.write_all(data) {
                    return Err(self.err("write", e));
                }
                self.bytes_written += data.len() as u64;
            }
            Event::RegularEnd => {
                let f = self.file.take().expect("end only after a file");
                rfs::futimens(&f, &TIMES).map_err(|e| self.err("set mtime", e))?;
                if !self.dirs.is_empty() {
                    self.leave();
                }
            }
            Event::Symlink { name, target } => {
                let (at, n) = self.place(name);
                let made = rfs::symlinkat(target, at, n)
                    .and_then(|()| rfs::utimensat(at, n, &TIMES, AtFlags::SYMLINK_NOFOLLOW));
                self.enter(name);
                made.map_err(|e| self.err("create symlink", e))?;
                if !self.dirs.is_empty() {
                    self.leave();
                }
            }
        }
        Ok(())
    }
}
