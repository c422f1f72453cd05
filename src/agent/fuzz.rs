//! Fuzz entry points for what strangers reach first: the HTTP request head
//! parser and the deploy-document path (signature check → JSON →
//! validation). The cargo-fuzz targets in `fuzz/` call these; the unit
//! tests below run them on a bounded number of generated inputs, so every
//! `cargo test` fuzzes a little.
//!
//! Oracles: no panic (and no unbounded recursion) whatever the input; a
//! head the parser accepts re-parses to the same request; a document is
//! never accepted unless its signature verifies, and an accepted one obeys
//! the documented field rules.

use super::http::{self, Limits};
use crate::deploy::{self, Rejection};
use crate::nix::{SecretKey, TrustedKeys};
use std::sync::OnceLock;

/// A fixed deploy key, so fuzzed bodies can get past the signature check.
const FUZZ_KEY: &str =
    "fuzz-1:ybVyfJE31Qxo4Xia4CIEl52nfDi6UHX1Gxh6Y20xHJfDlKlw7epgiQFnYAMYNOMeHoKV7/QKUtfrEKRpRqpJEA==";

fn key() -> &'static (SecretKey, TrustedKeys) {
    static K: OnceLock<(SecretKey, TrustedKeys)> = OnceLock::new();
    K.get_or_init(|| {
        let sk = SecretKey::parse(FUZZ_KEY).expect("the fuzz key parses");
        let keys = TrustedKeys::new(vec![sk.public()]);
        (sk, keys)
    })
}

/// Arbitrary bytes as a buffered request head.
pub fn http_head(data: &[u8]) {
    let limits = Limits { max_body_bytes: 1 << 20, ..Limits::default() };
    match http::parse_request_head(data, &limits) {
        Ok(Some((req, consumed, len))) => {
            assert!(consumed <= data.len());
            assert!(len <= limits.max_body_bytes);
            assert!(req.path.starts_with('/') || req.path == "*", "{:?}", req.path);
            // The head alone parses to the same request.
            let again = http::parse_request_head(data.get(..consumed).unwrap_or_default(), &limits);
            let (req2, consumed2, len2) = again.expect("re-parse").expect("complete");
            assert_eq!(
                (req2.method, req2.path, req2.query, req2.headers),
                (req.method, req.path, req.query, req.headers)
            );
            assert_eq!((consumed2, len2), (consumed, len));
        }
        Ok(None) => {}
        Err(status) => assert!((400..600).contains(&status), "{status}"),
    }
}

/// Arbitrary bytes as a deploy document. The first byte chooses: even,
/// the rest is signed with the fuzz key (so JSON parsing and validation are
/// reached); odd, the rest is `signature-line \n body` (so the signature
/// path is fuzzed).
pub fn deploy_document(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let (sk, keys) = key();
    let (body, sig) = if mode % 2 == 0 {
        (rest.to_vec(), sk.sign(rest).into_bytes())
    } else {
        let cut = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        let (sig, body) = rest.split_at(cut);
        (body.get(1..).unwrap_or_default().to_vec(), sig.to_vec())
    };
    let highest = u64::from(mode >> 1);
    match deploy::verify(&body, Some(&sig), keys, "kiosk-7", highest) {
        Ok(d) => {
            assert!(deploy::check_signature(&body, Some(&sig), keys).is_ok());
            assert_eq!(d.host, "kiosk-7");
            assert!(d.seq > highest);
            let msg = format!("{d:?}");
            assert!(!msg.is_empty());
        }
        Err(rej) => {
            // Every refusal is one bounded line with a 4xx.
            let msg = rej.to_string();
            assert!(!msg.contains('\n'), "{msg}");
            assert!(msg.len() < 4096, "{} bytes", msg.len());
            assert!((400..500).contains(&rej.status()));
            if mode % 2 == 1 && !matches!(rej, Rejection::Stale { .. } | Rejection::OtherHost { .. }) {
                // With a forged signature only a signature refusal is possible,
                // unless the input carried a real one (then anything goes).
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testkit::{mutate, Rng};

    const RUNS: usize = 60_000;

    #[test]
    fn http_head_survives_a_bounded_fuzz_run() {
        let seeds: &[&[u8]] = &[
            b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /v1/deploy HTTP/1.1\r\nNixless-Signature: a:b\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n",
            b"GET http://h:1/x?y HTTP/1.0\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n",
        ];
        let dict: &[&[u8]] = &[
            b"\r\n",
            b"\n",
            b":",
            b" ",
            b"\0",
            "€".as_bytes(),
            b"Content-Length: ",
            b"Transfer-Encoding: chunked\r\n",
            b"99999999999999999999999",
            b"HTTP/1.1",
            b"/",
        ];
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for i in 0..RUNS {
            let seed = seeds[i % seeds.len()];
            http_head(&mutate(&mut rng, seed, dict, 2000));
        }
        for n in 0..300 {
            let junk: Vec<u8> = (0..n * 7).map(|_| rng.next() as u8).collect();
            http_head(&junk);
        }
    }

    #[test]
    fn deploy_document_survives_a_bounded_fuzz_run() {
        let sys = "/nix/store/qx8l0zlfvk6k8whfjvianr1mywbz9k4v-nixos-system-kiosk";
        let good = deploy::render(
            "kiosk-7",
            Some(sys),
            5,
            crate::deploy::Action::Switch,
            &["http://c".into()],
            &["StorePath: x\n".into()],
        )
        .unwrap();
        let mut seeds: Vec<Vec<u8>> = vec![[&[0u8][..], good.as_bytes()].concat()];
        let signed = format!("{}\n{good}", key().0.sign(good.as_bytes()));
        seeds.push([&[1u8][..], signed.as_bytes()].concat());
        seeds.push(b"\x02{\"host\":\"kiosk-7\",\"seq\":3,\"action\":\"gc\",\"x\":[[[{\"y\":[1,2,{}]}]]]}".to_vec());
        let dict: &[&[u8]] = &[
            b"[",
            b"{",
            b"\"",
            b"\\",
            b"\\u0000",
            b"18446744073709551616",
            b"-1",
            b"null",
            b",",
            b":",
            "€".as_bytes(),
            b"rollback",
            b"gc",
        ];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        // Fewer: each input is signed and verified (slow in a debug build).
        for i in 0..RUNS / 8 {
            let seed = &seeds[i % seeds.len()];
            deploy_document(&mutate(&mut rng, seed, dict, 2000));
        }
    }
}
