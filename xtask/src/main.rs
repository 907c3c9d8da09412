//! Project tasks: `cargo xtask <command>`.
//!
//! * `fixtures [--python PY] [GROUP...]` rebuilds the reference fixtures under tests/fixtures
//!   with the pinned Python reference libraries (xtask/fixtures/requirements.txt).
//! * `vocab [--python PY]` regenerates assets/clip-tokenizer from open-clip-torch's vocabulary.
//! * `bench [unet|vae|text|blip2|generate|train-step|load]... [--repeat N] [--steps N] [--torch PY]`
//!   times full-size SD 1.5 / ViT-g work with random weights through the release `personalize`,
//!   with peak memory, optionally against PyTorch (see `bench.rs`).

mod bench;
mod e2e;
mod fetch;
mod tiny;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

fn root() -> PathBuf {
    // The workspace root: xtask's parent folder.
    let xtask = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().map_or_else(|| xtask.join(".."), PathBuf::from)
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: cargo xtask <command>\n\n\
         commands:\n  \
         fixtures [--python PY] [GROUP...]  rebuild tests/fixtures with the reference libraries\n  \
         vocab [--python PY]                rebuild assets/clip-tokenizer from open-clip-torch\n  \
         e2e [--release | --exe PATH]       the README's main job on the bundled tiny models, checked\n  \
         tiny-model                         rebuild assets/tiny-sd, assets/tiny-blip2, assets/examples (fixed seed)\n  \
         fetch <preset|owner/name>... [--revision R] [--fp16] [--offline]  download weights into the HF cache\n  \
         {bench}\n\n\
         PY defaults to $PERSONALIZE_PYTHON or python3; it needs the packages of\n\
         xtask/fixtures/requirements.txt (pip install -r xtask/fixtures/requirements.txt).",
        bench = bench::USAGE
    );
    ExitCode::from(2)
}

/// Splits `--python PY` out of the arguments.
fn python_and_rest(args: &[String]) -> Result<(String, Vec<String>), String> {
    let mut py = std::env::var("PERSONALIZE_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--python" {
            py = it.next().ok_or("--python needs a path")?.clone();
        } else {
            rest.push(a.clone());
        }
    }
    Ok((py, rest))
}

fn run_python(py: &str, script: &str, args: &[String]) -> ExitCode {
    let script = root().join("xtask/fixtures").join(script);
    match Command::new(py).arg(&script).args(args).current_dir(root()).status() {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => {
            eprintln!("error: {} {} failed ({s})", py, script.display());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: cannot run {py}: {e} (pass --python PATH or set PERSONALIZE_PYTHON)");
            ExitCode::FAILURE
        }
    }
}

/// Builds the CLI (the test profile by default: after `cargo test` most of it is built), or
/// takes `--exe PATH` as built, then runs [`e2e::run`] in target/e2e, kept for inspection.
fn run_e2e(args: &[String]) -> ExitCode {
    let exe = match args {
        [a, path] if a == "--exe" => PathBuf::from(path),
        [] | [_] => {
            let release = match args.first().map(String::as_str) {
                None => false,
                Some("--release") => true,
                Some(other) => {
                    eprintln!("error: e2e: unknown option `{other}`; expected --release or --exe PATH");
                    return ExitCode::from(2);
                }
            };
            let profile = if release { "release" } else { "test" };
            let build = Command::new("cargo")
                .args(["build", "--profile", profile, "-p", "personalize-cli"])
                .current_dir(root())
                .status();
            if !build.is_ok_and(|s| s.success()) {
                eprintln!("error: building personalize-cli ({profile} profile) failed");
                return ExitCode::FAILURE;
            }
            root().join("target").join(if release { "release" } else { "debug" }).join("personalize")
        }
        _ => {
            eprintln!("error: e2e takes --release or --exe PATH");
            return ExitCode::from(2);
        }
    };
    if !exe.is_file() {
        eprintln!("error: e2e: {} is not a built `personalize` binary", exe.display());
        return ExitCode::FAILURE;
    }
    let work = root().join("target/e2e");
    let _ = std::fs::remove_dir_all(&work);
    let result =
        std::fs::create_dir_all(&work).map_err(anyhow::Error::from).and_then(|()| e2e::run(&root(), &exe, &work));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: e2e: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else { return usage() };
    let (py, rest) = match python_and_rest(&args[1..]) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match cmd.as_str() {
        "fixtures" => run_python(&py, "make_fixtures.py", &rest),
        "bench" => bench::run(&rest),
        "fetch" => fetch::run(&rest),
        "e2e" => run_e2e(&rest),
        "tiny-model" => match tiny::write(&root(), &root().join("assets")) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        "vocab" => run_python(&py, "clip_vocab.py", &[root().join("assets/clip-tokenizer").display().to_string()]),
        "-h" | "--help" | "help" => {
            usage();
            ExitCode::SUCCESS
        }
        other => {
            eprintln!("error: unknown xtask command `{other}`");
            usage()
        }
    }
}
