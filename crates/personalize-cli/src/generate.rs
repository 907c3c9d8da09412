//! `personalize generate`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use burn::tensor::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use personalize::{Concept, GenerateOptions, Pipeline, VisualPrompt};

use crate::backend::{device, B};

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
}

pub fn run(mut a: GenerateArgs) -> Result<()> {
    if !a.images.is_empty() && a.blip2.is_none() {
        bail!("--image needs --blip2 DIR (the BLIP-2 model that encodes reference images)");
    }
    if !a.images.is_empty() && a.concept.is_none() {
        bail!("--image needs --concept DIR (its aligner turns the image into visual tokens)");
    }
    if !a.seed_given {
        // As diffusers without a generator: a fresh seed, recorded in the PNGs.
        a.opts.seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    }
    let dev = device();
    let mut pipe = Pipeline::<B>::load(&a.base, &dev).with_context(|| format!("loading base model {}", a.base.display()))?;
    let latents = match &a.latents {
        Some(p) => {
            let mut t = model_io::tensor_file::read_tensors(p)?;
            let l = model_io::tensor_file::take(&mut t, p, "latents")?.to_float::<B, 4>("latents", &dev)?;
            a.opts.num_images = l.dims()[0];
            Some(l)
        }
        None => None,
    };
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
    bar.set_style(ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps {elapsed_precise} eta {eta}").expect("valid template"));
    bar.set_message("sampling");
    let images = pipe.generate(&a.opts, visual.as_ref(), latents, &mut |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    })?;
    bar.finish_and_clear();
    let sched = a.opts.scheduler.clone().unwrap_or_else(|| "model default".into());
    for (i, img) in images.iter().enumerate() {
        let path = a.out.join(format!("{i:04}.png"));
        let mut text = vec![
            ("prompt", a.opts.prompt.clone()),
            ("negative_prompt", a.opts.negative_prompt.clone().unwrap_or_default()),
            ("seed", a.opts.seed.to_string()),
            ("steps", a.opts.steps.to_string()),
            ("guidance", a.opts.guidance.to_string()),
            ("scheduler", sched.clone()),
            ("base", a.base.display().to_string()),
        ];
        if let Some(c) = &a.concept {
            text.push(("concept", c.display().to_string()));
        }
        personalize::write_png(&path, img, &text)?;
        println!("{}", path.display());
    }
    Ok(())
}
