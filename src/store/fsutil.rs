//! Small fd-relative file system helpers shared by the store and the state
//! files: durable atomic writes, tree removal without recursion or path
//! strings (trees deeper than PATH_MAX are fine).

use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use std::io::{self, Write};
use std::path::Path;

pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    Ok(rfs::open(path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?)
}

pub fn open_dir_at(at: BorrowedFd<'_>, name: &[u8]) -> io::Result<OwnedFd> {
    Ok(rfs::openat(at, name, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?)
}

/// Writes `name` in `dir` atomically: a temp file, written and (if
/// `durable`) fsynced, renamed over the old one, then the directory fsynced.
/// A crash leaves either the old or the new contents, never a mix.
pub fn write_atomic(dir: BorrowedFd<'_>, name: &str, data: &[u8], durable: bool) -> io::Result<()> {
    let tmp = format!(".{name}.tmp");
    let _ = rfs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
    let res = write_then_rename(dir, &tmp, name, data, durable);
    if res.is_err() {
        // A full disk must leave nothing behind, not even the temp file.
        let _ = rfs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
    }
    res
}

/// [`write_atomic`] of a path: `path`'s directory is opened once, the
/// file name must be UTF-8.
pub fn write_atomic_path(path: &Path, data: &[u8], durable: bool) -> io::Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a UTF-8 file name"))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    write_atomic(open_dir(parent)?.as_fd(), name, data, durable)
}

fn write_then_rename(dir: BorrowedFd<'_>, tmp: &str, name: &str, data: &[u8], durable: bool) -> io::Result<()> {
    let fd = rfs::openat(
        dir,
        tmp,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )?;
    let mut f = std::fs::File::from(fd);
    f.write_all(data)?;
    if durable {
        f.sync_all()?;
    }
    drop(f);
    rfs::renameat(dir, tmp, dir, name)?;
    if durable {
        rfs::fsync(dir)?;
    }
    Ok(())
}

/// Whether an I/O error means the file system is full (or over quota).
pub fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(c) if c == rustix::io::Errno::NOSPC.raw_os_error() || c == rustix::io::Errno::DQUOT.raw_os_error())
}

/// Creates `path` and its parents (like `mkdir -p`), mode 0755.
pub fn mkdir_p(path: &Path) -> io::Result<()> {
    std::fs::create_dir_all(path)
}

fn entries(dir: BorrowedFd<'_>) -> io::Result<Vec<(Vec<u8>, bool)>> {
    let mut out = Vec::new();
    for e in rfs::Dir::read_from(dir)? {
        let e = e?;
        let name = e.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let is_dir = match e.file_type() {
            FileType::Directory => true,
            FileType::Unknown => {
                let st = rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
                FileType::from_raw_mode(st.st_mode) == FileType::Directory
            }
            _ => false,
        };
        out.push((name.to_vec(), is_dir));
    }
    Ok(out)
}

/// Removes `name` in `parent` and everything below it, relative to fds,
/// with an explicit stack. Read-only directories (store paths are 0555) are
/// made writable first so this also works without CAP_DAC_OVERRIDE.
/// A missing `name` is not an error.
pub fn remove_tree(parent: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    match rfs::unlinkat(parent, name, AtFlags::empty()) {
        Ok(()) => return Ok(()),
        Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR) | Err(Errno::PERM) => {}
        Err(e) => return Err(e.into()),
    }
    // Frames: (dir fd, its name in the parent frame, subdirectories left).
    type Frame = (OwnedFd, Vec<u8>, Vec<Vec<u8>>);
    let mut stack: Vec<Frame> = Vec::new();
    let push = |stack: &mut Vec<Frame>, at: BorrowedFd<'_>, name: Vec<u8>| -> io::Result<()> {
        let fd = open_dir_at(at, &name)?;
        rfs::fchmod(&fd, Mode::from_raw_mode(0o755))?;
        let mut subdirs = Vec::new();
        for (child, is_dir) in entries(fd.as_fd())? {
            if is_dir {
                subdirs.push(child);
            } else {
                rfs::unlinkat(&fd, child.as_slice(), AtFlags::empty())?;
            }
        }
        stack.push((fd, name, subdirs));
        Ok(())
    };
    push(&mut stack, parent, name.to_vec())?;
    while let Some((fd, _, subdirs)) = stack.last_mut() {
        if let Some(child) = subdirs.pop() {
            let at = rustix::io::fcntl_dupfd_cloexec(&*fd, 0)?;
            push(&mut stack, at.as_fd(), child)?;
        } else {
            let (_, name, _) = stack.pop().expect("non-empty");
            let at = match stack.last() {
                Some((fd, _, _)) => fd.as_fd(),
                None => parent,
            };
            rfs::unlinkat(at, name.as_slice(), AtFlags::REMOVEDIR)?;
        }
    }
    Ok(())
}

/// The device a directory is on, to know whether one `syncfs` covers two.
pub fn device(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(rfs::fstat(fd)?.st_dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_deep_readonly_trees() {
        // 300 levels of 20-byte names: far past PATH_MAX, so only
        // fd-relative calls can reach the bottom.
        let tmp = tempfile::tempdir().unwrap();
        let root = open_dir(tmp.path()).unwrap();
        let mut fds = vec![];
        let mut at = rustix::io::fcntl_dupfd_cloexec(&root, 0).unwrap();
        rfs::mkdirat(&at, "t", Mode::from_raw_mode(0o755)).unwrap();
        at = open_dir_at(at.as_fd(), b"t").unwrap();
        for _ in 0..300 {
            let name = "dddddddddddddddddddd";
            rfs::mkdirat(&at, name, Mode::from_raw_mode(0o755)).unwrap();
            let next = open_dir_at(at.as_fd(), name.as_bytes()).unwrap();
            rfs::symlinkat("/", &next, "l").unwrap();
            let f = rfs::openat(&next, "f", OFlags::CREATE | OFlags::WRONLY, Mode::from_raw_mode(0o444)).unwrap();
            drop(f);
            fds.push(std::mem::replace(&mut at, next));
        }
        fds.push(at);
        for fd in fds.iter().rev() {
            rfs::fchmod(fd, Mode::from_raw_mode(0o555)).unwrap();
        }
        drop(fds);
        remove_tree(root.as_fd(), b"t").unwrap();
        assert!(!tmp.path().join("t").exists());
        remove_tree(root.as_fd(), b"t").unwrap();
    }

    #[test]
    fn atomic_write_replaces() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = open_dir(tmp.path()).unwrap();
        write_atomic(dir.as_fd(), "state", b"one", true).unwrap();
        write_atomic(dir.as_fd(), "state", b"two", true).unwrap();
        assert_eq!(std::fs::read(tmp.path().join("state")).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }
}
