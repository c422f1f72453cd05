//! The DNS messages, `resolv.conf` and `hosts` files a static (musl) binary
//! resolves names with: pure functions, no I/O ([`super::resolve`] sends
//! and receives). RFC 1035 §4:
//!
//! ```text
//! message  = header question* answer* authority* additional*
//! header   = id:u16 flags:u16 qdcount:u16 ancount:u16 nscount:u16 arcount:u16
//!            flags = QR(1) OPCODE(4) AA(1) TC(1) RD(1) RA(1) Z(3) RCODE(4)
//! question = name qtype:u16 qclass:u16
//! rr       = name type:u16 class:u16 ttl:u32 rdlength:u16 rdata[rdlength]
//! name     = label* (0x00 | pointer)        ; label = len:u8 (1..=63) byte[len]
//! pointer  = 0b11 offset:u14                ; to an earlier name in the message
//! ```
//!
//! `resolv.conf` as musl reads it: `nameserver IP` (the first 3),
//! `search`/`domain`, `options timeout:N attempts:N ndots:N`; `#` and `;`
//! start comments. `hosts`: `IP name alias…` lines.
//!
//! Every count and length is checked against the message's own size, name
//! pointers must point backwards and are followed at most 16 times per
//! name, a CNAME chain is followed at most 8 deep, and at most 64 answer
//! records are read: a hostile reply costs a bounded amount of work and
//! yields an error, never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

pub const TYPE_A: u16 = 1;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
/// Longest name in presentation form, without the final dot (RFC 1035 §2.3.4).
const MAX_NAME: usize = 253;
const MAX_POINTERS: usize = 16;
const MAX_CNAMES: usize = 8;
const MAX_ANSWERS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsError {
    /// The name cannot be asked for (empty label, too long, odd bytes).
    BadName(String),
    /// The reply is not a well-formed answer to our question.
    Malformed(&'static str),
}

impl std::fmt::Display for DnsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DnsError::BadName(n) => write!(f, "{n:?} is not a host name that can be looked up"),
            DnsError::Malformed(why) => write!(f, "malformed DNS reply: {why}"),
        }
    }
}

/// What a nameserver said about one question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Addresses of the name (after any CNAMEs); empty: the name exists
    /// without records of this type.
    Addrs(Vec<IpAddr>),
    /// NXDOMAIN: no such name.
    NoSuchName,
    /// SERVFAIL, REFUSED, …: ask again or ask another server.
    Failed(u8),
}

/// The name in canonical form (no final dot, lower case), if it can be asked for.
pub fn check_name(name: &str) -> Result<String, DnsError> {
    let n = name.strip_suffix('.').unwrap_or(name);
    let ok = !n.is_empty()
        && n.len() <= MAX_NAME
        && n.split('.').all(|l| {
            (1..=63).contains(&l.len()) && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !ok {
        return Err(DnsError::BadName(crate::text::clip(name, 128)));
    }
    Ok(n.to_ascii_lowercase())
}

/// A recursive query (RD set) for `name` (as [`check_name`] returns it).
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    q
}

fn u16_at(m: &[u8], at: usize) -> Result<u16, DnsError> {
    m.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]])).ok_or(DnsError::Malformed("truncated"))
}

/// Reads the name at `at`: (the name, lower case, dot-separated; the offset
/// just after it where it stands).
fn read_name(m: &[u8], mut at: usize) -> Result<(String, usize), DnsError> {
    let mut name = String::new();
    let mut end = None;
    let mut jumps = 0;
    loop {
        let len = *m.get(at).ok_or(DnsError::Malformed("truncated name"))? as usize;
        match len {
            0 => {
                return Ok((name, end.unwrap_or(at + 1)));
            }
            1..=63 => {
                let label = m.get(at + 1..at + 1 + len).ok_or(DnsError::Malformed("truncated label"))?;
                if !name.is_empty() {
                    name.push('.');
                }
                name.extend(label.iter().map(|b| b.to_ascii_lowercase() as char));
                if name.len() > MAX_NAME {
                    return Err(DnsError::Malformed("name too long"));
                }
                at += 1 + len;
            }
            0xc0..=0xff => {
                let target = (u16_at(m, at)? & 0x3fff) as usize;
                // Backwards only, and a bounded number of times: no loops.
                if target >= at || jumps == MAX_POINTERS {
                    return Err(DnsError::Malformed("bad name pointer"));
                }
                jumps += 1;
                end.get_or_insert(at + 2);
                at = target;
            }
            _ => return Err(DnsError::Malformed("bad label length")),
        }
    }
}

/// Parses `m` as the reply to query `id` for `name` (canonical) and `qtype`.
/// `Err`: not an answer to it (a stray or forged datagram is dropped).
pub fn parse_reply(m: &[u8], id: u16, name: &str, qtype: u16) -> Result<Reply, DnsError> {
    if m.len() < 12 || u16_at(m, 0)? != id {
        return Err(DnsError::Malformed("not the reply to our query"));
    }
    let flags = u16_at(m, 2)?;
    if flags & 0x8000 == 0 || (flags >> 11) & 0xf != 0 {
        return Err(DnsError::Malformed("not a reply to a standard query"));
    }
    if u16_at(m, 4)? != 1 {
        return Err(DnsError::Malformed("not one question"));
    }
    let (qname, mut at) = read_name(m, 12)?;
    if qname != name || u16_at(m, at)? != qtype || u16_at(m, at + 2)? != CLASS_IN {
        return Err(DnsError::Malformed("the question is not ours"));
    }
    at += 4;
    let rcode = (flags & 0xf) as u8;
    match rcode {
        0 => {}
        3 => return Ok(Reply::NoSuchName),
        r => return Ok(Reply::Failed(r)),
    }
    if flags & 0x0200 != 0 {
        // Truncated (TC): what it holds may be partial; the caller asks
        // again (musl, without a TCP fallback, does the same).
        return Ok(Reply::Failed(rcode));
    }
    let ancount = u16_at(m, 6)? as usize;
    let mut records = Vec::new();
    for _ in 0..ancount.min(MAX_ANSWERS) {
        let (owner, after) = read_name(m, at)?;
        let rtype = u16_at(m, after)?;
        let class = u16_at(m, after + 2)?;
        let len = u16_at(m, after + 8)? as usize;
        let data_at = after + 10;
        m.get(data_at..data_at + len).ok_or(DnsError::Malformed("truncated record"))?;
        if class == CLASS_IN {
            records.push((owner, rtype, data_at, len));
        }
        at = data_at + len;
    }
    // Follow CNAMEs from the question's name, then take its addresses.
    let mut target = name.to_owned();
    for _ in 0..MAX_CNAMES {
        let next = records.iter().find(|(o, t, _, _)| *t == TYPE_CNAME && *o == target);
        match next {
            Some((_, _, data_at, _)) => target = read_name(m, *data_at)?.0,
            None => break,
        }
    }
    let mut addrs = Vec::new();
    for (owner, rtype, data_at, len) in &records {
        if *owner != target || *rtype != qtype {
            continue;
        }
        let data = &m[*data_at..*data_at + *len];
        match (qtype, <[u8; 4]>::try_from(data), <[u8; 16]>::try_from(data)) {
            (TYPE_A, Ok(b), _) => addrs.push(IpAddr::V4(Ipv4Addr::from(b))),
            (TYPE_AAAA, _, Ok(b)) => addrs.push(IpAddr::V6(Ipv6Addr::from(b))),
            _ => return Err(DnsError::Malformed("address of the wrong length")),
        }
    }
    Ok(Reply::Addrs(addrs))
}

/// The resolver configuration, as musl reads `resolv.conf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvConf {
    /// At most 3; none configured means 127.0.0.1 (as musl).
    pub nameservers: Vec<SocketAddr>,
    /// Domains tried first for a name with fewer than `ndots` dots.
    pub search: Vec<String>,
    pub ndots: usize,
    /// The whole lookup of one name, all servers and attempts included.
    pub timeout: Duration,
    pub attempts: u32,
}

/// Parses `resolv.conf` text; nameservers get `port` (53 but in tests).
pub fn parse_resolv_conf(text: &str, port: u16) -> ResolvConf {
    let mut c = ResolvConf {
        nameservers: Vec::new(),
        search: Vec::new(),
        ndots: 1,
        timeout: Duration::from_secs(5),
        attempts: 2,
    };
    // Bounded like musl: only the first 3 nameservers count, and options are clamped.
    for line in text.lines().take(1024) {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_ascii_whitespace();
        match words.next() {
            Some("nameserver") if c.nameservers.len() < 3 => {
                // A scoped IPv6 address (fe80::1%eth0) is not supported: skipped.
                if let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) {
                    c.nameservers.push(SocketAddr::new(ip, port));
                }
            }
            Some("search" | "domain") => {
                c.search = words.filter_map(|d| check_name(d).ok()).take(6).collect();
            }
            Some("options") => {
                for opt in words {
                    let num = |p: &str| opt.strip_prefix(p).and_then(|v| v.parse::<u64>().ok());
                    if let Some(n) = num("ndots:") {
                        c.ndots = n.min(15) as usize;
                    } else if let Some(n) = num("timeout:") {
                        c.timeout = Duration::from_secs(n.clamp(1, 60));
                    } else if let Some(n) = num("attempts:") {
                        c.attempts = n.clamp(1, 10) as u32;
                    }
                }
            }
            _ => {}
        }
    }
    if c.nameservers.is_empty() {
        c.nameservers.push(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    c
}

/// The addresses `hosts` text gives `name` (canonical), in file order.
pub fn hosts_lookup(text: &str, name: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for line in text.lines().take(100_000) {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_ascii_whitespace();
        let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) else { continue };
        if words.any(|w| w.strip_suffix('.').unwrap_or(w).eq_ignore_ascii_case(name)) && !out.contains(&ip) {
            out.push(ip);
        }
        if out.len() == 16 {
            break;
        }
    }
    out
}

/// The names to ask for, in order (musl's rule): with fewer than `ndots`
/// dots and no final dot, each search domain first, then the name itself.
pub fn candidates(name: &str, conf: &ResolvConf) -> Result<Vec<String>, DnsError> {
    let canon = check_name(name)?;
    let mut out = Vec::new();
    if !name.ends_with('.') && canon.matches('.').count() < conf.ndots {
        out.extend(conf.search.iter().map(|d| format!("{canon}.{d}")).filter(|n| n.len() <= MAX_NAME));
    }
    out.push(canon);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replies dnsmasq 2.90 sent (Debian's dnsmasq-base, run with
    /// `--cname=cache.nixless.test,origin.nixless.test
    /// --host-record=origin.nixless.test,127.0.0.9,::9`, asked by a Python
    /// UDP client, id 0x1234): `cache.nixless.test` A and AAAA (a CNAME,
    /// then the address owned by a pointer to the CNAME's target), and a
    /// REFUSED one for a name it does not serve.
    const DNSMASQ_A: &str =
        "123485800001000200000000056361636865076e69786c65737304746573740000010001c00c0005000100000000\
                             0015066f726967696e076e69786c657373047465737400c030000100010000000000047f000009";
    const DNSMASQ_AAAA: &str = "123485800001000200000000056361636865076e69786c657373047465737400001c0001c00c00050001000000\
                                000015066f726967696e076e69786c657373047465737400c030001c00010000000000100000000000000000\
                                0000000000000009";
    const DNSMASQ_REFUSED: &str = "123481850001000000000000076e6f7768657265076e69786c65737304746573740000010001";

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn a_query_is_what_the_rfc_says() {
        let q = query(0xbeef, "a.b", TYPE_AAAA);
        assert_eq!(q, [0xbe, 0xef, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 1, b'b', 0, 0, 28, 0, 1]);
    }

    #[test]
    fn a_cname_chain_is_followed_to_the_addresses() {
        let a = unhex(DNSMASQ_A);
        let r = parse_reply(&a, 0x1234, "cache.nixless.test", TYPE_A).unwrap();
        assert_eq!(r, Reply::Addrs(vec!["127.0.0.9".parse().unwrap()]));
        let r = parse_reply(&unhex(DNSMASQ_AAAA), 0x1234, "cache.nixless.test", TYPE_AAAA).unwrap();
        assert_eq!(r, Reply::Addrs(vec!["::9".parse().unwrap()]));
        // Not ours: another id, another name, another type.
        assert!(parse_reply(&a, 0x1235, "cache.nixless.test", TYPE_A).is_err());
        assert!(parse_reply(&a, 0x1234, "other.nixless.test", TYPE_A).is_err());
        assert!(parse_reply(&a, 0x1234, "cache.nixless.test", TYPE_AAAA).is_err());
        // Our own query is not a reply.
        assert!(
            parse_reply(&query(0x1234, "cache.nixless.test", TYPE_A), 0x1234, "cache.nixless.test", TYPE_A).is_err()
        );
    }

    #[test]
    fn rcodes_and_truncation() {
        let r = parse_reply(&unhex(DNSMASQ_REFUSED), 0x1234, "nowhere.nixless.test", TYPE_A);
        assert_eq!(r, Ok(Reply::Failed(5)));
        let mut m = unhex(DNSMASQ_A);
        m[3] = 0x83;
        assert_eq!(parse_reply(&m, 0x1234, "cache.nixless.test", TYPE_A), Ok(Reply::NoSuchName));
        let mut m = unhex(DNSMASQ_A);
        m[2] |= 0x02;
        assert_eq!(parse_reply(&m, 0x1234, "cache.nixless.test", TYPE_A), Ok(Reply::Failed(0)));
    }

    /// Every truncation and every single-byte change of a real reply is an
    /// answer or an error, never a panic; pointer loops are refused.
    #[test]
    fn hostile_replies_cost_bounded_work() {
        for hex in [DNSMASQ_A, DNSMASQ_AAAA, DNSMASQ_REFUSED] {
            let good = unhex(hex);
            for n in 0..good.len() {
                let _ = parse_reply(&good[..n], 0x1234, "cache.nixless.test", TYPE_A);
            }
            for i in 0..good.len() {
                for v in [0x00, 0x01, 0x3f, 0x40, 0xc0, 0xff] {
                    let mut m = good.clone();
                    m[i] = v;
                    let _ = parse_reply(&m, 0x1234, "cache.nixless.test", TYPE_A);
                    let _ = parse_reply(&m, 0x1234, "cache.nixless.test", TYPE_AAAA);
                }
            }
        }
        // The answer's owner (a pointer at offset 36) points at itself.
        let mut m = unhex(DNSMASQ_A);
        assert_eq!(m[36], 0xc0);
        m[37] = 36;
        assert!(parse_reply(&m, 0x1234, "cache.nixless.test", TYPE_A).is_err());
        // The A record claims 5 bytes of data.
        let mut m = unhex(DNSMASQ_A);
        let n = m.len();
        m[n - 5] = 5;
        m.push(1);
        assert!(parse_reply(&m, 0x1234, "cache.nixless.test", TYPE_A).is_err());
    }

    #[test]
    fn resolv_conf_as_musl_reads_it() {
        let c = parse_resolv_conf(
            "# resolvconf\nnameserver 10.0.0.1\nnameserver ::1 ; v6\nnameserver fe80::1%eth0\nnameserver 10.0.0.2\n\
             nameserver 10.0.0.3\nnameserver 10.0.0.4\nsearch lan corp.example\noptions ndots:2 timeout:3 attempts:9999 rotate\n",
            53,
        );
        let ns: Vec<String> = c.nameservers.iter().map(|s| s.to_string()).collect();
        assert_eq!(ns, ["10.0.0.1:53", "[::1]:53", "10.0.0.2:53"]);
        assert_eq!((c.ndots, c.timeout, c.attempts), (2, Duration::from_secs(3), 10));
        assert_eq!(c.search, ["lan", "corp.example"]);
        assert_eq!(candidates("cache", &c).unwrap(), ["cache.lan", "cache.corp.example", "cache"]);
        assert_eq!(candidates("cache.example.org", &c).unwrap(), ["cache.example.org"]);
        assert_eq!(candidates("cache.", &c).unwrap(), ["cache"]);
        assert_eq!(parse_resolv_conf("", 5353).nameservers, ["127.0.0.1:5353".parse().unwrap()]);
    }

    #[test]
    fn hosts_and_names() {
        let hosts =
            "127.0.0.1 localhost\n::1 localhost ip6-localhost\n10.1.2.3 Cache.LAN cache # ours\n#10.9.9.9 cache\n";
        assert_eq!(hosts_lookup(hosts, "cache.lan"), ["10.1.2.3".parse::<IpAddr>().unwrap()]);
        assert_eq!(hosts_lookup(hosts, "localhost").len(), 2);
        assert!(hosts_lookup(hosts, "nowhere").is_empty());
        assert_eq!(check_name("Cache.Example.ORG.").unwrap(), "cache.example.org");
        for bad in ["", ".", "a..b", "a b", "é.example", &"x".repeat(64), &format!("{}.a", "abc.".repeat(63))] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
