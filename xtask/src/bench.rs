//! `cargo xtask bench`: full-size SD 1.5 and ViT-g work with random weights through the release
//! `personalize` binary, optionally against the same work in PyTorch (`--torch PYTHON`, which
//! runs `xtask/bench/torch_bench.py`).
//!
//! What each bench measures (ours and PyTorch alike; all cores; f32, or bf16 with `--dtype
//! bf16` for all but train-step and load):
//!
//! * `unet`: one UNet forward, batch 2 (guidance's two branches), latents 4×64×64, timestep
//!   981, context 85×768 (77 text + 8 visual tokens).
//! * `vae`: one VAE decode of a `[1, 4, 64, 64]` latent (a 512×512 image).
//! * `text`: the CLIP text encoder on `[2, 77]` token ids.
//! * `blip2`: ViT-g + Q-Former (+ query tokens) on one 224×224 image; no language model.
//! * `train-step`: one training step at 512×512, batch 1: aligner on 8 of 32 random queries,
//!   UNet with LoRA rank 4 on `to_q`, `to_k`, `to_v`, `to_out.0`, epsilon MSE, AdamW.
//! * `train-step-xl`: the same step on SDXL base 1.0's UNet at 1024×1024 (128² latents), its
//!   context 77 + 8 tokens of 2048, with random pooled `text_embeds` and 1024² time ids.
//! * `generate`: whole generations of one 512×512 image, guidance 7.5 (one UNet batch of 2 per
//!   step), SD 1.5's PNDM scheduler, `--steps` steps (4 by default), text encoder and VAE
//!   decode included; the per-step median (steps after the first) is reported as well.
//! * `load`: loading a 3.44 GB f32 SD 1.5 UNet checkpoint (random weights, diffusers layout,
//!   written once under `target/bench-data/`), each load in a fresh process after a warm-up
//!   one; the time of the load itself and the process's peak memory right after it, also as a
//!   ratio to the file size (goal: at most 1.2).
//! * `gemm`: the linear layers' GEMM alone (`cpu_kernels::linear` against `F.linear`) on the
//!   UNet's and ViT-g's shapes ([`GEMM_SHAPES`]), GFLOP/s per shape; the row's time is the
//!   sum over the shapes.
//!
//! The forward benches and `train-step` time `--repeat` runs after one warm-up run and report the
//! median; `generate` times `--repeat` generations with no warm-up generation (its first step
//! warms up). Peak memory is the process's peak resident set (Linux `VmHWM`, Python's
//! `ru_maxrss`), which for PyTorch includes its libraries (printed by the script).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use crate::root;

/// Every bench, and those run when none is named.
pub const BENCHES: &[&str] =
    &["unet", "unet-xl", "vae", "text", "blip2", "generate", "train-step", "train-step-xl", "load", "gemm"];

/// The `gemm` bench's shapes, `MxKxN` (rows, inputs, outputs), with what they stand for: the
/// UNet at 64² latents, batch 2 (8192 tokens at the top level, 128 at the bottom), its 3×3
/// convolutions as im2col GEMMs, and BLIP-2's ViT-g MLP on one image (257 tokens).
const GEMM_SHAPES: &[(&str, &str)] = &[
    ("8192x320x320", "UNet attention projection, 64²"),
    ("8192x320x2560", "UNet GEGLU in, 64²"),
    ("8192x1280x320", "UNet feed-forward out, 64²"),
    ("8192x2880x320", "UNet 3×3 conv 320→320, 64²"),
    ("128x11520x1280", "UNet 3×3 conv 1280→1280, 8²"),
    ("257x1408x6144", "ViT-g MLP in"),
    ("257x6144x1408", "ViT-g MLP out"),
    ("1024x1024x1024", "square"),
];
const DEFAULT_BENCHES: &[&str] = &["unet", "vae", "text", "blip2"];

/// Time full-size SD 1.5 / ViT-g work with random weights through the release `personalize`:
/// the median of N runs after a warm-up, and peak memory; optionally the same work in PyTorch
/// and the ratio ours / PyTorch.
#[derive(Debug, PartialEq, clap::Args)]
pub struct BenchArgs {
    /// The benches to run (default: unet vae text blip2). `load` writes a 3.44 GB checkpoint
    /// once, under target/bench-data.
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(BENCHES))]
    pub names: Vec<String>,
    /// Timed runs (default 3; 1 for generate and train-step).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub repeat: Option<u64>,
    /// The denoising steps of `generate`.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    pub steps: u64,
    /// Run the same work in PyTorch with this Python (numpy, torch, diffusers, transformers;
    /// peft for a LoRA train-step) and print the ratios.
    #[arg(long, value_name = "PYTHON")]
    pub torch: Option<String>,
    /// The float type of the forward benches (unet, vae, text, blip2), generate and gemm, ours
    /// (`personalize --dtype`) and PyTorch's (the models and inputs `.to(torch.bfloat16)`)
    /// alike.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub dtype: String,
    /// The image side of train-step and train-step-xl (default 512 and 1024): SDXL's 1024² LoRA
    /// step needs more than 24 GB, even with --checkpointing.
    #[arg(long, value_parser = clap::value_parser!(u64).range(64..=4096))]
    pub resolution: Option<u64>,
    /// train-step and train-step-xl: gradient checkpointing on both sides (ours: Burn's
    /// balanced checkpointing; PyTorch: `enable_gradient_checkpointing`).
    #[arg(long)]
    pub checkpointing: bool,
}

impl BenchArgs {
    /// The benches to run, each once, in the order given.
    fn benches(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for n in &self.names {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        if names.is_empty() {
            names = DEFAULT_BENCHES.iter().map(|s| s.to_string()).collect();
        }
        names
    }
}

/// Timed runs of `name` when `--repeat` is not given.
fn default_repeat(name: &str) -> u64 {
    if matches!(name, "generate" | "train-step" | "train-step-xl") {
        1
    } else {
        3
    }
}

/// A median time and a peak memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    pub median_s: f64,
    pub peak_mib: Option<f64>,
}

/// The `key=value` fields of a summary line (`unet: load_s=1.2 ... median_s=0.5 peak_mib=900.0`).
pub fn fields(line: &str) -> BTreeMap<&str, &str> {
    line.split_whitespace().filter_map(|t| t.split_once('=')).collect()
}

/// The last summary line of ours that starts with `prefix:`, as a measurement of `time_key`
/// and `peak_key`, with all its fields.
pub fn ours_result(
    lines: &[String],
    prefix: &str,
    time_key: &str,
    peak_key: &str,
) -> Option<(Measured, BTreeMap<String, String>)> {
    let line = lines.iter().rev().find(|l| l.starts_with(&format!("{prefix}: ")))?;
    let f = fields(line);
    let median_s = f.get(time_key)?.parse().ok()?;
    let peak_mib = f.get(peak_key).and_then(|v| v.parse().ok());
    Some((Measured { median_s, peak_mib }, f.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()))
}

/// PyTorch's `RESULT name median_s peak_mib` line for `name`.
pub fn torch_result(stdout: &str, name: &str) -> Option<Measured> {
    stdout.lines().rev().find_map(|l| {
        let t: Vec<&str> = l.split_whitespace().collect();
        match t.as_slice() {
            ["RESULT", n, s, p] if *n == name => Some(Measured { median_s: s.parse().ok()?, peak_mib: p.parse().ok() }),
            _ => None,
        }
    })
}

/// `ours / torch` with two decimals and an `x`, or `-`.
pub fn ratio(ours: Option<f64>, torch: Option<f64>) -> String {
    match (ours, torch) {
        (Some(o), Some(t)) if t > 0.0 && o.is_finite() => format!("{:.2}x", o / t),
        _ => "-".into(),
    }
}

/// One table row.
#[derive(Debug, Default)]
pub struct Row {
    pub bench: String,
    pub ours: Option<Measured>,
    pub torch: Option<Measured>,
    /// Lines printed under the table.
    pub notes: Vec<String>,
}

fn secs(m: Option<Measured>) -> String {
    m.map_or("-".into(), |m| format!("{:.3} s", m.median_s))
}

fn peak(m: Option<Measured>) -> String {
    m.and_then(|m| m.peak_mib).map_or("-".into(), |p| format!("{p:.0} MiB"))
}

/// The results table: bench, ours median, torch median, ratio, ours peak, torch peak; then the
/// rows' notes.
pub fn table(rows: &[Row]) -> String {
    let mut cells =
        vec![["bench", "ours median", "torch median", "ours/torch", "ours peak", "torch peak"].map(String::from)];
    for r in rows {
        cells.push([
            r.bench.clone(),
            secs(r.ours),
            secs(r.torch),
            ratio(r.ours.map(|m| m.median_s), r.torch.map(|m| m.median_s)),
            peak(r.ours),
            peak(r.torch),
        ]);
    }
    let widths: Vec<usize> = (0..6).map(|i| cells.iter().map(|c| c[i].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for c in &cells {
        let line: Vec<String> = c
            .iter()
            .enumerate()
            .map(|(i, s)| if i == 0 { format!("{s:<w$}", w = widths[i]) } else { format!("{s:>w$}", w = widths[i]) })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    for r in rows {
        for n in &r.notes {
            out.push_str(&format!("{}: {n}\n", r.bench));
        }
    }
    out
}

/// A stage input: f32 or i64 values with a shape.
enum HostTensor {
    F32(Vec<usize>, Vec<f32>),
    I64(Vec<usize>, Vec<i64>),
}

impl HostTensor {
    fn f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        HostTensor::F32(shape, data)
    }

    fn i64(shape: Vec<usize>, data: Vec<i64>) -> Self {
        HostTensor::I64(shape, data)
    }
}

/// Writes the inputs of a stage run as a safetensors file.
fn write_tensors(path: &Path, tensors: Vec<(&str, HostTensor)>) -> Result<(), String> {
    use safetensors::{tensor::TensorView, Dtype};
    let raw: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, t)| match t {
            HostTensor::F32(shape, d) => (name, Dtype::F32, shape, d.iter().flat_map(|v| v.to_le_bytes()).collect()),
            HostTensor::I64(shape, d) => (name, Dtype::I64, shape, d.iter().flat_map(|v| v.to_le_bytes()).collect()),
        })
        .collect();
    let views = raw
        .iter()
        .map(|(name, dtype, shape, data)| Ok((*name, TensorView::new(*dtype, shape.clone(), data)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| e.to_string())?;
    safetensors::serialize_to_file(views, None, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// A cheap deterministic `[-1, 1)` tensor: inputs only need to be non-trivial.
fn uniform(shape: Vec<usize>, seed: u64) -> HostTensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let data = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    HostTensor::f32(shape, data)
}

/// A stage bench: the stage, its config folder, and its named inputs.
type StageCase = (&'static str, &'static str, Vec<(&'static str, HostTensor)>);

/// A stage bench: the stage, its config folder, and its inputs (SD 1.5 at 512×512).
fn stage_case(name: &str) -> Option<StageCase> {
    Some(match name {
        // Batch 2 (conditional + unconditional), 64×64 latents, 77 text + 8 visual tokens.
        "unet" => (
            "unet",
            "sd15-unet",
            vec![
                ("sample", uniform(vec![2, 4, 64, 64], 1)),
                ("timestep", HostTensor::f32(vec![2], vec![981.0, 981.0])),
                ("encoder_hidden_states", uniform(vec![2, 85, 768], 2)),
            ],
        ),
        // SDXL base 1.0's UNet at 1024² (128² latents), batch 2, 77 text + 8 visual tokens of
        // width 2048, pooled text_embeds and time ids as the pipeline makes them.
        "unet-xl" => (
            "unet",
            "sdxl-unet",
            vec![
                ("sample", uniform(vec![2, 4, 128, 128], 7)),
                ("timestep", HostTensor::f32(vec![2], vec![981.0, 981.0])),
                ("encoder_hidden_states", uniform(vec![2, 85, 2048], 8)),
                ("text_embeds", uniform(vec![2, 1280], 9)),
                ("time_ids", HostTensor::f32(vec![2, 6], [1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0].repeat(2))),
            ],
        ),
        "vae" => ("vae-decode", "sd15-vae", vec![("latent", uniform(vec![1, 4, 64, 64], 3))]),
        // One 224×224 image through ViT-g and the Q-Former (blip2-opt-2.7b's config).
        "blip2" => ("blip2", "blip2-vitg", vec![("pixel_values", uniform(vec![1, 3, 224, 224], 4))]),
        // The same ids as torch_bench.py's text_ids.
        "text" => (
            "text-encoder",
            "sd15-text",
            vec![(
                "input_ids",
                HostTensor::i64(
                    vec![2, 77],
                    (0..154).map(|i| if i % 77 == 0 { 49406 } else { 320 + i as i64 % 1000 }).collect(),
                ),
            )],
        ),
        _ => return None,
    })
}

/// Runs `cmd`, echoing its stderr as it comes, and returns the stderr lines.
fn run_ours(mut cmd: Command, what: &str) -> Result<Vec<String>, String> {
    let mut child = cmd.stderr(Stdio::piped()).spawn().map_err(|e| format!("{what}: cannot start: {e}"))?;
    let mut lines = Vec::new();
    for line in BufReader::new(child.stderr.take().expect("piped")).lines().map_while(Result::ok) {
        eprintln!("{line}");
        lines.push(line);
    }
    match child.wait() {
        Ok(s) if s.success() => Ok(lines),
        Ok(s) => Err(format!("{what} failed ({s})")),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// torch_bench.py's exit status when the Python lacks a package.
const MISSING_PACKAGE: i32 = 3;

fn torch_script() -> PathBuf {
    root().join("xtask/bench/torch_bench.py")
}

/// Runs the PyTorch side of `name`, echoing its output, and returns its stdout.
fn run_torch(py: &str, name: &str, args: &[String]) -> Result<String, String> {
    if name != "check" {
        eprintln!("torch {name}: {py} xtask/bench/torch_bench.py {name} {}", args.join(" "));
    }
    let mut child = Command::new(py)
        .arg(torch_script())
        .arg(name)
        .args(args)
        .current_dir(root())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {py}: {e}"))?;
    let mut out = String::new();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines().map_while(Result::ok) {
        eprintln!("{line}");
        out.push_str(&line);
        out.push('\n');
    }
    match child.wait() {
        Ok(s) if s.success() => Ok(out),
        // A missing package: the script has said which, in one line.
        Ok(s) if s.code() == Some(MISSING_PACKAGE) => Err(String::new()),
        Ok(s) => Err(format!("torch {name} failed ({s})")),
        Err(e) => Err(format!("torch {name}: {e}")),
    }
}

/// The `INFO name key=value` lines of the PyTorch side, as notes.
fn torch_notes(stdout: &str) -> Vec<String> {
    stdout.lines().filter_map(|l| l.strip_prefix("INFO ")).map(|l| format!("torch {l}")).collect()
}

/// The checkpoint of the `load` bench, written once by the bench example's `write-unet`.
fn load_checkpoint(benches: &Path) -> Result<(PathBuf, u64), String> {
    let dir = root().join("target/bench-data/sd15-unet-random");
    let file = dir.join("diffusion_pytorch_model.safetensors");
    if !file.is_file() {
        eprintln!("bench load: writing {} (3.44 GB, once)", file.display());
        let status = Command::new(benches)
            .arg("write-unet")
            .arg("--unet-config")
            .arg(root().join("xtask/configs/sd15-unet"))
            .arg("--out")
            .arg(&dir)
            .status();
        if !status.is_ok_and(|s| s.success()) {
            return Err("writing the load checkpoint failed".into());
        }
    }
    let size = std::fs::metadata(&file).map_err(|e| format!("{}: {e}", file.display()))?.len();
    Ok((dir, size))
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// Ours and (with `torch`) PyTorch for one bench.
/// `exe`: the release `personalize`; `benches`: the release bench example (generate,
/// train-step, write-unet).
fn run_one(name: &str, exe: &Path, benches: &Path, tmp: &Path, a: &BenchArgs) -> Result<Row, String> {
    let repeat = a.repeat.unwrap_or_else(|| default_repeat(name));
    let configs = root().join("xtask/configs");
    let mut row = Row { bench: name.to_string(), ..Default::default() };
    let mut torch_args = vec!["--repeat".to_string(), repeat.to_string()];
    if a.dtype != "f32" && matches!(name, "train-step" | "train-step-xl" | "load") {
        return Err(format!(
            "bench {name}: --dtype {} is for the forward benches, generate and gemm; {name} runs in f32",
            a.dtype
        ));
    }
    match name {
        "train-step" | "train-step-xl" => {
            let (config, res) = if name == "train-step" { ("sd15-unet", 512) } else { ("sdxl-unet", 1024) };
            let res = a.resolution.unwrap_or(res);
            if !res.is_multiple_of(8) {
                return Err(format!("bench {name}: --resolution {res} is not a multiple of the VAE factor 8"));
            }
            torch_args.extend(["--size".to_string(), res.to_string()]);
            eprintln!("bench {name}: {config}, LoRA rank 4, {res}x{res}, batch 1, random weights, {repeat} step(s) after a warm-up");
            let mut cmd = Command::new(benches);
            cmd.arg("train-step").arg("--unet-config").arg(configs.join(config)).args([
                "--resolution",
                &res.to_string(),
                "--steps",
                &repeat.to_string(),
            ]);
            if a.checkpointing {
                cmd.arg("--checkpointing");
                torch_args.push("--checkpointing".to_string());
            }
            let lines = run_ours(cmd, &format!("bench {name}"))?;
            let (m, _) = ours_result(&lines, "train-step", "median_s", "peak_mib")
                .ok_or_else(|| format!("bench {name} printed no summary line"))?;
            row.ours = Some(m);
            if name == "train-step-xl" {
                torch_args.extend(["--unet-config".to_string(), configs.join(config).display().to_string()]);
            }
        }
        "generate" => {
            eprintln!("bench generate: SD 1.5 configs, 512x512, {}, {} steps, guidance 7.5, random weights, {repeat} generation(s)", a.dtype, a.steps);
            let mut cmd = Command::new(benches);
            cmd.arg("generate")
                .arg("--unet")
                .arg(configs.join("sd15-unet"))
                .arg("--vae")
                .arg(configs.join("sd15-vae"))
                .arg("--text-encoder")
                .arg(configs.join("sd15-text"))
                .arg("--scheduler")
                .arg(configs.join("sd15-scheduler"))
                .arg("--tokenizer")
                .arg(root().join("crates/clip-text/vocab"))
                .args(["--steps", &a.steps.to_string(), "--repeat", &repeat.to_string(), "--dtype", &a.dtype]);
            let lines = run_ours(cmd, "bench generate")?;
            let (m, f) = ours_result(&lines, "generate", "median_s", "peak_mib")
                .ok_or("bench generate printed no summary line")?;
            row.ours = Some(m);
            let get = |k: &str| f.get(k).cloned().unwrap_or_else(|| "-".into());
            row.notes.push(format!(
                "ours: per step {} s (median of steps 2..), first step {} s, decode {} s",
                get("step_median_s"),
                get("first_step_s"),
                get("decode_s")
            ));
            torch_args.extend(["--steps".to_string(), a.steps.to_string(), "--dtype".to_string(), a.dtype.clone()]);
        }
        "gemm" => {
            let shapes = GEMM_SHAPES.iter().map(|(s, _)| *s).collect::<Vec<_>>().join(",");
            eprintln!(
                "bench gemm: linear layers' GEMM alone, {}, {} shapes, {repeat} run(s) each after a warm-up",
                a.dtype,
                GEMM_SHAPES.len()
            );
            let mut cmd = Command::new(benches);
            cmd.args(["gemm", "--shapes", &shapes, "--dtype", &a.dtype, "--repeat", &repeat.to_string()]);
            let lines = run_ours(cmd, "bench gemm")?;
            let (m, _) =
                ours_result(&lines, "gemm", "median_s", "peak_mib").ok_or("bench gemm printed no summary line")?;
            row.ours = Some(m);
            for (shape, what) in GEMM_SHAPES {
                let line = lines.iter().find(|l| l.starts_with(&format!("gemm {shape}: ")));
                let gflops = line.and_then(|l| fields(l).get("gflops").map(|g| g.to_string()));
                row.notes.push(format!("ours {shape} ({what}): {} GFLOP/s", gflops.as_deref().unwrap_or("-")));
            }
            torch_args.extend(["--shapes".to_string(), shapes, "--dtype".to_string(), a.dtype.clone()]);
        }
        "load" => {
            let (dir, size) = load_checkpoint(benches)?;
            let input = tmp.join("load-in.safetensors");
            let tensors = vec![
                ("sample", uniform(vec![1, 4, 8, 8], 5)),
                ("timestep", HostTensor::f32(vec![1], vec![981.0])),
                ("encoder_hidden_states", uniform(vec![1, 1, 768], 6)),
            ];
            write_tensors(&input, tensors)?;
            eprintln!(
                "bench load: {} ({:.2} GB), {repeat} load(s) in fresh processes after a warm-up one",
                dir.display(),
                size as f64 / 1e9
            );
            let (mut times, mut peaks) = (vec![], vec![]);
            for i in 0..=repeat {
                let mut cmd = Command::new(exe);
                cmd.args(["stage", "unet", "--repeat", "2", "--model"])
                    .arg(&dir)
                    .arg("--input")
                    .arg(&input)
                    .arg("--output")
                    .arg(tmp.join("load-out.safetensors"));
                let lines = run_ours(cmd, "bench load")?;
                let (m, _) = ours_result(&lines, "unet", "load_s", "load_peak_mib")
                    .ok_or("bench load: the stage printed no summary line")?;
                if i > 0 {
                    times.push(m.median_s);
                    peaks.extend(m.peak_mib);
                }
            }
            let m = Measured { median_s: median(times).unwrap_or(f64::NAN), peak_mib: median(peaks) };
            let file_mib = size as f64 / (1u64 << 20) as f64;
            row.ours = Some(m);
            row.notes.push(format!(
                "checkpoint {file_mib:.0} MiB; ours peak / file size {} (goal <= 1.2)",
                m.peak_mib.map_or("-".into(), |p| format!("{:.3}", p / file_mib))
            ));
            torch_args.extend(["--unet-dir".to_string(), dir.display().to_string()]);
        }
        _ => {
            let (stage, cfg, inputs) = stage_case(name).expect("clap checked the name");
            let input = tmp.join(format!("{name}-in.safetensors"));
            write_tensors(&input, inputs)?;
            eprintln!("bench {name}: {stage} of {cfg}, {}, random weights, {repeat} run(s) after a warm-up", a.dtype);
            let mut cmd = Command::new(exe);
            cmd.args(["--dtype", &a.dtype]);
            torch_args.extend(["--dtype".to_string(), a.dtype.clone()]);
            cmd.args(["stage", stage, "--random-weights", "--repeat", &(repeat + 1).to_string(), "--model"])
                .arg(configs.join(cfg))
                .arg("--input")
                .arg(&input)
                .arg("--output")
                .arg(tmp.join(format!("{name}-out.safetensors")));
            let lines = run_ours(cmd, &format!("bench {name}"))?;
            let (m, _) = ours_result(&lines, stage, "median_s", "peak_mib")
                .ok_or_else(|| format!("bench {name}: no summary line"))?;
            row.ours = Some(m);
        }
    }
    if let Some(py) = &a.torch {
        let out = run_torch(py, name, &torch_args)?;
        row.torch = Some(torch_result(&out, name).ok_or_else(|| format!("torch {name} printed no RESULT line"))?);
        row.notes.extend(torch_notes(&out));
    }
    Ok(row)
}

/// `cargo xtask bench ...`.
pub fn run(a: &BenchArgs) -> ExitCode {
    if let Some(py) = &a.torch {
        // Fail before the long Rust work if the Python lacks a package (the script names it).
        if let Err(e) = run_torch(py, "check", &[]) {
            if !e.is_empty() {
                eprintln!("error: {e}");
            }
            return ExitCode::FAILURE;
        }
    }
    let tmp = std::env::temp_dir().join(format!("personalize-bench-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&tmp) {
        eprintln!("error: {}: {e}", tmp.display());
        return ExitCode::FAILURE;
    }
    if !crate::cargo(&["build", "--release", "-p", "personalize-cli", "--bins", "--example", "bench"]) {
        eprintln!("error: release build of personalize-cli failed");
        return ExitCode::FAILURE;
    }
    let exe = root().join("target/release/personalize");
    let benches = root().join("target/release/examples/bench");
    let mut rows = Vec::new();
    let mut failed = None;
    for name in &a.benches() {
        match run_one(name, &exe, &benches, &tmp, a) {
            Ok(r) => rows.push(r),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    if !rows.is_empty() {
        println!("\n{}", table(&rows));
    }
    match failed {
        Some(e) => {
            if !e.is_empty() {
                eprintln!("error: {e}");
            }
            ExitCode::FAILURE
        }
        None => ExitCode::SUCCESS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<BenchArgs, clap::Error> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        let args = std::iter::once("bench").chain(s.split_whitespace());
        <Cli as clap::Parser>::try_parse_from(args).map(|c| c.bench)
    }

    #[test]
    fn parses_names_flags_and_defaults() {
        let a = parse("generate --steps 2 unet --repeat 5 --torch /venv/bin/python unet").unwrap();
        assert_eq!(a.benches(), ["generate", "unet"]);
        assert_eq!((a.repeat, a.steps, a.torch.as_deref()), (Some(5), 2, Some("/venv/bin/python")));
        let a = parse("").unwrap();
        assert_eq!(a.benches(), ["unet", "vae", "text", "blip2"]);
        assert_eq!((a.repeat, a.steps, a.torch, a.dtype.as_str()), (None, 4, None, "f32"));
        assert_eq!(parse("unet --dtype bf16").unwrap().dtype, "bf16");
        let a = parse("train-step-xl --resolution 512").unwrap();
        assert_eq!((a.benches(), a.resolution), (vec!["train-step-xl".to_string()], Some(512)));
        assert_eq!(default_repeat("train-step-xl"), 1);
        assert_eq!(
            (default_repeat("unet"), default_repeat("load"), default_repeat("generate"), default_repeat("train-step")),
            (3, 3, 1, 1)
        );
        for (bad, needle) in [
            ("unett", "unett"),
            ("--repeat", "--repeat"),
            ("--repeat 0", "0"),
            ("--steps x", "x"),
            ("--torch", "--torch"),
            ("--python p", "--python"),
            ("--dtype f16", "f16"),
            ("--resolution 8", "8"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn every_stage_bench_has_a_case_and_config() {
        for name in ["unet", "vae", "text", "blip2"] {
            let (_, cfg, inputs) = stage_case(name).unwrap();
            assert!(root().join("xtask/configs").join(cfg).join("config.json").is_file(), "{cfg}");
            assert!(!inputs.is_empty());
        }
        assert!(stage_case("generate").is_none());
        assert!(root().join("xtask/configs/sd15-scheduler/scheduler_config.json").is_file());
        assert!(torch_script().is_file());
    }

    #[test]
    fn reads_our_summary_lines_and_torch_result_lines() {
        let lines: Vec<String> = [
            "bench generate: 512x512, 4 steps",
            "unet: load_s=1.500 load_peak_mib=3300.5 warmup=1 runs=3 median_s=12.3456 min_s=12.0000 peak_mib=5000.0",
            "generate: load_s=2.000 load_peak_mib=- warmup=0 runs=1 steps=4 median_s=100.0 min_s=100.0 step_median_s=20.5 peak_mib=-",
        ]
        .map(String::from)
        .to_vec();
        let (m, f) = ours_result(&lines, "unet", "median_s", "peak_mib").unwrap();
        assert_eq!(m, Measured { median_s: 12.3456, peak_mib: Some(5000.0) });
        assert_eq!(f["runs"], "3");
        let (m, _) = ours_result(&lines, "unet", "load_s", "load_peak_mib").unwrap();
        assert_eq!(m, Measured { median_s: 1.5, peak_mib: Some(3300.5) });
        let (m, f) = ours_result(&lines, "generate", "median_s", "peak_mib").unwrap();
        assert_eq!((m.median_s, m.peak_mib, f["step_median_s"].as_str()), (100.0, None, "20.5"));
        assert!(ours_result(&lines, "vae-decode", "median_s", "peak_mib").is_none());
        assert!(ours_result(&lines, "bench generate", "median_s", "peak_mib").is_none(), "no median_s field");

        let out = "INFO unet what=x\nRESULT unet 10.0000 4800.5\nRESULT vae 1.5 nan-ish\n";
        assert_eq!(torch_result(out, "unet"), Some(Measured { median_s: 10.0, peak_mib: Some(4800.5) }));
        assert_eq!(torch_result(out, "vae"), Some(Measured { median_s: 1.5, peak_mib: None }));
        assert_eq!(torch_result(out, "text"), None);
        assert_eq!(torch_result("RESULT unet x 1\n", "unet"), None);
        assert_eq!(torch_notes(out), ["torch unet what=x"]);
    }

    #[test]
    fn formats_ratios_and_the_table() {
        assert_eq!(ratio(Some(12.3456), Some(10.0)), "1.23x");
        assert_eq!(ratio(Some(1.0), Some(4.0)), "0.25x");
        assert_eq!(ratio(Some(1.0), None), "-");
        assert_eq!(ratio(Some(1.0), Some(0.0)), "-");
        let rows = [
            Row {
                bench: "unet".into(),
                ours: Some(Measured { median_s: 12.3456, peak_mib: Some(5000.4) }),
                torch: Some(Measured { median_s: 10.0, peak_mib: Some(4800.0) }),
                notes: vec!["torch unet what=x".into()],
            },
            Row {
                bench: "train-step".into(),
                ours: Some(Measured { median_s: 50.0, peak_mib: None }),
                ..Default::default()
            },
        ];
        let t = table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        let cols =
            |l: &str| l.split("  ").map(str::trim).filter(|c| !c.is_empty()).map(String::from).collect::<Vec<_>>();
        assert_eq!(cols(lines[0]), ["bench", "ours median", "torch median", "ours/torch", "ours peak", "torch peak"]);
        assert_eq!(cols(lines[1]), ["unet", "12.346 s", "10.000 s", "1.23x", "5000 MiB", "4800 MiB"]);
        assert_eq!(cols(lines[2]), ["train-step", "50.000 s", "-", "-", "-", "-"]);
        assert_eq!(lines[3], "unet: torch unet what=x");
        // Columns line up: every row has the header's width.
        assert_eq!(lines[0].len(), lines[1].len());
    }
}
