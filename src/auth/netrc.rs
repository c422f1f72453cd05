//! `.netrc` files, as Nix's `netrc-file` option hands them to curl.
//!
//! ```text
//! file    = { entry }
//! entry   = ( "machine" token | "default" ) { field }
//! field   = "login" token | "password" token | "account" token
//!         | "macdef" token <lines up to the next empty line>
//! token   = a run of non-whitespace bytes
//!         | '"' { char | '\"' | '\\' | '\n' | '\r' | '\t' } '"'
//! ```
//! Tokens are separated by any whitespace, newlines included; `#` at the
//! start of a token comments out the rest of its line. Matching follows
//! curl (lib/netrc.c), which Nix uses: the first `machine` whose name equals
//! the URL's host, compared case-insensitively and without the port, wins;
//! `default` matches any host and ends the search, so it belongs last.
//!
//! Bounded: [`MAX_BYTES`] of text, [`MAX_TOKENS`] tokens, [`MAX_TOKEN`]
//! bytes per token. Errors name the line and never show a token (it may be
//! a password).

use std::borrow::Cow;

pub const MAX_BYTES: usize = 256 << 10;
pub const MAX_TOKENS: usize = 20_000;
pub const MAX_TOKEN: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    TooLarge,
    TooManyTokens,
    TokenTooLong {
        line: usize,
    },
    NotUtf8 {
        line: usize,
    },
    Unterminated {
        line: usize,
    },
    /// `login` at the end of the file, say.
    MissingValue {
        line: usize,
        keyword: &'static str,
    },
    /// A token where a keyword belongs (often a password with spaces that
    /// was not quoted).
    Unexpected {
        line: usize,
    },
    /// `login` before any `machine` or `default`.
    OutsideEntry {
        line: usize,
    },
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::TooLarge => write!(f, "larger than {MAX_BYTES} bytes"),
            Error::TooManyTokens => write!(f, "more than {MAX_TOKENS} tokens"),
            Error::TokenTooLong { line } => write!(f, "line {line}: a token longer than {MAX_TOKEN} bytes"),
            Error::NotUtf8 { line } => write!(f, "line {line}: not UTF-8"),
            Error::Unterminated { line } => write!(f, "line {line}: quoted token without its closing quote"),
            Error::MissingValue { line, keyword } => write!(f, "line {line}: `{keyword}` without a value"),
            Error::Unexpected { line } => write!(
                f,
                "line {line}: expected machine, default, login, password, account or macdef \
                 (a value with spaces must be quoted; the token is not shown)"
            ),
            Error::OutsideEntry { line } => write!(f, "line {line}: login/password before any machine or default"),
        }
    }
}

impl std::error::Error for Error {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    /// `None` for `default`.
    pub machine: Option<Cow<'a, str>>,
    pub login: Option<Cow<'a, str>>,
    pub password: Option<Cow<'a, str>>,
}

impl Entry<'_> {
    pub fn into_owned(self) -> Entry<'static> {
        let own = |c: Option<Cow<'_, str>>| c.map(|c| Cow::Owned(c.into_owned()));
        Entry { machine: own(self.machine), login: own(self.login), password: own(self.password) }
    }
}

/// Splits into tokens with their line numbers, borrowing unless a quoted
/// token has escapes.
struct Tokens<'a> {
    text: &'a str,
    pos: usize,
    line: usize,
    count: usize,
}

impl<'a> Tokens<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    /// Skips whitespace and comments; the byte at `pos` then starts a token.
    fn skip_space(&mut self) {
        let b = self.bytes();
        while self.pos < b.len() {
            match b[self.pos] {
                b'\n' => self.line += 1,
                b'#' => {
                    while self.pos < b.len() && b[self.pos] != b'\n' {
                        self.pos += 1;
                    }
                    continue;
                }
                c if c.is_ascii_whitespace() => {}
                _ => return,
            }
            self.pos += 1;
        }
    }

    fn next(&mut self) -> Result<Option<(usize, Cow<'a, str>)>, Error> {
        self.skip_space();
        let b = self.bytes();
        if self.pos >= b.len() {
            return Ok(None);
        }
        self.count += 1;
        if self.count > MAX_TOKENS {
            return Err(Error::TooManyTokens);
        }
        let line = self.line;
        let tok = if b[self.pos] == b'"' {
            self.pos += 1;
            let mut out = String::new();
            loop {
                match b.get(self.pos) {
                    None => return Err(Error::Unterminated { line }),
                    Some(b'"') => break,
                    Some(b'\\') => {
                        let c = match b.get(self.pos + 1) {
                            Some(b'n') => '\n',
                            Some(b'r') => '\r',
                            Some(b't') => '\t',
                            Some(b'"') => '"',
                            Some(b'\\') => '\\',
                            _ => return Err(Error::Unterminated { line }),
                        };
                        out.push(c);
                        self.pos += 2;
                    }
                    Some(_) => {
                        // Whole UTF-8 characters: the text is a str.
                        let rest = self.text.get(self.pos..).ok_or(Error::NotUtf8 { line })?;
                        let c = rest.chars().next().ok_or(Error::NotUtf8 { line })?;
                        if c == '\n' {
                            self.line += 1;
                        }
                        out.push(c);
                        self.pos += c.len_utf8();
                    }
                }
                if out.len() > MAX_TOKEN {
                    return Err(Error::TokenTooLong { line });
                }
            }
            self.pos += 1;
            Cow::Owned(out)
        } else {
            let start = self.pos;
            while self.pos < b.len() && !b[self.pos].is_ascii_whitespace() {
                self.pos += 1;
            }
            if self.pos - start > MAX_TOKEN {
                return Err(Error::TokenTooLong { line });
            }
            Cow::Borrowed(self.text.get(start..self.pos).ok_or(Error::NotUtf8 { line })?)
        };
        Ok(Some((line, tok)))
    }

    /// Skips a macro body: up to and including the next empty line.
    fn skip_macro(&mut self) {
        let b = self.bytes();
        while self.pos < b.len() {
            if b[self.pos] == b'\n' {
                self.line += 1;
                if b.get(self.pos + 1) == Some(&b'\n') {
                    self.pos += 1;
                    return;
                }
            }
            self.pos += 1;
        }
    }
}

pub fn parse(bytes: &[u8]) -> Result<Vec<Entry<'_>>, Error> {
    if bytes.len() > MAX_BYTES {
        return Err(Error::TooLarge);
    }
    let text = std::str::from_utf8(bytes).map_err(|e| Error::NotUtf8 {
        line: 1 + bytes.get(..e.valid_up_to()).unwrap_or(&[]).iter().filter(|&&b| b == b'\n').count(),
    })?;
    let mut toks = Tokens { text, pos: 0, line: 1, count: 0 };
    let mut entries: Vec<Entry> = Vec::new();
    while let Some((line, tok)) = toks.next()? {
        let mut value = |keyword: &'static str| -> Result<Cow<'_, str>, Error> {
            toks.next()?.map(|(_, v)| v).ok_or(Error::MissingValue { line, keyword })
        };
        match &*tok {
            "machine" => {
                let m = value("machine")?;
                entries.push(Entry { machine: Some(m), login: None, password: None });
            }
            "default" => entries.push(Entry { machine: None, login: None, password: None }),
            "login" | "password" | "account" => {
                let keyword = match &*tok {
                    "login" => "login",
                    "password" => "password",
                    _ => "account",
                };
                let v = value(keyword)?;
                let e = entries.last_mut().ok_or(Error::OutsideEntry { line })?;
                match keyword {
                    "login" => e.login = Some(v),
                    "password" => e.password = Some(v),
                    _ => {}
                }
            }
            "macdef" => {
                value("macdef")?;
                toks.skip_macro();
            }
            _ => return Err(Error::Unexpected { line }),
        }
    }
    Ok(entries)
}

/// The entry for `host` (no port), curl's way: first matching machine,
/// else a `default` met before any later match.
pub fn find<'e, 'a>(entries: &'e [Entry<'a>], host: &str) -> Option<&'e Entry<'a>> {
    entries.iter().find(|e| e.machine.as_deref().is_none_or(|m| m.eq_ignore_ascii_case(host)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines_and_free_form() {
        let text = b"# cache credentials\nmachine cache.example.org login alice password s3cr3t\n\
                     machine other.example login bob\n  password \"with space\\\"q\"\n\
                     machine  x.example\tlogin c password d macdef init\ncd /\nput x\n\nmachine y login e password f\n\
                     default login anon password guest\n";
        let e = parse(text).unwrap();
        assert_eq!(e.len(), 5);
        let f = find(&e, "CACHE.example.org").unwrap();
        assert_eq!((f.login.as_deref(), f.password.as_deref()), (Some("alice"), Some("s3cr3t")));
        assert!(matches!(f.password, Some(Cow::Borrowed(_))), "plain tokens borrow");
        assert_eq!(find(&e, "other.example").unwrap().password.as_deref(), Some("with space\"q"));
        // The macro body is skipped, and the entry after it still parsed.
        assert_eq!(find(&e, "y").unwrap().login.as_deref(), Some("e"));
        assert_eq!(find(&e, "unknown.example").unwrap().login.as_deref(), Some("anon"));
    }

    /// curl stops at the first match, and `default` matches everything, so
    /// a machine after it is never reached.
    #[test]
    fn first_match_wins_like_curl() {
        let e = parse(b"machine a login 1 password x\nmachine a login 2\ndefault login d\nmachine b login 3").unwrap();
        assert_eq!(find(&e, "a").unwrap().login.as_deref(), Some("1"));
        assert_eq!(find(&e, "b").unwrap().login.as_deref(), Some("d"));
        assert!(find(&parse(b"machine a login 1").unwrap(), "b").is_none());
    }

    #[test]
    fn refuses_bad_files_without_showing_tokens() {
        for (text, want) in [
            (&b"machine a login"[..], Error::MissingValue { line: 1, keyword: "login" }),
            (b"login x", Error::OutsideEntry { line: 1 }),
            (b"machine a\npassword my secret words", Error::Unexpected { line: 2 }),
            (b"machine a password \"open", Error::Unterminated { line: 1 }),
            (b"machine a password \xff", Error::NotUtf8 { line: 1 }),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e, want);
            let shown = e.to_string();
            assert!(!shown.contains("secret") && !shown.contains("open"), "{shown}");
        }
        assert_eq!(parse(&vec![b' '; MAX_BYTES + 1]).unwrap_err(), Error::TooLarge);
        assert_eq!(parse("default ".repeat(MAX_TOKENS + 1).as_bytes()).unwrap_err(), Error::TooManyTokens);
        let long = format!("machine {}", "a".repeat(MAX_TOKEN + 1));
        assert_eq!(parse(long.as_bytes()).unwrap_err(), Error::TokenTooLong { line: 1 });
        let long = format!("machine \"{}\"", "a".repeat(MAX_TOKEN + 1));
        assert_eq!(parse(long.as_bytes()).unwrap_err(), Error::TokenTooLong { line: 1 });
    }

    /// Mutated files: never a panic, and every error one short line.
    #[test]
    fn mutated_files_never_panic() {
        use crate::testkit::{mutate, Rng};
        let seeds: &[&[u8]] = &[
            b"machine a.example login alice password \"p \\\"q\\\\\"\nmacdef init\ncd /\n\ndefault login anon # c\n",
            b"# only a comment\nmachine b\tlogin \"\xc3\xa9\" account x password y\n",
        ];
        let dict: &[&[u8]] = &[
            b"machine ",
            b"login ",
            b"password ",
            b"account ",
            b"macdef ",
            b"default ",
            b"\"",
            b"\\",
            b"\n\n",
            b"#",
            "\u{e9}".as_bytes(),
            b"\xff",
            b"\xc3",
        ];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..20_000 {
            let seed = seeds[rng.below(seeds.len())];
            let b = mutate(&mut rng, seed, dict, 5000);
            match parse(&b) {
                Ok(entries) => {
                    let _ = find(&entries, "a.example");
                }
                Err(e) => {
                    let m = e.to_string();
                    assert!(m.len() < 200 && !m.contains('\n'), "round {round}: {m}");
                }
            }
        }
    }
}
