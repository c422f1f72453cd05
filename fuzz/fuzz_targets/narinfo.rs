//! Arbitrary text through the narinfo parser: it must never panic, and a
//! narinfo it accepts must fingerprint, and must parse again when the store
//! path it names is the one expected.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixless::nix::NarInfo;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(info) = NarInfo::parse(text, None) else { return };
    let fp = info.fingerprint();
    assert!(fp.starts_with("1;/nix/store/"), "fingerprint {fp:?}");
    let again = NarInfo::parse(text, Some(&info.store_path)).expect("parses with its own store path expected");
    assert_eq!(again, info);
});
