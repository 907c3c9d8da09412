//! What a generation is asked for: the options, the visual prompt and the request that
//! bundles them, and how the images are batched.

use burn::tensor::{backend::Backend, Tensor};
use q_aligner::Aligner;

/// What to generate. Defaults follow `StableDiffusionPipeline.__call__`.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub prompt: String,
    /// Empty string when `None`, as diffusers.
    pub negative_prompt: Option<String>,
    pub steps: usize,
    pub guidance: f64,
    /// A scheduler name (`ddim`, `euler`, `dpm++2m`, ...) overriding the model's.
    pub scheduler: Option<String>,
    pub seed: u64,
    pub num_images: usize,
    /// Images per UNet batch; `None`: as many as fit in memory, at most
    /// [`DEFAULT_MAX_BATCH`]. Images are written batch by batch, so any number of them runs in
    /// bounded memory.
    pub batch_size: Option<usize>,
    pub height: Option<usize>,
    pub width: Option<usize>,
    /// SDXL's size conditioning (`add_time_ids`): the original image size as (height, width),
    /// default the image size.
    pub original_size: Option<[usize; 2]>,
    /// The crop's top-left corner as (top, left); default (0, 0).
    pub crop_top_left: Option<[usize; 2]>,
    /// The target size as (height, width); default the image size.
    pub target_size: Option<[usize; 2]>,
}

/// The largest batch chosen when `batch_size` is not given: beyond it a CPU gains nothing
/// and a GPU little, while the images of a batch wait for the slowest.
pub const DEFAULT_MAX_BATCH: usize = 8;

/// Generation of `count` images in batches of `batch`: image `i` is in batch `i / batch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batches {
    pub count: usize,
    pub batch: usize,
}

impl Batches {
    /// The image ranges of the batches, in order.
    pub fn ranges(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        (0..self.count.div_ceil(self.batch)).map(|b| b * self.batch..((b + 1) * self.batch).min(self.count))
    }
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: None,
            steps: 50,
            guidance: 7.5,
            scheduler: None,
            seed: 0,
            num_images: 1,
            batch_size: None,
            height: None,
            width: None,
            original_size: None,
            crop_top_left: None,
            target_size: None,
        }
    }
}

/// Visual-prompt conditioning for one generation: an aligner and the BLIP-2 queries of the
/// reference image(s).
pub struct VisualPrompt<'a, B: Backend> {
    pub aligner: &'a Aligner<B>,
    /// `[N, Q, 768]`; several images are averaged into one visual prompt.
    pub queries: Tensor<B, 3>,
}

/// One generation: the options, and what else conditions it.
///
/// ```no_run
/// # fn f(pipe: &personalize::Pipeline<burn_flex::Flex>, vp: &personalize::VisualPrompt<burn_flex::Flex>) -> personalize::Result<()> {
/// let opts = personalize::GenerateOptions { prompt: "a toy on a beach".into(), ..Default::default() };
/// let images = pipe.generate(personalize::GenerateRequest::new(&opts).visual(vp))?;
/// # Ok(()) }
/// ```
pub struct GenerateRequest<'a, B: Backend> {
    /// What to generate.
    pub options: &'a GenerateOptions,
    /// A visual prompt (aligner and BLIP-2 queries); `None`: text only.
    pub visual: Option<&'a VisualPrompt<'a, B>>,
    /// Initial latents (unscaled noise `[N, 4, h, w]`), instead of the seed's; they set the
    /// number of images.
    pub latents: Option<Tensor<B, 4>>,
    /// Make only this image (its batch is run, the others are not handed over).
    pub only: Option<usize>,
}

impl<'a, B: Backend> GenerateRequest<'a, B> {
    /// A text-to-image request with the seed's noise.
    pub fn new(options: &'a GenerateOptions) -> Self {
        GenerateRequest { options, visual: None, latents: None, only: None }
    }

    /// With a visual prompt.
    pub fn visual(mut self, visual: &'a VisualPrompt<'a, B>) -> Self {
        self.visual = Some(visual);
        self
    }

    /// With initial latents.
    pub fn latents(mut self, latents: Tensor<B, 4>) -> Self {
        self.latents = Some(latents);
        self
    }

    /// Only image `index`.
    pub fn only(mut self, index: usize) -> Self {
        self.only = Some(index);
        self
    }
}
