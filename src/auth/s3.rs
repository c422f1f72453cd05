//! `s3://` URLs in Nix's form, turned into the HTTP request to make.
//!
//! ```text
//! cache  = "s3://" bucket [ "?" params ]
//! object = "s3://" bucket "/" key [ "?" params ]   (params after the last "?";
//!                                                   a key may hold a "?")
//! params = param { "&" param }        (values percent-decoded)
//! param  = "region=" name             default us-east-1
//!        | "endpoint=" ( scheme "://" authority [path] | authority )
//!        | "scheme=" ( "https" | "http" )   default https; a full endpoint URL brings its own
//!        | "profile=" name            credentials profile
//!        | Nix store settings that do not change reads (priority, want-mass-query,
//!          trusted, compression, …): accepted and ignored
//! ```
//! As Nix (libstore/s3-url.cc, `ParsedS3URL::toHttpsUrl`): always
//! path-style, `{endpoint}/{bucket}/{key}`, and without an endpoint
//! `s3.{region}.amazonaws.com`.

use super::sigv4::uri_encode;

/// Where an S3 object is fetched from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The http(s) URL, path encoded.
    pub url: String,
    /// The `Host` header (signed, so set explicitly).
    pub host: String,
    /// The encoded path, as signed.
    pub canonical_uri: String,
    pub region: String,
    pub profile: Option<String>,
}

/// Store settings of Nix's that appear in cache URLs and do not change
/// how a read is made.
const IGNORED: &[&str] = &[
    "priority",
    "want-mass-query",
    "trusted",
    "compression",
    "compression-level",
    "parallel-compression",
    "write-nar-listing",
    "write-debug-info",
    "index-debug-info",
    "narinfo-compression",
    "ls-compression",
    "log-compression",
    "multipart-upload",
    "multipart-chunk-size",
    "multipart-threshold",
    "buffer-size",
    "secret-key",
    "local-nar-cache",
];

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            // Two hex digits: from_str_radix alone would also take "+5".
            let hex = b.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit))?;
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn valid_name(s: &str, max: usize, extra: &[u8]) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|c| c.is_ascii_alphanumeric() || extra.contains(&c))
}

/// `host[:port]`, a name or an IP (IPv6 in brackets); no user info.
fn valid_authority(s: &str) -> bool {
    valid_name(s, 255, b".-:[]_")
}

/// Parses `url` (a cache or an object URL) into the request to make.
pub fn target(url: &str) -> Result<Target, String> {
    let rest = url.strip_prefix("s3://").ok_or("not an s3:// URL")?;
    // The parameters follow the last `?`: an object key may hold one (a
    // narinfo's URL with a query; [`crate::fetch::CacheUrl::join`] then ends
    // the URL with the cache's parameters, or a bare `?`).
    let (main, query) = rest.rsplit_once('?').unwrap_or((rest, ""));
    let (bucket, key) = main.split_once('/').unwrap_or((main, ""));
    // Legacy buckets may have capitals and underscores; nothing else.
    if !valid_name(bucket, 255, b".-_") {
        return Err("bucket name missing or not [A-Za-z0-9.-_]".into());
    }
    let (mut region, mut endpoint, mut scheme, mut profile) = ("us-east-1".to_owned(), None, None, None);
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = param.split_once('=').unwrap_or((param, ""));
        let shown = || crate::text::clip(k, 40);
        let v = percent_decode(v).ok_or_else(|| format!("parameter \"{}\": bad percent-encoding", shown()))?;
        match k {
            "region" if valid_name(&v, 64, b"-") => region = v,
            "endpoint" if !v.is_empty() => endpoint = Some(v),
            "scheme" if v == "http" || v == "https" => scheme = Some(v),
            "profile" if valid_name(&v, 128, b"-_.@+=,") => profile = Some(v),
            "region" | "endpoint" | "scheme" | "profile" => return Err(format!("parameter {k}: invalid value")),
            k if IGNORED.contains(&k) => {}
            _ => {
                return Err(format!("unknown parameter \"{}\" (known: region, endpoint, scheme, profile)", shown()));
            }
        }
    }
    let (scheme, authority, base_path) = match endpoint {
        None => (scheme.unwrap_or_else(|| "https".into()), format!("s3.{region}.amazonaws.com"), String::new()),
        Some(e) => match e.split_once("://") {
            Some((s, rest)) => {
                if s != "http" && s != "https" {
                    return Err("endpoint: scheme must be http or https".into());
                }
                let (auth, path) = rest.split_once('/').unwrap_or((rest, ""));
                let path = path.trim_end_matches('/');
                (s.to_owned(), auth.to_owned(), if path.is_empty() { String::new() } else { format!("/{path}") })
            }
            None => (scheme.unwrap_or_else(|| "https".into()), e, String::new()),
        },
    };
    if !valid_authority(&authority) || authority.contains('@') {
        return Err("endpoint: expected host[:port], without user or password".into());
    }
    // The Host header is what the server sees: no default port.
    let default_port = if scheme == "https" { ":443" } else { ":80" };
    let host = authority.strip_suffix(default_port).unwrap_or(&authority).to_owned();
    let canonical_uri = uri_encode(&format!("{base_path}/{bucket}/{key}"), true);
    Ok(Target { url: format!("{scheme}://{host}{canonical_uri}"), host, canonical_uri, region, profile })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_nix_defaults_and_path_style() {
        let t = target("s3://nix-cache/nix-cache-info").unwrap();
        assert_eq!(t.url, "https://s3.us-east-1.amazonaws.com/nix-cache/nix-cache-info");
        assert_eq!((t.host.as_str(), t.region.as_str(), t.profile), ("s3.us-east-1.amazonaws.com", "us-east-1", None));
        let t = target("s3://b/nar/x.nar.zst?region=eu-west-2&profile=ci&priority=40").unwrap();
        assert_eq!(t.url, "https://s3.eu-west-2.amazonaws.com/b/nar/x.nar.zst");
        assert_eq!(t.profile.as_deref(), Some("ci"));
        let t = target("s3://b/k?endpoint=http%3A%2F%2F127.0.0.1%3A9000&region=garage").unwrap();
        assert_eq!((t.url.as_str(), t.host.as_str()), ("http://127.0.0.1:9000/b/k", "127.0.0.1:9000"));
        let t = target("s3://b/k?endpoint=minio.lan:9000&scheme=http").unwrap();
        assert_eq!(t.url, "http://minio.lan:9000/b/k");
        let t = target("s3://b/k?endpoint=https://r2.example:443/base/").unwrap();
        assert_eq!((t.url.as_str(), t.canonical_uri.as_str()), ("https://r2.example/base/b/k", "/base/b/k"));
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        for (url, needle) in [
            ("s3://", "bucket name"),
            ("s3://bu cket", "bucket name"),
            ("s3://b?regoin=x", "unknown parameter \"regoin\""),
            ("s3://b?scheme=ftp", "parameter scheme"),
            ("s3://b?endpoint=ftp://x", "scheme must be"),
            ("s3://b?endpoint=user:pw@host", "without user"),
            ("s3://b?region=%zz", "percent"),
            ("s3://b?region=%+5", "percent"),
            ("s3://b?endpoint=%+a", "percent"),
        ] {
            let e = target(url).unwrap_err();
            assert!(e.contains(needle), "{url}: {e}");
            assert!(!e.contains("pw"), "{e}");
        }
        // A parameter's name is shown escaped and clipped, whatever the error.
        let long = "k".repeat(10_000);
        for url in ["s3://b?x\ny\u{1b}[2J=%zz".to_owned(), format!("s3://b?{long}=%zz"), format!("s3://b?{long}=1")] {
            let e = target(&url).unwrap_err();
            assert!(e.len() < 200 && !e.contains(['\n', '\u{1b}']), "{e}");
        }
    }

    /// Mutated URLs (cache and object, as configured and as joined): never a
    /// panic, every error one short line, and any target a clean request.
    #[test]
    fn mutated_urls_never_panic() {
        use crate::testkit::{mutate, Rng};
        let seeds: &[&[u8]] = &[
            b"s3://b/nar/x.nar?region=eu-west-1&endpoint=http%3A%2F%2F127.0.0.1%3A9000%2Fbase&profile=ci",
            b"s3://b.c_d/k?endpoint=[::1]:9000&scheme=http&priority=40",
        ];
        let dict: &[&[u8]] =
            &[b"?", b"&", b"=", b"%", b"%2", b"://", b"/", b"@", b"endpoint=", b"\n", "\u{e9}".as_bytes()];
        let mut rng = Rng(0x5851_f42d_4c95_7f2d);
        for round in 0..20_000 {
            let seed = seeds[rng.below(seeds.len())];
            let b = mutate(&mut rng, seed, dict, 300);
            match target(&String::from_utf8_lossy(&b)) {
                Ok(t) => {
                    let clean = |s: &str| s.bytes().all(|c| c.is_ascii_graphic());
                    assert!(clean(&t.url) && clean(&t.host) && !t.host.contains('@'), "round {round}: {t:?}");
                }
                Err(e) => assert!(e.len() < 200 && !e.contains('\n'), "round {round}: {e}"),
            }
        }
    }
}
