//! The store on disk: `<root>/nix/store` plus nixless's records under the
//! state directory. `install` puts closures in; this module knows where
//! things live and what is already there.

pub mod flush;
pub mod fsutil;
pub mod install;
pub mod lock;
pub mod parallel;
pub mod profile;
pub mod record;

use crate::nix::StorePath;
pub use lock::{HeldLock, LockError, LockWait, StoreLock};
use record::Record;
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{self as rfs, AtFlags};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Prefix of the temporary entries nixless makes in the store directory.
/// No store path starts with a dot, so these never collide with one.
pub const TEMP_PREFIX: &str = ".nixless-tmp-";

/// A temp name no other process and no other call in this one uses:
/// `.nixless-tmp-<pid>-<n>-<hash part>`. Two writers therefore never touch
/// (let alone rename into place) each other's half-written temp, and the
/// name stays short whatever the path's (a 244-byte base plus a prefix
/// would pass NAME_MAX).
pub fn temp_name(p: &StorePath) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{TEMP_PREFIX}{}-{n}-{}", std::process::id(), p.hash_part())
}

pub struct Store {
    store_dir: PathBuf,
    store_fd: OwnedFd,
    state_dir: PathBuf,
    paths_fd: OwnedFd,
}

impl Store {
    /// Opens (creating if needed) `<root>/nix/store` and `<state_dir>/paths`.
    pub fn open(root: &Path, state_dir: &Path) -> io::Result<Self> {
        let store_dir = root.join("nix/store");
        fsutil::mkdir_p(&store_dir)?;
        let paths_dir = state_dir.join("paths");
        fsutil::mkdir_p(&paths_dir)?;
        // Activation scripts expect these to exist (see the brief).
        for d in ["nix/var/nix/gcroots", "nix/var/nix/profiles"] {
            fsutil::mkdir_p(&root.join(d))?;
        }
        Ok(Store {
            store_fd: fsutil::open_dir(&store_dir)?,
            store_dir,
            paths_fd: fsutil::open_dir(&paths_dir)?,
            state_dir: state_dir.to_owned(),
        })
    }

    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn store_fd(&self) -> BorrowedFd<'_> {
        self.store_fd.as_fd()
    }

    pub fn paths_fd(&self) -> BorrowedFd<'_> {
        self.paths_fd.as_fd()
    }

    /// Whether the path exists in the store (installed paths are complete:
    /// they only ever appear by rename).
    pub fn is_present(&self, p: &StorePath) -> bool {
        rfs::statat(&self.store_fd, p.base(), AtFlags::SYMLINK_NOFOLLOW).is_ok()
    }

    pub fn read_record(&self, p: &StorePath) -> io::Result<Option<Record>> {
        match std::fs::read_to_string(self.state_dir.join("paths").join(p.base())) {
            Ok(text) => Record::parse(&text)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("record of {p}: {e}"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every path with a record.
    pub fn recorded_paths(&self) -> io::Result<Vec<StorePath>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.state_dir.join("paths"))? {
            let name = e?.file_name();
            if let Some(p) = name.to_str().and_then(|n| StorePath::from_base(n).ok()) {
                out.push(p);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Re-hashes an installed path as a NAR.
    pub fn hash_path(&self, p: &StorePath) -> io::Result<(crate::nix::Sha256, u64)> {
        use sha2::Digest;
        struct HashWriter(sha2::Sha256, u64);
        impl io::Write for HashWriter {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.update(b);
                self.1 += b.len() as u64;
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut w = io::BufWriter::with_capacity(256 << 10, HashWriter(sha2::Sha256::new(), 0));
        crate::nar::write::dump(self.store_fd(), p.base().as_bytes(), &mut w)?;
        let HashWriter(h, n) = w.into_inner().map_err(|e| e.into_error())?;
        Ok((crate::nix::Sha256(h.finalize().into()), n))
    }
}
pub mod gc;

/// Writes to the store: only with the lock held.
impl StoreLock<'_> {
    /// Removes the temps that crashed or killed writers left; returns how
    /// many. Only under the lock: another live writer's temps would go too.
    pub fn clean_temps(&self) -> io::Result<usize> {
        let mut stale = Vec::new();
        for e in rfs::Dir::read_from(self.store_fd())? {
            let e = e?;
            let name = e.file_name().to_bytes();
            if name.starts_with(TEMP_PREFIX.as_bytes()) {
                stale.push(name.to_vec());
            }
        }
        for name in &stale {
            log::info!("removing leftover {}", String::from_utf8_lossy(name));
            fsutil::remove_tree(self.store_fd(), name)?;
        }
        Ok(stale.len())
    }

    /// Writes a path's record (not yet durable: the install batch's syncfs
    /// makes it so, before the path itself appears).
    pub fn write_record(&self, r: &Record) -> io::Result<()> {
        fsutil::write_atomic(self.paths_fd(), r.path.base(), r.to_text().as_bytes(), false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_are_unique_and_fit_name_max() {
        let longest = StorePath::from_base(&format!("{}-{}", "0".repeat(32), "a".repeat(211))).unwrap();
        let (a, b) = (temp_name(&longest), temp_name(&longest));
        assert_ne!(a, b);
        assert!(a.len() <= 255 && a.starts_with(TEMP_PREFIX), "{a}");
        assert!(a.contains(&format!("-{}-", std::process::id())), "{a}");
    }
}
