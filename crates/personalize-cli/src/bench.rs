//! Hidden benchmark helpers for `cargo xtask bench`: a whole generation with random weights
//! (`bench-generate`) and a full-size UNet checkpoint with random weights (`bench-write-unet`).
//!
//! Each prints one summary line on stderr, `NAME: key=value ...`, in the form of the stage
//! runner's `--repeat` summary, which `cargo xtask bench` parses.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend as _;
use personalize::train::peak_rss_bytes;
use personalize::{GenerateOptions, Pipeline, PipelineParts};

use crate::backend::{device, B};
use crate::stage::mib;

/// `personalize bench-generate` arguments.
#[derive(clap::Args)]
pub struct GenerateBench {
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
}

/// The prompt of the generation benchmark (the same in `xtask/bench/torch_bench.py`).
pub const PROMPT: &str = "a photo of an astronaut riding a horse on mars";

fn component(explicit: &Option<PathBuf>, base: &Option<PathBuf>, name: &str, flag: &str) -> Result<PathBuf> {
    match (explicit, base) {
        (Some(p), _) => Ok(p.clone()),
        (None, Some(b)) => Ok(b.join(name)),
        (None, None) => bail!("bench-generate needs --{flag} DIR or --base DIR"),
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
    Ok(Pipeline::from_parts(parts, &dev))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `personalize bench-generate`: builds the pipeline (random weights), then times `repeat`
/// generations of one image: the total (text encoder, every step, VAE decode), each step
/// (between the pipeline's step callbacks; the first step also holds the text encoder and the
/// scheduler set-up, so the per-step median is over steps 2..N), and the decode.
pub fn generate(a: &GenerateBench) -> Result<()> {
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
    eprintln!("bench-generate: {side}x{side}, {} steps, guidance {}, random weights", a.steps, a.guidance);
    let (mut totals, mut later_steps, mut first_steps, mut decodes) = (vec![], vec![], vec![], vec![]);
    for run in 0..a.repeat {
        let t0 = Instant::now();
        let mut marks = Vec::with_capacity(a.steps);
        pipe.generate(&opts, None, None, &mut |_, _| {
            let _ = B::sync(&device());
            marks.push(Instant::now());
        })?;
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
    eprintln!(
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
    Ok(())
}

/// `personalize bench-write-unet`: a UNet built from `unet_config/config.json` with random
/// weights, written as a diffusers folder `out/` (config.json, diffusion_pytorch_model.safetensors
/// in f32), for the loading benchmark.
pub fn write_unet(unet_config: &Path, out: &Path) -> Result<()> {
    let cfg = sd_unet::UNetConfig::load(unet_config)?;
    let unet = sd_unet::UNet2DConditionModel::<B>::from_weights(&cfg, &model_io::Weights::random(&device()))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let config = std::fs::read(unet_config.join("config.json"))
        .with_context(|| format!("reading {}/config.json", unet_config.display()))?;
    model_io::write_atomic(&out.join("config.json"), &config)?;
    let file = out.join("diffusion_pytorch_model.safetensors");
    let bytes = unet.save_safetensors(&file)?;
    eprintln!("wrote {} ({:.2} GB)", file.display(), bytes as f64 / 1e9);
    Ok(())
}
