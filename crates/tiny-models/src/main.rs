//! `tiny-models [WORKSPACE_ROOT]`: rebuilds `assets/tiny-sd`, `assets/tiny-blip2` and
//! `assets/examples` under the workspace root (default: this crate's workspace), from the fixed
//! seed; `cargo xtask tiny-model` runs it.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let root = match std::env::args_os().nth(1) {
        Some(r) => PathBuf::from(r),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."),
    };
    match tiny_models::write(&root, &root.join("assets")) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
