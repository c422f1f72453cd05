//! Durability without blocking the caller's loop: a short-lived child
//! process makes the `syncfs`/`fsync` calls and exits; the loop waits for
//! it on a pipe in its own `poll(2)` set ([`Flush::fd`]), with a deadline.
//!
//! Why a process: a batch commit's `syncfs` writes back everything dirty on
//! the file system and waits for it (113 ms under strace on this machine's
//! ext4 during a 17 MB deploy; seconds on an SD card). No call makes that
//! wait non-blocking, the agent has one thread by design, and starting
//! write-back early (`sync_file_range`) only shortens the wait, it does not
//! bound it. The child is a plain fork (`clone` with exit signal SIGCHLD
//! and no flags: no shared memory, no thread), inherits the seccomp filter,
//! allocates nothing and calls nothing but raw system calls, so forking
//! from a multi-threaded process (a test harness) is safe too.
//!
//! Child → parent, on the pipe: exactly [`RESULT_LEN`] bytes, then EOF when
//! the child exits:
//!
//! ```text
//! result = index errno     ; index: u8, errno: i32 little-endian
//!   index 0                ; every call succeeded (errno 0)
//!   index k (1..=MAX_OPS)  ; call k failed with errno; later calls not made
//! ```
//!
//! EOF with fewer bytes, or more bytes, means the child died (was killed):
//! the flush failed. The parent reaps the child once EOF is seen; a child
//! still running when its [`Flush`] is dropped (a deadline passed, an
//! install was abandoned) is reaped by a later [`Flush::start`]. The child
//! closes every inherited descriptor but the ones it syncs and its end of
//! the pipe first, so it holds no socket open (a connection the loop closes
//! ends at once, a restarted agent can bind its port) and no lock.
//!
//! Test hook: with `NIXLESS_TEST_FLUSH_GATE=PATH` in the environment, the
//! child opens PATH for reading and reads one byte before its first call.
//! A FIFO there holds the child until a test writes to it, so the test can
//! hold a commit between "records written" and "contents durable" and see
//! that the loop still answers; a regular file (or nothing) holds nothing.

use rustix::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use rustix::io::Errno;
use rustix::process::{Pid, WaitOptions};
use std::ffi::CString;
use std::fmt;
use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Calls in one flush at most.
pub const MAX_OPS: usize = 4;
/// Bytes of the child's result.
pub const RESULT_LEN: usize = 5;
/// How long a flush may take before the caller gives up on it: a batch is
/// at most 512 MiB of NARs (`BatchLimits`), which a 1 MB/s SD card writes
/// back in under 10 minutes.
pub const FLUSH_DEADLINE: Duration = Duration::from_secs(15 * 60);
/// Children given up on and not yet reaped, at most (more stay zombies
/// until the process exits; there is one flush at a time, so this is a
/// budget that is never reached in practice).
const MAX_ORPHANS: usize = 64;

const GATE_ENV: &str = "NIXLESS_TEST_FLUSH_GATE";

/// One durability call.
#[derive(Clone, Copy)]
pub enum Op<'a> {
    /// `syncfs(2)`: everything on the file system of the descriptor.
    Syncfs(BorrowedFd<'a>),
    /// `fsync(2)`: one file or directory.
    Fsync(BorrowedFd<'a>),
}

impl Op<'_> {
    fn name(&self) -> &'static str {
        match self {
            Op::Syncfs(_) => "syncfs",
            Op::Fsync(_) => "fsync",
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Op::Syncfs(fd) | Op::Fsync(fd) => *fd,
        }
    }

    fn call(&self) -> rustix::io::Result<()> {
        match self {
            Op::Syncfs(fd) => rustix::fs::syncfs(fd),
            Op::Fsync(fd) => rustix::fs::fsync(fd),
        }
    }
}

#[derive(Debug)]
pub enum FlushError {
    /// The pipe or the child could not be made.
    Start { what: String, source: io::Error },
    /// A call failed.
    Call { what: String, call: &'static str, source: io::Error },
    /// The child ended without saying how the calls went.
    Died { what: String },
    /// The calls did not finish in time.
    Deadline { what: String, after: Duration },
    /// More calls than [`MAX_OPS`] (a bug in the caller).
    TooMany { what: String, ops: usize },
}

impl fmt::Display for FlushError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FlushError::Start { what, source } => write!(f, "starting the flush of {what}: {source}"),
            FlushError::Call { what, call, source } => write!(f, "{call} of {what}: {source}"),
            FlushError::Died { what } => write!(f, "the flush of {what} ended without a result (killed?)"),
            FlushError::Deadline { what, after } => write!(f, "the flush of {what} did not finish within {after:?}"),
            FlushError::TooMany { what, ops } => write!(f, "the flush of {what}: {ops} calls, at most {MAX_OPS}"),
        }
    }
}

impl std::error::Error for FlushError {}

/// A flush in progress in a child process.
pub struct Flush {
    what: String,
    names: [&'static str; MAX_OPS],
    state: State,
    deadline: Instant,
    started: Instant,
}

enum State {
    Running {
        pid: Pid,
        pipe: OwnedFd,
        got: [u8; RESULT_LEN],
        len: usize,
        extra: bool,
        eof: bool,
    },
    /// Made in this process (no fork on this architecture); the outcome.
    Finished(Result<(), (usize, Errno)>),
    /// Reported; nothing more to give.
    Spent,
}

/// Children whose flush was given up on, to reap later.
static ORPHANS: Mutex<Vec<Pid>> = Mutex::new(Vec::new());

impl Flush {
    /// Starts the calls `ops` (in order; the first failure stops them) in
    /// a child; `what` names what is made durable, for errors. The
    /// descriptors stay the caller's: the child has its own copies.
    pub fn start(what: impl Into<String>, ops: &[Op<'_>], deadline: Duration) -> Result<Flush, FlushError> {
        let what = what.into();
        if ops.len() > MAX_OPS {
            return Err(FlushError::TooMany { what, ops: ops.len() });
        }
        reap_orphans();
        let mut names = [""; MAX_OPS];
        for (n, op) in names.iter_mut().zip(ops) {
            *n = op.name();
        }
        let started = Instant::now();
        let deadline = started + deadline;
        let state = match raw::fork_flush(ops, gate().as_ref()) {
            Some(Ok((pid, pipe))) => {
                State::Running { pid, pipe, got: [0; RESULT_LEN], len: 0, extra: false, eof: false }
            }
            Some(Err(e)) => return Err(FlushError::Start { what, source: e.into() }),
            // No fork here: the calls are made now, in this process.
            None => State::Finished(run_ops(ops)),
        };
        Ok(Flush { what, names, state, deadline, started })
    }

    /// The descriptor to poll for `POLLIN` (also readable at EOF); none
    /// once the outcome is known.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.state {
            State::Running { pipe, .. } => Some(pipe.as_fd()),
            _ => None,
        }
    }

    /// When [`Flush::check`] reports the deadline.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Without blocking: `Ok(true)` once every call succeeded and the
    /// child is reaped, `Ok(false)` while it runs, an error if a call
    /// failed, the child died, or the deadline passed.
    pub fn check(&mut self) -> Result<bool, FlushError> {
        match std::mem::replace(&mut self.state, State::Spent) {
            State::Spent => Ok(true),
            State::Finished(r) => self.outcome(r).map(|()| true),
            State::Running { pid, pipe, mut got, mut len, mut extra, mut eof } => {
                let mut buf = [0u8; 16];
                while !eof {
                    match rustix::io::read(&pipe, &mut buf) {
                        Ok(0) => eof = true,
                        Ok(n) => {
                            let take = n.min(RESULT_LEN - len);
                            got[len..len + take].copy_from_slice(&buf[..take]);
                            len += take;
                            extra |= take < n;
                        }
                        Err(Errno::INTR) => {}
                        Err(Errno::AGAIN) => break,
                        Err(_) => eof = true,
                    }
                }
                // EOF: the child is exiting; it is a zombie microseconds
                // later, and until then the pipe stays readable, so the
                // caller's poll returns at once and this is asked again.
                let reaped =
                    eof && matches!(rustix::process::waitpid(Some(pid), WaitOptions::NOHANG), Ok(Some(_)) | Err(_));
                if !reaped {
                    if Instant::now() >= self.deadline {
                        orphan(pid);
                        return Err(FlushError::Deadline {
                            what: self.what.clone(),
                            after: self.deadline - self.started,
                        });
                    }
                    self.state = State::Running { pid, pipe, got, len, extra, eof };
                    return Ok(false);
                }
                if len < RESULT_LEN || extra {
                    return Err(FlushError::Died { what: self.what.clone() });
                }
                let errno = i32::from_le_bytes([got[1], got[2], got[3], got[4]]);
                let r = match got[0] {
                    0 => Ok(()),
                    k => Err((usize::from(k) - 1, Errno::from_raw_os_error(errno))),
                };
                self.outcome(r).map(|()| true)
            }
        }
    }

    /// Blocks until the flush ends (or its deadline).
    pub fn wait(mut self) -> Result<(), FlushError> {
        loop {
            if self.check()? {
                return Ok(());
            }
            let Some(fd) = self.fd() else { continue };
            let left = self.deadline.saturating_duration_since(Instant::now());
            let ts = rustix::time::Timespec::try_from(left).unwrap_or(rustix::time::Timespec { tv_sec: 1, tv_nsec: 0 });
            let mut pfd = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
            let _ = rustix::event::poll(&mut pfd, Some(&ts));
        }
    }

    fn outcome(&self, r: Result<(), (usize, Errno)>) -> Result<(), FlushError> {
        r.map_err(|(i, e)| FlushError::Call {
            what: self.what.clone(),
            call: self.names.get(i).copied().unwrap_or("?"),
            source: e.into(),
        })
    }
}

impl Drop for Flush {
    fn drop(&mut self) {
        if let State::Running { pid, .. } = self.state {
            if !matches!(rustix::process::waitpid(Some(pid), WaitOptions::NOHANG), Ok(Some(_)) | Err(_)) {
                orphan(pid);
            }
        }
    }
}

fn orphan(pid: Pid) {
    let Ok(mut o) = ORPHANS.lock() else { return };
    if o.len() < MAX_ORPHANS {
        o.push(pid);
    } else {
        log::warn!("flush child {} left unreaped: too many outstanding", pid.as_raw_nonzero());
    }
}

fn reap_orphans() {
    let Ok(mut o) = ORPHANS.lock() else { return };
    o.retain(|pid| matches!(rustix::process::waitpid(Some(*pid), WaitOptions::NOHANG), Ok(None)));
}

/// The test hook's FIFO, read from the environment once.
fn gate() -> Option<CString> {
    static GATE: std::sync::OnceLock<Option<CString>> = std::sync::OnceLock::new();
    GATE.get_or_init(|| {
        let v = std::env::var_os(GATE_ENV)?;
        CString::new(std::os::unix::ffi::OsStrExt::as_bytes(v.as_os_str())).ok()
    })
    .clone()
}

/// The calls, in order: which one failed and how.
fn run_ops(ops: &[Op<'_>]) -> Result<(), (usize, Errno)> {
    for (i, op) in ops.iter().enumerate() {
        op.call().map_err(|e| (i, e))?;
    }
    Ok(())
}

/// Descriptors the child keeps: its calls' and the pipe's, sorted, at
/// most `MAX_OPS + 1`; the count.
fn kept(ops: &[Op<'_>], pipe: i32) -> ([i32; MAX_OPS + 1], usize) {
    let mut keep = [i32::MAX; MAX_OPS + 1];
    keep[0] = pipe;
    for (k, op) in keep[1..].iter_mut().zip(ops) {
        *k = op.fd().as_raw_fd();
    }
    let n = ops.len() + 1;
    keep[..n].sort_unstable();
    (keep, n)
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod raw {
    use super::{kept, run_ops, Op, RESULT_LEN};
    use rustix::fd::{AsRawFd, OwnedFd};
    use rustix::io::Errno;
    use rustix::pipe::PipeFlags;
    use rustix::process::Pid;
    use std::ffi::CString;

    #[cfg(target_arch = "x86_64")]
    mod nr {
        pub const CLONE: usize = 56;
        pub const EXIT_GROUP: usize = 231;
        pub const CLOSE: usize = 3;
        pub const CLOSE_RANGE: usize = 436;
    }

    // include/uapi/asm-generic/unistd.h
    #[cfg(target_arch = "aarch64")]
    mod nr {
        pub const CLONE: usize = 220;
        pub const EXIT_GROUP: usize = 94;
        pub const CLOSE: usize = 57;
        pub const CLOSE_RANGE: usize = 436;
    }

    const SIGCHLD: usize = 17;
    /// The fallback of close_range (Linux < 5.9) closes descriptors below
    /// this one by one (systemd's default soft limit for services).
    const FALLBACK_FDS: i32 = 1024;

    #[cfg(target_arch = "x86_64")]
    unsafe fn syscall3(nr: usize, a: usize, b: usize, c: usize) -> isize {
        let ret: isize;
        // SAFETY: the caller passes arguments valid for `nr`.
        unsafe {
            core::arch::asm!(
                "syscall",
                inlateout("rax") nr as isize => ret,
                in("rdi") a, in("rsi") b, in("rdx") c,
                in("r10") 0usize, in("r8") 0usize, in("r9") 0usize,
                lateout("rcx") _, lateout("r11") _,
                options(nostack),
            );
        }
        ret
    }

    #[cfg(target_arch = "aarch64")]
    unsafe fn syscall3(nr: usize, a: usize, b: usize, c: usize) -> isize {
        let ret: isize;
        // SAFETY: the caller passes arguments valid for `nr`.
        unsafe {
            core::arch::asm!(
                "svc 0",
                in("x8") nr,
                inlateout("x0") a as isize => ret,
                in("x1") b, in("x2") c, in("x3") 0usize, in("x4") 0usize, in("x5") 0usize,
                options(nostack),
            );
        }
        ret
    }

    /// Forks the flush child; in this process, its pid and the pipe's
    /// read end (non-blocking). `None`: never (this architecture forks).
    pub(super) fn fork_flush(ops: &[Op<'_>], gate: Option<&CString>) -> Option<rustix::io::Result<(Pid, OwnedFd)>> {
        Some(fork_flush_inner(ops, gate))
    }

    fn fork_flush_inner(ops: &[Op<'_>], gate: Option<&CString>) -> rustix::io::Result<(Pid, OwnedFd)> {
        let (r, w) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        let (keep, n) = kept(ops, w.as_raw_fd());
        // SAFETY: clone(SIGCHLD, no stack, no tids) is fork(2): the child
        // gets a copy of this process's memory and descriptors, and runs
        // `child` only, which makes raw system calls and never returns.
        let ret = unsafe { syscall3(nr::CLONE, SIGCHLD, 0, 0) };
        match ret {
            0 => child(ops, &w, &keep[..n], gate),
            pid if pid < 0 => Err(Errno::from_raw_os_error(-pid as i32)),
            pid => {
                drop(w);
                // SAFETY: the kernel returned a positive pid.
                let pid = unsafe { Pid::from_raw_unchecked(pid as i32) };
                Ok((pid, r))
            }
        }
    }

    /// The child: close what it does not need, (test hook) wait at the
    /// gate, make the calls, say how they went, exit.
    fn child(ops: &[Op<'_>], w: &OwnedFd, keep: &[i32], gate: Option<&CString>) -> ! {
        let mut from = 3i32;
        for &k in keep {
            if k > from {
                close_range(from, k - 1);
            }
            from = from.max(k.saturating_add(1));
        }
        close_range(from, -1);
        if let Some(path) = gate {
            if let Ok(fd) = rustix::fs::open(path.as_c_str(), rustix::fs::OFlags::RDONLY, rustix::fs::Mode::empty()) {
                let _ = rustix::io::read(&fd, &mut [0u8; 1]);
            }
        }
        let (index, errno) = match run_ops(ops) {
            Ok(()) => (0u8, 0i32),
            Err((i, e)) => (u8::try_from(i + 1).unwrap_or(u8::MAX), e.raw_os_error()),
        };
        let mut result = [0u8; RESULT_LEN];
        result[0] = index;
        result[1..].copy_from_slice(&errno.to_le_bytes());
        let _ = rustix::io::write(w, &result);
        // SAFETY: exit_group ends the process; nothing runs after it.
        unsafe { syscall3(nr::EXIT_GROUP, 0, 0, 0) };
        #[allow(clippy::empty_loop)]
        loop {}
    }

    /// Closes descriptors `first..=last` (valid or not; -1: all from `first` on).
    fn close_range(first: i32, last: i32) {
        // SAFETY: close_range only closes descriptors; the child uses none of these.
        let ret = unsafe { syscall3(nr::CLOSE_RANGE, first as usize, last as u32 as usize, 0) };
        if ret == -(Errno::NOSYS.raw_os_error() as isize) {
            let last = if last < 0 { FALLBACK_FDS } else { last.min(FALLBACK_FDS) };
            for fd in first..=last {
                // SAFETY: as above, one at a time.
                unsafe { syscall3(nr::CLOSE, fd as usize, 0, 0) };
            }
        }
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
mod raw {
    pub(super) fn fork_flush(
        _: &[super::Op<'_>],
        _: Option<&std::ffi::CString>,
    ) -> Option<rustix::io::Result<(rustix::process::Pid, rustix::fd::OwnedFd)>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fd::AsFd;
    use std::fs::File;

    #[test]
    fn a_flush_succeeds_and_reaps_its_child() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("a")).unwrap();
        let d = File::open(dir.path()).unwrap();
        let mut fl = Flush::start("test", &[Op::Syncfs(d.as_fd()), Op::Fsync(f.as_fd())], FLUSH_DEADLINE).unwrap();
        let pid = match &fl.state {
            State::Running { pid, .. } => *pid,
            _ => panic!("not forked"),
        };
        while !fl.check().unwrap() {
            let fd = fl.fd().unwrap();
            let mut pfd = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
            rustix::event::poll(&mut pfd, None).unwrap();
        }
        // Reaped: no such child any more.
        assert_eq!(rustix::process::waitpid(Some(pid), WaitOptions::NOHANG).unwrap_err(), Errno::CHILD);
    }

    #[test]
    fn a_failing_call_is_reported_with_its_name_and_errno() {
        // fsync of a pipe: EINVAL (pipes do not support syncing).
        let (r, _w) = rustix::pipe::pipe().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let d = File::open(dir.path()).unwrap();
        let ops = [Op::Syncfs(d.as_fd()), Op::Fsync(r.as_fd())];
        match Flush::start("a pipe", &ops, FLUSH_DEADLINE).unwrap().wait().unwrap_err() {
            FlushError::Call { call: "fsync", source, .. } => assert_eq!(source.raw_os_error(), Some(libc::EINVAL)),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn a_child_killed_before_it_answers_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let d = File::open(dir.path()).unwrap();
        // A gate nobody opens for writing holds the child before its calls.
        let fifo = dir.path().join("gate");
        let c = CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let mut fl = match raw::fork_flush(&[Op::Syncfs(d.as_fd())], Some(&c)) {
            Some(Ok((pid, pipe))) => Flush {
                what: "held".into(),
                names: ["syncfs", "", "", ""],
                state: State::Running { pid, pipe, got: [0; RESULT_LEN], len: 0, extra: false, eof: false },
                deadline: Instant::now() + FLUSH_DEADLINE,
                started: Instant::now(),
            },
            _ => return,
        };
        assert!(!fl.check().unwrap(), "held at the gate");
        let State::Running { pid, .. } = fl.state else { panic!() };
        unsafe { libc::kill(pid.as_raw_nonzero().get(), libc::SIGKILL) };
        let err = loop {
            match fl.check() {
                Ok(false) => std::thread::yield_now(),
                Ok(true) => panic!("a killed child succeeded"),
                Err(e) => break e,
            }
        };
        assert!(matches!(err, FlushError::Died { .. }), "{err}");
    }

    #[test]
    fn a_deadline_gives_up_and_the_child_is_reaped_later() {
        let dir = tempfile::tempdir().unwrap();
        let d = File::open(dir.path()).unwrap();
        let fifo = dir.path().join("gate");
        let c = CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let Some(Ok((pid, pipe))) = raw::fork_flush(&[Op::Syncfs(d.as_fd())], Some(&c)) else { return };
        let mut fl = Flush {
            what: "held".into(),
            names: ["syncfs", "", "", ""],
            state: State::Running { pid, pipe, got: [0; RESULT_LEN], len: 0, extra: false, eof: false },
            deadline: Instant::now(),
            started: Instant::now(),
        };
        assert!(matches!(fl.check(), Err(FlushError::Deadline { .. })));
        drop(fl);
        assert!(ORPHANS.lock().unwrap().contains(&pid));
        // Open the gate: the child syncs, exits, and the next start reaps it.
        std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        // Each start reaps what has exited. Started again until the orphan
        // is gone: /proc showing it a zombie is not enough (under qemu-user
        // the leader is a zombie while qemu's own threads still run, and
        // waitpid does not report it yet).
        let until = Instant::now() + Duration::from_secs(60);
        while ORPHANS.lock().unwrap().contains(&pid) {
            assert!(Instant::now() < until, "the orphan {pid:?} was never reaped");
            Flush::start("again", &[Op::Syncfs(d.as_fd())], FLUSH_DEADLINE).unwrap().wait().unwrap();
        }
    }
}
