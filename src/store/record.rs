//! What nixless remembers about each path it installed: enough to verify
//! the path later and to garbage-collect by references.
//!
//! Grammar (one file per path, `<state>/paths/<base>`; narinfo-style lines):
//! ```text
//! StorePath: /nix/store/<base>
//! NarHash: sha256:<nix32>
//! NarSize: <decimal>
//! References: *( base " " )       ; may be empty
//! ```

use crate::nix::{Sha256, StorePath};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub path: StorePath,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    pub references: Vec<StorePath>,
}

impl Record {
    /// What to remember of a verified narinfo's path.
    pub fn of(info: &crate::nix::NarInfo<'_>) -> Record {
        Record {
            path: info.store_path.clone(),
            nar_hash: info.nar_hash,
            nar_size: info.nar_size,
            references: info.references.clone(),
        }
    }

    pub fn to_text(&self) -> String {
        let refs: Vec<&str> = self.references.iter().map(StorePath::base).collect();
        format!(
            "StorePath: {}\nNarHash: {}\nNarSize: {}\nReferences: {}\n",
            self.path,
            self.nar_hash,
            self.nar_size,
            refs.join(" ")
        )
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let (mut path, mut hash, mut size, mut refs) = (None, None, None, None);
        for line in text.lines() {
            let (k, v) = line.split_once(": ").or_else(|| line.split_once(':')).ok_or(format!("bad line {line:?}"))?;
            match k {
                "StorePath" => path = Some(StorePath::from_absolute(v).map_err(|e| e.to_string())?),
                "NarHash" => hash = Some(Sha256::parse(v).map_err(|e| e.to_string())?),
                "NarSize" => size = Some(v.parse::<u64>().map_err(|e| e.to_string())?),
                "References" => {
                    refs = Some(
                        v.split(' ')
                            .filter(|s| !s.is_empty())
                            .map(StorePath::from_base)
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|e| e.to_string())?,
                    )
                }
                _ => {}
            }
        }
        Ok(Record {
            path: path.ok_or("no StorePath")?,
            nar_hash: hash.ok_or("no NarHash")?,
            nar_size: size.ok_or("no NarSize")?,
            references: refs.ok_or("no References")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let r = Record {
            path: StorePath::from_base("cy9y0rrdjzqn5hkl1ywf07f0pm3f7689-top").unwrap(),
            nar_hash: Sha256::parse("sha256:0l1z12lcbracxgmvimqkpxxmz7w3fjm0hgp2k9shx1ph1yny4q00").unwrap(),
            nar_size: 168,
            references: vec![StorePath::from_base("qx8l0zlfvk6k8whfjvianr1mywbz9k4v-hello-test").unwrap()],
        };
        assert_eq!(Record::parse(&r.to_text()).unwrap(), r);
        let none = Record { references: vec![], ..r };
        assert_eq!(Record::parse(&none.to_text()).unwrap(), none);
        assert!(Record::parse("StorePath: /nix/store/x\n").is_err());
    }
}
