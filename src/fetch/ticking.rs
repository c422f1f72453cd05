//! A TCP transport for ureq that never blocks the agent's loop for long.
//!
//! ureq's own `TcpTransport` blocks inside `read(2)`/`write(2)` with socket
//! timeouts; a server that trickles one byte every two seconds keeps each
//! read short of the per-read timeout, and the loop (HTTP server, watchdog)
//! starves for as long as the server likes. Here the socket is non-blocking
//! and every wait — connect, write, read — is a `poll(2)` of at most
//! [`SLICE`]; between slices the thread's tick hook runs (it answers status
//! and feeds the watchdog) and the thread's deadline is checked. TLS sits
//! above this transport (rustls only sees bytes), so `https://` ticks too.
//!
//! The hook and deadline are thread-locals set by a [`Scope`], because
//! ureq requires `Send + Sync` connectors while the agent's tick is an
//! `Rc` over single-threaded state. Not covered: the name lookup
//! (`getaddrinfo` blocks, bounded by the libc resolver's own timeouts).

use std::cell::{Cell, RefCell};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::rc::Rc;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::net::{AddressFamily, SocketFlags, SocketType};
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, Either, LazyBuffers, NextTimeout, ShutdownHandle, Transport,
};
use ureq::{Error, Timeout};

/// Longest single wait before the hook runs again.
pub const SLICE: Duration = Duration::from_millis(50);

/// What runs between slices; `try_borrow_mut` makes a re-entrant call a no-op.
pub type Hook = Rc<RefCell<Box<dyn FnMut()>>>;

thread_local! {
    static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Installs a hook and a deadline for this thread's transfers until dropped;
/// the previous ones come back then (scopes nest).
pub struct Scope {
    hook: Option<Hook>,
    deadline: Option<Instant>,
}

pub fn enter(hook: Option<Hook>, deadline: Option<Instant>) -> Scope {
    let hook = HOOK.with(|h| std::mem::replace(&mut *h.borrow_mut(), hook));
    let deadline = DEADLINE.with(|d| d.replace(deadline));
    Scope { hook, deadline }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let hook = self.hook.take();
        HOOK.with(|h| *h.borrow_mut() = hook);
        DEADLINE.with(|d| d.set(self.deadline));
    }
}

/// Runs the current hook unless it is already running further up the stack.
pub fn run_hook() {
    // Cloned out first: the hook may itself enter a scope.
    let hook = HOOK.with(|h| h.borrow().clone());
    if let Some(hook) = hook {
        if let Ok(mut f) = hook.try_borrow_mut() {
            f();
        }
    }
}

/// Time left before the current deadline; `None` without one.
fn deadline_left() -> Option<Duration> {
    DEADLINE.with(|d| d.get()).map(|t| t.saturating_duration_since(Instant::now()))
}

/// One wait budget: the ureq timeout of this step and the thread's deadline.
struct Budget {
    start: Instant,
    limit: Option<Duration>,
    reason: Timeout,
}

impl Budget {
    fn new(t: NextTimeout) -> Budget {
        let limit = if t.after.is_not_happening() { None } else { Some(*t.after) };
        Budget { start: Instant::now(), limit, reason: t.reason }
    }

    /// What is left of the step's own timeout; `None` without one.
    fn left(&self) -> Option<Duration> {
        self.limit.map(|l| l.saturating_sub(self.start.elapsed()))
    }

    /// Runs the hook, then says how long the next wait may be, or the
    /// timeout that has passed.
    fn next_slice(&self) -> Result<Duration, Error> {
        run_hook();
        let mut slice = SLICE;
        if let Some(left) = deadline_left() {
            if left.is_zero() {
                return Err(Error::Timeout(Timeout::Global));
            }
            slice = slice.min(left);
        }
        if let Some(left) = self.left() {
            if left.is_zero() {
                return Err(Error::Timeout(self.reason));
            }
            slice = slice.min(left);
        }
        Ok(slice)
    }
}

/// Waits up to `d` for `flags` (or an error) on `fd`; whether it came.
fn wait(fd: impl AsFd, flags: PollFlags, d: Duration) -> io::Result<bool> {
    let ts = Timespec::try_from(d).ok();
    match rustix::event::poll(&mut [PollFd::new(&fd, flags)], ts.as_ref()) {
        Ok(n) => Ok(n > 0),
        Err(Errno::INTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Opens non-blocking TCP connections whose waits tick (see the module).
#[derive(Debug, Default)]
pub struct TickingConnector;

impl<In: Transport> Connector<In> for TickingConnector {
    type Out = Either<In, TickingTcp>;

    fn connect(&self, details: &ConnectionDetails, chained: Option<In>) -> Result<Option<Self::Out>, Error> {
        if let Some(c) = chained {
            // A proxy connection made further up the chain.
            return Ok(Some(Either::A(c)));
        }
        let budget = Budget::new(details.timeout);
        let stream = connect_any(&details.addrs, &budget)?;
        if details.config.no_delay() {
            stream.set_nodelay(true)?;
        }
        let stream = Arc::new(stream);
        (details.register_shutdown)(Arc::downgrade(&stream) as Weak<dyn ShutdownHandle>)?;
        let buffers = LazyBuffers::new(details.config.input_buffer_size(), details.config.output_buffer_size());
        Ok(Some(Either::B(TickingTcp { stream, buffers })))
    }
}

/// Tries each address in turn within one budget, each getting an equal
/// share of what is left (so a silent first address, e.g. IPv6 without a
/// route that drops instead of refusing, leaves time for the next); the
/// last error wins.
fn connect_any(addrs: &[SocketAddr], budget: &Budget) -> Result<TcpStream, Error> {
    let mut last = None;
    for (i, addr) in addrs.iter().enumerate() {
        let share = budget.left().map(|left| left / (addrs.len() - i) as u32);
        let mine = Budget { start: Instant::now(), limit: share, reason: Timeout::Connect };
        match connect_one(*addr, &mine) {
            Ok(s) => return Ok(s),
            Err(e @ Error::Timeout(Timeout::Global)) => return Err(e),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| Error::Io(io::Error::new(io::ErrorKind::ConnectionRefused, "no address to connect to"))))
}

fn connect_one(addr: SocketAddr, budget: &Budget) -> Result<TcpStream, Error> {
    let family = if addr.is_ipv4() { AddressFamily::INET } else { AddressFamily::INET6 };
    let fd = rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC, None)
        .map_err(io::Error::from)?;
    match rustix::net::connect(&fd, &addr) {
        Ok(()) => return Ok(TcpStream::from(fd)),
        Err(Errno::INPROGRESS) | Err(Errno::INTR) => {}
        Err(e) => return Err(io::Error::from(e).into()),
    }
    loop {
        if !wait(&fd, PollFlags::OUT, budget.next_slice()?)? {
            continue;
        }
        return match rustix::net::sockopt::socket_error(&fd).map_err(io::Error::from)? {
            Ok(()) => Ok(TcpStream::from(fd)),
            Err(e) => Err(io::Error::from(e).into()),
        };
    }
}

/// A connected non-blocking socket; see the module.
pub struct TickingTcp {
    stream: Arc<TcpStream>,
    buffers: LazyBuffers,
}

impl std::fmt::Debug for TickingTcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TickingTcp").field("peer", &self.stream.peer_addr().ok()).finish()
    }
}

impl Transport for TickingTcp {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), Error> {
        let budget = Budget::new(timeout.for_write());
        let output = &self.buffers.output()[..amount];
        let mut sent = 0;
        while sent < output.len() {
            match (&*self.stream).write(&output[sent..]) {
                Ok(0) => return Err(Error::Io(io::ErrorKind::WriteZero.into())),
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait(&*self.stream, PollFlags::OUT, budget.next_slice()?)?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, Error> {
        let budget = Budget::new(timeout.for_read());
        loop {
            match (&*self.stream).read(self.buffers.input_append_buf()) {
                Ok(n) => {
                    self.buffers.input_appended(n);
                    return Ok(n > 0);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait(&*self.stream, PollFlags::IN, budget.next_slice()?)?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn is_open(&mut self) -> bool {
        // An idle pooled connection must have nothing to say: EOF, stray
        // bytes or an error all mean it cannot carry the next request.
        matches!(self.stream.peek(&mut [0]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::net::{SocketAddrV4, TcpListener};
    use std::os::fd::OwnedFd;

    /// An address whose connects hang: a listener with a full accept queue
    /// (never accepted), so the kernel drops further SYNs. Keep the second
    /// value alive for as long as it must hang.
    pub(crate) fn hanging_addr() -> (SocketAddrV4, (OwnedFd, Vec<TcpStream>)) {
        let listener = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
        rustix::net::bind(&listener, &SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        rustix::net::listen(&listener, 0).unwrap();
        let addr = SocketAddrV4::try_from(rustix::net::getsockname(&listener).unwrap()).unwrap();
        let mut fillers = Vec::new();
        while let Ok(s) = TcpStream::connect_timeout(&addr.into(), Duration::from_millis(300)) {
            fillers.push(s);
            assert!(fillers.len() < 64, "the backlog never filled");
        }
        (addr, (listener, fillers))
    }

    #[test]
    fn a_silent_first_address_leaves_time_for_the_next() {
        let (hanging, _held) = hanging_addr();
        let good = TcpListener::bind("127.0.0.1:0").unwrap();
        let addrs = [SocketAddr::V4(hanging), good.local_addr().unwrap()];
        let budget = Budget { start: Instant::now(), limit: Some(Duration::from_secs(2)), reason: Timeout::Connect };
        let stream = connect_any(&addrs, &budget).unwrap();
        assert_eq!(stream.peer_addr().unwrap(), addrs[1]);
    }

    fn counting_hook() -> (Hook, Rc<Cell<u32>>) {
        let n = Rc::new(Cell::new(0));
        let m = n.clone();
        (Rc::new(RefCell::new(Box::new(move || m.set(m.get() + 1)))), n)
    }

    fn agent() -> ureq::Agent {
        let config = ureq::Agent::config_builder().http_status_as_error(false).build();
        ureq::Agent::with_parts(config, TickingConnector, ureq::unversioned::resolver::DefaultResolver::default())
    }

    #[test]
    fn a_silent_server_ticks_until_the_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/x", listener.local_addr().unwrap());
        // Accepts and says nothing, for as long as the socket lives.
        let held = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
        let (hook, ticks) = counting_hook();
        let _scope = enter(Some(hook), Some(Instant::now() + Duration::from_millis(600)));
        let err = agent().get(&url).call().unwrap_err();
        assert!(matches!(err, Error::Timeout(Timeout::Global)), "{err:?}");
        assert!(ticks.get() >= 3, "only {} ticks", ticks.get());
        drop(held.join());
    }

    #[test]
    fn a_reentrant_tick_is_skipped_and_scopes_nest() {
        let (hook, ticks) = counting_hook();
        let outer = enter(Some(hook.clone()), None);
        {
            let _held = hook.borrow_mut();
            run_hook();
        }
        assert_eq!(ticks.get(), 0);
        {
            let _inner = enter(None, Some(Instant::now()));
            run_hook();
            assert_eq!(deadline_left(), Some(Duration::ZERO));
        }
        run_hook();
        assert_eq!((ticks.get(), deadline_left()), (1, None));
        drop(outer);
    }
}
