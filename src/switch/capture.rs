//! Running a command for the switch helper and the console: its output
//! captured (bounded), its end decided by the process, not by its pipe.
//!
//! A command may exit and leave a background process that inherited its
//! stdout (a health script's `sleep 300 &`, a daemon started by an
//! activation snippet). Waiting for EOF on the pipe would wait for that
//! process; so the command's own exit ends the run, and what is already in
//! the pipe then is read without waiting for more. Leftover processes are
//! not killed on success: an activation may start something that must
//! keep running, and a health command's leftovers are its business (on
//! NixOS the oneshot `nixless-switch.service` has the default
//! `KillMode=control-group`, so systemd removes whatever is left in its
//! cgroup when the helper exits; services that activation starts through
//! systemd live in their own cgroups and are untouched).
//!
//! With a timeout the command runs in a process group of its own, and at
//! the deadline the whole group gets SIGKILL: killing only the shell would
//! leave the children it forked running (and holding the pipe). A process
//! that moved itself out of the group (setsid, setpgid) escapes this; the
//! unit's cgroup catches it when the helper exits.

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::fd::OwnedFd;
use rustix::process::{Pid, PidfdFlags, Signal};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Bytes of output kept for the result.
pub const TAIL: usize = 4096;
/// Most bytes read in one wake-up, so a flood of output cannot keep the
/// loop from looking at the child and the clock.
const READ_BUDGET: usize = 64 * 1024;
/// How often to look at the child when the kernel has no pidfd (< 5.3).
const TICK: Duration = Duration::from_millis(100);

/// The last [`TAIL`] bytes of the output; everything read is also echoed
/// to our stderr (the helper's journal).
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    fn push(&mut self, b: &[u8]) {
        // Not from unit tests: libtest does not capture raw stderr writes.
        if cfg!(not(test)) {
            let _ = std::io::stderr().write_all(b);
        }
        self.0.extend_from_slice(b);
        if self.0.len() > 2 * TAIL {
            self.0.drain(..self.0.len() - TAIL);
        }
    }

    fn into_text(mut self) -> String {
        if self.0.len() > TAIL {
            self.0.drain(..self.0.len() - TAIL);
        }
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

/// Reads what the pipe holds now, at most `budget` bytes, never waiting
/// (the read end is non-blocking); `false` once the pipe is at EOF or broken.
fn pump(out: &mut std::fs::File, tail: &mut Tail, budget: usize) -> bool {
    let mut buf = [0u8; 8192];
    let mut taken = 0;
    while taken < budget {
        match out.read(&mut buf) {
            Ok(0) => return false,
            Ok(n) => {
                tail.push(&buf[..n]);
                taken += n;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
    true
}

/// Spawns `cmd` with stdin from /dev/null and stdout and stderr into one
/// pipe whose read end (non-blocking, close-on-exec) is returned.
fn spawn_piped(cmd: &mut Command, own_group: bool) -> Result<(Child, std::fs::File), String> {
    let program = format!("{:?}", cmd.get_program());
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    // Only our end: the child's end must block, or its writes would fail
    // with EAGAIN whenever the pipe is full.
    let fl = rustix::fs::fcntl_getfl(&r).map_err(|e| format!("pipe: {e}"))?;
    rustix::fs::fcntl_setfl(&r, fl | rustix::fs::OFlags::NONBLOCK).map_err(|e| format!("pipe: {e}"))?;
    let w2 = w.try_clone().map_err(|e| format!("pipe: {e}"))?;
    cmd.stdin(Stdio::null()).stdout(Stdio::from(w)).stderr(Stdio::from(w2));
    if own_group {
        cmd.process_group(0);
    }
    let child = cmd.spawn();
    // The Command holds the write ends; dropping it closes our copies so
    // only the child (and what it forks) holds the pipe.
    drop(std::mem::replace(cmd, Command::new("/")));
    let child = child.map_err(|e| format!("cannot run {program}: {e}"))?;
    Ok((child, std::fs::File::from(r)))
}

/// Waits for `child` to exit, collecting output meanwhile; `None` if the
/// deadline came first (the child's process group is then killed and the
/// child reaped).
fn wait_collecting(
    child: &mut Child,
    out: &mut std::fs::File,
    tail: &mut Tail,
    deadline: Option<Instant>,
) -> Result<Option<ExitStatus>, String> {
    // Readable once the child exits: one poll waits for output, exit and
    // the clock together. Without it (old kernels) we look every TICK.
    let pidfd: Option<OwnedFd> = rustix::process::pidfd_open(Pid::from_child(child), PidfdFlags::empty()).ok();
    let mut pipe_open = true;
    loop {
        if let Some(st) = child.try_wait().map_err(|e| format!("waiting for the command: {e}"))? {
            if pipe_open {
                // What was written before the exit; descendants may hold
                // the pipe open for ever, so no waiting for EOF.
                pump(out, tail, READ_BUDGET);
            }
            return Ok(Some(st));
        }
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if left == Some(Duration::ZERO) {
            // Only a run with a deadline has a group of its own.
            kill_group(child, true);
            return Ok(None);
        }
        let wait = match (&pidfd, left) {
            (Some(_), l) => l,
            (None, l) => Some(l.map_or(TICK, |l| l.min(TICK))),
        };
        let mut fds = Vec::with_capacity(2);
        if pipe_open {
            fds.push(PollFd::new(out, PollFlags::IN));
        }
        if let Some(p) = &pidfd {
            fds.push(PollFd::new(p, PollFlags::IN));
        }
        let ts = wait.map(|w| Timespec::try_from(w).unwrap_or(Timespec { tv_sec: 1, tv_nsec: 0 }));
        match rustix::event::poll(&mut fds, ts.as_ref()) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            // Not expected (ENOMEM); keep to the clock rather than spin.
            Err(_) => std::thread::sleep(TICK),
        }
        let pipe_ready = pipe_open && !fds.first().is_some_and(|f| f.revents().is_empty());
        drop(fds);
        if pipe_ready {
            pipe_open = pump(out, tail, READ_BUDGET);
        }
    }
}

/// SIGKILL to the child and, if it leads one, its whole process group;
/// then reaps the child.
fn kill_group(child: &mut Child, leader: bool) {
    if leader {
        // Not reaped yet, so its pid still names this group and no other.
        let _ = rustix::process::kill_process_group(Pid::from_child(child), Signal::KILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs a command with stdout and stderr merged into one pipe, echoing it
/// to our stderr (the journal) and keeping the last [`TAIL`] bytes. Done
/// when the command exits, whatever still holds its output pipe. With a
/// timeout, the command's process group is killed when it runs out (code
/// `None`). Without one (the console's `nixless rollback`), the command
/// stays in our process group, so Ctrl-C at the terminal reaches it.
pub fn run_captured(cmd: &mut Command, timeout: Option<Duration>) -> (Option<i32>, String) {
    let (mut child, mut out) = match spawn_piped(cmd, timeout.is_some()) {
        Ok(x) => x,
        Err(e) => return (None, e),
    };
    let mut tail = Tail::default();
    let ended = wait_collecting(&mut child, &mut out, &mut tail, timeout.map(|t| Instant::now() + t));
    let mut text = tail.into_text();
    match ended {
        Ok(Some(st)) => (st.code(), text),
        Ok(None) => {
            text.push_str(&format!("\nkilled after {} s", timeout.unwrap_or_default().as_secs()));
            (None, text)
        }
        Err(e) => {
            kill_group(&mut child, timeout.is_some());
            text.push_str(&format!("\n{e}"));
            (None, text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("/bin/sh");
        c.args(["-c", script]);
        c
    }

    fn alive(pid: &str) -> bool {
        // A zombie (reparented, not yet reaped by init) is as good as gone.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(')').and_then(|(_, r)| r.trim_start().chars().next()))
            .is_some_and(|state| state != 'Z' && state != 'X')
    }

    fn wait_gone(pid: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(pid) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    #[test]
    fn exit_ends_the_run_even_when_a_background_child_holds_the_pipe() {
        let tmp = tempfile::tempdir().unwrap();
        let pidf = tmp.path().join("bg.pid");
        let script = format!("sleep 300 & echo $! > {}; echo ok; exit 3", pidf.display());
        let (code, out) = run_captured(&mut sh(&script), Some(Duration::from_secs(60)));
        let bg = std::fs::read_to_string(&pidf).unwrap().trim().to_owned();
        // Decided by the exit, not by the 60 s deadline; the leftover lives.
        assert_eq!(code, Some(3), "{out}");
        assert_eq!(out.trim(), "ok");
        assert!(alive(&bg), "a successful command's leftovers are not killed");
        let _ = rustix::process::kill_process(Pid::from_raw(bg.parse().unwrap()).unwrap(), Signal::KILL);
    }

    #[test]
    fn timeout_kills_the_whole_process_group() {
        let tmp = tempfile::tempdir().unwrap();
        let pidf = tmp.path().join("gc.pid");
        let script = format!("sleep 300 & echo $! > {}; echo started; wait", pidf.display());
        let (code, out) = run_captured(&mut sh(&script), Some(Duration::from_secs(1)));
        assert_eq!(code, None);
        assert!(out.starts_with("started") && out.ends_with("killed after 1 s"), "{out}");
        let gc = std::fs::read_to_string(&pidf).unwrap().trim().to_owned();
        assert!(wait_gone(&gc), "grandchild {gc} survived the timeout");
    }

    #[test]
    fn output_is_bounded_to_the_tail() {
        // 1 MiB of output, more than the pipe holds: read while it runs.
        let script = "head -c 1048576 /dev/zero | tr '\\0' x; echo; echo the-end";
        let (code, out) = run_captured(&mut sh(script), Some(Duration::from_secs(60)));
        assert_eq!(code, Some(0));
        assert_eq!(out.len(), TAIL);
        assert!(out.ends_with("x\nthe-end\n"));
    }

    #[test]
    fn without_a_timeout_a_closed_pipe_still_waits_for_the_exit() {
        let (code, out) = run_captured(&mut sh("echo before; exec >&- 2>&-; sleep 0.3; exit 7"), None);
        assert_eq!((code, out.as_str()), (Some(7), "before\n"));
    }

    #[test]
    fn a_missing_program_is_one_clear_line() {
        let (code, out) = run_captured(&mut Command::new("/nonexistent/prog"), Some(Duration::from_secs(5)));
        assert_eq!(code, None);
        assert!(out.starts_with("cannot run \"/nonexistent/prog\""), "{out}");
    }
}
