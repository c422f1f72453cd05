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
    // Rows as agents answer (one slow agent does not hide the others);
    // the channel table after them.
    let mut channels = Vec::new();
    for base in agents {
        let base = base.trim_end_matches('/');
        let res = get_status(&agent, base);
        print!("{}", status_row(base, &res));
        match res {
            Ok(s) => channels.push(s),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    print!("{}", channel_table(&channels, crate::clock::now()));
    match first_error {
        Some(e) if agents.len() == 1 => Err(e),
        Some(e) => Err(format!("{failed} of {} agents failed, first: {e}", agents.len())),
        None => Ok(()),
    }
}

/// One line of the status table. What an agent sends is escaped and
/// clipped: a status is the agent's word, not the admin terminal's.
fn status_row(base: &str, res: &Result<api::Status, String>) -> String {
    use crate::text::clip;
    let s = match res {
        Ok(s) => s,
        Err(e) => return format!("{:<16} {:<12} {}\n", clip(base, 64), "failed", clip(e, 512)),
    };
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
            clip(&l.outcome, 32),
            l.reason.as_deref().map(|r| format!(" ({})", clip(r, 256))).unwrap_or_default()
        ),
        None => "-".into(),
    };
    let last = if let Some(e) = &s.last_error { format!("{last}; error: {}", clip(e, 256)) } else { last };
    format!("{:<16} {:<12} {:<52} {:<22} {}\n", clip(&s.host, 64), clip(&s.phase, 32), clip(sys, 256), progress, last)
}

/// The channel each agent follows (those that follow one), at the admin's
/// `now`: "" when none does.
///
/// ```text
/// HOST CHANNEL SEQ GROUP WAVE DECISION CHECKED NOTES
/// SEQ   = the document held, else the one accepted last (after a restart), else -
/// NOTES = "opens in N s" (wait) · "expires in N s" | "EXPIRED" · "not retrying SYSTEM"
///         · "error: …" · "keys error: …", joined by "; "
/// ```
fn channel_table(statuses: &[api::Status], now: u64) -> String {
    use crate::text::clip;
    let rows: Vec<(&str, &api::Channel)> =
        statuses.iter().filter_map(|s| Some((s.host.as_str(), s.channel.as_ref()?))).collect();
    if rows.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "\n{:<16} {:<16} {:>8} {:<16} {:>4} {:<16} {:<12} NOTES\n",
        "HOST", "CHANNEL", "SEQ", "GROUP", "WAVE", "DECISION", "CHECKED"
    );
    let or_dash = |v: Option<String>| v.filter(|v| !v.is_empty()).unwrap_or_else(|| "-".into());
    for (host, c) in rows {
        let mut notes = Vec::new();
        if let (Some("wait"), Some(t)) = (c.decision.as_deref(), c.until) {
            notes.push(format!("opens in {} s", t.saturating_sub(now)));
        }
        match c.expires {
            Some(t) if t <= now => notes.push("EXPIRED".into()),
            Some(t) => notes.push(format!("expires in {} s", t - now)),
            None => {}
        }
        if let Some(f) = &c.failed_system {
            notes.push(format!("not retrying {}", clip(f, 256)));
        }
        if let Some(e) = &c.error {
            notes.push(format!("error: {}", clip(e, 256)));
        }
        if let Some(e) = &c.keys_error {
            notes.push(format!("keys error: {}", clip(e, 256)));
        }
        let checked = c.last_check.map_or("never".to_owned(), |t| format!("{} s ago", now.saturating_sub(t)));
        out += &format!(
            "{:<16} {:<16} {:>8} {:<16} {:>4} {:<16} {:<12} {}\n",
            clip(host, 64),
            or_dash(c.name.as_deref().map(|n| clip(n, 64))),
            or_dash(c.seq.or(c.accepted_seq).map(|s| s.to_string())),
            or_dash(c.group.as_deref().map(|g| clip(g, 64))),
            or_dash(c.wave.map(|w| w.to_string())),
            or_dash(c.decision.as_deref().map(|d| clip(d, 32))),
            checked,
            if notes.is_empty() { "-".to_owned() } else { notes.join("; ") }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn following(host: &str, c: api::Channel) -> api::Status {
        api::Status { host: host.into(), phase: "idle".into(), channel: Some(c), ..api::Status::default() }
    }

    /// The channel table: one row per agent that follows a channel, what
    /// it decided and why it may not move, in words an admin reads.
    #[test]
    fn the_channel_table_shows_what_each_agent_follows() {
        let now = 1_800_000_000;
        let waiting = api::Channel {
            name: Some("stable".into()),
            seq: Some(5),
            decision: Some("wait".into()),
            group: Some("kiosk".into()),
            wave: Some(2),
            until: Some(now + 3400),
            expires: Some(now + 86_400),
            last_check: Some(now - 30),
            ..api::Channel::default()
        };
        let restarted = api::Channel {
            name: Some("stable".into()),
            accepted_seq: Some(4),
            failed_system: Some("/nix/store/x-bad".into()),
            error: Some("https://d/stable.json: expired at 17 (now 18)\n\u{1b}[2J".into()),
            ..api::Channel::default()
        };
        let halted = api::Channel {
            name: Some("stable".into()),
            seq: Some(6),
            decision: Some("halted".into()),
            group: Some(String::new()),
            wave: Some(0),
            expires: Some(now),
            last_check: Some(now),
            ..api::Channel::default()
        };
        let mut none = following("plain", api::Channel::default());
        none.channel = None;
        let t = channel_table(
            &[following("kiosk-7", waiting), following("kiosk-8", restarted), none, following("till-1", halted)],
            now,
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5, "{t}");
        assert_eq!(lines[0], "");
        assert!(
            lines[1].starts_with("HOST             CHANNEL               SEQ GROUP            WAVE DECISION"),
            "{t}"
        );
        assert_eq!(
            lines[2],
            "kiosk-7          stable                  5 kiosk               2 wait             30 s ago     \
             opens in 3400 s; expires in 86400 s"
        );
        assert_eq!(
            lines[3],
            "kiosk-8          stable                  4 -                   - -                never        \
             not retrying /nix/store/x-bad; error: https://d/stable.json: expired at 17 (now 18)\\n\\u{1b}[2J"
        );
        assert!(
            lines[4].starts_with("till-1           stable                  6 -                   0 halted "),
            "{t}"
        );
        assert!(lines[4].ends_with(" 0 s ago      EXPIRED"), "{t}");
        assert!(!t.contains('\u{1b}'));
        // Nobody follows a channel: no table at all.
        assert_eq!(channel_table(&[api::Status { host: "h".into(), ..api::Status::default() }], now), "");
    }

    #[test]
    fn status_rows_escape_what_agents_send() {
        let s = api::Status {
            host: "evil\r\u{1b}[31mhost".into(),
            phase: "idle\n".into(),
            last_error: Some("bad\nline".into()),
            ..api::Status::default()
        };
        let r = status_row("http://a", &Ok(s));
        assert_eq!(r.matches('\n').count(), 1, "{r}");
        assert!(!r.contains('\r') && !r.contains('\u{1b}') && r.contains("bad\\nline"), "{r}");
        let r = status_row("http://b", &Err("http://b: connection refused\nX".into()));
        assert_eq!(r, "http://b         failed       http://b: connection refused\\nX\n");
    }

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
