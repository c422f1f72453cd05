//! The crate's layering, checked: a module may use modules of its own
//! layer and the layers below, never one above. A reader can then take any
//! module and know that nothing under it depends on the agent.
//!
//! ```text
//! layer 9  cli console main lib    entry points; may use anything
//! layer 8  agent                   the daemon
//! layer 7  admin                   keygen, deploy, status (the admin's side)
//! layer 6  switch                  helper, its wire protocol
//! layer 5  deploy api              signed deploy documents, the HTTP API bodies
//! layer 4  store                   the store, profiles, gc
//! layer 3  fetch net               caches over HTTP
//! layer 2  nar                     NAR parsing and writing
//! layer 1  nix                     store paths, hashes, narinfo, keys
//! layer 0  text json clock logger  leaves
//! ```
//!
//! The check reads `src/` as text: every `crate::NAME` (also inside
//! `crate::{a, b}` groups) outside comments, in code and in its unit tests
//! alike, names a top-level module whose layer must not be above the
//! file's. `super::super` is refused everywhere: a relative path that
//! climbs out of a module would hide a dependency from this check. A
//! top-level module missing from [`LAYERS`] fails too, so a new module is
//! placed deliberately.

use std::path::{Path, PathBuf};

const LAYERS: &[&[&str]] = &[
    &["text", "json", "clock", "logger", "testkit"],
    &["nix"],
    &["nar"],
    // Cache credentials (netrc, bearer, SigV4): pure, used by the HTTP clients.
    &["auth"],
    &["fetch", "net"],
    &["store"],
    &["deploy", "api", "channel"],
    &["switch"],
    // The admin side: keys, deploy, status, fleet status and rollout watch.
    &["admin", "fleet"],
    &["agent"],
    &["cli", "console", "main", "lib"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The top-level module a file under `src/` belongs to.
fn module_of(rel: &Path) -> String {
    let first = rel.components().next().unwrap().as_os_str().to_str().unwrap();
    first.strip_suffix(".rs").unwrap_or(first).to_owned()
}

fn ident_at(s: &str) -> &str {
    let end = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(s.len());
    &s[..end]
}

/// The top-level modules `code` names through `crate::`.
fn crate_refs(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        // `$crate::` in macros, `nixless_crate::`, …: not this crate's root.
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a::b, c}`: the first name of each top-level item.
            let mut depth = 0;
            let mut start = true;
            for (k, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && !c.is_whitespace() => {
                        start = false;
                        out.push(ident_at(&group[k..]).to_owned());
                    }
                    _ => {}
                }
            }
        } else {
            out.push(ident_at(rest).to_owned());
        }
    }
    out
}

/// Every layering violation in one file, as `file:line: why`.
fn violations(rel: &Path, text: &str) -> Vec<String> {
    let module = module_of(rel);
    let Some(own) = layer(&module) else {
        return vec![format!(
            "src/{}: module `{module}` is in no layer: add it to LAYERS in tests/layering.rs",
            rel.display()
        )];
    };
    let mut out = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (n, line) in lines.iter().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let at = format!("src/{}:{}", rel.display(), n + 1);
        if code.contains("super::super") {
            out.push(format!("{at}: `super::super` climbs out of a module; name it with a crate:: path"));
        }
        if !code.contains("crate::") {
            continue;
        }
        let stmt = if code.contains("crate::{") && !code.contains('}') {
            // A group spanning lines: read on to its closing brace.
            let end = lines[n..].iter().position(|l| l.contains('}')).map_or(lines.len(), |k| n + k + 1);
            lines[n..end].join(" ")
        } else {
            code.to_owned()
        };
        for used in crate_refs(&stmt) {
            match layer(&used) {
                Some(l) if l > own => out
                    .push(format!("{at}: `{module}` (layer {own}) uses `crate::{used}` (layer {l}), a layer above it")),
                Some(_) => {}
                None => out.push(format!("{at}: `crate::{used}` is in no layer of tests/layering.rs")),
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_module_uses_a_layer_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    assert!(files.len() > 20, "found the sources in {}", src.display());
    let mut bad = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        bad.extend(violations(f.strip_prefix(&src).unwrap(), &text));
    }
    assert!(bad.is_empty(), "layering violations:\n{}", bad.join("\n"));
}

#[test]
fn the_checker_sees_each_kind_of_violation() {
    let v = |file: &str, text: &str| violations(Path::new(file), text);
    assert_eq!(v("switch/helper.rs", "use crate::agent::config::Config;").len(), 1);
    assert_eq!(
        v("store/gc.rs", "use crate::{nix::StorePath,\n    switch::profile};\n").len(),
        1,
        "grouped, multi-line"
    );
    assert_eq!(v("nix/narinfo.rs", "    let e = crate::fetch::decompress::decoder(x);").len(), 1, "in tests too");
    assert_eq!(v("nar/mod.rs", "use crate::store::Store;").len(), 1);
    assert_eq!(v("admin.rs", "let now = crate::agent::daemon::now();").len(), 1);
    assert_eq!(v("switch/x.rs", "use super::super::agent;").len(), 1);
    assert_eq!(v("novel/mod.rs", "").len(), 1, "a module in no layer");
    // Allowed: downward, sideways within a layer, comments, other crates.
    assert!(v("agent/daemon.rs", "use crate::{switch::protocol, store::Store};").is_empty());
    assert!(v("fetch/mod.rs", "use crate::net::Reactor;").is_empty());
    assert!(v("store/gc.rs", "// see crate::agent::daemon").is_empty());
    assert!(v("store/gc.rs", "let x = 1; // crate::agent").is_empty());
    assert!(v("json.rs", "$crate::json::x; other_crate::agent::y").is_empty());
    assert!(v("cli.rs", "crate::agent::daemon::main()").is_empty());
}
