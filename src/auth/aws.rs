//! AWS credentials: the shared credentials file and the environment.
//!
//! ```text
//! file    = { line "\n" }
//! line    = blank | comment | section | setting
//! comment = ( "#" | ";" ) any
//! section = "[" name "]" | "[profile " name "]"
//! setting = key "=" value          (spaces around both trimmed)
//! ```
//! Only `aws_access_key_id`, `aws_secret_access_key` and
//! `aws_session_token` are read; other keys (`region`, `output`, …) are
//! ignored, as the SDKs do for a credentials file. A profile without both
//! the key id and the secret is skipped. Bounded to [`MAX_BYTES`] and
//! [`MAX_LINES`]; errors name the line, never its value.

use super::Secret;

pub const MAX_BYTES: usize = 256 << 10;
pub const MAX_LINES: usize = 10_000;
/// Longest key id, secret or session token accepted (session tokens run
/// to about 1–2 KiB).
pub const MAX_VALUE: usize = 8192;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    TooLarge,
    TooManyLines,
    NotUtf8,
    /// Neither a section, a comment nor `key = value`.
    Malformed {
        line: usize,
    },
    /// A value too long, or with characters no header may carry.
    BadValue {
        line: usize,
        key: String,
    },
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::TooLarge => write!(f, "larger than {MAX_BYTES} bytes"),
            Error::TooManyLines => write!(f, "more than {MAX_LINES} lines"),
            Error::NotUtf8 => write!(f, "not UTF-8"),
            Error::Malformed { line } => write!(f, "line {line}: expected [profile], key = value or a comment"),
            Error::BadValue { line, key } => {
                write!(f, "line {line}: {key}: empty, longer than {MAX_VALUE} bytes, or not printable ASCII")
            }
        }
    }
}

impl std::error::Error for Error {}

/// A value that goes into a header: printable ASCII without spaces.
pub fn valid_value(v: &str) -> bool {
    !v.is_empty() && v.len() <= MAX_VALUE && v.bytes().all(|b| b.is_ascii_graphic())
}

/// Every complete profile in `bytes`, in file order.
pub fn parse(bytes: &[u8]) -> Result<Vec<(String, Keys)>, Error> {
    if bytes.len() > MAX_BYTES {
        return Err(Error::TooLarge);
    }
    let text = std::str::from_utf8(bytes).map_err(|_| Error::NotUtf8)?;
    type Partial = (String, Option<String>, Option<Secret>, Option<Secret>);
    let mut profiles: Vec<Partial> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if line > MAX_LINES {
            return Err(Error::TooManyLines);
        }
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') || l.starts_with(';') {
            continue;
        }
        if let Some(name) = l.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            let name = name.trim();
            let name = name.strip_prefix("profile ").map(str::trim).unwrap_or(name);
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err(Error::Malformed { line });
            }
            profiles.push((name.to_owned(), None, None, None));
            continue;
        }
        let (key, value) = l.split_once('=').ok_or(Error::Malformed { line })?;
        let (key, value) = (key.trim(), value.trim());
        let Some(p) = profiles.last_mut() else {
            return Err(Error::Malformed { line });
        };
        let slot = match key {
            "aws_access_key_id" => {
                check(value, line, key)?;
                p.1 = Some(value.to_owned());
                continue;
            }
            "aws_secret_access_key" => &mut p.2,
            "aws_session_token" => &mut p.3,
            _ => continue,
        };
        check(value, line, key)?;
        *slot = Some(Secret::new(value.to_owned()));
    }
    Ok(profiles
        .into_iter()
        .filter_map(|(name, id, secret, token)| {
            Some((name, Keys { access_key_id: id?, secret_access_key: secret?, session_token: token }))
        })
        .collect())
}

fn check(value: &str, line: usize, key: &str) -> Result<(), Error> {
    if valid_value(value) {
        Ok(())
    } else {
        Err(Error::BadValue { line, key: key.to_owned() })
    }
}

/// Keys from `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and
/// `AWS_SESSION_TOKEN`, if the first two are set.
pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Keys>, String> {
    let (Some(id), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) else {
        return Ok(None);
    };
    let token = env("AWS_SESSION_TOKEN").filter(|t| !t.is_empty());
    for (name, v) in [
        ("AWS_ACCESS_KEY_ID", Some(&id)),
        ("AWS_SECRET_ACCESS_KEY", Some(&secret)),
        ("AWS_SESSION_TOKEN", token.as_ref()),
    ] {
        if v.is_some_and(|v| !valid_value(v)) {
            return Err(format!("{name}: empty, longer than {MAX_VALUE} bytes, or not printable ASCII"));
        }
    }
    Ok(Some(Keys { access_key_id: id, secret_access_key: Secret::new(secret), session_token: token.map(Secret::new) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_profiles_like_the_sdks() {
        let text = b"; comment\n[default]\naws_access_key_id = AKID1\naws_secret_access_key=SECRET1\nregion = eu-west-1\n\n\
                     [profile cache]\n  aws_access_key_id=AKID2  \naws_secret_access_key = SECRET2\naws_session_token = TOK\n\
                     [incomplete]\naws_access_key_id = AKID3\n";
        let p = parse(text).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].0, "default");
        assert_eq!(p[0].1.access_key_id, "AKID1");
        assert_eq!(p[0].1.secret_access_key.expose(), "SECRET1");
        assert_eq!(p[1].0, "cache");
        assert_eq!(p[1].1.session_token.as_ref().map(Secret::expose), Some("TOK"));
    }

    #[test]
    fn refuses_bad_files_without_showing_values() {
        let e = parse(b"[default]\naws_secret_access_key = has space secret\n").unwrap_err();
        assert_eq!(e, Error::BadValue { line: 2, key: "aws_secret_access_key".into() });
        assert!(!e.to_string().contains("secret "), "{e}");
        assert_eq!(parse(b"aws_access_key_id = x\n").unwrap_err(), Error::Malformed { line: 1 });
        assert_eq!(parse(b"[default]\njunk\n").unwrap_err(), Error::Malformed { line: 2 });
        assert_eq!(parse(&vec![b'\n'; MAX_BYTES + 1]).unwrap_err(), Error::TooLarge);
        assert_eq!(parse("#\n".repeat(MAX_LINES + 1).as_bytes()).unwrap_err(), Error::TooManyLines);
    }

    #[test]
    fn environment_needs_both_keys() {
        let env = |k: &str| match k {
            "AWS_ACCESS_KEY_ID" => Some("AKID".to_owned()),
            "AWS_SECRET_ACCESS_KEY" => Some("S".to_owned()),
            _ => None,
        };
        let k = from_env(&env).unwrap().unwrap();
        assert_eq!((k.access_key_id.as_str(), k.session_token.is_none()), ("AKID", true));
        assert_eq!(from_env(&|k: &str| env(k).filter(|_| k != "AWS_SECRET_ACCESS_KEY")).unwrap(), None);
    }

    /// Mutated files: never a panic, and every error one short line.
    #[test]
    fn mutated_files_never_panic() {
        use crate::testkit::{mutate, Rng};
        let seed = b"; c\n[default]\naws_access_key_id = AKID\naws_secret_access_key=S/K+e\n[profile ci]\naws_session_token=T\n";
        let dict: &[&[u8]] =
            &[b"[", b"]", b"profile ", b"=", b"\n", b"aws_secret_access_key", b"\xff", "\u{e9}".as_bytes()];
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for round in 0..20_000 {
            let b = mutate(&mut rng, seed, dict, 5000);
            if let Err(e) = parse(&b) {
                let m = e.to_string();
                assert!(m.len() < 200 && !m.contains('\n'), "round {round}: {m}");
            }
        }
    }
}
