//! The agent's seccomp allowlist: installed once the agent has set itself up,
//! after which any system call not listed below kills the whole process
//! with SIGSYS (`kill_process`; systemd then restarts it and the journal
//! shows `code=killed, status=31/SYS`).
//!
//! The filter source is `src/agent/seccomp.json` (seccompiler's JSON
//! format, filter `agent`, x86_64 syscall names). `build.rs` compiles it to
//! BPF at build time, as Firecracker does, so the binary carries the
//! reviewed program and no JSON parser for it. The same rule list serves
//! aarch64: build.rs drops the legacy path calls and `poll`, which the
//! asm-generic table lacks, after checking that the `*at`/`ppoll` rule
//! doing the same operation is allowed unconditionally (its
//! `AARCH64_ABSENT`); it compiles both architectures on every build, so a
//! rule that exists on only one fails the build on either machine. The
//! argument constants (ioctl, fcntl, socket family, PROT_EXEC, SIGABRT) are
//! the same numbers on both; a unit test compares them with the target's
//! libc. JSON has no comments, so the
//! rationale lives here. The list was started from `strace -f` of the musl
//! static binary running `nixless install` (zstd over http, xz and zstd
//! over file://, a no-op reinstall, `verify`) and extended with what the
//! agent loop needs. Rust std on musl uses musl's wrappers, which on x86_64
//! still call the legacy path syscalls (`open`, `stat`, `mkdir`, `rename`,
//! …); rustix calls the `*at` ones directly. Both spellings are allowed
//! where the `*at` form is: `open(p)` is `openat(AT_FDCWD, p)`, so refusing
//! one while allowing the other buys nothing.
//!
//! | group | syscalls | why |
//! |---|---|---|
//! | fd I/O | read write readv writev pread64 lseek close | files, sockets, stderr |
//! | durability | fsync fdatasync syncfs | store paths, state files, their directories |
//! | durability off the loop | clone: flags exactly SIGCHLD (a plain fork: no CLONE_VM, no CLONE_THREAD, no CLONE_VFORK); pipe2 wait4 close_range | a store commit's `syncfs`/`fsync` run in a short-lived child ([`crate::store::flush`]) that closes what it inherited, makes the calls, writes 5 bytes to its pipe and exits; the loop polls the pipe and reaps it. The child inherits this filter and cannot exec |
//! | fd flags | fcntl: F_GETFD F_SETFD F_GETFL F_SETFL F_DUPFD_CLOEXEC only | musl's `open` sets FD_CLOEXEC again; std/rustix nonblocking and `try_clone` |
//! | ioctl | ioctl: TCGETS TIOCGWINSZ FIONBIO only | `isatty` (musl and rustix use TIOCGWINSZ, others TCGETS); std's `connect_timeout` toggles FIONBIO |
//! | file system, `*at` | openat newfstatat fstat statx getdents64 mkdirat renameat renameat2 unlinkat symlinkat linkat readlinkat utimensat fchmod | NAR unpacking (fd-relative), canonical modes and mtime 1, atomic rename into the store (renameat2 RENAME_NOREPLACE), records, GC, profile links |
//! | file system, legacy (x86_64 only: absent from aarch64's table, where musl calls the `*at` form) | open stat lstat mkdir rename unlink rmdir symlink readlink | the same operations through musl (`std::fs`); musl's DNS resolver opens /etc/hosts and /etc/resolv.conf with `open`; sd-notify's `booted()` uses `lstat` |
//! | network | socket (AF_UNIX, AF_INET, AF_INET6 only) connect bind listen accept4 getsockname getpeername setsockopt getsockopt shutdown sendto recvfrom sendmsg recvmsg poll ppoll (aarch64: ppoll only; musl's poll calls it) | HTTP client (ureq: connect with timeout = nonblocking connect + poll + SO_ERROR via getsockopt, SO_RCVTIMEO/SO_SNDTIMEO, TCP_NODELAY) and server (listen/accept4); musl's DNS resolver (UDP socket, bind, sendto/recvfrom, poll; connect+getsockname to sort addresses; TCP fallback with sendmsg/recvmsg); sd_notify (AF_UNIX datagram: connect + send = sendto, sendmsg with fds) |
//! | time | clock_gettime clock_nanosleep nanosleep restart_syscall | timeouts, backoff, watchdog pings (the vDSO usually avoids the syscall; its fallback does not); the kernel restarts an interrupted sleep through restart_syscall |
//! | memory | mmap and mprotect without PROT_EXEC; munmap mremap brk madvise | musl's malloc (brk for metadata, mmap/mremap for large blocks, madvise to return pages); no new executable memory, ever |
//! | signals | rt_sigaction rt_sigprocmask rt_sigreturn sigaltstack; tkill with SIGABRT only | std's runtime (SIGPIPE ignored, stack-overflow handler torn down at exit), signal handlers for SIGTERM; `abort()` after a panic (panic = "abort") raises SIGABRT with tkill |
//! | process | exit exit_group getpid gettid getcwd uname | exiting; sd-notify compares WATCHDOG_PID with getpid; std's panic hook reads the cwd (to shorten backtrace paths) before aborting; hostname |
//! | misc | futex getrandom | std's locks and once-cells (only when contended); HashMap seeds, TLS and key generation |
//!
//! Deliberately absent, so the attempt kills the process: execve execveat,
//! fork vfork clone3, clone with any flag (the agent never execs and never
//! spawns threads; its only process is the flush child above, which cannot
//! exec either; the switch is run by a systemd oneshot unit), ptrace
//! process_vm_*, kill/tgkill (other than the SIGABRT case above), mount
//! umount2 pivot_root chroot, kexec_*, reboot, bpf, perf_event_open,
//! init/finit/delete_module, setuid and friends, chmod/chown on paths,
//! memfd_create, userfaultfd, io_uring_*, keyctl, add_key, socket families
//! other than UNIX/INET/INET6 (netlink, packet), and every ioctl and fcntl
//! command not listed. x32-ABI syscall numbers and foreign architectures
//! match no rule and are killed too (seccompiler checks AUDIT_ARCH).
//!
//! Things that would trip the filter if the code changed: ureq resolves
//! DNS on a helper thread when a resolve, per-call or global timeout is
//! configured (`clone` → SIGSYS); `std::process::Command`, `std::thread`,
//! `std::fs::copy` (copy_file_range/sendfile), `set_permissions` (chmod),
//! `File::set_len` (ftruncate) and epoll are not allowed. To add a syscall:
//! reproduce under `strace -f` with the musl binary, add the narrowest rule
//! to seccomp.json and a row here, and run `tests/seccomp.rs`.
//!
//! `nixless __seccomp-selftest WHAT` (see [`selftest_cli`]) installs the
//! filter in a fresh process and then exercises it; the integration test
//! runs it, since installing the filter inside the test harness would
//! confine the harness itself.

use seccompiler::sock_filter;

/// The compiled `agent` filter: 8-byte little-endian `sock_filter` records
/// written by build.rs for the target architecture; empty on targets
/// other than x86_64 and aarch64.
static AGENT_BPF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp_agent.bpf"));

/// The BPF program compiled from seccomp.json.
pub fn program() -> Result<Vec<sock_filter>, String> {
    if AGENT_BPF.is_empty() {
        return Err(format!(
            "no seccomp filter for this architecture ({}): build.rs compiles src/agent/seccomp.json for x86_64 and aarch64 only",
            std::env::consts::ARCH
        ));
    }
    if AGENT_BPF.len() % 8 != 0 {
        return Err(format!(
            "corrupt seccomp program: {} bytes is not a whole number of instructions",
            AGENT_BPF.len()
        ));
    }
    Ok(AGENT_BPF
        .chunks_exact(8)
        .map(|r| sock_filter {
            code: u16::from_le_bytes([r[0], r[1]]),
            jt: r[2],
            jf: r[3],
            k: u32::from_le_bytes([r[4], r[5], r[6], r[7]]),
        })
        .collect())
}

/// Sets no_new_privs and installs the allowlist on every thread of the
/// process (TSYNC; the agent has one). Irreversible: call it once set-up
/// is done.
pub fn install() -> Result<(), String> {
    let prog = program()?;
    seccompiler::apply_filter_all_threads(&prog).map_err(|e| format!("installing seccomp filter: {e}"))
}

/// Dispatcher for the hidden `nixless __seccomp-selftest WHAT [ARGS...]`
/// subcommand; `args` are the arguments after `__seccomp-selftest`.
/// `WHAT` is one of [`selftest`]'s words, or `install [--] ARGS...`, which
/// installs the filter and then passes ARGS (the arguments of `nixless
/// install`, without the word `install`) to `run_install`, the CLI's
/// install entry point (`crate::cli::run_install_args`).
pub fn selftest_cli(args: &[String], run_install: fn(&[String]) -> i32) -> i32 {
    match args.first().map(String::as_str) {
        Some("install") => {
            let rest = &args[1..];
            let rest = match rest.first() {
                Some(a) if a == "--" => &rest[1..],
                _ => rest,
            };
            if let Err(e) = install() {
                eprintln!("nixless: error: {e}");
                return 2;
            }
            run_install(rest)
        }
        Some(what) if args.len() == 1 => selftest(what),
        _ => {
            eprintln!(
                "usage: nixless __seccomp-selftest allowed|panic|execve|spawn|fork|clone|ptrace|\
                 socket-netlink|ioctl-other|mmap-exec | install [--] INSTALL-ARGS..."
            );
            2
        }
    }
}

/// Installs the filter, then does `what`:
/// - `allowed`: what the agent does (files, TCP and UDP on loopback, a
///   refused connect, an AF_UNIX datagram, /etc/hosts lookup, clocks,
///   sleeping, big allocations, HashMap seeding, isatty); 0 if all of it
///   ran, 1 if something failed with an error.
/// - `panic`: panics; with panic = "abort" (release) the process must die
///   of SIGABRT, not SIGSYS (the panic hook and abort() are allowed).
/// - a forbidden call: `execve` (exec /bin/true in place), `spawn`
///   (`Command::status`: killed at its first unlisted call, pipe2 or
///   clone/vfork), `fork` (clone3 on aarch64, which has no fork), `clone`
///   (with CLONE_VM|CLONE_VFORK, as posix_spawn: only a plain fork is allowed), `ptrace`
///   (PTRACE_TRACEME), `socket-netlink` (a family not allowed),
///   `ioctl-other` (FIONREAD, a request not allowed), `mmap-exec`
///   (PROT_EXEC). The process must die of SIGSYS; returns 1 if the call
///   came back instead.
///
/// 2: unknown word or the filter could not be installed.
pub fn selftest(what: &str) -> i32 {
    const FORBIDDEN: &[&str] =
        &["execve", "spawn", "fork", "clone", "ptrace", "socket-netlink", "ioctl-other", "mmap-exec"];
    if what != "allowed" && what != "panic" && !FORBIDDEN.contains(&what) {
        eprintln!("nixless: error: unknown seccomp selftest {what:?}");
        return 2;
    }
    if let Err(e) = install() {
        eprintln!("nixless: error: {e}");
        return 2;
    }
    if what == "panic" {
        panic!("seccomp selftest: deliberate panic under the filter");
    }
    if what == "allowed" {
        return match exercise_allowed() {
            Ok(()) => {
                eprintln!("seccomp selftest: allowed operations ok");
                0
            }
            Err(e) => {
                eprintln!("seccomp selftest: allowed operation failed: {e}");
                1
            }
        };
    }
    let outcome = forbidden(what);
    eprintln!("seccomp selftest: forbidden {what} was not killed: {outcome}");
    1
}

/// Performs a forbidden call; only returns if the filter let it through.
fn forbidden(what: &str) -> String {
    use std::os::unix::process::CommandExt;
    match what {
        "execve" => format!("{}", std::process::Command::new("/bin/true").exec()),
        "spawn" => format!("{:?}", std::process::Command::new("/bin/true").status()),
        "socket-netlink" => format!(
            "{:?}",
            rustix::net::socket(rustix::net::AddressFamily::NETLINK, rustix::net::SocketType::RAW, None)
        ),
        _ => raw::forbidden(what),
    }
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod raw {
    /// A raw system call; used only for calls std and rustix do not offer
    /// (fork, clone, ptrace) or refuse to make (arbitrary ioctl, executable
    /// mmap), to prove the filter kills them.
    #[cfg(target_arch = "x86_64")]
    unsafe fn syscall6(nr: usize, a: [usize; 6]) -> isize {
        let ret: isize;
        // SAFETY: the caller passes arguments valid for `nr`.
        unsafe {
            core::arch::asm!(
                "syscall",
                inlateout("rax") nr as isize => ret,
                in("rdi") a[0], in("rsi") a[1], in("rdx") a[2],
                in("r10") a[3], in("r8") a[4], in("r9") a[5],
                lateout("rcx") _, lateout("r11") _,
                options(nostack),
            );
        }
        ret
    }

    #[cfg(target_arch = "aarch64")]
    unsafe fn syscall6(nr: usize, a: [usize; 6]) -> isize {
        let ret: isize;
        // SAFETY: the caller passes arguments valid for `nr`.
        unsafe {
            core::arch::asm!(
                "svc 0",
                in("x8") nr,
                inlateout("x0") a[0] as isize => ret,
                in("x1") a[1], in("x2") a[2], in("x3") a[3], in("x4") a[4], in("x5") a[5],
                options(nostack),
            );
        }
        ret
    }

    // arch/x86/entry/syscalls/syscall_64.tbl
    #[cfg(target_arch = "x86_64")]
    mod nr {
        pub const MMAP: usize = 9;
        pub const IOCTL: usize = 16;
        pub const CLONE: usize = 56;
        pub const FORK: usize = 57;
        pub const PTRACE: usize = 101;
        pub const EXIT_GROUP: usize = 231;
    }

    // include/uapi/asm-generic/unistd.h. There is no fork here: the
    // `fork` selftest makes a process with clone3 instead, the call
    // glibc's posix_spawn and pthread_create use.
    #[cfg(target_arch = "aarch64")]
    mod nr {
        pub const MMAP: usize = 222;
        pub const IOCTL: usize = 29;
        pub const CLONE: usize = 220;
        pub const FORK: usize = 435; // clone3
        pub const PTRACE: usize = 117;
        pub const EXIT_GROUP: usize = 94;
    }

    // The same on both (asm-generic signal and ioctl numbers).
    const SIGCHLD: usize = 17;
    const CLONE_VM: usize = 0x100;
    const CLONE_VFORK: usize = 0x4000;
    const FIONREAD: usize = 0x541b;

    pub(super) fn forbidden(what: &str) -> String {
        let mut n: i32 = 0;
        // clone3's struct clone_args, first version (64 bytes): flags 0,
        // exit_signal SIGCHLD: a plain fork.
        let clone_args: [u64; 8] = [0, 0, 0, 0, SIGCHLD as u64, 0, 0, 0];
        let (nr, args) = match what {
            "fork" if cfg!(target_arch = "aarch64") => {
                (nr::FORK, [clone_args.as_ptr() as usize, core::mem::size_of_val(&clone_args), 0, 0, 0, 0])
            }
            "fork" => (nr::FORK, [0; 6]),
            // clone(CLONE_VM|CLONE_VFORK|SIGCHLD, NULL, ...), as posix_spawn
            // (the parent waits while the child runs on its stack, so were
            // it allowed the child would exit at once harmlessly). A plain
            // fork, clone(SIGCHLD), is allowed: the flush child.
            "clone" => (nr::CLONE, [CLONE_VM | CLONE_VFORK | SIGCHLD, 0, 0, 0, 0, 0]),
            // PTRACE_TRACEME: harmless if it were allowed.
            "ptrace" => (nr::PTRACE, [0; 6]),
            "ioctl-other" => (nr::IOCTL, [2, FIONREAD, &mut n as *mut i32 as usize, 0, 0, 0]),
            // PROT_READ|PROT_EXEC, MAP_PRIVATE|MAP_ANONYMOUS, fd -1.
            "mmap-exec" => (nr::MMAP, [0, 4096, 1 | 4, 0x02 | 0x20, usize::MAX, 0]),
            _ => return format!("no such selftest {what:?}"),
        };
        // SAFETY: every argument set above is valid for its call; a forked
        // child exits at once without touching the parent's state.
        let ret = unsafe { syscall6(nr, args) };
        if ret == 0 && (nr == nr::FORK || nr == nr::CLONE) {
            // SAFETY: exit_group never returns.
            unsafe { syscall6(nr::EXIT_GROUP, [0; 6]) };
        }
        format!("raw syscall {nr} returned {ret}")
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
mod raw {
    pub(super) fn forbidden(what: &str) -> String {
        format!("{what}: not implemented on this architecture")
    }
}

/// What the agent does under the filter, each step its own error context.
fn exercise_allowed() -> Result<(), String> {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
    use std::os::unix::net::UnixDatagram;
    use std::time::{Duration, Instant, SystemTime};

    fn ctx<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> Result<T, String> {
        r.map_err(|e| format!("{what}: {e}"))
    }

    // Clocks and sleeping.
    let t0 = Instant::now();
    ctx("SystemTime", SystemTime::now().duration_since(SystemTime::UNIX_EPOCH))?;
    std::thread::sleep(Duration::from_millis(2));
    if t0.elapsed() < Duration::from_millis(2) {
        return Err("sleep returned early".into());
    }

    // Files: std (musl's legacy calls) and rustix (*at calls).
    let stat = ctx("read /proc/self/stat", std::fs::read_to_string("/proc/self/stat"))?;
    if stat.is_empty() {
        return Err("empty /proc/self/stat".into());
    }
    let fd = ctx(
        "openat /proc/self/status",
        rustix::fs::openat(
            rustix::fs::CWD,
            "/proc/self/status",
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        ),
    )?;
    let mut buf = [0u8; 64];
    ctx("read /proc/self/status", rustix::io::read(&fd, &mut buf))?;
    let dir = std::env::temp_dir().join(format!("nixless-seccomp-{}", std::process::id()));
    ctx("mkdir", std::fs::create_dir_all(&dir))?;
    let tmp = dir.join("f.tmp");
    {
        let mut f = ctx("create", std::fs::File::create(&tmp))?;
        ctx("write", f.write_all(b"state"))?;
        ctx("fsync", f.sync_all())?;
    }
    ctx("rename", std::fs::rename(&tmp, dir.join("f")))?;
    ctx("read back", std::fs::read(dir.join("f")))?;
    ctx("read_dir", std::fs::read_dir(&dir).map(|d| d.count()))?;

    // A store commit's flush, in its child: pipe, fork, close_range, the
    // calls, the result, reaping.
    {
        use crate::store::flush::{Flush, Op};
        use rustix::fd::AsFd;
        let d = ctx("open dir", std::fs::File::open(&dir))?;
        let ops = [Op::Syncfs(d.as_fd()), Op::Fsync(d.as_fd())];
        let f = ctx("start flush", Flush::start("selftest", &ops, Duration::from_secs(60)))?;
        ctx("flush", f.wait())?;
    }

    // AF_UNIX datagram, as sd_notify sends it.
    let sock_path = dir.join("notify");
    let server = ctx("bind unix", UnixDatagram::bind(&sock_path))?;
    let client = ctx("unix socket", UnixDatagram::unbound())?;
    ctx("connect unix", client.connect(&sock_path))?;
    ctx("send unix", client.send(b"READY=1"))?;
    let n = ctx("recv unix", server.recv(&mut buf))?;
    if &buf[..n] != b"READY=1" {
        return Err("unix datagram garbled".into());
    }
    drop((server, client));
    ctx("cleanup", std::fs::remove_dir_all(&dir))?;

    // TCP: listener, connect with timeout, accept, both directions.
    let listener = ctx("bind tcp", TcpListener::bind("127.0.0.1:0"))?;
    let addr = ctx("local_addr", listener.local_addr())?;
    let mut c = ctx("connect tcp", TcpStream::connect_timeout(&addr, Duration::from_secs(5)))?;
    ctx("nodelay", c.set_nodelay(true))?;
    ctx("read timeout", c.set_read_timeout(Some(Duration::from_secs(5))))?;
    let (mut s, peer) = ctx("accept", listener.accept())?;
    ctx("peer_addr", s.peer_addr())?;
    ctx("tcp write", c.write_all(b"ping"))?;
    ctx("tcp read", s.read_exact(&mut buf[..4]))?;
    ctx("tcp write back", s.write_all(b"pong"))?;
    ctx("tcp read back", c.read_exact(&mut buf[..4]))?;
    if &buf[..4] != b"pong" || peer.ip() != addr.ip() {
        return Err("tcp round trip garbled".into());
    }
    ctx("shutdown", c.shutdown(std::net::Shutdown::Both))?;
    drop((c, s, listener));

    // A refused connect: the error path (poll, SO_ERROR) must not be fatal.
    let closed = {
        let l = ctx("bind tcp", TcpListener::bind("127.0.0.1:0"))?;
        ctx("local_addr", l.local_addr())?
    };
    if TcpStream::connect_timeout(&closed, Duration::from_secs(5)).is_ok() {
        return Err("connect to a closed port succeeded".into());
    }
    if let Ok(l6) = TcpListener::bind("[::1]:0") {
        drop(l6); // no IPv6 loopback is fine; the socket call itself is allowed
    }

    // UDP, as musl's resolver does it, and a hosts lookup.
    let u = ctx("bind udp", UdpSocket::bind("127.0.0.1:0"))?;
    let ua = ctx("udp local_addr", u.local_addr())?;
    ctx("udp timeout", u.set_read_timeout(Some(Duration::from_secs(5))))?;
    ctx("udp send", u.send_to(b"q", ua))?;
    ctx("udp recv", u.recv_from(&mut buf))?;
    let _ = "localhost:80".to_socket_addrs().map(|a| a.count());

    // Memory: a large block grown in place or moved, then freed.
    let mut v: Vec<u8> = Vec::with_capacity(1 << 20);
    v.resize(32 << 20, 1);
    v.resize(64 << 20, 2);
    if v[(48 << 20) + 1] != 2 {
        return Err("memory garbled".into());
    }
    drop(v);

    // Random seeds, terminal checks.
    let mut m = std::collections::HashMap::new();
    m.insert("k", 1);
    let _ = rustix::termios::isatty(std::io::stderr());
    let _ = std::io::IsTerminal::is_terminal(&std::io::stderr());
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The argument constants of the rules (build.rs lists them by the name
    /// their comment gives), with the target libc's value for that name:
    /// seccomp.json holds one number per constant for every architecture,
    /// so each must mean the same thing on each (it does: x86_64 and
    /// aarch64 share the asm-generic ioctl, fcntl, socket, mmap and signal
    /// numbers; a future architecture where they differ fails here, when
    /// this test runs for it).
    fn target_values() -> Vec<(&'static str, u64)> {
        // libc's types differ per target (an ioctl request is c_ulong on
        // glibc, c_int on musl); a negative value cannot match.
        fn n<T: TryInto<u64>>(v: T) -> u64 {
            v.try_into().unwrap_or(u64::MAX)
        }
        vec![
            ("F_GETFD", n(libc::F_GETFD)),
            ("F_SETFD", n(libc::F_SETFD)),
            ("F_GETFL", n(libc::F_GETFL)),
            ("F_SETFL", n(libc::F_SETFL)),
            ("F_DUPFD_CLOEXEC", n(libc::F_DUPFD_CLOEXEC)),
            ("TCGETS", n(libc::TCGETS)),
            ("TIOCGWINSZ", n(libc::TIOCGWINSZ)),
            ("FIONBIO", n(libc::FIONBIO)),
            ("AF_UNIX", n(libc::AF_UNIX)),
            ("AF_INET", n(libc::AF_INET)),
            ("AF_INET6", n(libc::AF_INET6)),
            ("PROT_EXEC", n(libc::PROT_EXEC)),
            ("SIGABRT", n(libc::SIGABRT)),
            ("SIGCHLD", n(libc::SIGCHLD)),
        ]
    }

    #[test]
    fn rule_constants_are_the_target_libc_values() {
        let listed = include_str!(concat!(env!("OUT_DIR"), "/seccomp_consts.txt"));
        let known = target_values();
        let mut seen = Vec::new();
        for line in listed.lines() {
            let (name, value) = line.split_once(' ').expect("NAME VALUE");
            let value: u64 = value.parse().expect("numeric value");
            let expected = known.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
            let expected = expected.unwrap_or_else(|| panic!("seccomp.json uses {name}: add its libc value here"));
            assert_eq!(
                value,
                expected,
                "{name} is {value} in seccomp.json but {expected} on {}",
                std::env::consts::ARCH
            );
            seen.push(name);
        }
        let unused: Vec<_> = known.iter().filter(|(n, _)| !seen.contains(n)).collect();
        assert!(unused.is_empty(), "no rule uses {unused:?}");
    }

    /// The filter exists for the architecture the tests were built for
    /// (before build.rs compiled per target, aarch64 had none and the agent
    /// refused to start there).
    #[test]
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn filter_compiled_for_this_target() {
        let prog = super::program().unwrap_or_else(|e| panic!("{e}"));
        // Arch check, syscall load, one jump per allowed syscall at least.
        assert!(prog.len() > 60 && prog.len() <= 4096, "{} instructions", prog.len());
        // The first instructions load seccomp_data.arch and compare it with
        // this architecture's AUDIT_ARCH value: the program is for this target.
        let audit_arch: u32 = if cfg!(target_arch = "aarch64") { 0xc000_00b7 } else { 0xc000_003e };
        assert!(prog.iter().take(4).any(|i| i.k == audit_arch), "no AUDIT_ARCH check for {}", std::env::consts::ARCH);
    }
}
