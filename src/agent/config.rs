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
//!   "poll_interval_secs": 300
//! }
//! ```
//! Every key is documented in README.md. Unknown keys are an error (a typo
//! must not silently disable a check); so are missing required keys, keys
//! that do not parse, and a config that could never accept a deploy.

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
    retries: Option<u32>,
    read_timeout_secs: Option<u64>,
    health_timeout_secs: Option<u64>,
    health_units: Option<Vec<String>>,
    health_command: Option<Vec<String>>,
    health_check_network: Option<bool>,
    switch_timeout_secs: Option<u64>,
    generations_to_keep: Option<u64>,
    switch_mode: Option<String>,
}

/// How switch requests are carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchMode {
    /// A systemd path unit starts `nixless-switch.service` (production).
    PathUnit,
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
}

fn keys(what: &str, list: &[String]) -> Result<TrustedKeys, String> {
    let keys = list
        .iter()
        .map(|k| PublicKey::parse(k).map_err(|e| format!("{what}: {k:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TrustedKeys::new(keys))
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
    "read_timeout_secs",
    "health_timeout_secs",
    "health_units",
    "health_command",
    "health_check_network",
    "switch_timeout_secs",
    "generations_to_keep",
    "switch_mode",
];

/// The keys of a top-level JSON object, so an unknown one can be named
/// (the JSON reader only says that something did not match). Strings are
/// skipped with their escapes; nested values by bracket depth.
fn top_level_keys(json: &[u8]) -> Option<Vec<String>> {
    let mut keys = Vec::new();
    let (mut i, mut depth, mut expect_key) = (0, 0usize, false);
    while i < json.len() {
        match json[i] {
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < json.len() && json[i] != b'"' {
                    i += if json[i] == b'\\' { 2 } else { 1 };
                }
                if depth == 1 && expect_key {
                    keys.push(String::from_utf8_lossy(json.get(start..i)?).into_owned());
                    expect_key = false;
                }
            }
            b'{' | b'[' => {
                depth += 1;
                expect_key = depth == 1 && json[i] == b'{';
            }
            b'}' | b']' => depth = depth.checked_sub(1)?,
            b',' if depth == 1 => expect_key = true,
            _ => {}
        }
        i += 1;
    }
    Some(keys)
}

impl Config {
    pub fn parse(json: &[u8]) -> Result<Config, String> {
        if let Some(unknown) = top_level_keys(json).and_then(|ks| ks.into_iter().find(|k| !KEYS.contains(&k.as_str())))
        {
            return Err(format!("unknown key {unknown:?} (known: {})", KEYS.join(", ")));
        }
        let mut scratch = vec![0u8; json.len()];
        let (w, _): (Wire, _) = serde_json_core::from_slice_escaped(json, &mut scratch)
            .map_err(|e| format!("invalid JSON or wrong type: {e}"))?;
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
        if listen.is_empty() && w.poll_url.is_none() {
            return Err("neither listen addresses nor poll_url: the agent could never receive a deploy".into());
        }
        if let Some(u) = &w.poll_url {
            if !(u.starts_with("http://") || u.starts_with("https://") || u.starts_with("file:///")) {
                return Err(format!("poll_url {u:?}: expected http://, https:// or file:///"));
            }
        }
        let root = PathBuf::from(w.root.unwrap_or_else(|| "/".into()));
        let state_dir = w.state_dir.map(PathBuf::from).unwrap_or_else(|| root.join("var/lib/nixless"));
        for (name, p) in [("root", &root), ("state_dir", &state_dir)] {
            if !p.is_absolute() {
                return Err(format!("{name}: {} is not an absolute path", p.display()));
            }
        }
        let secs = |v: Option<u64>, default: u64, name: &str| -> Result<Duration, String> {
            match v.unwrap_or(default) {
                0 => Err(format!("{name}: must be above 0")),
                n => Ok(Duration::from_secs(n)),
            }
        };
        if let Some(m) = w.switch_mode.as_deref() {
            if m != "path-unit" {
                return Err(format!("switch_mode {m:?}: only \"path-unit\" is supported"));
            }
        }
        Ok(Config {
            host: w.host,
            listen,
            caches,
            cache_keys,
            deploy_keys,
            state_dir,
            root,
            poll_url: w.poll_url,
            poll_interval: secs(w.poll_interval_secs, 300, "poll_interval_secs")?,
            max_body_bytes: w.max_body_bytes.unwrap_or(4 << 20) as usize,
            max_connections: w.max_connections.unwrap_or(32).max(1) as usize,
            request_timeout: secs(w.request_timeout_secs, 10, "request_timeout_secs")?,
            retries: w.retries.unwrap_or(4),
            read_timeout: secs(w.read_timeout_secs, 5, "read_timeout_secs")?,
            health_timeout: secs(w.health_timeout_secs, 120, "health_timeout_secs")?,
            health_units: w.health_units.unwrap_or_default(),
            health_command: w.health_command.unwrap_or_default(),
            health_check_network: w.health_check_network.unwrap_or(true),
            switch_timeout: secs(w.switch_timeout_secs, 900, "switch_timeout_secs")?,
            generations_to_keep: w.generations_to_keep.unwrap_or(5),
        })
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
            (r#","poll_interval_secs":0"#, "above 0"),
            (r#","poll_url":"ftp://x""#, "poll_url"),
            (r#","root":"relative""#, "absolute"),
        ] {
            let e = Config::parse(cfg(extra).as_bytes()).unwrap_err();
            assert!(e.contains(needle), "{extra}: {e}");
        }
        let bad_listen = cfg("").replace("127.0.0.1:8731", "localhost");
        assert!(Config::parse(bad_listen.as_bytes()).unwrap_err().contains("listen"));
        let bad_key = cfg("").replacen(KEY, "nope", 1);
        assert!(Config::parse(bad_key.as_bytes()).unwrap_err().contains("cache_keys"));
        let no_deploy = cfg("").replace(&format!(r#""deploy_keys":["{KEY}"]"#), r#""deploy_keys":[]"#);
        assert!(Config::parse(no_deploy.as_bytes()).unwrap_err().contains("deploy_keys"));
        assert!(Config::parse(b"{").is_err());
        assert!(Config::parse(b"").is_err());
    }
}
