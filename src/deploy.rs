//! Deploy documents: what an admin signs, and the checks that decide
//! whether the device obeys. Shared by the agent (verifies) and `admin`
//! (renders and signs), so it sits below both.
//!
//! Wire format: a JSON object, signed as raw bytes with a deploy key
//! (detached ed25519, `name:base64(64 bytes)`), sent in the
//! `Nixless-Signature` header of `POST /v1/deploy` or as `URL.sig` beside a
//! polled document.
//! ```text
//! {"host": "kiosk-7", "system": "/nix/store/<hash>-nixos-system-…",
//!  "seq": 1763900000, "action": "switch" | "boot" | "rollback" | "gc",
//!  "caches": [url…]?, "narinfos": [text…]?}     ; unknown fields ignored
//! ```
//! The checks run cheapest-first and the signature before anything reads
//! the JSON: signature present and well-formed → key trusted → signature
//! valid → JSON (nesting at most [`crate::json::MAX_DEPTH`]) → host →
//! sequence at most [`MAX_SEQ`] and above the highest accepted → system a
//! store path (not needed for `gc`) → action known.

use crate::nix::keys::Signature;
use crate::nix::{SecretKey, StorePath, TrustedKeys};
use serde::{Deserialize, Serialize};

/// What a deploy document asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Switch,
    Boot,
    Rollback,
    Gc,
}

impl Action {
    pub fn parse(s: &str) -> Option<Action> {
        Some(match s {
            "switch" => Action::Switch,
            "boot" => Action::Boot,
            "rollback" => Action::Rollback,
            "gc" => Action::Gc,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Switch => "switch",
            Action::Boot => "boot",
            Action::Rollback => "rollback",
            Action::Gc => "gc",
        }
    }
}

pub const SIGNATURE_HEADER: &str = "nixless-signature";

/// The largest sequence accepted: 2^53 − 1, the largest integer every JSON
/// reader keeps exact. Sequences only grow, so a signed document with
/// 2^64 − 1 would otherwise block every later deploy for good.
pub const MAX_SEQ: u64 = (1 << 53) - 1;

/// The document as JSON: what [`render`] writes and [`verify`] reads.
/// Absent optional fields are left out, not `null`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    pub seq: u64,
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caches: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub narinfos: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deploy {
    pub host: String,
    pub system: Option<StorePath>,
    pub seq: u64,
    pub action: Action,
    pub caches: Vec<String>,
    pub narinfos: Vec<String>,
    /// The deploy key that signed it.
    pub key: String,
}

/// Why a document was refused, with the HTTP status that says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    MissingSignature,
    MalformedSignature,
    UnknownKey(String),
    BadSignature,
    Malformed(String),
    OtherHost {
        doc: String,
        me: String,
    },
    Stale {
        seq: u64,
        highest: u64,
    },
    SeqTooLarge(u64),
    NotStorePath(String),
    UnknownAction(String),
    /// `rollback` without a system, and no generation before the current.
    NoPrevious,
}

impl Rejection {
    pub fn status(&self) -> u16 {
        match self {
            Rejection::MissingSignature
            | Rejection::MalformedSignature
            | Rejection::UnknownKey(_)
            | Rejection::BadSignature => 401,
            Rejection::OtherHost { .. } => 403,
            Rejection::Stale { .. } => 409,
            Rejection::Malformed(_)
            | Rejection::SeqTooLarge(_)
            | Rejection::NotStorePath(_)
            | Rejection::UnknownAction(_) => 400,
            Rejection::NoPrevious => 409,
        }
    }
}

impl std::fmt::Display for Rejection {
    /// Every string in a rejection may come from a stranger (a key name in
    /// a header) or at least from a document: each is clipped and escaped,
    /// so the message stays one bounded line in the log and the status.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::text::{clip, FIELD_MAX};
        match self {
            Rejection::MissingSignature => write!(f, "missing Nixless-Signature"),
            Rejection::SeqTooLarge(seq) => write!(f, "sequence {seq} is above the largest allowed, {MAX_SEQ} (2^53-1)"),
            Rejection::MalformedSignature => write!(f, "malformed signature (expected keyname:base64 of 64 bytes)"),
            Rejection::UnknownKey(k) => write!(f, "signed by unknown key \"{}\"", clip(k, FIELD_MAX)),
            Rejection::BadSignature => write!(f, "signature does not verify"),
            Rejection::Malformed(e) => write!(f, "malformed deploy document: {}", clip(e, 4 * FIELD_MAX)),
            Rejection::OtherHost { doc, me } => {
                write!(f, "document is for host \"{}\", this is \"{}\"", clip(doc, FIELD_MAX), clip(me, FIELD_MAX))
            }
            Rejection::Stale { seq, highest } => {
                write!(f, "sequence {seq} is not above the highest accepted, {highest}")
            }
            Rejection::NotStorePath(p) => write!(f, "system \"{}\" is not a store path", clip(p, 2 * FIELD_MAX)),
            Rejection::NoPrevious => write!(f, "rollback: no previous generation to roll back to, and no system given"),
            Rejection::UnknownAction(a) => {
                write!(f, "unknown action \"{}\" (switch, boot, rollback, gc)", clip(a, FIELD_MAX))
            }
        }
    }
}

/// What can be checked of a signature header before the body arrives: it
/// is present, well-formed and names a trusted key. (Whether it verifies
/// needs the body: [`check_signature`].)
pub fn check_signer(sig: Option<&[u8]>, keys: &TrustedKeys) -> Result<(), Rejection> {
    let sig = sig.ok_or(Rejection::MissingSignature)?;
    let sig = std::str::from_utf8(sig).map_err(|_| Rejection::MalformedSignature)?.trim();
    let parsed = Signature::parse(sig).ok_or(Rejection::MalformedSignature)?;
    match keys.keys().iter().any(|k| k.name() == parsed.name) {
        true => Ok(()),
        false => Err(Rejection::UnknownKey(parsed.name.to_owned())),
    }
}

/// Checks a signature header over `body` and returns the signing key name.
pub fn check_signature(body: &[u8], sig: Option<&[u8]>, keys: &TrustedKeys) -> Result<String, Rejection> {
    let sig = sig.ok_or(Rejection::MissingSignature)?;
    let sig = std::str::from_utf8(sig).map_err(|_| Rejection::MalformedSignature)?.trim();
    let parsed = Signature::parse(sig).ok_or(Rejection::MalformedSignature)?;
    let key = keys
        .keys()
        .iter()
        .find(|k| k.name() == parsed.name)
        .ok_or_else(|| Rejection::UnknownKey(parsed.name.to_owned()))?;
    if key.verifies(body, &parsed) {
        Ok(key.name().to_owned())
    } else {
        Err(Rejection::BadSignature)
    }
}

/// All checks; `highest` is the highest sequence accepted so far.
pub fn verify(
    body: &[u8],
    sig: Option<&[u8]>,
    keys: &TrustedKeys,
    host: &str,
    highest: u64,
) -> Result<Deploy, Rejection> {
    let key = check_signature(body, sig, keys)?;
    let w: Document = crate::json::from_slice_bounded(body).map_err(|e| Rejection::Malformed(e.to_string()))?;
    if w.host != host {
        return Err(Rejection::OtherHost { doc: w.host, me: host.to_owned() });
    }
    if w.seq > MAX_SEQ {
        return Err(Rejection::SeqTooLarge(w.seq));
    }
    if w.seq <= highest {
        return Err(Rejection::Stale { seq: w.seq, highest });
    }
    let action = Action::parse(&w.action).ok_or_else(|| Rejection::UnknownAction(w.action.clone()))?;
    let system = match (&w.system, action) {
        (Some(s), _) => Some(StorePath::from_absolute(s).map_err(|_| Rejection::NotStorePath(s.clone()))?),
        (None, Action::Gc | Action::Rollback) => None,
        (None, _) => return Err(Rejection::Malformed("missing field `system`".into())),
    };
    Ok(Deploy {
        host: w.host,
        system,
        seq: w.seq,
        action,
        caches: w.caches.unwrap_or_default(),
        narinfos: w.narinfos.unwrap_or_default(),
        key,
    })
}

/// Writes a document (the admin side); past [`crate::json::MAX_OUTPUT`],
/// the most any agent takes, it is refused.
pub fn render(
    host: &str,
    system: Option<&str>,
    seq: u64,
    action: Action,
    caches: &[String],
    narinfos: &[String],
) -> Result<String, crate::json::TooLarge> {
    let some = |v: &[String]| (!v.is_empty()).then(|| v.to_vec());
    let doc = Document {
        host: host.to_owned(),
        system: system.map(str::to_owned),
        seq,
        action: action.as_str().to_owned(),
        caches: some(caches),
        narinfos: some(narinfos),
    };
    crate::json::to_string(&doc)
}

/// Signs document bytes: the value of the `Nixless-Signature` header.
pub fn sign(key: &SecretKey, body: &[u8]) -> String {
    key.sign(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::PublicKey;

    const SYS: &str = "/nix/store/qx8l0zlfvk6k8whfjvianr1mywbz9k4v-nixos-system-kiosk";

    fn setup() -> (SecretKey, TrustedKeys) {
        let sk = SecretKey::generate("admin-1").unwrap();
        let keys = TrustedKeys::new(vec![PublicKey::parse(&sk.public().to_string()).unwrap()]);
        (sk, keys)
    }

    #[test]
    fn accepts_a_good_document_with_narinfos() {
        let (sk, keys) = setup();
        let ni = "StorePath: /nix/store/x\nURL: nar/a \"quoted\"\n".to_string();
        let doc =
            render("kiosk-7", Some(SYS), 10, Action::Switch, &["http://c".into()], std::slice::from_ref(&ni)).unwrap();
        let sig = sign(&sk, doc.as_bytes());
        let d = verify(doc.as_bytes(), Some(sig.as_bytes()), &keys, "kiosk-7", 9).unwrap();
        assert_eq!(d.seq, 10);
        assert_eq!(d.system.unwrap().to_string(), SYS);
        assert_eq!(d.narinfos, vec![ni]);
        assert_eq!(d.caches, vec!["http://c".to_string()]);
        assert_eq!(d.key, "admin-1");
    }

    #[test]
    fn refusals_in_order() {
        let (sk, keys) = setup();
        let doc = render("kiosk-7", Some(SYS), 10, Action::Switch, &[], &[]).unwrap();
        let b = doc.as_bytes();
        let sig = sign(&sk, b);
        let other = SecretKey::generate("admin-1").unwrap();
        let stranger = SecretKey::generate("stranger").unwrap();
        let check = |body: &[u8], sig: Option<&str>, host: &str, highest: u64| {
            verify(body, sig.map(str::as_bytes), &keys, host, highest).unwrap_err()
        };
        assert_eq!(check(b, None, "kiosk-7", 0), Rejection::MissingSignature);
        assert_eq!(check(b, Some("garbage"), "kiosk-7", 0), Rejection::MalformedSignature);
        assert_eq!(check(b, Some(&sign(&stranger, b)), "kiosk-7", 0), Rejection::UnknownKey("stranger".into()));
        assert_eq!(check(b, Some(&sign(&other, b)), "kiosk-7", 0), Rejection::BadSignature);
        let tampered = doc.replace("10", "11");
        assert_eq!(check(tampered.as_bytes(), Some(&sig), "kiosk-7", 0), Rejection::BadSignature);
        assert!(matches!(check(b, Some(&sig), "kiosk-8", 0), Rejection::OtherHost { .. }));
        assert_eq!(check(b, Some(&sig), "kiosk-7", 10), Rejection::Stale { seq: 10, highest: 10 });
        // Signature checked before the JSON is even looked at.
        assert_eq!(check(b"{not json", Some(&sign(&other, b"{not json")), "kiosk-7", 0), Rejection::BadSignature);
        let junk = b"{not json";
        assert!(matches!(check(junk, Some(&sign(&sk, junk)), "kiosk-7", 0), Rejection::Malformed(_)));
        for (doc, want) in [
            (r#"{"host":"kiosk-7","system":"/tmp/evil","seq":11,"action":"switch"}"#, "NotStorePath"),
            (
                r#"{"host":"kiosk-7","system":"/nix/store/qx8l0zlfvk6k8whfjvianr1mywbz9k4v-x","seq":11,"action":"reboot"}"#,
                "UnknownAction",
            ),
            (r#"{"host":"kiosk-7","seq":11,"action":"switch"}"#, "Malformed"),
            (
                r#"{"host":"kiosk-7","system":"/nix/store/qx8l0zlfvk6k8whfjvianr1mywbz9k4v-x","seq":-1,"action":"switch"}"#,
                "Malformed",
            ),
        ] {
            let e = check(doc.as_bytes(), Some(&sign(&sk, doc.as_bytes())), "kiosk-7", 0);
            assert!(format!("{e:?}").starts_with(want), "{doc}: {e:?}");
        }
        assert_eq!(Rejection::BadSignature.status(), 401);
        assert_eq!(Rejection::Stale { seq: 1, highest: 2 }.status(), 409);
    }

    #[test]
    fn seq_above_2_pow_53_minus_1_is_refused() {
        let (sk, keys) = setup();
        let at = |seq: u64| {
            let doc = render("kiosk-7", Some(SYS), seq, Action::Switch, &[], &[]).unwrap();
            verify(doc.as_bytes(), Some(sign(&sk, doc.as_bytes()).as_bytes()), &keys, "kiosk-7", 0)
        };
        assert_eq!(at(MAX_SEQ).unwrap().seq, 9_007_199_254_740_991);
        for seq in [MAX_SEQ + 1, u64::MAX] {
            let e = at(seq).unwrap_err();
            assert_eq!(e, Rejection::SeqTooLarge(seq));
            assert_eq!(e.status(), 400);
        }
        // Checked before staleness: the answer says what is wrong with it.
        let doc = render("kiosk-7", Some(SYS), u64::MAX, Action::Switch, &[], &[]).unwrap();
        let e = verify(doc.as_bytes(), Some(sign(&sk, doc.as_bytes()).as_bytes()), &keys, "kiosk-7", MAX_SEQ);
        assert_eq!(
            e.unwrap_err().to_string(),
            format!("sequence {} is above the largest allowed, {MAX_SEQ} (2^53-1)", u64::MAX)
        );
    }

    /// serde-json-core would recurse once per level into the unknown field
    /// and overflow the stack; the depth is checked after the signature
    /// (an unsigned deep body costs only the signature check) and before
    /// serde.
    #[test]
    fn deep_nesting_is_refused_after_the_signature() {
        let (sk, keys) = setup();
        let doc = format!(
            r#"{{"host":"kiosk-7","seq":11,"action":"gc","x":{}{}}}"#,
            "[".repeat(2_000_000),
            "]".repeat(2_000_000)
        );
        let other = SecretKey::generate("admin-1").unwrap();
        let check =
            |k: &SecretKey| verify(doc.as_bytes(), Some(sign(k, doc.as_bytes()).as_bytes()), &keys, "kiosk-7", 0);
        assert_eq!(check(&other).unwrap_err(), Rejection::BadSignature);
        let e = check(&sk).unwrap_err();
        assert_eq!(e.to_string(), "malformed deploy document: arrays and objects nested deeper than 32 levels");
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn unknown_fields_are_ignored_and_gc_needs_no_system() {
        let (sk, keys) = setup();
        let doc = r#"{"host":"kiosk-7","seq":11,"action":"gc","future":{"x":[1,2]}}"#;
        let d = verify(doc.as_bytes(), Some(sign(&sk, doc.as_bytes()).as_bytes()), &keys, "kiosk-7", 0).unwrap();
        assert_eq!(d.action, Action::Gc);
        assert!(d.system.is_none());
    }
}
