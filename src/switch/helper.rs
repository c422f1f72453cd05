//! `nixless switch-helper`: what `nixless-switch.service` runs.
//!
//! The agent never execs; this oneshot unit does, outside the agent's
//! cgroup, so a switch that restarts or replaces the agent carries on. For
//! a pending switch request it checks the named system (a store path that
//! is installed, complete, with `bin/switch-to-configuration`), marks the
//! request started (durably: a request is never run twice), runs
//! `switch-to-configuration test|boot`, and writes the exit code and the
//! output's tail as the result. A pending health request runs the
//! configured checks (`systemctl is-active` of the health units, then the
//! health command) and writes their result the same way.

pub use super::capture::run_captured;
use super::leftovers;
use super::protocol::{self, Outcome, Step, INHIBITED, REFUSED};
use crate::nix::StorePath;
use crate::store::Store;
use bootloader::Pin;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// What the helper reads of the agent's config file. The agent's parser
/// (`agent::config::Config::helper`) builds it, so the file has one reader
/// and the helper depends on the five keys it uses, not on the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub root: PathBuf,
    pub state_dir: PathBuf,
    /// Longest a switch-to-configuration run may take before it is killed.
    pub switch_timeout: Duration,
    pub health_units: Vec<String>,
    pub health_command: Vec<String>,
    pub health_timeout: Duration,
}

/// Why a system cannot be switched to, if it cannot.
pub fn check_system(root: &Path, store: &Store, system: &str) -> Result<std::path::PathBuf, String> {
    let sp = StorePath::from_absolute(system).map_err(|e| format!("{system}: {e}"))?;
    if !store.is_present(&sp) {
        return Err(format!("{system} is not installed"));
    }
    // The closure must be complete: follow the records as far as they go
    // (paths installed before nixless have none and count as complete).
    let mut queue = vec![sp.clone()];
    let mut seen = std::collections::BTreeSet::new();
    while let Some(p) = queue.pop() {
        if !seen.insert(p.clone()) {
            continue;
        }
        if !store.is_present(&p) {
            return Err(format!("{system}: closure incomplete, {p} is missing"));
        }
        if let Ok(Some(rec)) = store.read_record(&p) {
            queue.extend(rec.references.into_iter().filter(|r| *r != p));
        }
    }
    let stc = root.join(system.trim_start_matches('/')).join("bin/switch-to-configuration");
    match std::fs::metadata(&stc) {
        Ok(m) if std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0 => Ok(stc),
        Ok(_) => Err(format!("{} is not executable", stc.display())),
        Err(_) => Err(format!("{system} has no bin/switch-to-configuration (not a NixOS system)")),
    }
}

/// Handles the pending switch request, if any; `true` if it ran one.
fn handle_switch(cfg: &Config, store: &Store) -> Result<bool, String> {
    let dir = &cfg.state_dir;
    let Some(req) = protocol::read_request(dir) else { return Ok(false) };
    if protocol::read_result(dir).is_some_and(|r| r.id >= req.id) {
        return Ok(false); // already done
    }
    if protocol::read_started(dir).is_some_and(|id| id >= req.id) {
        // A previous helper began this request and died (killed, or the
        // machine rebooted): never run it again; say so.
        let tail = format!("switch helper was interrupted while running request {}; not repeated", req.id);
        log::warn!("{tail}");
        clear_leftovers(&cfg.root, "the interrupted switch");
        protocol::write_result(dir, &Outcome { id: req.id, code: None, tail })
            .map_err(|e| format!("writing result: {e}"))?;
        return Ok(true);
    }
    let outcome = match check_system(&cfg.root, store, &req.system) {
        Err(why) => Outcome { id: req.id, code: Some(REFUSED), tail: format!("refused: {why}") },
        Ok(_) if req.step == Step::BootConfirm => {
            protocol::write_started(dir, req.id).map_err(|e| format!("marking request started: {e}"))?;
            let (code, tail) = bootloader::drop_default_override();
            Outcome { id: req.id, code, tail }
        }
        Ok(stc) => {
            protocol::write_started(dir, req.id).map_err(|e| format!("marking request started: {e}"))?;
            // A boot deploy pins the boot default to the running generation
            // before the builder moves loader.conf's default to the new one:
            // a crash or power cut in between must not leave the new
            // generation as the default for every boot to come.
            let pin = if req.step == Step::BootOnce { bootloader::pin_running(&cfg.root) } else { Pin::None };
            if let Pin::Failed(code, why) = pin {
                let outcome = Outcome { id: req.id, code, tail: why };
                protocol::write_result(dir, &outcome).map_err(|e| format!("writing result: {e}"))?;
                return Ok(true);
            }
            let action = req.step.stc_action();
            if matches!(req.step, Step::RollbackTest | Step::BootRevert) {
                // Whatever an earlier run of the new system left to do is
                // not the rollback's to do.
                clear_leftovers(&cfg.root, "the failed update, before the rollback");
            }
            log::info!("request {}: {} {action}", req.id, stc.display());
            // Killed a little before the agent gives up on it, so the result
            // says why.
            let limit = cfg.switch_timeout.saturating_sub(Duration::from_secs(5)).max(Duration::from_secs(1));
            let (code, mut tail) = run_captured(Command::new(&stc).arg(action), Some(limit));
            log::info!("request {}: exit {code:?}", req.id);
            if code.is_none() {
                clear_leftovers(&cfg.root, "the killed switch");
            }
            let code = match inhibitors::changed(action, code, &tail) {
                Some(changes) => {
                    tail.push_str(&format!("\nswitch inhibitors changed: {changes}"));
                    Some(INHIBITED)
                }
                None => code,
            };
            match (req.step, code) {
                (Step::BootOnce, Some(0)) => {
                    let (code, more) = bootloader::one_time_boot(&cfg.root, &req.system, pin);
                    Outcome { id: req.id, code, tail: format!("{tail}{more}") }
                }
                (Step::Boot, Some(0)) => {
                    // The committed generation is the default: an override
                    // left by an earlier boot deploy (one that never reached
                    // its confirm or revert) must not outvote it.
                    let (_, more) = bootloader::drop_default_override();
                    Outcome { id: req.id, code, tail: format!("{tail}{more}") }
                }
                (Step::BootRevert, Some(0)) => {
                    let (_, more) = bootloader::drop_default_override();
                    Outcome { id: req.id, code, tail: format!("{tail}{more}") }
                }
                (Step::BootRevert, Some(INHIBITED)) => {
                    let (code, tail) = default_at_least(&stc, limit, tail);
                    Outcome { id: req.id, code, tail }
                }
                _ => Outcome { id: req.id, code, tail },
            }
        }
    };
    protocol::write_result(dir, &outcome).map_err(|e| format!("writing result: {e}"))?;
    Ok(true)
}

/// Going back after a `boot` deploy whose new system came up unhealthy:
/// switch inhibitors that changed with it refuse the live `switch` back
/// (the reason it was a `boot` deploy). `boot` is never checked, so the
/// previous system at least becomes the boot default again (and the
/// one-time override goes); the machine runs the new one until it reboots.
/// [`INHIBITED`] when done, else the failing `boot`'s code.
fn default_at_least(stc: &Path, limit: Duration, tail: String) -> (Option<i32>, String) {
    let (code, out) = run_captured(Command::new(stc).arg("boot"), Some(limit));
    if code != Some(0) {
        return (code, format!("{tail}\n{out}"));
    }
    let (_, more) = bootloader::drop_default_override();
    let note = "nixless: switch inhibitors refuse the live switch back; the previous generation is the boot default";
    (Some(INHIBITED), format!("{tail}\n{out}{more}\n{note}"))
}

/// Removes the unit lists a killed or failed switch-to-configuration left
/// in /run/nixos (see [`leftovers`]), logging what they held; a failure is
/// logged and the switch goes on (it may still work).
fn clear_leftovers(root: &Path, left_by: &str) {
    match leftovers::clear(root) {
        Ok(removed) => {
            for r in removed {
                log::warn!("removed {r} (left by {left_by})");
            }
        }
        Err(e) => log::warn!("cannot clear switch-to-configuration's unit lists left by {left_by}: {e}"),
    }
}

/// Telling a refusal by `system.switch.inhibitors` from other failures.
///
/// NixOS writes the option to `$toplevel/switch-inhibitors` (JSON), and its
/// pre-switch check `switchInhibitors` compares it with the running
/// system's for every action but `boot` (nixpkgs
/// `nixos/modules/system/activation/switchable-system.nix`); on a change it
/// prints "There are changes to critical components of the system:", the
/// changed `key : old -> new` lines, advice to use `boot` and reboot, then
/// (`pre-switch-check.nix`) "Pre-switch check 'switchInhibitors' failed",
/// and switch-to-configuration "Pre-switch checks failed" and exit 1. The
/// checks run before anything else, so nothing was switched. Its override,
/// `NIXOS_NO_CHECK=1`, skips every pre-switch check: the helper never sets it.
pub mod inhibitors {
    /// Most bytes of changed `key : old -> new` lines kept for the reason.
    const SHOWN: usize = 512;
    const HEADING: &str = "There are changes to critical components of the system:";
    const CHECK_FAILED: &str = "Pre-switch check 'switchInhibitors' failed";

    /// The changed inhibitors ("" if the tail lost them) when `action` was
    /// refused by the inhibitors check; `None` for any other result.
    pub fn changed(action: &str, code: Option<i32>, tail: &str) -> Option<String> {
        if action == "boot" || code != Some(1) || !(tail.contains(CHECK_FAILED) || tail.contains(HEADING)) {
            return None;
        }
        let after = tail.split_once(HEADING).map_or("", |(_, rest)| rest);
        let lines: Vec<&str> = after
            .lines()
            .map(str::trim)
            .take_while(|l| !l.starts_with("Switching into"))
            .filter(|l| !l.is_empty())
            .collect();
        let mut shown: String = lines.join("; ").chars().filter(|c| !c.is_control()).collect();
        if shown.len() > SHOWN {
            let cut = (0..=SHOWN).rev().find(|&i| shown.is_char_boundary(i)).unwrap_or(0);
            shown.truncate(cut);
            shown.push('…');
        }
        Some(shown)
    }
}

/// Runs the configured health checks; `(code, output)`.
pub fn run_health_checks(cfg: &Config) -> (Option<i32>, String) {
    if !cfg.health_units.is_empty() {
        let mut cmd = Command::new("systemctl");
        cmd.arg("is-active").args(&cfg.health_units);
        let (code, out) = run_captured(&mut cmd, Some(cfg.health_timeout));
        if code != Some(0) {
            return (code, format!("units not active: {}", out.split_whitespace().collect::<Vec<_>>().join(" ")));
        }
    }
    if let Some((prog, args)) = cfg.health_command.split_first() {
        let (code, out) = run_captured(Command::new(prog).args(args), Some(cfg.health_timeout));
        if code != Some(0) {
            return (code, format!("health command {prog} exited {code:?}: {}", out.trim()));
        }
    }
    (Some(0), String::new())
}

fn handle_health(cfg: &Config) -> Result<bool, String> {
    let dir = &cfg.state_dir;
    let Some(id) = protocol::read_health_request(dir) else { return Ok(false) };
    if protocol::read_health_result(dir).is_some_and(|r| r.id >= id) {
        return Ok(false);
    }
    let (code, tail) = run_health_checks(cfg);
    protocol::write_health_result(dir, &Outcome { id, code, tail })
        .map_err(|e| format!("writing health result: {e}"))?;
    Ok(true)
}

/// `nixless switch-helper --config FILE`, with that file parsed.
pub fn main(cfg: &Config) -> Result<(), String> {
    let store = Store::open(&cfg.root, &cfg.state_dir).map_err(|e| format!("opening store: {e}"))?;
    // Requests written while we ran (a rollback after a timed-out switch,
    // the next health round) may not start the unit again: drain them.
    for _ in 0..16 {
        let ran = handle_switch(cfg, &store)? | handle_health(cfg)?;
        if !ran {
            break;
        }
    }
    Ok(())
}

/// One-time boot entries, where the bootloader has them (systemd-boot).
///
/// For a `boot` deploy the new generation is tried once. Before
/// `switch-to-configuration boot` runs, the EFI variable `LoaderEntryDefault`
/// (`bootctl set-default`, which overrides loader.conf) is set to the booted
/// generation's entry ([`pin_running`]); the builder then writes the new
/// entry and moves loader.conf's default to it, and `LoaderEntryOneShot`
/// (`bootctl set-oneshot`) names the new entry ([`one_time_boot`]). If the new
/// generation does not come up, the next boot takes the pinned entry. Once it
/// is confirmed, the override is dropped and loader.conf's default (the new
/// one) rules again.
///
/// Entries are found by what they boot, `init=<system>/init` on their
/// `options` line, not by name: nixpkgs' builder has named them
/// `nixos-generation-N.conf`, `nixos-generation-N+TRIES.conf` with boot
/// counting, and lately `nixos-<sha256>.conf`. With a boot counter in the
/// name, systemd-boot uses the whole file name as the entry id (252 and
/// 257 do, systemd issue 38813), later ones strip the counter (PR 38897,
/// September 2025), and the counter changes at every boot: such an entry is
/// named by a pattern matching all of these (`LoaderEntryOneShot` and
/// `LoaderEntryDefault` are glob patterns).
pub mod bootloader {
    use super::protocol::NO_ONE_SHOT;
    use super::{run_captured, Command, Duration};
    use crate::store::profile;
    use std::io::Read;
    use std::path::{Path, PathBuf};

    const BOOTCTL_TIMEOUT: Duration = Duration::from_secs(60);
    /// Entry files are small; anything bigger is not one of the builder's.
    const MAX_ENTRY_BYTES: u64 = 64 * 1024;
    const MAX_ENTRIES: usize = 4096;

    fn bootctl(args: &[&str]) -> (Option<i32>, String) {
        run_captured(Command::new("bootctl").args(args), Some(BOOTCTL_TIMEOUT))
    }

    fn is_systemd_boot() -> bool {
        bootctl(&["is-installed"]).0 == Some(0)
    }

    /// Where the entries live: the XBOOTLDR partition if there is one, else the ESP.
    fn boot_path() -> Option<PathBuf> {
        let (code, out) = bootctl(&["--print-boot-path"]);
        let path = out.lines().map(str::trim).find(|l| l.starts_with('/'))?;
        (code == Some(0)).then(|| PathBuf::from(path))
    }

    /// What the booting of the running generation was pinned to, if anything.
    pub enum Pin {
        /// Not a `boot-once` request.
        None,
        /// No systemd-boot here.
        NoSystemdBoot,
        /// No entry found for the booted generation.
        NoEntry,
        /// `LoaderEntryDefault` names the booted generation's entry.
        Pinned { old: String, boot: Option<PathBuf> },
        /// `bootctl set-default` failed: nothing was changed.
        Failed(Option<i32>, String),
    }

    /// Pins `LoaderEntryDefault` to the booted generation's entry.
    pub fn pin_running(root: &Path) -> Pin {
        if !is_systemd_boot() {
            return Pin::NoSystemdBoot;
        }
        let boot = boot_path();
        let booted =
            std::fs::read_link(root.join("run/booted-system")).ok().and_then(|p| p.to_str().map(str::to_owned));
        let Some(old) = booted.and_then(|b| entry_of(root, boot.as_deref(), &b)) else { return Pin::NoEntry };
        match bootctl(&["set-default", &old]) {
            (Some(0), _) => Pin::Pinned { old, boot },
            (code, out) => Pin::Failed(code, format!("bootctl set-default {old}: {}", out.trim())),
        }
    }

    /// The id (or pattern) naming `system`'s entry: found in the entries
    /// under `boot`, else the generation-numbered name of its profile link.
    fn entry_of(root: &Path, boot: Option<&Path>, system: &str) -> Option<String> {
        boot.and_then(|b| entry_in(&b.join("loader/entries"), system)).or_else(|| {
            profile::generations(root)
                .into_iter()
                .rev()
                .find(|(_, t)| t == system)
                .map(|(n, _)| format!("nixos-generation-{n}.conf"))
        })
    }

    /// The entry in `dir` whose options boot `system`, as an id for
    /// `bootctl set-default`/`set-oneshot`. Several (a re-installed
    /// generation): the last by name, which is the newest generation.
    pub fn entry_in(dir: &Path, system: &str) -> Option<String> {
        let init = format!("init={system}/init");
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .ok()?
            .take(MAX_ENTRIES)
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.ends_with(".conf") && !n.starts_with('.'))
            .collect();
        names.sort_by(|a, b| natural(a).cmp(&natural(b)));
        names.into_iter().rev().find(|n| boots(&dir.join(n), &init)).map(|n| entry_id(&n))
    }

    /// Orders `nixos-generation-9` before `nixos-generation-10`.
    fn natural(name: &str) -> (usize, &str) {
        let digits = name.trim_start_matches(|c: char| !c.is_ascii_digit());
        (digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len()), name)
    }

    fn boots(path: &Path, init: &str) -> bool {
        let Ok(f) = std::fs::File::open(path) else { return false };
        let mut text = String::new();
        if f.take(MAX_ENTRY_BYTES).read_to_string(&mut text).is_err() {
            return false;
        }
        text.lines()
            .filter_map(|l| l.trim_start().strip_prefix("options"))
            .any(|o| o.split_whitespace().any(|w| w == init))
    }

    /// An entry's file name as systemd-boot matches it: as is, or, with a
    /// boot counter (`NAME+LEFT[-DONE].conf`), the pattern `NAME[+.]*`,
    /// which matches the counter-less id of newer systemd-boot, the whole
    /// name of older ones, and the names the counter takes next.
    pub fn entry_id(file: &str) -> String {
        let Some(stem) = file.strip_suffix(".conf") else { return file.to_owned() };
        let Some((name, counter)) = stem.rsplit_once('+') else { return file.to_owned() };
        let (left, done) = counter.split_once('-').unwrap_or((counter, "0"));
        let number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !number(left) || !number(done) || name.is_empty() || name.contains(['*', '?', '[', ']', '\\']) {
            return file.to_owned();
        }
        format!("{name}[+.]*")
    }

    /// `(code, note)` after `switch-to-configuration boot` succeeded: 0 when
    /// the new entry is the one-time entry, [`NO_ONE_SHOT`] without
    /// systemd-boot (or without an entry to go back to).
    pub fn one_time_boot(root: &Path, system: &str, pin: Pin) -> (Option<i32>, String) {
        let (old, boot) = match pin {
            Pin::Pinned { old, boot } => (old, boot),
            Pin::NoSystemdBoot | Pin::None => {
                return (Some(NO_ONE_SHOT), "\nnixless: no systemd-boot: the new generation is the boot default".into())
            }
            Pin::NoEntry => {
                return (
                    Some(NO_ONE_SHOT),
                    "\nnixless: no boot entry of the running generation: the new generation is the boot default".into(),
                )
            }
            Pin::Failed(code, why) => return (code, why),
        };
        let Some(new) = entry_of(root, boot.as_deref(), system) else {
            // Nothing to boot once: the builder's default (the new one) rules.
            let (_, more) = drop_default_override();
            return (Some(NO_ONE_SHOT), format!("\nnixless: no boot entry for {system}: it is the boot default{more}"));
        };
        let (code, out) = bootctl(&["set-oneshot", &new]);
        if code != Some(0) {
            return (code, format!("\nbootctl set-oneshot {new}: {}", out.trim()));
        }
        (Some(0), format!("\nnixless: one-time boot of {new}; default stays {old}"))
    }

    /// Drops the `LoaderEntryDefault` override (no-op without systemd-boot).
    pub fn drop_default_override() -> (Option<i32>, String) {
        if !is_systemd_boot() {
            return (Some(0), String::new());
        }
        let (code, out) = bootctl(&["set-default", ""]);
        (code, if code == Some(0) { String::new() } else { format!("bootctl set-default \"\": {}", out.trim()) })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        const A: &str = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-nixos-system-a";
        const B: &str = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-nixos-system-b";

        fn entry(system: &str) -> String {
            format!(
                "title NixOS\nversion Generation\nlinux /EFI/nixos/k.efi\noptions init={system}/init root=/dev/vda\n"
            )
        }

        #[test]
        fn entries_are_found_by_what_they_boot() {
            let d = tempfile::tempdir().unwrap();
            let w = |n: &str, t: &str| std::fs::write(d.path().join(n), t).unwrap();
            w("nixos-generation-1.conf", &entry(A));
            // A specialisation of B boots another toplevel: not B's entry.
            w("nixos-generation-2-specialisation-x.conf", &entry("/nix/store/cccccccccccccccccccccccccccccccc-spec"));
            w("nixos-generation-2+3.conf", &entry(B));
            w("README", &entry(B));
            // init= must be the whole word: a longer store path is another system.
            w("nixos-generation-3.conf", &entry(&format!("{B}-x")));
            assert_eq!(entry_in(d.path(), A).as_deref(), Some("nixos-generation-1.conf"));
            // systemd-boot 252 (Debian 12) matches the whole name with its
            // counter, newer ones the name without: the pattern matches both.
            assert_eq!(entry_in(d.path(), B).as_deref(), Some("nixos-generation-2[+.]*"));
            assert_eq!(entry_in(d.path(), "/nix/store/dddddddddddddddddddddddddddddddd-none"), None);
            assert_eq!(entry_in(&d.path().join("missing"), A), None);
        }

        #[test]
        fn newest_builder_names_are_content_hashes() {
            let d = tempfile::tempdir().unwrap();
            let name = format!("nixos-{}+2-1.conf", "0123456789abcdef".repeat(4));
            std::fs::write(d.path().join(&name), entry(A)).unwrap();
            assert_eq!(entry_in(d.path(), A), Some(format!("nixos-{}[+.]*", "0123456789abcdef".repeat(4))));
        }

        #[test]
        fn the_newest_of_several_entries_of_one_system() {
            let d = tempfile::tempdir().unwrap();
            for n in [9, 10, 2] {
                std::fs::write(d.path().join(format!("nixos-generation-{n}.conf")), entry(A)).unwrap();
            }
            assert_eq!(entry_in(d.path(), A).as_deref(), Some("nixos-generation-10.conf"));
        }

        #[test]
        fn hostile_entries_change_nothing() {
            let d = tempfile::tempdir().unwrap();
            // Too big to be the builder's: not read past the bound.
            let mut big = "x".repeat(MAX_ENTRY_BYTES as usize);
            big.push_str(&entry(A));
            std::fs::write(d.path().join("nixos-generation-1.conf"), big).unwrap();
            std::fs::write(d.path().join("nixos-generation-2.conf"), [0xff, 0xfe, 0x00]).unwrap();
            std::fs::create_dir(d.path().join("nixos-generation-3.conf")).unwrap();
            assert_eq!(entry_in(d.path(), A), None);
        }

        #[test]
        fn counters_and_odd_names() {
            assert_eq!(entry_id("nixos-generation-4.conf"), "nixos-generation-4.conf");
            assert_eq!(entry_id("nixos-generation-4+3.conf"), "nixos-generation-4[+.]*");
            assert_eq!(entry_id("nixos-generation-4+0-3.conf"), "nixos-generation-4[+.]*");
            // Not a counter, or a name that would be a pattern itself: as is.
            for n in ["a+b.conf", "a+3-.conf", "+3.conf", "a*+3.conf", "a[1]+3.conf", "a+3-1-2.conf", "a+3"] {
                assert_eq!(entry_id(n), n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::inhibitors::changed;

    /// What switch-to-configuration prints when the pre-switch check
    /// refuses (nixpkgs switchable-system.nix, pre-switch-check.nix,
    /// switch-to-configuration-ng), verbatim.
    const REFUSAL: &str = "Checking switch inhibitors...
There are changes to critical components of the system:

systemd : /nix/store/aaaa-systemd-256.8 -> /nix/store/bbbb-systemd-257.1
dbus-implementation : dbus -> broker

Switching into this system is not recommended.
You probably want to run 'nixos-rebuild boot' and reboot your system instead.

If you really want to switch into this configuration directly, then
you can set NIXOS_NO_CHECK=1 to ignore pre-switch checks.

WARNING: doing so might cause the switch to fail or your system to become unstable.

Pre-switch check 'switchInhibitors' failed
Pre-switch checks failed
";

    #[test]
    fn the_refusal_is_recognised_with_what_changed() {
        let want = "systemd : /nix/store/aaaa-systemd-256.8 -> /nix/store/bbbb-systemd-257.1; \
                    dbus-implementation : dbus -> broker";
        assert_eq!(changed("test", Some(1), REFUSAL).as_deref(), Some(want));
        assert_eq!(changed("switch", Some(1), REFUSAL).as_deref(), Some(want));
        // The tail lost the heading: still a refusal, changes unknown.
        let cut = &REFUSAL[REFUSAL.find("Pre-switch check '").unwrap()..];
        assert_eq!(changed("test", Some(1), cut).as_deref(), Some(""));
    }

    #[test]
    fn other_results_are_not_a_refusal() {
        assert_eq!(changed("boot", Some(1), REFUSAL), None, "boot is never checked");
        assert_eq!(changed("test", Some(0), REFUSAL), None);
        assert_eq!(changed("test", None, REFUSAL), None);
        assert_eq!(changed("test", Some(1), "Pre-switch check 'custom' failed\nPre-switch checks failed\n"), None);
        assert_eq!(changed("test", Some(2), "Failed to run activate script\n"), None);
    }

    #[test]
    fn a_long_change_list_is_bounded() {
        let many: String = (0..200).map(|i| format!("k{i} : {} -> {}\n", "a".repeat(50), "b".repeat(50))).collect();
        let tail = format!("There are changes to critical components of the system:\n\n{many}\nSwitching into");
        let got = changed("test", Some(1), &tail).unwrap();
        assert!(got.len() <= 512 + '…'.len_utf8() && got.ends_with('…'), "{}", got.len());
    }
}
