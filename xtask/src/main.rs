//! Project tasks: `cargo xtask <command>`.
//!
//! * `fixtures [--python PY] [GROUP...]` rebuilds the reference fixtures under tests/fixtures
//!   with the pinned Python reference libraries (xtask/fixtures/requirements.txt).
//! * `vocab [--python PY]` regenerates assets/clip-tokenizer from open-clip-torch's vocabulary.
//! * `bench [unet|vae|text|blip2|train-step]... [--repeat N]` times full-size stages (SD 1.5, ViT-g) with random weights
//!   through the release `personalize stage --random-weights --repeat N`, with peak memory.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use model_io::tensor_file::{write_tensors, HostTensor};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: cargo xtask <command>\n\n\
         commands:\n  \
         fixtures [--python PY] [GROUP...]  rebuild tests/fixtures with the reference libraries\n  \
         vocab [--python PY]                rebuild assets/clip-tokenizer from open-clip-torch\n  \
         bench [unet|vae|text|blip2|train-step]... [--repeat N]  time full-size stages (random weights)\n\n\
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

/// One benchmark: the stage, its config folder, and its inputs (SD 1.5 at 512×512).
fn bench_case(name: &str) -> Option<(&'static str, &'static str, Vec<(&'static str, HostTensor)>)> {
    let randn = |shape: Vec<usize>, seed: u64| {
        // A cheap deterministic generator: inputs only need to be non-trivial.
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let data = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        HostTensor::f32(shape, data)
    };
    Some(match name {
        // Batch 2 (conditional + unconditional), 64×64 latents, 77 text + 8 visual tokens.
        "unet" => ("unet", "sd15-unet", vec![
            ("sample", randn(vec![2, 4, 64, 64], 1)),
            ("timestep", HostTensor::f32(vec![2], vec![981.0, 981.0])),
            ("encoder_hidden_states", randn(vec![2, 85, 768], 2)),
        ]),
        "vae" => ("vae-decode", "sd15-vae", vec![("latent", randn(vec![1, 4, 64, 64], 3))]),
        // One 224×224 image through ViT-g and the Q-Former (blip2-opt-2.7b's config).
        "blip2" => ("blip2", "blip2-vitg", vec![("pixel_values", randn(vec![1, 3, 224, 224], 4))]),
        "text" => ("text-encoder", "sd15-text", vec![(
            "input_ids",
            HostTensor::i64(vec![2, 77], (0..154).map(|i| if i % 77 == 0 { 49406 } else { 320 + i as i64 % 1000 }).collect()),
        )]),
        _ => return None,
    })
}

fn bench(args: &[String]) -> ExitCode {
    let mut repeat = "3".to_string();
    let mut names = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--repeat" {
            repeat = it.next().cloned().unwrap_or_else(|| "3".into());
        } else {
            names.push(a.clone());
        }
    }
    if names.is_empty() {
        names = vec!["unet".into(), "vae".into(), "text".into(), "blip2".into()];
    }
    let tmp = std::env::temp_dir().join(format!("personalize-bench-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&tmp) {
        eprintln!("error: {}: {e}", tmp.display());
        return ExitCode::FAILURE;
    }
    let build = Command::new("cargo").args(["build", "--release", "-p", "personalize-cli"]).current_dir(root()).status();
    if !build.is_ok_and(|s| s.success()) {
        eprintln!("error: release build of personalize-cli failed");
        return ExitCode::FAILURE;
    }
    let exe = root().join("target/release/personalize");
    for name in &names {
        if name == "train-step" {
            // SD 1.5 UNet, LoRA rank 4, 512×512, batch 1: one warm-up and one timed step.
            eprintln!("bench train-step: SD 1.5 UNet, LoRA rank 4, 512x512, batch 1, random weights");
            let status = Command::new(&exe).arg("bench-train-step").arg("--unet-config").arg(root().join("xtask/configs/sd15-unet")).status();
            if !status.is_ok_and(|s| s.success()) {
                eprintln!("error: bench train-step failed");
                return ExitCode::FAILURE;
            }
            continue;
        }
        let Some((stage, cfg, inputs)) = bench_case(name) else {
            eprintln!("error: unknown bench `{name}`; expected unet, vae, text, blip2 or train-step");
            return ExitCode::from(2);
        };
        let input = tmp.join(format!("{name}-in.safetensors"));
        let tensors = inputs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        if let Err(e) = write_tensors(&input, &tensors, &Default::default()) {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
        eprintln!("bench {name}: {stage} of {cfg}, random weights, {repeat} runs after loading");
        let status = Command::new(&exe)
            .args(["stage", stage, "--random-weights", "--repeat", &repeat, "--model"])
            .arg(root().join("xtask/configs").join(cfg))
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(tmp.join(format!("{name}-out.safetensors")))
            .status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("error: bench {name} failed");
            return ExitCode::FAILURE;
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    ExitCode::SUCCESS
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
        "bench" => bench(&rest),
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
