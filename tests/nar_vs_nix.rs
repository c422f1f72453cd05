//! Real Nix (2.8, `nix-store --restore`) and our parser/unpacker must agree
//! on which NARs are valid, except for a short, explained list of shapes
//! Nix 2.8 is laxer about. Valid NARs must round-trip through both trees
//! byte for byte. Hostile NARs must be refused by us without writing
//! anything outside the target, also end to end through a signed cache.

mod common;

use common::{nix_hash_path, nixless, rm_rf, NIX_CONFIG};
use nixless::nar::parse::{Event, ParseError, Parser};
use nixless::nar::write::{dump, encode, Node};
use nixless::nar::{unpack_bytes, NarError};
use nixless::nix::{keys, nixbase32, SecretKey, Sha256, StorePath};
use sha2::Digest;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command, Stdio};

// ---------------------------------------------------------------------------
// Building NARs token by token

/// One NAR string: u64 LE length, bytes, zero padding to 8.
fn s(b: impl AsRef<[u8]>) -> Vec<u8> {
    let b = b.as_ref();
    let mut out = (b.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(b);
    out.resize(out.len() + (8 - b.len() % 8) % 8, 0);
    out
}

/// A run of NAR strings.
fn toks(ts: &[&[u8]]) -> Vec<u8> {
    ts.iter().copied().flat_map(s).collect()
}

fn magic() -> Vec<u8> {
    s(b"nix-archive-1")
}

/// Magic followed by raw node bytes.
fn nar(node: Vec<u8>) -> Vec<u8> {
    let mut out = magic();
    out.extend(node);
    out
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn file(c: &[u8]) -> Node {
    Node::file(c)
}

fn dir(entries: Vec<(&[u8], Node)>) -> Node {
    Node::dir(entries)
}

/// `depth` directories nested inside each other (root included), a file at
/// the bottom: the file is at depth `depth` (the root is at 0).
fn nested(depth: usize) -> Node {
    at_depth(depth, file(b"bottom"))
}

/// `node` inside `depth` nested directories.
fn at_depth(depth: usize, node: Node) -> Node {
    (0..depth).fold(node, |inner, _| dir(vec![(b"d", inner)]))
}

fn sha256(data: &[u8]) -> Sha256 {
    Sha256(sha2::Sha256::digest(data).into())
}

// ---------------------------------------------------------------------------
// The table

struct Case {
    name: &'static str,
    nar: Vec<u8>,
    /// Valid by the format (and by us).
    valid: bool,
}

/// Shapes Nix 2.8 accepts although they are invalid (we refuse them all).
/// Found empirically with `nix-store --restore` of Nix 2.8.0 (Debian).
/// Current Nix (`src/libutil/archive.cc`, `parse()`) refuses every one of
/// them as well, except trailing bytes, which it never reads: refusing those
/// is our own rule.
const NIX28_LAXER: &[(&str, &str)] = &[
    // libutil/archive.cc in 2.8 declares `prevName` inside the per-entry
    // block, so the ordering check compares against "" and never fires;
    // only an exact duplicate fails, at creation time (EEXIST).
    ("unordered entries", "2.8's sort check is dead code (prevName reset per entry)"),
    // The parser loops over tags in any order inside a node.
    ("executable after contents", "tags of a regular node are accepted in any order"),
    ("executable twice", "tags of a regular node are accepted in any order"),
    ("contents twice", "second contents is appended to the file"),
    ("regular without contents", "an empty file is created at `type regular`"),
    ("entry with two name/node pairs", "entry tags loop until `)`"),
    ("entry without name or node", "an empty entry is skipped"),
    // Nix never looks past the root node.
    ("trailing 1 byte", "Nix ignores bytes after the root node"),
    ("trailing token", "Nix ignores bytes after the root node"),
    // symlink(2) gets a C string: the target is silently cut at the NUL.
    ("symlink target with NUL", "target truncated at the NUL by symlink(2)"),
    // Plain recursion, no depth limit in 2.8; current Nix (archive.cc,
    // `parse()`, `narMaxDepth = 64`) refuses any node at depth >= 64.
    ("file at depth 64", "no depth limit in 2.8 (current Nix refuses)"),
    ("symlink at depth 64", "no depth limit in 2.8 (current Nix refuses)"),
    ("empty directory at depth 64", "no depth limit in 2.8 (current Nix refuses)"),
    ("nesting of 65 directories", "no depth limit in 2.8"),
];

fn cases(victim: &Path) -> Vec<Case> {
    let v = victim.as_os_str().as_encoded_bytes();
    let name255 = vec![b'n'; 255];
    let name256 = vec![b'n'; 256];
    let target4095 = vec![b't'; 4095];
    let target4096 = vec![b't'; 4096];
    let big: Vec<u8> = (0..100_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let small = encode(&dir(vec![(b"a", file(b"hello")), (b"b", Node::exe(b"#!/bin/sh\n"))]));
    let reg = |c: &[u8]| cat(&[&toks(&[b"(", b"type", b"regular", b"contents"]), &s(c), &toks(&[b")"])]);
    let mut out = Vec::new();
    let mut ok = |name, nar| out.push(Case { name, nar, valid: true });

    // Valid shapes.
    ok(
        "nested directories",
        encode(&dir(vec![
            (b"a", dir(vec![(b"b", dir(vec![(b"c", file(b"deep"))])), (b"x", file(b"x"))])),
            (b"z", file(b"zz")),
        ])),
    );
    ok("root empty file", encode(&file(b"")));
    ok("root file of 1 byte", encode(&file(b"1")));
    ok("root file of 8 bytes", encode(&file(b"12345678")));
    ok("root file of 9 bytes", encode(&file(b"123456789")));
    ok("root file of 100000 bytes", encode(&file(&big)));
    ok("root executable", encode(&Node::exe(b"#!/bin/sh\necho hi\n")));
    ok("root empty executable", encode(&Node::exe(b"")));
    ok("empty file in directory", encode(&dir(vec![(b"empty", file(b""))])));
    ok(
        "executable in directory",
        encode(&dir(vec![(b"bin", dir(vec![(b"sh", Node::exe(b"#!x")), (b"txt", file(b"t"))]))])),
    );
    ok("root empty directory", encode(&dir(vec![])));
    ok("empty subdirectory", encode(&dir(vec![(b"e", dir(vec![])), (b"f", file(b"f"))])));
    ok(
        "symlinks relative/absolute/dangling",
        encode(&dir(vec![
            (b"abs", Node::link(v)),
            (b"dangling", Node::link(b"does/not/exist")),
            (b"dir", dir(vec![(b"up", Node::link(b"../target"))])),
            (b"rel", Node::link(b"target")),
            (b"target", file(b"t")),
        ])),
    );
    ok(
        "non-ASCII names",
        encode(&dir(vec![
            (b" space", file(b"")),
            (b"-dash", file(b"")),
            ("caf\u{e9}".as_bytes(), file(b"")),
            (b"\x80\xff not utf-8", file(b"")),
            ("\u{65e5}\u{672c}".as_bytes(), file(b"")),
        ])),
    );
    ok("name of 255 bytes", encode(&dir(vec![(&name255, file(b"long"))])));
    ok("root symlink", encode(&Node::link(b"/nix/store/nowhere")));
    ok("root symlink to victim", encode(&Node::link(v)));
    ok("symlink target of 4095 bytes", encode(&Node::link(&target4095)));
    ok(
        "bytewise order B < a < a.b < ab < \\xff",
        encode(&dir(vec![
            (b"B", file(b"")),
            (b"a", file(b"")),
            (b"a.b", file(b"")),
            (b"ab", file(b"")),
            (b"\xff", file(b"")),
        ])),
    );
    // Current Nix's depth limit, on the accepted side (see NIX28_LAXER for
    // the refused side, which 2.8 still accepts).
    ok("file at depth 63", encode(&nested(63)));
    ok("symlink at depth 63", encode(&at_depth(63, Node::link(b"/etc"))));
    ok("empty directory at depth 63", encode(&at_depth(63, dir(vec![]))));

    let mut bad = |name, nar| out.push(Case { name, nar, valid: false });
    let one = |n: &[u8], node: Node| encode(&dir(vec![(n, node)]));

    // Names.
    bad("empty name", one(b"", file(b"")));
    bad("name .", one(b".", file(b"")));
    bad("name ..", one(b"..", file(b"x")));
    bad("name .. directory", one(b"..", dir(vec![(b"escaped", file(b"x"))])));
    bad("name with /", one(b"a/b", file(b"")));
    bad("name with NUL", one(b"a\0b", file(b"")));
    bad("name of 256 bytes", one(&name256, file(b"")));

    // Symlink targets.
    bad("symlink target empty", encode(&Node::link(b"")));
    bad("symlink target with NUL", encode(&Node::link(b"a\0b")));
    bad("symlink target of 4096 bytes", encode(&Node::link(&target4096)));

    // Order and duplicates.
    bad("unordered entries", encode(&dir(vec![(b"b", file(b"")), (b"a", file(b""))])));
    bad("duplicate files", encode(&dir(vec![(b"a", file(b"1")), (b"a", file(b"2"))])));
    bad(
        "duplicate: symlink then directory (CVE-2024-45593)",
        encode(&dir(vec![(b"a", Node::link(v)), (b"a", dir(vec![(b"f", file(b"pwned"))]))])),
    );
    bad("duplicate: symlink then file", encode(&dir(vec![(b"a", Node::link(v)), (b"a", file(b"pwned"))])));
    bad("duplicate: symlink then symlink", encode(&dir(vec![(b"a", Node::link(v)), (b"a", Node::link(b"elsewhere"))])));
    bad("duplicate: directory then file", encode(&dir(vec![(b"a", dir(vec![])), (b"a", file(b"x"))])));

    // Regular-node tags.
    bad(
        "executable marker non-empty",
        nar(toks(&[b"(", b"type", b"regular", b"executable", b"x", b"contents", b"abc", b")"])),
    );
    bad(
        "executable after contents",
        nar(toks(&[b"(", b"type", b"regular", b"contents", b"abc", b"executable", b"", b")"])),
    );
    bad(
        "executable twice",
        nar(toks(&[b"(", b"type", b"regular", b"executable", b"", b"executable", b"", b"contents", b"a", b")"])),
    );
    bad("contents twice", nar(toks(&[b"(", b"type", b"regular", b"contents", b"a", b"contents", b"b", b")"])));
    bad("regular without contents", nar(toks(&[b"(", b"type", b"regular", b")"])));
    bad("type twice", nar(toks(&[b"(", b"type", b"regular", b"type", b"regular", b"contents", b"", b")"])));
    bad("unknown tag", nar(toks(&[b"(", b"type", b"regular", b"mode", b"0644", b"contents", b"", b")"])));
    // Nix reads tags of up to 32 bytes (`narMaxTag`), we of up to 16; none
    // is longer than 13, so either way such a tag is refused.
    bad("type tag of 17 bytes", nar(toks(&[b"(", b"type", &[b'r'; 17], b")"])));
    bad("type tag of 33 bytes", nar(toks(&[b"(", b"type", &[b'r'; 33], b")"])));
    bad("unknown node type", nar(toks(&[b"(", b"type", b"fifo", b")"])));
    bad("symlink with contents tag", nar(toks(&[b"(", b"type", b"symlink", b"contents", b"x", b")"])));
    bad("symlink target twice", nar(toks(&[b"(", b"type", b"symlink", b"target", b"a", b"target", b"b", b")"])));
    bad("bad magic", cat(&[&s(b"nix-archive-2"), &reg(b"")]));
    bad("magic too long", cat(&[&s(b"nix-archive-1x"), &reg(b"")]));

    // Entry structure.
    let d_open = toks(&[b"(", b"type", b"directory", b"entry", b"("]);
    bad(
        "entry with two name/node pairs",
        nar(cat(&[
            &d_open,
            &toks(&[b"name", b"a", b"node"]),
            &reg(b""),
            &toks(&[b"name", b"b", b"node"]),
            &reg(b""),
            &toks(&[b")", b")"]),
        ])),
    );
    bad("entry without name or node", nar(cat(&[&d_open, &toks(&[b")", b")"])])));
    bad("entry node before name", nar(cat(&[&d_open, &toks(&[b"node"]), &reg(b""), &toks(&[b")", b")"])])));

    // Padding.
    {
        let mut n = nar(reg(b"x"));
        let i = n.len() - 16 - 1; // last padding byte after the contents
        n[i] = 1;
        bad("non-zero padding after contents", n);
        let mut n = nar(reg(b"x"));
        let at = 24 + 16 + 16 + 8 + 7; // padding byte of "regular" (7 bytes)
        assert_eq!(&n[at - 7..at], b"regular");
        n[at] = b'!';
        bad("non-zero padding in a string", n);
    }

    // Truncation.
    for (name, cut) in [
        ("truncated: empty input", 0),
        ("truncated: after magic", magic().len()),
        ("truncated: inside a length prefix", magic().len() + 3),
        ("truncated: inside a tag", magic().len() + 8 + 1),
        ("truncated: inside contents", small.len() - 16 * 2 - 16 - 8 - 3),
        ("truncated: before final )", small.len() - 16),
        ("truncated: one byte short", small.len() - 1),
    ] {
        bad(name, small[..cut].to_vec());
    }
    bad("truncated: file contents cut in padding", {
        let n = encode(&file(b"abc"));
        n[..n.len() - 16 - 2].to_vec()
    });

    // Trailing bytes.
    bad("trailing 1 byte", cat(&[&small, b"\0"]));
    bad("trailing token", cat(&[&small, &s(b")")]));

    // Depth and sizes.
    bad("file at depth 64", encode(&nested(64)));
    bad("symlink at depth 64", encode(&at_depth(64, Node::link(b"/etc"))));
    bad("empty directory at depth 64", encode(&at_depth(64, dir(vec![]))));
    bad("nesting of 65 directories", encode(&nested(65)));
    bad(
        "huge length prefix (name)",
        cat(&[&magic(), &toks(&[b"(", b"type", b"directory", b"entry", b"(", b"name"]), &u64::MAX.to_le_bytes()]),
    );
    bad("huge length prefix (tag)", cat(&[&magic(), &toks(&[b"("]), &(1u64 << 62).to_le_bytes(), b"type"]));
    bad(
        "huge contents length, truncated",
        cat(&[&magic(), &toks(&[b"(", b"type", b"regular", b"contents"]), &(1u64 << 62).to_le_bytes(), b"abc"]),
    );
    out
}

// ---------------------------------------------------------------------------
// Running both sides

fn entries(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(p) {
        Ok(rd) => rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => vec![],
    };
    v.sort();
    v
}

fn nix_cmd(args: &[&str], stdin: Option<&[u8]>) -> (bool, Vec<u8>, String) {
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .env("NIX_CONFIG", NIX_CONFIG)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(data) = stdin {
        let mut w = child.stdin.take().unwrap();
        let data = data.to_vec();
        // Nix may stop reading early (refusal, or ignored trailing bytes).
        std::thread::spawn(move || {
            let _ = w.write_all(&data);
        });
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    (out.status.success(), out.stdout, err)
}

fn ours(dir: &Path, nar: &[u8]) -> Result<(), NarError> {
    let d = std::fs::File::open(dir).unwrap();
    unpack_bytes(d.as_fd(), b"out", nar)
}

/// The parser's verdict alone, feeding `chunk` bytes at a time.
fn parse_chunked(nar: &[u8], chunk: usize) -> Result<(), ParseError> {
    let mut p = Parser::new();
    for c in nar.chunks(chunk) {
        p.feed(c, &mut |_: Event<'_>| Ok::<(), ParseError>(()))?;
    }
    p.finish()
}

fn short(s: &str) -> String {
    let line = s.lines().last().unwrap_or("");
    let mut out: String = line.chars().take(100).collect();
    if out.len() < line.len() {
        out.push('…');
    }
    out
}

#[test]
fn nar_verdicts_agree_with_nix() {
    let tmp = tempfile::Builder::new().prefix("nar-vs-nix").tempdir().unwrap();
    let victim = tmp.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    let cases = cases(&victim);
    let mut failures = Vec::new();
    let mut table = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let base = tmp.path().join(i.to_string());
        let (our_dir, nix_dir) = (base.join("ours"), base.join("nix"));
        std::fs::create_dir_all(&our_dir).unwrap();
        std::fs::create_dir_all(&nix_dir).unwrap();
        let mut fail = |msg: String| failures.push(format!("{}: {msg}", c.name));

        // Us.
        let us = ours(&our_dir, &c.nar);
        let left = entries(&our_dir);
        if !left.iter().all(|e| e == "out") {
            fail(format!("our unpack created {left:?} next to `out`"));
        }
        if !entries(&victim).is_empty() {
            fail(format!("our unpack wrote outside the target: victim holds {:?}", entries(&victim)));
        }
        // The parser alone agrees with itself however the NAR is chunked.
        let one_shot = parse_chunked(&c.nar, c.nar.len().max(1));
        for chunk in [1, 7, 4096] {
            let chunked = parse_chunked(&c.nar, chunk);
            if chunked != one_shot {
                fail(format!("parser verdict differs with {chunk}-byte chunks: {chunked:?} vs {one_shot:?}"));
            }
        }
        if us.is_ok() != one_shot.is_ok() {
            fail(format!("unpack_bytes says {us:?} but the parser alone says {one_shot:?}"));
        }

        // Nix.
        let nix_out = nix_dir.join("out");
        let (nix_ok, _, nix_err) = nix_cmd(&["nix-store", "--restore", nix_out.to_str().unwrap()], Some(&c.nar));
        if !entries(&victim).is_empty() {
            // Not our bug, but worth shouting about.
            fail(format!("Nix wrote outside the target: victim holds {:?}", entries(&victim)));
            for e in entries(&victim) {
                let _ = std::fs::remove_dir_all(victim.join(&e)).or_else(|_| std::fs::remove_file(victim.join(&e)));
            }
        }

        let laxer = NIX28_LAXER.iter().find(|(n, _)| *n == c.name);
        if let (true, Err(e)) = (c.valid, &us) {
            fail(format!("we refuse a valid NAR: {e}"));
        }
        if !c.valid && us.is_ok() {
            fail("we accept a hostile NAR".into());
        }
        match (nix_ok, us.is_ok(), laxer) {
            (n, u, None) if n == u => {}
            (true, false, Some(_)) => {}
            (n, u, Some((_, why))) => fail(format!(
                "allowlisted as Nix-laxer ({why}) but Nix {} and we {}",
                if n { "accept" } else { "refuse" },
                if u { "accept" } else { "refuse" }
            )),
            (true, false, None) => fail("Nix accepts, we refuse (not allowlisted)".into()),
            (false, true, None) => fail(format!("Nix refuses ({}), we accept: BUG in our parser", short(&nix_err))),
            _ => unreachable!(),
        }

        // Valid: both trees dump back to the very same bytes and hash alike.
        if c.valid && nix_ok && us.is_ok() {
            let (ok, nix_dump, err) = nix_cmd(&["nix-store", "--dump", nix_out.to_str().unwrap()], None);
            if !ok || nix_dump != c.nar {
                fail(format!("nix-store --dump of Nix's tree differs from the NAR ({err})"));
            }
            let mut our_dump = Vec::new();
            let d = std::fs::File::open(&our_dir).unwrap();
            dump(d.as_fd(), b"out", &mut our_dump).unwrap();
            if our_dump != c.nar {
                fail("our dump of our tree differs from the NAR".into());
            }
            let (ok, nix_dump_ours, err) =
                nix_cmd(&["nix-store", "--dump", our_dir.join("out").to_str().unwrap()], None);
            if !ok || nix_dump_ours != c.nar {
                fail(format!("nix-store --dump of our tree differs from the NAR ({err})"));
            }
            let h_nix = nix_hash_path(&nix_out);
            let h_ours = nix_hash_path(&our_dir.join("out"));
            let want = sha256(&c.nar).to_nix32();
            if h_nix != h_ours || h_ours != want {
                fail(format!("nix hash path: Nix's tree {h_nix}, ours {h_ours}, sha256(NAR) {want}"));
            }
            common::assert_canonical(&our_dir.join("out"));
        }

        let why = match &us {
            Ok(()) => String::new(),
            Err(e) => short(&e.to_string()),
        };
        table.push(format!(
            "| {} | {} | {} | {} |",
            c.name,
            if nix_ok { "accept" } else { "refuse" },
            if us.is_ok() { "accept" } else { "refuse" },
            if laxer.is_some() { format!("allowlisted; {why}") } else { why }
        ));
        rm_rf(&base);
    }
    println!("| shape | Nix 2.8 | nixless | note |\n|---|---|---|---|");
    for row in &table {
        println!("{row}");
    }
    for (n, _) in NIX28_LAXER {
        assert!(cases.iter().any(|c| c.name == *n), "allowlist names an unknown case {n:?}");
    }
    rm_rf(tmp.path());
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

// ---------------------------------------------------------------------------
// End to end: hostile NARs from a signed file:// cache

struct Cache {
    dir: tempfile::TempDir,
    path: String,
    pk: String,
}

/// A cache holding one made-up path whose NAR is `nar`, correctly signed.
fn signed_cache(nar: &[u8], seed: u8) -> Cache {
    signed_cache_as(nar, nar, "none", seed)
}

/// A cache holding one made-up path whose NAR is `nar`, stored as the bytes
/// `file`, with a narinfo saying `Compression: {compression}`; correctly
/// signed (the signature does not cover Compression).
fn signed_cache_as(nar: &[u8], file: &[u8], compression: &str, seed: u8) -> Cache {
    let dir = tempfile::Builder::new().prefix("hostile-cache").tempdir().unwrap();
    let hash = nixbase32::encode(&[seed; 20]);
    let path = format!("/nix/store/{hash}-hostile");
    let sp = StorePath::from_absolute(&path).unwrap();
    let nar_hash = sha256(nar);
    let sk = SecretKey::generate("test-1").unwrap();
    let sig = sk.sign(keys::fingerprint(&sp, &nar_hash, nar.len() as u64, &[]).as_bytes());
    std::fs::write(dir.path().join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
    std::fs::create_dir(dir.path().join("nar")).unwrap();
    std::fs::write(dir.path().join("nar/x.nar"), file).unwrap();
    let narinfo = format!(
        "StorePath: {path}\nURL: nar/x.nar\nCompression: {compression}\nNarHash: sha256:{}\nNarSize: {}\nReferences: \nSig: {sig}\n",
        nixbase32::encode(&nar_hash.0),
        nar.len()
    );
    std::fs::write(dir.path().join(format!("{hash}.narinfo")), narinfo).unwrap();
    Cache { dir, path, pk: sk.public().to_string() }
}

fn install(cache: &Cache, root: &Path) -> std::process::Output {
    let url = format!("file://{}", cache.dir.path().display());
    nixless(&["install", "--root", root.to_str().unwrap(), "--cache", &url, "--trusted-key", &cache.pk, &cache.path])
}

#[test]
fn hostile_nars_through_a_signed_cache() {
    let victim = tempfile::Builder::new().prefix("hostile-victim").tempdir().unwrap();
    let v = victim.path().as_os_str().as_encoded_bytes();
    let small = encode(&dir(vec![(b"a", file(b"hello")), (b"b", Node::exe(b"#!/bin/sh\n"))]));
    let shapes: Vec<(&str, Vec<u8>)> = vec![
        (
            "duplicate symlink then directory",
            encode(&dir(vec![(b"a", Node::link(v)), (b"a", dir(vec![(b"f", file(b"pwned"))]))])),
        ),
        ("name ..", encode(&dir(vec![(b"..", dir(vec![(b"f", file(b"pwned"))]))]))),
        ("trailing bytes", cat(&[&small, &s(b")")])),
        ("truncated", small[..small.len() - 20].to_vec()),
        ("unordered", encode(&dir(vec![(b"b", file(b"")), (b"a", file(b""))]))),
        ("file at depth 64", encode(&nested(64))),
        ("nesting of 65", encode(&nested(65))),
    ];
    let mut failures = Vec::new();
    for (i, (name, nar)) in shapes.iter().enumerate() {
        let cache = signed_cache(nar, i as u8 + 1);
        let root = tempfile::Builder::new().prefix("hostile-root").tempdir().unwrap();
        let out = install(&cache, root.path());
        let err = common::stderr(&out);
        let mut fail = |m: String| failures.push(format!("{name}: {m}\n  stderr: {err:?}"));
        if out.status.success() {
            fail("install succeeded".into());
        }
        let lines: Vec<&str> = err.lines().collect();
        if lines.len() != 1 {
            fail(format!("stderr has {} lines, want 1", lines.len()));
        }
        let first = lines.first().copied().unwrap_or("");
        if !first.starts_with("nixless: error:") {
            fail("stderr does not start with `nixless: error:`".into());
        }
        if !first.contains(&cache.path) {
            fail("error does not name the store path".into());
        }
        if !first.contains("at byte") {
            fail("error does not give the byte offset".into());
        }
        let left = entries(&root.path().join("nix/store"));
        if !left.is_empty() {
            fail(format!("store holds {left:?} afterwards"));
        }
        if !entries(victim.path()).is_empty() {
            fail(format!("wrote outside the store: victim holds {:?}", entries(victim.path())));
        }
        println!("{name}: {}", first);
        rm_rf(root.path());
    }

    // A valid NAR takes the same route and installs.
    let good = encode(&dir(vec![
        (b"bin", dir(vec![(b"hello", Node::exe(b"#!/bin/sh\necho hello\n"))])),
        (b"link", Node::link(b"bin/hello")),
        (b"share", dir(vec![(b"empty", dir(vec![])), (b"f", file(b""))])),
    ]));
    let cache = signed_cache(&good, 200);
    let root = tempfile::Builder::new().prefix("hostile-root").tempdir().unwrap();
    let out = install(&cache, root.path());
    assert!(out.status.success(), "valid NAR failed to install: {}", common::stderr(&out));
    let installed = root.path().join(cache.path.trim_start_matches('/'));
    assert_eq!(nix_hash_path(&installed), sha256(&good).to_nix32());
    assert_eq!(common::assert_store_sound(root.path(), cache.dir.path()), vec![cache.path[11..].to_owned()]);
    rm_rf(root.path());

    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

/// Entry names may hold any byte but `/` and NUL, newlines included; an
/// error that names such an entry must still be one line on stderr (and
/// must not let a NAR forge a second `nixless: error:` line).
#[test]
fn error_for_entry_with_newline_in_name_is_one_line() {
    let nar = encode(&dir(vec![(b"x\nnixless: error: forged", dir(vec![(b"..", file(b""))]))]));
    let cache = signed_cache(&nar, 100);
    let root = tempfile::Builder::new().prefix("hostile-root").tempdir().unwrap();
    let out = install(&cache, root.path());
    let err = common::stderr(&out);
    assert!(!out.status.success());
    assert!(entries(&root.path().join("nix/store")).is_empty());
    rm_rf(root.path());
    assert_eq!(err.lines().count(), 1, "stderr is not one line: {err:?}");
    assert!(err.contains("at byte") && err.contains(&cache.path), "{err:?}");
}

// ---------------------------------------------------------------------------
// Narinfo verdicts: ours against Nix 2.8 reading a file:// cache

const NI_PATH: &str = "/nix/store/qx8l0zlfvk6k8whfjvianr1mywbz9k4v-hello-test";
const NI_HASH: &str = "sha256:1n0layqxn1s4gmqmkxnl2pdr7gbmys1z1d9cvdpr8wq3pxap8i7z";

/// A valid narinfo for `NI_PATH`, then `extra` lines.
fn ni(extra: &str) -> String {
    format!("StorePath: {NI_PATH}\nURL: x.nar\nNarHash: {NI_HASH}\nNarSize: 888\n{extra}")
}

/// Narinfos Nix 2.8 accepts and we refuse, and why. "current Nix" means
/// today's `nar-info.cc` refuses them too; "ours" is a deliberate extra rule.
const NARINFO_NIX28_LAXER: &[(&str, &str)] = &[
    ("Compression unknown", "current Nix refuses (parseCompressionAlgo); 2.8 only when downloading"),
    ("Sig without colon", "current Nix refuses (Signature::parse); 2.8 kept Sig as an opaque string"),
    ("Sig with empty name", "current Nix refuses (Signature::parse)"),
    ("Sig with invalid base64", "current Nix refuses (Signature::parse)"),
    ("Sig decoding to nothing", "current Nix refuses (Signature::parse)"),
    ("reference named .-x", "current Nix refuses (path.cc checkName); 2.8 allowed it"),
    ("URL absolute", "ours: the NAR must come from the cache that signed for it"),
    ("URL climbing with ..", "ours: the NAR must come from the cache that signed for it"),
    ("NarSize repeated", "ours: a repeated field is refused; Nix lets the last one win"),
    ("StorePath repeated", "ours: a repeated field is refused; Nix lets the last one win"),
    ("NarHash sha512", "ours: sha256 only (the fingerprint and every cache use it)"),
    ("FileSize with +", "ours: digits only"),
    ("no space after colon", "ours: Nix skips whatever byte follows the colon"),
    ("blank line", "ours: Nix glues the next line onto the blank one and drops its key"),
];

fn narinfo_cases() -> Vec<(&'static str, String, bool)> {
    let name = |n: usize| format!("qx8l0zlfvk6k8whfjvianr1mywbz9k4v-{}", "a".repeat(n));
    let hex = "0060e2ad0ff0860e759ae23e08aa74839f5f7bbf13d7b8ebeb4ce5c5a8083f50";
    let nix32 = &NI_HASH[7..];
    let ok = |n, t: String| (n, t, true);
    let bad = |n, t: String| (n, t, false);
    vec![
        ok("minimal", ni("")),
        ok("References empty", ni("References: \n")),
        ok("Compression empty", ni("Compression: \n")),
        ok("Compression br", ni("Compression: br\n")),
        ok("Deriver unknown-deriver", ni("Deriver: unknown-deriver\n")),
        ok("Deriver a store path", ni("Deriver: 2zbazc8nf794q48sjyri0248j69mzsr1-top.drv\n")),
        ok("CA empty", ni("CA: \n")),
        ok("CA fixed:r:sha256 nix32", ni(&format!("CA: fixed:r:sha256:{nix32}\n"))),
        ok("CA text:sha256 hex", ni(&format!("CA: text:sha256:{hex}\n"))),
        ok("CA fixed:sha1 nix32", ni(&format!("CA: fixed:sha1:{}\n", &nix32[..32]))),
        ok("Sig lax base64", ni("Sig: k:AA=!!\n")),
        ok("NarSize 1", ni("").replace("NarSize: 888", "NarSize: 1")),
        ok("FileSize 0", ni("FileSize: 0\n")),
        ok("FileSize u64 max", ni("FileSize: 18446744073709551615\n")),
        ok("reference name of 211", ni(&format!("References: {}\n", name(211)))),
        ok("reference named .x", ni(&format!("References: {}\n", name(0) + ".x"))),
        ok("unknown key", ni("Future: field\n")),
        bad("empty file", String::new()),
        bad("no final newline", ni("Future: x")),
        bad("References: at the end", ni("References:\n")),
        bad("References: before a line", ni("References:\nDeriver: unknown-deriver\n")),
        bad("unknown key: at the end", ni("Future:\n")),
        bad("Compression unknown", ni("Compression: foo\n")),
        bad("Deriver empty", ni("Deriver: \n")),
        bad("Deriver not a store path", ni("Deriver: foo\n")),
        bad("CA garbage", ni("CA: foo\n")),
        bad("CA fixed:git", ni(&format!("CA: fixed:git:sha1:{}\n", &nix32[..32]))),
        bad("CA hash too short", ni(&format!("CA: fixed:r:sha256:{}\n", &nix32[1..]))),
        bad("CA unknown algorithm", ni(&format!("CA: fixed:r:sha3:{nix32}\n"))),
        bad("Sig without colon", ni("Sig: junk\n")),
        bad("Sig with empty name", ni("Sig: :AAAA\n")),
        bad("Sig with invalid base64", ni("Sig: k:!!!!\n")),
        bad("Sig decoding to nothing", ni("Sig: k:A\n")),
        bad("NarSize 0", ni("").replace("NarSize: 888", "NarSize: 0")),
        bad("NarSize negative", ni("").replace("NarSize: 888", "NarSize: -1")),
        bad("FileSize overflow", ni("FileSize: 18446744073709551616\n")),
        bad("NarHash without algorithm", ni("").replace(NI_HASH, nix32)),
        bad("NarHash too short", ni("").replace(NI_HASH, &NI_HASH[..58])),
        bad("reference name of 212", ni(&format!("References: {}\n", name(212)))),
        bad("reference named .-x", ni(&format!("References: {}\n", name(0) + ".-x"))),
        bad("StorePath missing", ni("").replace(&format!("StorePath: {NI_PATH}\n"), "")),
        bad("URL missing", ni("").replace("URL: x.nar\n", "")),
        bad("URL absolute", ni("").replace("URL: x.nar", "URL: http://elsewhere/x.nar")),
        bad("URL climbing with ..", ni("").replace("URL: x.nar", "URL: ../x.nar")),
        bad("NarSize repeated", ni("NarSize: 888\n")),
        bad("StorePath repeated", ni(&format!("StorePath: {NI_PATH}\n"))),
        bad("NarHash sha512", ni("").replace(NI_HASH, &format!("sha512:{hex}{hex}"))),
        bad("FileSize with +", ni("FileSize: +5\n")),
        bad("no space after colon", ni("Future:x\n")),
        bad("blank line", ni("\nFuture: x\n")),
    ]
}

/// Nix 2.8's verdict: can `nix path-info` read the path from a cache that
/// holds only this narinfo?
fn nix_reads_narinfo(text: &str) -> (bool, String) {
    nix_reads(&format!("StoreDir: {}\n", nixless::nix::STORE_DIR), text)
}

/// The same, with this nix-cache-info.
fn nix_reads(cache_info: &str, text: &str) -> (bool, String) {
    let cache = tempfile::Builder::new().prefix("narinfo-vs-nix").tempdir().unwrap();
    std::fs::write(cache.path().join("nix-cache-info"), cache_info).unwrap();
    std::fs::write(cache.path().join(format!("{}.narinfo", &NI_PATH[11..43])), text).unwrap();
    let out = Command::new("nix")
        .args(["path-info", "--store", &format!("file://{}", cache.path().display()), NI_PATH])
        .env("NIX_CONFIG", NIX_CONFIG)
        // No narinfo disk cache shared between cases or with other runs.
        .env("XDG_CACHE_HOME", cache.path().join("xdg"))
        .output()
        .unwrap();
    (out.status.success(), short(&String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn narinfo_verdicts_agree_with_nix() {
    let expected = StorePath::from_absolute(NI_PATH).unwrap();
    let cases = narinfo_cases();
    let mut failures = Vec::new();
    println!("| narinfo | Nix 2.8 | nixless | note |\n|---|---|---|---|");
    for (name, text, valid) in &cases {
        let us = nixless::nix::NarInfo::parse(text, Some(&expected));
        let (nix_ok, nix_err) = nix_reads_narinfo(text);
        let laxer = NARINFO_NIX28_LAXER.iter().find(|(n, _)| n == name);
        let mut fail = |m: String| failures.push(format!("{name}: {m}"));
        if us.is_ok() != *valid {
            fail(format!("we {} it: {us:?}", if us.is_ok() { "accept" } else { "refuse" }));
        }
        match (nix_ok, us.is_ok(), laxer) {
            (n, u, None) if n == u => {}
            (true, false, Some(_)) => {}
            (n, u, Some((_, why))) => fail(format!("allowlisted ({why}) but Nix {n} and we {u}")),
            (true, false, None) => fail("Nix accepts, we refuse (not allowlisted)".into()),
            (false, true, None) => fail(format!("Nix refuses ({nix_err}), we accept: BUG in our parser")),
            _ => unreachable!(),
        }
        let note = match (&us, laxer) {
            (Err(e), Some((_, why))) => format!("{why}; {e}"),
            (Err(e), None) => e.to_string(),
            (Ok(_), _) => String::new(),
        };
        let verdict = |ok: bool| if ok { "accept" } else { "refuse" };
        println!("| {name} | {} | {} | {note} |", verdict(nix_ok), verdict(us.is_ok()));
    }
    for (n, _) in NARINFO_NIX28_LAXER {
        assert!(cases.iter().any(|(c, _, _)| c == n), "allowlist names an unknown case {n:?}");
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

/// Nix (`BinaryCacheStore::init`) reads Priority with `std::stoi` and cannot
/// use a cache whose Priority it throws on; we ignored such a value.
#[test]
fn cache_info_priority_agrees_with_nix() {
    // Nix accepts "41abc" (stoi stops at the junk); we refuse it on purpose.
    for (p, ours_ok) in [
        ("41", true),
        ("-5", true),
        ("2147483647", true),
        ("2147483648", false),
        ("x", false),
        ("", false),
        ("41abc", false),
    ] {
        let text = format!("StoreDir: /nix/store\nPriority: {p}\n");
        let (nix_ok, nix_err) = nix_reads(&text, &ni(""));
        let us = nixless::nix::cache_info::parse(&text);
        assert_eq!(us.is_ok(), ours_ok, "Priority {p:?}: {us:?}");
        if p != "41abc" {
            assert_eq!(nix_ok, ours_ok, "Priority {p:?}: Nix 2.8 {nix_err}");
        } else {
            assert!(nix_ok, "Priority {p:?}: Nix 2.8 {nix_err}");
        }
    }
}

/// An empty `Compression:` is bzip2 to Nix, not "none". Nix 2.8 unpacks a
/// bzip2 NAR published so and fails on an uncompressed one; we have no bzip2
/// decoder, so we refuse both, saying why, and install nothing. (Before,
/// we read empty as "none" and installed the uncompressed one, which Nix
/// refuses.)
#[test]
fn empty_compression_is_bzip2_as_in_nix() {
    let nar = encode(&dir(vec![(b"f", file(b"hello\n"))]));
    let mut bz = Command::new("bzip2").arg("-c").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    bz.stdin.take().unwrap().write_all(&nar).unwrap();
    let bz = bz.wait_with_output().unwrap();
    assert!(bz.status.success());
    for (seed, file, nix_should_accept) in [(150u8, &bz.stdout, true), (151, &nar, false)] {
        let cache = signed_cache_as(&nar, file, "", seed);
        let url = format!("file://{}", cache.dir.path().display());
        let nix_root = tempfile::Builder::new().prefix("nix-root").tempdir().unwrap();
        let (nix_ok, _, nix_err) = nix_cmd(
            &["nix", "copy", "--no-check-sigs", "--from", &url, "--to", nix_root.path().to_str().unwrap(), &cache.path],
            None,
        );
        assert_eq!(
            nix_ok,
            nix_should_accept,
            "Nix 2.8 on a {} NAR: {nix_err}",
            if seed == 150 { "bzip2" } else { "plain" }
        );
        rm_rf(nix_root.path());

        let root = tempfile::Builder::new().prefix("hostile-root").tempdir().unwrap();
        let out = install(&cache, root.path());
        let err = common::stderr(&out);
        assert!(!out.status.success(), "installed with an empty Compression");
        assert_eq!(err.lines().count(), 1, "{err:?}");
        assert!(err.contains("bzip2") && err.contains("empty") && err.contains(&cache.path), "{err:?}");
        assert!(entries(&root.path().join("nix/store")).is_empty());
        rm_rf(root.path());
    }
}
