//! Pushing the metrics to a Prometheus Pushgateway, for devices behind NAT
//! that no Prometheus can scrape.
//!
//! ```text
//! PUT {pushgateway_url}/metrics/job/nixless/host/{host}          ; host of [A-Za-z0-9._-]
//! PUT {pushgateway_url}/metrics/job/nixless/host@base64/{b64}    ; any other host name
//! Content-Type: text/plain; version=0.0.4
//! body: GET /metrics's text, with nixless_last_push_timestamp_seconds = now
//! ```
//! PUT replaces the whole group, so a metric the agent stops reporting
//! disappears from the gateway too. `@base64` is the gateway's form for a
//! label value that cannot be a path segment (RFC 4648 URL-safe alphabet,
//! no padding). Credentials are those of the caches (netrc, bearer tokens
//! by URL prefix), through [`crate::auth::prepare`].
//!
//! When: once at start, after every phase change and finished deploy, and
//! every `push_interval_secs` plus up to a tenth of it (jitter, so a fleet
//! spreads out); while pushes fail, only on the schedule. One attempt per push, bounded by the small-fetch deadline,
//! in flight while the loop goes on (`fetch::oneshot`); a failure is logged
//! once per kind of error, counted, shown in status, and changes nothing
//! else: the next push is the retry.

use super::schedule::{Jitter, Schedule};
use crate::api;
use crate::fetch::FetchError;
use std::time::{Duration, Instant};

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";
/// Longest part of a gateway's answer kept in an error.
const ANSWER_MAX: usize = 200;

/// The group URL of `host` under the gateway at `base` (no trailing slash).
pub fn group_url(base: &str, host: &str) -> String {
    let plain = !host.is_empty()
        && host != "."
        && host != ".."
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if plain {
        format!("{base}/metrics/job/nixless/host/{host}")
    } else {
        let b64: String = crate::nix::base64::encode(host.as_bytes())
            .chars()
            .filter(|&c| c != '=')
            .map(|c| match c {
                '+' => '-',
                '/' => '_',
                c => c,
            })
            .collect();
        format!("{base}/metrics/job/nixless/host@base64/{b64}")
    }
}

/// Why a push failed.
#[derive(Debug)]
pub enum PushError {
    /// The gateway answered, but not 2xx (400: the metrics were refused).
    Status { status: u16, answer: String },
    /// No answer: connection, TLS, deadline, or no credentials for it.
    Network(FetchError),
}

impl PushError {
    /// What is logged once: a new kind is a new line, a repeat is silent.
    fn kind(&self) -> String {
        match self {
            PushError::Status { status, .. } => format!("http {status}"),
            PushError::Network(FetchError::Deadline { .. }) => "deadline".into(),
            PushError::Network(FetchError::Auth { .. }) => "auth".into(),
            PushError::Network(_) => "transport".into(),
        }
    }
}

impl std::fmt::Display for PushError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PushError::Status { status, answer } if answer.trim().is_empty() => write!(f, "HTTP {status}"),
            PushError::Status { status, answer } => {
                write!(f, "HTTP {status}: {}", crate::text::clip(answer.trim(), ANSWER_MAX))
            }
            // The fetch error names the URL with "GET": the method is ours.
            PushError::Network(e) => write!(f, "{}", e.to_string().trim_start_matches("GET ")),
        }
    }
}

/// What decides that a push is due besides the clock: the phase, and the
/// last finished deploy (seq, finish time).
pub type Trigger = (String, Option<(u64, u64)>);

pub struct Pusher {
    url: String,
    interval: Duration,
    next: Schedule,
    jitter: Jitter,
    /// What was last pushed (or tried).
    pushed: Option<Trigger>,
    /// The kind of the last error, logged already.
    logged: Option<String>,
    /// The push time of the push in flight.
    pushing: Option<u64>,
    pub status: api::Push,
}

impl Pusher {
    /// Due at once: the first push tells the fleet the agent started.
    pub fn new(base: &str, host: &str, interval: Duration, seed: u64) -> Pusher {
        let url = group_url(base, host);
        Pusher {
            status: api::Push { url: base.to_owned(), ..api::Push::default() },
            url,
            interval,
            next: Schedule::now(),
            jitter: Jitter::new(seed),
            pushed: None,
            logged: None,
            pushing: None,
        }
    }

    /// A phase change or outcome pushes at once, unless the last push
    /// failed: then only the schedule retries, so a gateway that swallows
    /// connections costs a deploy at most one deadline per interval, not one
    /// per phase (the health deadline runs meanwhile).
    pub fn due(&self, trigger: &Trigger, now: Instant) -> bool {
        self.next.due(now) || (self.pushed.as_ref() != Some(trigger) && self.status.error.is_none())
    }

    /// The group URL pushes go to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A push for `trigger`, rendered with the push time `now`, was sent.
    pub fn started(&mut self, trigger: Trigger, now: u64) {
        self.pushed = Some(trigger);
        self.pushing = Some(now);
    }

    /// The answer to the push sent (status and the answer's words, or why
    /// none came): recorded, and the next push scheduled.
    pub fn finished(&mut self, answer: Result<(u16, String), FetchError>) {
        let now = self.pushing.take().unwrap_or_else(crate::clock::now);
        let res = match answer {
            Ok((200..=299, _)) => Ok(()),
            Ok((status, answer)) => Err(PushError::Status { status, answer }),
            Err(e) => Err(PushError::Network(e)),
        };
        self.next.ran(Instant::now(), self.interval, &mut self.jitter);
        match res {
            Ok(()) => {
                if self.logged.take().is_some() {
                    log::info!("push to {}: working again", self.url);
                }
                self.status.last_ok = Some(now);
                self.status.error = None;
            }
            Err(e) => {
                let msg = e.to_string();
                let kind = e.kind();
                if self.logged.as_deref() != Some(kind.as_str()) {
                    log::warn!("push to {}: {msg} (logged once until it changes)", self.url);
                    self.logged = Some(kind);
                }
                self.status.errors = self.status.errors.saturating_add(1);
                self.status.error = Some(msg);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed push is retried on the schedule only, not at every phase
    /// change; a working gateway gets every change at once.
    #[test]
    fn a_failing_gateway_is_retried_on_the_schedule_only() {
        let mut p = Pusher::new("http://127.0.0.1:9", "h", Duration::from_secs(10), 7);
        let idle: Trigger = ("idle".into(), None);
        let fetching: Trigger = ("fetching".into(), None);
        assert!(p.due(&idle, Instant::now()), "at start");
        p.started(idle.clone(), 1);
        let url = p.url().to_owned();
        p.finished(Err(FetchError::Transport { url, msg: "connection refused".into() }));
        let t = Instant::now();
        assert_eq!(p.status.errors, 1);
        assert!(!p.due(&idle, t) && !p.due(&fetching, t), "failing: wait for the schedule");
        assert!(p.due(&fetching, t + Duration::from_secs(11)), "the schedule retries (10 s + up to 1 s jitter)");
        p.status.error = None;
        assert!(!p.due(&idle, t) && p.due(&fetching, t), "working: every change at once");
    }

    #[test]
    fn host_names_become_one_path_segment() {
        assert_eq!(
            group_url("http://gw:9091", "kiosk-7.lan_a"),
            "http://gw:9091/metrics/job/nixless/host/kiosk-7.lan_a"
        );
        // The gateway decodes this with Go's RawURLEncoding: URL-safe, no '='.
        assert_eq!(group_url("http://gw", "a?b"), "http://gw/metrics/job/nixless/host@base64/YT9i");
        assert_eq!(group_url("http://gw", "ü>"), "http://gw/metrics/job/nixless/host@base64/w7w-");
        assert_eq!(group_url("http://gw", "..").rsplit_once('/').unwrap().1, "Li4");
        assert_eq!(group_url("http://gw", "%2F\"").rsplit_once('/').unwrap().1, "JTJGIg");
    }
}
