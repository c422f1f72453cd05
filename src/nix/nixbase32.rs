//! Nix's base-32 encoding ("nix32").
//!
//! Grammar: a string over the alphabet `0123456789abcdfghijklmnpqrsvwxyz`
//! (no `e o u t`) of length `ceil(8 * n / 5)` for `n` bytes. Unlike RFC 4648
//! the string is written most significant 5-bit group first, and the bits are
//! taken from the *end* of the byte string: character `i` (from the left) holds
//! bits `5 * (len - 1 - i) ..` counted from the least significant bit of byte 0.
//! A top character carrying bits beyond `8 * n` must carry zeros there; Nix
//! refuses such non-canonical strings and so do we.

const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// The encoded length for `n` bytes.
pub const fn encoded_len(n: usize) -> usize {
    (n * 8).div_ceil(5)
}

/// The decoded length for an encoded string of `len` characters, if `len`
/// is the encoding of a whole number of bytes.
pub fn decoded_len(len: usize) -> Option<usize> {
    let n = len * 5 / 8;
    (encoded_len(n) == len).then_some(n)
}

/// Encodes `bytes` to nix32.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let lo = u16::from(bytes[i]) >> j;
        let hi = if i + 1 < bytes.len() { u16::from(bytes[i + 1]) << (8 - j) } else { 0 };
        out.push(ALPHABET[((lo | hi) & 0x1f) as usize] as char);
    }
    out
}

fn digit(c: u8) -> Option<u8> {
    ALPHABET.iter().position(|&a| a == c).map(|p| p as u8)
}

/// Why a nix32 string did not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The length is not the encoding of a whole number of bytes.
    Length(usize),
    /// A character outside the alphabet, at this index.
    Character(usize),
    /// The top character has bits set beyond the decoded length.
    NonCanonical,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Length(n) => write!(f, "invalid nix32 length {n}"),
            Error::Character(i) => write!(f, "invalid nix32 character at index {i}"),
            Error::NonCanonical => write!(f, "non-canonical nix32 string"),
        }
    }
}

impl std::error::Error for Error {}

/// Decodes nix32 into exactly `N` bytes.
pub fn decode_exact<const N: usize>(s: &[u8]) -> Result<[u8; N], Error> {
    if s.len() != encoded_len(N) {
        return Err(Error::Length(s.len()));
    }
    let mut out = [0u8; N];
    for (pos, &c) in s.iter().enumerate() {
        let d = u16::from(digit(c).ok_or(Error::Character(pos))?);
        let n = s.len() - 1 - pos;
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= (d << j) as u8;
        let carry = d >> (8 - j);
        if i + 1 < N {
            out[i + 1] |= carry as u8;
        } else if carry != 0 {
            return Err(Error::NonCanonical);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors from real Nix: `nix hash to-base32` of known sha256 digests.
    #[test]
    fn sha256_of_empty_string() {
        // sha256("") = e3b0c442...b855; `nix hash to-base32 --type sha256 e3b0...`
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let bytes: Vec<u8> = (0..32).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect();
        let enc = encode(&bytes);
        assert_eq!(enc, "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
        assert_eq!(decode_exact::<32>(enc.as_bytes()).unwrap().to_vec(), bytes);
    }

    #[test]
    fn lengths() {
        assert_eq!(encoded_len(20), 32);
        assert_eq!(encoded_len(32), 52);
        assert_eq!(encoded_len(0), 0);
        assert_eq!(decoded_len(52), Some(32));
        assert_eq!(decoded_len(32), Some(20));
        assert_eq!(decoded_len(51), None);
    }

    #[test]
    fn roundtrip_all_lengths() {
        for n in 0..40usize {
            let bytes: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            let s = encode(&bytes);
            assert_eq!(s.len(), encoded_len(n));
            if n == 20 {
                assert_eq!(decode_exact::<20>(s.as_bytes()).unwrap().to_vec(), bytes);
            }
        }
    }

    #[test]
    fn refuses_bad_input() {
        let good = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";
        assert_eq!(decode_exact::<32>(&good.as_bytes()[1..]), Err(Error::Length(51)));
        let mut bad = good.as_bytes().to_vec();
        bad[3] = b'e';
        assert_eq!(decode_exact::<32>(&bad), Err(Error::Character(3)));
        // 52 chars carry 260 bits; the top character may only use 1 of its 5.
        let mut top = good.as_bytes().to_vec();
        top[0] = b'2';
        assert_eq!(decode_exact::<32>(&top), Err(Error::NonCanonical));
        top[0] = b'1';
        assert!(decode_exact::<32>(&top).is_ok());
    }
}
