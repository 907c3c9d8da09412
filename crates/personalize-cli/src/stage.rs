//! `personalize stage`: runs one pipeline stage on named tensors from a safetensors file and
//! writes its outputs (the contract in the README's stage-runner table).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend as _;
use model_io::tensor_file::{read_tensors, take, write_tensors, HostTensor};
use personalize::memory::peak_rss_bytes as peak_memory;

use crate::backend::{device, B};
use crate::names::{SchedulerName, StageName};

/// Run one pipeline stage on tensors from a safetensors file and write its outputs.
///
/// See the README's stage-runner table for the tensor names each stage reads and writes.
#[derive(clap::Args)]
pub struct StageArgs {
    /// The stage to run.
    pub stage: StageName,
    /// The model folder the stage loads, as published (e.g. `sd/text_encoder`, `sd/vae`,
    /// or a tokenizer folder); or a fetched preset or repo id with a subfolder
    /// (`sd-v1-5/unet`, `blip2`). A folder with `model.onnx` (and `config.json`) loads its
    /// ONNX export; the VAE stages take an ONNX export's `vae_encoder/` or `vae_decoder/`
    /// (reading both halves).
    #[arg(long)]
    pub model: PathBuf,
    /// Input tensors (safetensors). Not used by `tokenizer`, which takes --prompt.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Where to write the output tensors (safetensors; written atomically).
    #[arg(long)]
    pub output: PathBuf,
    /// Run the stage N times after loading (for timing); the last output is written.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub repeat: u64,
    /// A prompt for the tokenizer stage; repeat the flag for a batch.
    #[arg(long = "prompt", value_name = "PROMPT")]
    pub prompts: Vec<String>,
    /// Build the model from the folder's config.json alone, with random weights (for
    /// timing full-size models without downloading them).
    #[arg(long)]
    pub random_weights: bool,
    /// Scheduler stage only: use this scheduler instead of the config's `_class_name`.
    #[arg(long)]
    pub scheduler: Option<SchedulerName>,
}

fn load_text_encoder(args: &StageArgs) -> Result<clip_text::ClipTextModel<B>> {
    if args.random_weights {
        let cfg = clip_text::ClipTextConfig::load(&args.model)?;
        return Ok(clip_text::ClipTextModel::from_weights(&cfg, &model_io::Weights::random(&device()))?);
    }
    Ok(clip_text::ClipTextModel::load(&args.model, &device())?)
}

fn load_vae(args: &StageArgs) -> Result<sd_vae::AutoencoderKl<B>> {
    if args.random_weights {
        let cfg = sd_vae::AutoencoderKlConfig::load(&args.model)?;
        return Ok(sd_vae::AutoencoderKl::from_weights(&cfg, &model_io::Weights::random(&device()))?);
    }
    if let Some((ckpt, cfg_dir)) = onnx_vae(&args.model)? {
        let cfg = sd_vae::AutoencoderKlConfig::load(&cfg_dir)?;
        let w = model_io::Weights::new(&ckpt, &device());
        let vae = sd_vae::AutoencoderKl::from_weights(&cfg, &w)?;
        w.finish(&[])?;
        return Ok(vae);
    }
    Ok(sd_vae::AutoencoderKl::load(&args.model, &device())?)
}

/// An ONNX export's VAE, which comes in two halves (`vae_encoder/`, `vae_decoder/`): given
/// either half's folder or the pipeline folder, both merged, and the folder whose
/// `config.json` describes the VAE. `None` for a safetensors folder.
fn onnx_vae(model: &std::path::Path) -> Result<Option<(model_io::Checkpoint, std::path::PathBuf)>> {
    let name = model.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let root = match name {
        "vae_encoder" | "vae_decoder" if model.join("model.onnx").is_file() => model.parent().unwrap_or(model),
        _ if model.join("vae_decoder/model.onnx").is_file() => model,
        _ => return Ok(None),
    };
    let half = |h: &str| -> Result<model_io::Checkpoint> {
        let p = root.join(h).join("model.onnx");
        if !p.is_file() {
            anyhow::bail!(
                "{}: missing; an ONNX export's VAE is read from both vae_encoder/ and vae_decoder/",
                p.display()
            );
        }
        Ok(model_io::Checkpoint::open_onnx(&p)?)
    };
    let ckpt = half("vae_encoder")?.merge(half("vae_decoder")?, &format!("{} [vae]", root.display()))?;
    let cfg_dir = ["vae_decoder", "vae_encoder"].iter().map(|h| root.join(h)).find(|d| d.join("config.json").is_file());
    let Some(cfg_dir) = cfg_dir else {
        anyhow::bail!("{}: no config.json beside the VAE's model.onnx (vae_decoder/ or vae_encoder/)", root.display());
    };
    Ok(Some((ckpt, cfg_dir)))
}

fn load_unet(args: &StageArgs) -> Result<sd_unet::UNet2DConditionModel<B>> {
    if args.random_weights {
        let cfg = sd_unet::UNetConfig::load(&args.model)?;
        return Ok(sd_unet::UNet2DConditionModel::from_weights(&cfg, &model_io::Weights::random(&device()))?);
    }
    Ok(sd_unet::UNet2DConditionModel::load(&args.model, &device())?)
}

type Tensors = BTreeMap<String, HostTensor>;

/// Refuses values of `name` (when present) outside `[lo, hi]`: finite, but not what the stage
/// takes (`what`).
fn in_range(t: &Tensors, path: &Path, name: &str, lo: f32, hi: f32, what: &str) -> Result<()> {
    if let Some(v) = t.get(name).and_then(|v| v.as_f32(name).ok()) {
        if let Some(x) = v.iter().find(|x| !(lo..=hi).contains(*x)) {
            bail!("{}: tensor `{name}` holds {x}; expected {what}", path.display());
        }
    }
    Ok(())
}

/// The input tensors, each checked: no empty dimension, no NaN or Inf.
fn inputs(args: &StageArgs) -> Result<(Tensors, PathBuf)> {
    let path = args.input.clone().with_context(|| format!("stage {} needs --input IN.safetensors", args.stage))?;
    let t = read_tensors(&path)?;
    for (name, v) in &t {
        if v.shape.contains(&0) {
            bail!("{}: tensor `{name}` has shape {:?}: it holds no values", path.display(), v.shape);
        }
        if v.as_f32(name).is_ok_and(|x| x.iter().any(|x| !x.is_finite())) {
            bail!("{}: tensor `{name}` holds NaN or Inf", path.display());
        }
    }
    Ok((t, path))
}

/// How long loading a stage's model took, and the peak memory right after it.
pub struct Loaded {
    pub secs: f64,
    pub peak: Option<u64>,
}

/// Bytes as MiB with one decimal, `-` when unknown (the form of the summary line).
pub fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("-".to_string(), |b| format!("{:.1}", b as f64 / (1u64 << 20) as f64))
}

/// Runs `f` (loading a model), logging the time and the peak memory after it.
fn loading<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<(T, Loaded)> {
    let t = Instant::now();
    let v = f()?;
    let _ = B::sync(&device());
    let l = Loaded { secs: t.elapsed().as_secs_f64(), peak: peak_memory() };
    tracing::info!("{what}: loaded in {:.3} s, peak memory after load {} MiB", l.secs, mib(l.peak));
    Ok((v, l))
}

/// Runs `f` `repeat` times (at least once) and returns the last result. With `repeat` ≥ 2 the
/// first run is a warm-up, left out of the statistics, and one line goes to stderr
/// (`cargo xtask bench` parses it):
/// `STAGE: load_s=… load_peak_mib=… warmup=1 runs=N-1 median_s=… min_s=… peak_mib=…`.
fn timed<T>(stage: &str, repeat: u64, load: Option<&Loaded>, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let mut times: Vec<Duration> = Vec::new();
    let mut last = None;
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        let out = f()?;
        // Kernels may still run asynchronously (CUDA): wait so the time is real.
        let _ = B::sync(&device());
        times.push(t.elapsed());
        last = Some(out);
    }
    let warmup = usize::from(times.len() > 1);
    let mut times = times.split_off(warmup);
    times.sort();
    let median = times[times.len() / 2];
    tracing::info!(
        stage,
        runs = times.len(),
        warmup,
        "median {:.3} s, min {:.3} s",
        median.as_secs_f64(),
        times[0].as_secs_f64()
    );
    if repeat > 1 {
        let (load_s, load_peak) =
            load.map_or(("-".to_string(), "-".to_string()), |l| (format!("{:.3}", l.secs), mib(l.peak)));
        eprintln!(
            "{stage}: load_s={load_s} load_peak_mib={load_peak} warmup={warmup} runs={} median_s={:.4} min_s={:.4} peak_mib={}",
            times.len(),
            median.as_secs_f64(),
            times[0].as_secs_f64(),
            mib(peak_memory())
        );
    }
    Ok(last.expect("at least one run"))
}

/// Runs the stage and writes its output file.
pub fn run(args: &StageArgs) -> Result<()> {
    // The output is checked before any work: never over the input, never into a missing folder.
    let parent = args.output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        bail!("--output {}: folder {} does not exist", args.output.display(), parent.display());
    }
    if let Some(input) = &args.input {
        let same = match (std::fs::canonicalize(input), std::fs::canonicalize(&args.output)) {
            (Ok(a), Ok(b)) => a == b,
            _ => input == &args.output,
        };
        if same {
            bail!("--output {} is the --input file; write the outputs elsewhere", args.output.display());
        }
    }
    if args.scheduler.is_some() && args.stage != StageName::Scheduler {
        bail!("--scheduler is for stage scheduler, not {}", args.stage);
    }
    if !args.prompts.is_empty() && args.stage != StageName::Tokenizer {
        bail!("--prompt is for stage tokenizer, not {} (it reads its inputs from --input)", args.stage);
    }
    let dev = device();
    let model = args.model.as_path();
    let outputs: Tensors = match args.stage {
        StageName::Tokenizer => {
            if args.prompts.is_empty() {
                bail!("stage tokenizer needs at least one --prompt TEXT");
            }
            let (tok, load) = loading("tokenizer", || Ok(clip_text::ClipTokenizer::from_dir(model)?))?;
            let ids = timed("tokenizer", args.repeat, Some(&load), || {
                Ok(args.prompts.iter().map(|p| tok.encode(p)).collect::<Result<Vec<_>, _>>()?.concat())
            })?;
            let n = args.prompts.len();
            BTreeMap::from([("input_ids".to_string(), HostTensor::i64(vec![n, ids.len() / n], ids))])
        }
        StageName::TextEncoder => {
            let (mut t, path) = inputs(args)?;
            let ids = take(&mut t, &path, "input_ids")?.to_int::<B, 2>("input_ids", &dev)?;
            let (enc, load) = loading("text-encoder", || load_text_encoder(args))?;
            let out = timed("text-encoder", args.repeat, Some(&load), || Ok(enc.forward(ids.clone())?))?;
            BTreeMap::from([("last_hidden_state".to_string(), HostTensor::from_tensor(out))])
        }
        StageName::Unet => {
            let (mut t, path) = inputs(args)?;
            in_range(&t, &path, "timestep", 0.0, 10_000.0, "a diffusion timestep (0..1000 for SD)")?;
            let x = take(&mut t, &path, "sample")?.to_float::<B, 4>("sample", &dev)?;
            let ts = take(&mut t, &path, "timestep")?.to_f32_tensor::<B, 1>("timestep", &dev)?;
            let ctx = take(&mut t, &path, "encoder_hidden_states")?.to_float::<B, 3>("encoder_hidden_states", &dev)?;
            let (unet, load) = loading("unet", || load_unet(args))?;
            // SDXL's added conditioning, under diffusers' `added_cond_kwargs` names: read when the
            // UNet takes it, and refused (not silently dropped) when it does not.
            let added = if unet.needs_added_conditioning() {
                Some(sd_unet::AddedConditioning {
                    text_embeds: take(&mut t, &path, "text_embeds")?.to_float::<B, 2>("text_embeds", &dev)?,
                    time_ids: take(&mut t, &path, "time_ids")?.to_f32_tensor::<B, 2>("time_ids", &dev)?,
                })
            } else {
                if let Some(k) = ["text_embeds", "time_ids"].into_iter().find(|k| t.contains_key(*k)) {
                    bail!(
                        "{}: `{k}` is SDXL's added conditioning, but this UNet takes none (its config has no \
                         addition_embed_type \"text_time\")",
                        path.display()
                    );
                }
                None
            };
            let out = timed("unet", args.repeat, Some(&load), || {
                Ok(unet.forward_with(x.clone(), ts.clone(), ctx.clone(), added.as_ref())?)
            })?;
            BTreeMap::from([("sample".to_string(), HostTensor::from_tensor(out))])
        }
        StageName::VaeEncode => {
            let (mut t, path) = inputs(args)?;
            in_range(&t, &path, "sample", -10.0, 10.0, "an image in [-1, 1]")?;
            let x = take(&mut t, &path, "sample")?.to_float::<B, 4>("sample", &dev)?;
            let (vae, load) = loading("vae-encode", || load_vae(args))?;
            let (mean, logvar) = timed("vae-encode", args.repeat, Some(&load), || Ok(vae.encode(x.clone())?))?;
            BTreeMap::from([
                ("mean".to_string(), HostTensor::from_tensor(mean)),
                ("logvar".to_string(), HostTensor::from_tensor(logvar)),
            ])
        }
        StageName::VaeDecode => {
            let (mut t, path) = inputs(args)?;
            let z = take(&mut t, &path, "latent")?.to_float::<B, 4>("latent", &dev)?;
            let (vae, load) = loading("vae-decode", || load_vae(args))?;
            let out = timed("vae-decode", args.repeat, Some(&load), || Ok(vae.decode(z.clone())?))?;
            BTreeMap::from([("sample".to_string(), HostTensor::from_tensor(out))])
        }
        StageName::Scheduler => {
            let (mut t, path) = inputs(args)?;
            let sample = take(&mut t, &path, "sample")?;
            let outs = take(&mut t, &path, "model_outputs")?;
            let n = take(&mut t, &path, "num_inference_steps")?;
            let steps = match &n.data {
                model_io::tensor_file::HostData::I64(v) if v.len() == 1 && v[0] > 0 => v[0] as usize,
                _ => bail!("{}: `num_inference_steps` must be one positive i64, got {:?}", path.display(), n.data),
            };
            let sample = scheduler::HostSample { data: sample.as_f32("sample")?.to_vec(), shape: sample.shape.clone() };
            let per = sample.data.len();
            let flat = outs.as_f32("model_outputs")?;
            if outs.shape.len() != sample.shape.len() + 1 || outs.shape[1..] != sample.shape[..] {
                bail!(
                    "{}: `model_outputs` has shape {:?}; expected [N, {}]",
                    path.display(),
                    outs.shape,
                    sample.shape.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
                );
            }
            let outputs: Vec<scheduler::HostSample> = flat
                .chunks(per.max(1))
                .map(|c| scheduler::HostSample { data: c.to_vec(), shape: sample.shape.clone() })
                .collect();
            let (timesteps, samples) = timed("scheduler", args.repeat, None, || {
                let mut s = scheduler::from_dir(model, args.scheduler.map(SchedulerName::as_str))?;
                run_scheduler(s.as_mut(), &sample, &outputs, steps, &mut scheduler::SeededRng::new(STAGE_NOISE_SEED))
            })?;
            let mut shape = vec![samples.len()];
            shape.extend(&sample.shape);
            let data: Vec<f32> = samples.into_iter().flat_map(|s| s.data).collect();
            BTreeMap::from([
                ("timesteps".to_string(), HostTensor::f32(vec![timesteps.len()], timesteps)),
                ("samples".to_string(), HostTensor::f32(shape, data)),
            ])
        }
        StageName::Blip2 => {
            let (mut t, path) = inputs(args)?;
            let px = take(&mut t, &path, "pixel_values")?.to_float::<B, 4>("pixel_values", &dev)?;
            let (enc, load) = loading("blip2", || {
                Ok(if args.random_weights {
                    let cfg = blip2_encoder::Blip2Config::load(model)?;
                    blip2_encoder::Blip2Encoder::<B>::from_weights(&cfg, &model_io::Weights::random(&dev))?
                } else {
                    blip2_encoder::Blip2Encoder::<B>::load(model, &dev)?
                })
            })?;
            let (q, emb) = timed("blip2", args.repeat, Some(&load), || Ok(enc.forward(px.clone())?))?;
            BTreeMap::from([
                ("query_output".to_string(), HostTensor::from_tensor(q)),
                ("image_embeds".to_string(), HostTensor::from_tensor(emb)),
            ])
        }
        StageName::Aligner => {
            // The model is a concept folder; only its aligner.safetensors is needed.
            let (mut t, path) = inputs(args)?;
            let q = take(&mut t, &path, "queries")?.to_float::<B, 3>("queries", &dev)?;
            let file = if model.is_dir() { model.join("aligner.safetensors") } else { model.to_path_buf() };
            let (aligner, load) = loading("aligner", || Ok(q_aligner::Aligner::<B>::load(&file, &dev)?))?;
            let out = timed("aligner", args.repeat, Some(&load), || {
                aligner.forward(q.clone()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
            })?;
            BTreeMap::from([("visual_prompt".to_string(), HostTensor::from_tensor(out))])
        }
    };
    // Finite inputs and NaN out: say which, and whether the weights hold it.
    for (name, v) in &outputs {
        if v.as_f32(name).is_ok_and(|x| x.iter().any(|x| !x.is_finite())) {
            let file = if model.is_dir() {
                model.to_path_buf()
            } else {
                model.parent().unwrap_or(Path::new(".")).to_path_buf()
            };
            let damaged = personalize::check::nonfinite_in_files(&file).map(|t| format!("{t} holds NaN or Inf"));
            bail!(
                "stage {}: output `{name}` holds NaN or Inf from finite inputs: {}",
                args.stage,
                damaged.unwrap_or_else(|| {
                    "the weights are finite (an overflow; check the model's config, or use --dtype f32)".into()
                })
            );
        }
    }
    write_output(&args.output, &outputs)
}

fn write_output(path: &Path, t: &Tensors) -> Result<()> {
    write_tensors(path, t, &BTreeMap::new())?;
    tracing::info!("wrote {}", path.display());
    Ok(())
}

/// The seed of the host noise the `scheduler` stage gives stochastic schedulers (DDPM, Euler
/// ancestral): the README's stage-runner contract.
pub const STAGE_NOISE_SEED: u64 = 0;

/// The `scheduler` stage's loop on given model outputs: `set_timesteps`, then per timestep
/// `scale_model_input` (whose result the caller's model would consume) and `step`. Returns the
/// timesteps and the sample after each step.
fn run_scheduler(
    s: &mut dyn scheduler::Scheduler<scheduler::HostSample>,
    sample: &scheduler::HostSample,
    model_outputs: &[scheduler::HostSample],
    num_inference_steps: usize,
    noise: &mut dyn scheduler::NoiseSource<scheduler::HostSample>,
) -> Result<(Vec<f32>, Vec<scheduler::HostSample>)> {
    s.set_timesteps(num_inference_steps)?;
    let timesteps = s.timesteps().to_vec();
    if model_outputs.len() != timesteps.len() {
        bail!(
            "{} model outputs, but {} with {num_inference_steps} inference steps has {} timesteps; \
             give one model output per timestep",
            model_outputs.len(),
            s.kind().class_name(),
            timesteps.len()
        );
    }
    let mut x = sample.clone();
    let mut samples = Vec::with_capacity(timesteps.len());
    for (&t, out) in timesteps.iter().zip(model_outputs) {
        s.scale_model_input(&x, t)?;
        x = s.step(out, t, &x, noise)?;
        samples.push(x.clone());
    }
    Ok((timesteps, samples))
}

#[cfg(test)]
mod tests {
    use scheduler::{HostSample, NoNoise, SchedulerConfig};

    #[test]
    fn pndm_stage_needs_one_output_per_timestep() {
        let cfg =
            SchedulerConfig::from_json_str(r#"{"_class_name": "PNDMScheduler", "skip_prk_steps": true}"#).unwrap();
        let mut s = scheduler::from_config::<HostSample>(&cfg, None).unwrap();
        let x = HostSample::zeros(vec![1, 4, 2, 2]);
        // 10 inference steps -> 11 PLMS timesteps.
        let e = super::run_scheduler(s.as_mut(), &x, &vec![x.clone(); 10], 10, &mut NoNoise).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("10 model outputs") && msg.contains("11 timesteps") && msg.contains("PNDMScheduler"),
            "{msg}"
        );
        let (ts, samples) = super::run_scheduler(s.as_mut(), &x, &vec![x.clone(); 11], 10, &mut NoNoise).unwrap();
        assert_eq!((ts.len(), samples.len()), (11, 11));
        assert_eq!(ts[1], ts[2], "PLMS repeats its second timestep");
        // A model output of the wrong shape is an error, not a panic.
        let mut outs = vec![x.clone(); 11];
        outs[3] = HostSample::zeros(vec![1, 4, 2, 3]);
        let e = super::run_scheduler(s.as_mut(), &x, &outs, 10, &mut NoNoise).unwrap_err();
        assert!(e.to_string().contains("shape"), "{e}");
    }
}
