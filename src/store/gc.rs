//! Garbage collection by recorded references.
//!
//! Live: the closures of the roots — the system generations kept (the last
//! N plus the current profile's), the current and booted systems, anything
//! under `/nix/var/nix/gcroots`, and whatever the caller adds (a deploy in
//! progress). Closures are followed through the per-path records; a live
//! path without a record has unknown references, so nothing can be proven
//! unreachable and nothing is deleted (its references can be learnt from a
//! cache's narinfo first: see [`learn_references`]). A dead path without a
//! record is kept too: we never delete what we cannot account for.
//!
//! Deletion renames a path out of the store first (to a temp name the next
//! run cleans up), then removes it with directory-relative calls; referrers
//! go before what they reference, so a crash never leaves a path whose
//! closure is incomplete.

use super::install::{self, PlanItem};
use super::record::Record;
use super::{fsutil, Store, TEMP_PREFIX};
use crate::fetch::Fetcher;
use crate::nix::{StorePath, TrustedKeys};
use rustix::fs::{self as rfs, AtFlags};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

#[derive(Debug, Default)]
pub struct Report {
    pub live: usize,
    pub deleted: Vec<StorePath>,
    pub kept_unknown: Vec<StorePath>,
    pub bytes_freed: u64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} live paths, {} deleted ({} MiB NAR)", self.live, self.deleted.len(), self.bytes_freed >> 20)?;
        if !self.kept_unknown.is_empty() {
            write!(f, ", {} kept with unknown references", self.kept_unknown.len())?;
        }
        Ok(())
    }
}

/// The store path a link (or path inside a store path) points into.
fn store_path_of(target: &str) -> Option<StorePath> {
    let rest = target.strip_prefix("/nix/store/")?;
    StorePath::from_base(rest.split('/').next()?).ok()
}

/// Resolves a link under `root`, following links outside the store (up to
/// a few hops) until it reaches a store path.
fn resolve_root(root: &Path, link: &Path) -> Option<StorePath> {
    let mut cur = link.to_path_buf();
    for _ in 0..8 {
        let t = std::fs::read_link(&cur).ok()?;
        let ts = t.to_str()?;
        if let Some(p) = store_path_of(ts) {
            return Some(p);
        }
        cur = if t.is_absolute() { root.join(ts.trim_start_matches('/')) } else { cur.parent()?.join(t) };
    }
    None
}

/// Everything under gcroots (walked to a bounded depth), the profile
/// generations kept, `/run/{current,booted}-system`.
pub fn roots(root: &Path, generations_to_keep: u64) -> (Vec<StorePath>, Vec<u64>) {
    let mut out = Vec::new();
    for l in ["run/current-system", "run/booted-system"] {
        out.extend(resolve_root(root, &root.join(l)));
    }
    let gens = crate::switch::profile::generations(root);
    let current = crate::switch::profile::current(root).map(|(n, _)| n);
    let keep: Vec<u64> = gens.iter().rev().take(generations_to_keep as usize).map(|(n, _)| *n).chain(current).collect();
    for (n, sys) in &gens {
        if keep.contains(n) {
            out.extend(store_path_of(sys));
        }
    }
    let mut stack = vec![(root.join("nix/var/nix/gcroots"), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_symlink() => out.extend(resolve_root(root, &p)),
                Ok(t) if t.is_dir() && depth < 8 => stack.push((p, depth + 1)),
                _ => {}
            }
        }
    }
    out.sort();
    out.dedup();
    (out, keep)
}

/// Writes records for live paths that have none, from a trusted cache's
/// narinfo (for paths that were on the device before nixless).
pub fn learn_references(store: &Store, fetcher: &mut Fetcher, keys: &TrustedKeys, paths: &[StorePath]) -> usize {
    let mut learnt = 0;
    for p in paths {
        let item: Result<PlanItem, _> = install::narinfo_for(fetcher, keys, p);
        if let Ok(item) = item {
            let info = item.info();
            let rec = Record {
                path: p.clone(),
                nar_hash: info.nar_hash,
                nar_size: info.nar_size,
                references: info.references.clone(),
            };
            if store.write_record(&rec).is_ok() {
                learnt += 1;
            }
        }
    }
    learnt
}

/// Closure of `roots` through records; second: live paths with no record.
pub fn live_set(store: &Store, roots: &[StorePath]) -> (BTreeSet<StorePath>, Vec<StorePath>) {
    let mut live = BTreeSet::new();
    let mut unknown = Vec::new();
    let mut queue: Vec<StorePath> = roots.to_vec();
    while let Some(p) = queue.pop() {
        if !store.is_present(&p) || !live.insert(p.clone()) {
            continue;
        }
        match store.read_record(&p) {
            Ok(Some(r)) => queue.extend(r.references),
            _ => unknown.push(p),
        }
    }
    (live, unknown)
}

/// Collects garbage (or, with `dry_run`, says what it would delete).
pub fn collect(store: &Store, roots: &[StorePath], dry_run: bool) -> Result<Report, String> {
    let (live, unknown) = live_set(store, roots);
    if !unknown.is_empty() {
        let list: Vec<String> = unknown.iter().take(3).map(|p| p.to_string()).collect();
        return Err(format!(
            "references of {} live paths are unknown (e.g. {}); nothing can be proven unreachable, nothing deleted",
            unknown.len(),
            list.join(", ")
        ));
    }
    let mut dead: BTreeMap<StorePath, Record> = BTreeMap::new();
    let mut kept_unknown = Vec::new();
    for e in std::fs::read_dir(store.store_dir()).map_err(|e| format!("{}: {e}", store.store_dir().display()))? {
        let name = e.map_err(|e| e.to_string())?.file_name();
        let Some(p) = name.to_str().and_then(|n| StorePath::from_base(n).ok()) else { continue };
        if live.contains(&p) {
            continue;
        }
        match store.read_record(&p) {
            Ok(Some(r)) => {
                dead.insert(p, r);
            }
            _ => kept_unknown.push(p),
        }
    }
    // Referrers before their references: a dead path that references
    // another dead one goes first.
    let mut order = Vec::new();
    let mut referenced_by: BTreeMap<&StorePath, usize> = dead.keys().map(|p| (p, 0)).collect();
    for (p, r) in &dead {
        for q in r.references.iter().filter(|q| *q != p) {
            if let Some(n) = referenced_by.get_mut(q) {
                *n += 1;
            }
        }
    }
    let mut ready: Vec<&StorePath> = referenced_by.iter().filter(|(_, n)| **n == 0).map(|(p, _)| *p).collect();
    while let Some(p) = ready.pop() {
        order.push(p.clone());
        for q in dead[p].references.iter().filter(|q| *q != p) {
            if let Some(n) = referenced_by.get_mut(q) {
                *n -= 1;
                if *n == 0 {
                    ready.push(dead.get_key_value(q).expect("dead").0);
                }
            }
        }
    }
    let mut report = Report { live: live.len(), kept_unknown, ..Report::default() };
    for p in order {
        let size = dead[&p].nar_size;
        if !dry_run {
            let tmp = format!("{TEMP_PREFIX}gc-{}", p.base());
            rfs::renameat(store.store_fd(), p.base(), store.store_fd(), tmp.as_str())
                .map_err(|e| format!("moving {p} out: {e}"))?;
            fsutil::remove_tree(store.store_fd(), tmp.as_bytes()).map_err(|e| format!("removing {p}: {e}"))?;
            let _ = rfs::unlinkat(store.paths_fd(), p.base(), AtFlags::empty());
        }
        report.bytes_freed += size;
        report.deleted.push(p);
    }
    if !dry_run {
        let _ = rfs::fsync(store.store_fd());
    }
    Ok(report)
}

/// Bytes available to an unprivileged writer on the store's file system.
pub fn free_bytes(store: &Store) -> Option<u64> {
    let st = rfs::fstatvfs(store.store_fd()).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}
