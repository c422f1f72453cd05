//! What an install is made of: the plan (verified narinfos, references
//! before referrers), its errors and progress, and the four commit steps.
//! [`super::parallel`]'s engine resolves, fetches, verifies and unpacks,
//! and calls these steps in this order without blocking its loop (the
//! blocking install that called them in turn went with issue 11).
//!
//! All of it runs under the store lock ([`StoreLock`]): from the first
//! "is it present?" to the last rename no other writer (install, gc) changes
//! the store, and temps are only ever removed by the lock's holder.
//!
//! Crash safety comes from the order of operations for each batch:
//! 1. every path of the batch is unpacked (with canonical metadata) into a
//!    temp of this process's own (`<store>/.nixless-tmp-<pid>-<n>-<hash>`)
//!    and verified against its narinfo;
//! 2. each path's record is written under the state dir;
//! 3. one `syncfs` makes all of it durable (instead of one fsync per file);
//! 4. the temps are renamed to their final names with `RENAME_NOREPLACE`,
//!    references before referrers, and the store directory is fsynced.
//!
//! A path therefore appears only complete and durable, and only after
//! everything it references; a crash at any point leaves temps that the next
//! run deletes.

use super::flush::{self, FlushError};
use super::fsutil;
use super::record::Record;
use super::StoreLock;
use crate::fetch::pipeline::PipelineError;
use crate::fetch::FetchError;
use crate::nix::narinfo::NarInfoError;
use crate::nix::{NarInfo, StorePath};
use rustix::fs::{self as rfs, RenameFlags};
use std::collections::{BTreeMap, BTreeSet};
use std::io;

#[derive(Debug)]
pub enum InstallError {
    Fetch(FetchError),
    /// No cache had a narinfo for the path that parses and is signed by a
    /// trusted key; the first reason is given.
    NarInfo {
        path: StorePath,
        cache: String,
        err: NarInfoError,
    },
    /// References form a cycle (never produced by Nix).
    Cycle(StorePath),
    Nar {
        path: StorePath,
        err: PipelineError,
    },
    Io {
        op: &'static str,
        path: String,
        err: io::Error,
    },
    /// Making a batch durable failed.
    Flush(FlushError),
}

impl std::fmt::Display for InstallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InstallError::Fetch(e) => e.fmt(f),
            InstallError::NarInfo { path, cache, err } => {
                write!(f, "{path}: narinfo from {cache}: {err}")
            }
            InstallError::Cycle(p) => write!(f, "{p}: reference cycle"),
            InstallError::Nar { path, err } => write!(f, "{path}: {err}"),
            InstallError::Flush(e) => e.fmt(f),
            InstallError::Io { op, path, err } => write!(f, "{op} {path}: {err}"),
        }
    }
}

impl std::error::Error for InstallError {}

pub(super) fn io_err(op: &'static str, path: impl std::fmt::Display) -> impl FnOnce(io::Error) -> InstallError {
    move |err| InstallError::Io { op, path: path.to_string(), err }
}

/// One path to install: where its verified narinfo came from, and the text.
#[derive(Debug, Clone)]
pub struct PlanItem {
    pub path: StorePath,
    pub cache: usize,
    pub narinfo: String,
    pub nar_size: u64,
    pub references: Vec<StorePath>,
}

impl PlanItem {
    pub fn info(&self) -> NarInfo<'_> {
        NarInfo::parse(&self.narinfo, Some(&self.path)).expect("verified when planned")
    }
}

/// The missing part of a closure, references before referrers.
#[derive(Debug, Default)]
pub struct Plan {
    pub items: Vec<PlanItem>,
    /// Paths of the closure that were already present.
    pub present: usize,
}

impl Plan {
    pub fn nar_bytes(&self) -> u64 {
        // NarSize is any u64 a cache signed; a sum that overflowed would
        // make the free-space check pass.
        self.items.iter().fold(0u64, |sum, i| sum.saturating_add(i.nar_size))
    }
}

/// `PlanItem::cache` for a narinfo that came with the deploy document: its
/// NAR is looked for in every cache, in order.
pub const ANY_CACHE: usize = usize::MAX;

/// Narinfo texts supplied up front (by a deploy document), by hash part.
/// Each is still checked like a fetched one; one that fails is fetched.
pub type Provided = BTreeMap<String, String>;

/// Indexes narinfo texts by the hash part of their StorePath.
pub fn provided_from(texts: &[String]) -> Provided {
    texts
        .iter()
        .filter_map(|t| NarInfo::parse(t, None).ok().map(|ni| (ni.store_path.hash_part().to_owned(), t.clone())))
        .collect()
}

/// Kahn's algorithm over references within the set; ties by name, so the
/// order is deterministic.
pub(super) fn topo_order(mut found: BTreeMap<StorePath, PlanItem>) -> Result<Vec<PlanItem>, InstallError> {
    let mut pending: BTreeMap<StorePath, usize> = BTreeMap::new();
    let mut referrers: BTreeMap<StorePath, Vec<StorePath>> = BTreeMap::new();
    for (p, item) in &found {
        let deps: BTreeSet<&StorePath> = item.references.iter().filter(|r| *r != p && found.contains_key(*r)).collect();
        pending.insert(p.clone(), deps.len());
        for d in deps {
            referrers.entry(d.clone()).or_default().push(p.clone());
        }
    }
    let mut ready: BTreeSet<StorePath> = pending.iter().filter(|(_, n)| **n == 0).map(|(p, _)| p.clone()).collect();
    let mut out = Vec::with_capacity(found.len());
    while let Some(p) = ready.pop_first() {
        for r in referrers.remove(&p).unwrap_or_default() {
            let n = pending.get_mut(&r).expect("known");
            *n -= 1;
            if *n == 0 {
                ready.insert(r);
            }
        }
        pending.remove(&p);
        out.push(found.remove(&p).expect("known"));
    }
    match pending.into_keys().next() {
        Some(p) => Err(InstallError::Cycle(p)),
        None => Ok(out),
    }
}

/// How far an install has got (`paths_done`: fetched and verified; they
/// become visible in the store at the end of their batch).
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    pub paths_done: usize,
    pub paths_total: usize,
    pub nar_bytes_done: u64,
    pub nar_bytes_total: u64,
    pub file_bytes: u64,
}

/// Limits of one batch between two syncfs calls.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub paths: usize,
    pub nar_bytes: u64,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits { paths: 1000, nar_bytes: 512 << 20 }
    }
}

/// One path's record.
pub(super) fn commit_record(store: &StoreLock, item: &PlanItem) -> Result<(), InstallError> {
    store.write_record(&Record::of(&item.info())).map_err(io_err("write record of", &item.path))
}

/// Step 2: the calls that make the temps' contents and the records
/// durable (one syncfs per file system), before any name changes.
pub(super) fn contents_durable<'a>(store: &'a StoreLock) -> Vec<flush::Op<'a>> {
    let mut ops = vec![flush::Op::Syncfs(store.store_fd())];
    let same_fs = fsutil::device(store.store_fd()).ok() == fsutil::device(store.paths_fd()).ok();
    if !same_fs {
        ops.push(flush::Op::Syncfs(store.paths_fd()));
    }
    ops
}

pub(super) fn contents_what(store: &StoreLock) -> String {
    format!("{} and {}", store.store_dir().display(), store.state_dir().display())
}

/// One temp renamed to its path.
pub(super) fn rename_into_place(store: &StoreLock, item: &PlanItem, tmp: &str) -> Result<(), InstallError> {
    match rfs::renameat_with(store.store_fd(), tmp, store.store_fd(), item.path.base(), RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        // Present already (a plan naming a path twice; under the lock
        // nobody else can have put it there): the first copy stays.
        Err(rustix::io::Errno::EXIST) => {
            fsutil::remove_tree(store.store_fd(), tmp.as_bytes()).map_err(io_err("remove", tmp))
        }
        Err(e) => Err(io_err("rename into place", &item.path)(e.into())),
    }
}

/// Step 4: the call that makes the renames durable.
pub(super) fn names_durable<'a>(store: &'a StoreLock) -> Vec<flush::Op<'a>> {
    vec![flush::Op::Fsync(store.store_fd())]
}

pub(super) fn names_what(store: &StoreLock) -> String {
    store.store_dir().display().to_string()
}
