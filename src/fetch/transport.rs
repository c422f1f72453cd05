//! A TCP transport for ureq whose every wait ends at the call's deadline.
//!
//! ureq's own `TcpTransport` blocks inside `read(2)`/`write(2)` with socket
//! timeouts; a server that trickles one byte every two seconds keeps each
//! read short of the per-read timeout, for as long as it likes. Here the
//! socket is non-blocking and every wait — connect, write, read — is a
//! `poll(2)` bounded by the step's own timeout and the thread's deadline.
//! TLS sits above this transport (rustls only sees bytes), so `https://`
//! ends there too. Only the admin commands use it ([`super::Fetcher`], and
//! `deploy`/`status` through [`super::http_agent`]): the agent's loop and
//! `nixless install` go through the network engine.
//!
//! The deadline is a thread-local set by a [`Scope`], because ureq's
//! connectors are shared (`Send + Sync`) while a deadline belongs to one
//! call. Not covered: the name lookup (`getaddrinfo` blocks, bounded by
//! the libc resolver's own timeouts).

use std::cell::Cell;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::net::{AddressFamily, SocketFlags, SocketType};
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, Either, LazyBuffers, NextTimeout, ShutdownHandle, Transport,
};
use ureq::{Error, Timeout};

thread_local! {
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Sets this thread's deadline for transfers until dropped; the previous
/// one comes back then (scopes nest).
pub struct Scope {
    deadline: Option<Instant>,
}

pub fn enter(deadline: Option<Instant>) -> Scope {
    Scope { deadline: DEADLINE.with(|d| d.replace(deadline)) }
}

impl Drop for Scope {
    fn drop(&mut self) {
        DEADLINE.with(|d| d.set(self.deadline));
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

    /// How long the next wait may be (`None`: for ever), or the timeout
    /// that has passed.
    fn next_slice(&self) -> Result<Option<Duration>, Error> {
        let mut slice: Option<Duration> = None;
        let mut cap = |left: Duration| slice = Some(slice.map_or(left, |s| s.min(left)));
        if let Some(left) = deadline_left() {
            if left.is_zero() {
                return Err(Error::Timeout(Timeout::Global));
            }
            cap(left);
        }
        if let Some(left) = self.left() {
            if left.is_zero() {
                return Err(Error::Timeout(self.reason));
            }
            cap(left);
        }
        Ok(slice)
    }
}

/// Waits up to `d` (`None`: for ever) for `flags` (or an error) on `fd`;
/// whether it came.
fn wait(fd: impl AsFd, flags: PollFlags, d: Option<Duration>) -> io::Result<bool> {
    let ts = d.and_then(|d| Timespec::try_from(d).ok());
    match rustix::event::poll(&mut [PollFd::new(&fd, flags)], ts.as_ref()) {
        Ok(n) => Ok(n > 0),
        Err(Errno::INTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Opens non-blocking TCP connections whose waits end at the deadline (see the module).
#[derive(Debug, Default)]
pub struct DeadlineConnector;

impl<In: Transport> Connector<In> for DeadlineConnector {
    type Out = Either<In, DeadlineTcp>;

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
        Ok(Some(Either::B(DeadlineTcp { stream, buffers })))
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
pub struct DeadlineTcp {
    stream: Arc<TcpStream>,
    buffers: LazyBuffers,
}

impl std::fmt::Debug for DeadlineTcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadlineTcp").field("peer", &self.stream.peer_addr().ok()).finish()
    }
}

impl Transport for DeadlineTcp {
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

    fn agent() -> ureq::Agent {
        let config = ureq::Agent::config_builder().http_status_as_error(false).build();
        ureq::Agent::with_parts(config, DeadlineConnector, ureq::unversioned::resolver::DefaultResolver::default())
    }

    #[test]
    fn a_silent_server_ends_at_the_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/x", listener.local_addr().unwrap());
        // Accepts and says nothing, for as long as the socket lives.
        let held = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
        let start = Instant::now();
        let _scope = enter(Some(start + Duration::from_millis(600)));
        let err = agent().get(&url).call().unwrap_err();
        assert!(matches!(err, Error::Timeout(Timeout::Global)), "{err:?}");
        // ureq's own timeouts are 30 s and more: the deadline ended it.
        assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
        drop(held.join());
    }

    #[test]
    fn scopes_nest() {
        let outer = enter(None);
        {
            let _inner = enter(Some(Instant::now()));
            assert_eq!(deadline_left(), Some(Duration::ZERO));
        }
        assert_eq!(deadline_left(), None);
        drop(outer);
    }
}
