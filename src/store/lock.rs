//! The store lock: one writer at a time in `<root>/nix/store`.
//!
//! Every change to the store (install, gc, removing temps) happens under an
//! exclusive `flock` on the store directory itself. The directory, not a
//! lock file: it is the same for every process writing this store whatever
//! its state dir, it exists already, and locking it writes nothing (a full
//! disk, or a unit with `ProtectSystem=strict` that may only write the store,
//! can still lock). The kernel drops the lock when the holder dies, even by
//! SIGKILL, so there is never a stale lock to break. Nix itself serialises
//! its collector on `/nix/var/nix/gc.lock` the same way.
//!
//! The holder is named from `/proc/locks` (pid, then its command line), so
//! a waiter can say whom it waits for; nothing has to be written for that.

use super::Store;
use rustix::fd::OwnedFd;
use rustix::fs::{self as rfs, FlockOperation, Mode, OFlags};
use rustix::io::Errno;
use std::io::{self, BufRead};
use std::time::{Duration, Instant};

/// Proof that this process holds the store lock; store writes take it.
/// Dropping it (or dying) releases the lock.
pub struct StoreLock<'s> {
    store: &'s Store,
    _fd: OwnedFd,
}

impl std::ops::Deref for StoreLock<'_> {
    type Target = Store;
    fn deref(&self) -> &Store {
        self.store
    }
}

/// The store lock held without a borrow of its [`Store`], so an event loop
/// can keep it across iterations next to the store it owns; only
/// [`Store::reattach`] turns it back into a [`StoreLock`], for the same
/// store directory (checked). Dropping it releases the lock.
pub struct HeldLock {
    store_dir: std::path::PathBuf,
    fd: OwnedFd,
}

impl<'s> StoreLock<'s> {
    pub fn detach(self) -> HeldLock {
        HeldLock { store_dir: self.store.store_dir().to_owned(), fd: self._fd }
    }
}

impl Store {
    /// The lock `held` as a [`StoreLock`] of this store again; `Err` gives
    /// it back unchanged if it was taken on another store.
    pub fn reattach(&self, held: HeldLock) -> Result<StoreLock<'_>, HeldLock> {
        if held.store_dir != self.store_dir() {
            return Err(held);
        }
        Ok(StoreLock { store: self, _fd: held.fd })
    }
}

/// Who holds the lock, as far as `/proc/locks` tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: Option<u32>,
    /// The first words of its command line, escaped.
    pub command: Option<String>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.pid, &self.command) {
            (Some(pid), Some(cmd)) => write!(f, "pid {pid} ({cmd})"),
            (Some(pid), None) => write!(f, "pid {pid}"),
            _ => write!(f, "another process"),
        }
    }
}

#[derive(Debug)]
pub enum LockError {
    /// Still held by someone else after waiting `waited`.
    Busy {
        holder: Holder,
        waited: Duration,
    },
    Io(io::Error),
}

impl std::fmt::Display for LockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockError::Busy { holder, waited } if waited.is_zero() => {
                write!(f, "the store is locked by {holder}")
            }
            LockError::Busy { holder, waited } => {
                write!(f, "the store is still locked by {holder} after {} s", waited.as_secs())
            }
            LockError::Io(e) => write!(f, "locking the store: {e}"),
        }
    }
}

impl std::error::Error for LockError {}

impl From<io::Error> for LockError {
    fn from(e: io::Error) -> Self {
        LockError::Io(e)
    }
}

/// A wait for the store lock that never blocks, for a single-threaded
/// loop that must keep serving meanwhile (the agent): each
/// [`LockWait::poll`] tries once, and the loop polls again on a later turn.
#[derive(Debug, Clone, Copy)]
pub struct LockWait {
    since: Instant,
    max_wait: Duration,
    told: bool,
}

impl LockWait {
    pub fn new(max_wait: Duration, now: Instant) -> LockWait {
        LockWait { since: now, max_wait, told: false }
    }

    /// The lock; `None` while someone else holds it (whom for is logged
    /// once); [`LockError::Busy`] once `max_wait` has passed at `now`.
    pub fn poll<'s>(&mut self, store: &'s Store, now: Instant) -> Result<Option<StoreLock<'s>>, LockError> {
        if let Some(l) = store.try_lock()? {
            return Ok(Some(l));
        }
        let waited = now.saturating_duration_since(self.since);
        if waited >= self.max_wait {
            return Err(LockError::Busy { holder: store.lock_holder(), waited });
        }
        if !self.told {
            self.told = true;
            log::info!("waiting for the store lock held by {}", store.lock_holder());
        }
        Ok(None)
    }
}

impl Store {
    /// A new open file description of the store directory: flock locks
    /// belong to one, so this never shares a lock with another caller in
    /// the same process.
    fn lock_fd(&self) -> io::Result<OwnedFd> {
        Ok(rfs::openat(self.store_fd(), ".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?)
    }

    /// Takes the lock if it is free; `Ok(None)` if someone holds it.
    pub fn try_lock(&self) -> io::Result<Option<StoreLock<'_>>> {
        let fd = self.lock_fd()?;
        match rfs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(StoreLock { store: self, _fd: fd })),
            Err(Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Takes the lock, or fails at once naming the holder.
    pub fn lock_now(&self) -> Result<StoreLock<'_>, LockError> {
        match self.try_lock()? {
            Some(l) => Ok(l),
            None => Err(LockError::Busy { holder: self.lock_holder(), waited: Duration::ZERO }),
        }
    }

    /// Takes the lock, waiting as long as it takes (for a command at the
    /// console: Ctrl-C ends the wait); `waiting` is told once whom for.
    pub fn lock_blocking(&self, waiting: &mut dyn FnMut(&Holder)) -> io::Result<StoreLock<'_>> {
        if let Some(l) = self.try_lock()? {
            return Ok(l);
        }
        waiting(&self.lock_holder());
        let fd = self.lock_fd()?;
        loop {
            match rfs::flock(&fd, FlockOperation::LockExclusive) {
                Ok(()) => return Ok(StoreLock { store: self, _fd: fd }),
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Whoever holds an exclusive flock on the store directory now.
    pub fn lock_holder(&self) -> Holder {
        let pid = rfs::fstat(self.store_fd()).ok().and_then(|st| {
            let want = format!("{:02x}:{:02x}:{}", rfs::major(st.st_dev), rfs::minor(st.st_dev), st.st_ino);
            let f = std::fs::File::open("/proc/locks").ok()?;
            io::BufReader::new(f).lines().map_while(Result::ok).find_map(|l| flock_holder(&l, &want))
        });
        Holder { pid, command: pid.and_then(command_of) }
    }
}

/// The pid in a `/proc/locks` line if it is a granted FLOCK on `dev_ino`
/// (`MAJ:MIN:INODE`, as the kernel prints it); waiters' lines have `->`.
fn flock_holder(line: &str, dev_ino: &str) -> Option<u32> {
    let f: Vec<&str> = line.split_whitespace().collect();
    match f.as_slice() {
        [_, "FLOCK", _, _, pid, id, ..] if *id == dev_ino => pid.parse().ok(),
        _ => None,
    }
}

/// The first three words of a process's command line, each cut to 64
/// bytes and escaped (it goes into one log line).
fn command_of(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let words: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|w| !w.is_empty())
        .take(3)
        .enumerate()
        .map(|(i, w)| {
            // argv[0] by its last component: "nixless", not the store path.
            let w = if i == 0 { w.rsplit(|b| *b == b'/').next().unwrap_or(w) } else { w };
            let cut = &w[..w.len().min(64)];
            String::from_utf8_lossy(cut).escape_debug().to_string()
        })
        .collect();
    (!words.is_empty()).then(|| words.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let tmp = tempfile::tempdir().unwrap();
        let s = Store::open(tmp.path(), &tmp.path().join("state")).unwrap();
        (tmp, s)
    }

    #[test]
    fn one_holder_at_a_time_and_released_on_drop() {
        let (_t, s) = store();
        let held = s.try_lock().unwrap().expect("free");
        assert!(s.try_lock().unwrap().is_none(), "a second open file description is refused");
        let err = s.lock_now().err().expect("busy");
        let me = std::process::id();
        assert_eq!(err.to_string(), format!("the store is locked by {}", s.lock_holder()));
        match err {
            LockError::Busy { holder, .. } => {
                assert_eq!(holder.pid, Some(me), "named from /proc/locks");
                assert!(holder.command.is_some());
            }
            e => panic!("{e}"),
        }
        drop(held);
        assert!(s.try_lock().unwrap().is_some(), "free again after drop");
    }

    #[test]
    fn a_lock_wait_gives_up_at_its_deadline_naming_the_holder() {
        let (_t, s) = store();
        let _held = s.try_lock().unwrap().unwrap();
        let t0 = Instant::now();
        let mut w = LockWait::new(Duration::from_secs(600), t0);
        assert!(w.poll(&s, t0).unwrap().is_none(), "held: try again later");
        assert!(w.told, "the wait is announced");
        assert!(w.poll(&s, t0 + Duration::from_secs(599)).unwrap().is_none());
        let err = w.poll(&s, t0 + Duration::from_secs(600)).err().unwrap();
        assert!(err.to_string().starts_with("the store is still locked by pid "), "{err}");
        assert!(err.to_string().ends_with(" after 600 s"), "{err}");
    }

    #[test]
    fn a_lock_wait_gets_the_lock_once_released() {
        let (_t, s) = store();
        let held = s.try_lock().unwrap().unwrap();
        let t0 = Instant::now();
        let mut w = LockWait::new(Duration::from_secs(60), t0);
        assert!(w.poll(&s, t0).unwrap().is_none());
        drop(held);
        assert!(w.poll(&s, t0 + Duration::from_secs(1)).unwrap().is_some());
    }

    #[test]
    fn proc_locks_lines() {
        let l = "1: FLOCK  ADVISORY  WRITE 13811 fe:00:10010934 0 EOF";
        assert_eq!(flock_holder(l, "fe:00:10010934"), Some(13811));
        assert_eq!(flock_holder(l, "fe:00:1001093"), None);
        assert_eq!(flock_holder("1: -> FLOCK  ADVISORY  WRITE 7 fe:00:10010934 0 EOF", "fe:00:10010934"), None);
        assert_eq!(flock_holder("2: POSIX  ADVISORY  WRITE 7 fe:00:10010934 0 EOF", "fe:00:10010934"), None);
        assert_eq!(flock_holder("", "x"), None);
    }
}
