//! The benchmarks `cargo xtask bench` runs besides the stage runner's `--repeat`, with random
//! weights built from the published configs: a whole generation (`generate`), one training
//! step (`train-step`), a full-size UNet checkpoint for the loading bench (`write-unet`), and
//! the linear layers' GEMM alone on given shapes (`gemm`, f32 or bf16).
//!
//! `cargo run --release -p personalize-cli --example bench -- generate --base sd15-configs`
//! (`--features cuda` for the GPU). Each prints one summary line on stderr, `NAME: key=value
//! ...`, in the form of the stage runner's `--repeat` summary, which `cargo xtask bench` parses.

// The binary's backend choice (burn-flex, or burn-cuda with `--features cuda`).
#[path = "../src/backend.rs"]
#[allow(dead_code, unused_imports)]
mod backend;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend as _;
use burn::tensor::{Tensor, TensorData};
use clap::Parser;
use personalize::memory::peak_rss_bytes;
use personalize::train::{Batch, Optimizer, TrainModel, UnetMode};
use personalize::{GenerateOptions, GenerateRequest, Pipeline, PipelineParts};
use scheduler::SeededRng;

use backend::{device, B};

#[derive(Parser)]
#[command(name = "bench", about = "Timings with random weights for `cargo xtask bench`.")]
enum Bench {
    /// Time whole generations with random weights from the component configs.
    Generate(GenerateBench),
    /// Time training steps of a full-size UNet from its config (random weights).
    TrainStep(TrainStepBench),
    /// Write a UNet with random weights, built from a config, as a diffusers folder.
    /// Time `cpu_kernels::linear` (y = x·wᵀ, PyTorch's `[out, in]` weight) on each shape.
    Gemm(GemmBench),
    WriteUnet {
        /// A folder with the UNet's config.json.
        #[arg(long)]
        unet_config: PathBuf,
        /// The folder to write (config.json, diffusion_pytorch_model.safetensors).
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let r = match Bench::parse() {
        Bench::Generate(a) => generate(&a),
        Bench::TrainStep(a) => train_step(&a),
        Bench::WriteUnet { unet_config, out } => write_unet(&unet_config, &out),
        Bench::Gemm(a) => gemm(&a),
    };
    match r {
        Ok(summary) => {
            eprintln!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Peak memory in MiB, or `-`.
fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("-".to_string(), |b| format!("{:.1}", b as f64 / (1u64 << 20) as f64))
}

/// `gemm` arguments.
#[derive(clap::Args)]
struct GemmBench {
    /// Comma-separated `MxKxN`: rows of x, inputs, outputs.
    #[arg(long)]
    shapes: String,
    /// f32, or bf16 (bf16 GEMMs with f32 sums where the CPU has AMX or AVX512-BF16).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    dtype: String,
    /// Timed runs per shape (after one warm-up).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    repeat: u64,
}

/// `MxKxN` into `(m, k, n)`.
fn parse_shape(s: &str) -> Result<(usize, usize, usize)> {
    let v: Vec<usize> = s
        .split('x')
        .map(|d| d.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--shapes: {s:?} is not MxKxN"))?;
    match v[..] {
        [m, k, n] if m > 0 && k > 0 && n > 0 => Ok((m, k, n)),
        _ => bail!("--shapes: {s:?} is not MxKxN with positive sizes"),
    }
}

/// One line per shape (`gemm MxKxN: median_s=… gflops=…`), then the summary: `median_s`, the
/// sum of the shapes' medians.
fn gemm(a: &GemmBench) -> Result<String> {
    let dev = device();
    bf16_gemms(&a.dtype)?;
    let shapes = a.shapes.split(',').map(parse_shape).collect::<Result<Vec<_>>>()?;
    let mut rng = SeededRng::new(0);
    let mut total = 0.0;
    for (m, k, n) in shapes {
        let mut randn = |shape: [usize; 2]| {
            let mut v = vec![0f32; shape[0] * shape[1]];
            rng.fill_standard_normal(&mut v);
            Tensor::<B, 2>::from_data(TensorData::new(v, shape), &dev)
        };
        let (x, w) = (randn([m, k]), randn([n, k]));
        let mut times = Vec::new();
        for i in 0..=a.repeat {
            let start = Instant::now();
            let y = cpu_kernels::linear(x.clone(), w.clone().transpose(), None);
            let _ = B::sync(&dev);
            drop(y);
            if i > 0 {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        let med = times[times.len() / 2];
        total += med;
        eprintln!("gemm {m}x{k}x{n}: median_s={med:.5} gflops={:.1}", 2.0 * (m * k * n) as f64 / med / 1e9);
    }
    Ok(format!("gemm: dtype={} median_s={total:.5} peak_mib={}", a.dtype, mib(peak_rss_bytes())))
}

/// `train-step` arguments.
#[derive(clap::Args)]
struct TrainStepBench {
    /// A folder with the UNet's config.json.
    #[arg(long)]
    unet_config: PathBuf,
    /// LoRA rank (0: full fine-tuning).
    #[arg(long, default_value_t = 4)]
    lora_rank: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 512)]
    resolution: usize,
    /// Images per step.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    steps: u64,
    /// Burn's balanced activation checkpointing: memory-bound ops are recomputed in the
    /// backward pass instead of kept (less memory, more time).
    #[arg(long)]
    checkpointing: bool,
}

/// One warm-up and `steps` timed training steps of a UNet built from the config with random
/// weights (as for SD 1.5): an aligner on random `[batch, 32, 768]` queries, context
/// `[77 random text tokens][k visual tokens]`, random latents at `resolution / 8`, epsilon
/// loss, AdamW; then the summary line.
fn train_step(a: &TrainStepBench) -> Result<String> {
    if a.checkpointing {
        train_step_on::<burn_autodiff::checkpoint::strategy::BalancedCheckpointing>(a)
    } else {
        train_step_on::<burn_autodiff::checkpoint::strategy::NoCheckpointing>(a)
    }
}

/// The training backend with checkpointing strategy `C`.
type Ad<C> = burn_autodiff::Autodiff<B, C>;

fn train_step_on<C: burn_autodiff::checkpoint::strategy::CheckpointStrategy>(a: &TrainStepBench) -> Result<String> {
    let dev = device();
    let mode =
        if a.lora_rank == 0 { UnetMode::Full } else { UnetMode::Lora { rank: a.lora_rank, alpha: a.lora_rank as f64 } };
    let ucfg = sd_unet::UNetConfig::load(&a.unet_config)?;
    let unet = sd_unet::UNet2DConditionModel::<B>::from_weights(&ucfg, &model_io::Weights::random(&dev))?;
    let d = unet.cross_attention_dim();
    let mut init = SeededRng::new(0);
    let aligner = q_aligner::Aligner::<Ad<C>>::new(768, d, d, &Default::default(), &mut init, &dev);
    let mut model = TrainModel::new(aligner, unet, mode, &mut init);
    let mut opt = Optimizer::<Ad<C>>::new(1e-2, Some(1.0));
    let trainable = burn::module::Module::num_params(&model);
    let (b, h) = (a.batch, a.resolution / 8);
    let r = a.resolution as f32;
    let pooled = match (ucfg.projection_class_embeddings_input_dim, ucfg.addition_time_embed_dim) {
        (Some(p), Some(t)) if ucfg.addition_embed_type.is_some() => Some(p - 6 * t),
        _ => None,
    };
    let mut randn = |shape: Vec<usize>| {
        let mut v = vec![0f32; shape.iter().product()];
        init.fill_standard_normal(&mut v);
        TensorData::new(v, shape)
    };
    let mut times = Vec::new();
    for i in 0..=a.steps {
        let start = Instant::now();
        let batch = Batch {
            queries: Some(Tensor::<Ad<C>, 3>::from_data(randn(vec![b, 32, 768]), &dev)),
            text: Tensor::from_data(randn(vec![b, 77, d]), &dev),
            noisy: Tensor::from_data(randn(vec![b, 4, h, h]), &dev),
            timesteps: Tensor::from_data(TensorData::new(vec![500f32; b], [b]), &dev),
            target: Tensor::from_data(randn(vec![b, 4, h, h]), &dev),
            // SDXL's UNet: random pooled embeddings, and time ids of an uncropped square image.
            added: pooled.map(|p| sd_unet::AddedConditioning {
                text_embeds: Tensor::from_data(randn(vec![b, p]), &dev),
                time_ids: Tensor::from_data(TensorData::new([r, r, 0.0, 0.0, r, r].repeat(b), [b, 6]), &dev),
            }),
        };
        let grads = model.loss(batch)?.backward();
        let norms = opt.norms(&model, &grads);
        model = opt.step(model, &grads, &norms, 1e-4, 1e-4);
        let _ = <Ad<C>>::sync(&dev);
        if i > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    times.sort_by(f64::total_cmp);
    eprintln!(
        "train-step ({mode:?}, {r}x{r}, batch {b}): {trainable} parameters (trainable and frozen)",
        r = a.resolution
    );
    let summary = format!(
        "train-step: warmup=1 runs={} median_s={:.4} min_s={:.4} mean_s={mean:.4} peak_mib={}",
        times.len(),
        times[times.len() / 2],
        times[0],
        mib(peak_rss_bytes())
    );
    Ok(summary)
}

/// `generate` arguments.
#[derive(clap::Args)]
struct GenerateBench {
    /// A diffusers Stable Diffusion folder: its unet/, vae/, text_encoder/, tokenizer/ and
    /// scheduler/ are used for the components not given below. Only configs are read.
    #[arg(long)]
    base: Option<PathBuf>,
    /// A folder with the UNet's config.json.
    #[arg(long)]
    unet: Option<PathBuf>,
    /// A folder with the VAE's config.json.
    #[arg(long)]
    vae: Option<PathBuf>,
    /// A folder with the CLIP text encoder's config.json.
    #[arg(long)]
    text_encoder: Option<PathBuf>,
    /// A CLIP tokenizer folder.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// A folder with scheduler_config.json.
    #[arg(long)]
    scheduler: Option<PathBuf>,
    /// Denoising steps.
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// Classifier-free guidance scale (> 1: conditional and unconditional in one UNet batch of 2).
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// Image side in pixels (default: the UNet's sample size times the VAE factor, 512 for SD 1.5).
    #[arg(long)]
    size: Option<usize>,
    /// Timed generations.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    repeat: u64,
    /// f32, or bf16 (bf16 GEMMs with f32 sums where the CPU has AMX or AVX512-BF16).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    dtype: String,
}

/// `--dtype bf16`: as the binary's, f32 tensors with bf16 GEMMs; an error where the CPU kernels
/// cannot run it (this bench does not measure Burn's bf16 tensors).
fn bf16_gemms(dtype: &str) -> Result<()> {
    if dtype != "bf16" {
        return Ok(());
    }
    if backend::IS_GPU {
        bail!("--dtype bf16: this bench measures the CPU kernels' bf16");
    }
    if !cpu_kernels::use_bf16_gemm(true) {
        bail!("--dtype bf16: this CPU has no AMX-BF16 or AVX512-BF16 (see `personalize info`)");
    }
    Ok(())
}

/// The prompt of the generation benchmark (the same in `xtask/bench/torch_bench.py`).
const PROMPT: &str = "a photo of an astronaut riding a horse on mars";

fn component(explicit: &Option<PathBuf>, base: &Option<PathBuf>, name: &str, flag: &str) -> Result<PathBuf> {
    match (explicit, base) {
        (Some(p), _) => Ok(p.clone()),
        (None, Some(b)) => Ok(b.join(name)),
        (None, None) => bail!("generate needs --{flag} DIR or --base DIR"),
    }
}

/// Builds the pipeline from the component configs with random weights.
fn random_pipeline(a: &GenerateBench) -> Result<Pipeline<B>> {
    let dev = device();
    let random = || model_io::Weights::<B>::random(&dev);
    let unet_dir = component(&a.unet, &a.base, "unet", "unet")?;
    let vae_dir = component(&a.vae, &a.base, "vae", "vae")?;
    let text_dir = component(&a.text_encoder, &a.base, "text_encoder", "text-encoder")?;
    let unet_cfg = sd_unet::UNetConfig::load(&unet_dir)?;
    let vae_config = sd_vae::AutoencoderKlConfig::load(&vae_dir)?;
    let text_cfg = clip_text::ClipTextConfig::load(&text_dir)?;
    let parts = PipelineParts {
        tokenizer: clip_text::ClipTokenizer::from_dir(&component(&a.tokenizer, &a.base, "tokenizer", "tokenizer")?)?,
        text_encoder: clip_text::ClipTextModel::from_weights(&text_cfg, &random())?,
        unet: sd_unet::UNet2DConditionModel::from_weights(&unet_cfg, &random())?,
        unet_config: unet_cfg.clone(),
        vae: sd_vae::AutoencoderKl::from_weights(&vae_config, &random())?,
        vae_config,
        scheduler_dir: component(&a.scheduler, &a.base, "scheduler", "scheduler")?,
    };
    Ok(Pipeline::from_parts(parts, &dev)?)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `generate`: builds the pipeline (random weights), then times `repeat`
/// generations of one image: the total (text encoder, every step, VAE decode), each step
/// (between the pipeline's step callbacks; the first step also holds the text encoder and the
/// scheduler set-up, so the per-step median is over steps 2..N), and the decode.
fn generate(a: &GenerateBench) -> Result<String> {
    bf16_gemms(&a.dtype)?;
    let start = Instant::now();
    let pipe = random_pipeline(a).context("building the pipeline from its configs")?;
    let load_s = start.elapsed().as_secs_f64();
    let load_peak = peak_rss_bytes();
    let opts = GenerateOptions {
        prompt: PROMPT.into(),
        steps: a.steps,
        guidance: a.guidance,
        seed: 0,
        height: a.size,
        width: a.size,
        ..Default::default()
    };
    let side = a.size.unwrap_or(pipe.default_size());
    eprintln!("bench generate: {side}x{side}, {} steps, guidance {}, random weights", a.steps, a.guidance);
    let (mut totals, mut later_steps, mut first_steps, mut decodes) = (vec![], vec![], vec![], vec![]);
    for run in 0..a.repeat {
        let t0 = Instant::now();
        let mut marks = Vec::with_capacity(a.steps);
        pipe.generate_each(
            GenerateRequest::new(&opts),
            &mut |_, _| {
                let _ = B::sync(&device());
                marks.push(Instant::now());
            },
            &mut |_, _| Ok(()),
        )?;
        let end = Instant::now();
        let total = (end - t0).as_secs_f64();
        let first = marks.first().map_or(total, |m| (*m - t0).as_secs_f64());
        let decode = marks.last().map_or(0.0, |m| (end - *m).as_secs_f64());
        let steps: Vec<f64> = marks.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
        eprintln!(
            "run {}: total {total:.3} s, first step (with the text encoder) {first:.3} s, later steps {}, decode {decode:.3} s",
            run + 1,
            steps.iter().map(|s| format!("{s:.3}")).collect::<Vec<_>>().join(" ")
        );
        totals.push(total);
        first_steps.push(first);
        decodes.push(decode);
        later_steps.extend(steps);
    }
    let step = if later_steps.is_empty() { median(&mut first_steps.clone()) } else { median(&mut later_steps) };
    let mut sorted = totals.clone();
    sorted.sort_by(f64::total_cmp);
    let summary = format!(
        "generate: load_s={load_s:.3} load_peak_mib={} warmup=0 runs={} steps={} median_s={:.4} min_s={:.4} step_median_s={step:.4} first_step_s={:.4} decode_s={:.4} peak_mib={}",
        mib(load_peak),
        totals.len(),
        a.steps,
        median(&mut totals),
        sorted[0],
        median(&mut first_steps),
        median(&mut decodes),
        mib(peak_rss_bytes())
    );
    Ok(summary)
}

/// `write-unet`: a UNet built from `unet_config/config.json` with random
/// weights, written as a diffusers folder `out/` (config.json, diffusion_pytorch_model.safetensors
/// in f32), for the loading benchmark.
fn write_unet(unet_config: &Path, out: &Path) -> Result<String> {
    let cfg = sd_unet::UNetConfig::load(unet_config)?;
    let unet = sd_unet::UNet2DConditionModel::<B>::from_weights(&cfg, &model_io::Weights::random(&device()))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let config = std::fs::read(unet_config.join("config.json"))
        .with_context(|| format!("reading {}/config.json", unet_config.display()))?;
    model_io::write_atomic(&out.join("config.json"), &config)?;
    let file = out.join("diffusion_pytorch_model.safetensors");
    let bytes = unet.save_safetensors(&file)?;
    Ok(format!("wrote {} ({:.2} GB)", file.display(), bytes as f64 / 1e9))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
    }

    /// The `KEY=VALUE` fields of a summary line.
    fn fields(line: &str) -> BTreeMap<String, String> {
        line.split_whitespace().filter_map(|t| t.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn generate_times_steps_with_random_weights() {
        let base = fixtures().join("pipeline");
        let a = Bench::try_parse_from([
            "bench",
            "generate",
            "--base",
            base.to_str().unwrap(),
            "--steps",
            "3",
            "--size",
            "32",
            "--repeat",
            "2",
        ])
        .unwrap();
        let Bench::Generate(a) = a else { unreachable!() };
        let line = generate(&a).unwrap();
        assert!(line.starts_with("generate: "), "{line}");
        let s = fields(&line);
        assert_eq!((s["runs"].as_str(), s["steps"].as_str()), ("2", "3"));
        for k in ["median_s", "step_median_s", "first_step_s", "decode_s", "load_s"] {
            assert!(s[k].parse::<f64>().unwrap() > 0.0, "{k} in {line}");
        }
        assert!(s["median_s"].parse::<f64>().unwrap() >= 2.0 * s["step_median_s"].parse::<f64>().unwrap(), "{line}");
        let Bench::Generate(a) = Bench::try_parse_from(["bench", "generate", "--steps", "1"]).unwrap() else {
            unreachable!()
        };
        let e = format!("{:#}", generate(&a).unwrap_err());
        assert!(e.contains("--unet") && e.contains("--base"), "{e}");
    }

    #[test]
    fn write_unet_writes_the_diffusers_keys_and_shapes() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("unet");
        write_unet(&fixtures().join("unet/sd1"), &out).unwrap();
        // Every key and shape of the diffusers file, nothing more (the loader checks both ways).
        let reference =
            model_io::tensor_file::read_tensors(&fixtures().join("unet/sd1/diffusion_pytorch_model.safetensors"))
                .unwrap();
        let ours = model_io::tensor_file::read_tensors(&out.join("diffusion_pytorch_model.safetensors")).unwrap();
        assert_eq!(ours.keys().collect::<Vec<_>>(), reference.keys().collect::<Vec<_>>());
        assert!(reference.iter().all(|(k, v)| ours[k].shape == v.shape));
        sd_unet::UNet2DConditionModel::<B>::load(&out, &device()).unwrap();
    }

    #[test]
    fn train_step_times_a_lora_step() {
        let a = TrainStepBench {
            unet_config: fixtures().join("unet/sd1"),
            lora_rank: 2,
            resolution: 64,
            batch: 1,
            steps: 2,
            checkpointing: false,
        };
        let line = train_step(&a).unwrap();
        let s = fields(&line);
        assert_eq!(s["runs"], "2", "{line}");
        assert!(s["median_s"].parse::<f64>().unwrap() > 0.0, "{line}");
    }
}
