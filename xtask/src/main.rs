//! Project tasks: `cargo xtask <command>`.
//!
//! * `fixtures [--python PY] [GROUP...]` rebuilds the reference fixtures under tests/fixtures
//!   with the pinned Python reference libraries (xtask/fixtures/requirements.txt).
//! * `vocab [--python PY]` regenerates assets/clip-tokenizer from open-clip-torch's vocabulary.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: cargo xtask <command>\n\n\
         commands:\n  \
         fixtures [--python PY] [GROUP...]  rebuild tests/fixtures with the reference libraries\n  \
         vocab [--python PY]                rebuild assets/clip-tokenizer from open-clip-torch\n\n\
         PY defaults to $PERSONALIZE_PYTHON or python3; it needs the packages of\n\
         xtask/fixtures/requirements.txt (pip install -r xtask/fixtures/requirements.txt)."
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
