//! `personalize stage`: runs one pipeline stage on named tensors from a safetensors file and
//! writes its outputs (the contract in DESIGN.md).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend as _;
use model_io::tensor_file::{read_tensors, take, write_tensors, HostTensor};

use crate::backend::{device, B};

/// The stages the runner knows, with their names on the command line.
pub const STAGES: &[&str] = &["tokenizer", "text-encoder", "vae-encode", "vae-decode"];

/// Parsed `stage` arguments.
pub struct StageArgs {
    pub stage: String,
    pub model: PathBuf,
    pub input: Option<PathBuf>,
    pub output: PathBuf,
    pub repeat: usize,
    pub prompts: Vec<String>,
}

type Tensors = BTreeMap<String, HostTensor>;

fn inputs(args: &StageArgs) -> Result<(Tensors, PathBuf)> {
    let path = args.input.clone().with_context(|| format!("stage {} needs --input IN.safetensors", args.stage))?;
    Ok((read_tensors(&path)?, path))
}

/// Runs `f` `repeat` times (at least once), logging the timings, and returns the last result.
fn timed<T>(stage: &str, repeat: usize, mut f: impl FnMut() -> Result<T>) -> Result<T> {
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
    times.sort();
    let median = times[times.len() / 2];
    tracing::info!(stage, runs = times.len(), "median {:.3} s, min {:.3} s", median.as_secs_f64(), times[0].as_secs_f64());
    if repeat > 1 {
        eprintln!("{stage}: {} runs, median {:.4} s, min {:.4} s", times.len(), median.as_secs_f64(), times[0].as_secs_f64());
    }
    Ok(last.expect("at least one run"))
}

/// Runs the stage and writes its output file.
pub fn run(args: &StageArgs) -> Result<()> {
    let dev = device();
    let model = args.model.as_path();
    let outputs: Tensors = match args.stage.as_str() {
        "tokenizer" => {
            if args.prompts.is_empty() {
                bail!("stage tokenizer needs at least one --prompt TEXT");
            }
            let tok = clip_text::ClipTokenizer::from_dir(model)?;
            let ids = timed("tokenizer", args.repeat, || {
                Ok(args.prompts.iter().flat_map(|p| tok.encode(p)).collect::<Vec<_>>())
            })?;
            let n = args.prompts.len();
            BTreeMap::from([("input_ids".to_string(), HostTensor::i64(vec![n, ids.len() / n], ids))])
        }
        "text-encoder" => {
            let (mut t, path) = inputs(args)?;
            let ids = take(&mut t, &path, "input_ids")?.to_int::<B, 2>("input_ids", &dev)?;
            let enc = clip_text::ClipTextModel::<B>::load(model, &dev)?;
            let out = timed("text-encoder", args.repeat, || Ok(enc.forward(ids.clone())?))?;
            BTreeMap::from([("last_hidden_state".to_string(), HostTensor::from_tensor(out))])
        }
        "vae-encode" => {
            let (mut t, path) = inputs(args)?;
            let x = take(&mut t, &path, "sample")?.to_float::<B, 4>("sample", &dev)?;
            let vae = sd_vae::AutoencoderKl::<B>::load(model, &dev)?;
            let (mean, logvar) = timed("vae-encode", args.repeat, || Ok(vae.encode(x.clone())?))?;
            BTreeMap::from([
                ("mean".to_string(), HostTensor::from_tensor(mean)),
                ("logvar".to_string(), HostTensor::from_tensor(logvar)),
            ])
        }
        "vae-decode" => {
            let (mut t, path) = inputs(args)?;
            let z = take(&mut t, &path, "latent")?.to_float::<B, 4>("latent", &dev)?;
            let vae = sd_vae::AutoencoderKl::<B>::load(model, &dev)?;
            let out = timed("vae-decode", args.repeat, || Ok(vae.decode(z.clone())?))?;
            BTreeMap::from([("sample".to_string(), HostTensor::from_tensor(out))])
        }
        other => bail!("unknown stage `{other}`; expected one of: {}", STAGES.join(", ")),
    };
    write_output(&args.output, &outputs)
}

fn write_output(path: &Path, t: &Tensors) -> Result<()> {
    write_tensors(path, t, &BTreeMap::new())?;
    tracing::info!("wrote {}", path.display());
    Ok(())
}
