//! Client-supplied text on its way into a log line, an error or the status.
//!
//! Anything a stranger sends (a key name in a signature header, a host in a
//! document, a URL in a poll error) may be huge, multi-byte or full of
//! control characters. [`clip`] makes it safe to print: at most `max` chars
//! (cut on a character boundary, never by byte index), every control
//! character escaped so it cannot forge a second log line.

use std::fmt::Write as _;

/// Default bound for one client-supplied value in a message.
pub const FIELD_MAX: usize = 128;

/// `s` with control characters escaped (`\n`, `\u{1b}`, …) and cut to at
/// most `max` characters of output (the escapes count), with `…` and the
/// number of bytes left out when it had to cut.
pub fn clip(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max.saturating_mul(4)) + 16);
    let mut used = 0usize;
    for (i, c) in s.char_indices() {
        let piece = escape(c);
        let n = piece.chars().count();
        if used + n > max {
            let _ = write!(out, "…(+{} bytes)", s.len() - i);
            return out;
        }
        used += n;
        out.push_str(&piece);
    }
    out
}

/// `s` cut to at most `max` characters (on a character boundary), with `…`
/// and the number of bytes left out; nothing escaped (for output that escapes
/// by itself, such as a JSON string).
pub fn bound(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…(+{} bytes)", s.get(..i).unwrap_or_default(), s.len() - i).into(),
        None => s.into(),
    }
}

/// Like [`clip`] for bytes that may not be UTF-8 (invalid sequences are
/// shown as U+FFFD).
pub fn clip_bytes(b: &[u8], max: usize) -> String {
    // Decode no more than could be shown: max chars of at most 4 bytes.
    let head = b.get(..b.len().min(max.saturating_mul(4).saturating_add(4))).unwrap_or(b);
    let mut s = clip(&String::from_utf8_lossy(head), max);
    if head.len() < b.len() && !s.ends_with(')') {
        let _ = write!(s, "…(+{} bytes)", b.len() - head.len());
    }
    s
}

fn escape(c: char) -> std::borrow::Cow<'static, str> {
    match c {
        '\n' => "\\n".into(),
        '\r' => "\\r".into(),
        '\t' => "\\t".into(),
        '\\' => "\\\\".into(),
        // C0, DEL, C1, and the bidi/line separators that reorder or break
        // what a terminal shows.
        c if c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') =>
        {
            format!("\\u{{{:x}}}", u32::from(c)).into()
        }
        c => c.to_string().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_controls_and_keeps_text() {
        assert_eq!(clip("a\nb\u{1b}[31m\\é", 100), "a\\nb\\u{1b}[31m\\\\é");
        assert_eq!(clip("x\u{202e}y", 100), "x\\u{202e}y");
    }

    #[test]
    fn cuts_on_char_boundaries_whatever_the_width() {
        let euro = "€".repeat(8000);
        let c = clip(&euro, 10);
        assert!(c.starts_with(&"€".repeat(10)), "{c}");
        assert!(c.ends_with("…(+23970 bytes)"), "{c}");
        for max in 0..20 {
            for s in ["€€€", "a\n€\u{1}", "", "ab"] {
                let c = clip(s, max);
                assert!(!c.contains('\n'));
            }
        }
        // An escape is never cut in half.
        assert_eq!(clip("\n\n", 3), "\\n…(+1 bytes)");
    }

    #[test]
    fn bound_cuts_without_escaping() {
        assert_eq!(bound("a\\b€€", 3), "a\\b…(+6 bytes)");
        assert_eq!(bound("€€", 2), "€€");
        assert_eq!(bound("", 0), "");
    }

    #[test]
    fn bytes_are_bounded_before_decoding() {
        let big = vec![0xffu8; 1 << 20];
        let c = clip_bytes(&big, 8);
        assert!(c.len() < 100, "{c}");
        assert!(c.contains("bytes)"));
        assert_eq!(clip_bytes(b"key\x00name", 50), "key\\u{0}name");
    }
}
