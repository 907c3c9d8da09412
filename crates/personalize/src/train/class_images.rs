//! DreamBooth class images for prior preservation, made with the base model.

#[allow(unused_imports)]
use super::*;

/// What [`generate_class_images`] makes.
#[derive(Debug, Clone)]
pub struct ClassImages {
    /// The base model.
    pub base: crate::Base,
    pub prompt: String,
    /// How many images.
    pub n: usize,
    /// Their side, in pixels.
    pub resolution: usize,
    /// Denoising steps per image.
    pub steps: usize,
    /// Image `i` has seed `seed + i`.
    pub seed: u64,
    /// The folder they are written to.
    pub dir: PathBuf,
}

/// Makes `n` images of `prompt` with the base model (DreamBooth's class images for prior
/// preservation), `resolution`² pixels, `steps` denoising steps, seeds `seed`, `seed + 1`, ...,
/// and writes them to `dir` as `class-0000.png`, ... (skipping the names that exist, so an
/// interrupted run continues). `on_image(i, n)` after each. Returns every image file of `dir`.
pub fn generate_class_images<B: burn::tensor::backend::Backend>(
    job: &ClassImages,
    device: &B::Device,
    on_image: &mut dyn FnMut(usize, usize),
) -> Result<Vec<PathBuf>> {
    let ClassImages { base, prompt, n, resolution, steps, seed, dir } = job;
    let (dir, n, resolution, steps, seed) = (dir.as_path(), *n, *resolution, *steps, *seed);
    std::fs::create_dir_all(dir).map_err(|e| Error::Io { path: dir.into(), cause: e })?;
    let mut pipe: Option<Pipeline<B>> = None;
    for i in 0..n {
        let path = dir.join(format!("class-{i:04}.png"));
        if !path.is_file() {
            if pipe.is_none() {
                pipe = Some(Pipeline::open(base, device)?);
            }
            let p = pipe.as_ref().expect("loaded above");
            let opts = GenerateOptions {
                prompt: prompt.to_string(),
                steps,
                seed: seed.wrapping_add(i as u64),
                height: Some(resolution),
                width: Some(resolution),
                ..Default::default()
            };
            let text = p.image_settings(&opts)?.png_text()?;
            let img = p.generate(crate::GenerateRequest::new(&opts))?;
            write_png(&path, &img[0], &text)?;
        }
        on_image(i + 1, n);
    }
    image_files(dir)
}
