//! A name lookup that never blocks the loop: what musl's `getaddrinfo`
//! does for a static binary (the `hosts` file, then A and AAAA queries over
//! UDP to every `resolv.conf` nameserver at once, search domains, a total
//! deadline of `timeout` with `attempts` sends), as a state machine the
//! engine polls with its connections. `getaddrinfo` itself blocks for the
//! resolver's whole timeout (5 s by default, longer with search domains)
//! when a nameserver does not answer, and the agent's status and watchdog
//! would wait with it.
//!
//! A datagram counts only if it comes from a nameserver we asked, carries
//! the (random) id of a query still open and repeats its question
//! ([`super::dns::parse_reply`]); anything else is dropped. Each round
//! reads at most 64 datagrams of at most 1232 bytes (a flood costs a
//! bounded amount per round), and the lookup ends at its deadline whatever
//! arrives.

use super::dns::{self, Reply, ResolvConf};
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Where the resolver's configuration comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files {
    pub resolv_conf: PathBuf,
    pub hosts: PathBuf,
    /// The nameservers' port: 53 (`resolv.conf` cannot name another; tests can).
    pub port: u16,
}

impl Default for Files {
    fn default() -> Self {
        Files { resolv_conf: "/etc/resolv.conf".into(), hosts: "/etc/hosts".into(), port: 53 }
    }
}

/// Largest configuration file read (musl reads lines of 256 bytes; a hosts
/// file of an appliance is small).
const MAX_FILE: u64 = 1 << 20;
/// A UDP DNS reply without EDNS is at most 512 bytes; more is read and cut.
const MAX_DATAGRAM: usize = 1232;
const MAX_DATAGRAMS_PER_ROUND: usize = 64;

fn read_small(path: &std::path::Path) -> String {
    use std::io::Read;
    let mut s = String::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(MAX_FILE).read_to_string(&mut s);
    }
    s
}

struct Query {
    qtype: u16,
    id: u16,
    /// `Some`: answered (addresses, maybe none).
    answer: Option<Vec<IpAddr>>,
}

pub struct Lookup {
    host: String,
    port: u16,
    conf: ResolvConf,
    candidates: Vec<String>,
    /// The candidate being asked for.
    at: usize,
    queries: [Query; 2],
    v4: Option<UdpSocket>,
    v6: Option<UdpSocket>,
    next_send: Instant,
    deadline: Instant,
    result: Option<Result<Vec<SocketAddr>, String>>,
}

fn random_id() -> u16 {
    // SipHash keyed from the OS's randomness (std seeds it with getrandom).
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish() as u16
}

impl Lookup {
    /// Starts looking `host` up for connections to `port`. An address
    /// literal or a `hosts` entry is done at once.
    pub fn start(host: &str, port: u16, files: &Files, now: Instant) -> Lookup {
        let conf = dns::parse_resolv_conf(&read_small(&files.resolv_conf), files.port);
        let mut l = Lookup {
            host: crate::text::clip(host, 128),
            port,
            candidates: Vec::new(),
            at: 0,
            queries: [
                Query { qtype: dns::TYPE_AAAA, id: 0, answer: None },
                Query { qtype: dns::TYPE_A, id: 0, answer: None },
            ],
            v4: None,
            v6: None,
            next_send: now,
            deadline: now + conf.timeout,
            conf,
            result: None,
        };
        if let Ok(ip) = host.parse::<IpAddr>() {
            l.result = Some(Ok(vec![SocketAddr::new(ip, port)]));
            return l;
        }
        match dns::candidates(host, &l.conf) {
            Err(e) => l.result = Some(Err(e.to_string())),
            Ok(c) => {
                let from_hosts = dns::hosts_lookup(&read_small(&files.hosts), c.last().map_or("", |s| s.as_str()));
                if !from_hosts.is_empty() {
                    l.result = Some(Ok(order(&from_hosts, port)));
                    return l;
                }
                l.candidates = c;
                l.begin_candidate(now);
                l.advance(now);
            }
        }
        l
    }

    fn begin_candidate(&mut self, now: Instant) {
        for q in &mut self.queries {
            q.id = random_id();
            q.answer = None;
        }
        if self.queries[0].id == self.queries[1].id {
            self.queries[1].id = self.queries[0].id.wrapping_add(1);
        }
        self.next_send = now;
        self.deadline = now + self.conf.timeout;
    }

    /// The result, once there is one (taken: a second call gives `None`).
    pub fn take_result(&mut self) -> Option<Result<Vec<SocketAddr>, String>> {
        self.result.take()
    }

    pub fn is_done(&self) -> bool {
        self.result.is_some()
    }

    /// The sockets to poll for reading.
    pub fn fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.v4.iter().chain(self.v6.iter()).map(|s| s.as_fd())
    }

    /// When [`Lookup::advance`] must run again at the latest.
    pub fn next_wakeup(&self) -> Option<Instant> {
        (self.result.is_none()).then(|| self.next_send.min(self.deadline))
    }

    /// Reads what arrived, sends again when due, ends at the deadline.
    pub fn advance(&mut self, now: Instant) {
        if self.result.is_some() {
            return;
        }
        self.receive();
        if self.queries.iter().all(|q| q.answer.is_some()) {
            return self.candidate_done(now, false);
        }
        if now >= self.deadline {
            return self.candidate_done(now, true);
        }
        if now >= self.next_send {
            self.send();
            // musl: the timeout is split between the attempts.
            let interval = (self.conf.timeout / self.conf.attempts.max(1)).max(Duration::from_millis(100));
            self.next_send = now + interval;
        }
    }

    fn socket(&mut self, v6: bool) -> Option<&UdpSocket> {
        let slot = if v6 { &mut self.v6 } else { &mut self.v4 };
        if slot.is_none() {
            let s = UdpSocket::bind(any_addr(v6)).ok()?;
            s.set_nonblocking(true).ok()?;
            *slot = Some(s);
        }
        slot.as_ref()
    }

    fn send(&mut self) {
        let name = self.candidates[self.at].clone();
        let servers = self.conf.nameservers.clone();
        let queries: Vec<Vec<u8>> =
            self.queries.iter().filter(|q| q.answer.is_none()).map(|q| dns::query(q.id, &name, q.qtype)).collect();
        for server in servers {
            let Some(sock) = self.socket(server.is_ipv6()) else { continue };
            for q in &queries {
                // A full socket buffer or an unreachable server: the next
                // send or another server covers it.
                let _ = sock.send_to(q, server);
            }
        }
    }

    fn receive(&mut self) {
        let mut buf = [0u8; MAX_DATAGRAM];
        let name = self.candidates[self.at].clone();
        for _ in 0..MAX_DATAGRAMS_PER_ROUND {
            let got =
                [self.v4.as_ref(), self.v6.as_ref()].into_iter().flatten().find_map(|s| s.recv_from(&mut buf).ok());
            let Some((n, from)) = got else { return };
            if !self.conf.nameservers.contains(&from) {
                continue;
            }
            for q in self.queries.iter_mut().filter(|q| q.answer.is_none()) {
                match dns::parse_reply(&buf[..n], q.id, &name, q.qtype) {
                    Ok(Reply::Addrs(a)) => q.answer = Some(a),
                    Ok(Reply::NoSuchName) => q.answer = Some(Vec::new()),
                    // SERVFAIL, REFUSED, truncated: another server or the
                    // next send may answer.
                    Ok(Reply::Failed(_)) | Err(_) => {}
                }
            }
        }
    }

    /// Both queries answered (or the deadline passed): the addresses, or
    /// the next candidate name, or the end.
    fn candidate_done(&mut self, now: Instant, timed_out: bool) {
        let addrs: Vec<IpAddr> = self.queries.iter().filter_map(|q| q.answer.as_ref()).flatten().copied().collect();
        if !addrs.is_empty() {
            self.result = Some(Ok(order(&addrs, self.port)));
            return;
        }
        if self.at + 1 < self.candidates.len() && !timed_out {
            self.at += 1;
            self.begin_candidate(now);
            return self.advance(now);
        }
        self.result = Some(Err(if timed_out && self.queries.iter().all(|q| q.answer.is_none()) {
            let servers: Vec<String> = self.conf.nameservers.iter().map(|s| s.to_string()).collect();
            format!("{}: no answer from {} within {} s", self.host, servers.join(", "), self.conf.timeout.as_secs())
        } else {
            format!("{}: no such host", self.host)
        }));
    }
}

/// The unspecified address of a family, any port: what a UDP socket binds.
fn any_addr(v6: bool) -> SocketAddr {
    if v6 {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    }
}

/// Addresses with a route first (RFC 6724 rule 1: a UDP `connect` sends
/// nothing but fails without a route), IPv6 before IPv4 among them (as
/// musl's precedence does), the rest after, as a last resort.
fn order(addrs: &[IpAddr], port: u16) -> Vec<SocketAddr> {
    let routable = |ip: &IpAddr| UdpSocket::bind(any_addr(ip.is_ipv6())).and_then(|s| s.connect((*ip, port))).is_ok();
    let mut keyed: Vec<(u8, SocketAddr)> = addrs
        .iter()
        .map(|ip| (u8::from(!routable(ip)) * 2 + u8::from(ip.is_ipv4()), SocketAddr::new(*ip, port)))
        .collect();
    keyed.sort_by_key(|(k, _)| *k);
    keyed.dedup_by_key(|(_, a)| *a);
    keyed.into_iter().map(|(_, a)| a).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn files(dir: &std::path::Path, resolv: &str, hosts: &str, port: u16) -> Files {
        let f = Files { resolv_conf: dir.join("resolv.conf"), hosts: dir.join("hosts"), port };
        std::fs::File::create(&f.resolv_conf).unwrap().write_all(resolv.as_bytes()).unwrap();
        std::fs::File::create(&f.hosts).unwrap().write_all(hosts.as_bytes()).unwrap();
        f
    }

    fn run(mut l: Lookup) -> Result<Vec<SocketAddr>, String> {
        // Bounded: the lookup's own deadline ends it.
        for _ in 0..100_000 {
            if let Some(r) = l.take_result() {
                return r;
            }
            std::thread::sleep(Duration::from_millis(2));
            l.advance(Instant::now());
        }
        panic!("the lookup never ended");
    }

    #[test]
    fn literals_and_hosts_need_no_server() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path(), "nameserver 127.0.0.1\n", "10.1.2.3 cache.lan cache\n127.0.0.1 localhost\n", 9);
        let now = Instant::now();
        assert_eq!(run(Lookup::start("::1", 80, &f, now)).unwrap(), ["[::1]:80".parse().unwrap()]);
        assert_eq!(run(Lookup::start("cache", 8080, &f, now)).unwrap(), ["10.1.2.3:8080".parse().unwrap()]);
        assert_eq!(run(Lookup::start("localhost", 1, &f, now)).unwrap(), ["127.0.0.1:1".parse().unwrap()]);
        let e = run(Lookup::start("bad name", 1, &f, now)).unwrap_err();
        assert!(e.contains("not a host name"), "{e}");
    }

    /// A nameserver that reads the queries and never answers: the lookup
    /// sends `attempts` times and ends at its deadline with one line.
    #[test]
    fn a_silent_nameserver_ends_at_the_deadline() {
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        silent.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let port = silent.local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path(), "nameserver 127.0.0.1\noptions timeout:1 attempts:2\n", "", port);
        let start = Instant::now();
        let l = Lookup::start("cache.example.org", 443, &f, start);
        assert!(!l.is_done() && l.fds().count() == 1);
        let mut buf = [0u8; 512];
        let (n, _) = silent.recv_from(&mut buf).unwrap();
        assert!(n > 12, "a query arrived");
        let e = run(l).unwrap_err();
        assert_eq!(e, format!("cache.example.org: no answer from 127.0.0.1:{port} within 1 s"));
        assert!(start.elapsed() >= Duration::from_secs(1));
    }

    /// A fake server answering from the wrong id first (dropped), then the
    /// right one; NXDOMAIN for AAAA.
    #[test]
    fn only_the_answer_to_our_question_counts() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let port = server.local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path(), "nameserver 127.0.0.1\noptions timeout:5\n", "", port);
        let mut l = Lookup::start("cache.example.org", 443, &f, Instant::now());
        let mut answered = 0;
        let mut buf = [0u8; 512];
        while answered < 2 {
            let (n, from) = server.recv_from(&mut buf).unwrap();
            let q = &buf[..n];
            let qtype = u16::from_be_bytes([q[n - 4], q[n - 3]]);
            let mut r = q.to_vec();
            r[2] = 0x81;
            r[3] = 0x80;
            if qtype == dns::TYPE_A {
                // First a forgery with another id, then the answer.
                let mut forged = r.clone();
                forged[0] ^= 0xff;
                r[7] = 1;
                r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 0, 0, 7]);
                forged[7] = 1;
                forged.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 6, 6, 6, 6]);
                server.send_to(&forged, from).unwrap();
            } else {
                r[3] = 0x83;
            }
            server.send_to(&r, from).unwrap();
            answered += 1;
            l.advance(Instant::now());
        }
        assert_eq!(run(l).unwrap(), ["10.0.0.7:443".parse().unwrap()]);
    }
}
