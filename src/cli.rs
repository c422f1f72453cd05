//! Command line: `nixless <command>`. Every failure is one line on stderr
//! and a non-zero exit.

use crate::fetch::{CacheUrl, Fetcher, Options};
use crate::nix::{PublicKey, StorePath, TrustedKeys};
use crate::store::install::{self, Progress};
use crate::store::Store;
use argh::FromArgs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(FromArgs)]
/// nixless: install and switch NixOS closures from Nix binary caches, without Nix.
pub struct Args {
    #[argh(subcommand)]
    cmd: Command,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Command {
    Install(InstallArgs),
    Verify(VerifyArgs),
}

#[derive(FromArgs)]
/// Install store paths and their closures from binary caches, verified.
#[argh(subcommand, name = "install")]
struct InstallArgs {
    /// prefix for the store: files land in DIR/nix/store (default /)
    #[argh(option, default = "PathBuf::from(\"/\")")]
    root: PathBuf,
    /// where records of installed paths go (default ROOT/var/lib/nixless)
    #[argh(option)]
    state_dir: Option<PathBuf>,
    /// binary cache URL (http://, https://, file://); repeat, in priority order
    #[argh(option)]
    cache: Vec<String>,
    /// trusted cache public key, name:base64
    #[argh(option)]
    trusted_key: Vec<String>,
    /// file holding one trusted public key per line
    #[argh(option)]
    trusted_key_file: Vec<PathBuf>,
    /// retries of a failed request or broken download (default 4)
    #[argh(option, default = "4")]
    retries: u32,
    /// store paths to install (/nix/store/<hash>-<name>)
    #[argh(positional)]
    paths: Vec<String>,
}

#[derive(FromArgs)]
/// Re-hash installed paths against their recorded NarHash.
#[argh(subcommand, name = "verify")]
struct VerifyArgs {
    /// prefix for the store (default /)
    #[argh(option, default = "PathBuf::from(\"/\")")]
    root: PathBuf,
    /// state directory (default ROOT/var/lib/nixless)
    #[argh(option)]
    state_dir: Option<PathBuf>,
    /// paths to check (default: every recorded path)
    #[argh(positional)]
    paths: Vec<String>,
}

/// A one-line error for the user.
type CliResult = Result<(), String>;

pub fn main() -> i32 {
    crate::logger::init(log::LevelFilter::Warn);
    let args: Args = argh::from_env();
    let res = match args.cmd {
        Command::Install(a) => cmd_install(a),
        Command::Verify(a) => cmd_verify(a),
    };
    match res {
        Ok(()) => 0,
        Err(msg) => {
            eprintln!("nixless: error: {msg}");
            1
        }
    }
}

fn state_dir(root: &Path, given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(|| root.join("var/lib/nixless"))
}

pub fn parse_store_paths(paths: &[String]) -> Result<Vec<StorePath>, String> {
    paths
        .iter()
        .map(|p| StorePath::from_absolute(p.trim_end_matches('/')).map_err(|e| format!("{p}: {e}")))
        .collect()
}

fn trusted_keys(inline: &[String], files: &[PathBuf]) -> Result<TrustedKeys, String> {
    let mut keys = Vec::new();
    for k in inline {
        keys.push(PublicKey::parse(k).map_err(|e| format!("--trusted-key {k:?}: {e}"))?);
    }
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            keys.push(PublicKey::parse(line).map_err(|e| format!("{}: {e}", f.display()))?);
        }
    }
    if keys.is_empty() {
        return Err("no trusted cache key: give --trusted-key or --trusted-key-file".into());
    }
    Ok(TrustedKeys::new(keys))
}

fn is_tty() -> bool {
    rustix::termios::isatty(std::io::stderr())
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Draws the progress line at most every 100 ms.
struct Meter {
    start: Instant,
    last: Option<Instant>,
    enabled: bool,
}

impl Meter {
    fn show(&mut self, p: &Progress) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if self
            .last
            .is_some_and(|l| now.duration_since(l).as_millis() < 100)
        {
            return;
        }
        self.last = Some(now);
        let secs = now.duration_since(self.start).as_secs_f64().max(0.001);
        let _ = write!(
            std::io::stderr(),
            "\r\x1b[K{}/{} paths, {:.1}/{:.1} MiB, {:.1} MiB/s",
            p.paths_done,
            p.paths_total,
            mib(p.nar_bytes_done),
            mib(p.nar_bytes_total),
            mib(p.nar_bytes_done) / secs
        );
    }

    fn clear(&self) {
        if self.enabled {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
    }
}

fn cmd_install(a: InstallArgs) -> CliResult {
    let roots = parse_store_paths(&a.paths)?;
    if roots.is_empty() {
        return Err("no store paths given".into());
    }
    if a.cache.is_empty() {
        return Err("no cache given: use --cache URL".into());
    }
    let caches = a
        .cache
        .iter()
        .map(|c| CacheUrl::parse(c))
        .collect::<Result<Vec<_>, _>>()?;
    let keys = trusted_keys(&a.trusted_key, &a.trusted_key_file)?;
    let state = state_dir(&a.root, a.state_dir);
    let store = Store::open(&a.root, &state)
        .map_err(|e| format!("opening store under {}: {e}", a.root.display()))?;
    let mut fetcher = Fetcher::new(
        caches,
        Options {
            retries: a.retries,
            ..Options::default()
        },
    );
    let start = Instant::now();
    let mut meter = Meter {
        start,
        last: None,
        enabled: is_tty(),
    };
    let result = install::install(&mut fetcher, &store, &keys, &roots, &mut |p| meter.show(p));
    meter.clear();
    let (plan, prog) = result.map_err(|e| e.to_string())?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "installed {} paths ({} already present), {:.1} MiB NAR, {:.1} MiB downloaded in {:.2} s",
        prog.paths_done,
        plan.present,
        mib(prog.nar_bytes_done),
        mib(prog.file_bytes),
        secs
    );
    Ok(())
}

fn cmd_verify(a: VerifyArgs) -> CliResult {
    let state = state_dir(&a.root, a.state_dir);
    let store = Store::open(&a.root, &state)
        .map_err(|e| format!("opening store under {}: {e}", a.root.display()))?;
    let paths = if a.paths.is_empty() {
        store
            .recorded_paths()
            .map_err(|e| format!("{}: {e}", state.display()))?
    } else {
        parse_store_paths(&a.paths)?
    };
    let mut bad = 0;
    for p in &paths {
        let rec = match store.read_record(p) {
            Ok(Some(r)) => r,
            Ok(None) => {
                println!("{p}: no record (not installed by nixless)");
                bad += 1;
                continue;
            }
            Err(e) => {
                println!("{p}: {e}");
                bad += 1;
                continue;
            }
        };
        match store.hash_path(p) {
            Ok((hash, size)) if hash == rec.nar_hash && size == rec.nar_size => {}
            Ok((hash, size)) => {
                println!(
                    "{p}: modified: NAR hash {hash} ({size} bytes), recorded {} ({} bytes)",
                    rec.nar_hash, rec.nar_size
                );
                bad += 1;
            }
            Err(e) => {
                println!("{p}: cannot read: {e}");
                bad += 1;
            }
        }
    }
    if bad > 0 {
        return Err(format!(
            "{bad} of {} paths failed verification",
            paths.len()
        ));
    }
    eprintln!("{} paths verified", paths.len());
    Ok(())
}
