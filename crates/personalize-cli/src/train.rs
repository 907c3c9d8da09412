//! `personalize train`: trains a concept (aligner + UNet, full or LoRA, or aligner only) from
//! a few images and writes the concept folder.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use model_io::tensor_file::HostTensor;
use personalize::train::{self, PriorConfig, TrainConfig, TrainData, UnetMode};
use q_aligner::QuerySelection;

use crate::backend::{device, B};

/// Train a concept: the aligner of BLIP-2 visual prompts and the UNet (LoRA by default).
///
/// The images are cropped and resized to --resolution (plus --augment random crops each) and
/// encoded once by the frozen VAE and BLIP-2; the prompt once by the frozen text encoder. Each
/// step then trains the aligner and the UNet (per --unet) with the diffusion loss. The concept
/// folder (concept.json, aligner.safetensors, unet_lora.safetensors or unet/,
/// visual_queries.safetensors, loss.csv, loss.png, samples/, checkpoints/) is written every
/// --save-every steps and at the end.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainCli {
    /// The base model, a diffusers Stable Diffusion pipeline (model_index.json, unet/, vae/, ...):
    /// a folder, a preset (sd-v1-5, sd-2-1-base, sd-2-1) or a repo id already fetched
    /// (`cargo xtask fetch`), a single-file checkpoint (FILE.safetensors) or an ONNX pipeline
    /// folder (unet/model.onnx, ...).
    #[arg(long)]
    pub base: PathBuf,
    /// Single-file and ONNX --base only: a diffusers folder with the file's configs (as for generate).
    #[arg(long, value_name = "DIR")]
    pub config: Option<PathBuf>,
    /// Single-file and ONNX --base only: what the UNet predicts, `epsilon` or `v_prediction` (as for
    /// generate).
    #[arg(long, value_name = "TYPE", value_parser = ["epsilon", "v_prediction"])]
    pub prediction_type: Option<String>,
    /// The BLIP-2 model (transformers layout) that makes the visual prompts: a folder, a preset
    /// (blip2, blip2-itm-vit-g) or a repo id already fetched.
    #[arg(long)]
    pub blip2: PathBuf,
    /// A training image (PNG or JPEG); repeat the flag for several (1 to N).
    #[arg(long = "image", required = true)]
    pub images: Vec<PathBuf>,
    /// The text part of the conditioning (the visual tokens are appended after it).
    #[arg(long, default_value = "a photo")]
    pub prompt: String,
    /// The concept folder to write (created if needed).
    #[arg(long)]
    pub out: PathBuf,
    /// Optimizer steps in total (with --resume: up to this many).
    #[arg(long, default_value_t = 400)]
    pub steps: usize,
    /// Learning rate of the aligner (AdamW, constant).
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Learning rate of the UNet (default: --lr for LoRA, 5e-6 for --unet full).
    #[arg(long)]
    pub unet_lr: Option<f64>,
    /// Linear learning-rate warm-up over this many steps.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Images per step.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Training resolution in pixels (a multiple of 8; 512 for SD 1.5, 768 for SD 2.x 768-v).
    #[arg(long, default_value_t = 512)]
    pub resolution: usize,
    /// Visual tokens k appended to the 77 text tokens.
    #[arg(long = "queries", default_value_t = 8)]
    pub num_queries: usize,
    /// Which BLIP-2 queries feed the aligner: `first` (the first k) or `pool` (average pooling of all into k).
    #[arg(long, default_value = "first", value_parser = ["first", "pool"])]
    pub query_selection: String,
    /// Hidden width of the aligner (default: the text-embedding width, 768 for SD 1.5).
    #[arg(long)]
    pub aligner_hidden: Option<usize>,
    /// What of the UNet trains: `lora` (adapters on the attention projections), `full` (every
    /// weight; writes a full unet/ of the model's size) or `frozen` (the aligner only).
    #[arg(long, default_value = "lora", value_parser = ["full", "lora", "frozen"])]
    pub unet: String,
    /// LoRA rank (with --unet lora) [default: 4].
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// LoRA alpha (scale alpha/rank; default: the rank, a scale of 1).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Random seed (initial weights, crops, noise, timesteps): the same seed gives the same concept.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write a checkpoint, the concept folder and a sample image every N steps (0: only at the end).
    #[arg(long, default_value_t = 100)]
    pub save_every: usize,
    /// Continue from the last checkpoint in --out (same settings and images; --steps may grow).
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// Replace a training run or concept already in --out (its checkpoints, samples and concept
    /// files; class_images/ is kept). Without it, such a folder is refused.
    #[arg(long)]
    pub overwrite: bool,
    /// Random crops per image besides the centre crop (each encoded once by the VAE).
    #[arg(long, default_value_t = 3)]
    pub augment: usize,
    /// Mirror the random crops at random.
    #[arg(long)]
    pub flip: bool,
    /// Denoising steps of the sample images (0: no samples).
    #[arg(long, default_value_t = 25)]
    pub sample_steps: usize,
    /// Recompute memory-bound activations in the backward pass instead of keeping them (Burn's
    /// balanced checkpointing): the same gradients with about 45% less activation memory (SD
    /// 1.5, LoRA, 512²: peak 14.2 -> 9.4 GiB), for higher --resolution or --batch.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Clip the gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Prior preservation (DreamBooth): the class prompt, e.g. "a photo of a dog".
    #[arg(long)]
    pub class_prompt: Option<String>,
    /// Prior preservation: a folder of class images. Missing ones (up to --num-class-images) are
    /// made by the base model and saved there (default folder: OUT/class_images).
    #[arg(long)]
    pub class_images: Option<PathBuf>,
    /// Prior preservation: how many class images to use.
    #[arg(long, default_value_t = 50)]
    pub num_class_images: usize,
    /// Prior preservation: denoising steps for the class images the base model makes.
    #[arg(long, default_value_t = 25)]
    pub class_image_steps: usize,
    /// Prior preservation: weight of the class loss [default: 1].
    #[arg(long)]
    pub prior_weight: Option<f64>,
}

impl TrainCli {
    /// The library's settings for these flags.
    pub fn config(&self) -> Result<TrainConfig> {
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            bail!("--max-grad-norm {} must be a non-negative number (0: no clipping)", self.max_grad_norm);
        }
        if self.class_prompt.is_none() && self.class_images.is_some() {
            bail!("--class-images needs --class-prompt (prior preservation trains on class images with that prompt)");
        }
        if self.class_prompt.is_some() && self.num_class_images == 0 {
            bail!("--num-class-images must be at least 1 with --class-prompt");
        }
        if self.class_prompt.is_some() && self.class_image_steps == 0 {
            bail!("--class-image-steps must be at least 1");
        }
        if self.class_prompt.is_none() && self.prior_weight.is_some() {
            bail!("--prior-weight needs --class-prompt (it weighs the class images' loss)");
        }
        if self.unet != "lora" && (self.lora_rank.is_some() || self.lora_alpha.is_some()) {
            bail!("--lora-rank and --lora-alpha need --unet lora (this run trains --unet {})", self.unet);
        }
        if self.unet == "frozen" && self.unet_lr.is_some() {
            bail!("--unet-lr needs --unet lora or full (--unet frozen trains the aligner only)");
        }
        if self.max_grad_norm > 0.0 && self.max_grad_norm < 1e-6 {
            bail!(
                "--max-grad-norm {} would stop all training; give 0 (no clipping) or a norm such as 1",
                self.max_grad_norm
            );
        }
        if self.warmup_steps > self.steps {
            bail!(
                "--warmup-steps {} is more than --steps {}: the learning rate would never reach --lr",
                self.warmup_steps,
                self.steps
            );
        }
        if self.lora_alpha.is_some_and(|a| !(a.is_finite() && a > 0.0 && a <= 1e4)) {
            bail!(
                "--lora-alpha {} is absurd; give a positive number up to 10000 (usually the rank)",
                self.lora_alpha.unwrap_or_default()
            );
        }
        for (flag, v, max) in [
            ("--lora-rank", self.lora_rank.unwrap_or(4), 1024),
            ("--aligner-hidden", self.aligner_hidden.unwrap_or(1), 65536),
            ("--augment", self.augment, 1000),
            ("--sample-steps", self.sample_steps, 1000),
            ("--class-image-steps", self.class_image_steps, 1000),
        ] {
            if v > max {
                bail!("{flag} {v} is absurd; at most {max}");
            }
        }
        let rank = self.lora_rank.unwrap_or(4);
        let unet_mode = match self.unet.as_str() {
            "full" => UnetMode::Full,
            "lora" => UnetMode::Lora { rank, alpha: self.lora_alpha.unwrap_or(rank as f64) },
            "frozen" => UnetMode::Frozen,
            o => bail!("--unet {o}: expected full, lora or frozen"),
        };
        let unet_lr = self.unet_lr.or(if unet_mode == UnetMode::Full { Some(5e-6) } else { None });
        let cfg = TrainConfig {
            steps: self.steps,
            lr: self.lr,
            unet_lr,
            warmup_steps: self.warmup_steps,
            batch: self.batch,
            resolution: self.resolution,
            num_queries: self.num_queries,
            query_selection: QuerySelection::parse(&self.query_selection)?,
            aligner_hidden: self.aligner_hidden,
            unet_mode,
            seed: self.seed,
            save_every: self.save_every,
            prompt: self.prompt.clone(),
            augment: self.augment,
            flip: self.flip,
            max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
            sample_steps: self.sample_steps,
            gradient_checkpointing: self.gradient_checkpointing,
            prior: self
                .class_prompt
                .clone()
                .map(|p| PriorConfig { class_prompt: p, weight: self.prior_weight.unwrap_or(1.0) }),
            ..TrainConfig::default()
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Runs `personalize train`.
pub fn run(args: TrainCli) -> Result<()> {
    let cfg = args.config()?;
    if args.out.exists() && !args.out.is_dir() {
        bail!("--out {} is a file; give a folder", args.out.display());
    }
    if args.overwrite {
        // --overwrite must never take an input with it.
        let canon = |p: &Path| std::fs::canonicalize(p).ok();
        for name in train::RUN_OUTPUTS {
            let Some(target) = canon(&args.out.join(name)) else { continue };
            if let Some(img) = args.images.iter().find(|i| canon(i).is_some_and(|c| c.starts_with(&target))) {
                bail!(
                    "--overwrite would remove the training image {} ({} in {} is a file a run writes); move it elsewhere first",
                    img.display(),
                    name,
                    args.out.display()
                );
            }
        }
    }
    let created = !args.out.exists();
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let out = args.out.clone();
    let r = run_in(args, cfg);
    if r.is_err() && created {
        // Refused or failed before writing anything: leave no empty folder (remove_dir only
        // removes an empty one).
        let _ = std::fs::remove_dir(&out);
    }
    r
}

/// Removes `dir/step-*.png` (the samples a run writes), and `dir` if that empties it.
fn remove_samples(dir: &Path) -> Result<()> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Ok(()) };
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = name
            .strip_prefix("step-")
            .and_then(|s| s.strip_suffix(".png"))
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()));
        if ours {
            std::fs::remove_file(e.path()).with_context(|| format!("--overwrite: removing {}", e.path().display()))?;
        }
    }
    let _ = std::fs::remove_dir(dir);
    Ok(())
}

/// The run, in its existing output folder.
fn run_in(args: TrainCli, cfg: train::TrainConfig) -> Result<()> {
    // Held for the whole run (train() takes it again); another run on the same --out is refused.
    let _lock = train::OutLock::take(&args.out)?;
    // A folder with files of its own that is not a concept is not ours to write into.
    let is_concept = args.out.join("concept.json").exists() || args.out.join("checkpoints").exists();
    let foreign: Vec<String> = std::fs::read_dir(&args.out)
        .with_context(|| format!("reading {}", args.out.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n != ".lock" && n != "class_images")
        .collect();
    if !is_concept && !foreign.is_empty() && !args.overwrite {
        bail!(
            "--out {} holds other files ({}) and is not a concept folder; choose an empty or new folder, or pass --overwrite to replace the files a run writes",
            args.out.display(),
            foreign.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
        );
    }
    if args.overwrite {
        for name in train::RUN_OUTPUTS {
            let p = args.out.join(name);
            if *name == "samples" {
                // Only the sample images a run wrote (step-NNNNNN.png); the user's files stay.
                remove_samples(&p)?;
                continue;
            }
            let removed = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
            match removed {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("--overwrite: removing {}", p.display()))
                }
                _ => {}
            }
        }
    }
    // Every image is read before anything heavy is loaded: a bad one stops the run here, named.
    let images = train::load_images(&args.images)?;
    let dev = device();
    let base = personalize::Base {
        config: args.config.clone(),
        prediction_type: args.prediction_type.clone(),
        ..personalize::Base::new(&args.base)
    };

    let class_images = match &cfg.prior {
        None => vec![],
        Some(p) => {
            let dir = args.class_images.clone().unwrap_or_else(|| args.out.join("class_images"));
            let have = if dir.is_dir() { train::image_files(&dir)?.len() } else { 0 };
            if have < args.num_class_images {
                let bar = ProgressBar::new(args.num_class_images as u64);
                bar.set_style(
                    ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}")
                        .expect("valid template"),
                );
                bar.set_message("class images");
                let job = train::ClassImages {
                    base: base.clone(),
                    prompt: p.class_prompt.clone(),
                    n: args.num_class_images,
                    resolution: cfg.resolution,
                    steps: args.class_image_steps,
                    seed: cfg.seed,
                    dir: dir.clone(),
                };
                train::generate_class_images::<B>(&job, &dev, &mut |i, _| bar.set_position(i as u64))
                    .context("making class images with the base model")?;
                bar.finish_and_clear();
            }
            let mut files = train::image_files(&dir)?;
            files.truncate(args.num_class_images);
            train::load_images(&files)?
        }
    };

    eprintln!("encoding {} image(s) with BLIP-2", images.len());
    let q = crate::encode::encode_images(&args.blip2, &args.images).context("BLIP-2 encoding")?;
    let queries = HostTensor::from_tensor(q);
    let data = TrainData { images, queries, class_images };

    let bar = ProgressBar::new(cfg.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("train [{bar:30}] {pos}/{len} steps, loss {msg} {elapsed_precise} eta {eta}")
            .expect("valid template"),
    );
    let mut ema: Option<f64> = None;
    crate::interrupt::install();
    let request = train::TrainRequest { base: &base, config: &cfg, data: &data, out: &args.out, resume: args.resume };
    let mut on_step = |s: &train::StepInfo| {
        let e = match ema {
            Some(e) => 0.95 * e + 0.05 * s.loss,
            None => s.loss,
        };
        ema = Some(e);
        bar.set_position(s.step as u64);
        bar.set_message(match s.prior_loss {
            Some(p) => format!("{:.4} (avg {e:.4}, prior {p:.4})", s.loss),
            None => format!("{:.4} (avg {e:.4})", s.loss),
        });
    };
    let report = if args.gradient_checkpointing {
        use burn_autodiff::checkpoint::strategy::BalancedCheckpointing;
        eprintln!("gradient checkpointing: memory-bound activations are recomputed in the backward pass");
        train::train::<burn_autodiff::Autodiff<B, BalancedCheckpointing>>(&request, &dev, &mut on_step)
    } else {
        train::train::<burn_autodiff::Autodiff<B>>(&request, &dev, &mut on_step)
    };
    bar.finish_and_clear();
    let report = report?;
    if let Some(s) = report.resumed_from {
        eprintln!("resumed from step {s}");
    }
    eprintln!(
        "trained {} steps; final loss {}; concept written to {}",
        report.steps_done,
        report.final_loss.map(|l| format!("{l:.4}")).unwrap_or_else(|| "-".into()),
        report.concept_dir.display()
    );
    Ok(())
}
