//! `cargo xtask fetch <preset|repo-id>... [--revision R] [--fp16] [--offline]`: downloads the
//! files the pipeline reads into the Hugging Face cache (see crates/hub) and prints each
//! snapshot folder on stdout, for `--base` / `--blip2`.

use std::process::ExitCode;

fn usage() -> ExitCode {
    let presets: String =
        hub::PRESETS.iter().map(|p| format!("\n  {:16} {}  ({})", p.name, p.repo_id, p.about)).collect();
    eprintln!(
        "usage: cargo xtask fetch <preset|owner/name>... [--revision R] [--fp16] [--offline]\n\n\
         presets:{presets}\n\n\
         --revision R  branch, tag or commit (default main)\n  \
         --fp16        take the .fp16.safetensors weights of a Stable Diffusion pipeline\n  \
         --offline     use the cache only (also HF_HUB_OFFLINE=1)\n\n\
         The cache is Python's: HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub.\n\
         HF_TOKEN (or the token file in HF_HOME) and HF_ENDPOINT are honoured."
    );
    ExitCode::from(2)
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

pub fn run(args: &[String]) -> ExitCode {
    let mut opts = match hub::FetchOptions::from_env() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut names = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--fp16" => opts.fp16 = true,
            "--offline" => opts.offline = true,
            "--revision" => match it.next() {
                Some(r) => opts.revision = r.clone(),
                None => {
                    eprintln!("error: --revision needs a branch, tag or commit");
                    return ExitCode::from(2);
                }
            },
            "-h" | "--help" => {
                usage();
                return ExitCode::SUCCESS;
            }
            flag if flag.starts_with('-') => {
                eprintln!("error: unknown option `{flag}` for fetch");
                return usage();
            }
            name => names.push(name.to_string()),
        }
    }
    if names.is_empty() {
        eprintln!("error: fetch needs a preset or a repo id");
        return usage();
    }
    for name in &names {
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
