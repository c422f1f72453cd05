//! Store paths and their names.
//!
//! Grammar:
//! ```text
//! store-path = store-dir "/" base
//! base       = hash "-" name
//! hash       = nix32{32}                     ; 20 bytes, truncated digest
//! name       = [A-Za-z0-9+\-._?=]{1,211}     ; not "." or "..",
//!                                            ; not starting with ".-" or "..-"
//! ```
//! These are Nix's current name rules: a name may begin with a dot, but not
//! be one of the two special directory names nor look like one followed by a
//! dash, so a base name can never resolve to `.` or `..` in any tool that
//! strips the hash part.

use super::nixbase32;

/// The only store directory nixless installs into. `--root` prefixes it on
/// disk; store paths themselves always name `/nix/store`.
pub const STORE_DIR: &str = "/nix/store";

pub const HASH_LEN: usize = 32;
pub const MAX_NAME_LEN: usize = 211;

/// A validated store path, kept as its base name `<hash>-<name>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    base: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorePathError {
    /// Not below `/nix/store/`, or with a further `/` after the base name.
    NotInStore,
    /// The hash part is not 32 nix32 characters followed by `-`.
    Hash,
    /// The name is empty, too long, reserved, or has a forbidden character.
    Name,
}

impl std::fmt::Display for StorePathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StorePathError::NotInStore => "not a path directly below /nix/store",
            StorePathError::Hash => "invalid hash part",
            StorePathError::Name => "invalid name",
        })
    }
}

impl std::error::Error for StorePathError {}

/// Checks a store path name (the part after `<hash>-`).
pub fn validate_name(name: &[u8]) -> Result<(), StorePathError> {
    let ok_len = !name.is_empty() && name.len() <= MAX_NAME_LEN;
    let ok_chars = name.iter().all(|&c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c));
    let reserved = name == b"." || name == b".." || name.starts_with(b".-") || name.starts_with(b"..-");
    if ok_len && ok_chars && !reserved {
        Ok(())
    } else {
        Err(StorePathError::Name)
    }
}

impl StorePath {
    /// Parses a base name `<hash>-<name>`.
    pub fn from_base(base: &str) -> Result<Self, StorePathError> {
        let b = base.as_bytes();
        if b.len() < HASH_LEN + 1 || b[HASH_LEN] != b'-' {
            return Err(StorePathError::Hash);
        }
        nixbase32::decode_exact::<20>(&b[..HASH_LEN]).map_err(|_| StorePathError::Hash)?;
        validate_name(&b[HASH_LEN + 1..])?;
        Ok(StorePath { base: base.to_owned() })
    }

    /// Parses an absolute path `/nix/store/<hash>-<name>`.
    pub fn from_absolute(path: &str) -> Result<Self, StorePathError> {
        let base = path.strip_prefix(STORE_DIR).and_then(|r| r.strip_prefix('/')).ok_or(StorePathError::NotInStore)?;
        if base.contains('/') {
            return Err(StorePathError::NotInStore);
        }
        Self::from_base(base)
    }

    /// `<hash>-<name>`, the file name in the store directory.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The 32-character hash part, which is also the narinfo's file stem.
    pub fn hash_part(&self) -> &str {
        // The base was validated as ASCII at construction: never empty here.
        self.base.get(..HASH_LEN).unwrap_or_default()
    }

    pub fn name(&self) -> &str {
        self.base.get(HASH_LEN + 1..).unwrap_or_default()
    }

    /// `/nix/store/<hash>-<name>`.
    pub fn to_absolute(&self) -> String {
        format!("{STORE_DIR}/{}", self.base)
    }
}

impl std::fmt::Display for StorePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{STORE_DIR}/{}", self.base)
    }
}

impl std::fmt::Debug for StorePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "qx8l0zlfvk6k8whfjvianr1mywbz9k4v";

    #[test]
    fn parses_real_paths() {
        let p = StorePath::from_absolute(&format!("/nix/store/{H}-hello-test")).unwrap();
        assert_eq!(p.hash_part(), H);
        assert_eq!(p.name(), "hello-test");
        assert_eq!(p.to_absolute(), format!("/nix/store/{H}-hello-test"));
        for name in ["a", ".a", "..a", "...", "a.-b", "x+y=z?_", "glibc-2.40-66"] {
            StorePath::from_base(&format!("{H}-{name}")).unwrap();
        }
        StorePath::from_base(&format!("{H}-{}", "a".repeat(211))).unwrap();
    }

    #[test]
    fn refuses_bad_names() {
        for name in ["", ".", "..", ".-x", "..-x", "a/b", "a b", "ü", "a\0", "a:b"] {
            assert_eq!(StorePath::from_base(&format!("{H}-{name}")), Err(StorePathError::Name), "{name:?}");
        }
        assert_eq!(StorePath::from_base(&format!("{H}-{}", "a".repeat(212))), Err(StorePathError::Name));
    }

    #[test]
    fn refuses_bad_hashes_and_dirs() {
        let e = "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee";
        assert_eq!(StorePath::from_base(&format!("{e}-x")), Err(StorePathError::Hash));
        assert_eq!(StorePath::from_base(&format!("{}-x", &H[1..])), Err(StorePathError::Hash));
        assert_eq!(StorePath::from_base(H), Err(StorePathError::Hash));
        assert_eq!(StorePath::from_absolute(&format!("/nix/stor/{H}-x")), Err(StorePathError::NotInStore));
        assert_eq!(StorePath::from_absolute(&format!("/nix/store/{H}-x/bin")), Err(StorePathError::NotInStore));
        assert_eq!(StorePath::from_absolute(&format!("/nix/store//{H}-x")), Err(StorePathError::NotInStore));
    }
}
