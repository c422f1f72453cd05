//! `nixless sign`: the real binary signs a hand-written channel document
//! and a key rotation; the agent-side checks accept the file and its .sig;
//! a document no device would take is refused with one line and no .sig.

mod common;

use common::{nixless, now};
use nixless::channel::{self, keys};
use nixless::nix::{PublicKey, TrustedKeys};
use std::path::Path;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn keygen(dir: &Path, name: &str) -> (std::path::PathBuf, TrustedKeys) {
    let keyfile = dir.join(format!("{name}.key"));
    let out = nixless(&["keygen", name, "--out", keyfile.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let public = std::fs::read_to_string(dir.join(format!("{name}.key.pub"))).unwrap();
    (keyfile, TrustedKeys::new(vec![PublicKey::parse(&public).unwrap()]))
}

#[test]
fn signs_channel_and_rotation_files_that_agents_accept() {
    let tmp = tempfile::tempdir().unwrap();
    let (key, trusted) = keygen(tmp.path(), "admin-1");
    let t = now();
    let doc = tmp.path().join("stable.json");
    let body = format!(
        "{{\n  \"channel\": \"stable\", \"seq\": 1, \"issued\": {t}, \"expires\": {},\n  \"groups\": {{\"kiosk\": {{\
         \"system\": \"/nix/store/qx8l0zlfvk6k8whfjvianr1mywbz9k4v-nixos-system-kiosk\", \"action\": \"boot\",\n  \
         \"waves\": [{{\"percent\": 0.5}}, {{\"percent\": 100, \"soak_secs\": 600}}]}}}}\n}}\n",
        t + 7 * 86_400
    );
    std::fs::write(&doc, &body).unwrap();
    let out = nixless(&["sign", "--key", key.to_str().unwrap(), doc.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).starts_with("nixless: signed channel stable seq 1, 1 group(s)"), "{}", stderr(&out));
    let sig = std::fs::read(tmp.path().join("stable.json.sig")).unwrap();
    let v = channel::verify(body.as_bytes(), Some(&sig), &trusted, "stable").unwrap();
    assert_eq!(v.doc.groups[0].waves[0].basis_points, 50);

    let (_, next) = keygen(tmp.path(), "admin-2");
    let rot = tmp.path().join("keys.json");
    std::fs::write(&rot, keys::render(1, t, t + 86_400, next.keys()).unwrap()).unwrap();
    let out = nixless(&["sign", "--key", key.to_str().unwrap(), rot.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("admin-1 is not in the new key set"), "{}", stderr(&out));
    let sig = std::fs::read(tmp.path().join("keys.json.sig")).unwrap();
    let got = keys::verify(&std::fs::read(&rot).unwrap(), Some(&sig), &trusted, None, t).unwrap();
    assert!(matches!(got, keys::Outcome::Apply(r) if r.signer == "admin-1"));
}

#[test]
fn refuses_an_expired_document_with_one_line_and_no_signature() {
    let tmp = tempfile::tempdir().unwrap();
    let (key, _) = keygen(tmp.path(), "admin-1");
    let t = now();
    let doc = tmp.path().join("old.json");
    let body = format!(
        r#"{{"channel":"stable","seq":1,"issued":{},"expires":{},"halt":true,"groups":{{}}}}"#,
        t - 86_400,
        t - 60
    );
    std::fs::write(&doc, body).unwrap();
    let out = nixless(&["sign", "--key", key.to_str().unwrap(), doc.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("is not after this machine's clock"), "{err}");
    assert!(!tmp.path().join("old.json.sig").exists());
}
