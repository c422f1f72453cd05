//! The `nixless` binary: see `cli` for the commands.

fn main() {
    std::process::exit(nixless::cli::main());
}
