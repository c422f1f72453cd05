//! `nix-cache-info`: the file at a binary cache's root.
//!
//! Grammar: `Key: value` lines, like a narinfo.
//! ```text
//! StoreDir: /nix/store        ; must be ours: paths from another store dir
//!                             ; would be different paths
//! WantMassQuery: 0 | 1        ; optional
//! Priority: [+-] decimal       ; optional, lower is preferred, fits an i32
//! ```
//! Unknown keys are ignored; a missing StoreDir means `/nix/store`, as for Nix.
//!
//! Against current Nix (`src/libstore/binary-cache-store.cc`,
//! `BinaryCacheStore::init`): a Priority `std::stoi` cannot read (no digits,
//! or outside `int`) makes the cache unusable there, so it does here. Ours,
//! stricter: Priority must be digits only after the sign (`stoi` ignores
//! trailing junk), keys are trimmed, and a line without `:` is refused (Nix
//! skips it).

use super::store_path::STORE_DIR;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CacheInfo {
    pub priority: Option<i32>,
    pub want_mass_query: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheInfoError {
    StoreDir(String),
    Syntax(usize),
    /// A Priority Nix's `std::stoi` would throw on.
    Priority(String),
}

impl std::fmt::Display for CacheInfoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheInfoError::StoreDir(d) => {
                write!(f, "cache is for store dir {d}, not {STORE_DIR}")
            }
            CacheInfoError::Priority(p) => {
                write!(f, "nix-cache-info: Priority {p:?} is not a whole number that fits an int")
            }
            CacheInfoError::Syntax(l) => {
                write!(f, "nix-cache-info line {l}: expected 'Key: value'")
            }
        }
    }
}

impl std::error::Error for CacheInfoError {}

fn priority(v: &str) -> Option<i32> {
    let digits = v.strip_prefix(['+', '-']).unwrap_or(v);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

pub fn parse(text: &str) -> Result<CacheInfo, CacheInfoError> {
    let mut info = CacheInfo::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (k, v) = line.split_once(':').ok_or(CacheInfoError::Syntax(i + 1))?;
        let v = v.trim();
        match k.trim() {
            "StoreDir" if v != STORE_DIR => return Err(CacheInfoError::StoreDir(v.to_owned())),
            "WantMassQuery" => info.want_mass_query = v == "1",
            "Priority" => info.priority = Some(priority(v).ok_or_else(|| CacheInfoError::Priority(v.to_owned()))?),
            _ => {}
        }
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_and_foreign() {
        // As `nix copy --to file://…` (Nix 2.8) writes it.
        assert_eq!(parse("StoreDir: /nix/store\n").unwrap(), CacheInfo::default());
        let cachix = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 41\n";
        assert_eq!(parse(cachix).unwrap(), CacheInfo { priority: Some(41), want_mass_query: true });
        assert_eq!(parse("StoreDir: /gnu/store\n"), Err(CacheInfoError::StoreDir("/gnu/store".into())));
        assert_eq!(parse("StoreDir /nix/store\n"), Err(CacheInfoError::Syntax(1)));
    }

    /// `std::stoi` in `BinaryCacheStore::init` throws on these, so Nix
    /// cannot use the cache; we ignored the value and went on.
    #[test]
    fn priority_must_be_an_int() {
        for (v, want) in [("0", 0), ("-5", -5), ("+7", 7), ("2147483647", i32::MAX), ("-2147483648", i32::MIN)] {
            assert_eq!(parse(&format!("Priority: {v}\n")).unwrap().priority, Some(want), "{v}");
        }
        for v in ["", "x", "2147483648", "-2147483649", "99999999999", "-", "4 1", "41abc"] {
            assert_eq!(parse(&format!("Priority: {v}\n")), Err(CacheInfoError::Priority(v.into())), "{v:?}");
        }
    }
}
