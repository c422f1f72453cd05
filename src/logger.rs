//! A minimal stderr logger: `nixless: <level>: message`, one line each.
//! `NIXLESS_LOG=debug|info|warn|error` sets the level (default `warn` for
//! the CLI, `info` for the agent).

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::io::Write;

struct Stderr;

impl Log for Stderr {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record<'_>) {
        if self.enabled(r.metadata()) {
            let level = match r.level() {
                Level::Error => "error",
                Level::Warn => "warning",
                Level::Info => "info",
                Level::Debug => "debug",
                Level::Trace => "trace",
            };
            let _ = writeln!(std::io::stderr().lock(), "nixless: {level}: {}", r.args());
        }
    }

    fn flush(&self) {}
}

static LOGGER: Stderr = Stderr;

pub fn init(default: LevelFilter) {
    let level = match std::env::var("NIXLESS_LOG").as_deref() {
        Ok("debug") => LevelFilter::Debug,
        Ok("info") => LevelFilter::Info,
        Ok("warn") => LevelFilter::Warn,
        Ok("error") => LevelFilter::Error,
        Ok("trace") => LevelFilter::Trace,
        _ => default,
    };
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
