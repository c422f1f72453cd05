//! SHA-256 digests as Nix writes them.
//!
//! Grammar (for `NarHash`/`FileHash` values):
//! ```text
//! hash     = "sha256:" ( nix32{52} | hex{64} | base64{44} )
//!          | "sha256-" base64{44}                 ; SRI
//! ```
//! Only sha256 is accepted: it is the only algorithm the trust chain
//! (fingerprint, NarHash) is defined over for binary caches.

use super::{base64, nixbase32};

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256(pub [u8; 32]);

impl Sha256 {
    /// Parses any of the forms in the module grammar.
    pub fn parse(s: &str) -> Result<Self, HashError> {
        let (sri, rest) = if let Some(r) = s.strip_prefix("sha256:") {
            (false, r)
        } else if let Some(r) = s.strip_prefix("sha256-") {
            (true, r)
        } else {
            return Err(HashError::Algorithm);
        };
        let b = rest.as_bytes();
        let bytes = match (sri, b.len()) {
            (false, 52) => nixbase32::decode_exact::<32>(b).map_err(|_| HashError::Encoding)?,
            (false, 64) => decode_hex(b).ok_or(HashError::Encoding)?,
            (_, 44) => base64::decode_exact::<32>(b).ok_or(HashError::Encoding)?,
            _ => return Err(HashError::Length(b.len())),
        };
        Ok(Sha256(bytes))
    }

    /// `sha256:<nix32>`, the form used in fingerprints and by `nix hash path --base32`.
    pub fn to_nix32(&self) -> String {
        nixbase32::encode(&self.0)
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Display for Sha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.to_nix32())
    }
}

impl std::fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

fn decode_hex(s: &[u8]) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        *out.get_mut(i)? = (hi * 16 + lo) as u8;
    }
    Some(out)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashError {
    /// Not `sha256:` or `sha256-`.
    Algorithm,
    /// A digest of a length no encoding of 32 bytes has.
    Length(usize),
    /// Characters outside the encoding's alphabet, or a non-canonical form.
    Encoding,
}

impl std::fmt::Display for HashError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HashError::Algorithm => write!(f, "not a sha256 hash"),
            HashError::Length(n) => write!(f, "sha256 digest of invalid length {n}"),
            HashError::Encoding => write!(f, "malformed sha256 digest"),
        }
    }
}

impl std::error::Error for HashError {}

#[cfg(test)]
mod tests {
    use super::*;

    // From a narinfo written by `nix copy` (Nix 2.8) and its other forms from
    // `nix hash to-base16/to-base64/to-sri`.
    const NIX32: &str = "sha256:1n0layqxn1s4gmqmkxnl2pdr7gbmys1z1d9cvdpr8wq3pxap8i7z";

    #[test]
    fn all_forms_agree() {
        let h = Sha256::parse(NIX32).unwrap();
        assert_eq!(h.to_string(), NIX32);
        let hex = "sha256:ff447455bf0373946fdb2cb5f083f675bd93db15d4f659717d4407dbb15714d8";
        let b64 = "sha256:/0R0Vb8Dc5Rv2yy18IP2db2T2xXU9llxfUQH27FXFNg=";
        let sri = "sha256-/0R0Vb8Dc5Rv2yy18IP2db2T2xXU9llxfUQH27FXFNg=";
        assert_eq!(hex, format!("sha256:{}", h.to_hex()));
        for form in [hex, b64, sri] {
            assert_eq!(Sha256::parse(form).unwrap(), h, "{form}");
        }
    }

    #[test]
    fn refuses() {
        assert_eq!(Sha256::parse("md5:abc"), Err(HashError::Algorithm));
        assert_eq!(Sha256::parse("sha512:abc"), Err(HashError::Algorithm));
        assert_eq!(Sha256::parse("sha256:abc"), Err(HashError::Length(3)));
        assert_eq!(
            Sha256::parse("sha256-1n0layqxn1s4gmqmkxnl2pdr7gbmys1z1d9cvdpr8wq3pxap8i7z"),
            Err(HashError::Length(52))
        );
        let mut bad = NIX32.to_string();
        bad.replace_range(10..11, "e");
        assert_eq!(Sha256::parse(&bad), Err(HashError::Encoding));
        let hex_bad = format!("sha256:{}", "g".repeat(64));
        assert_eq!(Sha256::parse(&hex_bad), Err(HashError::Encoding));
    }
}
