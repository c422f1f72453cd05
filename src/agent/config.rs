//! The agent's configuration: one JSON file (the NixOS module writes it).
//!
//! ```json
//! {
//!   "host": "kiosk-7",
//!   "listen": ["0.0.0.0:8731", "[::]:8731"],
//!   "caches": ["https://cache.example.org"],
//!   "cache_keys": ["cache.example.org-1:base64…"],
//!   "deploy_keys": ["admin-1:base64…"],
//!   "state_dir": "/var/lib/nixless",
//!   "root": "/",
//!   "poll_url": "https://deploy.example.org/kiosk-7.json",
//!   "poll_interval_secs": 300,
//!   "netrc_file": "/run/credentials/nixless-agent.service/netrc",
//!   "bearer_token_files": [{"url": "https://cache.example.org", "file": "cache-token"}],
//!   "aws_credentials_file": "aws-credentials",
//!   "aws_profile": "cache",
//!   "ssl_cert_file": "/etc/ssl/certs/ca-certificates.crt",
//!   "pushgateway_url": "https://pushgateway.example.org",
//!   "push_interval_secs": 300,
//!   "channel_url": "https://deploy.example.org/stable.json",
//!   "channel": "stable",
//!   "tags": ["kiosk", "all"],
//!   "keys_url": "https://deploy.example.org/keys.json",
//!   "clock_floor": 1796083200
//! }
//! ```
//! `channel_url` and `keys_url` are polled every `poll_interval_secs` (with
//! the same jitter as `poll_url`), signatures at `URL.sig` (for `s3://`
//! URLs, before the query). `channel` is required with `channel_url`;
//! `tags` (at most 64, each a channel name) pick the device's group, first
//! match wins.
//! Every key is documented in README.md. Unknown keys are an error (a typo
//! must not silently disable a check); so are missing required keys, keys
//! that do not parse, a number outside its key's range ([`BOUNDS`]), and a
//! config that could never accept a deploy.
//!
//! Credential files (netrc, bearer tokens, AWS keys) are named here, never
//! inlined: a relative path is looked up in `$CREDENTIALS_DIRECTORY`
//! (systemd `LoadCredential=`). The agent reads them once at start
//! ([`crate::auth::Credentials::load`]).

use crate::fetch::CacheUrl;
use crate::nix::{PublicKey, TrustedKeys};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    host: String,
    #[serde(default)]
    listen: Vec<String>,
    caches: Vec<String>,
    cache_keys: Vec<String>,
    deploy_keys: Vec<String>,
    state_dir: Option<String>,
    root: Option<String>,
    poll_url: Option<String>,
    poll_interval_secs: Option<u64>,
    max_body_bytes: Option<u64>,
    max_connections: Option<u64>,
    request_timeout_secs: Option<u64>,
    retries: Option<u64>,
    connections_per_cache: Option<u64>,
    read_timeout_secs: Option<u64>,
    health_timeout_secs: Option<u64>,
    health_units: Option<Vec<String>>,
    health_command: Option<Vec<String>>,
    health_check_network: Option<bool>,
    switch_timeout_secs: Option<u64>,
    generations_to_keep: Option<u64>,
    switch_mode: Option<String>,
    inhibited_switch: Option<String>,
    netrc_file: Option<String>,
    // A list, not a map: serde-json-core cannot read owned map keys.
    bearer_token_files: Option<Vec<TokenFile>>,
    aws_credentials_file: Option<String>,
    aws_profile: Option<String>,
    ssl_cert_file: Option<String>,
    pushgateway_url: Option<String>,
    push_interval_secs: Option<u64>,
    channel_url: Option<String>,
    channel: Option<String>,
    tags: Option<Vec<String>>,
    keys_url: Option<String>,
    clock_floor: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    /// URL prefix the token is sent to.
    url: String,
    file: String,
}

/// How switch requests are carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchMode {
    /// A systemd path unit starts `nixless-switch.service` (production).
    PathUnit,
}

/// What a `switch` deploy does when switch-to-configuration refuses its
/// `test` because `system.switch.inhibitors` changed (nothing was switched).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InhibitedSwitch {
    /// Fail, with "needs a reboot: deploy with action boot" (the default:
    /// the operator chooses when the device reboots).
    Fail,
    /// Go on as a `boot` deploy of the same system: committed, the boot
    /// default (one-time on systemd-boot), waiting for the next reboot.
    Boot,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub host: String,
    pub listen: Vec<SocketAddr>,
    pub caches: Vec<CacheUrl>,
    pub cache_keys: TrustedKeys,
    pub deploy_keys: TrustedKeys,
    pub state_dir: PathBuf,
    pub root: PathBuf,
    pub poll_url: Option<String>,
    pub poll_interval: Duration,
    pub max_body_bytes: usize,
    pub max_connections: usize,
    pub request_timeout: Duration,
    pub retries: u32,
    /// HTTP/1.1 connections per cache a deploy's fetch keeps open (as
    /// `nixless install --connections`).
    pub connections_per_cache: usize,
    /// Longest wait for one read from a cache before the download resumes
    /// on a new connection; also how long status may go unanswered during
    /// a stalled transfer, so keep it well under WatchdogSec / 2.
    pub read_timeout: Duration,
    pub health_timeout: Duration,
    pub health_units: Vec<String>,
    pub health_command: Vec<String>,
    pub health_check_network: bool,
    pub switch_timeout: Duration,
    pub generations_to_keep: u64,
    pub inhibited_switch: InhibitedSwitch,
    /// A Prometheus Pushgateway the metrics are pushed to (no trailing
    /// slash, no user info: credentials come from [`Config::auth`]).
    pub pushgateway_url: Option<String>,
    pub push_interval: Duration,
    /// Where private caches' credentials are read from.
    pub auth: crate::auth::Sources,
    /// Read from [`Config::auth`] by the agent at start; empty until then.
    pub credentials: std::sync::Arc<crate::auth::Credentials>,
    /// A CA file (PEM) `https://` is checked against instead of the
    /// built-in webpki roots; absolute.
    pub ssl_cert_file: Option<PathBuf>,
    /// Read from [`Config::ssl_cert_file`] by the agent at start.
    pub trust: crate::net::tls::Trust,
    /// The channel followed: its document's URL and name.
    pub channel: Option<Channel>,
    /// The device's tags, in priority order (its group in a channel).
    pub tags: Vec<String>,
    /// A key rotation document's URL.
    pub keys_url: Option<String>,
    /// The config's clock floor (0: none), see [`crate::channel::fresh`].
    pub clock_floor: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    pub url: String,
    pub name: String,
}

/// Bounded values fit any usize of 32 bits or more.
fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

fn keys(what: &str, list: &[String]) -> Result<TrustedKeys, String> {
    let keys = list
        .iter()
        .map(|k| PublicKey::parse(k).map_err(|e| format!("{what}: {k:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TrustedKeys::new(keys))
}

/// A numeric key's accepted range (inclusive) and its default.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub key: &'static str,
    pub min: u64,
    pub max: u64,
    pub default: u64,
}

const fn bound(key: &'static str, min: u64, max: u64, default: u64) -> Bound {
    Bound { key, min, max, default }
}

const DAY: u64 = 86_400;

/// Every numeric key. Out of range, a value would panic (a Duration added
/// to an Instant), refuse everything (`max_body_bytes: 0` answers every
/// deploy 413), or let one request hold the agent: the ranges keep each to
/// what a device can use.
pub const BOUNDS: &[Bound] = &[
    bound("poll_interval_secs", 1, 7 * DAY, 300),
    // The largest document is a deploy with every narinfo of a closure
    // inline (~0.5 KiB each); bodies are buffered in RAM under MemoryMax=64M.
    bound("max_body_bytes", 1024, 16 << 20, 4 << 20),
    // Each connection is a file descriptor (LimitNOFILE defaults to 1024).
    bound("max_connections", 1, 1000, 32),
    bound("request_timeout_secs", 1, 300, 10),
    bound("retries", 0, 100, 4),
    // As `nixless install --connections`: each is a descriptor and a
    // connection on the cache's side.
    bound("connections_per_cache", 1, 64, 8),
    // How long a stalled download waits before it resumes on a new
    // connection. It waits in the loop's poll(2) with everything else,
    // so it does not bound status or the watchdog.
    bound("read_timeout_secs", 1, 300, 5),
    bound("health_timeout_secs", 1, DAY, 120),
    bound("switch_timeout_secs", 1, DAY, 900),
    bound("generations_to_keep", 1, 10_000, 5),
    // Each push is a few KiB; a fleet of 10 000 at 10 s is 1 000 pushes/s
    // on one gateway, so nothing shorter.
    bound("push_interval_secs", 10, DAY, 300),
    // Unix time; 0 is none (the build's own floor still applies).
    bound("clock_floor", 0, crate::channel::MAX_TIME, 0),
];

fn range_error(b: &Bound, got: &str) -> String {
    format!("{} must be {}..={}, got {got}", b.key, b.min, b.max)
}

/// `v` (or the default) if inside `key`'s range.
fn bounded(key: &str, v: Option<u64>) -> Result<u64, String> {
    let b = BOUNDS.iter().find(|b| b.key == key).ok_or_else(|| format!("{key}: no range defined"))?;
    match v.unwrap_or(b.default) {
        n if (b.min..=b.max).contains(&n) => Ok(n),
        n => Err(range_error(b, &n.to_string())),
    }
}

fn bounded_secs(key: &str, v: Option<u64>) -> Result<Duration, String> {
    bounded(key, v).map(Duration::from_secs)
}

/// A numeric key whose raw value is not a whole number that fits in u64
/// (negative, fraction, exponent, string, 2^64): the JSON reader only says
/// "invalid number", so the key and its range are named here.
fn not_a_number(members: &[(String, &[u8])]) -> Option<String> {
    members.iter().find_map(|(k, raw)| {
        let b = BOUNDS.iter().find(|b| b.key == k)?;
        let text = String::from_utf8_lossy(raw);
        if text == "null" || text.parse::<u64>().is_ok() {
            return None;
        }
        // The raw JSON token, so a string shows its quotes; bounded, one line.
        let shown: String = text.chars().take(40).map(|c| if c.is_control() { ' ' } else { c }).collect();
        Some(range_error(b, &shown))
    })
}

const KEYS: &[&str] = &[
    "host",
    "listen",
    "caches",
    "cache_keys",
    "deploy_keys",
    "state_dir",
    "root",
    "poll_url",
    "poll_interval_secs",
    "max_body_bytes",
    "max_connections",
    "request_timeout_secs",
    "retries",
    "connections_per_cache",
    "read_timeout_secs",
    "health_timeout_secs",
    "health_units",
    "health_command",
    "health_check_network",
    "switch_timeout_secs",
    "generations_to_keep",
    "switch_mode",
    "inhibited_switch",
    "netrc_file",
    "bearer_token_files",
    "aws_credentials_file",
    "aws_profile",
    "ssl_cert_file",
    "pushgateway_url",
    "push_interval_secs",
    "channel_url",
    "channel",
    "tags",
    "keys_url",
    "clock_floor",
];

/// A polled document's URL: http(s), file:/// or s3:// (the caches' form,
/// read with the caches' credentials), one line, bounded.
fn document_url(key: &str, u: &str) -> Result<String, String> {
    let shown = crate::text::clip(u, 200);
    let scheme_ok = ["http://", "https://", "file:///", "s3://"].iter().any(|p| u.starts_with(p));
    if !scheme_ok {
        return Err(format!("{key} {shown:?}: expected http://, https://, file:/// or s3://"));
    }
    if u.len() > 1024 || u.chars().any(|c| c.is_control() || c == ' ') {
        return Err(format!("{key} {shown:?}: no spaces or control characters; at most 1024 bytes"));
    }
    Ok(u.to_owned())
}

/// The members of a top-level JSON object, key and raw value text, so an
/// unknown key or a bad number can be named (the JSON reader only says
/// that something did not match). Strings are skipped with their escapes;
/// nested values by bracket depth.
fn top_level_members(json: &[u8]) -> Option<Vec<(String, &[u8])>> {
    let mut members = Vec::new();
    let (mut i, mut depth, mut expect_key) = (0, 0usize, false);
    let mut current: Option<(String, usize)> = None;
    let mut finish = |current: &mut Option<(String, usize)>, end: usize| -> Option<()> {
        if let Some((key, start)) = current.take() {
            members.push((key, json.get(start..end)?.trim_ascii()));
        }
        Some(())
    };
    while i < json.len() {
        match json[i] {
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < json.len() && json[i] != b'"' {
                    i += if json[i] == b'\\' { 2 } else { 1 };
                }
                if depth == 1 && expect_key {
                    current = Some((String::from_utf8_lossy(json.get(start..i)?).into_owned(), i + 1));
                    expect_key = false;
                }
            }
            b':' if depth == 1 => {
                if let Some((_, start)) = current.as_mut() {
                    *start = i + 1;
                }
            }
            b'{' | b'[' => {
                depth += 1;
                expect_key = depth == 1 && json[i] == b'{';
            }
            b'}' | b']' => {
                if depth == 1 {
                    finish(&mut current, i)?;
                }
                depth = depth.checked_sub(1)?;
            }
            b',' if depth == 1 => {
                finish(&mut current, i)?;
                expect_key = true;
            }
            _ => {}
        }
        i += 1;
    }
    Some(members)
}

/// A Pushgateway base URL: `http(s)://authority[/prefix]`, without query,
/// fragment or user info (a password there would reach logs and status;
/// `netrc_file` and `bearer_token_files` carry credentials instead).
fn pushgateway_url(u: &str) -> Result<String, String> {
    let shown = crate::text::clip(u, 200);
    let rest = u.strip_prefix("http://").or_else(|| u.strip_prefix("https://"));
    let Some(rest) = rest else {
        return Err(format!("pushgateway_url {shown:?}: expected http:// or https://"));
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(format!("pushgateway_url {shown:?}: no host"));
    }
    if authority.contains('@') {
        // Not shown: it may hold a password.
        return Err("pushgateway_url: no user info in the URL; use netrc_file or bearer_token_files".into());
    }
    if u.len() > 1024 || u.contains(['?', '#']) || u.chars().any(|c| c.is_control() || c == ' ') {
        return Err(format!(
            "pushgateway_url {shown:?}: no query, fragment, spaces or control characters; at most 1024 bytes"
        ));
    }
    Ok(u.trim_end_matches('/').to_owned())
}

impl Config {
    pub fn parse(json: &[u8]) -> Result<Config, String> {
        let members = top_level_members(json).unwrap_or_default();
        if let Some((unknown, _)) = members.iter().find(|(k, _)| !KEYS.contains(&k.as_str())) {
            return Err(format!("unknown key {unknown:?} (known: {})", KEYS.join(", ")));
        }
        let w: Wire = crate::json::from_slice_bounded(json)
            .map_err(|e| not_a_number(&members).unwrap_or_else(|| format!("invalid JSON or wrong type: {e}")))?;
        if w.host.is_empty() || w.host.contains(['/', ' ', '\n']) {
            return Err(format!("host {:?}: must be a non-empty name without '/' or spaces", w.host));
        }
        let listen = w
            .listen
            .iter()
            .map(|a| a.parse::<SocketAddr>().map_err(|_| format!("listen: {a:?} is not addr:port (IPv6 as [::]:port)")))
            .collect::<Result<Vec<_>, _>>()?;
        let caches = w.caches.iter().map(|c| CacheUrl::parse(c)).collect::<Result<Vec<_>, _>>()?;
        if caches.is_empty() {
            return Err("caches: at least one cache URL is needed".into());
        }
        let cache_keys = keys("cache_keys", &w.cache_keys)?;
        if cache_keys.is_empty() {
            return Err("cache_keys: at least one trusted cache key is needed".into());
        }
        let deploy_keys = keys("deploy_keys", &w.deploy_keys)?;
        if deploy_keys.is_empty() {
            return Err("deploy_keys: at least one deploy key is needed".into());
        }
        if listen.is_empty() && w.poll_url.is_none() && w.channel_url.is_none() {
            return Err(
                "neither listen addresses, poll_url nor channel_url: the agent could never receive a deploy".into()
            );
        }
        let channel = match (w.channel_url, w.channel) {
            (Some(url), Some(name)) => {
                if !crate::channel::valid_name(&name) {
                    return Err(format!("channel {:?}: 1 to 64 of A-Z a-z 0-9 . _ -", crate::text::clip(&name, 100)));
                }
                Some(Channel { url: document_url("channel_url", &url)?, name })
            }
            (Some(_), None) => return Err("channel_url needs channel (the name of the channel followed)".into()),
            (None, Some(_)) => return Err("channel needs channel_url (where its document is polled)".into()),
            (None, None) => None,
        };
        let tags = w.tags.unwrap_or_default();
        if tags.len() > crate::channel::MAX_GROUPS {
            return Err(format!("tags: {} given, at most {}", tags.len(), crate::channel::MAX_GROUPS));
        }
        for (i, t) in tags.iter().enumerate() {
            if !crate::channel::valid_name(t) {
                return Err(format!("tags: {:?} is not 1 to 64 of A-Z a-z 0-9 . _ -", crate::text::clip(t, 100)));
            }
            if tags[..i].contains(t) {
                return Err(format!("tags: {t:?} appears twice"));
            }
        }
        if channel.is_some() && tags.is_empty() {
            // The device's group is one of its tags: with none, no document
            // could ever name it.
            return Err("channel_url needs tags (the groups this device belongs to, in priority order)".into());
        }
        let keys_url = w.keys_url.map(|u| document_url("keys_url", &u)).transpose()?;
        if let Some(u) = &w.poll_url {
            if !(u.starts_with("http://") || u.starts_with("https://") || u.starts_with("file:///")) {
                return Err(format!("poll_url {u:?}: expected http://, https:// or file:///"));
            }
        }
        let pushgateway_url = w.pushgateway_url.map(|u| pushgateway_url(&u)).transpose()?;
        let root = PathBuf::from(w.root.unwrap_or_else(|| "/".into()));
        let state_dir = w.state_dir.map(PathBuf::from).unwrap_or_else(|| root.join("var/lib/nixless"));
        for (name, p) in [("root", &root), ("state_dir", &state_dir)] {
            if !p.is_absolute() {
                return Err(format!("{name}: {} is not an absolute path", p.display()));
            }
        }
        if let Some(m) = w.switch_mode.as_deref() {
            if m != "path-unit" {
                return Err(format!("switch_mode {m:?}: only \"path-unit\" is supported"));
            }
        }
        let inhibited_switch = match w.inhibited_switch.as_deref() {
            None | Some("fail") => InhibitedSwitch::Fail,
            Some("boot") => InhibitedSwitch::Boot,
            Some(m) => return Err(format!("inhibited_switch {m:?}: expected \"fail\" or \"boot\"")),
        };
        let auth = crate::auth::Sources {
            netrc_file: w.netrc_file.map(PathBuf::from),
            bearer_token_files: w
                .bearer_token_files
                .unwrap_or_default()
                .into_iter()
                .map(|TokenFile { url: prefix, file }| {
                    if prefix.starts_with("http://") || prefix.starts_with("https://") {
                        Ok((prefix, PathBuf::from(file)))
                    } else {
                        Err(format!("bearer_token_files: {prefix:?} is not an http:// or https:// URL prefix"))
                    }
                })
                .collect::<Result<Vec<_>, _>>()?,
            aws_credentials_file: w.aws_credentials_file.map(PathBuf::from),
            aws_profile: w.aws_profile,
        };
        let ssl_cert_file = match w.ssl_cert_file.map(PathBuf::from) {
            Some(p) if !p.is_absolute() => {
                return Err(format!("ssl_cert_file {:?}: not an absolute path", p.display()))
            }
            p => p,
        };
        Ok(Config {
            host: w.host,
            listen,
            caches,
            cache_keys,
            deploy_keys,
            state_dir,
            root,
            poll_url: w.poll_url,
            poll_interval: bounded_secs("poll_interval_secs", w.poll_interval_secs)?,
            max_body_bytes: to_usize(bounded("max_body_bytes", w.max_body_bytes)?),
            max_connections: to_usize(bounded("max_connections", w.max_connections)?),
            request_timeout: bounded_secs("request_timeout_secs", w.request_timeout_secs)?,
            retries: u32::try_from(bounded("retries", w.retries)?).unwrap_or(u32::MAX),
            connections_per_cache: to_usize(bounded("connections_per_cache", w.connections_per_cache)?),
            read_timeout: bounded_secs("read_timeout_secs", w.read_timeout_secs)?,
            health_timeout: bounded_secs("health_timeout_secs", w.health_timeout_secs)?,
            health_units: w.health_units.unwrap_or_default(),
            health_command: w.health_command.unwrap_or_default(),
            health_check_network: w.health_check_network.unwrap_or(true),
            switch_timeout: bounded_secs("switch_timeout_secs", w.switch_timeout_secs)?,
            generations_to_keep: bounded("generations_to_keep", w.generations_to_keep)?,
            pushgateway_url,
            push_interval: bounded_secs("push_interval_secs", w.push_interval_secs)?,
            inhibited_switch,
            auth,
            credentials: Default::default(),
            ssl_cert_file,
            trust: Default::default(),
            channel,
            tags,
            keys_url,
            clock_floor: bounded("clock_floor", w.clock_floor)?,
        })
    }

    /// The part the switch helper reads.
    pub fn helper(&self) -> crate::switch::helper::Config {
        crate::switch::helper::Config {
            root: self.root.clone(),
            state_dir: self.state_dir.clone(),
            switch_timeout: self.switch_timeout,
            health_units: self.health_units.clone(),
            health_command: self.health_command.clone(),
            health_timeout: self.health_timeout,
        }
    }

    pub fn load(path: &std::path::Path) -> Result<Config, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Config::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "test1:bpyknC459ScGTDYFwSofhWPz6M8jTcn4wOsZRx1IrSw=";

    fn cfg(extra: &str) -> String {
        format!(
            r#"{{"host":"kiosk-7","listen":["127.0.0.1:8731","[::1]:8731"],"caches":["http://127.0.0.1:8080"],"cache_keys":["{KEY}"],"deploy_keys":["{KEY}"]{extra}}}"#
        )
    }

    #[test]
    fn parses_with_defaults() {
        let c = Config::parse(cfg("").as_bytes()).unwrap();
        assert_eq!(c.host, "kiosk-7");
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/nixless"));
        assert_eq!(c.poll_interval, Duration::from_secs(300));
        assert_eq!(c.inhibited_switch, InhibitedSwitch::Fail);
        assert_eq!((c.pushgateway_url, c.push_interval), (None, Duration::from_secs(300)));
        let c = Config::parse(cfg(r#","pushgateway_url":"http://[::1]:9091/gw/","push_interval_secs":10"#).as_bytes())
            .unwrap();
        assert_eq!(
            (c.pushgateway_url.as_deref(), c.push_interval),
            (Some("http://[::1]:9091/gw"), Duration::from_secs(10))
        );
        let c = Config::parse(cfg(r#","inhibited_switch":"boot""#).as_bytes()).unwrap();
        assert_eq!(c.inhibited_switch, InhibitedSwitch::Boot);
        let c =
            Config::parse(cfg(r#","root":"/mnt","poll_url":"https://x/y.json","poll_interval_secs":60"#).as_bytes())
                .unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/mnt/var/lib/nixless"));
        assert_eq!(c.poll_url.as_deref(), Some("https://x/y.json"));
    }

    #[test]
    fn refuses_bad_configs_clearly() {
        for (extra, needle) in [
            (r#","typo_key":1"#, "unknown key \"typo_key\""),
            (r#","health_units":["a","b"],"nested":{"x":[1,{"y":2}]}"#, "unknown key \"nested\""),
            (r#","poll_interval_secs":0"#, "poll_interval_secs must be 1..=604800, got 0"),
            (r#","poll_url":"ftp://x""#, "poll_url"),
            (r#","root":"relative""#, "absolute"),
            (r#","inhibited_switch":"reboot""#, r#"inhibited_switch "reboot": expected "fail" or "boot""#),
            (r#","pushgateway_url":"ftp://x""#, "pushgateway_url \"ftp://x\": expected http:// or https://"),
            (r#","pushgateway_url":"http://u:secret@gw:9091""#, "pushgateway_url: no user info in the URL"),
            (r#","pushgateway_url":"http://gw:9091/?x=1""#, "no query"),
            (r#","pushgateway_url":"https:///x""#, "no host"),
            (r#","push_interval_secs":9"#, "push_interval_secs must be 10..=86400, got 9"),
        ] {
            let e = Config::parse(cfg(extra).as_bytes()).unwrap_err();
            assert!(e.contains(needle), "{extra}: {e}");
        }
        let e = Config::parse(cfg(r#","pushgateway_url":"https://u:s3cret@gw""#).as_bytes()).unwrap_err();
        assert!(!e.contains("s3cret"), "a password in the URL is not repeated: {e}");
        let bad_listen = cfg("").replace("127.0.0.1:8731", "localhost");
        assert!(Config::parse(bad_listen.as_bytes()).unwrap_err().contains("listen"));
        let bad_key = cfg("").replacen(KEY, "nope", 1);
        assert!(Config::parse(bad_key.as_bytes()).unwrap_err().contains("cache_keys"));
        let no_deploy = cfg("").replace(&format!(r#""deploy_keys":["{KEY}"]"#), r#""deploy_keys":[]"#);
        assert!(Config::parse(no_deploy.as_bytes()).unwrap_err().contains("deploy_keys"));
        assert!(Config::parse(b"{").is_err());
        assert!(Config::parse(b"").is_err());
    }

    /// Each numeric key: both ends of its range are accepted, one past
    /// either end and 2^64 − 1 refused with one line naming the key and
    /// its range. (Before: `poll_interval_secs: 18446744073709551615`
    /// parsed and panicked at the first poll, `max_body_bytes: 0` parsed.)
    #[test]
    fn every_numeric_key_has_a_range() {
        let set = |key: &str, v: &str| Config::parse(cfg(&format!(r#","{key}":{v}"#)).as_bytes());
        for b in BOUNDS {
            assert!(KEYS.contains(&b.key), "{}", b.key);
            assert!((b.min..=b.max).contains(&b.default), "{}", b.key);
            for ok in [b.min, b.max, b.default] {
                assert!(set(b.key, &ok.to_string()).is_ok(), "{} {ok}", b.key);
            }
            let mut bad = vec![b.max + 1, u64::MAX];
            if b.min > 0 {
                bad.push(b.min - 1);
            }
            for n in bad {
                let e = set(b.key, &n.to_string()).unwrap_err();
                assert_eq!(e, format!("{} must be {}..={}, got {n}", b.key, b.min, b.max));
            }
            for raw in ["-1", "1.5", "1e3", "18446744073709551616", "\"5\""] {
                let e = set(b.key, raw).unwrap_err();
                assert!(e.starts_with(&format!("{} must be {}..={}, got ", b.key, b.min, b.max)), "{raw}: {e}");
            }
        }
        let c = Config::parse(cfg(r#","max_body_bytes":1024,"retries":0,"read_timeout_secs":10"#).as_bytes()).unwrap();
        assert_eq!((c.max_body_bytes, c.retries, c.read_timeout), (1024, 0, Duration::from_secs(10)));
        let e = set("poll_interval_secs", "18446744073709551615").unwrap_err();
        assert_eq!(e, "poll_interval_secs must be 1..=604800, got 18446744073709551615");
        assert_eq!(set("max_body_bytes", "0").unwrap_err(), "max_body_bytes must be 1024..=16777216, got 0");
        // A string that merely looks like a number is shown as a string.
        assert_eq!(set("retries", "\"5\"").unwrap_err(), "retries must be 0..=100, got \"5\"");
    }

    #[test]
    fn channel_keys_parse_and_are_checked() {
        let c = Config::parse(
            cfg(r#","channel_url":"s3://b/c.json?region=x","channel":"stable","tags":["kiosk","all"],"keys_url":"file:///k.json","clock_floor":1796083200"#)
                .as_bytes(),
        )
        .unwrap();
        let ch = c.channel.unwrap();
        assert_eq!((ch.url.as_str(), ch.name.as_str()), ("s3://b/c.json?region=x", "stable"));
        assert_eq!(
            (c.tags, c.keys_url.as_deref(), c.clock_floor),
            (vec!["kiosk".into(), "all".into()], Some("file:///k.json"), 1796083200)
        );
        let c = Config::parse(cfg("").as_bytes()).unwrap();
        assert_eq!((c.channel, c.tags.len(), c.keys_url, c.clock_floor), (None, 0, None, 0));
        for (extra, needle) in [
            (r#","channel_url":"http://x/c.json""#, "channel_url needs channel"),
            (r#","channel_url":"http://x/c.json","channel":"s""#, "channel_url needs tags"),
            (r#","channel":"stable""#, "channel needs channel_url"),
            (r#","channel_url":"ftp://x","channel":"s","tags":["t"]"#, "channel_url \"ftp://x\": expected"),
            (r#","channel_url":"http://x","channel":"a b","tags":["t"]"#, "channel \"a b\": 1 to 64"),
            (r#","tags":["ok","no/slash"]"#, "tags: \"no/slash\""),
            (r#","tags":["a","a"]"#, "tags: \"a\" appears twice"),
            (r#","keys_url":"gopher://k""#, "keys_url"),
            (r#","clock_floor":253402300800"#, "clock_floor must be 0..=253402300799"),
        ] {
            let e = Config::parse(cfg(extra).as_bytes()).unwrap_err();
            assert!(e.contains(needle), "{extra}: {e}");
        }
        let many: Vec<String> = (0..65).map(|i| format!("\"t{i}\"")).collect();
        let e = Config::parse(cfg(&format!(r#","tags":[{}]"#, many.join(","))).as_bytes()).unwrap_err();
        assert_eq!(e, "tags: 65 given, at most 64");
        // A channel alone is enough to receive deploys.
        let only = cfg(r#","channel_url":"file:///c.json","channel":"s","tags":["t"]"#)
            .replace(r#""listen":["127.0.0.1:8731","[::1]:8731"],"#, "");
        assert!(Config::parse(only.as_bytes()).is_ok());
    }

    #[test]
    fn credential_sources_are_paths() {
        let c = Config::parse(
            cfg(r#","netrc_file":"netrc","bearer_token_files":[{"url":"https://c.example","file":"/run/tok"}],"aws_profile":"ci""#)
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(c.auth.netrc_file, Some(PathBuf::from("netrc")));
        assert_eq!(c.auth.bearer_token_files, [("https://c.example".to_owned(), PathBuf::from("/run/tok"))]);
        assert_eq!(c.auth.aws_profile.as_deref(), Some("ci"));
        let e =
            Config::parse(cfg(r#","bearer_token_files":[{"url":"c.example","file":"/t"}]"#).as_bytes()).unwrap_err();
        assert!(e.contains("not an http:// or https:// URL prefix"), "{e}");
    }

    #[test]
    fn members_are_split_at_top_level_commas_only() {
        let m = top_level_members(br#"{"a" : [1,{"b":2}], "c":"x,}\"y", "d": 7 }"#).unwrap();
        let m: Vec<(&str, &[u8])> = m.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(m, [("a", &b"[1,{\"b\":2}]"[..]), ("c", br#""x,}\"y""#), ("d", b"7")]);
    }

    #[test]
    fn deep_config_is_refused_not_a_crash() {
        let deep = cfg(&format!(r#","health_command":{}{}"#, "[".repeat(1_000_000), "]".repeat(1_000_000)));
        let e = Config::parse(deep.as_bytes()).unwrap_err();
        assert_eq!(e, "invalid JSON or wrong type: arrays and objects nested deeper than 32 levels");
    }
}
