//! The admin side: `nixless sign --key KEY FILE` checks a channel document
//! or a key rotation exactly as a device will (the same parsers), refuses
//! one no device would take (or one dated more than
//! [`super::MAX_ISSUED_AHEAD_SECS`] ahead of this machine's clock), and
//! writes the detached signature to `FILE.sig`. The bytes signed are the
//! file's, unchanged: an admin's CI writes the JSON however it likes.

use super::keys;
use crate::nix::SecretKey;
use serde::de::IgnoredAny;
use serde::Deserialize;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest document signed: an agent reads at most `max_body_bytes`
/// (16 MiB at most) of a polled document.
pub const MAX_FILE: u64 = 16 << 20;

#[derive(Deserialize)]
struct Probe {
    #[serde(default)]
    rotate_keys: Option<IgnoredAny>,
}

/// Checks `body` and returns a one-line summary and the signature.
pub fn check_and_sign(body: &[u8], key: &SecretKey, now: u64) -> Result<(String, String), String> {
    let rotation = crate::json::from_slice_bounded::<Probe>(body).is_ok_and(|p| p.rotate_keys.is_some());
    if !rotation {
        let (d, sig) = super::issue(body, key, now)?;
        let halted = d.groups.iter().filter(|g| g.halt).count();
        let summary = format!(
            "channel {} seq {}, {} group(s){}{}, expires {}",
            d.channel,
            d.seq,
            d.groups.len(),
            if d.halt { ", HALT" } else { "" },
            if halted > 0 { format!(", {halted} group(s) halted") } else { String::new() },
            d.expires
        );
        return Ok((summary, sig));
    }
    let r = keys::parse(body).map_err(|e| e.to_string())?;
    if r.issued > now.saturating_add(super::MAX_ISSUED_AHEAD_SECS) {
        return Err(format!(
            "issued {} is more than {} s ahead of this machine's clock ({now})",
            r.issued,
            super::MAX_ISSUED_AHEAD_SECS
        ));
    }
    if super::fresh::expired(r.expires, now) {
        return Err(format!(
            "expires {} is not after this machine's clock ({now}): devices would refuse it",
            r.expires
        ));
    }
    if !r.keys.iter().any(|k| k.name() == key.public().name()) {
        // Allowed (a handover), but worth a line: this key stops working.
        eprintln!(
            "nixless: note: {} is not in the new key set; devices will refuse it after this rotation",
            key.public().name()
        );
    }
    let names: Vec<&str> = r.keys.iter().map(|k| k.name()).collect();
    let summary = format!("key rotation seq {} to [{}], expires {}", r.seq, names.join(", "), r.expires);
    Ok((summary, crate::deploy::sign(key, body)))
}

/// A document signed by [`sign_file`]: the bytes that were signed (read
/// once, so a publisher sends exactly these) and the signature line.
#[derive(Debug)]
pub struct Signed {
    pub sig_path: PathBuf,
    pub body: Vec<u8>,
    pub sig: String,
}

/// Signs `doc` with the secret key in `key`: writes `doc.sig` (through a
/// temporary file and a rename, so a poller never reads half a signature).
pub fn sign_file(key: &Path, doc: &Path, now: u64) -> Result<Signed, String> {
    let key_text = std::fs::read_to_string(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let sk = SecretKey::parse(&key_text).map_err(|e| format!("{}: {e}", key.display()))?;
    let f = std::fs::File::open(doc).map_err(|e| format!("{}: {e}", doc.display()))?;
    let mut body = Vec::new();
    f.take(MAX_FILE + 1).read_to_end(&mut body).map_err(|e| format!("{}: {e}", doc.display()))?;
    if body.len() as u64 > MAX_FILE {
        return Err(format!("{}: larger than {MAX_FILE} bytes, more than an agent reads", doc.display()));
    }
    let (summary, sig) = check_and_sign(&body, &sk, now).map_err(|e| format!("{}: {e}", doc.display()))?;
    let out = PathBuf::from(format!("{}.sig", doc.display()));
    // Through an exclusive temporary file, never through a link planted at
    // its name: the document's directory may be shared.
    crate::store::fsutil::write_atomic_path(&out, format!("{sig}\n").as_bytes(), true)
        .map_err(|e| format!("{}: {e}", out.display()))?;
    eprintln!("nixless: signed {summary}: wrote {}", out.display());
    Ok(Signed { sig_path: out, body, sig })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::TrustedKeys;

    const T0: u64 = 1_800_000_000;

    fn channel_json(issued: u64, expires: u64) -> String {
        format!(
            r#"{{"channel": "stable", "seq": 3, "issued": {issued}, "expires": {expires},
  "groups": {{"kiosk": {{"system": "/nix/store/qx8l0zlfvk6k8whfjvianr1mywbz9k4v-nixos-system-kiosk",
    "action": "switch", "waves": [{{"percent": 1}}, {{"percent": 100, "soak_secs": 3600}}]}}}}}}
"#
        )
    }

    /// A hand-written file (spaces, newlines, not our renderer's output) is
    /// signed as is, and an agent's check accepts the file and its .sig.
    #[test]
    fn signs_a_file_as_written_and_devices_accept_it() {
        let dir = tempfile::tempdir().unwrap();
        let sk = SecretKey::generate("admin-1").unwrap();
        let key = dir.path().join("admin.sk");
        std::fs::write(&key, format!("{sk}\n")).unwrap();
        let doc = dir.path().join("stable.json");
        std::fs::write(&doc, channel_json(T0, T0 + 86_400)).unwrap();
        let sig_path = sign_file(&key, &doc, T0).unwrap().sig_path;
        let (body, sig) = (std::fs::read(&doc).unwrap(), std::fs::read(&sig_path).unwrap());
        let keys = TrustedKeys::new(vec![sk.public()]);
        let v = crate::channel::verify(&body, Some(&sig), &keys, "stable").unwrap();
        assert_eq!(v.doc.seq, 3);
        assert!(!dir.path().join("stable.json.sig.tmp").exists());
        // A key rotation from a file, the same way.
        let new = SecretKey::generate("admin-2").unwrap();
        let rot = dir.path().join("keys.json");
        std::fs::write(&rot, keys::render(1, T0, T0 + 86_400, &[new.public()]).unwrap()).unwrap();
        let sig = std::fs::read(sign_file(&key, &rot, T0).unwrap().sig_path).unwrap();
        let out = keys::verify(&std::fs::read(&rot).unwrap(), Some(&sig), &keys, None, T0).unwrap();
        assert!(matches!(out, keys::Outcome::Apply(r) if r.keys[0].name() == "admin-2"));
    }

    #[test]
    fn refuses_what_no_device_would_take() {
        let sk = SecretKey::generate("admin-1").unwrap();
        let c = |body: &str, now: u64| check_and_sign(body.as_bytes(), &sk, now).unwrap_err();
        assert_eq!(
            c(&channel_json(T0, T0 + 86_400), T0 + 86_400),
            "expires 1800086400 is not after this machine's clock (1800086400): devices would refuse it"
        );
        let e = c(&channel_json(T0 + 7200, T0 + 86_400), T0);
        assert!(e.starts_with("issued 1800007200 is more than 3600 s ahead"), "{e}");
        assert_eq!(c("{\"rotate_keys\":{}}", T0), "key rotation: rotate_keys: missing field `seq`");
        let rot = keys::render(1, T0, T0 + 10, &[sk.public()]).unwrap();
        assert_eq!(
            c(&rot, T0 + 10),
            "expires 1800000010 is not after this machine's clock (1800000010): devices would refuse it"
        );
        assert_eq!(c("[1]", T0), "malformed channel document: Invalid type");
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.json");
        std::fs::write(&big, vec![b' '; (MAX_FILE + 1) as usize]).unwrap();
        let key = dir.path().join("k");
        std::fs::write(&key, sk.to_string()).unwrap();
        let e = sign_file(&key, &big, T0).unwrap_err();
        assert!(e.ends_with("larger than 16777216 bytes, more than an agent reads"), "{e}");
        assert!(!dir.path().join("big.json.sig").exists());
    }
}
