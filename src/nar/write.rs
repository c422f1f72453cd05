//! Writing NARs: a tree encoder (for tests, fuzzing and benchmarks) and a
//! streaming dumper of an installed path (for `nixless verify`).
//!
//! Both write the grammar in [`super::parse`]. The encoder writes entries in
//! the order given, so tests can build invalid NARs (unordered, duplicate,
//! hostile names) as easily as valid ones.

use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{self as rfs, FileType, Mode, OFlags};
use std::io::{self, Read, Write};

fn put_str(out: &mut impl Write, s: &[u8]) -> io::Result<()> {
    out.write_all(&(s.len() as u64).to_le_bytes())?;
    out.write_all(s)?;
    out.write_all(&[0u8; 8][..(8 - s.len() % 8) % 8])
}

/// A file system tree to encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Regular { executable: bool, contents: Vec<u8> },
    Symlink(Vec<u8>),
    Directory(Vec<(Vec<u8>, Node)>),
}

impl Node {
    pub fn file(contents: &[u8]) -> Node {
        Node::Regular { executable: false, contents: contents.to_vec() }
    }

    pub fn exe(contents: &[u8]) -> Node {
        Node::Regular { executable: true, contents: contents.to_vec() }
    }

    pub fn link(target: &[u8]) -> Node {
        Node::Symlink(target.to_vec())
    }

    pub fn dir(entries: Vec<(&[u8], Node)>) -> Node {
        Node::Directory(entries.into_iter().map(|(n, e)| (n.to_vec(), e)).collect())
    }
}

/// Encodes `node` as a complete NAR (magic included), entries in given order.
pub fn encode(node: &Node) -> Vec<u8> {
    let mut out = Vec::new();
    put_str(&mut out, b"nix-archive-1").unwrap();
    encode_node(&mut out, node);
    out
}

fn encode_node(out: &mut Vec<u8>, node: &Node) {
    put_str(out, b"(").unwrap();
    put_str(out, b"type").unwrap();
    match node {
        Node::Regular { executable, contents } => {
            put_str(out, b"regular").unwrap();
            if *executable {
                put_str(out, b"executable").unwrap();
                put_str(out, b"").unwrap();
            }
            put_str(out, b"contents").unwrap();
            put_str(out, contents).unwrap();
        }
        Node::Symlink(target) => {
            put_str(out, b"symlink").unwrap();
            put_str(out, b"target").unwrap();
            put_str(out, target).unwrap();
        }
        Node::Directory(entries) => {
            put_str(out, b"directory").unwrap();
            for (name, child) in entries {
                put_str(out, b"entry").unwrap();
                put_str(out, b"(").unwrap();
                put_str(out, b"name").unwrap();
                put_str(out, name).unwrap();
                put_str(out, b"node").unwrap();
                encode_node(out, child);
                put_str(out, b")").unwrap();
            }
        }
    }
    put_str(out, b")").unwrap();
}

/// Serialises the file system object `name` in directory `dir` as a NAR into
/// `out`, without following symlinks and without recursion (deep trees).
/// Entries are sorted bytewise, as Nix sorts them.
pub fn dump(dir: BorrowedFd<'_>, name: &[u8], out: &mut impl Write) -> io::Result<()> {
    put_str(out, b"nix-archive-1")?;
    // Open directories, each with its entries still to write (reversed, so
    // pop() yields them in order).
    let mut stack: Vec<(OwnedFd, Vec<Vec<u8>>)> = Vec::new();
    if let Some(frame) = dump_node(dir, name, out)? {
        stack.push(frame);
    }
    while let Some((fd, names)) = stack.last_mut() {
        match names.pop() {
            Some(child) => {
                for tok in [&b"entry"[..], b"(", b"name", &child, b"node"] {
                    put_str(out, tok)?;
                }
                match dump_node(fd.as_fd(), &child, out)? {
                    Some(frame) => stack.push(frame),
                    None => put_str(out, b")")?,
                }
            }
            None => {
                stack.pop();
                put_str(out, b")")?; // the directory node
                if !stack.is_empty() {
                    put_str(out, b")")?; // the entry holding it
                }
            }
        }
    }
    Ok(())
}

/// Writes one node; for a directory only its opening, returning the frame
/// whose entries the caller writes.
fn dump_node(at: BorrowedFd<'_>, name: &[u8], out: &mut impl Write) -> io::Result<Option<(OwnedFd, Vec<Vec<u8>>)>> {
    let st = rfs::statat(at, name, rfs::AtFlags::SYMLINK_NOFOLLOW)?;
    put_str(out, b"(")?;
    put_str(out, b"type")?;
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => {
            put_str(out, b"regular")?;
            if st.st_mode & 0o100 != 0 {
                put_str(out, b"executable")?;
                put_str(out, b"")?;
            }
            put_str(out, b"contents")?;
            let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let mut f = std::fs::File::from(rfs::openat(at, name, flags, Mode::empty())?);
            let size = st.st_size as u64;
            out.write_all(&size.to_le_bytes())?;
            if io::copy(&mut (&mut f).take(size), out)? != size {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while reading"));
            }
            out.write_all(&[0u8; 8][..(8 - (size % 8) as usize) % 8])?;
            put_str(out, b")")?;
            Ok(None)
        }
        FileType::Symlink => {
            put_str(out, b"symlink")?;
            put_str(out, b"target")?;
            put_str(out, rfs::readlinkat(at, name, Vec::new())?.as_bytes())?;
            put_str(out, b")")?;
            Ok(None)
        }
        FileType::Directory => {
            put_str(out, b"directory")?;
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let fd = rfs::openat(at, name, flags, Mode::empty())?;
            let mut names = Vec::new();
            for entry in rfs::Dir::read_from(&fd)? {
                let n = entry?.file_name().to_bytes().to_vec();
                if n != b"." && n != b".." {
                    names.push(n);
                }
            }
            names.sort_unstable_by(|a, b| b.cmp(a));
            Ok(Some((fd, names)))
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: not a regular file, directory or symlink", String::from_utf8_lossy(name)),
        )),
    }
}
