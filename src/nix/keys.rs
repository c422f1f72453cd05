//! Ed25519 keys and signatures in Nix's `name:base64` form, and the narinfo
//! fingerprint they sign.
//!
//! Grammar:
//! ```text
//! public-key = name ":" base64(32 bytes)
//! secret-key = name ":" base64(64 bytes)        ; seed then public key
//! signature  = name ":" base64(64 bytes)
//! name       = 1*(any char but ":")
//! fingerprint = "1;" store-path ";sha256:" nix32(NarHash) ";" NarSize ";"
//!               [ store-path *( "," store-path ) ]   ; references, sorted
//! ```
//! `nix-store --generate-binary-cache-key` writes exactly these files. A key
//! signs for its name: a signature is checked only against the trusted key of
//! the same name, and a malformed signature is simply not a valid one.

use super::{base64, hash::Sha256, store_path::StorePath};
use ed25519_compact as ed;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// No `:` or nothing before it.
    Name,
    /// The part after `:` is not base64 of the right length.
    Encoding,
    /// A secret key whose second half is not the public key of its seed.
    Mismatch,
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyError::Name => "key has no name (expected name:base64)",
            KeyError::Encoding => "key is not valid base64 of the right length",
            KeyError::Mismatch => "secret key's public half does not match its seed",
        })
    }
}

impl std::error::Error for KeyError {}

fn split(s: &str) -> Result<(&str, &str), KeyError> {
    match s.trim().split_once(':') {
        Some((name, rest)) if !name.is_empty() => Ok((name, rest)),
        _ => Err(KeyError::Name),
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: ed::PublicKey,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl PublicKey {
    /// Parses `name:base64(32 bytes)`; surrounding white space (a key file's
    /// final newline) is ignored.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let (name, b64) = split(s)?;
        let bytes = base64::decode_exact::<32>(b64.as_bytes()).ok_or(KeyError::Encoding)?;
        let key = ed::PublicKey::from_slice(&bytes).map_err(|_| KeyError::Encoding)?;
        Ok(PublicKey { name: name.to_owned(), key })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `sig` is this key's valid signature over `msg`. A signature
    /// under another name is not.
    pub fn verifies(&self, msg: &[u8], sig: &Signature) -> bool {
        sig.name == self.name
            && ed::Signature::from_slice(&sig.bytes).map(|s| self.key.verify(msg, &s).is_ok()).unwrap_or(false)
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, base64::encode(self.key.as_ref()))
    }
}

pub struct SecretKey {
    name: String,
    key: ed::SecretKey,
}

impl SecretKey {
    /// Parses `name:base64(seed ‖ public)`, as `nix-store
    /// --generate-binary-cache-key` writes it.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let (name, b64) = split(s)?;
        let bytes = base64::decode_exact::<64>(b64.as_bytes()).ok_or(KeyError::Encoding)?;
        let key = ed::SecretKey::from_slice(&bytes).map_err(|_| KeyError::Encoding)?;
        key.validate_public_key(&key.public_key()).map_err(|_| KeyError::Mismatch)?;
        let seed_pk = ed::KeyPair::from_seed(key.seed()).pk;
        if seed_pk != key.public_key() {
            return Err(KeyError::Mismatch);
        }
        Ok(SecretKey { name: name.to_owned(), key })
    }

    /// A fresh key from the OS's random source.
    pub fn generate(name: &str) -> Result<Self, KeyError> {
        if name.is_empty() || name.contains(':') {
            return Err(KeyError::Name);
        }
        let kp = ed::KeyPair::from_seed(ed::Seed::generate());
        Ok(SecretKey { name: name.to_owned(), key: kp.sk })
    }

    pub fn public(&self) -> PublicKey {
        PublicKey { name: self.name.clone(), key: self.key.public_key() }
    }

    /// `name:base64(signature)`; deterministic (no noise), as Nix's libsodium
    /// signatures are.
    pub fn sign(&self, msg: &[u8]) -> String {
        let sig = self.key.sign(msg, None);
        format!("{}:{}", self.name, base64::encode(sig.as_ref()))
    }
}

impl std::fmt::Display for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, base64::encode(self.key.as_ref()))
    }
}

/// A parsed `name:base64(64 bytes)` signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature<'a> {
    pub name: &'a str,
    pub bytes: [u8; 64],
}

impl<'a> Signature<'a> {
    /// `None` for anything malformed: such a signature is never valid.
    pub fn parse(s: &'a str) -> Option<Self> {
        let (name, b64) = split(s).ok()?;
        let bytes = base64::decode_exact::<64>(b64.as_bytes())?;
        Some(Signature { name, bytes })
    }
}

/// The set of keys trusted for one purpose (cache keys, or deploy keys).
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys(Vec<PublicKey>);

impl TrustedKeys {
    pub fn new(keys: Vec<PublicKey>) -> Self {
        TrustedKeys(keys)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn keys(&self) -> &[PublicKey] {
        &self.0
    }

    /// The name of the first trusted key with a valid signature among `sigs`.
    pub fn verify_any<'s>(&self, msg: &[u8], sigs: impl IntoIterator<Item = &'s str>) -> Option<&str> {
        sigs.into_iter()
            .filter_map(Signature::parse)
            .find_map(|sig| self.0.iter().find(|k| k.verifies(msg, &sig)).map(|k| k.name()))
    }
}

/// The message a cache signs for a store path.
pub fn fingerprint(path: &StorePath, nar_hash: &Sha256, nar_size: u64, refs: &[StorePath]) -> String {
    let mut full: Vec<String> = refs.iter().map(StorePath::to_absolute).collect();
    full.sort();
    format!("1;{path};{nar_hash};{nar_size};{}", full.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Produced by Nix 2.8: `nix-store --generate-binary-cache-key test1 sk pk`
    // and `nix copy --to file://…?secret-key=sk` of a path with no references.
    const PK: &str = "test1:bpyknC459ScGTDYFwSofhWPz6M8jTcn4wOsZRx1IrSw=";
    const PATH: &str = "/nix/store/qx8l0zlfvk6k8whfjvianr1mywbz9k4v-hello-test";
    const NAR_HASH: &str = "sha256:1n0layqxn1s4gmqmkxnl2pdr7gbmys1z1d9cvdpr8wq3pxap8i7z";
    const SIG: &str = "test1:bCONVHYuC4bZ1BoH5eGloxiha4IW618kC4Sp7BQjzgEnFcf1dqnA8xkXkYnMUFrWOPTTLxvnz94kze9u/GoRAA==";

    fn fp(size: u64) -> String {
        let path = StorePath::from_absolute(PATH).unwrap();
        fingerprint(&path, &Sha256::parse(NAR_HASH).unwrap(), size, &[])
    }

    #[test]
    fn verifies_real_nix_signature() {
        let keys = TrustedKeys::new(vec![PublicKey::parse(PK).unwrap()]);
        assert_eq!(fp(888), format!("1;{PATH};{NAR_HASH};888;"));
        assert_eq!(keys.verify_any(fp(888).as_bytes(), [SIG]), Some("test1"));
        assert_eq!(keys.verify_any(fp(889).as_bytes(), [SIG]), None);
    }

    #[test]
    fn malformed_or_foreign_signatures_are_not_valid() {
        let keys = TrustedKeys::new(vec![PublicKey::parse(PK).unwrap()]);
        let msg = fp(888);
        let renamed = SIG.replacen("test1:", "test2:", 1);
        let truncated = &SIG[..SIG.len() - 4];
        for bad in [renamed.as_str(), truncated, "test1:", ":abc", "garbage", ""] {
            assert_eq!(keys.verify_any(msg.as_bytes(), [bad]), None, "{bad}");
        }
        // One good signature among bad ones is enough.
        assert_eq!(keys.verify_any(msg.as_bytes(), ["x:y", SIG]), Some("test1"));
    }

    #[test]
    fn fingerprint_sorts_full_reference_paths() {
        let path = StorePath::from_absolute(PATH).unwrap();
        let a = StorePath::from_base("00000000000000000000000000000000-z").unwrap();
        let b = StorePath::from_base("zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-a").unwrap();
        let h = Sha256::parse(NAR_HASH).unwrap();
        assert_eq!(fingerprint(&path, &h, 1, &[b.clone(), a.clone()]), format!("1;{PATH};{NAR_HASH};1;{a},{b}"));
    }

    #[test]
    fn sign_and_verify_roundtrip() {
        let sk = SecretKey::generate("deploy-1").unwrap();
        let reparsed = SecretKey::parse(&sk.to_string()).unwrap();
        let pk = PublicKey::parse(&reparsed.public().to_string()).unwrap();
        let sig = sk.sign(b"hello");
        let keys = TrustedKeys::new(vec![pk]);
        assert_eq!(keys.verify_any(b"hello", [sig.as_str()]), Some("deploy-1"));
        assert_eq!(keys.verify_any(b"hellO", [sig.as_str()]), None);
    }

    #[test]
    fn nix_secret_key_signs_like_nix() {
        // The secret half of PK, as written by Nix; our signature over the
        // fingerprint must equal the one `nix copy` wrote (ed25519 is
        // deterministic).
        let sk = SecretKey::parse(
            "test1:lVvxm21c+W4+TPn/OsYekxmj7BQa1+dAO4ipyK2bk+lunKScLjn1JwZMNgXBKh+FY/PozyNNyfjA6xlHHUitLA==",
        )
        .unwrap();
        assert_eq!(sk.public().to_string(), PK);
        assert_eq!(sk.sign(fp(888).as_bytes()), SIG);
    }

    #[test]
    fn key_errors() {
        assert_eq!(PublicKey::parse("nocolon"), Err(KeyError::Name));
        assert_eq!(PublicKey::parse(":AAAA"), Err(KeyError::Name));
        assert_eq!(PublicKey::parse("k:AAAA"), Err(KeyError::Encoding));
        assert!(SecretKey::parse(PK).is_err());
        assert_eq!(PublicKey::parse(&format!("{PK}\n")).unwrap().to_string(), PK);
    }
}
