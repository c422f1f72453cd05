//! Credentials for private caches, as a pure step between "fetch this URL"
//! and the request on the wire: [`prepare`] takes the method, the URL, the
//! time and a [`Credentials`] store, and returns the URL to request and the
//! headers to add. No I/O, so any HTTP engine can use it; files are read
//! once, by [`Credentials::load`].
//!
//! - `s3://bucket/key?region=…&endpoint=…` becomes a path-style
//!   `http(s)://` URL signed with AWS Signature V4 ([`s3`], [`sigv4`]),
//!   keys from the URL's `profile=` in the credentials file, else the
//!   environment, else the configured (or `default`) profile ([`aws`]).
//! - `http(s)://` URLs get `Authorization: Bearer` when a token file is
//!   configured for a prefix of the URL (the longest wins), else `Basic`
//!   from the netrc entry of the URL's host ([`netrc`]), else nothing.
//!
//! Secrets live in [`Secret`], whose `Debug` shows nothing; they appear only
//! in header values, which no error or log line carries.

pub mod aws;
pub mod netrc;
pub mod s3;
pub mod sigv4;

use std::path::{Path, PathBuf};

/// A credential. `Debug` redacts it, and it has no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Self {
        Secret(s)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where credentials are read from (the agent's config, the CLI's flags).
/// A relative path is looked up in `$CREDENTIALS_DIRECTORY`, where systemd
/// puts a unit's `LoadCredential=` files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources {
    pub netrc_file: Option<PathBuf>,
    /// (URL prefix, token file).
    pub bearer_token_files: Vec<(String, PathBuf)>,
    /// Default: `$AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`
    /// if it exists.
    pub aws_credentials_file: Option<PathBuf>,
    /// Profile for `s3://` URLs without `profile=` when the environment has
    /// no keys. Default: `$AWS_PROFILE`, else `default`.
    pub aws_profile: Option<String>,
}

#[derive(Clone, Default)]
pub struct Credentials {
    netrc: Vec<netrc::Entry<'static>>,
    bearer: Vec<(String, Secret)>,
    aws_profiles: Vec<(String, aws::Keys)>,
    aws_env: Option<aws::Keys>,
    aws_profile: String,
}

/// Counts only: a netrc entry holds a password.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("netrc_entries", &self.netrc.len())
            .field("bearer_prefixes", &self.bearer.iter().map(|(p, _)| p).collect::<Vec<_>>())
            .field("aws_profiles", &self.aws_profiles.iter().map(|(p, _)| p).collect::<Vec<_>>())
            .field("aws_env", &self.aws_env.is_some())
            .finish()
    }
}

/// Largest bearer token file.
pub const MAX_TOKEN_FILE: u64 = 16 << 10;

fn resolve(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<PathBuf, String> {
    if path.is_absolute() {
        return Ok(path.to_owned());
    }
    match env("CREDENTIALS_DIRECTORY") {
        Some(dir) if !dir.is_empty() => Ok(Path::new(&dir).join(path)),
        _ => Err(format!("{}: a relative path needs $CREDENTIALS_DIRECTORY (systemd LoadCredential=)", path.display())),
    }
}

fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut buf = Vec::new();
    f.take(limit + 1).read_to_end(&mut buf).map_err(|e| format!("{}: {e}", path.display()))?;
    if buf.len() as u64 > limit {
        return Err(format!("{}: larger than {limit} bytes", path.display()));
    }
    Ok(buf)
}

impl Credentials {
    /// Reads every configured file; any error is one line naming the file
    /// (never its contents).
    pub fn load(src: &Sources, env: &dyn Fn(&str) -> Option<String>) -> Result<Credentials, String> {
        let mut c = Credentials::default();
        if let Some(p) = &src.netrc_file {
            let p = resolve(p, env)?;
            let bytes = read_bounded(&p, netrc::MAX_BYTES as u64)?;
            let entries = netrc::parse(&bytes).map_err(|e| format!("netrc file {}: {e}", p.display()))?;
            for e in &entries {
                for v in [&e.login, &e.password].into_iter().flatten() {
                    if v.contains(['\n', '\r']) {
                        return Err(format!("netrc file {}: a login or password with a line break", p.display()));
                    }
                }
            }
            c.netrc = entries.into_iter().map(netrc::Entry::into_owned).collect();
        }
        for (prefix, p) in &src.bearer_token_files {
            if !(prefix.starts_with("http://") || prefix.starts_with("https://")) {
                return Err(format!("bearer token for {prefix:?}: the prefix must be an http:// or https:// URL"));
            }
            let p = resolve(p, env)?;
            let bytes = read_bounded(&p, MAX_TOKEN_FILE)?;
            let token = std::str::from_utf8(&bytes).map(str::trim).unwrap_or("");
            if !aws::valid_value(token) {
                return Err(format!(
                    "bearer token file {}: empty, or not one line of printable ASCII without spaces",
                    p.display()
                ));
            }
            c.bearer.push((prefix.trim_end_matches('/').to_owned(), Secret::new(token.to_owned())));
        }
        let aws_file = match &src.aws_credentials_file {
            Some(p) => Some((resolve(p, env)?, true)),
            None => env("AWS_SHARED_CREDENTIALS_FILE")
                .filter(|s| !s.is_empty())
                .map(|s| (PathBuf::from(s), true))
                .or_else(|| env("HOME").map(|h| (Path::new(&h).join(".aws/credentials"), false))),
        };
        if let Some((p, required)) = aws_file {
            match read_bounded(&p, aws::MAX_BYTES as u64) {
                Ok(bytes) => {
                    c.aws_profiles =
                        aws::parse(&bytes).map_err(|e| format!("AWS credentials file {}: {e}", p.display()))?;
                }
                Err(e) if required || p.exists() => return Err(format!("AWS credentials file: {e}")),
                Err(_) => {}
            }
        }
        c.aws_env = aws::from_env(env)?;
        c.aws_profile = src.aws_profile.clone().or_else(|| env("AWS_PROFILE")).unwrap_or_else(|| "default".into());
        Ok(c)
    }

    /// Credentials from the process environment and the given files.
    pub fn load_from_process(src: &Sources) -> Result<Credentials, String> {
        Credentials::load(src, &|k| std::env::var(k).ok())
    }

    fn aws_keys(&self, profile: Option<&str>) -> Result<&aws::Keys, Error> {
        let named = |name: &str| self.aws_profiles.iter().find(|(n, _)| n == name).map(|(_, k)| k);
        match profile {
            Some(p) => named(p).ok_or_else(|| Error::NoAwsProfile(p.to_owned())),
            None => self
                .aws_env
                .as_ref()
                .or_else(|| named(&self.aws_profile))
                .ok_or_else(|| Error::NoAwsCredentials { default_profile: self.aws_profile.clone() }),
        }
    }

    fn bearer_for(&self, url: &str) -> Option<&Secret> {
        self.bearer
            .iter()
            .filter(|(p, _)| {
                url.strip_prefix(p.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', '?']))
            })
            .max_by_key(|(p, _)| p.len())
            .map(|(_, t)| t)
    }
}

/// Why a request could not be prepared. Never carries a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// An `s3://` URL this module cannot turn into a request.
    S3Url(String),
    /// The URL names a profile the credentials file does not have.
    NoAwsProfile(String),
    /// No keys in the environment nor in the default profile.
    NoAwsCredentials { default_profile: String },
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::S3Url(e) => write!(f, "{e}"),
            Error::NoAwsProfile(p) => write!(f, "no AWS credentials for profile {p:?}"),
            Error::NoAwsCredentials { default_profile } => write!(
                f,
                "no AWS credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or profile {default_profile:?} \
                 in the credentials file)"
            ),
        }
    }
}

impl std::error::Error for Error {}

/// A request ready for the wire. `Debug` leaves the header values out.
///
/// For `s3://` the headers include `host`, which is signed and must be
/// sent as given, and the request must not follow redirects (the signed
/// headers, a session token among them, would go to another host).
#[derive(Clone, PartialEq, Eq)]
pub struct Prepared {
    pub url: String,
    pub headers: Vec<(&'static str, String)>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(k, _)| *k).collect();
        f.debug_struct("Prepared").field("url", &self.url).field("headers", &names).finish()
    }
}

/// The host of an `http(s)://` URL, lower case, without port or user info.
fn host_of(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host =
        if let Some(v6) = authority.strip_prefix('[') { v6.split(']').next()? } else { authority.split(':').next()? };
    Some(host.to_ascii_lowercase())
}

/// The URL and headers for `method url` at `now` (Unix seconds), without
/// a body. Errors say what is missing, never a secret.
pub fn prepare(method: &str, url: &str, now: u64, creds: &Credentials) -> Result<Prepared, Error> {
    prepare_payload(method, url, now, creds, sigv4::EMPTY_SHA256)
}

/// [`prepare`] for a request with a body whose SHA-256 is `payload_sha256`
/// (lower-case hex): S3 checks the signed `x-amz-content-sha256` against
/// the body it receives, so a PUT must sign its own.
pub fn prepare_payload(
    method: &str,
    url: &str,
    now: u64,
    creds: &Credentials,
    payload_sha256: &str,
) -> Result<Prepared, Error> {
    if url.starts_with("s3://") {
        let t = s3::target(url).map_err(Error::S3Url)?;
        let keys = creds.aws_keys(t.profile.as_deref())?;
        let date = sigv4::amz_date(now);
        let mut signed: Vec<(&str, &str)> =
            vec![("host", &t.host), ("x-amz-content-sha256", payload_sha256), ("x-amz-date", &date)];
        if let Some(tok) = &keys.session_token {
            signed.push(("x-amz-security-token", tok.expose()));
        }
        let req = sigv4::Request {
            method,
            canonical_uri: &t.canonical_uri,
            canonical_query: "",
            headers: &signed,
            payload_hash: payload_sha256,
        };
        let scope = sigv4::Scope {
            access_key_id: &keys.access_key_id,
            secret_access_key: keys.secret_access_key.expose(),
            region: &t.region,
            service: "s3",
            amz_date: &date,
        };
        let auth = sigv4::authorization(&req, &scope);
        let mut headers = vec![
            ("host", t.host.clone()),
            ("x-amz-content-sha256", payload_sha256.to_owned()),
            ("x-amz-date", date.clone()),
        ];
        if let Some(tok) = &keys.session_token {
            headers.push(("x-amz-security-token", tok.expose().to_owned()));
        }
        headers.push(("authorization", auth));
        return Ok(Prepared { url: t.url, headers });
    }
    let mut headers = Vec::new();
    if let Some(tok) = creds.bearer_for(url) {
        headers.push(("authorization", format!("Bearer {}", tok.expose())));
    } else if let Some(e) = host_of(url).and_then(|h| netrc::find(&creds.netrc, &h).cloned()) {
        if e.login.is_some() || e.password.is_some() {
            let pair = format!("{}:{}", e.login.as_deref().unwrap_or(""), e.password.as_deref().unwrap_or(""));
            headers.push(("authorization", format!("Basic {}", crate::nix::base64::encode(pair.as_bytes()))));
        }
    }
    Ok(Prepared { url: url.to_owned(), headers })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds_with(files: &[(&str, &str)], src: impl FnOnce(&Path) -> Sources) -> Credentials {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let d = dir.path().to_str().unwrap().to_owned();
        Credentials::load(&src(dir.path()), &move |k| (k == "CREDENTIALS_DIRECTORY").then(|| d.clone())).unwrap()
    }

    #[test]
    fn netrc_gives_basic_auth_to_its_host_only() {
        let c = creds_with(&[("netrc", "machine cache.example.org login alice password s3cr3t\n")], |_| Sources {
            netrc_file: Some("netrc".into()),
            ..Sources::default()
        });
        let p = prepare("GET", "https://Cache.Example.org:8443/nix-cache-info", 0, &c).unwrap();
        // base64("alice:s3cr3t")
        assert_eq!(p.headers, [("authorization", "Basic YWxpY2U6czNjcjN0".to_owned())]);
        assert!(prepare("GET", "https://other.example/x", 0, &c).unwrap().headers.is_empty());
        assert!(!format!("{p:?}").contains("YWxp"), "Debug shows no secret");
        assert!(!format!("{c:?}").contains("s3cr3t"), "Debug shows no secret");
    }

    #[test]
    fn bearer_tokens_go_to_their_prefix_longest_first() {
        let c = creds_with(&[("a", "tok-a\n"), ("b", "tok-b")], |d| Sources {
            bearer_token_files: vec![
                ("https://c.example".into(), d.join("a")),
                ("https://c.example/private/".into(), "b".into()),
            ],
            ..Sources::default()
        });
        let h = |u: &str| prepare("GET", u, 0, &c).unwrap().headers;
        assert_eq!(h("https://c.example/x.narinfo"), [("authorization", "Bearer tok-a".to_owned())]);
        assert_eq!(h("https://c.example/private/x"), [("authorization", "Bearer tok-b".to_owned())]);
        assert!(h("https://c.example.evil/x").is_empty(), "a prefix ends at a path boundary");
    }

    #[test]
    fn s3_requests_are_signed_with_the_right_profile() {
        let c = creds_with(
            &[("aws", "[default]\naws_access_key_id=AKIDDEF\naws_secret_access_key=SDEF\n[ci]\naws_access_key_id=AKIDCI\naws_secret_access_key=SCI\naws_session_token=TOK\n")],
            |_| Sources { aws_credentials_file: Some("aws".into()), ..Sources::default() },
        );
        let p = prepare("GET", "s3://b/nix-cache-info?endpoint=http://127.0.0.1:9000", 1_440_938_160, &c).unwrap();
        assert_eq!(p.url, "http://127.0.0.1:9000/b/nix-cache-info");
        let get = |name: &str| p.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str());
        assert_eq!(get("host"), Some("127.0.0.1:9000"));
        assert_eq!(get("x-amz-date"), Some("20150830T123600Z"));
        let auth = get("authorization").unwrap();
        assert!(auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDDEF/20150830/us-east-1/s3/aws4_request, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature="), "{auth}");
        let p = prepare("GET", "s3://b/k?profile=ci&region=eu-west-1", 0, &c).unwrap();
        let auth = &p.headers.iter().find(|(k, _)| *k == "authorization").unwrap().1;
        assert!(auth.contains("Credential=AKIDCI/19700101/eu-west-1/s3/aws4_request, SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token,"), "{auth}");
        let e = prepare("GET", "s3://b/k?profile=nope", 0, &c).unwrap_err();
        assert_eq!(e.to_string(), "no AWS credentials for profile \"nope\"");
    }

    /// A PUT signs its body's hash, in the header and in the signature
    /// (with the empty body's hash S3 answers XAmzContentSHA256Mismatch).
    #[test]
    fn s3_puts_sign_the_payload_hash() {
        let c = creds_with(&[("aws", "[default]\naws_access_key_id=AKID\naws_secret_access_key=S\n")], |_| Sources {
            aws_credentials_file: Some("aws".into()),
            ..Sources::default()
        });
        let body_hash = sigv4::sha256_hex(b"{}");
        let put = prepare_payload("PUT", "s3://b/c.json?endpoint=http://127.0.0.1:9", 0, &c, &body_hash).unwrap();
        let get = |p: &Prepared, name: &str| p.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone());
        assert_eq!(get(&put, "x-amz-content-sha256"), Some(body_hash));
        let empty = prepare("PUT", "s3://b/c.json?endpoint=http://127.0.0.1:9", 0, &c).unwrap();
        assert_ne!(get(&put, "authorization"), get(&empty, "authorization"));
    }

    #[test]
    fn bad_files_are_one_line_without_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let tok = dir.path().join("tok");
        std::fs::write(&tok, "two words-secret").unwrap();
        let src = Sources { bearer_token_files: vec![("https://c".into(), tok)], ..Sources::default() };
        let e = Credentials::load(&src, &|_| None).unwrap_err();
        assert!(e.contains("not one line of printable ASCII") && !e.contains("secret"), "{e}");
        let src = Sources { netrc_file: Some("netrc".into()), ..Sources::default() };
        let e = Credentials::load(&src, &|_| None).unwrap_err();
        assert!(e.contains("$CREDENTIALS_DIRECTORY"), "{e}");
        let src = Sources { aws_credentials_file: Some(dir.path().join("missing")), ..Sources::default() };
        assert!(Credentials::load(&src, &|_| None).unwrap_err().starts_with("AWS credentials file: "));
    }

    #[test]
    fn hosts_are_found_without_ports_or_users() {
        assert_eq!(host_of("https://u:p@Host.Example:8443/x").as_deref(), Some("host.example"));
        assert_eq!(host_of("http://[::1]:80/x").as_deref(), Some("::1"));
        assert_eq!(host_of("http://h?x").as_deref(), Some("h"));
    }
}
