//! Arbitrary bytes as a NAR, unpacked for real into a scratch directory.
//!
//! Oracles:
//! - the parser never panics, and gives the same verdict (and the same
//!   error, and the same events) whether the input comes in one piece or
//!   split at a few boundaries derived from the data;
//! - the unpacker never fails with an I/O error on a NAR the parser accepts;
//! - an accepted NAR dumps back from the unpacked tree byte for byte (the
//!   grammar is canonical, so there is exactly one NAR per tree);
//! - nothing is ever created in the scratch directory but `out`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixless::nar::write::dump;
use nixless::nar::{Event, NarError, ParseError, Parser, Unpacker};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// An owned event, with consecutive `Data` merged (chunking splits them).
#[derive(Debug, PartialEq, Eq)]
enum Ev {
    Directory(Vec<u8>),
    DirectoryEnd,
    Regular(Vec<u8>, bool, u64),
    Data(Vec<u8>),
    RegularEnd,
    Symlink(Vec<u8>, Vec<u8>),
}

fn record(evs: &mut Vec<Ev>, ev: &Event<'_>) {
    let e = match *ev {
        Event::Directory { name } => Ev::Directory(name.to_vec()),
        Event::DirectoryEnd => Ev::DirectoryEnd,
        Event::Regular { name, executable, size } => Ev::Regular(name.to_vec(), executable, size),
        Event::Data(d) => {
            if let Some(Ev::Data(prev)) = evs.last_mut() {
                prev.extend_from_slice(d);
                return;
            }
            Ev::Data(d.to_vec())
        }
        Event::RegularEnd => Ev::RegularEnd,
        Event::Symlink { name, target } => Ev::Symlink(name.to_vec(), target.to_vec()),
    };
    evs.push(e);
}

/// A scratch directory per fuzzing process, on tmpfs when there is one.
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let d = base.join(format!("nixless-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&d);
        d
    })
}

/// Removes what the unpacker made (read-only directories included).
fn remove(p: &Path) {
    let Ok(md) = std::fs::symlink_metadata(p) else { return };
    if md.is_dir() {
        let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755));
        if let Ok(rd) = std::fs::read_dir(p) {
            for e in rd.flatten() {
                remove(&e.path());
            }
        }
        std::fs::remove_dir(p).expect("remove dir");
    } else {
        std::fs::remove_file(p).expect("remove file");
    }
}

/// Up to three cut points in 0..=len, from a hash of the data.
fn cuts(data: &[u8]) -> Vec<usize> {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in data {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    let n = data.len() as u64 + 1;
    let mut c = vec![(h % n) as usize, ((h >> 21) % n) as usize, ((h >> 42) % n) as usize];
    c.sort_unstable();
    c
}

fuzz_target!(|data: &[u8]| {
    // One shot, parser only.
    let mut whole = Vec::new();
    let mut p = Parser::new();
    let one_shot = p
        .feed(data, &mut |ev: Event<'_>| {
            record(&mut whole, &ev);
            Ok::<(), ParseError>(())
        })
        .and_then(|()| p.finish());

    // Chunked, unpacking for real.
    let dir = scratch();
    let d = std::fs::File::open(dir).expect("open scratch dir");
    let mut chunked_evs = Vec::new();
    let mut unpacker = Unpacker::new(d.as_fd(), b"out");
    let mut parser = Parser::new();
    let mut sink = |ev: Event<'_>| -> Result<(), NarError> {
        record(&mut chunked_evs, &ev);
        unpacker.event(ev).map_err(NarError::from)
    };
    let mut result: Result<(), NarError> = Ok(());
    let mut start = 0;
    for end in cuts(data).into_iter().chain([data.len()]) {
        if let Err(e) = parser.feed(&data[start..end], &mut sink) {
            result = Err(e);
            break;
        }
        start = end;
    }
    let result = result.and_then(|()| parser.finish().map_err(NarError::from));

    match (&one_shot, &result) {
        (Ok(()), Ok(())) => {}
        (Err(a), Err(NarError::Parse(b))) => assert_eq!(a, b, "chunking changed the error"),
        (_, Err(NarError::Unpack(e))) => panic!("unpacker failed: {e} (parser alone: {one_shot:?})"),
        (a, b) => panic!("chunking changed the verdict: one shot {a:?}, chunked {b:?}"),
    }
    assert_eq!(whole, chunked_evs, "chunking changed the events");

    if result.is_ok() {
        let mut out = Vec::with_capacity(data.len());
        dump(d.as_fd(), b"out", &mut out).expect("dump the unpacked tree");
        assert!(out == data, "unpacked tree does not dump back to the input NAR");
    }
    for e in std::fs::read_dir(dir).expect("list scratch").flatten() {
        assert_eq!(e.file_name(), "out", "unpacker created something beside `out`");
    }
    remove(&dir.join("out"));
});
