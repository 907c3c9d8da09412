//! `cargo xtask fetch <preset|repo-id>... [--revision R] [--fp16] [--offline]`: downloads the
//! files the pipeline reads into the Hugging Face cache (see crates/hub) and prints each
//! snapshot folder on stdout, for `--base` / `--blip2`.

use std::process::ExitCode;

/// The presets and the cache, for `cargo xtask fetch --help`.
fn after_help() -> String {
    let presets: String =
        hub::PRESETS.iter().map(|p| format!("\n  {:16} {}  ({})", p.name, p.repo_id, p.about)).collect();
    format!(
        "Presets:{presets}\n\n\
         The cache is Python's: HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub.\n\
         HF_TOKEN (or the token file in HF_HOME) and HF_ENDPOINT are honoured."
    )
}

/// Download the files the pipeline reads into the Hugging Face cache, and print each snapshot
/// folder on stdout (for `--base` / `--blip2`).
#[derive(Debug, clap::Args)]
#[command(after_help = after_help())]
pub struct FetchArgs {
    /// Presets or repo ids (owner/name).
    #[arg(required = true, value_name = "PRESET|OWNER/NAME")]
    names: Vec<String>,
    /// Branch, tag or commit (default: main).
    #[arg(long)]
    revision: Option<String>,
    /// Take the .fp16.safetensors weights of a Stable Diffusion pipeline.
    #[arg(long)]
    fp16: bool,
    /// Use the cache only (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    offline: bool,
}

fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

pub fn run(a: &FetchArgs) -> ExitCode {
    let mut opts = match hub::FetchOptions::from_env() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    opts.fp16 |= a.fp16;
    opts.offline |= a.offline;
    if let Some(r) = &a.revision {
        opts.revision = r.clone();
    }
    for name in &a.names {
        let f = match hub::fetch(name, &opts) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        let snap = &f.snapshot;
        let commit = &snap.commit[..snap.commit.len().min(12)];
        match &f.source {
            hub::Source::Network => eprintln!(
                "{name}: {} @ {commit}: {} file(s) downloaded ({}), {} already cached",
                snap.repo_id,
                f.downloaded.len(),
                human(f.bytes),
                snap.files.len() - f.downloaded.len()
            ),
            hub::Source::Offline => {
                eprintln!("{name}: {} @ {commit}: all {} file(s) cached (offline)", snap.repo_id, snap.files.len())
            }
            hub::Source::Unreachable(why) => {
                eprintln!(
                    "warning: cannot reach {} ({why}); using the cached {} @ {commit}",
                    opts.endpoint, snap.repo_id
                )
            }
        }
        let flag = match snap.layout {
            hub::Layout::Diffusers => "--base",
            hub::Layout::Blip2 => "--blip2",
        };
        eprintln!("{name}: pass `{flag} {name}` or `{flag} {}`", snap.dir.display());
        println!("{}", snap.dir.display());
    }
    ExitCode::SUCCESS
}
