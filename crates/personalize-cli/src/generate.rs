//! `personalize generate`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::tensor::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use personalize::{Concept, GenerateOptions, ImageSettings, Pipeline, VisualPrompt};

use crate::backend::{device, B};

/// Generate images from a prompt, optionally with a trained concept (visual prompt).
///
/// Defaults follow diffusers' StableDiffusionPipeline: 50 steps, guidance 7.5, the model's
/// scheduler, and the UNet's sample size times the VAE factor (512 for SD 1.5).
/// Images are written as OUT/0000.png, OUT/0001.png, ... with the settings in PNG text chunks:
/// `parameters` (the A1111 infotext that A1111, ComfyUI and civitai read) and `personalize`
/// (all settings as JSON, for --params-from).
#[derive(clap::Args, Debug, Clone)]
pub struct GenerateCli {
    /// The base model: a diffusers Stable Diffusion folder (model_index.json, unet/, vae/, ...),
    /// a preset (sd-v1-5, sd-2-1-base, sd-2-1) or a repo id already fetched (`cargo xtask
    /// fetch`), a single-file checkpoint (FILE.safetensors, the A1111/civitai layout), or an
    /// ONNX pipeline folder (diffusers' `OnnxStableDiffusionPipeline` or optimum's export:
    /// unet/model.onnx, vae_encoder/, vae_decoder/, ...). Required unless --params-from gives one.
    #[arg(long, required_unless_present = "params_from")]
    pub base: Option<PathBuf>,
    /// Single-file and ONNX --base only: a diffusers folder whose configs (unet/, vae/,
    /// text_encoder/, tokenizer/, scheduler/; an SDXL folder's text_encoder_2/, tokenizer_2/
    /// and model_index.json too) describe the base's models, as diffusers'
    /// `from_single_file(config=DIR)`. Without it, an ONNX model's config.json beside its
    /// model.onnx is read; otherwise the configs of a standard SD 1.x/2.x or SDXL base model
    /// are inferred from the tensors' shapes, with the bundled CLIP tokenizer and SD 1.5's (or
    /// SDXL's) scheduler (an ONNX folder's own tokenizer/ and scheduler/ when it has them).
    #[arg(long, value_name = "DIR")]
    pub config: Option<PathBuf>,
    /// Single-file and ONNX --base only: what the UNet predicts, `epsilon` or `v_prediction` (SD 2.x
    /// 768-pixel models). Default: the file's metadata (modelspec.prediction_type), else the
    /// config's, else epsilon.
    #[arg(long, value_name = "TYPE", value_parser = ["epsilon", "v_prediction"])]
    pub prediction_type: Option<String>,
    /// A LoRA merged into the base model's UNet and text encoder, with its weight (default 1.0);
    /// repeatable, the LoRAs add up (as diffusers' `set_adapters` with `adapter_weights`). Reads
    /// diffusers/PEFT files (`unet.…lora_A/lora_B`, `text_encoder.…`) and kohya/A1111 files
    /// (`lora_unet_…`, `lora_te_…`, `lora_down/lora_up/alpha`, LoCon on convolutions).
    #[arg(long = "lora", value_name = "FILE[:SCALE]")]
    pub loras: Vec<personalize::LoraSpec>,
    /// What to draw. Required unless --params-from gives it.
    #[arg(long, required_unless_present = "params_from")]
    pub prompt: Option<String>,
    /// What to steer away from (the unconditional branch of guidance).
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Denoising steps [default: 50].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale; 1 disables guidance (one UNet pass per step) [default: 7.5].
    #[arg(long)]
    pub guidance: Option<f64>,
    /// The scheduler (default: the model's). diffusers' class names are accepted too.
    #[arg(long)]
    pub scheduler: Option<crate::names::SchedulerName>,
    /// Random seed for the initial noise (default: a fresh one, recorded in the PNGs).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Number of images [default: 1]. They are made batch by batch and each is written as soon
    /// as its batch is done, so any number runs in bounded memory.
    #[arg(long)]
    pub num_images: Option<usize>,
    /// Images per UNet batch (default: as many as fit in the memory available, at most 8).
    /// Ancestral schedulers (euler-a, ddpm) draw their noise per batch, so the images record it.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Image height in pixels (a multiple of 8).
    #[arg(long)]
    pub height: Option<usize>,
    /// Image width in pixels (a multiple of 8).
    #[arg(long)]
    pub width: Option<usize>,
    /// SDXL's size conditioning: the original image size the model is told, as HEIGHT,WIDTH
    /// (default: the image size). Larger values ask for the look of a high-resolution source.
    #[arg(long, value_name = "H,W", value_parser = pair)]
    pub original_size: Option<[usize; 2]>,
    /// SDXL's size conditioning: the top-left corner of the crop the model is told, as TOP,LEFT
    /// (default 0,0: uncropped; non-zero values tend to cut the subject off).
    #[arg(long, value_name = "TOP,LEFT", value_parser = pair)]
    pub crop_top_left: Option<[usize; 2]>,
    /// SDXL's size conditioning: the target size, as HEIGHT,WIDTH (default: the image size).
    #[arg(long, value_name = "H,W", value_parser = pair)]
    pub target_size: Option<[usize; 2]>,
    /// Initial noise: a safetensors file with tensor `latents` [N,4,h,w], before scaling by the
    /// scheduler's init_noise_sigma (as diffusers' `latents=`); its batch sets the image count.
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// A concept folder from `personalize train` (aligner, LoRA or UNet, cached queries).
    #[arg(long)]
    pub concept: Option<PathBuf>,
    /// A new reference image for the concept's visual prompt (repeatable; averaged). Needs --blip2.
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    /// The BLIP-2 model, for --image: a folder, a preset (blip2, blip2-itm-vit-g) or a repo id
    /// already fetched.
    #[arg(long)]
    pub blip2: Option<PathBuf>,
    /// Use a concept even if it was trained on another base model.
    #[arg(long)]
    pub allow_base_mismatch: bool,
    /// Re-run the settings of an image this command wrote (its `personalize` text chunk; for
    /// other images, the prompt, negative prompt, steps, CFG scale, seed and size of an A1111
    /// `parameters` chunk): prompt, negative prompt, seed, steps, guidance, scheduler, size,
    /// base model, concept and reference images. Flags given here override the image's. The
    /// image itself is made again (image i of a batch: the first i + 1 of it are sampled, and
    /// only the last is written) unless --num-images is given.
    #[arg(long, value_name = "IMAGE")]
    pub params_from: Option<PathBuf>,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace images already in the output folder (0000.png, ...) instead of refusing.
    #[arg(long)]
    pub overwrite: bool,
}

/// Parsed `generate` arguments.
pub struct GenerateArgs {
    pub base: PathBuf,
    /// `--config` and `--prediction-type` (single-file bases).
    pub base_config: Option<PathBuf>,
    pub prediction_type: Option<String>,
    pub loras: Vec<personalize::LoraSpec>,
    pub opts: GenerateOptions,
    pub seed_given: bool,
    pub latents: Option<PathBuf>,
    pub concept: Option<PathBuf>,
    pub images: Vec<PathBuf>,
    pub blip2: Option<PathBuf>,
    pub allow_base_mismatch: bool,
    pub out: PathBuf,
    pub overwrite: bool,
    /// The image whose settings these are (`--params-from`), for messages.
    pub from: Option<PathBuf>,
    /// Make and write only this image of the generation (re-running one image of an earlier
    /// one): its batch is sampled, the image is written as 0000.png.
    pub only: Option<usize>,
}

/// A model argument recorded in an image: resolved as on the command line.
fn resolve_model(p: &str, what: &str, image: &Path) -> Result<PathBuf> {
    hub::resolve_model(p).with_context(|| format!("the {what} recorded in {}", image.display()))
}

/// `A,B` (two whole numbers) for the size-conditioning flags.
fn pair(s: &str) -> std::result::Result<[usize; 2], String> {
    let bad = || format!("`{s}` is not two whole numbers as A,B (for example 1024,1024)");
    let (a, b) = s.split_once(',').ok_or_else(bad)?;
    Ok([a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?])
}

/// The command line merged over the settings of `--params-from` (the flags given win).
pub fn args(cli: GenerateCli) -> Result<GenerateArgs> {
    let Some(image) = cli.params_from.clone() else {
        let (Some(base), Some(prompt)) = (cli.base, cli.prompt) else { bail!("--base and --prompt are required") };
        return Ok(GenerateArgs {
            base,
            base_config: cli.config,
            prediction_type: cli.prediction_type,
            loras: cli.loras,
            opts: GenerateOptions {
                prompt,
                negative_prompt: cli.negative_prompt,
                steps: cli.steps.unwrap_or(50),
                guidance: cli.guidance.unwrap_or(7.5),
                scheduler: cli.scheduler.map(|s| s.as_str().to_string()),
                seed: cli.seed.unwrap_or(0),
                num_images: cli.num_images.unwrap_or(1),
                batch_size: cli.batch_size,
                height: cli.height,
                width: cli.width,
                original_size: cli.original_size,
                crop_top_left: cli.crop_top_left,
                target_size: cli.target_size,
            },
            seed_given: cli.seed.is_some(),
            latents: cli.latents,
            concept: cli.concept,
            images: cli.images,
            blip2: cli.blip2,
            allow_base_mismatch: cli.allow_base_mismatch,
            out: cli.out,
            overwrite: cli.overwrite,
            from: None,
            only: None,
        });
    };
    let s = ImageSettings::from_png(&image)?;
    if cli.latents.is_some() && cli.num_images.is_some() {
        bail!("--num-images and --latents both set the number of images; give one of them");
    }
    // The image's --config, --prediction-type and LoRAs go with its base (flags win).
    let image_base = cli.base.is_none();
    let (base, base_config, prediction_type) = match (cli.base, &s.base) {
        (Some(b), _) => (b, cli.config, cli.prediction_type),
        (None, Some(b)) => (
            resolve_model(b, "base model", &image)?,
            cli.config.or_else(|| s.config.as_ref().map(PathBuf::from)),
            cli.prediction_type.or_else(|| s.prediction_type.clone()),
        ),
        (None, None) => bail!("{} records no base model; pass --base", image.display()),
    };
    let loras = if cli.loras.is_empty() && image_base {
        s.loras
            .iter()
            .map(|l| l.parse().with_context(|| format!("the LoRA recorded in {}", image.display())))
            .collect::<Result<Vec<personalize::LoraSpec>>>()?
    } else {
        cli.loras
    };
    // The reference images belong to the image's concept; its latents to its seed and size.
    let image_concept = cli.concept.is_none();
    let concept = cli.concept.or_else(|| s.concept.as_ref().map(PathBuf::from));
    let (images, blip2) = if cli.images.is_empty() && image_concept && !s.images.is_empty() {
        let blip2 = match (cli.blip2, &s.blip2) {
            (Some(b), _) => Some(b),
            (None, Some(b)) => Some(resolve_model(b, "BLIP-2 model", &image)?),
            (None, None) => None,
        };
        (s.images.iter().map(PathBuf::from).collect(), blip2)
    } else {
        (cli.images, cli.blip2)
    };
    let noise_given = cli.latents.is_some() || cli.seed.is_some() || cli.height.is_some() || cli.width.is_some();
    let latents = if noise_given { cli.latents } else { s.latents.as_ref().map(PathBuf::from) };
    // The image's own generation, so its noise is drawn as it was: images written before
    // batching were one batch of num_images.
    let (num_images, batch_size, only) = match cli.num_images {
        Some(n) => (n, cli.batch_size, None),
        None => (s.num_images, cli.batch_size.or(s.batch_size).or(Some(s.num_images)), Some(s.image_index)),
    };
    Ok(GenerateArgs {
        base,
        base_config,
        prediction_type,
        loras,
        opts: GenerateOptions {
            prompt: cli.prompt.unwrap_or(s.prompt),
            negative_prompt: cli.negative_prompt.or(s.negative_prompt),
            steps: cli.steps.unwrap_or(s.steps),
            guidance: cli.guidance.unwrap_or(s.guidance),
            scheduler: cli.scheduler.map(|s| s.as_str().to_string()).or(s.scheduler),
            seed: cli.seed.unwrap_or(s.seed),
            num_images,
            batch_size,
            height: cli.height.or(s.height),
            width: cli.width.or(s.width),
            original_size: cli.original_size.or(s.original_size),
            crop_top_left: cli.crop_top_left.or(s.crop_top_left),
            target_size: cli.target_size.or(s.target_size),
        },
        seed_given: true,
        latents,
        concept,
        images,
        blip2,
        allow_base_mismatch: cli.allow_base_mismatch,
        out: cli.out,
        overwrite: cli.overwrite,
        from: Some(image),
        only,
    })
}

/// `personalize generate`.
pub fn run(cli: GenerateCli) -> Result<()> {
    if cli.latents.is_some() && cli.num_images.is_some() {
        bail!("--num-images and --latents both set the number of images (the latents' batch); give one of them");
    }
    if cli.blip2.is_some() && cli.images.is_empty() {
        bail!("--blip2 is only used with --image (new reference images for the concept); give --image or drop --blip2");
    }
    let a = args(cli)?;
    match a.from.clone() {
        // Values read from the image are not flags the user typed: say where they came from.
        Some(from) => generate(a).with_context(|| format!("re-running the settings of {}", from.display())),
        None => generate(a),
    }
}

/// `p` as an absolute path (for the settings an image records: a relative one would resolve
/// elsewhere when the image is re-run from another folder).
fn absolute(p: &Path) -> String {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()).display().to_string()
}

pub fn generate(mut a: GenerateArgs) -> Result<()> {
    if !a.images.is_empty() && a.blip2.is_none() {
        bail!("--image needs --blip2 DIR (the BLIP-2 model that encodes reference images)");
    }
    if !a.images.is_empty() && a.concept.is_none() {
        bail!("--image needs --concept DIR (its aligner turns the image into visual tokens)");
    }
    if a.latents.is_some() && a.seed_given && a.from.is_none() {
        tracing::warn!("--latents gives the initial noise: --seed only seeds the step noise of ancestral schedulers (euler-a, ddpm)");
    }
    if !a.seed_given {
        // As diffusers without a generator: a fresh seed, recorded in the PNGs.
        a.opts.seed =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    }
    let dev = device();
    let mut pipe = Pipeline::<B>::open(
        &personalize::Base {
            path: a.base.clone(),
            config: a.base_config.clone(),
            prediction_type: a.prediction_type.clone(),
            loras: a.loras.clone(),
        },
        &dev,
    )
    .with_context(|| format!("loading base model {}", a.base.display()))?;
    let latents = match &a.latents {
        Some(p) => {
            let mut t = model_io::tensor_file::read_tensors(p)?;
            let l = model_io::tensor_file::take(&mut t, p, "latents")?
                .to_float::<B, 4>("latents", &dev)
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            let [_, c, h, w] = pipe.latent_shape(&a.opts)?;
            let d = l.dims();
            if d[0] == 0 || d[1..] != [c, h, w] {
                let f = pipe.vae.downscale_factor();
                bail!(
                    "{}: tensor `latents` has shape {d:?}; expected [N >= 1, {c}, {h}, {w}] for {}x{} images",
                    p.display(),
                    w * f,
                    h * f
                );
            }
            let max: f64 = burn::tensor::ElementConversion::elem(l.clone().abs().max().into_scalar());
            if !max.is_finite() {
                bail!("{}: tensor `latents` holds NaN or Inf", p.display());
            }
            if max > 1e4 {
                bail!("{}: tensor `latents` reaches {max:.1e}; it is unscaled initial noise (standard normal, as diffusers' latents=)", p.display());
            }
            if let Some(i) = a.only {
                if d[0] <= i {
                    bail!("{}: {} latents; the image to re-run is number {} of its batch", p.display(), d[0], i + 1);
                }
            }
            a.opts.num_images = d[0];
            Some(l)
        }
        None => None,
    };
    // The batch size is settled once, so the images record the one that ran.
    a.opts.batch_size = Some(pipe.batches(&a.opts)?.batch);
    // Everything the images record, checked before any sampling.
    let mut settings = pipe.image_settings(&a.opts)?;
    settings.base = Some(absolute(&a.base));
    settings.config = a.base_config.as_deref().map(absolute);
    settings.prediction_type = a.prediction_type.clone();
    settings.loras = a.loras.iter().map(|l| format!("{}:{}", absolute(&l.path), l.scale)).collect();
    settings.concept = a.concept.as_deref().map(absolute);
    settings.images = a.images.iter().map(|p| absolute(p)).collect();
    settings.blip2 = if a.images.is_empty() { None } else { a.blip2.as_deref().map(absolute) };
    settings.latents = a.latents.as_deref().map(absolute);
    let text_of = |i: usize| -> personalize::Result<Vec<(&str, String)>> {
        let text = ImageSettings { image_index: i, ..settings.clone() }.png_text()?;
        personalize::check_png_text(&text)?;
        Ok(text)
    };
    // The texts differ only in the image index: the first and the last stand for all.
    text_of(0)?;
    text_of(a.opts.num_images - 1)?;
    let concept = match &a.concept {
        Some(dir) => {
            let c = Concept::<B>::load(dir, &dev)?;
            pipe.apply_concept(&c, a.allow_base_mismatch)?;
            Some(c)
        }
        None => None,
    };
    let queries: Option<Tensor<B, 3>> = match (&concept, a.images.is_empty()) {
        (Some(_), false) => Some(crate::encode::encode_images(a.blip2.as_deref().expect("checked above"), &a.images)?),
        (Some(c), true) => Some(c.queries.clone().with_context(|| {
            format!("concept {} has no visual_queries.safetensors; pass --image REF --blip2 DIR", c.dir.display())
        })?),
        (None, _) => None,
    };
    let visual = match (&concept, queries) {
        (Some(c), Some(q)) => Some(VisualPrompt { aligner: &c.aligner, queries: q }),
        _ => None,
    };
    if a.out.exists() && !a.out.is_dir() {
        bail!("--out {} is a file; give a folder", a.out.display());
    }
    // Nothing a user made is replaced unasked: every image this run would write is checked.
    if !a.overwrite {
        let names: Box<dyn Iterator<Item = usize>> =
            if a.only.is_some() { Box::new(std::iter::once(0)) } else { Box::new(0..a.opts.num_images) };
        if let Some(p) = names.map(|i| a.out.join(format!("{i:04}.png"))).find(|p| p.exists()) {
            bail!(
                "{} exists; pass --overwrite to replace the images in {}, or choose another --out",
                p.display(),
                a.out.display()
            );
        }
    }
    let created = !a.out.exists();
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    crate::interrupt::install();
    let bar = ProgressBar::new(a.opts.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps {elapsed_precise} eta {eta}")
            .expect("valid template"),
    );
    let n = a.opts.num_images;
    bar.set_message(if a.only.is_some() || n == 1 { "sampling".to_string() } else { format!("sampling {n} images") });
    let mut written: Vec<PathBuf> = Vec::new();
    let request = personalize::GenerateRequest { options: &a.opts, visual: visual.as_ref(), latents, only: a.only };
    let result = pipe.generate_each(
        request,
        &mut |i, total| {
            bar.set_length(total as u64);
            bar.set_position(i as u64);
        },
        &mut |i, img| {
            let path = a.out.join(format!("{:04}.png", if a.only.is_some() { 0 } else { i }));
            personalize::write_png(&path, &img, &text_of(i)?)?;
            bar.suspend(|| println!("{}", path.display()));
            written.push(path);
            Ok(())
        },
    );
    bar.finish_and_clear();
    if let Err(e) = result {
        if written.is_empty() && created {
            // Nothing made: leave no empty folder behind (remove_dir only removes an empty one).
            let _ = std::fs::remove_dir(&a.out);
        }
        let of = if a.only.is_some() { 1 } else { n };
        let kept = match written.len() {
            0 => format!("generate stopped before writing any of {of} image(s)"),
            1 => format!("generate stopped after writing 1 of {of} images ({})", written[0].display()),
            k => format!(
                "generate stopped after writing {k} of {of} images ({} to {})",
                written[0].display(),
                written[k - 1].display()
            ),
        };
        return Err(anyhow::Error::new(e).context(kept));
    }
    Ok(())
}
