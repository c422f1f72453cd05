//! Issue C end to end: a real agent, a real cache, fake NixOS systems built
//! by real Nix (tests/support/systems.nix) whose switch-to-configuration
//! records its calls and misbehaves on request, and a harness that plays
//! systemd: the path unit (runs `nixless switch-helper` when a request file
//! changes) and `Restart=always` for the agent.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

fn systems() -> &'static BTreeMap<String, String> {
    static S: OnceLock<BTreeMap<String, String>> = OnceLock::new();
    S.get_or_init(|| {
        let f = fixtures();
        let dir = f.path("FIXTURES");
        let st = Command::new("bash").arg(repo().join("tests/support/systems.sh")).arg(&dir).status().unwrap();
        assert!(st.success(), "systems.sh failed");
        std::fs::read_to_string(dir.join("systems.env"))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    })
}

fn sys(name: &str) -> String {
    systems()[&format!("SYS_{}", name.to_uppercase())].clone()
}

struct Opts {
    health_timeout: u64,
    switch_timeout: u64,
    generations: u64,
    boot_id: String,
    /// JSON list for health_command (default: fails while `unhealthy` exists).
    health_command: Option<String>,
    extra: String,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            health_timeout: 4,
            switch_timeout: 20,
            generations: 5,
            boot_id: "boot-1".into(),
            health_command: None,
            extra: String::new(),
        }
    }
}

/// A device: a root with system A installed and active, an agent, and the
/// emulated path unit.
struct Device {
    root: tempfile::TempDir,
    fake: tempfile::TempDir,
    config: PathBuf,
    port: u16,
    key: nixless::nix::SecretKey,
    agent: Arc<Mutex<Option<Child>>>,
    boot_id: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// How often the emulated path unit started the helper.
    helper_runs: Arc<Mutex<u32>>,
}

fn spawn_agent(config: &Path, fake: &Path, root: &Path, boot_id: &str) -> Child {
    let child = Command::new(bin())
        .args(["agent", "--config", config.to_str().unwrap()])
        .env("NIXLESS_BOOT_ID", boot_id)
        .env("FAKE_NIXOS_DIR", fake)
        .env("FAKE_NIXOS_ROOT", root)
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::OpenOptions::new().create(true).append(true).open(fake.join("agent.log")).unwrap(),
        ))
        .spawn()
        .unwrap();
    std::fs::write(fake.join("agent.pid"), child.id().to_string()).unwrap();
    child
}

impl Device {
    fn new(o: Opts) -> Device {
        let f = fixtures();
        let root = tempfile::Builder::new().prefix("nixless-dev-").tempdir().unwrap();
        let fake = tempfile::Builder::new().prefix("nixless-fake-").tempdir().unwrap();
        let cache = f.path("FIXTURES").join("cache-systems");
        // System A: installed, generation 1, running and the boot default.
        let out = nixless(&[
            "install",
            "--root",
            root.path().to_str().unwrap(),
            "--cache",
            &format!("file://{}", cache.display()),
            "--trusted-key",
            f.get("PK_A"),
            &sys("a"),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        nixless::store::profile::commit(root.path(), &sys("a")).unwrap();
        std::fs::create_dir_all(root.path().join("run")).unwrap();
        std::os::unix::fs::symlink(sys("a"), root.path().join("run/current-system")).unwrap();
        std::os::unix::fs::symlink(sys("a"), root.path().join("run/booted-system")).unwrap();
        std::fs::write(fake.path().join("current"), "a\n").unwrap();
        // A stand-in bootctl on the helper's PATH: records its calls (a
        // `set-default` with the boot default the system's builder last
        // wrote: when it is pinned matters); `is-installed` succeeds only
        // when `systemd-boot` exists; no boot path (entries are named by
        // generation).
        std::fs::create_dir_all(fake.path().join("bin")).unwrap();
        let bootctl = fake.path().join("bin/bootctl");
        std::fs::write(
            &bootctl,
            format!(
                "#!/bin/sh\nline=\"$*\"\n[ \"$1\" = set-default ] && line=\"$line (loader default $(cat {d}/boot-default))\"\n\
                 echo \"$line\" >> {d}/bootctl-calls\nif [ \"$1\" = is-installed ]; then test -e {d}/systemd-boot; fi\n",
                d = fake.path().display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&bootctl, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        std::fs::write(fake.path().join("boot-default"), "a\n").unwrap();

        let key = nixless::nix::SecretKey::generate("admin-1").unwrap();
        let port = free_port();
        let config = fake.path().join("agent.json");
        let health = o
            .health_command
            .clone()
            .unwrap_or_else(|| format!(r#"["/bin/sh","-c","test ! -e {}/unhealthy"]"#, fake.path().display()));
        std::fs::write(
            &config,
            format!(
                r#"{{"host":"dev","listen":["127.0.0.1:{port}"],"caches":["file://{}"],"cache_keys":["{}"],"deploy_keys":["{}"],"root":"{}","health_timeout_secs":{},"health_command":{health},"switch_timeout_secs":{},"generations_to_keep":{}{}}}"#,
                cache.display(),
                f.get("PK_A"),
                key.public(),
                root.path().display(),
                o.health_timeout,
                o.switch_timeout,
                o.generations,
                o.extra
            ),
        )
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let boot_id = Arc::new(Mutex::new(o.boot_id.clone()));
        let agent = Arc::new(Mutex::new(Some(spawn_agent(&config, fake.path(), root.path(), &o.boot_id))));
        let helper_runs = Arc::new(Mutex::new(0));
        let mut threads = Vec::new();
        // The path unit: start the helper whenever a request file changes.
        {
            let (stop, config, fakep, rootp, runs) =
                (stop.clone(), config.clone(), fake.path().to_owned(), root.path().to_owned(), helper_runs.clone());
            let sw = root.path().join("var/lib/nixless/switch");
            threads.push(std::thread::spawn(move || {
                let mut seen: (Vec<u8>, Vec<u8>) = Default::default();
                let deadline = Instant::now() + Duration::from_secs(600);
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    let now = (
                        std::fs::read(sw.join("request.json")).unwrap_or_default(),
                        std::fs::read(sw.join("health-request.json")).unwrap_or_default(),
                    );
                    if now != seen && (!now.0.is_empty() || !now.1.is_empty()) {
                        seen = now;
                        *runs.lock().unwrap() += 1;
                        let path = format!("{}/bin:{}", fakep.display(), std::env::var("PATH").unwrap_or_default());
                        let mut child = Command::new(bin())
                            .args(["switch-helper", "--config", config.to_str().unwrap()])
                            .env("PATH", path)
                            .env("FAKE_NIXOS_DIR", &fakep)
                            .env("FAKE_NIXOS_ROOT", &rootp)
                            .stdout(Stdio::null())
                            .stderr(Stdio::from(
                                std::fs::OpenOptions::new()
                                    .create(true)
                                    .append(true)
                                    .open(fakep.join("helper.log"))
                                    .unwrap(),
                            ))
                            .spawn()
                            .unwrap();
                        std::fs::write(fakep.join("helper.pid"), child.id().to_string()).unwrap();
                        let _ = child.wait();
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }));
        }
        // Restart=always for the agent.
        {
            let (stop, agent, config, fakep, rootp, boot) = (
                stop.clone(),
                agent.clone(),
                config.clone(),
                fake.path().to_owned(),
                root.path().to_owned(),
                boot_id.clone(),
            );
            threads.push(std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(600);
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    {
                        let mut a = agent.lock().unwrap();
                        let dead = match a.as_mut() {
                            Some(c) => c.try_wait().unwrap().is_some(),
                            None => false,
                        };
                        if dead {
                            std::thread::sleep(Duration::from_millis(200));
                            *a = Some(spawn_agent(&config, &fakep, &rootp, &boot.lock().unwrap()));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }));
        }
        let d = Device { root, fake, config, port, key, agent, boot_id, stop, threads, helper_runs };
        d.wait_for(|s| s.contains("\"phase\":\"idle\""), 20);
        d
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn behave(&self, system: &str, how: &str) {
        std::fs::write(self.fake.path().join(format!("behaviour-{system}")), how).unwrap();
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.fake.path().join("calls")).unwrap_or_default().lines().map(str::to_owned).collect()
    }

    fn fake_file(&self, name: &str) -> String {
        std::fs::read_to_string(self.fake.path().join(name)).unwrap_or_default().trim().to_owned()
    }

    fn status(&self) -> String {
        ureq::get(&format!("{}/v1/status", self.url()))
            .call()
            .ok()
            .and_then(|r| r.into_body().read_to_string().ok())
            .unwrap_or_default()
    }

    /// Polls status until `pred` holds; panics with logs after `secs`.
    fn wait_for(&self, pred: impl Fn(&str) -> bool, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out; status: {s}\nagent log:\n{}\nhelper log:\n{}\ncalls: {:?}",
                    self.fake_file("agent.log"),
                    self.fake_file("helper.log"),
                    self.calls()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn deploy(&self, system: Option<&str>, action: &str, seq: u64) {
        let action = nixless::deploy::Action::parse(action).unwrap();
        let doc = nixless::deploy::render("dev", system, seq, action, &[], &[]).unwrap();
        let sig = nixless::deploy::sign(&self.key, doc.as_bytes());
        let resp = ureq::post(&format!("{}/v1/deploy", self.url()))
            .header("Nixless-Signature", &sig)
            .config()
            .http_status_as_error(false)
            .build()
            .send(doc.as_bytes())
            .unwrap();
        let status = resp.status().as_u16();
        assert_eq!(status, 202, "{}", resp.into_body().read_to_string().unwrap_or_default());
    }

    /// Waits until the deploy `seq` finished; returns (outcome, status JSON).
    fn finish(&self, seq: u64, secs: u64) -> (String, String) {
        let needle = format!("\"last_result\":{{\"seq\":{seq},");
        let s = self.wait_for(|s| s.contains(&needle) && s.contains("\"phase\":\"idle\""), secs);
        let i = s.find("\"outcome\":\"").unwrap() + 11;
        (s[i..].split('"').next().unwrap().to_owned(), s)
    }

    fn kill_agent(&self) {
        let mut a = self.agent.lock().unwrap();
        if let Some(c) = a.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The supervisor restarts it.
        drop(a);
    }

    fn profile(&self) -> Option<(u64, String)> {
        nixless::store::profile::current(self.root.path())
    }

    fn current_system(&self) -> String {
        std::fs::read_link(self.root.path().join("run/current-system")).unwrap().to_str().unwrap().to_owned()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // A hung helper must not hold the test: kill it first.
        if let Ok(pid) = std::fs::read_to_string(self.fake.path().join("helper.pid")) {
            let _ = Command::new("kill").arg("-9").arg(pid.trim()).stderr(Stdio::null()).status();
        }
        let _ = Command::new("pkill").arg("-9").arg("-f").arg(self.fake.path().to_str().unwrap()).status();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(mut c) = self.agent.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        rm_rf(self.root.path());
    }
}

#[test]
fn happy_switch_commits_profile_and_bootloader() {
    let d = Device::new(Opts::default());
    d.deploy(Some(&sys("b")), "switch", 10);
    let (outcome, status) = d.finish(10, 60);
    assert_eq!(outcome, "committed", "{status}");
    assert_eq!(d.calls(), vec!["b test", "b boot"], "test first, boot only after health");
    assert!(*d.helper_runs.lock().unwrap() >= 2, "both switches went through the helper (path unit)");
    assert_eq!(d.profile(), Some((2, sys("b"))));
    assert_eq!(d.fake_file("boot-default"), "b");
    assert_eq!(d.current_system(), sys("b"));
    // Generation 1 is still there for a rollback.
    assert_eq!(nixless::store::profile::previous(d.root.path()), Some((1, sys("a"))));
}

#[test]
fn failed_switches_roll_back_with_the_reason() {
    for (how, needle) in [("fail2", "activation failed"), ("exit4", "units failed"), ("exit100", "reboot")] {
        let d = Device::new(Opts::default());
        d.behave("b", how);
        d.deploy(Some(&sys("b")), "switch", 20);
        let (outcome, status) = d.finish(20, 60);
        assert_eq!(outcome, "rolled-back", "{how}: {status}");
        assert!(status.contains(needle), "{how}: {status}");
        assert_eq!(d.calls(), vec!["b test", "a test"], "{how}");
        assert_eq!(d.profile(), Some((1, sys("a"))), "{how}: profile unchanged");
        assert_eq!(d.fake_file("boot-default"), "a", "{how}: boot default unchanged");
        assert_eq!(d.current_system(), sys("a"));
    }
}

#[test]
fn failed_health_and_health_timeout_roll_back() {
    let d = Device::new(Opts::default());
    d.behave("b", "unhealthy");
    d.deploy(Some(&sys("b")), "switch", 30);
    let (outcome, status) = d.finish(30, 60);
    assert_eq!(outcome, "rolled-back", "{status}");
    assert!(status.contains("health check failed"), "{status}");
    assert_eq!(d.calls(), vec!["b test", "a test"]);
    assert_eq!(d.profile(), Some((1, sys("a"))));
    assert!(!d.fake.path().join("unhealthy").exists(), "the rollback restored health");

    // A health command that never answers: the deadline decides.
    let slow = Some(r#"["/bin/sleep","30"]"#.to_string());
    let d = Device::new(Opts { health_timeout: 3, health_command: slow, ..Opts::default() });
    d.deploy(Some(&sys("c")), "switch", 31);
    let (outcome, status) = d.finish(31, 60);
    assert_eq!(outcome, "rolled-back", "{status}");
    assert!(status.contains("not healthy within 3 s"), "{status}");
}

#[test]
fn failed_rollback_is_reported() {
    let d = Device::new(Opts::default());
    d.behave("b", "fail2");
    d.behave("a", "fail2");
    d.deploy(Some(&sys("b")), "switch", 40);
    let (outcome, status) = d.finish(40, 60);
    assert_eq!(outcome, "rollback-failed", "{status}");
    assert!(status.contains("rollback failed"), "{status}");
}

#[test]
fn boot_deploy_commits_without_a_live_switch() {
    // No systemd-boot (GRUB, say): no one-time entries, the new generation
    // simply becomes the default.
    let d = Device::new(Opts::default());
    d.deploy(Some(&sys("c")), "boot", 50);
    let (outcome, status) = d.finish(50, 60);
    assert_eq!(outcome, "committed", "{status}");
    assert!(status.contains("not systemd-boot"), "{status}");
    assert_eq!(d.calls(), vec!["c boot"]);
    assert_eq!(d.fake_file("current"), "a", "still running the old system");
    assert_eq!(d.fake_file("boot-default"), "c");
    assert_eq!(d.profile(), Some((2, sys("c"))));
}

impl Device {
    /// Plays a reboot into `system`: new boot id, /run links, agent restart.
    fn reboot_into(&self, system: &str, boot_id: &str) {
        *self.boot_id.lock().unwrap() = boot_id.into();
        for l in ["run/current-system", "run/booted-system"] {
            let p = self.root.path().join(l);
            std::fs::remove_file(&p).unwrap();
            std::os::unix::fs::symlink(system, &p).unwrap();
        }
        self.kill_agent();
    }
}

#[test]
fn one_time_boot_on_systemd_boot_commits_after_a_good_first_boot() {
    let d = Device::new(Opts::default());
    std::fs::write(d.fake.path().join("systemd-boot"), "").unwrap();
    d.deploy(Some(&sys("c")), "boot", 55);
    d.wait_for(|s| s.contains("\"phase\":\"awaiting-reboot\""), 60);
    // The running generation is pinned as the default before the builder
    // (switch-to-configuration boot) moves loader.conf's default to C.
    assert_eq!(
        d.fake_file("bootctl-calls"),
        "is-installed\n--print-boot-path\nset-default nixos-generation-1.conf (loader default a)\n\
         set-oneshot nixos-generation-2.conf"
    );
    // A restart without a reboot changes nothing; deploys wait.
    d.kill_agent();
    d.wait_for(|s| s.contains("\"phase\":\"awaiting-reboot\""), 20);
    d.reboot_into(&sys("c"), "boot-2");
    let (outcome, status) = d.finish(55, 60);
    assert_eq!(outcome, "committed", "{status}");
    assert!(
        d.fake_file("bootctl-calls").ends_with("is-installed\nset-default  (loader default c)"),
        "{}",
        d.fake_file("bootctl-calls")
    );
    assert_eq!(d.profile(), Some((2, sys("c"))));
    assert_eq!(d.calls(), vec!["c boot"], "no live switch");
}

#[test]
fn one_time_boot_that_does_not_come_up_goes_back() {
    let d = Device::new(Opts::default());
    std::fs::write(d.fake.path().join("systemd-boot"), "").unwrap();
    d.deploy(Some(&sys("c")), "boot", 56);
    d.wait_for(|s| s.contains("\"phase\":\"awaiting-reboot\""), 60);
    // The one-time boot of C failed (hang, watchdog reset): A came up.
    d.reboot_into(&sys("a"), "boot-2");
    let (outcome, status) = d.finish(56, 60);
    assert_eq!(outcome, "failed", "{status}");
    assert!(status.contains("did not come up"), "{status}");
    assert_eq!(d.profile().map(|p| p.1), Some(sys("a")), "profile points at A again");
    assert_eq!(d.calls(), vec!["c boot", "a switch"]);
    assert_eq!(d.fake_file("boot-default"), "a");
    assert!(d.fake_file("bootctl-calls").ends_with("set-default  (loader default a)"), "override dropped");
}

#[test]
fn failed_boot_deploy_leaves_no_override_to_outvote_a_later_commit() {
    // The builder fails after the running generation was pinned over
    // loader.conf (LoaderEntryDefault). Left in place, that pin would boot A
    // forever, whatever a later deploy commits.
    let d = Device::new(Opts::default());
    std::fs::write(d.fake.path().join("systemd-boot"), "").unwrap();
    d.behave("c", "bootfail");
    d.deploy(Some(&sys("c")), "boot", 57);
    let (outcome, status) = d.finish(57, 60);
    assert_eq!(outcome, "failed", "{status}");
    assert!(status.contains("installing the boot loader failed"), "{status}");
    assert_eq!(d.calls(), vec!["c boot", "a switch"], "the previous system is made the default again");
    assert!(d.fake_file("bootctl-calls").ends_with("set-default  (loader default a)"), "pin dropped");
    assert_eq!(d.profile().map(|p| p.1), Some(sys("a")));
    // Had the pin stayed, this commit would name B in loader.conf only.
    d.deploy(Some(&sys("b")), "switch", 58);
    let (outcome, status) = d.finish(58, 60);
    assert_eq!(outcome, "committed", "{status}");
    assert!(
        d.fake_file("bootctl-calls").ends_with("set-default  (loader default b)"),
        "{}",
        d.fake_file("bootctl-calls")
    );
}

#[test]
fn agent_killed_at_every_step_resumes_and_never_repeats_a_switch() {
    // Kill -9 the agent once it reaches each phase; the supervisor restarts
    // it; the deploy must still commit, with each switch run exactly once.
    for phase in ["fetching", "switching", "verifying"] {
        let d = Device::new(Opts { health_timeout: 6, ..Opts::default() });
        if phase == "switching" {
            d.behave("b", "slow");
        }
        d.deploy(Some(&sys("b")), "switch", 60);
        d.wait_for(|s| s.contains(&format!("\"phase\":\"{phase}\"")) || s.contains("\"outcome\""), 60);
        d.kill_agent();
        let (outcome, status) = d.finish(60, 90);
        assert_eq!(outcome, "committed", "killed in {phase}: {status}");
        assert_eq!(d.calls(), vec!["b test", "b boot"], "killed in {phase}");
        assert_eq!(d.profile(), Some((2, sys("b"))));
    }
}

#[test]
fn switch_that_restarts_the_agent_still_commits() {
    // Self-update: the new system's activation kills the running agent
    // while the switch runs in the helper; the supervisor (Restart=always)
    // starts it again, and the new agent picks up the result and commits.
    let d = Device::new(Opts::default());
    d.behave("b", "kill-agent");
    let pid_before = std::fs::read_to_string(d.fake.path().join("agent.pid")).unwrap();
    d.deploy(Some(&sys("b")), "switch", 70);
    let (outcome, status) = d.finish(70, 90);
    assert_eq!(outcome, "committed", "{status}");
    assert_eq!(d.calls(), vec!["b test", "b boot"], "the switch ran once");
    let pid_after = std::fs::read_to_string(d.fake.path().join("agent.pid")).unwrap();
    assert_ne!(pid_before, pid_after, "the agent was restarted mid-switch");
}

#[test]
fn reboot_before_commit_fails_for_good() {
    let slow = Some(r#"["/bin/sleep","20"]"#.to_string());
    let d = Device::new(Opts { health_timeout: 30, health_command: slow, ..Opts::default() });
    d.deploy(Some(&sys("b")), "switch", 80);
    d.wait_for(|s| s.contains("\"phase\":\"verifying\""), 60);
    // "Reboot": the old default boots (system A runs), new boot id.
    *d.boot_id.lock().unwrap() = "boot-2".into();
    std::fs::remove_file(d.root.path().join("run/current-system")).unwrap();
    std::os::unix::fs::symlink(sys("a"), d.root.path().join("run/current-system")).unwrap();
    d.kill_agent();
    let (outcome, status) = d.finish(80, 60);
    assert_eq!(outcome, "failed", "{status}");
    assert!(status.contains("rebooted before the update was committed"), "{status}");
    assert_eq!(d.profile(), Some((1, sys("a"))), "never committed");
    // And it is not attempted again by itself.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(d.calls(), vec!["b test"]);
}

#[test]
fn hung_switch_times_out_and_rolls_back() {
    let d = Device::new(Opts { switch_timeout: 8, ..Opts::default() });
    d.behave("b", "hang");
    d.deploy(Some(&sys("b")), "switch", 90);
    let (outcome, status) = d.finish(90, 90);
    assert_eq!(outcome, "rolled-back", "{status}");
    assert!(status.contains("killed after") || status.contains("no result"), "{status}");
    assert_eq!(d.calls(), vec!["b test", "a test"]);
    assert_eq!(d.profile(), Some((1, sys("a"))));
}

#[test]
fn signed_rollback_and_gc_actions() {
    let d = Device::new(Opts { generations: 1, ..Opts::default() });
    d.deploy(Some(&sys("b")), "switch", 100);
    assert_eq!(d.finish(100, 60).0, "committed");
    // Roll back to the previous generation (A) by a signed document.
    d.deploy(None, "rollback", 101);
    let (outcome, status) = d.finish(101, 60);
    assert_eq!(outcome, "committed", "{status}");
    assert_eq!(d.current_system(), sys("a"));
    assert_eq!(d.profile().unwrap().1, sys("a"));
    assert_eq!(d.fake_file("boot-default"), "a");
    // GC keeping one generation (plus current and booted): B's closure goes
    // (booted is A), A's stays.
    let store = d.root.path().join("nix/store");
    let b_base = sys("b").rsplit('/').next().unwrap().to_owned();
    assert!(store.join(&b_base).exists());
    d.deploy(None, "gc", 102);
    let (outcome, status) = d.finish(102, 60);
    assert_eq!(outcome, "collected", "{status}");
    assert!(!store.join(&b_base).exists(), "B collected: {status}");
    assert!(store.join(sys("a").rsplit('/').next().unwrap()).exists());
    let v = nixless(&["verify", "--root", d.root.path().to_str().unwrap()]);
    assert!(v.status.success(), "what is left verifies: {}", stderr(&v));
}

/// A live path without a record (on the device before nixless) blocks a
/// collection until its references are known: the agent's gc learns them
/// from a cache's signed narinfo as loop work (`daemon::gc_run`), writes
/// the record, and collects.
#[test]
fn a_gc_deploy_learns_unrecorded_references_from_the_cache() {
    let d = Device::new(Opts { generations: 1, ..Opts::default() });
    d.deploy(Some(&sys("b")), "switch", 130);
    assert_eq!(d.finish(130, 60).0, "committed");
    d.deploy(None, "rollback", 131);
    assert_eq!(d.finish(131, 60).0, "committed");
    // A's closure is live (current and booted); forget the record of its top.
    let paths = d.root.path().join("var/lib/nixless/paths");
    let a_base = sys("a").rsplit('/').next().unwrap().to_owned();
    let record = std::fs::read(paths.join(&a_base)).expect("A has a record");
    std::fs::remove_file(paths.join(&a_base)).unwrap();
    let store = d.root.path().join("nix/store");
    let b_base = sys("b").rsplit('/').next().unwrap().to_owned();
    d.deploy(None, "gc", 132);
    let (outcome, status) = d.finish(132, 60);
    assert_eq!(outcome, "collected", "{status}");
    assert_eq!(std::fs::read(paths.join(&a_base)).ok(), Some(record), "the record learnt is the one installed");
    assert!(!store.join(&b_base).exists(), "B collected: {status}");
    let v = nixless(&["verify", "--root", d.root.path().to_str().unwrap()]);
    assert!(v.status.success(), "what is left verifies: {}", stderr(&v));
}

#[test]
fn gc_keeps_exactly_what_it_must() {
    let d = Device::new(Opts { generations: 2, ..Opts::default() });
    for (seq, s) in [(110, "b"), (111, "c")] {
        d.deploy(Some(&sys(s)), "switch", seq);
        assert_eq!(d.finish(seq, 60).0, "committed");
    }
    // Generations: 1=A, 2=B, 3=C (current). Booted: A. Keep 2 → B, C; A stays
    // as the booted system. An unrelated recorded path, and one without a
    // record, both dead.
    let f = fixtures();
    let out = nixless(&[
        "install",
        "--root",
        d.root.path().to_str().unwrap(),
        "--cache",
        &format!("file://{}", f.get("CACHE_ZSTD")),
        "--trusted-key",
        f.get("PK_A"),
        f.get("P_CHAIN_A"),
    ]);
    assert!(out.status.success());
    let chain: Vec<String> = closure_of(f.get("P_CHAIN_A"));
    let norecord = d.root.path().join("nix/store/00000000000000000000000000000000-unrecorded");
    std::fs::write(&norecord, "x").unwrap();
    let store = d.root.path().join("nix/store");
    let before: Vec<String> =
        std::fs::read_dir(&store).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();

    // Booted system is A: move it to B so A becomes collectable... no: keep
    // A booted, and check the dry run lists exactly the dead chain.
    let cfg = d.config.to_str().unwrap();
    let dry = nixless(&["gc", "--config", cfg, "--dry-run"]);
    assert!(dry.status.success(), "{}", stderr(&dry));
    let listed: Vec<String> =
        String::from_utf8_lossy(&dry.stdout).lines().map(|l| l.rsplit(' ').next().unwrap().to_owned()).collect();
    let mut want = chain.clone();
    want.sort();
    let mut got = listed.clone();
    got.sort();
    assert_eq!(got, want, "dry run lists exactly the dead, recorded paths");
    let after_dry: Vec<String> =
        std::fs::read_dir(&store).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(after_dry.len(), before.len(), "dry run deletes nothing");

    let real = nixless(&["gc", "--config", cfg]);
    assert!(real.status.success(), "{}", stderr(&real));
    for p in &chain {
        assert!(!d.root.path().join(p.trim_start_matches('/')).exists(), "{p} collected");
    }
    assert!(norecord.exists(), "a path without a record is never deleted");
    for s in ["a", "b", "c"] {
        for p in closure_of(&sys(s)) {
            assert!(d.root.path().join(p.trim_start_matches('/')).exists(), "{p} of system {s} kept");
        }
    }
    // Generation 1 (A) is beyond the two kept, but A is booted: its link
    // goes, its closure stays.
    let gens: Vec<u64> = nixless::store::profile::generations(d.root.path()).iter().map(|g| g.0).collect();
    assert_eq!(gens, vec![2, 3]);
    let v = nixless(&["verify", "--root", d.root.path().to_str().unwrap()]);
    assert!(v.status.success(), "{}", stderr(&v));
}

#[test]
fn console_rollback_switches_to_the_previous_generation() {
    let d = Device::new(Opts::default());
    d.deploy(Some(&sys("b")), "switch", 120);
    assert_eq!(d.finish(120, 60).0, "committed");
    let cfg = d.config.to_str().unwrap();
    let out = Command::new(bin())
        .args(["rollback", "--config", cfg])
        .env("FAKE_NIXOS_DIR", d.fake.path())
        .env("FAKE_NIXOS_ROOT", d.root.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(d.profile(), Some((1, sys("a"))));
    assert_eq!(d.calls().last().map(String::as_str), Some("a switch"));
    assert_eq!(d.fake_file("boot-default"), "a");
}

/// A tmpfs of `size` (mount's syntax) on a temporary directory, unmounted
/// when dropped (tests run as root).
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let opts = format!("size={size}");
        let st = Command::new("mount").args(["-t", "tmpfs", "-o", &opts, "tmpfs"]).arg(dir.path()).status().unwrap();
        assert!(st.success(), "mount tmpfs (tests run as root)");
        Tmpfs(dir)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn disk_full_refuses_the_deploy_and_changes_nothing() {
    // The store on a 3 MiB tmpfs; the big fixture path (24 MiB) cannot fit.
    let d = Device::new(Opts::default());
    let small = Tmpfs::mount("3m");
    let f = fixtures();
    let key = &d.key;
    let port = free_port();
    let cfg = small.path().join("agent.json");
    let root = small.path().join("root");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"host":"dev","listen":["127.0.0.1:{port}"],"caches":["file://{}"],"cache_keys":["{}"],"deploy_keys":["{}"],"root":"{}"}}"#,
            f.get("CACHE_ZSTD"),
            f.get("PK_A"),
            key.public(),
            root.display()
        ),
    )
    .unwrap();
    let mut agent = spawn_agent(&cfg, d.fake.path(), &root, "boot-1");
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while ureq::get(&format!("{url}/v1/status")).call().is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let doc =
        nixless::deploy::render("dev", Some(f.get("P_BIG")), 5, nixless::deploy::Action::Switch, &[], &[]).unwrap();
    let sig = nixless::deploy::sign(key, doc.as_bytes());
    let r = ureq::post(&format!("{url}/v1/deploy")).header("Nixless-Signature", &sig).send(doc.as_bytes()).unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let s = ureq::get(&format!("{url}/v1/status")).call().unwrap().into_body().read_to_string().unwrap();
        if s.contains("\"outcome\"") || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(status.contains("\"outcome\":\"rejected\""), "{status}");
    assert!(status.contains("not enough disk space"), "{status}");
    let left: Vec<_> = std::fs::read_dir(root.join("nix/store")).unwrap().collect();
    assert!(left.is_empty(), "nothing written to the store");
}

/// Issue 11: the disk-space rule's collection in the middle of a deploy's
/// fetch is loop work (`daemon::gc_run`, `GcFor::Space`), under the fetch's
/// own store lock: a live path without a record has its narinfo asked of
/// the HTTP cache and its record written, which lets the collection delete
/// the dead path that takes the space; paths of the closure the fetch found
/// present stay, dead or not (it will not fetch them again); then the same
/// fetch goes on to the end.
#[test]
fn a_deploy_short_of_space_learns_references_over_http_collects_and_fetches() {
    let d = Device::new(Opts::default());
    let small = Tmpfs::mount("64m");
    let f = fixtures();
    let nginx = Nginx::start(&f.path("CACHE_ZSTD"));
    let systems = format!("file://{}", f.path("FIXTURES").join("cache-systems").display());
    let root = small.path().join("root");
    let base = |p: &str| p.rsplit('/').next().unwrap().to_owned();
    let b = sys("b");
    for (cache, p) in [(nginx.url(), f.get("P_DIR")), (nginx.url(), f.get("P_CHAIN_A")), (systems, b.as_str())] {
        let out = nixless(&[
            "install",
            "--root",
            root.to_str().unwrap(),
            "--cache",
            &cache,
            "--trusted-key",
            f.get("PK_A"),
            p,
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    // P_DIR is live (the booted system) and has no record: until a cache
    // vouches for its references, the collection may delete nothing.
    std::fs::create_dir_all(root.join("run")).unwrap();
    std::os::unix::fs::symlink(f.get("P_DIR"), root.join("run/booted-system")).unwrap();
    let record = root.join("var/lib/nixless/paths").join(base(f.get("P_DIR")));
    let want = std::fs::read(&record).expect("install wrote a record");
    std::fs::remove_file(&record).unwrap();
    // System B is dead; 30 MiB more in it leave ~33 MiB free: short of
    // TOP's 24.6 MiB of NAR + a tenth + 16 MiB (43 MiB). P_CHAIN_A's chain
    // is dead too, but part of TOP's closure: the fetch counts it present.
    let store = root.join("nix/store");
    let b_top = store.join(base(&b));
    let mode = |m| std::fs::set_permissions(&b_top, std::os::unix::fs::PermissionsExt::from_mode(m)).unwrap();
    mode(0o755);
    std::fs::write(b_top.join("filler"), vec![7u8; 30 << 20]).unwrap();
    mode(0o555);

    let port = free_port();
    let cfg = small.path().join("agent.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"host":"dev","listen":["127.0.0.1:{port}"],"caches":["{}"],"cache_keys":["{}"],"deploy_keys":["{}"],"root":"{}"}}"#,
            nginx.url(),
            f.get("PK_A"),
            d.key.public(),
            root.display()
        ),
    )
    .unwrap();
    let mut agent = spawn_agent(&cfg, d.fake.path(), &root, "boot-1");
    let url = format!("http://127.0.0.1:{port}");
    wait_until("the agent's status", Duration::from_secs(20), || ureq::get(&format!("{url}/v1/status")).call().ok());
    let doc = nixless::deploy::render("dev", Some(f.get("TOP")), 5, nixless::deploy::Action::Switch, &[], &[]).unwrap();
    let sig = nixless::deploy::sign(&d.key, doc.as_bytes());
    let r = ureq::post(&format!("{url}/v1/deploy")).header("Nixless-Signature", &sig).send(doc.as_bytes()).unwrap();
    assert_eq!(r.status().as_u16(), 202);
    // Past the fetch: switching (no helper runs for this root), or an outcome.
    let status = wait_until("the fetch to end", Duration::from_secs(60), || {
        let s = ureq::get(&format!("{url}/v1/status")).call().ok()?.into_body().read_to_string().ok()?;
        (s.contains("\"phase\":\"switching\"") || s.contains("\"outcome\"")).then_some(s)
    });
    let _ = agent.kill();
    let _ = agent.wait();
    let log = agent_log(d.fake.path());
    assert!(status.contains("\"phase\":\"switching\""), "{status}\n{log}");
    assert!(log.contains("collecting garbage"), "the rule found the space short: {log}");
    assert!(log.contains("learnt the references of 1 of 1 paths from narinfos"), "{log}");
    assert_eq!(std::fs::read(&record).ok(), Some(want), "the record learnt is the one installed");
    assert!(!b_top.exists(), "the dead system was collected");
    // TOP's whole closure is there, each path whole (real Nix's hash = the
    // cache's NarHash): the present chain was kept, the rest fetched.
    let present = assert_store_sound(&root, &f.path("CACHE_ZSTD"));
    let mut want_closure: Vec<String> = closure_of(f.get("TOP")).iter().map(|p| base(p)).collect();
    want_closure.sort();
    assert_eq!(present, want_closure, "exactly TOP's closure is left");
}

#[test]
fn helper_killed_mid_switch_is_never_rerun_and_the_update_rolls_back() {
    let d = Device::new(Opts { switch_timeout: 8, ..Opts::default() });
    d.behave("b", "hang");
    d.deploy(Some(&sys("b")), "switch", 130);
    // Wait until the helper runs b's switch-to-configuration, then kill -9
    // the helper and its child (as an OOM kill or a crash would).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !d.calls().contains(&"b test".to_string()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = d.fake_file("helper.pid");
    // The helper runs it in a process group of its own: kill the group, so
    // no `sleep` it forked outlives the test.
    // The helper first: killed second, it could see its child die and
    // write a result before its own death (it waits on the process).
    let children = Command::new("pgrep").args(["-P", &pid]).output().unwrap();
    let _ = Command::new("kill").args(["-9", &pid]).status();
    for child in String::from_utf8_lossy(&children.stdout).split_whitespace() {
        let _ = Command::new("kill").args(["-9", "--", &format!("-{child}")]).status();
    }
    // A second helper start for the same request (the path unit firing
    // again) must not run it again: it reports the interruption instead.
    let cfg = d.config.to_str().unwrap();
    let again = Command::new(bin())
        .args(["switch-helper", "--config", cfg])
        .env("FAKE_NIXOS_DIR", d.fake.path())
        .env("FAKE_NIXOS_ROOT", d.root.path())
        .output()
        .unwrap();
    assert!(again.status.success(), "{}", stderr(&again));
    let result = std::fs::read_to_string(d.root.path().join("var/lib/nixless/switch/result.json")).unwrap();
    assert!(result.contains("interrupted") && result.contains("\"code\":null"), "{result}");
    let (outcome, status) = d.finish(130, 60);
    assert_eq!(outcome, "rolled-back", "{status}");
    assert_eq!(d.calls(), vec!["b test", "a test"], "b's switch ran once, then the rollback");
    assert_eq!(d.profile(), Some((1, sys("a"))));
}

/// Pids a fake system or health command appended to `name` in the fake dir.
fn pids_in(d: &Device, name: &str) -> Vec<String> {
    d.fake_file(name).lines().map(str::to_owned).collect()
}

/// Running (a zombie, reparented and not yet reaped, counts as gone).
fn alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').and_then(|(_, r)| r.trim_start().chars().next()))
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// Waits (bounded) for every pid to be gone; the ones still running.
fn survivors_after(pids: &[String], secs: u64) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let left: Vec<String> = pids.iter().filter(|p| alive(p)).cloned().collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Ends the background processes a test's commands left (by pid).
fn kill_pids(pids: &[String]) {
    for p in pids {
        let _ = Command::new("kill").args(["-9", p]).stderr(Stdio::null()).status();
    }
}

#[test]
fn health_command_that_leaves_a_background_child_is_healthy() {
    // Exits 0 at once, but `sleep 300` keeps its stdout open: the helper
    // used to wait for EOF on the pipe, report a timeout, and roll back.
    // (The helper, and so the command, has FAKE_NIXOS_DIR in its environment.)
    let cmd = r#"["/bin/sh","-c","sleep 300 & echo $! >> $FAKE_NIXOS_DIR/health-bg.pids; echo healthy"]"#;
    let d = Device::new(Opts { health_command: Some(cmd.into()), ..Opts::default() });
    d.deploy(Some(&sys("b")), "switch", 140);
    let (outcome, status) = d.finish(140, 60);
    let pids = pids_in(&d, "health-bg.pids");
    kill_pids(&pids);
    assert_eq!(outcome, "committed", "{status}");
    assert!(!pids.is_empty(), "the health command ran");
    assert_eq!(d.calls(), vec!["b test", "b boot"]);
    assert_eq!(d.profile(), Some((2, sys("b"))));
}

#[test]
fn switch_that_leaves_a_daemon_holding_stdout_succeeds_promptly_and_the_daemon_lives() {
    // Activation starts something that keeps stdout open and exits 0. The
    // switch is done when switch-to-configuration exits, not when the pipe
    // closes (it used to be killed after switch_timeout - 5 s and rolled
    // back); the daemon is not killed.
    let d = Device::new(Opts { switch_timeout: 30, ..Opts::default() });
    d.behave("b", "daemon");
    let started = Instant::now();
    d.deploy(Some(&sys("b")), "switch", 150);
    let (outcome, status) = d.finish(150, 60);
    let took = started.elapsed();
    let pids = pids_in(&d, "daemon.pids");
    let living: Vec<String> = pids.iter().filter(|p| alive(p)).cloned().collect();
    kill_pids(&pids);
    assert_eq!(outcome, "committed", "{status}");
    assert_eq!(d.calls(), vec!["b test", "b boot"]);
    assert_eq!(d.profile(), Some((2, sys("b"))));
    assert_eq!(pids.len(), 1, "one daemon, from the live switch");
    assert_eq!(living, pids, "the daemon activation started survives the switch");
    // The old helper would have held the switch for 25 s before killing it.
    assert!(took < Duration::from_secs(25), "took {took:?}");
}

#[test]
fn hung_switch_is_killed_with_everything_it_forked() {
    let d = Device::new(Opts { switch_timeout: 8, ..Opts::default() });
    d.behave("b", "hang-fork");
    d.deploy(Some(&sys("b")), "switch", 160);
    let (outcome, status) = d.finish(160, 90);
    assert_eq!(outcome, "rolled-back", "{status}");
    assert_eq!(d.calls(), vec!["b test", "a test"]);
    let pids = pids_in(&d, "grandchild.pids");
    assert_eq!(pids.len(), 1, "the hung switch forked");
    let left = survivors_after(&pids, 30);
    kill_pids(&left);
    assert!(left.is_empty(), "the switch's child {left:?} outlived the timeout");
}

#[test]
fn hung_health_command_is_killed_with_everything_it_forked() {
    let cmd = r#"["/bin/sh","-c","sleep 3600 & echo $! >> $FAKE_NIXOS_DIR/health-hang.pids; wait"]"#;
    let d = Device::new(Opts { health_timeout: 3, health_command: Some(cmd.into()), ..Opts::default() });
    d.deploy(Some(&sys("b")), "switch", 170);
    let (outcome, status) = d.finish(170, 60);
    assert_eq!(outcome, "rolled-back", "{status}");
    let pids = pids_in(&d, "health-hang.pids");
    assert!(!pids.is_empty(), "the health command ran");
    let left = survivors_after(&pids, 30);
    kill_pids(&left);
    assert!(left.is_empty(), "the health command's child {left:?} outlived the timeout");
}

#[test]
fn switch_killed_at_its_timeout_leaves_no_unit_lists_for_the_rollback() {
    // b's switch-to-configuration records the units it is about to start
    // in /run/nixos/*-list and hangs; killed at the timeout, it leaves them,
    // and every switch-to-configuration resumes them first: a's rollback
    // `test` would fail on b's units (exit 4, rollback-failed).
    let d = Device::new(Opts { switch_timeout: 8, ..Opts::default() });
    d.behave("b", "hang-lists");
    d.deploy(Some(&sys("b")), "switch", 180);
    let (outcome, status) = d.finish(180, 90);
    assert_eq!(outcome, "rolled-back", "{status}");
    assert!(status.contains("killed after"), "{status}");
    assert_eq!(d.calls(), vec!["b test", "a test"]);
    let lists = nixless::switch::leftovers::dir(d.root.path());
    for name in nixless::switch::leftovers::LISTS {
        assert!(!lists.join(name).exists(), "{name} outlived the killed switch");
    }
    let log = d.fake_file("helper.log");
    assert!(log.contains("start-list: 1 unit(s): b-only.service"), "the helper says what it removed: {log}");
    assert_eq!(d.profile(), Some((1, sys("a"))));
    assert_eq!(d.current_system(), sys("a"));
}

#[test]
fn switch_refused_by_inhibitors_fails_with_the_advice_or_becomes_a_boot_deploy() {
    let d = Device::new(Opts::default());
    d.behave("b", "inhibited");
    d.deploy(Some(&sys("b")), "switch", 190);
    let (outcome, status) = d.finish(190, 60);
    assert_eq!(outcome, "failed", "{status}");
    assert!(status.contains("needs a reboot: deploy with action boot"), "{status}");
    assert!(status.contains("systemd : /nix/store/"), "what changed: {status}");
    assert_eq!(d.calls(), vec!["b test"], "nothing was switched, so no rollback");
    assert_eq!(d.profile(), Some((1, sys("a"))));
    assert_eq!(d.fake_file("boot-default"), "a");
    assert_eq!(d.current_system(), sys("a"));

    // Configured to: the same deploy goes on as a boot deploy (no
    // systemd-boot here, so the new generation simply is the default).
    let d = Device::new(Opts { extra: r#","inhibited_switch":"boot""#.into(), ..Opts::default() });
    d.behave("b", "inhibited");
    d.deploy(Some(&sys("b")), "switch", 191);
    let (outcome, status) = d.finish(191, 60);
    assert_eq!(outcome, "committed", "{status}");
    assert!(status.contains("\"action\":\"boot\""), "{status}");
    assert_eq!(d.calls(), vec!["b test", "b boot"]);
    assert_eq!(d.profile(), Some((2, sys("b"))));
    assert_eq!(d.fake_file("boot-default"), "b");
    assert_eq!(d.current_system(), sys("a"), "still running a until the reboot");
}

#[test]
fn going_back_from_a_boot_deploy_refused_by_inhibitors_makes_the_old_one_the_default() {
    // A boot deploy (the way in when inhibitors change) comes up unhealthy;
    // switching back live is refused the same way: the previous system
    // becomes the boot default, to run after the next reboot.
    let d = Device::new(Opts::default());
    std::fs::write(d.fake.path().join("systemd-boot"), "").unwrap();
    d.deploy(Some(&sys("c")), "boot", 200);
    d.wait_for(|s| s.contains("\"phase\":\"awaiting-reboot\""), 60);
    d.behave("a", "inhibited");
    std::fs::write(d.fake.path().join("unhealthy"), "").unwrap();
    d.reboot_into(&sys("c"), "boot-2");
    let (outcome, status) = d.finish(200, 60);
    assert_eq!(outcome, "rollback-failed", "{status}");
    assert!(status.contains("reboot to run it"), "{status}");
    assert_eq!(d.calls(), vec!["c boot", "a switch", "a boot"]);
    assert_eq!(d.fake_file("boot-default"), "a");
    assert!(d.fake_file("bootctl-calls").ends_with("set-default  (loader default a)"), "one-time override dropped");
    assert_eq!(d.profile().map(|p| p.1), Some(sys("a")), "profile points at A again");
}
