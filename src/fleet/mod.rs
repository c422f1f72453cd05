//! The admin's view of a fleet through Prometheus (agents push their
//! metrics to a Pushgateway it scrapes): `nixless fleet status` and
//! `nixless rollout watch`. Pure cores ([`prom`], [`view`], [`rollout`]);
//! the network and files at the edges ([`query`], [`publish`], the
//! commands here and in [`watch`]).

pub mod prom;
pub mod publish;
pub mod rollout;
pub mod view;
pub mod watch;

use crate::fetch::{Fetcher, Options};
use std::io::Read;
use std::time::{Duration, Instant};

/// Longest one Prometheus query may take, answer included; Prometheus is
/// asked to give up a little earlier itself (`timeout=`).
pub const QUERY_DEADLINE: Duration = Duration::from_secs(30);

/// A fetcher for the admin side: credentials from the environment and the
/// default AWS files (for `s3://`), one deadline per request, and no
/// retries (each would log a line; `rollout watch` retries by rounds).
pub fn fetcher(deadline: Duration) -> Result<Fetcher, String> {
    let credentials = crate::auth::Credentials::load_from_process(&crate::auth::Sources::default())?;
    let opts = Options {
        retries: 0,
        small_fetch_deadline: deadline,
        read_timeout: deadline,
        credentials: std::sync::Arc::new(credentials),
        ..Options::default()
    };
    Ok(Fetcher::new(opts))
}

/// Runs [`view::QUERY`] against the Prometheus at `base` (`http(s)://host:port`,
/// maybe with a path prefix) within `deadline`: the samples, or one line.
pub fn query(f: &mut Fetcher, base: &str, deadline: Duration) -> Result<Vec<prom::Sample>, String> {
    let base = base.trim_end_matches('/');
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        return Err(format!("--prometheus {}: expected an http:// or https:// URL", crate::text::clip(base, 256)));
    }
    let url = format!(
        "{base}/api/v1/query?query={}&timeout={}s",
        crate::auth::sigv4::uri_encode(view::QUERY, false),
        deadline.as_secs().saturating_sub(1).max(1)
    );
    let at = Instant::now() + deadline;
    let what = format!("Prometheus at {}", crate::text::clip(base, 256));
    let (status, resp) = f.get_http(&url, 0, Some(at)).map_err(|e| format!("{what}: {}", short(&e.to_string())))?;
    let _scope = f.scope(Some(at));
    let mut body = Vec::new();
    resp.into_body()
        .into_reader()
        .take(prom::MAX_BODY + 1)
        .read_to_end(&mut body)
        .map_err(|e| format!("{what}: reading the answer: {e}"))?;
    if body.len() as u64 > prom::MAX_BODY {
        return Err(format!("{what}: answer larger than {} bytes", prom::MAX_BODY));
    }
    // Prometheus explains a refused query in the same JSON (400, 422, 503).
    match prom::parse(&body) {
        Ok(s) if status == 200 => Ok(s),
        Ok(_) => Err(format!("{what}: HTTP {status}")),
        Err(e) if status == 200 || matches!(e, prom::Error::Query { .. }) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: HTTP {status}: {}", crate::text::clip_bytes(&body, 200))),
    }
}

/// A fetch error without its long query URL.
fn short(e: &str) -> String {
    match (e.find("/api/v1/query?"), e.find(": ")) {
        (Some(q), Some(c)) if c > q => {
            format!("GET {}/api/v1/query{}", e.get(4..q).unwrap_or(""), e.get(c..).unwrap_or(""))
        }
        _ => e.to_owned(),
    }
}

/// `nixless fleet status`.
pub fn status(prometheus: &str, silent_after: u64, json: bool) -> Result<(), String> {
    let mut f = fetcher(QUERY_DEADLINE)?;
    let samples = query(&mut f, prometheus, QUERY_DEADLINE)?;
    let (hosts, now) = view::hosts(&samples);
    if hosts.is_empty() {
        // The usual cause: without honor_labels the scrape renames `job`.
        eprintln!(
            "nixless: no agent's metrics in Prometheus (job=\"nixless\"); is the Pushgateway scraped with honor_labels: true?"
        );
    }
    let s = view::summary(&hosts, now, silent_after);
    if json {
        println!("{}", crate::json::to_string(&s).map_err(|e| e.to_string())?);
    } else {
        print!("{}", table(&s));
    }
    Ok(())
}

/// The readable form of a [`view::Summary`]. Label values come from
/// devices: escaped and clipped.
pub fn table(s: &view::Summary) -> String {
    use crate::text::clip;
    let mut out = format!("{} hosts, {} silent for more than {} s\n", s.hosts, s.silent.len(), s.silent_after);
    for (title, rows) in [("SYSTEM (current)", &s.systems), ("PHASE", &s.phases), ("LAST RESULT", &s.outcomes)] {
        out += &format!("\n{title:<72} HOSTS\n");
        for c in rows.iter() {
            out += &format!("{:<72} {}\n", clip(&c.key, 72), c.hosts);
        }
    }
    if !s.channels.is_empty() {
        out += &format!("\n{:<16} {:>6} {:<16} {:>4} {:<16} HOSTS\n", "CHANNEL", "SEQ", "GROUP", "WAVE", "DECISION");
        for c in &s.channels {
            let group = if c.group.is_empty() { "-".to_owned() } else { clip(&c.group, 16) };
            out += &format!(
                "{:<16} {:>6} {:<16} {:>4} {:<16} {}\n",
                clip(&c.channel, 16),
                c.seq,
                group,
                c.wave,
                clip(&c.decision, 16),
                c.hosts
            );
        }
    }
    if !s.silent.is_empty() {
        out += &format!("\n{:<40} LAST PUSH\n", "SILENT HOST");
        for h in &s.silent {
            let ago = h.secs.map_or("never".to_owned(), |t| format!("{t} s ago"));
            out += &format!("{:<40} {ago}\n", clip(&h.host, 40));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_escapes_what_devices_send() {
        let s = view::Summary {
            time: 1,
            hosts: 1,
            silent_after: 900,
            systems: vec![view::Count { key: "/nix/store/x\n\u{1b}[31m".into(), hosts: 1 }],
            phases: vec![],
            outcomes: vec![],
            channels: vec![],
            silent: vec![view::Silent { host: "evil\rhost".into(), secs: None }],
        };
        let t = table(&s);
        assert!(!t.contains('\r') && !t.contains('\u{1b}'), "{t}");
        assert_eq!(t.lines().count(), 11, "{t}");
        assert!(t.contains("evil\\rhost") && t.contains("never"), "{t}");
    }

    #[test]
    fn errors_name_prometheus_not_the_query() {
        let e = short("GET http://p:9090/api/v1/query?query=%7Bjob%3D...&timeout=29s: connection refused");
        assert_eq!(e, "GET http://p:9090/api/v1/query: connection refused");
    }
}
