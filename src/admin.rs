//! The admin side of the same binary: `keygen`, `deploy`, `status`.

use crate::api;
use crate::deploy;
use crate::deploy::Action;
use crate::nix::SecretKey;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub fn keygen(name: &str, out: &Path) -> Result<(), String> {
    let sk = SecretKey::generate(name).map_err(|e| format!("key name {name:?}: {e}"))?;
    let pub_path = PathBuf::from(format!("{}.pub", out.display()));
    for p in [out, pub_path.as_path()] {
        if p.exists() {
            return Err(format!("{} exists; not overwriting a key", p.display()));
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode_0600()
        .open(out)
        .map_err(|e| format!("{}: {e}", out.display()))?;
    f.write_all(format!("{sk}\n").as_bytes()).map_err(|e| format!("{}: {e}", out.display()))?;
    std::fs::write(&pub_path, format!("{}\n", sk.public())).map_err(|e| format!("{}: {e}", pub_path.display()))?;
    println!("{}", sk.public());
    Ok(())
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

pub struct DeployOpts {
    pub key: PathBuf,
    pub host: String,
    pub system: Option<String>,
    pub seq: Option<u64>,
    pub action: String,
    pub caches: Vec<String>,
    pub narinfo_dir: Option<PathBuf>,
    pub agent: Option<String>,
    pub out: Option<PathBuf>,
    pub wait: bool,
    pub timeout: Duration,
    /// Allow a `seq` more than [`MAX_SEQ_AHEAD`] seconds ahead of now.
    pub force: bool,
}

/// How far ahead of now (in seconds) `--seq` may be without `--force`.
/// Agents accept only growing sequences, and the default sequence is now:
/// a document signed with a sequence far in the future makes every
/// ordinary deploy stale until that time comes.
pub const MAX_SEQ_AHEAD: u64 = 86_400;

/// Refuses a sequence no agent would accept, or one that would block the
/// default (now-based) sequences for more than a day.
fn check_seq(seq: u64, now: u64, force: bool) -> Result<(), String> {
    if seq > deploy::MAX_SEQ {
        return Err(format!("--seq {seq}: above {} (2^53-1), the largest an agent accepts", deploy::MAX_SEQ));
    }
    if !force && seq > now.saturating_add(MAX_SEQ_AHEAD) {
        return Err(format!(
            "--seq {seq} is {} s ahead of now ({now}), more than {MAX_SEQ_AHEAD}: the agent would refuse every \
             deploy with a lower sequence (the default is now) until then; give --force if that is meant",
            seq - now
        ));
    }
    Ok(())
}

fn http_agent() -> ureq::Agent {
    crate::fetch::http_agent(
        ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(30))).build(),
    )
}

pub fn deploy(o: DeployOpts) -> Result<(), String> {
    let action =
        Action::parse(&o.action).ok_or(format!("--action {:?}: expected switch, boot, rollback or gc", o.action))?;
    if let Some(s) = &o.system {
        crate::nix::StorePath::from_absolute(s).map_err(|e| format!("--system {s}: {e}"))?;
    } else if matches!(action, Action::Switch | Action::Boot) {
        return Err(format!("--system is needed for action {}", action.as_str()));
    }
    if o.agent.is_some() == o.out.is_some() {
        return Err("give exactly one of --agent URL or --out FILE".into());
    }
    let now = crate::clock::now();
    let seq = o.seq.unwrap_or(now);
    check_seq(seq, now, o.force)?;
    let key_text = std::fs::read_to_string(&o.key).map_err(|e| format!("{}: {e}", o.key.display()))?;
    let key = SecretKey::parse(&key_text).map_err(|e| format!("{}: {e}", o.key.display()))?;
    let mut narinfos = Vec::new();
    if let Some(dir) = &o.narinfo_dir {
        for e in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
            let p = e.map_err(|e| e.to_string())?.path();
            if p.extension().is_some_and(|x| x == "narinfo") {
                narinfos.push(std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?);
            }
        }
        narinfos.sort();
    }
    let doc = deploy::render(&o.host, o.system.as_deref(), seq, action, &o.caches, &narinfos)
        .map_err(|e| format!("deploy document: {e}"))?;
    let sig = deploy::sign(&key, doc.as_bytes());
    if let Some(out) = &o.out {
        let sig_path = PathBuf::from(format!("{}.sig", out.display()));
        // Signature first: a poller that sees the new document finds its
        // signature already there.
        std::fs::write(&sig_path, format!("{sig}\n")).map_err(|e| format!("{}: {e}", sig_path.display()))?;
        std::fs::write(out, &doc).map_err(|e| format!("{}: {e}", out.display()))?;
        eprintln!("wrote {} and {} (seq {seq})", out.display(), sig_path.display());
        return Ok(());
    }
    let base = o.agent.as_deref().expect("checked").trim_end_matches('/').to_owned();
    let agent = http_agent();
    let resp = agent
        .post(&format!("{base}/v1/deploy"))
        .header("Nixless-Signature", &sig)
        .header("Content-Type", "application/json")
        .send(doc.as_bytes())
        .map_err(|e| format!("POST {base}/v1/deploy: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp.into_body().read_to_string().unwrap_or_default();
    if status != 202 {
        return Err(format!("{base}: HTTP {status}: {}", body.trim()));
    }
    eprintln!("{base}: accepted seq {seq}");
    if !o.wait {
        return Ok(());
    }
    follow(&agent, &base, seq, o.timeout)
}

fn get_status(agent: &ureq::Agent, base: &str) -> Result<api::Status, String> {
    let resp = agent.get(&format!("{base}/v1/status")).call().map_err(|e| format!("{base}: {e}"))?;
    if resp.status().as_u16() != 200 {
        return Err(format!("{base}: HTTP {}", resp.status().as_u16()));
    }
    let body = resp.into_body().with_config().limit(1 << 20).read_to_vec().map_err(|e| format!("{base}: {e}"))?;
    crate::json::from_slice_bounded::<api::Status>(&body).map_err(|e| format!("{base}: bad status JSON: {e}"))
}

/// Follows an agent's status until the deploy `seq` has finished; the
/// agent may restart meanwhile (its own update), so errors are retried.
fn follow(agent: &ureq::Agent, base: &str, seq: u64, timeout: Duration) -> Result<(), String> {
    let start = Instant::now();
    let tty = rustix::termios::isatty(std::io::stderr());
    let mut last_err = String::new();
    while start.elapsed() < timeout {
        match get_status(agent, base) {
            Ok(s) => {
                if let Some(l) = s.last_result.as_ref().filter(|l| l.seq == seq) {
                    if tty {
                        eprint!("\r\x1b[K");
                    }
                    let reason = l.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
                    return match l.outcome.as_str() {
                        "committed" | "collected" => {
                            eprintln!("{base}: seq {seq} {}{reason}", l.outcome);
                            Ok(())
                        }
                        other => Err(format!("{base}: seq {seq} {other}{reason}")),
                    };
                }
                if s.highest_seq > seq {
                    return Err(format!("{base}: superseded by seq {}", s.highest_seq));
                }
                if tty {
                    let p = &s.progress;
                    eprint!(
                        "\r\x1b[K{}: {} {}/{} paths, {}/{} MiB",
                        s.host,
                        s.phase,
                        p.paths_done,
                        p.paths_total,
                        p.bytes_done >> 20,
                        p.bytes_total >> 20
                    );
                }
            }
            Err(e) => last_err = e,
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(format!("{base}: seq {seq} not finished after {} s {last_err}", timeout.as_secs()))
}

pub fn status(agents: &[String]) -> Result<(), String> {
    if agents.is_empty() {
        return Err("give agent URLs, e.g. http://kiosk-7:8731".into());
    }
    let agent = http_agent();
    println!("{:<16} {:<12} {:<52} {:<22} LAST", "HOST", "PHASE", "SYSTEM", "PROGRESS");
    let (mut failed, mut first_error) = (0, None);
    for base in agents {
        let base = base.trim_end_matches('/');
        match get_status(&agent, base) {
            Ok(s) => {
                let sys = s.current_system.as_deref().unwrap_or("-");
                let p = &s.progress;
                let progress = if s.phase == "fetching" && p.paths_total > 0 {
                    format!("{}/{} {}MiB", p.paths_done, p.paths_total, p.bytes_done >> 20)
                } else {
                    "-".into()
                };
                let last = match &s.last_result {
                    Some(l) => format!(
                        "{} {}{}",
                        l.seq,
                        l.outcome,
                        l.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
                    ),
                    None => "-".into(),
                };
                let last = if let Some(e) = &s.last_error { format!("{last}; error: {e}") } else { last };
                println!("{:<16} {:<12} {:<52} {:<22} {}", s.host, s.phase, sys, progress, last);
            }
            Err(e) => {
                failed += 1;
                println!("{:<16} {:<12} {e}", base, "failed");
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) if agents.len() == 1 => Err(e),
        Some(e) => Err(format!("{failed} of {} agents failed, first: {e}", agents.len())),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_bounds() {
        let now = 1_800_000_000;
        assert!(check_seq(now + MAX_SEQ_AHEAD, now, false).is_ok());
        let e = check_seq(now + MAX_SEQ_AHEAD + 1, now, false).unwrap_err();
        assert!(e.contains("86401 s ahead") && e.contains("--force"), "{e}");
        assert!(check_seq(now + MAX_SEQ_AHEAD + 1, now, true).is_ok());
        assert!(check_seq(deploy::MAX_SEQ, now, true).is_ok());
        for seq in [deploy::MAX_SEQ + 1, u64::MAX] {
            assert!(check_seq(seq, now, true).unwrap_err().contains("2^53-1"));
        }
        // A clock near the end of time does not overflow.
        assert!(check_seq(deploy::MAX_SEQ, u64::MAX, false).is_ok());
    }
}
