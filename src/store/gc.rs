//! Garbage collection by recorded references.
//!
//! Live: the closures of the roots — what Nix would keep (every profile
//! link under `/nix/var/nix/profiles`, everything reachable under
//! `/nix/var/nix/gcroots`; see [`roots`]) except the system generations
//! this collection deletes (all but the last N and the current one), the
//! current and booted systems, and whatever the caller adds (a deploy in
//! progress). Closures are followed through the per-path records; a live
//! path without a record has unknown references, so nothing can be proven
//! unreachable and nothing is deleted (its references can be learnt from a
//! cache's signed narinfo first, as the agent's collection does). A dead path without a
//! record is kept too: we never delete what we cannot account for.
//!
//! Deletion renames a path out of the store first (to a temp name the next
//! run cleans up), then removes it with directory-relative calls; referrers
//! go before what they reference, so a crash never leaves a path whose
//! closure is incomplete.

use super::record::Record;
use super::{fsutil, temp_name, Store, StoreLock};
use crate::nix::StorePath;
use rustix::fs::{self as rfs, AtFlags};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

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

/// How far the root walk goes before it refuses to guess (a link to `/`
/// under gcroots would otherwise walk the whole file system).
pub const MAX_ROOT_DEPTH: usize = 32;
pub const MAX_ROOT_ENTRIES: usize = 100_000;
/// Symlinks followed while resolving one name (Linux's own limit).
const MAX_HOPS: usize = 40;

/// Where a name under the root leads, resolved as if `root` were `/`.
#[derive(Debug, PartialEq, Eq)]
enum Resolved {
    /// Into a store path (which may not exist).
    Store(StorePath),
    /// To a directory outside the store: its path with no symlinks left.
    Dir(PathBuf),
    /// Anywhere else: a file, nothing, a loop.
    Other,
}

/// Resolves `rel` (relative to `root`) component by component, reading
/// each symlink itself, so an absolute target like `/nix/var/nix/profiles`
/// stays inside `root`. Stops as soon as the walk enters a store path: the
/// root is that path, whatever lies inside it.
fn resolve_in_root(root: &Path, rel: &Path) -> Resolved {
    let mut done: Vec<OsString> = Vec::new();
    let mut todo: VecDeque<OsString> = components(rel).collect();
    let mut hops = 0;
    while let Some(c) = todo.pop_front() {
        if c == ".." {
            done.pop();
            continue;
        }
        done.push(c);
        match done.as_slice() {
            [nix, store, base] if nix == "nix" && store == "store" => {
                return match base.to_str().map(StorePath::from_base) {
                    Some(Ok(p)) => Resolved::Store(p),
                    _ => Resolved::Other,
                };
            }
            // On the way to the store: a link into it counts even where the
            // path (or the store) is absent.
            [nix] | [nix, _] if nix == "nix" && done.get(1).is_none_or(|s| s == "store") => continue,
            _ => {}
        }
        let host: PathBuf = root.join(done.iter().collect::<PathBuf>());
        match std::fs::symlink_metadata(&host) {
            Ok(md) if md.file_type().is_symlink() => {
                hops += 1;
                let Ok(target) = std::fs::read_link(&host) else { return Resolved::Other };
                if hops > MAX_HOPS {
                    return Resolved::Other;
                }
                done.pop();
                if target.is_absolute() {
                    done.clear();
                }
                for c in components(&target).collect::<Vec<_>>().into_iter().rev() {
                    todo.push_front(c);
                }
            }
            Ok(_) => {}
            Err(_) => return Resolved::Other,
        }
    }
    let host = root.join(done.iter().collect::<PathBuf>());
    if host.is_dir() {
        Resolved::Dir(host)
    } else {
        Resolved::Other
    }
}

/// The names in a path, `..` kept, `/` and `.` dropped.
fn components(p: &Path) -> impl Iterator<Item = OsString> + '_ {
    p.components().filter_map(|c| match c {
        Component::Normal(n) => Some(n.to_owned()),
        Component::ParentDir => Some(OsString::from("..")),
        _ => None,
    })
}

/// The GC roots found by walking directories the way Nix's `findRoots`
/// does (src/libstore/gc.cc): a symlink into the store is a root, a symlink
/// elsewhere is followed (an indirect root such as `gcroots/auto/…` →
/// `/home/u/result` → store), and a regular file named like a store path is
/// one. Beyond Nix, a symlink to a directory is walked as well (so
/// `gcroots/profiles` → `/nix/var/nix/profiles` keeps what the profiles
/// keep even where they live elsewhere); every directory is walked once
/// (loops end), within [`MAX_ROOT_DEPTH`] and [`MAX_ROOT_ENTRIES`].
struct RootWalk<'a> {
    root: &'a Path,
    /// Generation links about to be deleted: not roots (by inode, however
    /// they are reached).
    doomed: BTreeSet<(u64, u64)>,
    seen_dirs: BTreeSet<(u64, u64)>,
    entries: usize,
    found: BTreeSet<StorePath>,
}

impl RootWalk<'_> {
    fn rel<'p>(&self, p: &'p Path) -> &'p Path {
        p.strip_prefix(self.root).unwrap_or(p)
    }

    /// A single link or directory given by its place under the root.
    fn start(&mut self, rel: &str) -> Result<(), String> {
        match resolve_in_root(self.root, Path::new(rel)) {
            Resolved::Store(p) => {
                self.found.insert(p);
                Ok(())
            }
            Resolved::Dir(d) => self.walk(d, 0),
            Resolved::Other => Ok(()),
        }
    }

    fn walk(&mut self, top: PathBuf, depth: usize) -> Result<(), String> {
        let mut stack = vec![(top, depth)];
        while let Some((dir, depth)) = stack.pop() {
            let Ok(md) = std::fs::metadata(&dir) else { continue };
            if !self.seen_dirs.insert((md.dev(), md.ino())) {
                continue;
            }
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                // As Nix: a root that vanished or cannot be read is skipped.
                Err(e) => {
                    log::info!("cannot read potential roots in {}: {e}", dir.display());
                    continue;
                }
            };
            for e in rd {
                let e = e.map_err(|e| format!("finding GC roots in {}: {e}", dir.display()))?;
                self.entries += 1;
                if self.entries > MAX_ROOT_ENTRIES {
                    return Err(format!(
                        "more than {MAX_ROOT_ENTRIES} entries under the GC roots (at {}); nothing deleted",
                        dir.display()
                    ));
                }
                let p = e.path();
                let Ok(md) = std::fs::symlink_metadata(&p) else { continue };
                if self.doomed.contains(&(md.dev(), md.ino())) {
                    continue;
                }
                let next = if md.file_type().is_symlink() {
                    match resolve_in_root(self.root, self.rel(&p)) {
                        Resolved::Store(sp) => {
                            self.found.insert(sp);
                            None
                        }
                        Resolved::Dir(d) => Some(d),
                        Resolved::Other => None,
                    }
                } else if md.is_dir() {
                    Some(p)
                } else {
                    // Nix: a regular file named after a store path roots it.
                    if let Some(sp) = e.file_name().to_str().and_then(|n| StorePath::from_base(n).ok()) {
                        self.found.insert(sp);
                    }
                    None
                };
                if let Some(d) = next {
                    if depth + 1 > MAX_ROOT_DEPTH {
                        return Err(format!(
                            "GC roots nested deeper than {MAX_ROOT_DEPTH} directories (at {}); nothing deleted",
                            d.display()
                        ));
                    }
                    stack.push((d, depth + 1));
                }
            }
        }
        Ok(())
    }
}

/// The roots, as Nix finds them (every link under `/nix/var/nix/profiles`
/// and `/nix/var/nix/gcroots`, recursively), except the system generations
/// this collection deletes (all but the last `generations_to_keep` and the
/// current one); plus `/run/{current,booted}-system`. Second: the system
/// generations kept.
pub fn roots(root: &Path, generations_to_keep: u64) -> Result<(Vec<StorePath>, Vec<u64>), String> {
    let gens = crate::store::profile::generations(root);
    let current = crate::store::profile::current(root).map(|(n, _)| n);
    let keep: Vec<u64> = gens.iter().rev().take(generations_to_keep as usize).map(|(n, _)| *n).chain(current).collect();
    let profiles = crate::store::profile::profiles_dir(root);
    let doomed = gens
        .iter()
        .filter(|(n, _)| !keep.contains(n))
        .filter_map(|(n, _)| std::fs::symlink_metadata(profiles.join(format!("system-{n}-link"))).ok())
        .map(|md| (md.dev(), md.ino()))
        .collect();
    let mut walk = RootWalk { root, doomed, seen_dirs: BTreeSet::new(), entries: 0, found: BTreeSet::new() };
    for start in ["run/current-system", "run/booted-system", "nix/var/nix/gcroots", "nix/var/nix/profiles"] {
        walk.start(start)?;
    }
    Ok((walk.found.into_iter().collect(), keep))
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
/// Under the lock: an install between finding the roots and deleting could
/// otherwise rely on a path this deletes.
pub fn collect(store: &StoreLock, roots: &[StorePath], dry_run: bool) -> Result<Report, String> {
    if !dry_run {
        store.clean_temps().map_err(|e| format!("removing temps in {}: {e}", store.store_dir().display()))?;
    }
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
            let tmp = temp_name(&p);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const A: &str = "/nix/store/00000000000000000000000000000000-nixos-system-a";
    const B: &str = "/nix/store/11111111111111111111111111111111-nixos-system-b";
    const U: &str = "/nix/store/22222222222222222222222222222222-user-env";

    fn sp(p: &str) -> StorePath {
        StorePath::from_absolute(p).unwrap()
    }

    #[test]
    fn generations_this_gc_deletes_are_no_roots_however_reached() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        crate::store::profile::commit(root, A).unwrap();
        crate::store::profile::commit(root, B).unwrap();
        let profiles = crate::store::profile::profiles_dir(root);
        std::fs::create_dir_all(profiles.join("per-user/root")).unwrap();
        symlink(U, profiles.join("per-user/root/profile-1-link")).unwrap();
        // NixOS's gcroots/profiles: the profiles seen a second time.
        symlink("/nix/var/nix/profiles", root.join("nix/var/nix/gcroots/profiles")).unwrap();
        let (roots, keep) = roots(root, 1).unwrap();
        assert_eq!(roots, vec![sp(B), sp(U)], "A's generation is deleted by this gc: not a root");
        assert_eq!(keep, vec![2, 2]);
        let (roots, _) = roots_of(root, 2);
        assert_eq!(roots, vec![sp(A), sp(B), sp(U)]);
    }

    fn roots_of(root: &Path, n: u64) -> (Vec<StorePath>, Vec<u64>) {
        roots(root, n).unwrap()
    }

    #[test]
    fn names_resolve_inside_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        symlink("/a/b", root.join("abs")).unwrap();
        symlink("../../..", root.join("a/b/up")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        symlink(format!("{A}/bin/sh"), root.join("a/b/sh")).unwrap();
        assert_eq!(resolve_in_root(root, Path::new("abs")), Resolved::Dir(root.join("a/b")));
        // `..` above the root stays at the root, as in a chroot.
        assert_eq!(resolve_in_root(root, Path::new("abs/up")), Resolved::Dir(root.to_path_buf()));
        assert_eq!(resolve_in_root(root, Path::new("loop")), Resolved::Other);
        assert_eq!(resolve_in_root(root, Path::new("abs/sh")), Resolved::Store(sp(A)), "a path inside roots it");
        assert_eq!(resolve_in_root(root, Path::new("missing")), Resolved::Other);
    }
}
