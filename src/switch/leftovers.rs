//! What an interrupted `switch-to-configuration` leaves for the next one.
//!
//! switch-to-configuration records the units it still has to start,
//! restart or reload in `/run/nixos/{start,restart,reload}-list` before it
//! acts on them, and every run reads those lists back first, "to make sure
//! we continue where the old (interrupted) script left off" (nixpkgs,
//! `pkgs/by-name/sw/switch-to-configuration-ng/src/src/main.rs`, and the
//! Perl `switch-to-configuration.pl` before it). Activation snippets append
//! to `/run/nixos/activation-{restart,reload}-list`, which it folds into
//! those after running the activation script. Each list is removed only
//! when its work is done, so a run killed half-way leaves them all.
//!
//! For nixless the next run after a `test` of the new system that was
//! killed at the switch timeout is the rollback's `test` of the previous
//! system: it would start the new generation's units (which the previous
//! one may not even have: "Failed to start", exit 4) and the deploy would
//! end `rollback-failed`; left alone, they would haunt the next deploy
//! too. So the helper removes them after a switch it killed or that was
//! interrupted, and before every rollback step: a rollback decides its
//! units from the previous system alone.
//!
//! Only while nobody holds `switch-to-configuration.lock` (the flock every
//! run takes for its whole life): a run still going owns its lists.

use rustix::fs::{self as rfs, FlockOperation, Mode, OFlags};
use rustix::io::Errno;
use std::io::Read;
use std::path::Path;

/// The lists switch-to-configuration resumes from or folds in after the
/// activation (the `dry-activation-*` ones belong to `dry-activate` only).
pub const LISTS: [&str; 5] =
    ["start-list", "restart-list", "reload-list", "activation-restart-list", "activation-reload-list"];

/// switch-to-configuration's lock, held for the whole of a run.
pub const LOCK: &str = "switch-to-configuration.lock";

/// Units named in a removed list, for the log (the file is read bounded).
const SHOWN_BYTES: u64 = 1024;

/// Where the lists live under `root`.
pub fn dir(root: &Path) -> std::path::PathBuf {
    root.join("run/nixos")
}

/// Removes the lists under `root`; one line per list removed, naming its
/// units. An error when a run still holds the lock (lists left alone) or a
/// list cannot be removed.
pub fn clear(root: &Path) -> Result<Vec<String>, String> {
    let dir = dir(root);
    let _lock = match lock(&dir.join(LOCK))? {
        Lock::Held(fd) => Some(fd),
        Lock::NoFile => None,
    };
    let mut removed = Vec::new();
    for name in LISTS {
        let path = dir.join(name);
        let units = units_in(&path);
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(format!("{}: {units}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("removing {}: {e}", path.display())),
        }
    }
    Ok(removed)
}

enum Lock {
    Held(rustix::fd::OwnedFd),
    /// No lock file: no switch-to-configuration ran since boot (/run is a
    /// tmpfs), so none runs now either.
    NoFile,
}

fn lock(path: &Path) -> Result<Lock, String> {
    // Read-only and never created: flock needs no write access, and the
    // file is switch-to-configuration's to make.
    let fd = match rfs::open(path, OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(Lock::NoFile),
        Err(e) => return Err(format!("opening {}: {e}", path.display())),
    };
    match rfs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Lock::Held(fd)),
        Err(Errno::WOULDBLOCK) => {
            Err(format!("a switch-to-configuration still runs (it holds {}); its lists are left alone", path.display()))
        }
        Err(e) => Err(format!("locking {}: {e}", path.display())),
    }
}

/// "N units: a.service b.service …" from the first [`SHOWN_BYTES`] of a list.
fn units_in(path: &Path) -> String {
    let mut head = Vec::new();
    let read = std::fs::File::open(path).and_then(|f| f.take(SHOWN_BYTES).read_to_end(&mut head));
    if read.is_err() {
        return "unreadable".into();
    }
    let text = String::from_utf8_lossy(&head);
    let units: Vec<&str> = text.split_whitespace().collect();
    let shown: String =
        units.join(" ").chars().map(|c| if c.is_control() { '?' } else { c }).take(SHOWN_BYTES as usize).collect();
    let more = if head.len() as u64 == SHOWN_BYTES { " …" } else { "" };
    format!("{} unit(s): {shown}{more}", units.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_lists(root: &Path) -> std::path::PathBuf {
        let d = dir(root);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("start-list"), "new-only.service\nmulti-user.target\n").unwrap();
        std::fs::write(d.join("restart-list"), "nginx.service\n").unwrap();
        std::fs::write(d.join("activation-reload-list"), "dbus.service\n").unwrap();
        std::fs::write(d.join("dry-activation-restart-list"), "x.service\n").unwrap();
        std::fs::write(d.join(LOCK), "").unwrap();
        d
    }

    #[test]
    fn removes_every_list_and_names_their_units() {
        let tmp = tempfile::tempdir().unwrap();
        let d = write_lists(tmp.path());
        let removed = clear(tmp.path()).unwrap();
        assert_eq!(removed.len(), 3, "{removed:?}");
        assert!(removed[0].ends_with("start-list: 2 unit(s): new-only.service multi-user.target"), "{removed:?}");
        for name in LISTS {
            assert!(!d.join(name).exists(), "{name}");
        }
        assert!(d.join("dry-activation-restart-list").exists(), "dry-activate's own list is not ours");
        assert!(d.join(LOCK).exists(), "the lock file stays: removing it would break its exclusion");
        assert_eq!(clear(tmp.path()).unwrap(), Vec::<String>::new(), "nothing left the second time");
    }

    #[test]
    fn no_run_dir_is_nothing_to_do() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(clear(tmp.path()).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn a_running_switch_keeps_its_lists() {
        let tmp = tempfile::tempdir().unwrap();
        let d = write_lists(tmp.path());
        let held = std::fs::File::open(d.join(LOCK)).unwrap();
        rfs::flock(&held, FlockOperation::LockExclusive).unwrap();
        let err = clear(tmp.path()).unwrap_err();
        assert!(err.contains("still runs"), "{err}");
        assert!(d.join("start-list").exists());
        drop(held);
        assert_eq!(clear(tmp.path()).unwrap().len(), 3);
    }
}
