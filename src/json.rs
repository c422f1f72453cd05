//! JSON in and out, one path each way. Every JSON the agent writes (state,
//! status, switch requests and results, deploy documents, HTTP bodies) is a
//! serde `Serialize` struct written by [`to_string`]: serde-json-core
//! escapes `"` `\\` and every control character, so a hostile string cannot
//! end its string early or break a line. Every JSON it reads (deploy
//! documents, config, state, switch requests, an agent's status on the
//! admin side) goes through [`from_slice_bounded`], into the same structs:
//! serde-json-core recurses once per nested array or object, with no limit
//! of its own, so 2 000 000 nested arrays in an ignored field overflow the
//! stack. The depth is checked first, without recursion.

/// Deepest nesting of arrays and objects read anywhere. Our own documents
/// nest at most 3 levels; 32 leaves room for fields added later, and
/// serde-json-core needs well under 1 KiB of stack per level.
pub const MAX_DEPTH: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    TooDeep {
        max: usize,
    },
    /// A `"` where no string may begin. serde-json-core skips an unknown
    /// scalar up to the next `,` `}` `]` without reading quotes, so such a
    /// quote would make it and [`check_depth`] disagree about where strings
    /// are, and brackets the check took for text would reach the parser.
    StrayQuote {
        at: usize,
    },
    Invalid(serde_json_core::de::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::TooDeep { max } => write!(f, "arrays and objects nested deeper than {max} levels"),
            Error::StrayQuote { at } => write!(f, "invalid JSON: a string cannot begin at byte {at}"),
            Error::Invalid(e) => write!(f, "{e}"),
        }
    }
}

/// Refuses `json` if arrays and objects nest deeper than `max`. Iterative,
/// constant memory; brackets inside strings (escapes included) do not
/// count. Not a validator: serde-json-core does that afterwards.
pub fn check_depth(json: &[u8], max: usize) -> Result<(), Error> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    // The last byte outside strings that is not whitespace.
    let mut prev: Option<u8> = None;
    for (at, &b) in json.iter().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b' ' | b'\t' | b'\n' | b'\r' => continue,
            b'"' if !matches!(prev, None | Some(b'{' | b'[' | b',' | b':')) => return Err(Error::StrayQuote { at }),
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Err(Error::TooDeep { max });
                }
            }
            // Unbalanced closers are the parser's to refuse.
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        prev = Some(b);
    }
    Ok(())
}

/// [`check_depth`] with [`MAX_DEPTH`], then serde-json-core (escaped
/// strings allowed). Trailing bytes other than whitespace are refused.
pub fn from_slice_bounded<'a, T: serde::Deserialize<'a>>(json: &'a [u8]) -> Result<T, Error> {
    check_depth(json, MAX_DEPTH)?;
    let mut scratch = vec![0u8; json.len()];
    serde_json_core::from_slice_escaped(json, &mut scratch).map(|(v, _)| v).map_err(Error::Invalid)
}

/// Largest JSON [`to_string`] writes: the largest deploy document an agent
/// accepts (`max_body_bytes` at most). What the agent writes itself is
/// bounded far below this (messages are clipped, lists are short); the
/// budget makes an unbounded one an error instead of unbounded memory.
pub const MAX_OUTPUT: usize = 16 << 20;

/// What [`to_string`] refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge;

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JSON output larger than {MAX_OUTPUT} bytes")
    }
}

impl std::error::Error for TooLarge {}

/// `v` as JSON. serde-json-core writes into a fixed slice, so the buffer
/// starts at 1 KiB and doubles while it is full, up to [`MAX_OUTPUT`].
/// Only for our own structs of strings, numbers, options, lists and
/// structs: serde-json-core panics on `char` and on a custom error.
pub fn to_string<T: serde::Serialize + ?Sized>(v: &T) -> Result<String, TooLarge> {
    let mut size = 1024;
    loop {
        let mut buf = vec![0u8; size];
        match serde_json_core::to_slice(v, &mut buf) {
            Ok(n) => {
                buf.truncate(n);
                // Only whole `str`s and ASCII go in, so this cannot fail.
                return String::from_utf8(buf).map_err(|_| TooLarge);
            }
            Err(_) if size < MAX_OUTPUT => size = (size * 2).min(MAX_OUTPUT),
            Err(_) => return Err(TooLarge),
        }
    }
}

/// A string for round-trip tests: quotes, backslashes, control
/// characters, DEL, non-ASCII (one to four bytes) and a would-be field break.
#[cfg(test)]
pub(crate) const HOSTILE: &str = "a\"b\\c\nd\u{0}\u{1}\u{8}\u{c}\r\t\u{1b}[31m\u{1f}\u{7f}é€𝄞\",\"x\":\"y\"}\\";

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug)]
    struct Doc {
        a: u64,
    }

    /// `{"a":1,"x":…}` with `n` levels inside `x`; objects as `{"k":…}`.
    fn nested(open: &str, close: &str, n: usize) -> String {
        let inner = if open == "[" { "" } else { "0" };
        format!("{{\"a\":1,\"x\":{}{inner}{}}}", open.repeat(n), close.repeat(n))
    }

    #[test]
    fn depth_32_is_read_and_33_refused() {
        // The outer object is level 1.
        let ok = nested("[", "]", MAX_DEPTH - 1);
        assert_eq!(from_slice_bounded::<Doc>(ok.as_bytes()).unwrap().a, 1);
        let ok = nested("{\"k\":", "}", MAX_DEPTH - 1);
        assert_eq!(from_slice_bounded::<Doc>(ok.as_bytes()).unwrap().a, 1);
        for deep in [nested("[", "]", MAX_DEPTH), nested("{\"k\":", "}", MAX_DEPTH)] {
            assert_eq!(from_slice_bounded::<Doc>(deep.as_bytes()).unwrap_err(), Error::TooDeep { max: MAX_DEPTH });
        }
    }

    /// Without the check, serde-json-core overflows the stack on these
    /// (the test process dies with SIGSEGV).
    #[test]
    fn two_million_levels_are_a_clean_error() {
        for (open, close) in [("[", "]"), ("{\"k\":", "}")] {
            let deep = nested(open, close, 2_000_000);
            let e = from_slice_bounded::<Doc>(deep.as_bytes()).unwrap_err();
            assert_eq!(e.to_string(), "arrays and objects nested deeper than 32 levels");
            // Unclosed, as a truncated or hostile body would be.
            assert_eq!(check_depth(open.repeat(2_000_000).as_bytes(), MAX_DEPTH), Err(Error::TooDeep { max: 32 }));
        }
    }

    #[test]
    fn brackets_inside_strings_do_not_count() {
        let text = format!(r#"{{"a":2,"s":"{}\"{}\\","t":["\\\"[{{"]}}"#, "[".repeat(100), "{".repeat(100));
        assert_eq!(from_slice_bounded::<Doc>(text.as_bytes()).unwrap().a, 2);
        // An escaped backslash ends the escape: the quote after it closes
        // the string, so the brackets after it count.
        let deep = format!(r#"{{"a":1,"s":"\\",{}"#, "[".repeat(40));
        assert_eq!(check_depth(deep.as_bytes(), MAX_DEPTH), Err(Error::TooDeep { max: 32 }));
    }

    /// serde-json-core skips an unknown scalar up to the next `,` without
    /// reading quotes; here it would then parse `"y"` and the 2 000 000
    /// arrays, while a quote-only scanner thinks they are inside a string.
    #[test]
    fn a_quote_that_cannot_start_a_string_is_refused() {
        let sneaky = format!(r#"{{"a":1,"x":1" ,"y":{}{}}}"#, "[".repeat(2_000_000), "]".repeat(2_000_000));
        assert_eq!(from_slice_bounded::<Doc>(sneaky.as_bytes()).unwrap_err(), Error::StrayQuote { at: 12 });
        for bad in [r#"{"a":1 "b":2}"#, r#"{"a":"x""y"}"#, r#"{"a":[1]"b"}"#] {
            assert!(matches!(check_depth(bad.as_bytes(), MAX_DEPTH), Err(Error::StrayQuote { .. })), "{bad}");
        }
        for good in [r#" "s" "#, r#"{ "a" : [ "x" , "y" ] }"#, "{\"a\":\n\t\"b\"}"] {
            assert_eq!(check_depth(good.as_bytes(), MAX_DEPTH), Ok(()), "{good}");
        }
    }

    #[test]
    fn serde_errors_pass_through() {
        assert!(matches!(from_slice_bounded::<Doc>(b"{\"a\":-1}"), Err(Error::Invalid(_))));
        assert!(matches!(from_slice_bounded::<Doc>(b"{\"a\":1} x"), Err(Error::Invalid(_))));
    }

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Hostile {
        s: String,
        o: Option<String>,
        v: Vec<String>,
    }

    #[test]
    fn writes_hostile_strings_that_read_back() {
        let all_controls: String = (0u8..0x20).map(char::from).collect();
        let h = Hostile { s: HOSTILE.into(), o: Some(all_controls), v: vec![String::new(), "\\\"".into()] };
        let out = to_string(&h).unwrap();
        assert!(!out.contains('\n') && !out.contains('\r') && !out.bytes().any(|b| b < 0x20), "{out}");
        assert_eq!(from_slice_bounded::<Hostile>(out.as_bytes()).unwrap(), h);
        assert_eq!(to_string(&"a\"\\\n\u{1}").unwrap(), r#""a\"\\\n\u0001""#);
    }

    #[test]
    fn output_grows_to_its_budget_and_no_further() {
        let big = Hostile { s: "x".repeat(300_000), o: None, v: vec!["\"".repeat(100_000); 2] };
        let out = to_string(&big).unwrap();
        assert_eq!(from_slice_bounded::<Hostile>(out.as_bytes()).unwrap(), big);
        let huge = Hostile { s: "x".repeat(MAX_OUTPUT), o: None, v: vec![] };
        assert_eq!(to_string(&huge), Err(TooLarge));
    }
}
