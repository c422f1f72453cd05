//! Installing a closure: resolve, fetch, verify, unpack, make durable,
//! rename into place, in dependency order.
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
use super::{temp_name, Store, StoreLock};
use crate::fetch::pipeline::{self, PipelineError};
use crate::fetch::{FetchError, Fetcher};
use crate::nar::{NarError, Unpacker};
use crate::nix::narinfo::NarInfoError;
use crate::nix::{NarInfo, StorePath, TrustedKeys};
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

/// Fetches and verifies the narinfos of every missing path in the closure
/// of `roots`, and orders them.
pub fn resolve(
    fetcher: &mut Fetcher,
    store: &Store,
    keys: &TrustedKeys,
    roots: &[StorePath],
) -> Result<Plan, InstallError> {
    resolve_with(fetcher, store, keys, roots, &Provided::new())
}

/// Like [`resolve`], using `provided` narinfos before asking any cache: a
/// device on a slow link resolves its closure without a round trip per path.
pub fn resolve_with(
    fetcher: &mut Fetcher,
    store: &Store,
    keys: &TrustedKeys,
    roots: &[StorePath],
    provided: &Provided,
) -> Result<Plan, InstallError> {
    let mut found: BTreeMap<StorePath, PlanItem> = BTreeMap::new();
    let mut present = BTreeSet::new();
    let mut queue: Vec<StorePath> = roots.to_vec();
    while let Some(path) = queue.pop() {
        if found.contains_key(&path) || present.contains(&path) {
            continue;
        }
        if store.is_present(&path) {
            present.insert(path);
            continue;
        }
        let item = match provided.get(path.hash_part()).and_then(|t| checked_provided(t, keys, &path)) {
            Some(item) => item,
            None => find_narinfo(fetcher, keys, &path)?,
        };
        fetcher.tick();
        for r in &item.references {
            if *r != path {
                queue.push(r.clone());
            }
        }
        found.insert(path, item);
    }
    Ok(Plan { items: topo_order(found)?, present: present.len() })
}

fn checked_provided(text: &str, keys: &TrustedKeys, path: &StorePath) -> Option<PlanItem> {
    match NarInfo::parse(text, Some(path)).and_then(|ni| ni.verify(keys).map(|_| ni)) {
        Ok(ni) => Some(PlanItem {
            path: path.clone(),
            cache: ANY_CACHE,
            narinfo: text.to_owned(),
            nar_size: ni.nar_size,
            references: ni.references.clone(),
        }),
        Err(e) => {
            log::warn!("{path}: narinfo supplied with the deploy: {e}; asking the caches");
            None
        }
    }
}

/// [`find_narinfo`] for one path (GC learns references with it).
pub fn narinfo_for(fetcher: &mut Fetcher, keys: &TrustedKeys, path: &StorePath) -> Result<PlanItem, InstallError> {
    find_narinfo(fetcher, keys, path)
}

/// The first cache's narinfo for `path` that parses, is for `path` and is
/// signed by a trusted key; later caches are tried when one fails.
fn find_narinfo(fetcher: &mut Fetcher, keys: &TrustedKeys, path: &StorePath) -> Result<PlanItem, InstallError> {
    let mut first_err: Option<InstallError> = None;
    let mut from = 0;
    while from < fetcher.cache_count() {
        let (idx, text) = match fetcher.narinfo(path, from) {
            Ok(found) => found,
            Err(e) => return Err(first_err.unwrap_or(InstallError::Fetch(e))),
        };
        let cache = fetcher.cache_url(idx).to_string();
        let checked = NarInfo::parse(&text, Some(path)).and_then(|ni| ni.verify(keys).map(|_| ni));
        match checked {
            Ok(ni) => {
                let (nar_size, references) = (ni.nar_size, ni.references.clone());
                return Ok(PlanItem { path: path.clone(), cache: idx, narinfo: text, nar_size, references });
            }
            Err(err) => {
                if idx + 1 < fetcher.cache_count() {
                    log::warn!("{path}: narinfo from {cache}: {err}; trying the next cache");
                }
                first_err.get_or_insert(InstallError::NarInfo { path: path.clone(), cache, err });
                from = idx + 1;
            }
        }
    }
    Err(first_err.expect("loop ran at least once"))
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

/// A verified temp waiting for its batch's rename, and its path.
pub(super) type Pending<'p> = (&'p PlanItem, String);

/// Installs `plan` into `store`, reporting progress after every chunk.
pub fn install_plan(
    fetcher: &mut Fetcher,
    store: &StoreLock,
    plan: &Plan,
    limits: BatchLimits,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Progress, InstallError> {
    let mut prog = Progress { paths_total: plan.items.len(), nar_bytes_total: plan.nar_bytes(), ..Progress::default() };
    let mut batch: Vec<Pending> = Vec::new();
    let mut batch_bytes = 0;
    let mut run = || {
        for item in &plan.items {
            let tmp = temp_name(&item.path);
            if let Err(e) = fetch_into_temp(fetcher, store, item, &tmp, &mut prog, progress) {
                // What the batch already verified is closure-complete (plan
                // order): keep it, so a retry does not fetch it again.
                commit_batch(store, &batch)?;
                batch.clear();
                return Err(e);
            }
            prog.paths_done += 1;
            batch.push((item, tmp));
            batch_bytes += item.nar_size;
            if batch.len() >= limits.paths || batch_bytes >= limits.nar_bytes {
                commit_batch(store, &batch)?;
                progress(&prog);
                batch.clear();
                batch_bytes = 0;
            }
        }
        commit_batch(store, &batch)?;
        batch.clear();
        progress(&prog);
        Ok(prog)
    };
    let result = run();
    // Nothing of a failed batch may stay: drop its temps (one that was
    // already renamed is a complete path and stays; its name is gone).
    for (_, tmp) in &batch {
        let _ = fsutil::remove_tree(store.store_fd(), tmp.as_bytes());
    }
    result
}

fn fetch_into_temp(
    fetcher: &mut Fetcher,
    store: &StoreLock,
    item: &PlanItem,
    tmp: &str,
    prog: &mut Progress,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(), InstallError> {
    let info = item.info();
    let mut unpacker = Unpacker::new(store.store_fd(), tmp.as_bytes());
    let before = prog.nar_bytes_done;
    let caches: Vec<usize> =
        if item.cache == ANY_CACHE { (0..fetcher.cache_count()).collect() } else { vec![item.cache] };
    let mut stats = Err(PipelineError::MissingNar { url: info.url.to_owned() });
    for idx in caches {
        stats =
            pipeline::fetch_nar(fetcher, idx, &info, &mut |ev| unpacker.event(ev).map_err(NarError::from), &mut |n| {
                prog.nar_bytes_done += n;
                progress(prog);
            });
        match &stats {
            Err(PipelineError::MissingNar { .. }) | Err(PipelineError::Fetch(_)) if item.cache == ANY_CACHE => continue,
            _ => break,
        }
    }
    match stats {
        Ok(s) => {
            prog.file_bytes += s.file_bytes;
            Ok(())
        }
        Err(err) => {
            prog.nar_bytes_done = before;
            drop(unpacker);
            let _ = fsutil::remove_tree(store.store_fd(), tmp.as_bytes());
            Err(InstallError::Nar { path: item.path.clone(), err })
        }
    }
}

/// Commits `batch` now: records, contents durable, names, the directory
/// durable ([`commit_records`], [`contents_durable`], [`rename_batch`],
/// [`names_durable`]), waiting for each flush. [`super::parallel`] makes
/// the same calls in the same order without waiting in its caller's loop.
pub(super) fn commit_batch(store: &StoreLock, batch: &[Pending]) -> Result<(), InstallError> {
    if batch.is_empty() {
        return Ok(());
    }
    commit_records(store, batch)?;
    flush::Flush::run(contents_what(store), &contents_durable(store)).map_err(InstallError::Flush)?;
    rename_batch(store, batch)?;
    flush::Flush::run(names_what(store), &names_durable(store)).map_err(InstallError::Flush)?;
    Ok(())
}

/// Step 1 of a commit: every path's record (its temps are complete).
pub(super) fn commit_records(store: &StoreLock, batch: &[Pending]) -> Result<(), InstallError> {
    batch.iter().try_for_each(|(item, _)| commit_record(store, item))
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

/// Step 3: the temps renamed into place, in batch order (references before referrers).
pub(super) fn rename_batch(store: &StoreLock, batch: &[Pending]) -> Result<(), InstallError> {
    batch.iter().try_for_each(|(item, tmp)| rename_into_place(store, item, tmp))
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

/// Resolves and installs the closures of `roots`.
pub fn install(
    fetcher: &mut Fetcher,
    store: &StoreLock,
    keys: &TrustedKeys,
    roots: &[StorePath],
    progress: &mut dyn FnMut(&Progress),
) -> Result<(Plan, Progress), InstallError> {
    install_with(fetcher, store, keys, roots, &Provided::new(), progress)
}

/// [`install`] with narinfos supplied up front.
pub fn install_with(
    fetcher: &mut Fetcher,
    store: &StoreLock,
    keys: &TrustedKeys,
    roots: &[StorePath],
    provided: &Provided,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(Plan, Progress), InstallError> {
    store.clean_temps().map_err(io_err("clean", store.store_dir().display()))?;
    let plan = resolve_with(fetcher, store, keys, roots, provided)?;
    let prog = install_plan(fetcher, store, &plan, BatchLimits::default(), progress)?;
    Ok((plan, prog))
}
