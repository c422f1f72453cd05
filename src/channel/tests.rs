//! Channel documents: format, signature, refusals, decisions, fuzz.

use super::decide::admissible;
use super::*;
use crate::deploy::Rejection;
use crate::nix::PublicKey;

const SYS: &str = "/nix/store/qx8l0zlfvk6k8whfjvianr1mywbz9k4v-nixos-system-kiosk";
const SYS2: &str = "/nix/store/0x8l0zlfvk6k8whfjvianr1mywbz9k4v-nixos-system-kiosk";
const T0: u64 = 1_800_000_000;
const DAY: u64 = 86_400;

fn setup() -> (SecretKey, TrustedKeys) {
    let sk = SecretKey::generate("admin-1").unwrap();
    let keys = TrustedKeys::new(vec![PublicKey::parse(&sk.public().to_string()).unwrap()]);
    (sk, keys)
}

fn wave(percent: u16, from: Start, start: u64) -> Wave {
    Wave { basis_points: percent * 100, from, start }
}

/// stable, seq 7, kiosk group in 1 % → 10 % → 100 % waves.
fn doc() -> Doc {
    Doc {
        channel: "stable".into(),
        seq: 7,
        issued: T0,
        expires: T0 + 30 * DAY,
        halt: false,
        groups: vec![
            Group {
                tag: "kiosk".into(),
                system: StorePath::from_absolute(SYS).unwrap(),
                action: GroupAction::Switch,
                caches: vec!["https://cache.example.org".into()],
                halt: false,
                waves: vec![
                    wave(1, Start::Issued, T0),
                    wave(10, Start::Soak(3600), T0 + 3600),
                    wave(100, Start::At(T0 + 86_400), T0 + 86_400),
                ],
            },
            Group {
                tag: "lab".into(),
                system: StorePath::from_absolute(SYS2).unwrap(),
                action: GroupAction::Boot,
                caches: vec![],
                halt: false,
                waves: vec![wave(100, Start::Issued, T0)],
            },
        ],
    }
}

fn signed(sk: &SecretKey, body: &str) -> (Vec<u8>, Vec<u8>) {
    (body.as_bytes().to_vec(), sk.sign(body.as_bytes()).into_bytes())
}

fn check(body: &str) -> Result<Verified, Refusal> {
    let (sk, keys) = setup();
    let (b, s) = signed(&sk, body);
    verify(&b, Some(&s), &keys, "stable")
}

#[test]
fn round_trip_with_the_signer() {
    let (sk, keys) = setup();
    let d = doc();
    let body = render(&d).unwrap();
    let (back, sig) = issue(body.as_bytes(), &sk, T0).unwrap();
    assert_eq!(back, d);
    let v = verify(body.as_bytes(), Some(sig.as_bytes()), &keys, "stable").unwrap();
    assert_eq!(v.doc, d);
    assert_eq!(v.key, "admin-1");
    assert_eq!(v.digest, <[u8; 32]>::from(sha2::Sha256::digest(body.as_bytes())));
    // The signature is the deploy documents' own: the deploy check accepts it.
    assert_eq!(signed::check_signature(body.as_bytes(), Some(sig.as_bytes()), &keys).unwrap(), "admin-1");
}

#[test]
fn percents_read_and_render_with_two_decimals() {
    for (text, bp) in [("0.01", 1), ("0.05", 5), ("0.07", 7), ("0.5", 50), ("1", 100), ("12.34", 1234), ("100", 10_000)]
    {
        assert_eq!(basis_points(text.parse().unwrap()), Some(bp), "{text}");
        assert_eq!(crate::json::to_string(&Percent(bp)).unwrap(), text);
    }
    for bad in [0.0, -0.0, -1.0, 0.001, 0.005, 100.01, 101.0, 1.234, f64::NAN, f64::INFINITY] {
        assert_eq!(basis_points(bad), None, "{bad}");
    }
}

/// Each rule's refusal, with its one line.
#[test]
fn every_refusal_with_its_message() {
    let base = render(&doc()).unwrap();
    let mut cases: Vec<(String, &str)> = vec![
        (base.replace("\"stable\"", "\"st able\""), "channel \"st able\" is not 1 to 64 of A-Z a-z 0-9 . _ -"),
        (
            base.replace("\"seq\":7", "\"seq\":9007199254740992"),
            "sequence 9007199254740992 is above the largest allowed, 9007199254740991 (2^53-1)",
        ),
        (
            base.replace(&format!("\"issued\":{T0}"), "\"issued\":253402300800"),
            "issued 253402300800 is outside 0..=253402300799 (9999-12-31)",
        ),
        (
            base.replace(&format!("\"expires\":{}", T0 + 30 * DAY), &format!("\"expires\":{T0}")),
            "expires 1800000000 is not after issued 1800000000",
        ),
        (
            base.replace(&format!("\"expires\":{}", T0 + 30 * DAY), &format!("\"expires\":{}", T0 + 91 * DAY)),
            "valid for 7862400 s (expires - issued), more than the 7776000 s (90 days) allowed",
        ),
        (base.replace("\"lab\"", "\"kiosk\""), "group \"kiosk\" appears twice"),
        (base.replace("\"lab\"", "\"läb\""), "group tag \"läb\" is not 1 to 64 of A-Z a-z 0-9 . _ -"),
        (base.replace(SYS2, "/tmp/evil"), "group \"lab\": system \"/tmp/evil\" is not a store path"),
        (base.replace("\"boot\"", "\"rollback\""), "group \"lab\": unknown action \"rollback\" (switch, boot)"),
        (
            base.replace("https://cache.example.org", "ftp://x"),
            "group \"kiosk\": cache URL \"ftp://x\": expected http://, https://, s3:// or file://",
        ),
        (base.replace("[{\"percent\":100}]", "[]"), "group \"lab\" has no waves"),
        (
            base.replace("{\"percent\":1}", "{\"percent\":0}"),
            "group \"kiosk\" wave 1: percent 0 is not a number in (0, 100] with at most 2 decimals",
        ),
        (
            base.replace("{\"percent\":1}", "{\"percent\":1.001}"),
            "group \"kiosk\" wave 1: percent 1.001 is not a number in (0, 100] with at most 2 decimals",
        ),
        (
            base.replace("{\"percent\":1}", "{\"percent\":1e999}"),
            "group \"kiosk\" wave 1: percent inf is not a number in (0, 100] with at most 2 decimals",
        ),
        (
            base.replace("{\"percent\":10,", "{\"percent\":1,"),
            "group \"kiosk\" wave 2: percent is not above the previous wave's",
        ),
        (
            base.replace("\"soak_secs\":3600", "\"soak_secs\":3600,\"start\":1"),
            "group \"kiosk\" wave 2: give start or soak_secs, not both",
        ),
        (base.replace(",\"soak_secs\":3600", ""), "group \"kiosk\" wave 2: needs start or soak_secs"),
        (
            base.replace("\"soak_secs\":3600", "\"soak_secs\":7776001"),
            "group \"kiosk\" wave 2: soak_secs is above 7776000 (90 days)",
        ),
        (
            base.replace(&format!("\"start\":{}", T0 + DAY), "\"start\":1000"),
            "group \"kiosk\" wave 3: starts before the previous wave",
        ),
        (
            base.replace(&format!("\"start\":{}", T0 + DAY), &format!("\"start\":{}", T0 + 30 * DAY)),
            "group \"kiosk\" wave 3: does not start before the document expires",
        ),
        (
            base.replace(&format!("\"start\":{}", T0 + DAY), "\"start\":253402300800"),
            "group \"kiosk\" wave 3: start is after 9999-12-31",
        ),
        (
            base.replace("\"channel\":\"stable\"", "\"channel\":\"beta\""),
            "document is for channel \"beta\", this agent follows \"stable\"",
        ),
        (base.replace("\"seq\":7", "\"seq\":-7"), "malformed channel document: Invalid number."),
        (base.replace("\"seq\":7", "\"seq\":18446744073709551616"), "malformed channel document: Invalid number."),
    ];
    let missing: Vec<(String, &str)> = vec![
        (base.replace("\"channel\":\"stable\",", ""), "document: missing field `channel`"),
        (base.replace("\"seq\":7,", ""), "document: missing field `seq`"),
        (base.replace(&format!("\"issued\":{T0},"), ""), "document: missing field `issued`"),
        (base.replace(&format!("\"expires\":{},", T0 + 30 * DAY), ""), "document: missing field `expires`"),
        (base.replace(",\"groups\":{", ",\"grups\":{"), "document: missing field `groups`"),
        (base.replace(&format!("\"system\":\"{SYS2}\","), ""), "group \"lab\": missing field `system`"),
        (base.replace("\"action\":\"switch\",", ""), "group \"kiosk\": missing field `action`"),
        (base.replace(",\"waves\":[{\"percent\":100}]", ""), "group \"lab\": missing field `waves`"),
        (base.replace("{\"percent\":10,", "{"), "group \"kiosk\" wave 2: missing field `percent`"),
    ];
    cases.extend(missing);
    for (body, want) in cases {
        assert_ne!(body, base, "the replacement for {want:?} did not apply");
        let e = check(&body).unwrap_err();
        assert_eq!(e.to_string(), want, "{body}");
    }
}

#[test]
fn signature_refusals_are_the_deploy_documents() {
    let (sk, keys) = setup();
    let body = render(&doc()).unwrap();
    let b = body.as_bytes();
    let stranger = SecretKey::generate("stranger").unwrap();
    let same_name = SecretKey::generate("admin-1").unwrap();
    let v = |sig: Option<&str>| verify(b, sig.map(str::as_bytes), &keys, "stable").unwrap_err();
    assert_eq!(v(None), Refusal::Signature(Rejection::MissingSignature));
    assert_eq!(v(Some("junk")), Refusal::Signature(Rejection::MalformedSignature));
    assert_eq!(v(Some(&stranger.sign(b))), Refusal::Signature(Rejection::UnknownKey("stranger".into())));
    assert_eq!(v(Some(&same_name.sign(b))), Refusal::Signature(Rejection::BadSignature));
    // Tampered bytes after signing, and the signature checked before the
    // JSON is read (an unsigned junk body costs only the signature check).
    let sig = sk.sign(b);
    let tampered = body.replace("\"seq\":7", "\"seq\":8");
    let e = verify(tampered.as_bytes(), Some(sig.as_bytes()), &keys, "stable").unwrap_err();
    assert_eq!(e.to_string(), "signature does not verify");
    let e = verify(b"{junk", Some(same_name.sign(b"{junk").as_bytes()), &keys, "stable").unwrap_err();
    assert_eq!(e, Refusal::Signature(Rejection::BadSignature));
}

#[test]
fn hostile_inputs_are_refused_cleanly() {
    let base = render(&doc()).unwrap();
    let deep = format!("{{\"channel\":\"stable\",\"x\":{}{}}}", "[".repeat(1_000_000), "]".repeat(1_000_000));
    assert_eq!(
        check(&deep).unwrap_err().to_string(),
        "malformed channel document: arrays and objects nested deeper than 32 levels"
    );
    // NaN-like values: not JSON numbers, or strings where numbers go.
    for bad in ["NaN", "\"NaN\"", "Infinity", "\"1\"", "true", "[1]", "0x10"] {
        let body = base.replace("{\"percent\":1}", &format!("{{\"percent\":{bad}}}"));
        assert!(matches!(check(&body), Err(Refusal::Malformed(_))), "{bad}: {:?}", check(&body));
    }
    // `null` is an absent value (serde-json-core would otherwise read it as
    // a float NaN, what serializers write for NaN).
    let null = base.replace("{\"percent\":1}", "{\"percent\":null}");
    assert_eq!(check(&null).unwrap_err().to_string(), "group \"kiosk\" wave 1: missing field `percent`");
    // A duplicate field: refused (serde), not silently the first or last.
    let dup = base.replacen("\"seq\":7,", "\"seq\":7,\"seq\":99,", 1);
    assert!(matches!(check(&dup), Err(Refusal::Malformed(_))), "{:?}", check(&dup));
    // Escapes in a tag decode before the charset check.
    let esc = base.replace("\"lab\"", "\"l\\u0061b\\n\"");
    assert_eq!(check(&esc).unwrap_err().to_string(), "group tag \"lab\\n\" is not 1 to 64 of A-Z a-z 0-9 . _ -");
    assert_eq!(check(&base.replace("\"lab\"", "\"l\\u0061b\"")).unwrap().doc, doc());
    // A long tag is clipped in the message.
    let long = base.replace("\"lab\"", &format!("\"{}\"", "€".repeat(10_000)));
    let msg = check(&long).unwrap_err().to_string();
    assert!(msg.len() < 1024 && msg.contains("…(+"), "{msg}");
    // Lists and maps: too many is named, and counted past the cap.
    let many_waves = base.replace(
        "[{\"percent\":100}]",
        &format!(
            "[{}]",
            (1..=100).map(|p| format!("{{\"percent\":{p},\"soak_secs\":1}}")).collect::<Vec<_>>().join(",")
        ),
    );
    assert_eq!(check(&many_waves).unwrap_err().to_string(), "100 waves in a group, at most 16 allowed");
    let many_caches =
        base.replace("[\"https://cache.example.org\"]", &format!("[{}\"http://c\"]", "\"http://c\",".repeat(50_000)));
    assert_eq!(check(&many_caches).unwrap_err().to_string(), "50001 caches in a group, at most 8 allowed");
    let groups: String = (0..65)
        .map(|i| format!("\"g{i}\":{{\"system\":\"{SYS}\",\"action\":\"boot\",\"waves\":[{{\"percent\":100}}]}}"))
        .collect::<Vec<_>>()
        .join(",");
    let many_groups =
        format!("{{\"channel\":\"stable\",\"seq\":1,\"issued\":{T0},\"expires\":{},\"groups\":{{{groups}}}}}", T0 + 1);
    assert_eq!(check(&many_groups).unwrap_err().to_string(), "65 groups, at most 64 allowed");
    let long_url = base.replace("https://cache.example.org", &format!("https://{}", "a".repeat(2000)));
    assert_eq!(check(&long_url).unwrap_err().to_string(), "group \"kiosk\": cache URL of 2008 bytes, at most 1024");
    // Unknown fields (a later version's) are ignored at every level.
    let future = base
        .replacen("{", "{\"future\":{\"x\":[1,{\"y\":null}]},", 1)
        .replace("{\"percent\":1}", "{\"percent\":1,\"z\":\"q\"}");
    assert_eq!(check(&future).unwrap().doc, doc());
    // Trailing garbage.
    assert!(matches!(check(&format!("{base} x")), Err(Refusal::Malformed(_))));
}

/// A deploy document, a channel document and a key rotation, all signed by
/// the same key, are never taken for one another.
#[test]
fn document_kinds_do_not_pass_for_one_another() {
    use crate::deploy::Action;
    let (sk, keys) = setup();
    let deploy = crate::deploy::render("kiosk-7", Some(SYS), 10, Action::Switch, &[], &[]).unwrap();
    let channel = render(&doc()).unwrap();
    let rotation = super::keys::render(1, T0, T0 + DAY, &[sk.public()]).unwrap();
    let sig = |b: &str| sk.sign(b.as_bytes()).into_bytes();
    for other in [&deploy, &rotation] {
        let e = verify(other.as_bytes(), Some(&sig(other)), &keys, "stable").unwrap_err();
        assert_eq!(e.to_string(), "document: missing field `channel`");
    }
    for other in [&channel, &rotation] {
        let e = crate::deploy::verify(other.as_bytes(), Some(&sig(other)), &keys, "kiosk-7", 0);
        assert!(matches!(e, Err(Rejection::Malformed(_))), "{e:?}");
    }
    for other in [&channel, &deploy] {
        let e = super::keys::verify(other.as_bytes(), Some(&sig(other)), &keys, None, T0).unwrap_err();
        assert_eq!(e.to_string(), "key rotation: document: missing field `rotate_keys`");
    }
}

#[test]
fn issue_refuses_what_devices_would_and_a_far_future_issued() {
    let (sk, _) = setup();
    let body = render(&doc()).unwrap();
    assert!(issue(body.as_bytes(), &sk, T0 - 3600).is_ok());
    let e = issue(body.as_bytes(), &sk, T0 - 3601).unwrap_err();
    assert!(e.starts_with("issued 1800000000 is more than 3600 s ahead of this machine's clock (1799996399)"), "{e}");
    let e = issue(body.replace("\"boot\"", "\"gc\"").as_bytes(), &sk, T0).unwrap_err();
    assert_eq!(e, "group \"lab\": unknown action \"gc\" (switch, boot)");
}

// ---- decisions ----

fn verified(d: &Doc) -> Verified {
    let (sk, keys) = setup();
    let body = render(d).unwrap();
    verify(body.as_bytes(), Some(sk.sign(body.as_bytes()).as_bytes()), &keys, &d.channel).unwrap()
}

/// Hosts in wave 1, 2 and 3 of `doc()`'s kiosk group.
fn host_in_wave(n: usize) -> String {
    let g = &doc().groups[0];
    (0..)
        .map(|i| format!("kiosk-{i}"))
        .find(|h| wave::wave_of(&g.waves, wave::position("stable", h)) == Some(n - 1))
        .unwrap()
}

fn tags(t: &[&str]) -> Vec<String> {
    t.iter().map(|s| s.to_string()).collect()
}

#[test]
fn waves_open_in_turn() {
    let v = verified(&doc());
    let kiosk = tags(&["kiosk"]);
    let rec = Record::default();
    for (n, start) in [(1, T0), (2, T0 + 3600), (3, T0 + DAY)] {
        let host = host_in_wave(n);
        let dev = Device { host: &host, tags: &kiosk, running: None, profile: None };
        if n > 1 {
            let want = Decision::Wait { tag: "kiosk".into(), wave: n, until: start };
            assert_eq!(decide(&v, &dev, &rec, start - 1).unwrap(), want);
        }
        let got = decide(&v, &dev, &rec, start).unwrap();
        let want = Decision::Deploy {
            tag: "kiosk".into(),
            wave: n,
            system: StorePath::from_absolute(SYS).unwrap(),
            action: GroupAction::Switch,
            caches: vec!["https://cache.example.org".into()],
        };
        assert_eq!(got, want);
    }
    // A clock behind `issued` is taken as `issued`: wave 1 opens at once.
    let h = host_in_wave(1);
    let dev = Device { host: &h, tags: &kiosk, running: None, profile: None };
    assert_eq!(decide(&v, &dev, &rec, 0).unwrap().name(), "deploy");
}

#[test]
fn the_first_named_tag_in_config_order_wins() {
    let v = verified(&doc());
    let host = host_in_wave(3);
    let t = tags(&["nothing", "lab", "kiosk"]);
    let dev = Device { host: &host, tags: &t, running: None, profile: None };
    match decide(&v, &dev, &Record::default(), T0).unwrap() {
        Decision::Deploy { tag, action, .. } => assert_eq!((tag.as_str(), action), ("lab", GroupAction::Boot)),
        d => panic!("{d:?}"),
    }
    let t = tags(&["kiosk", "lab"]);
    let dev = Device { host: &host, tags: &t, running: None, profile: None };
    assert!(matches!(decide(&v, &dev, &Record::default(), T0).unwrap(), Decision::Wait { .. }));
    let t = tags(&["other"]);
    let dev = Device { host: &host, tags: &t, running: None, profile: None };
    assert_eq!(decide(&v, &dev, &Record::default(), T0).unwrap(), Decision::NotForMe);
    assert_eq!(
        decide(&v, &Device { host: &host, tags: &[], running: None, profile: None }, &Record::default(), T0).unwrap(),
        Decision::NotForMe
    );
}

#[test]
fn already_running_and_failed_before() {
    let v = verified(&doc());
    let host = host_in_wave(1);
    let kiosk = tags(&["kiosk"]);
    let running = Device { host: &host, tags: &kiosk, running: Some(SYS), profile: Some(SYS2) };
    assert_eq!(decide(&v, &running, &Record::default(), T0).unwrap(), Decision::AlreadyRunning { tag: "kiosk".into() });
    // Committed for the next boot, not running yet: not started again.
    let booting = Device { host: &host, tags: &kiosk, running: Some(SYS2), profile: Some(SYS) };
    assert_eq!(decide(&v, &booting, &Record::default(), T0).unwrap(), Decision::AlreadyRunning { tag: "kiosk".into() });
    let dev = Device { host: &host, tags: &kiosk, running: Some(SYS2), profile: Some(SYS2) };
    let mut rec = Record::default();
    rec.accept(&v, &kiosk);
    rec.failed(SYS);
    let want = Decision::FailedBefore { tag: "kiosk".into(), system: SYS.into() };
    assert_eq!(decide(&v, &dev, &rec, T0).unwrap(), want);
    // A newer document naming the same system: still not retried.
    let mut d = doc();
    d.seq = 8;
    let v8 = verified(&d);
    assert!(!rec.accept(&v8, &kiosk) || rec.failed.is_some());
    assert_eq!(decide(&v8, &dev, &rec, T0).unwrap(), want);
    // One naming another system clears it; then the failed one again is tried.
    d.seq = 9;
    d.groups[0].system = StorePath::from_absolute(SYS2).unwrap();
    let v9 = verified(&d);
    assert!(rec.accept(&v9, &kiosk));
    assert_eq!(rec.failed, None);
    d.seq = 10;
    d.groups[0].system = StorePath::from_absolute(SYS).unwrap();
    let v10 = verified(&d);
    rec.accept(&v10, &kiosk);
    assert_eq!(decide(&v10, &dev, &rec, T0).unwrap().name(), "deploy");
    // A document not for this device leaves the memory alone.
    rec.failed(SYS);
    let other = tags(&["other"]);
    d.seq = 11;
    d.groups[0].system = StorePath::from_absolute(SYS2).unwrap();
    rec.accept(&verified(&d), &other);
    assert_eq!(rec.failed.as_deref(), Some(SYS));
    rec.succeeded();
    assert_eq!(rec.failed, None);
}

#[test]
fn halt_stops_devices_that_have_not_started() {
    let mut d = doc();
    let host = host_in_wave(1);
    let kiosk = tags(&["kiosk"]);
    let dev = Device { host: &host, tags: &kiosk, running: None, profile: None };
    let mut rec = Record::default();
    let v = verified(&d);
    assert_eq!(decide(&v, &dev, &rec, T0).unwrap().name(), "deploy");
    rec.accept(&v, &kiosk);
    d.seq = 8;
    d.halt = true;
    let halt = verified(&d);
    assert_eq!(decide(&halt, &dev, &rec, T0).unwrap(), Decision::Halted);
    rec.accept(&halt, &kiosk);
    // The earlier document cannot be replayed to undo the halt.
    assert_eq!(
        decide(&v, &dev, &rec, T0).unwrap_err().to_string(),
        "sequence 7 is below the one last accepted from this channel, 8"
    );
    // A group's own halt stops that group only.
    d.seq = 9;
    d.halt = false;
    d.groups[0].halt = true;
    let g = verified(&d);
    assert_eq!(decide(&g, &dev, &rec, T0).unwrap(), Decision::Halted);
    let lab = tags(&["lab"]);
    assert_eq!(
        decide(&g, &Device { host: &host, tags: &lab, running: None, profile: None }, &rec, T0).unwrap().name(),
        "deploy"
    );
}

#[test]
fn sequence_and_expiry_rules() {
    let d = doc();
    let v = verified(&d);
    let mut rec = Record::default();
    assert_eq!(admissible(&v, &rec, T0), Ok(()));
    assert!(rec.accept(&v, &[]));
    // The same document again is re-evaluated (waves open with time).
    assert_eq!(admissible(&v, &rec, T0 + DAY), Ok(()));
    assert!(!rec.accept(&v, &[]));
    // Same sequence, other bytes.
    let mut other = d.clone();
    other.groups[0].caches.clear();
    let e = admissible(&verified(&other), &rec, T0).unwrap_err();
    assert_eq!(
        e.to_string(),
        "sequence 7 was accepted before with other content (sign every change with a new sequence)"
    );
    // Lower sequence.
    let mut lower = d.clone();
    lower.seq = 6;
    assert_eq!(admissible(&verified(&lower), &rec, T0), Err(Refusal::Stale { seq: 6, accepted: 7 }));
    // Expired, at the boundary second.
    let e = admissible(&v, &rec, d.expires).unwrap_err();
    assert_eq!(e.to_string(), format!("document expired at {} (now {})", d.expires, d.expires));
    assert_eq!(admissible(&v, &rec, d.expires - 1), Ok(()));
    // Expiry is checked first: an expired replay says so.
    assert!(matches!(admissible(&verified(&lower), &rec, u64::MAX), Err(Refusal::Expired { .. })));
}

/// The replay a clock floor exists for, end to end: a device whose clock
/// reset to 1970 is offered an old document after having seen a newer one.
#[test]
fn replay_to_a_reset_clock_is_refused_through_the_floor() {
    use super::fresh::Clock;
    let mut old = doc();
    old.issued = fresh::BUILD_FLOOR + DAY;
    old.expires = old.issued + 7 * DAY;
    for g in &mut old.groups {
        for w in &mut g.waves {
            w.from = Start::Issued;
            w.start = old.issued;
        }
        g.waves.truncate(1);
    }
    let mut new = old.clone();
    new.seq = 100;
    new.issued = old.issued + 30 * DAY;
    new.expires = new.issued + 7 * DAY;
    for g in &mut new.groups {
        g.waves[0].start = new.issued;
    }
    let (vo, vn) = (verified(&old), verified(&new));
    let mut clock = Clock::new(0, None);
    // Another channel record (say state lost) but the floor persisted.
    clock.observe(vn.doc.issued);
    let clock = Clock::new(clock.floor(), None);
    let e = admissible(&vo, &Record::default(), clock.now(0)).unwrap_err();
    assert!(matches!(e, Refusal::Expired { .. }), "{e}");
}

// ---- fuzz ----

use crate::testkit::{mutate, Rng};

/// Mutated documents, each signed (so parsing and validation are reached):
/// no panic, every refusal one bounded line, every accepted document within
/// the documented bounds, and deciding on it never panics either.
#[test]
fn mutated_documents_survive_a_fixed_seed_fuzz_run() {
    let (sk, keys) = setup();
    let mut halted = doc();
    halted.halt = true;
    let seeds = [
        render(&doc()).unwrap(),
        render(&halted).unwrap(),
        super::keys::render(3, T0, T0 + DAY, &[sk.public()]).unwrap(),
    ];
    let dict: &[&[u8]] = &[
        b"[",
        b"{",
        b"\"",
        b"\\",
        b"\\u0000",
        b"\\ud800",
        b"18446744073709551616",
        b"9007199254740992",
        b"-1",
        b"1e308",
        b"0.001",
        b"null",
        b",",
        b":",
        "€".as_bytes(),
        b"\"kiosk\":{}",
        b"{\"percent\":50}",
        b"\"soak_secs\":",
        b"\"start\":",
        b"\"halt\":true,",
    ];
    let host = host_in_wave(2);
    let kiosk = tags(&["kiosk", "lab"]);
    let mut rng = Rng(0x853c_49e6_748f_ea9b);
    let (mut accepted, mut rotations) = (0, 0);
    for i in 0..6_000 {
        let body = mutate(&mut rng, seeds[i % seeds.len()].as_bytes(), dict, 300);
        let sig = sk.sign(&body);
        match verify(&body, Some(sig.as_bytes()), &keys, "stable") {
            Ok(v) => {
                accepted += 1;
                let d = &v.doc;
                assert!(valid_name(&d.channel) && d.seq <= MAX_SEQ && d.issued < d.expires);
                assert!(d.expires - d.issued <= MAX_VALIDITY_SECS && d.groups.len() <= MAX_GROUPS);
                for g in &d.groups {
                    assert!(valid_name(&g.tag) && !g.waves.is_empty() && g.waves.len() <= MAX_WAVES);
                    assert!(g
                        .waves
                        .windows(2)
                        .all(|w| w[0].basis_points < w[1].basis_points && w[0].start <= w[1].start));
                    assert!(g.waves.iter().all(|w| (1..=10_000).contains(&w.basis_points) && w.start < d.expires));
                }
                // What a device does with it: never a panic, whatever the time.
                for now in [0, T0, d.expires, u64::MAX] {
                    for rec in [Record::default(), Record { seq: 7, digest: Some([0; 32]), failed: Some(SYS.into()) }] {
                        let dev = Device { host: &host, tags: &kiosk, running: Some("/junk"), profile: Some("") };
                        let _ = decide(&v, &dev, &rec, now);
                    }
                }
                // It renders back to a document that parses to the same.
                assert_eq!(parse(render(d).unwrap().as_bytes()).unwrap(), *d);
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(!msg.contains('\n') && msg.len() < 2048, "{msg}");
            }
        }
        match super::keys::verify(&body, Some(sig.as_bytes()), &keys, Some((2, [0; 32])), T0) {
            Ok(super::keys::Outcome::Apply(r)) => {
                rotations += 1;
                assert!(!r.keys.is_empty() && r.keys.len() <= super::keys::MAX_KEYS && r.seq > 2);
            }
            Ok(super::keys::Outcome::AlreadyApplied) => panic!("digest [0; 32]"),
            Err(e) => assert!(!e.to_string().contains('\n')),
        }
    }
    // The run reaches acceptance, not only refusals.
    assert!(accepted > 40 && rotations > 10, "{accepted} accepted, {rotations} rotations");
}
