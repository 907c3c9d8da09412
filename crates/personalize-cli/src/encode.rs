//! BLIP-2 encoding of images: `personalize encode`, and reference images for `generate`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::tensor::Tensor;
use model_io::tensor_file::{write_tensors, HostTensor};

use crate::backend::{device, B};

/// Q-Former queries `[N, Q, 768]` of `images` (decoded and resized in parallel, encoded in
/// batches, with a progress bar past a few images).
pub fn encode_images(blip2: &Path, images: &[PathBuf]) -> Result<Tensor<B, 3>> {
    if images.is_empty() {
        bail!("no images given (--image PATH)");
    }
    let enc = blip2_encoder::Blip2Encoder::<B>::load(blip2, &device())
        .with_context(|| format!("loading BLIP-2 from {}", blip2.display()))?;
    let q = enc.encode_images(images)?;
    if !personalize::check::all_finite(&q) {
        return Err(personalize::check::nonfinite_error("the BLIP-2 queries", "BLIP-2 model", &enc, blip2).into());
    }
    Ok(q)
}

/// Encode images with BLIP-2 (vision transformer + Q-Former) into visual-prompt queries.
///
/// Writes tensor `queries` [N, Q, 768] (the Q-Former's last hidden state per image).
#[derive(clap::Args)]
pub struct EncodeArgs {
    /// The BLIP-2 model (transformers layout: Blip2Model, Blip2ForConditionalGeneration
    /// or Blip2ForImageTextRetrieval; language-model weights are never read): a folder, a
    /// preset (blip2, blip2-itm-vit-g) or a repo id already fetched (`cargo xtask fetch`).
    #[arg(long)]
    pub blip2: PathBuf,
    /// An image to encode (repeatable). PNG and JPEG; EXIF orientation is applied.
    #[arg(long = "image", required = true)]
    pub images: Vec<PathBuf>,
    /// Output safetensors file (written atomically).
    #[arg(long)]
    pub out: PathBuf,
}

/// `personalize encode`: writes `queries` `[N, Q, 768]` to `--out` (atomically).
pub fn run(a: &EncodeArgs) -> Result<()> {
    let (blip2, images, out) = (a.blip2.as_path(), a.images.as_slice(), a.out.as_path());
    let same =
        |a: &Path, b: &Path| std::fs::canonicalize(a).ok().is_some_and(|a| std::fs::canonicalize(b).ok() == Some(a));
    if let Some(img) = images.iter().find(|i| same(i, out)) {
        bail!("--out {} is the input image {}; choose another file", out.display(), img.display());
    }
    if out.is_dir() {
        bail!("--out {} is a folder; give a .safetensors file", out.display());
    }
    if out.exists() && out.extension().is_none_or(|e| e != "safetensors") {
        bail!("--out {} exists and is not a .safetensors file; not replacing it", out.display());
    }
    let q = encode_images(blip2, images)?;
    let t = BTreeMap::from([("queries".to_string(), HostTensor::from_tensor(q))]);
    let meta = BTreeMap::from([(
        "images".to_string(),
        images.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join("\n"),
    )]);
    write_tensors(out, &t, &meta)?;
    println!("{}", out.display());
    Ok(())
}
