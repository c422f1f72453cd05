//! Compiles the agent's seccomp allowlist (`src/agent/seccomp.json`, in
//! seccompiler's JSON format) into a BPF program at build time, the way
//! Firecracker does: the binary carries no JSON parser for it and the
//! filter it installs is exactly the one reviewed in the source tree.
//!
//! One rule list for every architecture. seccomp.json is written with
//! x86_64 syscall names; aarch64 (the asm-generic table) lacks the legacy
//! path calls and `poll`, which [`AARCH64_ABSENT`] maps to the `*at`/`ppoll`
//! rule that already covers the same operation. The filter is compiled for
//! BOTH architectures on every build, whatever the target, so a rule added
//! on an x86_64 machine that does not exist on aarch64 (or a stale mapping)
//! fails the build at once instead of drifting: seccompiler refuses unknown
//! names for the architecture it compiles for, and the mapping is checked
//! both ways (every entry used, every replacement an unconditional rule).
//!
//! Outputs, in `$OUT_DIR`:
//! - `seccomp_agent.bpf`: the `agent` filter for the target architecture as
//!   raw 8-byte little-endian records `code: u16, jt: u8, jf: u8, k: u32`
//!   (the kernel's `struct sock_filter`), read back by
//!   `src/agent/seccomp.rs` with `include_bytes!`; empty on any other
//!   architecture (`seccomp::install` then refuses).
//! - `seccomp_syscalls.txt`: the names that program allows, one a line
//!   (tests/qemu_syscalls.rs compares them with what the binary calls under
//!   qemu-user, where the filter itself cannot be installed).
//! - `seccomp_consts.txt`: `NAME VALUE` for every argument constant in the
//!   rules (the first word of the argument's comment), so a unit test can
//!   compare them with the target's libc values.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;

const SOURCE: &str = "src/agent/seccomp.json";
const FILTER: &str = "agent";

/// x86_64 rules whose syscall does not exist on aarch64, and the rule that
/// makes the same operation there: musl builds `open(p)` as
/// `openat(AT_FDCWD, p)`, `stat`/`lstat` as `newfstatat` (flag
/// AT_SYMLINK_NOFOLLOW for lstat), `rmdir` as `unlinkat(AT_REMOVEDIR)`,
/// `rename` as `renameat`, `poll` as `ppoll` (musl src/fcntl/open.c,
/// src/stat/fstatat.c, src/unistd/rmdir.c, src/stdio/rename.c,
/// src/select/poll.c under `#ifdef SYS_open` etc.). The replacement must be
/// an unconditional rule of the same list, so dropping the legacy rule
/// allows nothing the x86_64 filter does not.
const AARCH64_ABSENT: &[(&str, &str)] = &[
    ("open", "openat"),
    ("stat", "newfstatat"),
    ("lstat", "newfstatat"),
    ("mkdir", "mkdirat"),
    ("rename", "renameat"),
    ("unlink", "unlinkat"),
    ("rmdir", "unlinkat"),
    ("symlink", "symlinkat"),
    ("readlink", "readlinkat"),
    ("poll", "ppoll"),
];

fn fail(msg: String) -> ! {
    eprintln!("error: {SOURCE}: {msg}");
    std::process::exit(1);
}

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-changed=build.rs");

    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let json = std::fs::read(manifest.join(SOURCE)).unwrap_or_else(|e| fail(format!("cannot read: {e}")));
    let doc: Value = serde_json::from_slice(&json).unwrap_or_else(|e| fail(format!("invalid JSON: {e}")));

    let x86_64 = compile(&doc, seccompiler::TargetArch::x86_64, "x86_64");
    let aarch64 = compile(&for_aarch64(&doc), seccompiler::TargetArch::aarch64, "aarch64");

    let (prog, names) = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => (x86_64, syscall_names(&doc)),
        Ok("aarch64") => (aarch64, syscall_names(&for_aarch64(&doc))),
        _ => (Vec::new(), String::new()),
    };
    write(&out_dir.join("seccomp_agent.bpf"), &encode(&prog));
    write(&out_dir.join("seccomp_syscalls.txt"), names.as_bytes());
    write(&out_dir.join("seccomp_consts.txt"), arg_constants(&doc).as_bytes());
}

fn write(path: &std::path::Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| fail(format!("writing {}: {e}", path.display())));
}

/// The `agent` filter's rules (the array under `agent.filter`).
fn rules(doc: &Value) -> &Vec<Value> {
    doc.get(FILTER)
        .and_then(|f| f.get("filter"))
        .and_then(Value::as_array)
        .unwrap_or_else(|| fail(format!("no filter named {FILTER:?} with a \"filter\" array")))
}

fn syscall(rule: &Value) -> &str {
    rule.get("syscall").and_then(Value::as_str).unwrap_or_else(|| fail(format!("rule without a syscall: {rule}")))
}

fn has_args(rule: &Value) -> bool {
    rule.get("args").is_some()
}

/// seccomp.json with the x86_64-only rules dropped, after checking the
/// mapping against the rule list both ways.
fn for_aarch64(doc: &Value) -> Value {
    let list = rules(doc);
    let unconditional = |name: &str| list.iter().any(|r| syscall(r) == name && !has_args(r));
    for (legacy, replacement) in AARCH64_ABSENT {
        let found: Vec<&Value> = list.iter().filter(|r| syscall(r) == *legacy).collect();
        if found.is_empty() {
            fail(format!("build.rs maps {legacy:?} for aarch64 but no rule allows it: remove the mapping"));
        }
        if found.iter().any(|r| has_args(r)) {
            fail(format!("{legacy:?} has argument filters: its aarch64 replacement would need them too"));
        }
        if !unconditional(replacement) {
            fail(format!("{legacy:?} is absent on aarch64 and {replacement:?}, which replaces it, is not allowed"));
        }
    }
    let mut doc = doc.clone();
    if let Some(Value::Array(list)) = doc.get_mut(FILTER).and_then(|f| f.get_mut("filter")) {
        list.retain(|r| !AARCH64_ABSENT.iter().any(|(legacy, _)| syscall(r) == *legacy));
    }
    doc
}

/// The allowed syscall names, one a line, sorted, each once.
fn syscall_names(doc: &Value) -> String {
    let names: std::collections::BTreeSet<&str> = rules(doc).iter().map(syscall).collect();
    names.iter().map(|n| format!("{n}\n")).collect()
}

fn compile(doc: &Value, arch: seccompiler::TargetArch, arch_name: &str) -> Vec<seccompiler::sock_filter> {
    let bytes = serde_json::to_vec(doc).unwrap_or_else(|e| fail(format!("re-encoding: {e}")));
    let mut filters = seccompiler::compile_from_json(bytes.as_slice(), arch).unwrap_or_else(|e| {
        fail(format!(
            "invalid seccomp filter for {arch_name}: {e} (a name absent on aarch64 needs an entry in build.rs's AARCH64_ABSENT)"
        ))
    });
    let prog = filters.remove(FILTER).unwrap_or_else(|| fail(format!("no filter named {FILTER:?}")));
    if let Some(other) = filters.keys().next() {
        fail(format!("unexpected filter {other:?}: only {FILTER:?} is installed"));
    }
    // BPF_MAXINSNS: the kernel refuses longer programs.
    if prog.is_empty() || prog.len() > 4096 {
        fail(format!("{arch_name} filter has {} instructions (1..=4096 allowed)", prog.len()));
    }
    prog
}

fn encode(prog: &[seccompiler::sock_filter]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(prog.len() * 8);
    for ins in prog {
        bytes.extend_from_slice(&ins.code.to_le_bytes());
        bytes.push(ins.jt);
        bytes.push(ins.jf);
        bytes.extend_from_slice(&ins.k.to_le_bytes());
    }
    bytes
}

/// `NAME VALUE` lines, one per argument constant: the value compared (`eq`)
/// or the mask (`masked_eq`), named by the first word of the argument's
/// comment. A constant without a name, or one name with two values, fails.
fn arg_constants(doc: &Value) -> String {
    let mut consts: BTreeMap<String, u64> = BTreeMap::new();
    for rule in rules(doc) {
        for arg in rule.get("args").and_then(Value::as_array).into_iter().flatten() {
            let name =
                arg.get("comment").and_then(Value::as_str).and_then(|c| c.split_whitespace().next()).unwrap_or_else(
                    || fail(format!("{}: argument without a comment naming its constant", syscall(rule))),
                );
            let op = arg.get("op");
            let value = match op.and_then(|o| o.get("masked_eq")) {
                Some(mask) => mask.as_u64(),
                None => arg.get("val").and_then(Value::as_u64),
            }
            .unwrap_or_else(|| fail(format!("{}: {name}: no numeric value", syscall(rule))));
            if let Some(old) = consts.insert(name.to_string(), value) {
                if old != value {
                    fail(format!("{name} is both {old} and {value}"));
                }
            }
        }
    }
    consts.iter().map(|(n, v)| format!("{n} {v}\n")).collect()
}
