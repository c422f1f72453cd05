//! `nix-cache-info`: the file at a binary cache's root.
//!
//! Grammar: `Key: value` lines, like a narinfo.
//! ```text
//! StoreDir: /nix/store        ; must be ours: paths from another store dir
//!                             ; would be different paths
//! WantMassQuery: 0 | 1        ; optional
//! Priority: decimal           ; optional, lower is preferred
//! ```
//! Unknown keys are ignored; a missing StoreDir means `/nix/store`, as for Nix.

use super::store_path::STORE_DIR;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CacheInfo {
    pub priority: Option<u64>,
    pub want_mass_query: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheInfoError {
    StoreDir(String),
    Syntax(usize),
}

impl std::fmt::Display for CacheInfoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheInfoError::StoreDir(d) => {
                write!(f, "cache is for store dir {d}, not {STORE_DIR}")
            }
            CacheInfoError::Syntax(l) => {
                write!(f, "nix-cache-info line {l}: expected 'Key: value'")
            }
        }
    }
}

impl std::error::Error for CacheInfoError {}

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
            "Priority" => info.priority = v.parse().ok(),
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
}
