//! Project tasks: `cargo xtask <command>` (`cargo xtask --help` lists them).
//!
//! xtask builds no model code: `e2e` and `bench` run the `personalize` binary, `tiny-model` the
//! `tiny-models` crate's binary, `fixtures` and `vocab` the pinned Python reference libraries
//! (xtask/fixtures/requirements.txt). So `cargo xtask fetch` compiles in seconds.

mod bench;
mod e2e;
mod fetch;
mod png_text;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use clap::{Parser, Subcommand};

fn root() -> PathBuf {
    // The workspace root: xtask's parent folder.
    let xtask = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().map_or_else(|| xtask.join(".."), PathBuf::from)
}

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "The project's tasks: fetch weights, run the end-to-end job, benchmarks, fixtures."
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

/// The Python with the reference libraries: `--python`, else $PERSONALIZE_PYTHON, else python3.
#[derive(clap::Args)]
struct Python {
    /// The Python interpreter (it needs the packages of xtask/fixtures/requirements.txt).
    #[arg(long, env = "PERSONALIZE_PYTHON", default_value = "python3")]
    python: String,
}

#[derive(Subcommand)]
enum Task {
    /// Download weights into the Hugging Face cache.
    Fetch(fetch::FetchArgs),
    /// The README's main job on the bundled tiny models (train, then generate), checked; its
    /// files are kept in target/e2e.
    E2e {
        /// Build and run the release binary (default: the test profile, mostly built by
        /// `cargo test`).
        #[arg(long, conflicts_with = "exe")]
        release: bool,
        /// Run this `personalize` binary as built.
        #[arg(long)]
        exe: Option<PathBuf>,
    },
    /// Time full-size SD 1.5 / ViT-g work (random weights) through the release binary, with peak
    /// memory, optionally against the same work in PyTorch (--torch).
    Bench(bench::BenchArgs),
    /// Rebuild tests/fixtures with the reference libraries.
    Fixtures {
        #[command(flatten)]
        python: Python,
        /// Fixture groups to rebuild (default: all).
        groups: Vec<String>,
    },
    /// Rebuild crates/clip-text/vocab from open-clip-torch's vocabulary.
    Vocab {
        #[command(flatten)]
        python: Python,
    },
    /// Rebuild assets/tiny-sd, assets/tiny-blip2 and assets/examples (fixed seed).
    TinyModel,
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
fn run_e2e(release: bool, exe: Option<PathBuf>) -> ExitCode {
    let exe = match exe {
        Some(p) => p,
        None => {
            let profile = if release { "release" } else { "test" };
            if !cargo(&["build", "--profile", profile, "-p", "personalize-cli"]) {
                eprintln!("error: building personalize-cli ({profile} profile) failed");
                return ExitCode::FAILURE;
            }
            root().join("target").join(if release { "release" } else { "debug" }).join("personalize")
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

/// Runs cargo in the workspace root; whether it succeeded.
fn cargo(args: &[&str]) -> bool {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(root())
        .status()
        .is_ok_and(|s| s.success())
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Task::Fetch(a) => fetch::run(&a),
        Task::E2e { release, exe } => run_e2e(release, exe),
        Task::Bench(a) => bench::run(&a),
        Task::Fixtures { python, groups } => run_python(&python.python, "make_fixtures.py", &groups),
        Task::Vocab { python } => {
            run_python(&python.python, "clip_vocab.py", &[root().join("crates/clip-text/vocab").display().to_string()])
        }
        Task::TinyModel => {
            let root = root().display().to_string();
            if cargo(&["run", "--release", "-q", "-p", "tiny-models", "--", &root]) {
                ExitCode::SUCCESS
            } else {
                eprintln!("error: tiny-models failed");
                ExitCode::FAILURE
            }
        }
    }
}
