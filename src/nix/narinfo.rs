//! `.narinfo` files: what a binary cache says about one store path.
//!
//! Grammar (as Nix writes it; every line, the last one included, ends in `\n`):
//! ```text
//! narinfo = *( field "\n" )
//! field   = key ": " value            ; key has no ":", value has no "\n"
//! StorePath:   /nix/store/<base>      ; required, must be the path asked for
//! URL:         relative URL of the NAR, may carry a query   ; required
//! Compression: none | br | bzip2 | compress | grzip | gzip | lrzip | lz4
//!            | lzip | lzma | lzop | xz | zstd      ; absent or empty: bzip2
//! FileHash:    hash                   ; of the compressed file, optional
//! FileSize:    decimal                ; optional
//! NarHash:     hash                   ; required, sha256 only (see `hash`)
//! NarSize:     decimal > 0            ; required
//! References:  *( base " " )          ; base names, may be empty or absent
//! Deriver:     base | "unknown-deriver"
//! Sig:         name ":" base64        ; may repeat
//! CA:          "" | ("text" | "fixed" [":r"]) ":" algo ":" hash   ; checked, not used
//! ```
//!
//! Each rule against current Nix (`src/libstore/nar-info.cc`, the
//! `NarInfo(store, s, whence)` constructor); we must never accept what it
//! refuses, and where we are stricter it says "ours":
//! - lines: Nix takes the key up to the first `:`, skips the one byte after
//!   it, and needs a `\n` after that, so a file whose last line lacks its
//!   `\n`, or ending in `Key:\n`, is corrupt to Nix and to us. Ours: the byte
//!   after `:` must be a space, and blank or colon-less lines are refused
//!   (Nix would glue them to the next line).
//! - StorePath: `StoreDirConfig::parseStorePath` and `StorePath()` in
//!   `path.cc` (32 nix32 characters, `-`, a name of 1..=211 characters from
//!   `[A-Za-z0-9+-._?=]`, not `.`/`..` or starting `.-`/`..-`). Ours: no
//!   non-canonical spellings such as `/nix/store//x` (Nix runs `canonPath`).
//! - URL: Nix needs it non-empty. Ours: relative, no `..`/`.` segment, no
//!   scheme, no leading `/`.
//! - Compression: `parseCompressionAlgo` in `compression-algo.cc`; an unknown
//!   name is "invalid Compression", an empty one is bzip2, as is an absent
//!   one. Parsed here, refused when fetching unless none, zstd or xz.
//! - FileHash, NarHash: `Hash::parseAnyPrefixed` (`algo:` + base16, nix32
//!   or base64 by length, or SRI `algo-base64`). Ours: sha256 only, base64
//!   canonical.
//! - FileSize, NarSize: `string2Int<uint64_t>`; NarSize 0 is "missing or
//!   zero". Ours: no `+` sign.
//! - References: `tokenizeString` on spaces, each a `StorePath`.
//! - Deriver: a `StorePath` unless `unknown-deriver`.
//! - Sig: `Signature::parse` (`signature/local-keys.cc`): a non-empty name
//!   before the first `:`, then base64 (Nix's lax decoder: stops at `=`)
//!   decoding to at least one byte. A malformed one makes the whole narinfo
//!   corrupt, even if another signature is good.
//! - CA: `ContentAddress::parseOpt` (`content-address.cc`): empty, or
//!   `text:` / `fixed:` / `fixed:r:`, an algorithm (md5, sha1, sha256,
//!   sha512), `:`, and a hash of that algorithm's length in base16, nix32
//!   or base64. `fixed:git:` and blake3 need experimental features, so
//!   refused. Ours: canonical base64.
//! - repeats: Nix refuses a second non-empty References or CA and lets the
//!   last of the others win. Ours: every known key but `Sig` at most once.
//! - any other key is ignored, as Nix does.

use super::hash::{HashError, Sha256};
use super::keys::{fingerprint, TrustedKeys};
use super::store_path::{StorePath, StorePathError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd,
    Xz,
    Bzip2,
    /// Another name Nix knows (`br`, `gzip`, `lz4`, …), which we refuse
    /// when fetching rather than when parsing.
    Other(String),
}

/// Every name Nix's `parseCompressionAlgo` knows (`compression-algo.hh`).
const NIX_COMPRESSIONS: &[&str] =
    &["none", "br", "bzip2", "compress", "grzip", "gzip", "lrzip", "lz4", "lzip", "lzma", "lzop", "xz", "zstd"];

impl Compression {
    /// `None` for a name Nix does not know. Empty is bzip2, as in Nix
    /// (`nar-info.cc`: "Empty strings used to fall back to the bzip2
    /// normalisation"), not "none".
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "none" => Compression::None,
            "zstd" => Compression::Zstd,
            "xz" => Compression::Xz,
            "bzip2" | "" => Compression::Bzip2,
            other if NIX_COMPRESSIONS.contains(&other) => Compression::Other(other.to_owned()),
            _ => return None,
        })
    }

    pub fn as_str(&self) -> &str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
            Compression::Xz => "xz",
            Compression::Bzip2 => "bzip2",
            Compression::Other(s) => s,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo<'a> {
    pub store_path: StorePath,
    pub url: &'a str,
    pub compression: Compression,
    pub file_hash: Option<Sha256>,
    pub file_size: Option<u64>,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    pub references: Vec<StorePath>,
    pub deriver: Option<&'a str>,
    pub sigs: Vec<&'a str>,
    pub ca: Option<&'a str>,
}

/// What was wrong, and on which (1-based) line; line 0 for the file as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfoError {
    pub line: usize,
    pub kind: ErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    /// A line that is not `Key: value`.
    Syntax,
    /// The last line has no `\n`.
    NoFinalNewline,
    /// A Compression name Nix does not know.
    Compression(String),
    /// A Sig that is not `name:base64`.
    Signature,
    /// A CA that is not a content address.
    ContentAddress,
    Duplicate(&'static str),
    Missing(&'static str),
    Hash(&'static str, HashError),
    Number(&'static str),
    Path(&'static str, StorePathError),
    /// URL absolute, empty, or climbing out of the cache with `..`.
    Url,
    /// NarSize 0: no NAR is empty.
    EmptyNar,
    /// StorePath is not the path whose narinfo was asked for.
    WrongPath {
        expected: String,
        got: String,
    },
    /// No signature by a trusted key verifies the fingerprint.
    Untrusted,
}

impl std::fmt::Display for NarInfoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line > 0 {
            write!(f, "line {}: ", self.line)?;
        }
        match &self.kind {
            ErrorKind::Syntax => write!(f, "expected 'Key: value'"),
            ErrorKind::NoFinalNewline => write!(f, "last line does not end in a newline (Nix refuses that too)"),
            ErrorKind::Compression(c) => {
                write!(f, "Compression: unknown method {c:?} (Nix knows {})", NIX_COMPRESSIONS.join(", "))
            }
            ErrorKind::Signature => write!(f, "Sig: expected 'name:base64'"),
            ErrorKind::ContentAddress => {
                write!(f, "CA: expected 'text:' or 'fixed:[r:]' then md5, sha1, sha256 or sha512 ':' hash")
            }
            ErrorKind::Duplicate(k) => write!(f, "field {k} repeated"),
            ErrorKind::Missing(k) => write!(f, "required field {k} missing"),
            ErrorKind::Hash(k, e) => write!(f, "{k}: {e}"),
            ErrorKind::Number(k) => write!(f, "{k}: not a decimal number"),
            ErrorKind::Path(k, e) => write!(f, "{k}: {e}"),
            ErrorKind::Url => write!(f, "URL must be a non-empty path relative to the cache"),
            ErrorKind::EmptyNar => write!(f, "NarSize must be above 0"),
            ErrorKind::WrongPath { expected, got } => {
                write!(f, "StorePath is {got}, expected {expected}")
            }
            ErrorKind::Untrusted => write!(f, "no valid signature by a trusted cache key"),
        }
    }
}

impl std::error::Error for NarInfoError {}

fn number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Nix's `Signature::parse`: a name before the first `:`, then base64 that
/// decodes to at least one byte. Nix's decoder stops at the first `=` and
/// does not check lengths, so neither does this: it only decides what Nix
/// refuses. Whether a signature is any good is `keys`' business.
fn sig_ok(sig: &str) -> bool {
    let Some((name, data)) = sig.split_once(':') else { return false };
    let data = data.split('=').next().unwrap_or("");
    let b64 = |c: u8| c.is_ascii_alphanumeric() || c == b'+' || c == b'/';
    !name.is_empty() && data.len() >= 2 && data.bytes().all(b64)
}

/// Nix's `ContentAddress::parseOpt` (empty is no content address).
fn ca_ok(ca: &str) -> bool {
    if ca.is_empty() {
        return true;
    }
    let rest = match ca.split_once(':') {
        Some(("text", rest)) => rest,
        Some(("fixed", rest)) => rest.strip_prefix("r:").unwrap_or(rest),
        _ => return false,
    };
    let Some((algo, hash)) = rest.split_once(':') else { return false };
    let h = hash.as_bytes();
    match algo {
        "md5" => hash_of::<16>(h),
        "sha1" => hash_of::<20>(h),
        "sha256" => hash_of::<32>(h),
        "sha512" => hash_of::<64>(h),
        _ => false,
    }
}

/// An unprefixed hash of `N` bytes in base16 (either case, as Nix reads
/// it), nix32 or base64, told apart by length (`Hash::parseNonSRIUnprefixed`).
fn hash_of<const N: usize>(h: &[u8]) -> bool {
    if h.len() == 2 * N {
        h.iter().all(u8::is_ascii_hexdigit)
    } else if h.len() == super::nixbase32::encoded_len(N) {
        super::nixbase32::decode_exact::<N>(h).is_ok()
    } else {
        super::base64::decode_exact::<N>(h).is_some()
    }
}

fn url_ok(url: &str) -> bool {
    let path = url.split(['?', '#']).next().unwrap_or("");
    !path.is_empty()
        && !path.starts_with('/')
        && !url.contains("://")
        && !path.split('/').any(|seg| seg == ".." || seg == ".")
}

impl<'a> NarInfo<'a> {
    /// Parses a narinfo; it must describe `expected` when that is given.
    pub fn parse(text: &'a str, expected: Option<&StorePath>) -> Result<Self, NarInfoError> {
        let mut store_path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = None;
        let mut deriver = None;
        let mut ca = None;
        let mut sigs = Vec::new();

        // Nix needs a `\n` after every value, the last one included.
        let Some(body) = text.strip_suffix('\n') else {
            return Err(NarInfoError { line: text.split('\n').count(), kind: ErrorKind::NoFinalNewline });
        };
        for (i, line) in body.split('\n').enumerate() {
            let lineno = i + 1;
            let err = |kind| NarInfoError { line: lineno, kind };
            // `Key:` alone is refused too: Nix would take the next line as
            // its value, or find no `\n` at the end of the file.
            let (key, value) = match line.split_once(':') {
                Some((k, v)) if !k.is_empty() => match v.strip_prefix(' ') {
                    Some(v) => (k, v),
                    None => return Err(err(ErrorKind::Syntax)),
                },
                _ => return Err(err(ErrorKind::Syntax)),
            };
            macro_rules! once {
                ($slot:ident, $name:literal, $parse:expr) => {{
                    if $slot.is_some() {
                        return Err(err(ErrorKind::Duplicate($name)));
                    }
                    $slot = Some($parse);
                }};
            }
            match key {
                "StorePath" => once!(
                    store_path,
                    "StorePath",
                    StorePath::from_absolute(value).map_err(|e| err(ErrorKind::Path("StorePath", e)))?
                ),
                "URL" => once!(url, "URL", {
                    if !url_ok(value) {
                        return Err(err(ErrorKind::Url));
                    }
                    value
                }),
                "Compression" => once!(
                    compression,
                    "Compression",
                    Compression::parse(value).ok_or_else(|| err(ErrorKind::Compression(value.to_owned())))?
                ),
                "FileHash" => {
                    once!(file_hash, "FileHash", Sha256::parse(value).map_err(|e| err(ErrorKind::Hash("FileHash", e)))?)
                }
                "FileSize" => once!(file_size, "FileSize", number(value).ok_or(err(ErrorKind::Number("FileSize")))?),
                "NarHash" => {
                    once!(nar_hash, "NarHash", Sha256::parse(value).map_err(|e| err(ErrorKind::Hash("NarHash", e)))?)
                }
                "NarSize" => once!(
                    nar_size,
                    "NarSize",
                    match number(value) {
                        Some(0) => return Err(err(ErrorKind::EmptyNar)),
                        Some(n) => n,
                        None => return Err(err(ErrorKind::Number("NarSize"))),
                    }
                ),
                "References" => once!(
                    references,
                    "References",
                    value
                        .split(' ')
                        .filter(|s| !s.is_empty())
                        .map(StorePath::from_base)
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| err(ErrorKind::Path("References", e)))?
                ),
                "Deriver" => once!(deriver, "Deriver", {
                    if value != "unknown-deriver" {
                        StorePath::from_base(value).map_err(|e| err(ErrorKind::Path("Deriver", e)))?;
                    }
                    value
                }),
                "CA" => once!(ca, "CA", if ca_ok(value) { value } else { return Err(err(ErrorKind::ContentAddress)) }),
                "Sig" => {
                    if !sig_ok(value) {
                        return Err(err(ErrorKind::Signature));
                    }
                    sigs.push(value)
                }
                _ => {}
            }
        }

        let missing = |k| NarInfoError { line: 0, kind: ErrorKind::Missing(k) };
        let store_path = store_path.ok_or(missing("StorePath"))?;
        if let Some(expected) = expected {
            if *expected != store_path {
                return Err(NarInfoError {
                    line: 0,
                    kind: ErrorKind::WrongPath { expected: expected.to_string(), got: store_path.to_string() },
                });
            }
        }
        Ok(NarInfo {
            store_path,
            url: url.ok_or(missing("URL"))?,
            compression: compression.unwrap_or(Compression::Bzip2),
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or(missing("NarHash"))?,
            nar_size: nar_size.ok_or(missing("NarSize"))?,
            references: references.unwrap_or_default(),
            deriver: deriver.filter(|d| *d != "unknown-deriver"),
            sigs,
            ca: ca.filter(|c| !c.is_empty()),
        })
    }

    /// The message a cache key signs for this path.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.store_path, &self.nar_hash, self.nar_size, &self.references)
    }

    /// The name of a trusted key that signed this narinfo, or `Untrusted`.
    /// Content-addressed paths are no exception: every path needs a signature.
    pub fn verify(&self, keys: &TrustedKeys) -> Result<String, NarInfoError> {
        keys.verify_any(self.fingerprint().as_bytes(), self.sigs.iter().copied())
            .map(str::to_owned)
            .ok_or(NarInfoError { line: 0, kind: ErrorKind::Untrusted })
    }

    /// References other than the path itself.
    pub fn other_references(&self) -> impl Iterator<Item = &StorePath> {
        self.references.iter().filter(move |r| **r != self.store_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::keys::PublicKey;

    /// Written by Nix 2.8 (`nix copy --to file://…?compression=zstd&secret-key=…`).
    const REAL: &str = "StorePath: /nix/store/cy9y0rrdjzqn5hkl1ywf07f0pm3f7689-top
URL: nar/10mqp163izm615kasyrmvn6cczg6dk11fiffcs1jfkic25dl068n.nar.zst
Compression: zstd
FileHash: sha256:10mqp163izm615kasyrmvn6cczg6dk11fiffcs1jfkic25dl068n
FileSize: 133
NarHash: sha256:0l1z12lcbracxgmvimqkpxxmz7w3fjm0hgp2k9shx1ph1yny4q00
NarSize: 168
References: qx8l0zlfvk6k8whfjvianr1mywbz9k4v-hello-test
Deriver: 2zbazc8nf794q48sjyri0248j69mzsr1-top.drv
Sig: test1:gDGiYxttmta7cbTvb7UyceEn79ApMDiZ7hjTKJtbupdqh+3k8hSMA7cWuILOQ5usnV2dRLFwwxZGF5NauKNTCA==
";
    const PK: &str = "test1:bpyknC459ScGTDYFwSofhWPz6M8jTcn4wOsZRx1IrSw=";

    fn keys() -> TrustedKeys {
        TrustedKeys::new(vec![PublicKey::parse(PK).unwrap()])
    }

    fn kind(text: &str) -> ErrorKind {
        NarInfo::parse(text, None).unwrap_err().kind
    }

    #[test]
    fn parses_and_verifies_real_narinfo() {
        let ni = NarInfo::parse(REAL, None).unwrap();
        assert_eq!(ni.store_path.base(), "cy9y0rrdjzqn5hkl1ywf07f0pm3f7689-top");
        assert_eq!(ni.compression, Compression::Zstd);
        assert_eq!(ni.file_size, Some(133));
        assert_eq!(ni.nar_size, 168);
        assert_eq!(ni.references.len(), 1);
        assert_eq!(ni.deriver, Some("2zbazc8nf794q48sjyri0248j69mzsr1-top.drv"));
        assert_eq!(ni.verify(&keys()).unwrap(), "test1");
        // Nix needs the final newline (`nar-info.cc`: "expecting '\\n'").
        assert_eq!(
            NarInfo::parse(REAL.trim_end(), None).unwrap_err(),
            NarInfoError { line: 10, kind: ErrorKind::NoFinalNewline }
        );
    }

    #[test]
    fn edits_after_signing_break_the_signature() {
        for (from, to) in
            [("NarSize: 168", "NarSize: 169"), ("References: qx8l", "References: qx8m"), ("0l1z12lc", "0l1z12ld")]
        {
            let edited = REAL.replace(from, to);
            let ni = NarInfo::parse(&edited, None).unwrap();
            assert_eq!(ni.verify(&keys()).unwrap_err().kind, ErrorKind::Untrusted, "{to}");
        }
        // Fields outside the fingerprint may change (Nix does not sign them),
        // which is why NAR content is checked against NarHash, not FileHash.
        let edited = REAL.replace("FileSize: 133", "FileSize: 134");
        let ni = NarInfo::parse(&edited, None).unwrap();
        assert!(ni.verify(&keys()).is_ok());
    }

    #[test]
    fn hash_forms() {
        let hex = "sha256:0060e2ad0ff0860e759ae23e08aa74839f5f7bbf13d7b8ebeb4ce5c5a8083f50";
        let sri = "sha256-AGDirQ/whg51muI+CKp0g59fe78T17jr60zlxagIP1A=";
        let nix32 = "sha256:0l1z12lcbracxgmvimqkpxxmz7w3fjm0hgp2k9shx1ph1yny4q00";
        let (ta, tb) = (REAL.replace(nix32, hex), REAL.replace(nix32, sri));
        let a = NarInfo::parse(&ta, None).unwrap();
        let b = NarInfo::parse(&tb, None).unwrap();
        assert_eq!(a.nar_hash, b.nar_hash);
        assert_eq!(a.nar_hash, NarInfo::parse(REAL, None).unwrap().nar_hash);
        // Signatures cover the re-encoded hash, so any form verifies.
        assert!(b.verify(&keys()).is_ok());
        let md5 = REAL.replace("NarHash: sha256:", "NarHash: md5:");
        assert_eq!(kind(&md5), ErrorKind::Hash("NarHash", HashError::Algorithm));
    }

    #[test]
    fn malformed() {
        assert_eq!(kind(&format!("{REAL}NarSize: 1\n")), ErrorKind::Duplicate("NarSize"));
        assert_eq!(kind(&format!("{REAL}StorePath: x\n")), ErrorKind::Duplicate("StorePath"));
        assert_eq!(kind(&format!("{REAL}garbage\n")), ErrorKind::Syntax);
        assert_eq!(kind(&format!("{REAL}\n")), ErrorKind::Syntax);
        assert_eq!(kind(&REAL.replace("NarSize: ", "NarSize:")), ErrorKind::Syntax);
        assert_eq!(kind(&REAL.replace("NarSize: 168", "NarSize: 0")), ErrorKind::EmptyNar);
        assert_eq!(kind(&REAL.replace("NarSize: 168", "NarSize: +168")), ErrorKind::Number("NarSize"));
        assert_eq!(kind(&REAL.replace("FileSize: 133", "FileSize: -1")), ErrorKind::Number("FileSize"));
        assert_eq!(kind(&REAL.replace("NarSize: 168\n", "")), ErrorKind::Missing("NarSize"));
        assert_eq!(kind(&REAL.replace("URL: nar/", "URL: /nar/")), ErrorKind::Url);
        assert_eq!(kind(&REAL.replace("URL: nar/", "URL: ../nar/")), ErrorKind::Url);
        assert_eq!(kind(&REAL.replace("URL: nar/", "URL: http://evil/")), ErrorKind::Url);
        assert!(matches!(
            kind(&REAL.replace("References: qx8l", "References: /nix/store/qx8l")),
            ErrorKind::Path("References", _)
        ));
        assert_eq!(
            kind(&REAL.replace("StorePath: /nix/store/cy9y", "StorePath: /nix/store/ey9y")),
            ErrorKind::Path("StorePath", StorePathError::Hash)
        );
    }

    #[test]
    fn defaults_and_extras() {
        let minimal = "StorePath: /nix/store/qx8l0zlfvk6k8whfjvianr1mywbz9k4v-hello-test\nURL: x.nar\nNarHash: sha256:1n0layqxn1s4gmqmkxnl2pdr7gbmys1z1d9cvdpr8wq3pxap8i7z\nNarSize: 888\nFuture: field\nReferences: \n";
        let ni = NarInfo::parse(minimal, None).unwrap();
        assert_eq!(ni.compression, Compression::Bzip2);
        assert!(ni.references.is_empty());
        assert!(ni.sigs.is_empty());
        assert!(ni.verify(&keys()).is_err());
        let with_query = minimal.replace("URL: x.nar", "URL: nar/x.nar?hash=abc");
        assert_eq!(NarInfo::parse(&with_query, None).unwrap().url, "nar/x.nar?hash=abc");
    }

    #[test]
    fn must_be_the_path_asked_for() {
        let other = StorePath::from_base("qx8l0zlfvk6k8whfjvianr1mywbz9k4v-hello-test").unwrap();
        assert!(matches!(NarInfo::parse(REAL, Some(&other)).unwrap_err().kind, ErrorKind::WrongPath { .. }));
        let me = StorePath::from_base("cy9y0rrdjzqn5hkl1ywf07f0pm3f7689-top").unwrap();
        assert!(NarInfo::parse(REAL, Some(&me)).is_ok());
    }

    /// A minimal valid narinfo plus `extra` lines.
    fn with(extra: &str) -> String {
        format!("StorePath: /nix/store/qx8l0zlfvk6k8whfjvianr1mywbz9k4v-hello-test\nURL: x.nar\nNarHash: sha256:1n0layqxn1s4gmqmkxnl2pdr7gbmys1z1d9cvdpr8wq3pxap8i7z\nNarSize: 888\n{extra}")
    }

    fn parsed(extra: &str) -> NarInfo<'static> {
        let text: &'static str = Box::leak(with(extra).into_boxed_str());
        NarInfo::parse(text, None).unwrap_or_else(|e| panic!("{extra:?}: {e}"))
    }

    fn refused(extra: &str) -> ErrorKind {
        match NarInfo::parse(&with(extra), None) {
            Ok(ni) => panic!("{extra:?} accepted: {ni:?}"),
            Err(e) => e.kind,
        }
    }

    /// Nix: `nar-info.cc` maps an empty Compression to bzip2, and
    /// `parseCompressionAlgo` refuses names it does not know.
    #[test]
    fn compression_empty_is_bzip2_and_unknown_is_refused() {
        assert_eq!(parsed("").compression, Compression::Bzip2);
        assert_eq!(parsed("Compression: \n").compression, Compression::Bzip2);
        assert_eq!(parsed("Compression: none\n").compression, Compression::None);
        assert_eq!(parsed("Compression: br\n").compression, Compression::Other("br".into()));
        assert_eq!(parsed("Compression: lzop\n").compression, Compression::Other("lzop".into()));
        for bad in ["foo", " zstd", "zstd ", "ZSTD", "none "] {
            assert_eq!(refused(&format!("Compression: {bad}\n")), ErrorKind::Compression(bad.into()), "{bad:?}");
        }
        // It stays refused when fetching: fetch::decompress's
        // refuses_bzip2_and_others_by_name (nix sits below fetch).
    }

    /// Nix reads one byte past the colon and then wants a `\n`: `Key:\n` at
    /// the end, or a last line without `\n`, is corrupt.
    #[test]
    fn every_line_needs_its_newline_and_a_space() {
        assert!(parsed("References: \n").references.is_empty());
        assert_eq!(refused("References:\n"), ErrorKind::Syntax);
        assert_eq!(refused("Future:\n"), ErrorKind::Syntax);
        assert_eq!(refused("References:\nDeriver: unknown-deriver\n"), ErrorKind::Syntax);
        assert_eq!(refused("Future: x"), ErrorKind::NoFinalNewline);
        assert!(parsed("Future: x\n").sigs.is_empty());
        assert_eq!(NarInfo::parse("", None).unwrap_err().kind, ErrorKind::NoFinalNewline);
    }

    /// Nix parses Deriver as a store path unless it is `unknown-deriver`.
    #[test]
    fn deriver_is_a_store_path() {
        assert_eq!(parsed("Deriver: unknown-deriver\n").deriver, None);
        let drv = "2zbazc8nf794q48sjyri0248j69mzsr1-top.drv";
        assert_eq!(parsed(&format!("Deriver: {drv}\n")).deriver, Some(drv));
        for bad in
            ["", "foo", "/nix/store/2zbazc8nf794q48sjyri0248j69mzsr1-top.drv", "2zbazc8nf794q48sjyri0248j69mzsr1-"]
        {
            assert!(matches!(refused(&format!("Deriver: {bad}\n")), ErrorKind::Path("Deriver", _)), "{bad:?}");
        }
    }

    /// Nix's `Signature::parse`: a name, `:`, then base64 decoding to at
    /// least one byte (Nix's decoder stops at `=`). One malformed Sig makes
    /// the narinfo corrupt even next to a good one.
    #[test]
    fn sig_must_be_name_colon_base64() {
        assert_eq!(parsed("Sig: k:AA\n").sigs, vec!["k:AA"]);
        assert_eq!(parsed("Sig: k:AA==\n").sigs, vec!["k:AA=="]);
        assert_eq!(parsed("Sig: k:AA=!!\n").sigs, vec!["k:AA=!!"]);
        for bad in ["", "k", "k:", ":AAAA", "k:A", "k:A=", "k:!!AA", "k:AA AA", "k:AA:BB"] {
            assert_eq!(refused(&format!("Sig: {bad}\n")), ErrorKind::Signature, "{bad:?}");
        }
        let good = REAL.lines().find(|l| l.starts_with("Sig: ")).unwrap();
        assert_eq!(kind(&REAL.replace(good, &format!("{good}\nSig: junk"))), ErrorKind::Signature);
    }

    /// Nix's `ContentAddress::parseOpt`.
    #[test]
    fn ca_is_a_content_address() {
        let nix32 = "1n0layqxn1s4gmqmkxnl2pdr7gbmys1z1d9cvdpr8wq3pxap8i7z";
        let hex = "0060e2ad0ff0860e759ae23e08aa74839f5f7bbf13d7b8ebeb4ce5c5a8083f50";
        let b64 = "AGDirQ/whg51muI+CKp0g59fe78T17jr60zlxagIP1A=";
        assert_eq!(parsed("CA: \n").ca, None);
        for good in [
            format!("fixed:r:sha256:{nix32}"),
            format!("fixed:sha256:{hex}"),
            format!("text:sha256:{}", hex.to_uppercase()),
            format!("fixed:r:sha256:{b64}"),
            format!("fixed:sha1:{}", &nix32[..32]),
            format!("fixed:md5:{}", &hex[..32]),
            format!("fixed:r:sha512:{hex}{hex}"),
        ] {
            assert_eq!(parsed(&format!("CA: {good}\n")).ca, Some(good.as_str()));
        }
        for bad in [
            "foo".to_owned(),
            format!("sha256:{nix32}"),
            format!("fixed:r:sha256:{}", &nix32[1..]),
            format!("fixed:r:sha256:{nix32}0"),
            format!("fixed:r:sha256:{}", nix32.replace('1', "e")),
            format!("fixed:git:sha1:{}", &nix32[..32]),
            format!("fixed:r:blake3:{nix32}"),
            format!("text:r:sha256:{nix32}"),
            format!("fixed:r:sha256-{b64}"),
            format!("fixed:r:md5:{nix32}"),
        ] {
            assert_eq!(refused(&format!("CA: {bad}\n")), ErrorKind::ContentAddress, "{bad:?}");
        }
    }

    /// Sizes and store path names on both sides of their boundaries.
    #[test]
    fn numbers_and_names_at_their_limits() {
        assert_eq!(parsed("").nar_size, 888);
        let one = with("").replace("NarSize: 888", "NarSize: 1");
        assert_eq!(NarInfo::parse(&one, None).unwrap().nar_size, 1);
        assert_eq!(kind(&with("").replace("NarSize: 888", "NarSize: 0")), ErrorKind::EmptyNar);
        assert_eq!(parsed("FileSize: 0\n").file_size, Some(0));
        assert_eq!(parsed("FileSize: 18446744073709551615\n").file_size, Some(u64::MAX));
        assert_eq!(refused("FileSize: 18446744073709551616\n"), ErrorKind::Number("FileSize"));
        let name = |n: usize| format!("qx8l0zlfvk6k8whfjvianr1mywbz9k4v-{}", "a".repeat(n));
        assert_eq!(parsed(&format!("References: {}\n", name(211))).references.len(), 1);
        assert!(matches!(refused(&format!("References: {}\n", name(212))), ErrorKind::Path("References", _)));
    }
}
