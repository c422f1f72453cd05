//! Deploy key rotation without re-flashing: a document signed by a key the
//! device trusts now names the keys it trusts from then on.
//!
//! ```text
//! rotation = {"rotate_keys": {"seq": seq, "issued": time, "expires": time,
//!                             "deploy_keys": [public-key…]}}    ; 1..=MAX_KEYS
//! public-key = name ":" base64(32 bytes)    ; names unique, at most FIELD_MAX bytes
//! ```
//! Signed like every deploy document (same keys, same check). Its own
//! sequence space: `seq` must be above the last rotation applied; the same
//! sequence with the same bytes again is [`Outcome::AlreadyApplied`] (the
//! file stays on the poll URL), with other bytes refused. `issued` and
//! `expires` follow the channel rules ([`super::validity`], the clock of
//! [`super::fresh`]), so a captured rotation cannot be played to a device
//! forever.
//!
//! Decisions:
//! - The new set *replaces* the trusted set. Rotation exists to retire a
//!   key (lost, leaked, its holder gone); a set that only grew could never
//!   do that.
//! - A key may sign its own removal: that is a handover (old key signs
//!   "trust only the new one").
//! - An empty set is refused: the device could never be told anything again.
//! - The config's keys are replaced too, but only while the config's
//!   `deploy_keys` stay what they were when the rotation was applied
//!   ([`Applied::base`], a digest of them): a config that changes (a new
//!   NixOS generation with the new keys written in, a re-flash, an operator
//!   on the console) is newer knowledge than the rotation and wins, and
//!   that is how a device whose rotated keys are all lost is recovered.
//!   The rotation sequence is kept either way, so an old rotation cannot
//!   be replayed after such a reset.

use super::wire::Capped;
use super::{need, Refusal};
use crate::deploy::{self as signed, MAX_SEQ};
use crate::nix::{PublicKey, TrustedKeys};
use crate::text::{clip, FIELD_MAX};
use serde::Deserialize;
use sha2::{Digest, Sha256};

pub const MAX_KEYS: usize = 16;

#[derive(Deserialize)]
struct WireInner {
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    issued: Option<u64>,
    #[serde(default)]
    expires: Option<u64>,
    #[serde(default)]
    deploy_keys: Option<Capped<String, MAX_KEYS>>,
}

#[derive(Deserialize)]
struct Wire {
    #[serde(default)]
    rotate_keys: Option<WireInner>,
}

/// A verified rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    pub seq: u64,
    pub issued: u64,
    pub expires: u64,
    /// Parsed, names unique, 1..=MAX_KEYS.
    pub keys: Vec<PublicKey>,
    /// The key that signed it.
    pub signer: String,
    pub digest: [u8; 32],
}

/// What the device persists after applying a rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub seq: u64,
    pub digest: [u8; 32],
    /// [`base`] of the config's deploy keys when it was applied.
    pub base: [u8; 32],
    /// The trusted keys, `name:base64` each.
    pub keys: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Apply(Rotation),
    /// This very document was applied before.
    AlreadyApplied,
}

/// Why a rotation is refused, beyond what any channel document can be
/// refused for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotationRefusal {
    Document(Refusal),
    Malformed(String),
    NoKeys,
    BadKey { key: String, error: String },
    DuplicateName(String),
    Stale { seq: u64, applied: u64 },
}

impl std::fmt::Display for RotationRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RotationRefusal::Document(r) => write!(f, "key rotation: {r}"),
            RotationRefusal::Malformed(e) => write!(f, "malformed key rotation: {}", clip(e, 4 * FIELD_MAX)),
            RotationRefusal::NoKeys => write!(f, "key rotation names no keys: the device could never be told anything"),
            RotationRefusal::BadKey { key, error } => {
                write!(f, "key rotation: \"{}\": {error}", clip(key, 2 * FIELD_MAX))
            }
            RotationRefusal::DuplicateName(n) => {
                write!(f, "key rotation: two keys are named \"{}\" (a signature names its key)", clip(n, FIELD_MAX))
            }
            RotationRefusal::Stale { seq, applied } => {
                write!(f, "key rotation sequence {seq} is not above the last applied, {applied}")
            }
        }
    }
}

impl From<Refusal> for RotationRefusal {
    fn from(r: Refusal) -> Self {
        RotationRefusal::Document(r)
    }
}

/// A digest of a key set, independent of order and whitespace.
pub fn base(keys: &TrustedKeys) -> [u8; 32] {
    let mut all: Vec<String> = keys.keys().iter().map(PublicKey::to_string).collect();
    all.sort();
    Sha256::digest(all.join("\n").as_bytes()).into()
}

/// The deploy keys the device trusts: the applied rotation's while the
/// config's keys are those it was applied over, else the config's.
pub fn effective(config: &TrustedKeys, applied: Option<&Applied>) -> TrustedKeys {
    match applied {
        Some(a) if a.base == base(config) => {
            let keys: Vec<PublicKey> = a.keys.iter().filter_map(|k| PublicKey::parse(k).ok()).collect();
            // A damaged record must not leave the device trusting nothing.
            match keys.is_empty() {
                true => config.clone(),
                false => TrustedKeys::new(keys),
            }
        }
        _ => config.clone(),
    }
}

/// The JSON and every rule that does not depend on the device (no
/// signature: the admin side checks what it is about to sign). `signer` is
/// left empty.
pub fn parse(body: &[u8]) -> Result<Rotation, RotationRefusal> {
    let w: Wire = crate::json::from_slice_bounded(body).map_err(|e| RotationRefusal::Malformed(e.to_string()))?;
    let w = need(w.rotate_keys, "document", "rotate_keys")?;
    let seq = need(w.seq, "rotate_keys", "seq")?;
    let (issued, expires) = (need(w.issued, "rotate_keys", "issued")?, need(w.expires, "rotate_keys", "expires")?);
    let listed = need(w.deploy_keys, "rotate_keys", "deploy_keys")?;
    if seq > MAX_SEQ {
        return Err(Refusal::SeqTooLarge(seq).into());
    }
    super::validity(issued, expires)?;
    if listed.total > MAX_KEYS {
        let r = Refusal::TooMany { what: "deploy keys", got: listed.total, max: MAX_KEYS };
        return Err(r.into());
    }
    if listed.items.is_empty() {
        return Err(RotationRefusal::NoKeys);
    }
    let mut keys: Vec<PublicKey> = Vec::with_capacity(listed.items.len());
    for k in &listed.items {
        let pk = PublicKey::parse(k).map_err(|e| RotationRefusal::BadKey { key: k.clone(), error: e.to_string() })?;
        if pk.name().len() > FIELD_MAX {
            let error = format!("key name longer than {FIELD_MAX} bytes");
            return Err(RotationRefusal::BadKey { key: k.clone(), error });
        }
        if keys.iter().any(|have| have.name() == pk.name()) {
            return Err(RotationRefusal::DuplicateName(pk.name().to_owned()));
        }
        keys.push(pk);
    }
    let digest = Sha256::digest(body).into();
    Ok(Rotation { seq, issued, expires, keys, signer: String::new(), digest })
}

/// Verifies a rotation against the keys trusted now (`trusted`, from
/// [`effective`]), the last applied rotation's sequence and digest, and the
/// effective time `now` ([`super::fresh::Clock::now`]).
pub fn verify(
    body: &[u8],
    sig: Option<&[u8]>,
    trusted: &TrustedKeys,
    last: Option<(u64, [u8; 32])>,
    now: u64,
) -> Result<Outcome, RotationRefusal> {
    let signer = signed::check_signature(body, sig, trusted).map_err(Refusal::Signature)?;
    let r = Rotation { signer, ..parse(body)? };
    let now = now.max(r.issued);
    if super::fresh::expired(r.expires, now) {
        return Err(Refusal::Expired { expires: r.expires, now }.into());
    }
    if let Some((applied, d)) = last {
        if r.seq == applied && d == r.digest {
            return Ok(Outcome::AlreadyApplied);
        }
        if r.seq <= applied {
            return Err(RotationRefusal::Stale { seq: r.seq, applied });
        }
    }
    Ok(Outcome::Apply(r))
}

impl Rotation {
    /// The record to persist, given the config's keys now.
    pub fn applied(&self, config: &TrustedKeys) -> Applied {
        Applied {
            seq: self.seq,
            digest: self.digest,
            base: base(config),
            keys: self.keys.iter().map(PublicKey::to_string).collect(),
        }
    }
}

#[derive(serde::Serialize)]
struct RotationOut {
    seq: u64,
    issued: u64,
    expires: u64,
    deploy_keys: Vec<String>,
}

#[derive(serde::Serialize)]
struct DocOut {
    rotate_keys: RotationOut,
}

/// The document's JSON (the admin side).
pub fn render(seq: u64, issued: u64, expires: u64, keys: &[PublicKey]) -> Result<String, crate::json::TooLarge> {
    let deploy_keys = keys.iter().map(PublicKey::to_string).collect();
    crate::json::to_string(&DocOut { rotate_keys: RotationOut { seq, issued, expires, deploy_keys } })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::Rejection;
    use crate::nix::SecretKey;

    const T0: u64 = 1_800_000_000;
    const DAY: u64 = 86_400;

    fn key(name: &str) -> SecretKey {
        SecretKey::generate(name).unwrap()
    }

    fn set(keys: &[&SecretKey]) -> TrustedKeys {
        TrustedKeys::new(keys.iter().map(|k| k.public()).collect())
    }

    fn rotate(signer: &SecretKey, seq: u64, to: &[&SecretKey]) -> (String, String) {
        let body = render(seq, T0, T0 + 7 * DAY, &to.iter().map(|k| k.public()).collect::<Vec<_>>()).unwrap();
        let sig = signer.sign(body.as_bytes());
        (body, sig)
    }

    fn run(
        doc: &(String, String),
        trusted: &TrustedKeys,
        last: Option<(u64, [u8; 32])>,
    ) -> Result<Outcome, RotationRefusal> {
        verify(doc.0.as_bytes(), Some(doc.1.as_bytes()), trusted, last, T0)
    }

    fn applied(o: Result<Outcome, RotationRefusal>) -> Rotation {
        match o {
            Ok(Outcome::Apply(r)) => r,
            o => panic!("{o:?}"),
        }
    }

    /// A handover: the old key signs "trust only the new one"; after it,
    /// the old key is refused and the new one works, across a restart
    /// (the record persisted and re-read), until the config changes.
    #[test]
    fn a_key_hands_over_to_another_and_is_then_refused() {
        let (old, new) = (key("admin-1"), key("admin-2"));
        let config = set(&[&old]);
        let doc = rotate(&old, 1, &[&new]);
        let r = applied(run(&doc, &effective(&config, None), None));
        assert_eq!((r.signer.as_str(), r.seq), ("admin-1", 1));
        let rec = r.applied(&config);
        let now = effective(&config, Some(&rec));
        assert_eq!(now.keys().iter().map(|k| k.name()).collect::<Vec<_>>(), ["admin-2"]);
        // The old key can no longer sign anything: not a rotation, not a
        // channel document.
        let back = rotate(&old, 2, &[&old]);
        assert_eq!(
            run(&back, &now, Some((rec.seq, rec.digest))).unwrap_err(),
            RotationRefusal::Document(Refusal::Signature(Rejection::UnknownKey("admin-1".into())))
        );
        let stranger = key("admin-9");
        let e = run(&rotate(&stranger, 2, &[&stranger]), &now, Some((1, rec.digest))).unwrap_err();
        assert_eq!(e.to_string(), "key rotation: signed by unknown key \"admin-9\"");
        // The new key rotates on (to two keys).
        let third = key("admin-3");
        let r2 = applied(run(&rotate(&new, 2, &[&new, &third]), &now, Some((1, rec.digest))));
        assert_eq!(r2.keys.len(), 2);
        // The same document again: already applied, not an error.
        assert_eq!(run(&doc, &effective(&config, None), Some((1, rec.digest))), Ok(Outcome::AlreadyApplied));
    }

    #[test]
    fn a_changed_config_wins_over_a_rotation_and_the_sequence_stays() {
        let (old, new, fresh) = (key("admin-1"), key("admin-2"), key("admin-5"));
        let config = set(&[&old]);
        let rec = applied(run(&rotate(&old, 4, &[&new]), &config, None)).applied(&config);
        // Same keys in another order or spacing: the same config.
        let reordered = TrustedKeys::new(vec![PublicKey::parse(&format!(" {} \n", old.public())).unwrap()]);
        assert_eq!(base(&reordered), base(&config));
        assert_eq!(effective(&reordered, Some(&rec)).keys()[0].name(), "admin-2");
        // A re-flash or a new generation with other keys: the config rules.
        let reflashed = set(&[&fresh]);
        assert_eq!(effective(&reflashed, Some(&rec)).keys()[0].name(), "admin-5");
        // And the old rotation is not replayed over it: its sequence is kept.
        let e = run(&rotate(&fresh, 3, &[&fresh]), &reflashed, Some((rec.seq, rec.digest))).unwrap_err();
        assert_eq!(e.to_string(), "key rotation sequence 3 is not above the last applied, 4");
        // A damaged record never leaves the device trusting nothing.
        let broken = Applied { keys: vec!["junk".into()], ..rec.clone() };
        assert_eq!(effective(&config, Some(&broken)).keys()[0].name(), "admin-1");
    }

    #[test]
    fn refusals_with_their_messages() {
        let k = key("admin-1");
        let trusted = set(&[&k]);
        let sign = |body: String| (body.clone(), k.sign(body.as_bytes()));
        let pk = k.public().to_string();
        let cases: Vec<(String, &str)> = vec![
            (
                render(1, T0, T0 + DAY, &[]).unwrap(),
                "key rotation names no keys: the device could never be told anything",
            ),
            (
                format!(
                    r#"{{"rotate_keys":{{"seq":1,"issued":{T0},"expires":{},"deploy_keys":["{pk}","{pk}"]}}}}"#,
                    T0 + 1
                ),
                "key rotation: two keys are named \"admin-1\" (a signature names its key)",
            ),
            (
                format!(r#"{{"rotate_keys":{{"seq":1,"issued":{T0},"expires":{},"deploy_keys":["x:abc"]}}}}"#, T0 + 1),
                "key rotation: \"x:abc\": key is not valid base64 of the right length",
            ),
            (
                format!(
                    r#"{{"rotate_keys":{{"seq":1,"issued":{T0},"expires":{},"deploy_keys":[{}"{pk}"]}}}}"#,
                    T0 + 1,
                    format!("\"{pk}\",").repeat(16)
                ),
                "key rotation: 17 deploy keys, at most 16 allowed",
            ),
            (
                render(1, T0, T0 + 91 * DAY, &[k.public()]).unwrap(),
                "key rotation: valid for 7862400 s (expires - issued), more than the 7776000 s (90 days) allowed",
            ),
            (
                render(1, T0 - 2 * DAY, T0 - DAY, &[k.public()]).unwrap(),
                "key rotation: document expired at 1799913600 (now 1800000000)",
            ),
            (
                render(MAX_SEQ + 1, T0, T0 + DAY, &[k.public()]).unwrap(),
                "key rotation: sequence 9007199254740992 is above the largest allowed, 9007199254740991 (2^53-1)",
            ),
            (
                format!(r#"{{"rotate_keys":{{"seq":1,"issued":{T0},"expires":{}}}}}"#, T0 + 1),
                "key rotation: rotate_keys: missing field `deploy_keys`",
            ),
        ];
        for (body, want) in cases {
            let e = run(&sign(body.clone()), &trusted, None).unwrap_err();
            assert_eq!(e.to_string(), want, "{body}");
        }
        let long = format!("{}:{}", "n".repeat(200), pk.split_once(':').unwrap().1);
        let body =
            format!(r#"{{"rotate_keys":{{"seq":1,"issued":{T0},"expires":{},"deploy_keys":["{long}"]}}}}"#, T0 + 1);
        assert!(run(&sign(body), &trusted, None).unwrap_err().to_string().ends_with("key name longer than 128 bytes"));
        // Same sequence, other bytes: refused, not taken as applied.
        let doc = sign(render(5, T0, T0 + DAY, &[k.public()]).unwrap());
        let e = run(&doc, &trusted, Some((5, [1; 32]))).unwrap_err();
        assert_eq!(e, RotationRefusal::Stale { seq: 5, applied: 5 });
    }
}
