//! Compiles the agent's seccomp allowlist (`src/agent/seccomp.json`, in
//! seccompiler's JSON format) into a BPF program at build time, the way
//! Firecracker does: the binary carries no JSON parser for it and the
//! filter it installs is exactly the one reviewed in the source tree.
//!
//! Output: `$OUT_DIR/seccomp_agent.bpf`, the `agent` filter's instructions
//! as raw 8-byte little-endian records `code: u16, jt: u8, jf: u8, k: u32`
//! (the kernel's `struct sock_filter`). `src/agent/seccomp.rs` reads it
//! back with `include_bytes!`. The JSON is validated on every target; the
//! file is empty unless the target is x86_64 (the only syscall table the
//! JSON is written for), and `seccomp::install` then refuses.

use std::path::PathBuf;

const SOURCE: &str = "src/agent/seccomp.json";
const FILTER: &str = "agent";

fn fail(msg: String) -> ! {
    eprintln!("error: {SOURCE}: {msg}");
    std::process::exit(1);
}

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-changed=build.rs");

    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("seccomp_agent.bpf");
    let json = std::fs::read(manifest.join(SOURCE)).unwrap_or_else(|e| fail(format!("cannot read: {e}")));

    let mut filters = seccompiler::compile_from_json(json.as_slice(), seccompiler::TargetArch::x86_64)
        .unwrap_or_else(|e| fail(format!("invalid seccomp filter: {e}")));
    let prog = filters.remove(FILTER).unwrap_or_else(|| fail(format!("no filter named {FILTER:?}")));
    if let Some(other) = filters.keys().next() {
        fail(format!("unexpected filter {other:?}: only {FILTER:?} is installed"));
    }
    // BPF_MAXINSNS: the kernel refuses longer programs.
    if prog.is_empty() || prog.len() > 4096 {
        fail(format!("filter has {} instructions (1..=4096 allowed)", prog.len()));
    }

    let mut bytes = Vec::new();
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("x86_64") {
        bytes.reserve(prog.len() * 8);
        for ins in &prog {
            bytes.extend_from_slice(&ins.code.to_le_bytes());
            bytes.push(ins.jt);
            bytes.push(ins.jf);
            bytes.extend_from_slice(&ins.k.to_le_bytes());
        }
    }
    std::fs::write(&out, bytes).unwrap_or_else(|e| fail(format!("writing {}: {e}", out.display())));
}
