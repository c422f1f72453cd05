//! Parser and unpacker tests on NARs built by `write::encode`. Agreement
//! with real Nix (`nix-store --restore`/`--dump`) is checked by the
//! integration tests in `tests/`.

use super::parse::{ErrorKind, Event, ParseError, Parser, MAX_DEPTH};
use super::write::{encode, Node};
use super::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

/// Rebuilds the tree from the event stream, feeding `chunk` bytes at a time.
fn parse_tree(nar: &[u8], chunk: usize) -> Result<Node, ParseError> {
    enum Open {
        Dir(Vec<u8>, Vec<(Vec<u8>, Node)>),
        File(Vec<u8>, bool, Vec<u8>),
    }
    let mut stack: Vec<Open> = Vec::new();
    let mut done: Option<Node> = None;
    fn attach(stack: &mut [Open], done: &mut Option<Node>, name: Vec<u8>, node: Node) {
        match stack.last_mut() {
            Some(Open::Dir(_, entries)) => entries.push((name, node)),
            _ => *done = Some(node),
        }
    }
    let mut p = Parser::new();
    for piece in nar.chunks(chunk.max(1)) {
        p.feed(piece, &mut |ev: Event<'_>| -> Result<(), ParseError> {
            match ev {
                Event::Directory { name } => stack.push(Open::Dir(name.to_vec(), Vec::new())),
                Event::DirectoryEnd => {
                    let Some(Open::Dir(name, entries)) = stack.pop() else { panic!("unbalanced") };
                    attach(&mut stack, &mut done, name, Node::Directory(entries));
                }
                Event::Regular { name, executable, size } => {
                    stack.push(Open::File(name.to_vec(), executable, Vec::with_capacity(size as usize)))
                }
                Event::Data(d) => {
                    let Some(Open::File(_, _, c)) = stack.last_mut() else { panic!("data outside file") };
                    c.extend_from_slice(d);
                }
                Event::RegularEnd => {
                    let Some(Open::File(name, executable, contents)) = stack.pop() else { panic!() };
                    attach(&mut stack, &mut done, name, Node::Regular { executable, contents });
                }
                Event::Symlink { name, target } => {
                    attach(&mut stack, &mut done, name.to_vec(), Node::Symlink(target.to_vec()))
                }
            }
            Ok(())
        })?;
    }
    if nar.is_empty() {
        p.feed(&[], &mut |_| -> Result<(), ParseError> { Ok(()) })?;
    }
    p.finish()?;
    Ok(done.expect("finish() implies a root"))
}

fn sample() -> Node {
    Node::dir(vec![
        (b"bin", Node::dir(vec![(b"hello", Node::exe(b"#!/bin/sh\necho hi\n"))])),
        (b"eight", Node::file(b"12345678")),
        (b"empty", Node::file(b"")),
        (b"emptydir", Node::dir(vec![])),
        (b"link", Node::link(b"bin/hello")),
        (b"n\xc3\xbc \xe6\x97\xa5", Node::file(b"unicode name")),
        (b"share", Node::dir(vec![(b"abs", Node::link(b"/etc/hostname")), (b"dangling", Node::link(b"../nope"))])),
    ])
}

#[test]
fn roundtrips_at_every_chunk_size() {
    for tree in [sample(), Node::file(b"just a file"), Node::exe(b""), Node::link(b"/bin/sh")] {
        let nar = encode(&tree);
        for chunk in [1, 2, 3, 7, 8, 9, 64, 4096, nar.len()] {
            assert_eq!(parse_tree(&nar, chunk).unwrap(), tree, "chunk {chunk}");
        }
    }
}

fn kind(tree: &Node) -> ErrorKind {
    parse_tree(&encode(tree), 5).unwrap_err().kind
}

fn in_dir(name: &[u8], node: Node) -> Node {
    Node::dir(vec![(name, node)])
}

#[test]
fn refuses_bad_names() {
    assert_eq!(kind(&in_dir(b"", Node::file(b""))), ErrorKind::EmptyName);
    for bad in [&b"."[..], b"..", b"a/b", b"/", b"a\0b"] {
        assert!(matches!(kind(&in_dir(bad, Node::file(b""))), ErrorKind::InvalidName(_)), "{bad:?}");
    }
    let long = vec![b'a'; 256];
    assert!(matches!(kind(&in_dir(&long, Node::file(b""))), ErrorKind::TooLong { max: 255, .. }));
    assert!(parse_tree(&encode(&in_dir(&long[..255], Node::file(b""))), 5).is_ok());
}

#[test]
fn refuses_unordered_and_duplicate_entries() {
    let dup = Node::dir(vec![(b"a", Node::link(b"/etc")), (b"a", Node::dir(vec![]))]);
    assert!(matches!(kind(&dup), ErrorKind::Unordered { .. }));
    let unordered = Node::dir(vec![(b"b", Node::file(b"")), (b"a", Node::file(b""))]);
    assert!(matches!(kind(&unordered), ErrorKind::Unordered { .. }));
    // Bytewise, not by locale: "B" (0x42) sorts before "a" (0x61).
    let bytewise = Node::dir(vec![(b"B", Node::file(b"")), (b"a", Node::file(b""))]);
    assert!(parse_tree(&encode(&bytewise), 3).is_ok());
}

#[test]
fn refuses_bad_symlinks() {
    assert_eq!(kind(&Node::link(b"")), ErrorKind::EmptyTarget);
    assert_eq!(kind(&Node::link(b"a\0b")), ErrorKind::TargetNul);
    let long = vec![b'x'; 4096];
    assert!(matches!(kind(&Node::link(&long)), ErrorKind::TooLong { max: 4095, .. }));
    assert!(parse_tree(&encode(&Node::link(&long[..4095])), 100).is_ok());
}

/// `node` inside `n` nested directories, so at depth `n` (the root is 0).
fn at_depth(n: usize, node: Node) -> Node {
    (0..n).fold(node, |inner, _| in_dir(b"d", inner))
}

/// Nix (`archive.cc`, `parse()`) refuses any node at depth >= `narMaxDepth`
/// (64), files and symlinks included, not only directories.
#[test]
fn depth_limit_counts_every_node_type() {
    assert_eq!(MAX_DEPTH, 64);
    for leaf in [Node::file(b"bottom"), Node::exe(b""), Node::link(b"/etc"), Node::dir(vec![])] {
        let ok = at_depth(MAX_DEPTH - 1, leaf.clone());
        assert_eq!(parse_tree(&encode(&ok), 64).unwrap(), ok, "{leaf:?} at depth 63");
        let deep = at_depth(MAX_DEPTH, leaf.clone());
        assert_eq!(kind(&deep), ErrorKind::TooDeep, "{leaf:?} at depth 64");
    }
    // Refused as soon as the node starts, before any of its bytes are used.
    let deep = encode(&at_depth(MAX_DEPTH, Node::file(b"x")));
    let err = parse_tree(&deep, 7).unwrap_err();
    assert_eq!(err.path, vec!["d"; MAX_DEPTH].join("/"));
    assert!(err.to_string().contains("64 nested directories"), "{err}");
}

/// Replaces the first occurrence of the token `from` (as a padded string)
/// with `to` in a NAR.
fn retoken(nar: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let tok = |s: &[u8]| {
        let mut v = (s.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(s);
        v.resize(v.len() + (8 - s.len() % 8) % 8, 0);
        v
    };
    let (f, t) = (tok(from), tok(to));
    let at = nar.windows(f.len()).position(|w| w == f).expect("token present");
    [&nar[..at], &t[..], &nar[at + f.len()..]].concat()
}

/// A NAR written token by token (contents are a token too: same encoding).
fn toks(tokens: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for t in tokens {
        out.extend_from_slice(&(t.len() as u64).to_le_bytes());
        out.extend_from_slice(t);
        out.resize(out.len() + (8 - t.len() % 8) % 8, 0);
    }
    out
}

fn kind_bytes(nar: &[u8]) -> ErrorKind {
    parse_tree(nar, 3).unwrap_err().kind
}

#[test]
fn refuses_grammar_violations() {
    let exe = toks(&[b"nix-archive-1", b"(", b"type", b"regular", b"executable", b"1", b"contents", b"", b")"]);
    assert_eq!(kind_bytes(&exe), ErrorKind::ExecutableMarker);
    let exe_ok = toks(&[b"nix-archive-1", b"(", b"type", b"regular", b"executable", b"", b"contents", b"", b")"]);
    assert_eq!(parse_tree(&exe_ok, 3).unwrap(), Node::exe(b""));
    // `executable` after `contents`: the grammar wants `)` there.
    let after = toks(&[b"nix-archive-1", b"(", b"type", b"regular", b"contents", b"x", b"executable", b"", b")"]);
    assert!(matches!(kind_bytes(&after), ErrorKind::UnexpectedTag { expected: ")", .. }));
    let file = encode(&Node::file(b"x"));
    assert_eq!(kind_bytes(&retoken(&file, b"regular", b"fifo")), ErrorKind::UnknownType("fifo".into()));
    assert!(matches!(kind_bytes(&retoken(&file, b"contents", b"content")), ErrorKind::UnexpectedTag { .. }));
    assert!(matches!(kind_bytes(&retoken(&file, b"type", b"kind")), ErrorKind::UnexpectedTag { .. }));
    assert_eq!(kind_bytes(&retoken(&file, b"nix-archive-1", b"nix-archive-2")), ErrorKind::BadMagic);
    let dir = encode(&in_dir(b"a", Node::file(b"")));
    assert!(matches!(kind_bytes(&retoken(&dir, b"entry", b"entries")), ErrorKind::UnexpectedTag { .. }));
    assert!(matches!(kind_bytes(&retoken(&dir, b"name", b"nom")), ErrorKind::UnexpectedTag { .. }));
    // A huge length where a tag belongs is refused before any allocation.
    let mut huge = file.clone();
    huge[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(kind_bytes(&huge), ErrorKind::TooLong { .. }));
}

#[test]
fn refuses_nonzero_padding() {
    let file = encode(&Node::file(b"abc")); // contents padded by 5 zeros
    let mut bad = file.clone();
    let pad_at = file.len() - 16 - 5; // before the final ")" token
    bad[pad_at] = 1;
    assert_eq!(kind_bytes(&bad), ErrorKind::NonZeroPadding);
    let mut bad_tok = file.clone();
    bad_tok[8 + 13] = b'x'; // padding after "nix-archive-1"
    assert_eq!(kind_bytes(&bad_tok), ErrorKind::NonZeroPadding);
}

#[test]
fn refuses_truncation_at_every_length_and_trailing_bytes() {
    let nar = encode(&sample());
    for cut in 0..nar.len() {
        let err = parse_tree(&nar[..cut], 7).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Truncated, "cut at {cut}");
    }
    let mut more = nar.clone();
    more.push(0);
    let err = parse_tree(&more, 7).unwrap_err();
    assert_eq!(err.kind, ErrorKind::TrailingBytes);
    assert_eq!(err.offset, nar.len() as u64);
}

#[test]
fn errors_name_entry_and_offset() {
    let tree = Node::dir(vec![(b"sub", Node::dir(vec![(b"x", Node::file(b"")), (b"x", Node::file(b""))]))]);
    let err = parse_tree(&encode(&tree), 1).unwrap_err();
    assert_eq!(err.path, "sub/x");
    assert!(err.offset > 0);
    let msg = err.to_string();
    assert!(msg.contains("sub/x") && msg.contains("byte"), "{msg}");
}

fn unpack_tree(tree: &Node) -> (tempfile::TempDir, Result<(), NarError>) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::fs::File::open(tmp.path()).unwrap();
    let res = unpack_bytes(rustix::fd::AsFd::as_fd(&dir), b"out", &encode(tree));
    (tmp, res)
}

#[test]
fn unpacks_with_canonical_metadata_and_dumps_back() {
    let tree = sample();
    let (tmp, res) = unpack_tree(&tree);
    res.unwrap();
    let out = tmp.path().join("out");
    for entry in walk(&out) {
        let md = std::fs::symlink_metadata(&entry).unwrap();
        assert_eq!(md.mtime(), 1, "{entry:?}");
        let mode = md.permissions().mode() & 0o7777;
        if md.is_dir() {
            assert_eq!(mode, 0o555, "{entry:?}");
        } else if md.is_file() {
            assert!(mode == 0o444 || mode == 0o555, "{entry:?} {mode:o}");
        }
    }
    assert_eq!(std::fs::symlink_metadata(out.join("bin/hello")).unwrap().permissions().mode() & 0o777, 0o555);
    assert_eq!(std::fs::read_link(out.join("share/abs")).unwrap(), std::path::Path::new("/etc/hostname"));
    let dir = std::fs::File::open(tmp.path()).unwrap();
    let mut dumped = Vec::new();
    write::dump(rustix::fd::AsFd::as_fd(&dir), b"out", &mut dumped).unwrap();
    assert_eq!(dumped, encode(&tree));
    make_writable(tmp.path());
}

fn walk(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![p.to_path_buf()];
    if std::fs::symlink_metadata(p).unwrap().is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            out.extend(walk(&e.unwrap().path()));
        }
    }
    out
}

/// So TempDir can clean up when tests run unprivileged.
fn make_writable(p: &std::path::Path) {
    for e in walk(p) {
        let md = std::fs::symlink_metadata(&e).unwrap();
        if md.is_dir() {
            std::fs::set_permissions(&e, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
}

#[test]
fn unpacker_never_follows_or_replaces() {
    // Events a broken parser might let through: the unpacker refuses them too.
    let tmp = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let dir = std::fs::File::open(tmp.path()).unwrap();
    let mut u = Unpacker::new(rustix::fd::AsFd::as_fd(&dir), b"out");
    u.event(Event::Directory { name: b"" }).unwrap();
    let target = outside.path().as_os_str().as_encoded_bytes();
    u.event(Event::Symlink { name: b"a", target }).unwrap();
    assert!(u.event(Event::Directory { name: b"a" }).is_err());
    let e = u.event(Event::Regular { name: b"a", executable: false, size: 1 }).unwrap_err();
    assert_eq!(e.source.raw_os_error(), Some(libc_eexist()));
    assert!(u.event(Event::Symlink { name: b"a", target: b"x" }).is_err());
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    drop(u);
    make_writable(tmp.path());
}

fn libc_eexist() -> i32 {
    rustix::io::Errno::EXIST.raw_os_error()
}
