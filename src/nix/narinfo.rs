//! `.narinfo` files: what a binary cache says about one store path.
//!
//! Grammar (as Nix writes it; every line ends in `\n`, the last one may not):
//! ```text
//! narinfo = *( field "\n" )
//! field   = key ": " value            ; key has no ":", value has no "\n"
//! StorePath:   /nix/store/<base>      ; required, must be the path asked for
//! URL:         relative URL of the NAR, may carry a query   ; required
//! Compression: none | zstd | xz | bzip2 | …   ; absent means bzip2
//! FileHash:    hash                   ; of the compressed file, optional
//! FileSize:    decimal                ; optional
//! NarHash:     hash                   ; required, sha256 only (see `hash`)
//! NarSize:     decimal > 0            ; required
//! References:  *( base " " )          ; base names, may be empty or absent
//! Deriver:     base | "unknown-deriver"
//! Sig:         signature              ; may repeat
//! CA:          content address        ; kept, not interpreted
//! ```
//! Any other key is ignored. Every known key but `Sig` may appear once; a
//! repeated one, a line without `": "`, or a malformed value is refused.

use super::hash::{HashError, Sha256};
use super::keys::{fingerprint, TrustedKeys};
use super::store_path::{StorePath, StorePathError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd,
    Xz,
    Bzip2,
    /// Anything else Nix can write (`br`, `gzip`, `lz4`, …), which we refuse
    /// when fetching rather than when parsing.
    Other(String),
}

impl Compression {
    fn parse(s: &str) -> Self {
        match s {
            "none" | "" => Compression::None,
            "zstd" => Compression::Zstd,
            "xz" => Compression::Xz,
            "bzip2" => Compression::Bzip2,
            other => Compression::Other(other.to_owned()),
        }
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

        let body = text.strip_suffix('\n').unwrap_or(text);
        for (i, line) in body.split('\n').enumerate() {
            let lineno = i + 1;
            let err = |kind| NarInfoError { line: lineno, kind };
            let (key, value) = match line.split_once(':') {
                Some((k, v)) if !k.is_empty() => match v.strip_prefix(' ') {
                    Some(v) => (k, v),
                    // `References:` with nothing at all after the colon.
                    None if v.is_empty() => (k, v),
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
                "Compression" => once!(compression, "Compression", Compression::parse(value)),
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
                "Deriver" => once!(deriver, "Deriver", value),
                "CA" => once!(ca, "CA", value),
                "Sig" => sigs.push(value),
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
            ca,
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
        // The same text without its final newline is the same narinfo.
        assert_eq!(NarInfo::parse(REAL.trim_end(), None).unwrap(), ni);
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
        let minimal = "StorePath: /nix/store/qx8l0zlfvk6k8whfjvianr1mywbz9k4v-hello-test\nURL: x.nar\nNarHash: sha256:1n0layqxn1s4gmqmkxnl2pdr7gbmys1z1d9cvdpr8wq3pxap8i7z\nNarSize: 888\nFuture: field\nReferences:\n";
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
}
