//! NixOS's system profile: `/nix/var/nix/profiles/system` → `system-N-link`
//! → `/nix/store/…-nixos-system-…`. Bootloader builders (systemd-boot's,
//! GRUB's) list generations from these links, so a generation must be
//! linked before `switch-to-configuration boot` runs.
//!
//! Both changes are atomic: a link is made under a temp name and renamed
//! into place, and the directory is fsynced, so a crash leaves either the
//! old profile or the new one.

use super::fsutil;
use rustix::fd::AsFd;
use rustix::fs::{self as rfs, AtFlags};
use std::path::{Path, PathBuf};

pub fn profiles_dir(root: &Path) -> PathBuf {
    root.join("nix/var/nix/profiles")
}

/// Generations as (N, target store path), sorted by N.
pub fn generations(root: &Path) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(profiles_dir(root)) else { return out };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix("system-"))
            .and_then(|n| n.strip_suffix("-link"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if let Ok(t) = std::fs::read_link(e.path()) {
            if let Some(t) = t.to_str().filter(|t| t.starts_with("/nix/store/")) {
                out.push((n, t.to_owned()));
            }
        }
    }
    out.sort();
    out
}

/// The generation number `system` points to, and its store path.
pub fn current(root: &Path) -> Option<(u64, String)> {
    let link = std::fs::read_link(profiles_dir(root).join("system")).ok()?;
    let n: u64 = link.to_str()?.strip_prefix("system-")?.strip_suffix("-link")?.parse().ok()?;
    generations(root).into_iter().find(|(k, _)| *k == n)
}

/// The newest generation older than the current one.
pub fn previous(root: &Path) -> Option<(u64, String)> {
    let (cur, _) = current(root)?;
    generations(root).into_iter().rfind(|(k, _)| *k < cur)
}

fn replace_link(dir: &Path, name: &str, target: &str) -> std::io::Result<()> {
    let fd = fsutil::open_dir(dir)?;
    let tmp = format!(".{name}.tmp");
    let _ = rfs::unlinkat(&fd, tmp.as_str(), AtFlags::empty());
    rfs::symlinkat(target, &fd, tmp.as_str())?;
    rfs::renameat(&fd, tmp.as_str(), &fd, name)?;
    rfs::fsync(fd.as_fd())?;
    Ok(())
}

/// Makes `system` the profile's current generation: reuses the newest
/// generation if it already is `system`, else links `system-(N+1)-link`;
/// then swaps the profile link. Idempotent. Returns the generation number.
pub fn commit(root: &Path, system: &str) -> std::io::Result<u64> {
    let dir = profiles_dir(root);
    fsutil::mkdir_p(&dir)?;
    fsutil::mkdir_p(&root.join("nix/var/nix/gcroots"))?;
    let gens = generations(root);
    if let Some((n, _)) = current(root).filter(|(_, t)| t == system) {
        return Ok(n);
    }
    let n = match gens.last() {
        Some((n, t)) if t == system => *n,
        Some((n, _)) => {
            replace_link(&dir, &format!("system-{}-link", n + 1), system)?;
            n + 1
        }
        None => {
            replace_link(&dir, "system-1-link", system)?;
            1
        }
    };
    replace_link(&dir, "system", &format!("system-{n}-link"))?;
    Ok(n)
}

/// Points the profile at the newest generation of `system` (making one if
/// there is none). Idempotent.
pub fn restore(root: &Path, system: &str) -> std::io::Result<u64> {
    match generations(root).into_iter().rev().find(|(_, t)| t == system) {
        Some((n, _)) => {
            if current(root).map(|(c, _)| c) != Some(n) {
                set_current(root, n)?;
            }
            Ok(n)
        }
        None => commit(root, system),
    }
}

/// Points the profile at an existing generation (console rollback).
pub fn set_current(root: &Path, n: u64) -> std::io::Result<()> {
    replace_link(&profiles_dir(root), "system", &format!("system-{n}-link"))
}

/// Removes generation links not in `keep` (never the current one).
pub fn delete_generations(root: &Path, keep: &[u64]) -> std::io::Result<Vec<u64>> {
    let cur = current(root).map(|(n, _)| n);
    let dir = fsutil::open_dir(&profiles_dir(root))?;
    let mut gone = Vec::new();
    for (n, _) in generations(root) {
        if Some(n) != cur && !keep.contains(&n) {
            rfs::unlinkat(&dir, format!("system-{n}-link").as_str(), AtFlags::empty())?;
            gone.push(n);
        }
    }
    rfs::fsync(dir.as_fd())?;
    Ok(gone)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "/nix/store/00000000000000000000000000000000-nixos-system-a";
    const B: &str = "/nix/store/11111111111111111111111111111111-nixos-system-b";

    #[test]
    fn commit_links_generations_idempotently() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        assert_eq!(commit(root, A).unwrap(), 1);
        assert_eq!(commit(root, A).unwrap(), 1, "idempotent");
        assert_eq!(commit(root, B).unwrap(), 2);
        assert_eq!(current(root), Some((2, B.to_string())));
        assert_eq!(previous(root), Some((1, A.to_string())));
        assert_eq!(std::fs::read_link(profiles_dir(root).join("system")).unwrap(), PathBuf::from("system-2-link"));
        // Committing the older system again makes a new generation, as
        // nixos-rebuild does; the history stays.
        assert_eq!(commit(root, A).unwrap(), 3);
        assert_eq!(generations(root).len(), 3);
        set_current(root, 2).unwrap();
        assert_eq!(current(root).unwrap().1, B);
        assert_eq!(delete_generations(root, &[3]).unwrap(), vec![1]);
        assert!(root.join("nix/var/nix/gcroots").is_dir());
        let leftovers: Vec<_> = std::fs::read_dir(profiles_dir(root))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty());
    }
}
