//! A streaming NAR parser: bytes in, events out.
//!
//! Grammar (Nix's, with the side conditions Nix enforces and a few we add):
//! ```text
//! nar       = str("nix-archive-1") node
//! node      = str("(") str("type") body str(")")
//! body      = str("regular") [ str("executable") str("") ] str("contents") contents
//!           | str("symlink") str("target") str(target)
//!           | str("directory") *( str("entry") str("(") str("name") str(name)
//!                                 str("node") node str(")") )
//! str(s)    = u64le(len s) s pad          ; pad: zeros up to a multiple of 8
//! contents  = u64le(n) n bytes pad
//! ```
//!
//! Limits, each the same as current Nix's unless marked "ours" (Nix:
//! `src/libutil/archive.cc`, `parse()`/`parseDump()`, and
//! `src/libutil/serialise.cc`, `readString()`/`readPadding()`):
//! - depth: a node's depth is the number of directories around it (the root
//!   is 0); a node at depth ≥ [`MAX_DEPTH`] (64) is refused, whatever its
//!   type (Nix: `narMaxDepth`, checked on entry to `parse()` for every node).
//!   So a file, symlink or empty directory may sit inside 63 directories, not
//!   64.
//! - entry names: 1..=[`MAX_NAME`] (255) bytes (`narMaxName`), not `.` or
//!   `..`, no `/`, no NUL; strictly increasing bytewise within a directory,
//!   which also refuses duplicates (`name <= prevName`, `std::string`
//!   compares bytes as unsigned).
//! - symlink targets: 1..=[`MAX_TARGET`] (4095) bytes (`narMaxTarget`), no NUL.
//! - tags: Nix reads at most 32 bytes (`narMaxTag`); ours is [`MAX_TAG`] (16).
//!   No tag is longer than 13, so both refuse the same inputs; ours just
//!   stops reading sooner.
//! - the magic: exactly `nix-archive-1` (`parseDump()` reads at most 13).
//! - `executable` must be followed by the empty string (`getString(0)`).
//! - contents: any `u64` length; streamed, never buffered.
//! - padding: zero bytes up to a multiple of 8 after every string and the
//!   contents (`readPadding()`).
//! - tokens in exactly this order, no other tags (`expectTag()`).
//! - ours only: nothing may follow the root node (Nix stops reading there);
//!   the input must not end early (Nix agrees: a short read throws).
//! - case hack (`use-case-hack`, off on Linux, on on macOS): not applied. On
//!   Linux Nix keeps names as they are, and so do we.
//!
//! The parser is push-based and resumable at any byte boundary: feed it
//! chunks of any size and it emits the same events. File contents are passed
//! through as slices of the input, never buffered; only tokens (at most 4 KiB)
//! are. Directory nesting is an explicit stack, not recursion.

/// Depth (directories around a node, the root being at 0) at which a node is
/// refused: Nix's `narMaxDepth`.
pub const MAX_DEPTH: usize = 64;
/// Longest entry name: Nix's `narMaxName`.
pub const MAX_NAME: usize = 255;
/// Longest symlink target: Nix's `narMaxTarget`.
pub const MAX_TARGET: usize = 4095;
/// Longest tag (`nix-archive-1`, `executable`, `directory`, …); Nix reads up to 32.
const MAX_TAG: usize = 16;

/// What the parser found. Names are entry names (the root node's is empty).
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    Directory {
        name: &'a [u8],
    },
    /// All of a directory's entries have been seen.
    DirectoryEnd,
    Regular {
        name: &'a [u8],
        executable: bool,
        size: u64,
    },
    /// A piece of the current regular file's contents.
    Data(&'a [u8]),
    /// The current regular file's contents are complete.
    RegularEnd,
    Symlink {
        name: &'a [u8],
        target: &'a [u8],
    },
}

/// What was wrong with a NAR, at which byte offset, in which entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub offset: u64,
    /// Slash-joined entry names from the root (empty for the root node).
    pub path: String,
    pub kind: ErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    BadMagic,
    /// A tag other than the one(s) the grammar allows here.
    UnexpectedTag {
        expected: &'static str,
        got: String,
    },
    UnknownType(String),
    /// A string longer than the grammar allows at that point.
    TooLong {
        what: &'static str,
        len: u64,
        max: usize,
    },
    EmptyName,
    /// `.`, `..`, or a name with `/` or NUL.
    InvalidName(String),
    /// Names must be strictly increasing (this also refuses duplicates).
    Unordered {
        prev: String,
        name: String,
    },
    EmptyTarget,
    TargetNul,
    /// `executable` must be followed by the empty string.
    ExecutableMarker,
    NonZeroPadding,
    /// A node at depth [`MAX_DEPTH`] or more (the root is at 0).
    TooDeep,
    /// The input ended before the root node was complete.
    Truncated,
    /// Bytes after the root node (Nix ignores them; we refuse them).
    TrailingBytes,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Escaped: a name may hold newlines or escape sequences, and an
        // error must stay one honest line.
        let at = if self.path.is_empty() { "<root>".to_string() } else { format!("{:?}", self.path) };
        write!(f, "invalid NAR at byte {} (entry {at}): ", self.offset)?;
        match &self.kind {
            ErrorKind::BadMagic => write!(f, "not a NAR (bad magic)"),
            ErrorKind::UnexpectedTag { expected, got } => {
                write!(f, "expected {expected}, got {got:?}")
            }
            ErrorKind::UnknownType(t) => write!(f, "unknown node type {t:?}"),
            ErrorKind::TooLong { what, len, max } => {
                write!(f, "{what} of {len} bytes exceeds the limit of {max}")
            }
            ErrorKind::EmptyName => write!(f, "empty entry name"),
            ErrorKind::InvalidName(n) => write!(f, "invalid entry name {n:?}"),
            ErrorKind::Unordered { prev, name } => {
                write!(f, "entry {name:?} does not sort after {prev:?} (unordered or duplicate)")
            }
            ErrorKind::EmptyTarget => write!(f, "empty symlink target"),
            ErrorKind::TargetNul => write!(f, "symlink target contains NUL"),
            ErrorKind::ExecutableMarker => write!(f, "'executable' not followed by \"\""),
            ErrorKind::NonZeroPadding => write!(f, "non-zero padding"),
            ErrorKind::TooDeep => {
                write!(f, "entry inside {MAX_DEPTH} nested directories (Nix's limit is {})", MAX_DEPTH - 1)
            }
            ErrorKind::Truncated => write!(f, "truncated"),
            ErrorKind::TrailingBytes => write!(f, "trailing bytes after the root node"),
        }
    }
}

impl std::error::Error for ParseError {}

/// Which grammar position the next token fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Magic,
    NodeOpen,
    TypeTag,
    TypeValue,
    /// `executable` or `contents`.
    RegularTag,
    ExecutableEmpty,
    ContentsTag,
    ContentsLen,
    /// Raw contents bytes; `remaining` of them still to come.
    Contents,
    /// Zero bytes after contents; `remaining` of them still to come.
    ContentsPad,
    NodeClose,
    TargetTag,
    Target,
    /// `entry` or `)`.
    DirTag,
    EntryOpen,
    NameTag,
    Name,
    NodeTag,
    EntryClose,
    Done,
}

/// How far into the current string token we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    Len,
    Body(usize),
    Pad(usize),
}

pub struct Parser {
    offset: u64,
    expect: Expect,
    tok: Tok,
    buf: Vec<u8>,
    executable: bool,
    remaining: u64,
    /// The current file's contents length, for the padding after it.
    contents_len: u64,
    /// Entry path from the root, slash-joined, for events and errors.
    path: Vec<u8>,
    /// Per open directory: where its entry's name starts in `path`, and the
    /// previous entry name (to check ordering).
    dirs: Vec<DirFrame>,
    /// Where the current entry's name starts in `path`.
    name_start: Vec<usize>,
}

struct DirFrame {
    prev: Vec<u8>,
}

impl Default for Parser {
    fn default() -> Self {
        Self::new()
    }
}

fn pad_len(n: u64) -> usize {
    ((8 - (n % 8)) % 8) as usize
}

impl Parser {
    pub fn new() -> Self {
        Parser {
            offset: 0,
            expect: Expect::Magic,
            tok: Tok::Len,
            buf: Vec::with_capacity(64),
            executable: false,
            remaining: 0,
            contents_len: 0,
            path: Vec::new(),
            dirs: Vec::new(),
            name_start: Vec::new(),
        }
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The entry being parsed, slash-joined from the root.
    pub fn path(&self) -> String {
        String::from_utf8_lossy(&self.path).into_owned()
    }

    /// Whether the root node is complete.
    pub fn is_done(&self) -> bool {
        self.expect == Expect::Done
    }

    fn err(&self, kind: ErrorKind) -> ParseError {
        ParseError { offset: self.offset, path: String::from_utf8_lossy(&self.path).into_owned(), kind }
    }

    /// Call after the last chunk: the NAR must be complete.
    pub fn finish(&self) -> Result<(), ParseError> {
        if self.is_done() {
            Ok(())
        } else {
            Err(self.err(ErrorKind::Truncated))
        }
    }

    /// The current entry's name (empty for the root).
    fn current_name(&self) -> &[u8] {
        match self.name_start.last() {
            Some(&s) => &self.path[s..],
            None => &[],
        }
    }

    fn max_len(&self) -> (usize, &'static str) {
        match self.expect {
            Expect::Name => (MAX_NAME, "entry name"),
            Expect::Target => (MAX_TARGET, "symlink target"),
            _ => (MAX_TAG, "tag"),
        }
    }

    /// Feeds `input`, calling `sink` for each event. An error from `sink`
    /// stops parsing and is returned as is.
    pub fn feed<E: From<ParseError>, F: FnMut(Event<'_>) -> Result<(), E> + ?Sized>(
        &mut self,
        mut input: &[u8],
        sink: &mut F,
    ) -> Result<(), E> {
        while !input.is_empty() {
            match self.expect {
                Expect::Done => return Err(self.err(ErrorKind::TrailingBytes).into()),
                Expect::Contents => {
                    let n = (self.remaining.min(input.len() as u64)) as usize;
                    let (data, rest) = input.split_at(n);
                    sink(Event::Data(data))?;
                    self.offset += n as u64;
                    self.remaining -= n as u64;
                    input = rest;
                    if self.remaining == 0 {
                        self.end_contents(sink)?;
                    }
                }
                Expect::ContentsPad => {
                    while self.remaining > 0 && !input.is_empty() {
                        if input[0] != 0 {
                            return Err(self.err(ErrorKind::NonZeroPadding).into());
                        }
                        input = &input[1..];
                        self.offset += 1;
                        self.remaining -= 1;
                    }
                    if self.remaining == 0 {
                        self.expect = Expect::NodeClose;
                    }
                }
                _ => {
                    input = self.feed_token(input, sink)?;
                }
            }
        }
        Ok(())
    }

    fn end_contents<E: From<ParseError>, F: FnMut(Event<'_>) -> Result<(), E> + ?Sized>(
        &mut self,
        sink: &mut F,
    ) -> Result<(), E> {
        sink(Event::RegularEnd)?;
        self.remaining = pad_len(self.contents_len) as u64;
        self.expect = if self.remaining == 0 { Expect::NodeClose } else { Expect::ContentsPad };
        Ok(())
    }

    /// Consumes bytes of a length-prefixed token (or the contents length).
    fn feed_token<'i, E: From<ParseError>, F: FnMut(Event<'_>) -> Result<(), E> + ?Sized>(
        &mut self,
        mut input: &'i [u8],
        sink: &mut F,
    ) -> Result<&'i [u8], E> {
        match self.tok {
            Tok::Len => {
                let need = 8 - self.buf.len();
                let n = need.min(input.len());
                self.buf.extend_from_slice(&input[..n]);
                self.offset += n as u64;
                input = &input[n..];
                if self.buf.len() < 8 {
                    return Ok(input);
                }
                let len = u64::from_le_bytes(self.buf[..8].try_into().unwrap());
                if self.expect == Expect::ContentsLen {
                    self.buf.clear();
                    self.start_contents(len, sink)?;
                    return Ok(input);
                }
                let (max, what) = self.max_len();
                if len > max as u64 {
                    let kind = match self.expect {
                        Expect::Magic => ErrorKind::BadMagic,
                        _ => ErrorKind::TooLong { what, len, max },
                    };
                    return Err(self.err(kind).into());
                }
                self.buf.clear();
                self.tok = Tok::Body(len as usize);
                if len == 0 {
                    self.tok = Tok::Pad(0);
                    return self.token_done(sink).map(|()| input);
                }
                Ok(input)
            }
            Tok::Body(len) => {
                let need = len - self.buf.len();
                let n = need.min(input.len());
                self.buf.extend_from_slice(&input[..n]);
                self.offset += n as u64;
                input = &input[n..];
                if self.buf.len() == len {
                    self.tok = Tok::Pad(pad_len(len as u64));
                    if pad_len(len as u64) == 0 {
                        self.token_done(sink)?;
                    }
                }
                Ok(input)
            }
            Tok::Pad(mut left) => {
                while left > 0 && !input.is_empty() {
                    if input[0] != 0 {
                        return Err(self.err(ErrorKind::NonZeroPadding).into());
                    }
                    input = &input[1..];
                    self.offset += 1;
                    left -= 1;
                }
                self.tok = Tok::Pad(left);
                if left == 0 {
                    self.token_done(sink)?;
                }
                Ok(input)
            }
        }
    }

    fn start_contents<E: From<ParseError>, F: FnMut(Event<'_>) -> Result<(), E> + ?Sized>(
        &mut self,
        len: u64,
        sink: &mut F,
    ) -> Result<(), E> {
        self.tok = Tok::Len;
        sink(Event::Regular { name: self.current_name(), executable: self.executable, size: len })?;
        self.remaining = len;
        self.contents_len = len;
        self.expect = Expect::Contents;
        if len == 0 {
            self.end_contents(sink)?;
        }
        Ok(())
    }

    fn expect_tag(&self, want: &'static str) -> Result<(), ParseError> {
        if self.buf == want.as_bytes() {
            Ok(())
        } else {
            Err(self
                .err(ErrorKind::UnexpectedTag { expected: want, got: String::from_utf8_lossy(&self.buf).into_owned() }))
        }
    }

    /// A complete string token is in `buf`: act on it.
    fn token_done<E: From<ParseError>, F: FnMut(Event<'_>) -> Result<(), E> + ?Sized>(
        &mut self,
        sink: &mut F,
    ) -> Result<(), E> {
        self.tok = Tok::Len;
        let tok = self.buf.as_slice();
        match self.expect {
            Expect::Magic => {
                if tok != b"nix-archive-1" {
                    return Err(self.err(ErrorKind::BadMagic).into());
                }
                self.expect = Expect::NodeOpen;
            }
            Expect::NodeOpen => {
                self.expect_tag("(")?;
                self.expect = Expect::TypeTag;
            }
            Expect::TypeTag => {
                self.expect_tag("type")?;
                self.expect = Expect::TypeValue;
            }
            Expect::TypeValue => match tok {
                b"regular" => {
                    self.executable = false;
                    self.expect = Expect::RegularTag;
                }
                b"symlink" => self.expect = Expect::TargetTag,
                b"directory" => {
                    sink(Event::Directory { name: self.current_name() })?;
                    self.dirs.push(DirFrame { prev: Vec::new() });
                    self.expect = Expect::DirTag;
                }
                other => {
                    let t = String::from_utf8_lossy(other).into_owned();
                    return Err(self.err(ErrorKind::UnknownType(t)).into());
                }
            },
            Expect::RegularTag => match tok {
                b"executable" => {
                    self.executable = true;
                    self.expect = Expect::ExecutableEmpty;
                }
                b"contents" => self.expect = Expect::ContentsLen,
                _ => self.expect_tag("'executable' or 'contents'")?,
            },
            Expect::ExecutableEmpty => {
                if !tok.is_empty() {
                    return Err(self.err(ErrorKind::ExecutableMarker).into());
                }
                self.expect = Expect::ContentsTag;
            }
            Expect::ContentsTag => {
                self.expect_tag("contents")?;
                self.expect = Expect::ContentsLen;
            }
            Expect::TargetTag => {
                self.expect_tag("target")?;
                self.expect = Expect::Target;
            }
            Expect::Target => {
                if tok.is_empty() {
                    return Err(self.err(ErrorKind::EmptyTarget).into());
                }
                if tok.contains(&0) {
                    return Err(self.err(ErrorKind::TargetNul).into());
                }
                let name = match self.name_start.last() {
                    Some(&s) => &self.path[s..],
                    None => &[],
                };
                sink(Event::Symlink { name, target: &self.buf })?;
                self.expect = Expect::NodeClose;
            }
            Expect::NodeClose => {
                self.expect_tag(")")?;
                self.node_done();
            }
            Expect::DirTag => match tok {
                b"entry" => self.expect = Expect::EntryOpen,
                b")" => {
                    sink(Event::DirectoryEnd)?;
                    self.dirs.pop();
                    self.node_done();
                }
                _ => self.expect_tag("'entry' or ')'")?,
            },
            Expect::EntryOpen => {
                self.expect_tag("(")?;
                self.expect = Expect::NameTag;
            }
            Expect::NameTag => {
                self.expect_tag("name")?;
                self.expect = Expect::Name;
            }
            Expect::Name => {
                self.check_name()?;
                let frame = self.dirs.last_mut().expect("entries only inside directories");
                frame.prev.clear();
                frame.prev.extend_from_slice(&self.buf);
                if !self.path.is_empty() {
                    self.path.push(b'/');
                }
                self.name_start.push(self.path.len());
                self.path.extend_from_slice(&self.buf);
                self.expect = Expect::NodeTag;
            }
            Expect::NodeTag => {
                self.expect_tag("node")?;
                // The node about to start sits inside every open directory.
                // Nix checks every node, not just directories: a file inside
                // the 64th directory is refused too.
                if self.dirs.len() >= MAX_DEPTH {
                    return Err(self.err(ErrorKind::TooDeep).into());
                }
                self.expect = Expect::NodeOpen;
            }
            Expect::EntryClose => {
                self.expect_tag(")")?;
                let start = self.name_start.pop().expect("entry open");
                self.path.truncate(start.saturating_sub(1));
                self.expect = Expect::DirTag;
            }
            Expect::ContentsLen | Expect::Contents | Expect::ContentsPad | Expect::Done => {
                unreachable!("not a string token state")
            }
        }
        self.buf.clear();
        Ok(())
    }

    fn check_name(&self) -> Result<(), ParseError> {
        let name = self.buf.as_slice();
        let shown = || String::from_utf8_lossy(name).into_owned();
        // Name the offending entry itself, not just its directory.
        let err = |kind| {
            let mut e = self.err(kind);
            if !e.path.is_empty() {
                e.path.push('/');
            }
            e.path.push_str(&shown());
            e
        };
        if name.is_empty() {
            return Err(err(ErrorKind::EmptyName));
        }
        if name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
            return Err(err(ErrorKind::InvalidName(shown())));
        }
        let prev = &self.dirs.last().expect("inside a directory").prev;
        if !prev.is_empty() && name <= prev.as_slice() {
            return Err(err(ErrorKind::Unordered { prev: String::from_utf8_lossy(prev).into_owned(), name: shown() }));
        }
        Ok(())
    }

    /// A node's closing `)` was read: the root is done, or its entry closes.
    fn node_done(&mut self) {
        self.expect = if self.name_start.is_empty() { Expect::Done } else { Expect::EntryClose };
    }
}
