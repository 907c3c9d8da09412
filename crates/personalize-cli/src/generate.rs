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
    /// The base model, a diffusers Stable Diffusion pipeline (model_index.json, unet/, vae/, ...):
    /// a folder, a preset (sd-v1-5, sd-2-1-base, sd-2-1) or a repo id already fetched
    /// (`cargo xtask fetch`). Required unless --params-from gives one.
    #[arg(long, required_unless_present = "params_from")]
    pub base: Option<PathBuf>,
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
    /// Scheduler: ddim, ddpm, pndm, euler, euler-a, dpm++2m, dpm++2m-karras (default: the model's).
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Random seed for the initial noise (default: a fresh one, recorded in the PNGs).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Number of images [default: 1].
    #[arg(long)]
    pub num_images: Option<usize>,
    /// Image height in pixels (a multiple of 8).
    #[arg(long)]
    pub height: Option<usize>,
    /// Image width in pixels (a multiple of 8).
    #[arg(long)]
    pub width: Option<usize>,
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
}

/// Parsed `generate` arguments.
pub struct GenerateArgs {
    pub base: PathBuf,
    pub opts: GenerateOptions,
    pub seed_given: bool,
    pub latents: Option<PathBuf>,
    pub concept: Option<PathBuf>,
    pub images: Vec<PathBuf>,
    pub blip2: Option<PathBuf>,
    pub allow_base_mismatch: bool,
    pub out: PathBuf,
    /// Images at the start of the batch that are sampled but not written (re-running image
    /// `skip` of an earlier batch).
    pub skip: usize,
}

/// A model argument recorded in an image: resolved as on the command line.
fn resolve_model(p: &str, what: &str, image: &Path) -> Result<PathBuf> {
    hub::resolve_model(p).with_context(|| format!("the {what} recorded in {}", image.display()))
}

/// The command line merged over the settings of `--params-from` (the flags given win).
pub fn args(cli: GenerateCli) -> Result<GenerateArgs> {
    let Some(image) = cli.params_from.clone() else {
        let (Some(base), Some(prompt)) = (cli.base, cli.prompt) else { bail!("--base and --prompt are required") };
        return Ok(GenerateArgs {
            base,
            opts: GenerateOptions {
                prompt,
                negative_prompt: cli.negative_prompt,
                steps: cli.steps.unwrap_or(50),
                guidance: cli.guidance.unwrap_or(7.5),
                scheduler: cli.scheduler,
                seed: cli.seed.unwrap_or(0),
                num_images: cli.num_images.unwrap_or(1),
                height: cli.height,
                width: cli.width,
            },
            seed_given: cli.seed.is_some(),
            latents: cli.latents,
            concept: cli.concept,
            images: cli.images,
            blip2: cli.blip2,
            allow_base_mismatch: cli.allow_base_mismatch,
            out: cli.out,
            skip: 0,
        });
    };
    let s = ImageSettings::from_png(&image)?;
    let base = match (cli.base, &s.base) {
        (Some(b), _) => b,
        (None, Some(b)) => resolve_model(b, "base model", &image)?,
        (None, None) => bail!("{} records no base model; pass --base", image.display()),
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
    let (num_images, skip) = match cli.num_images {
        Some(n) => (n, 0),
        None => (s.image_index + 1, s.image_index),
    };
    Ok(GenerateArgs {
        base,
        opts: GenerateOptions {
            prompt: cli.prompt.unwrap_or(s.prompt),
            negative_prompt: cli.negative_prompt.or(s.negative_prompt),
            steps: cli.steps.unwrap_or(s.steps),
            guidance: cli.guidance.unwrap_or(s.guidance),
            scheduler: cli.scheduler.or(s.scheduler),
            seed: cli.seed.unwrap_or(s.seed),
            num_images,
            height: cli.height.or(s.height),
            width: cli.width.or(s.width),
        },
        seed_given: true,
        latents,
        concept,
        images,
        blip2,
        allow_base_mismatch: cli.allow_base_mismatch,
        out: cli.out,
        skip,
    })
}

/// `personalize generate`.
pub fn run(cli: GenerateCli) -> Result<()> {
    generate(args(cli)?)
}

/// The paths joined for a message.
fn list(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

pub fn generate(mut a: GenerateArgs) -> Result<()> {
    if !a.images.is_empty() && a.blip2.is_none() {
        bail!("--image needs --blip2 DIR (the BLIP-2 model that encodes reference images)");
    }
    if !a.images.is_empty() && a.concept.is_none() {
        bail!("--image needs --concept DIR (its aligner turns the image into visual tokens)");
    }
    if !a.seed_given {
        // As diffusers without a generator: a fresh seed, recorded in the PNGs.
        a.opts.seed =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    }
    let dev = device();
    let mut pipe =
        Pipeline::<B>::load(&a.base, &dev).with_context(|| format!("loading base model {}", a.base.display()))?;
    let latents = match &a.latents {
        Some(p) => {
            let mut t = model_io::tensor_file::read_tensors(p)?;
            let mut l = model_io::tensor_file::take(&mut t, p, "latents")?.to_float::<B, 4>("latents", &dev)?;
            if l.dims()[0] == 0 {
                bail!("{}: tensor `latents` has shape {:?}: no images to make", p.display(), l.dims());
            }
            if a.skip > 0 {
                let n = l.dims()[0];
                if n <= a.skip {
                    bail!("{}: {n} latents; the image to re-run is number {} of its batch", p.display(), a.skip + 1);
                }
                l = l.narrow(0, 0, a.skip + 1);
            }
            a.opts.num_images = l.dims()[0];
            Some(l)
        }
        None => None,
    };
    // Everything the images record, checked before any sampling.
    let mut settings = pipe.image_settings(&a.opts)?;
    settings.concept = a.concept.as_ref().map(|c| c.display().to_string());
    settings.images = a.images.iter().map(|p| p.display().to_string()).collect();
    settings.blip2 = if a.images.is_empty() { None } else { a.blip2.as_ref().map(|p| p.display().to_string()) };
    settings.latents = a.latents.as_ref().map(|p| p.display().to_string());
    let texts = (0..a.opts.num_images)
        .map(|i| {
            let text = ImageSettings { image_index: i, ..settings.clone() }.png_text()?;
            personalize::check_png_text(&text)?;
            Ok(text)
        })
        .collect::<model_io::Result<Vec<_>>>()?;
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
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let bar = ProgressBar::new(a.opts.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps {elapsed_precise} eta {eta}")
            .expect("valid template"),
    );
    bar.set_message("sampling");
    let images = pipe.generate(&a.opts, visual.as_ref(), latents, &mut |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    })?;
    bar.finish_and_clear();
    let paths: Vec<PathBuf> =
        (0..images.len().saturating_sub(a.skip)).map(|j| a.out.join(format!("{j:04}.png"))).collect();
    for (j, (img, text)) in images.iter().zip(&texts).skip(a.skip).enumerate() {
        if let Err(e) = personalize::write_png(&paths[j], img, text) {
            let wrote = if j == 0 { String::new() } else { format!("wrote {}; ", list(&paths[..j])) };
            let rest =
                if j + 1 == paths.len() { String::new() } else { format!("; {} not written", list(&paths[j + 1..])) };
            let (path, e) = (paths[j].display().to_string(), e.to_string());
            let e = e.strip_prefix(&format!("{path}: ")).unwrap_or(&e);
            bail!("{wrote}failed on {path}: {e}{rest}");
        }
        println!("{}", paths[j].display());
    }
    Ok(())
}
