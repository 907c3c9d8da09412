//! Image files to BLIP-2 `pixel_values`, as transformers' `BlipImageProcessor`.

use std::path::{Path, PathBuf};

use image::DynamicImage;
use model_io::{Error, Result};
use rayon::prelude::*;
use serde::Deserialize;

use crate::resample::{resize_rgb8, Filter};

/// The largest image accepted, in pixels (width × height): 64 Mi-pixels (67,108,864), e.g.
/// 8192×8192 or any current camera's full frame (a 61-megapixel 9504×6336 photo fits).
///
/// It is checked from the file header before any pixel is decoded, so an oversized or crafted
/// file is refused without allocating its pixels. At the limit a decoded image takes up to
/// 512 MiB (16-bit RGBA); several are decoded at once when many images are processed.
pub const MAX_PIXELS: u64 = model_io::MAX_IMAGE_PIXELS;

/// OpenAI CLIP's normalisation (`OPENAI_CLIP_MEAN`/`OPENAI_CLIP_STD`), BLIP-2's default.
pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
/// See [`CLIP_MEAN`].
#[allow(clippy::excessive_precision)] // transformers' constants verbatim
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// `BlipImageProcessor`: RGB conversion, resize to a fixed size with Pillow's filters
/// (bicubic for BLIP-2), rescale by 1/255 and normalisation with the CLIP mean and std.
///
/// Files are decoded with the `image` crate (PNG, JPEG, WebP, BMP, GIF, TIFF), EXIF
/// orientation is applied (BlipImageProcessor leaves it to the caller; photos from phones are
/// usually stored sideways), and images are converted to RGB as Pillow's `convert("RGB")`
/// does: grey replicated, palettes expanded, transparency composited onto white (as
/// transformers 5 does; 4 dropped the alpha channel), CMYK JPEGs
/// converted, 16-bit samples reduced to their high byte (as Pillow reads 16-bit RGB PNGs; for
/// 16-bit greyscale Pillow clips to 255 instead, which would turn most photos white).
///
/// ```no_run
/// use blip2_encoder::ImageProcessor;
/// let proc = ImageProcessor::load("blip2-opt-2.7b".as_ref(), 224)?;
/// let chw = proc.load_image("cat.jpg".as_ref())?; // [3, 224, 224], normalised
/// let (batch, shape) = proc.process(&["a.png".into(), "b.jpg".into()])?; // shape [2, 3, 224, 224]
/// # Ok::<(), model_io::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    /// Output height after resizing.
    pub height: usize,
    /// Output width after resizing.
    pub width: usize,
    /// Whether to resize; if not, every image must already have the output size.
    pub do_resize: bool,
    pub resample: Filter,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

/// The fields of `preprocessor_config.json` we read; missing ones take BlipImageProcessor's
/// defaults.
#[derive(Deserialize)]
struct RawConfig {
    image_processor_type: Option<String>,
    do_resize: Option<bool>,
    size: Option<serde_json::Value>,
    resample: Option<u64>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<serde_json::Value>,
    image_std: Option<serde_json::Value>,
}

impl ImageProcessor {
    /// BlipImageProcessor's settings with the output size `size`×`size` (what BLIP-2 uses:
    /// bicubic, 1/255, CLIP mean/std).
    pub fn new(size: usize) -> Self {
        Self {
            height: size,
            width: size,
            do_resize: true,
            resample: Filter::Bicubic,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
        }
    }

    /// Reads `dir/preprocessor_config.json` when present, else [`ImageProcessor::new`] at
    /// `default_size` (the vision config's `image_size`).
    pub fn load(dir: &Path, default_size: usize) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        if path.is_file() {
            Self::from_file(&path)
        } else {
            Ok(Self::new(default_size))
        }
    }

    /// Reads a `preprocessor_config.json` written by `BlipImageProcessor.save_pretrained`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.into(), cause: e })?;
        let raw: RawConfig = serde_json::from_str(&text).map_err(|e| Error::Json { path: path.into(), cause: e })?;
        let bad = |message: String| Error::Config { path: path.into(), message };
        if let Some(t) = raw.image_processor_type.as_deref() {
            if !matches!(t, "BlipImageProcessor" | "BlipImageProcessorFast") {
                return Err(bad(format!("image_processor_type `{t}` unsupported (BlipImageProcessor)")));
            }
        }
        // BlipImageProcessor's default size is 384×384 (BLIP-1's), used when the file has none.
        let (height, width) = match &raw.size {
            None => (384, 384),
            Some(v) => parse_size(v).ok_or_else(|| {
                bad(format!(
                    "size {v} unsupported: expected a positive integer or {{\"height\": H, \"width\": W}} with positive H and W"
                ))
            })?,
        };
        let resample = match raw.resample {
            None => Filter::Bicubic,
            Some(r) => Filter::from_pil(r).ok_or_else(|| {
                bad(format!("resample {r} unsupported (1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming)"))
            })?,
        };
        let triple = |v: &Option<serde_json::Value>, default: [f32; 3], name: &str| -> Result<[f32; 3]> {
            match v {
                None => Ok(default),
                Some(v) => {
                    parse_triple(v).ok_or_else(|| bad(format!("{name} must be a number or a list of 3 numbers")))
                }
            }
        };
        let image_mean = triple(&raw.image_mean, CLIP_MEAN, "image_mean")?;
        let image_std = triple(&raw.image_std, CLIP_STD, "image_std")?;
        if image_std.contains(&0.0) {
            return Err(bad("image_std contains 0".into()));
        }
        Ok(Self {
            height,
            width,
            do_resize: raw.do_resize.unwrap_or(true),
            resample,
            do_rescale: raw.do_rescale.unwrap_or(true),
            rescale_factor: raw.rescale_factor.unwrap_or(1.0 / 255.0),
            do_normalize: raw.do_normalize.unwrap_or(true),
            image_mean,
            image_std,
        })
    }

    /// `(height, width)` of the processed images.
    pub fn output_size(&self) -> (usize, usize) {
        (self.height, self.width)
    }

    /// Decodes, converts, resizes and normalises one image file: `[3, height, width]` values,
    /// channels first.
    pub fn load_image(&self, path: &Path) -> Result<Vec<f32>> {
        let (w, h, rgb) = decode_rgb8(path)?;
        let (w, h, rgb) = if self.do_resize {
            (self.width, self.height, resize_rgb8(&rgb, w, h, self.width, self.height, self.resample))
        } else if (w, h) != (self.width, self.height) {
            return Err(Error::invalid(format!(
                "{}: image is {w}x{h}, resizing is off and the model takes {}x{}",
                path.display(),
                self.width,
                self.height
            )));
        } else {
            (w, h, rgb)
        };
        Ok(self.normalize(&rgb, w, h))
    }

    /// Applies rescale and normalisation to interleaved RGB8 and returns planar `[3, h, w]`,
    /// with transformers' arithmetic: `f32(f64(v) * factor)`, then `(x - mean) / std` in f32.
    pub fn normalize(&self, rgb: &[u8], w: usize, h: usize) -> Vec<f32> {
        let plane = w * h;
        let mut out = vec![0f32; 3 * plane];
        for (i, px) in rgb.chunks_exact(3).enumerate() {
            for c in 0..3 {
                let mut v = if self.do_rescale { (px[c] as f64 * self.rescale_factor) as f32 } else { px[c] as f32 };
                if self.do_normalize {
                    v = (v - self.image_mean[c]) / self.image_std[c];
                }
                out[c * plane + i] = v;
            }
        }
        out
    }

    /// Processes many files in parallel (decoding and resizing on rayon's threads), returning
    /// the batch `[N, 3, height, width]` flattened, in the order of `paths`, and its shape.
    /// Fails on the first bad file in `paths` order, naming it.
    pub fn process(&self, paths: &[PathBuf]) -> Result<(Vec<f32>, [usize; 4])> {
        let images: Vec<Result<Vec<f32>>> = paths.par_iter().map(|p| self.load_image(p)).collect();
        let per = 3 * self.height * self.width;
        let mut out = Vec::with_capacity(paths.len() * per);
        for img in images {
            out.extend_from_slice(&img?);
        }
        Ok((out, [paths.len(), 3, self.height, self.width]))
    }
}

fn parse_size(v: &serde_json::Value) -> Option<(usize, usize)> {
    if let Some(s) = v.as_u64() {
        return Some((s as usize, s as usize));
    }
    let h = v.get("height")?.as_u64()?;
    let w = v.get("width")?.as_u64()?;
    (h > 0 && w > 0).then_some((h as usize, w as usize))
}

fn parse_triple(v: &serde_json::Value) -> Option<[f32; 3]> {
    if let Some(x) = v.as_f64() {
        return Some([x as f32; 3]);
    }
    let a = v.as_array()?;
    if a.len() != 3 {
        return None;
    }
    Some([a[0].as_f64()? as f32, a[1].as_f64()? as f32, a[2].as_f64()? as f32])
}

/// Reads an image file as upright interleaved RGB8: `(width, height, pixels)`, opened with
/// [`model_io::image_file::open`] (size checked from the header before decoding, truncated
/// files refused, the first frame of an animation).
pub fn decode_rgb8(path: &Path) -> Result<(usize, usize, Vec<u8>)> {
    let img = model_io::image_file::open(path)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    Ok((w, h, to_rgb8_like_pillow(img)))
}

/// transformers 5's `convert_to_rgb` for what the decoders produce: transparency (an alpha
/// channel, or a palette or colour key expanded to one) composited onto white with Pillow's
/// `alpha_composite`, grey replicated, 16-bit samples reduced to their high byte (as Pillow
/// reads them). transformers 4 dropped the alpha channel instead.
fn to_rgb8_like_pillow(img: DynamicImage) -> Vec<u8> {
    fn hi(v: u16) -> u8 {
        (v >> 8) as u8
    }
    let rgba = |p: [u8; 4]| [over_white(p[0], p[3]), over_white(p[1], p[3]), over_white(p[2], p[3])];
    match img {
        DynamicImage::ImageRgb8(b) => b.into_raw(),
        DynamicImage::ImageRgba8(b) => {
            b.into_raw().chunks_exact(4).flat_map(|p| rgba([p[0], p[1], p[2], p[3]])).collect()
        }
        DynamicImage::ImageLuma8(b) => b.into_raw().into_iter().flat_map(|v| [v; 3]).collect(),
        DynamicImage::ImageLumaA8(b) => {
            b.into_raw().chunks_exact(2).flat_map(|p| [over_white(p[0], p[1]); 3]).collect()
        }
        DynamicImage::ImageRgb16(b) => b.into_raw().into_iter().map(hi).collect(),
        DynamicImage::ImageRgba16(b) => {
            b.into_raw().chunks_exact(4).flat_map(|p| rgba([hi(p[0]), hi(p[1]), hi(p[2]), hi(p[3])])).collect()
        }
        DynamicImage::ImageLuma16(b) => b.into_raw().into_iter().flat_map(|v| [hi(v); 3]).collect(),
        DynamicImage::ImageLumaA16(b) => {
            b.into_raw().chunks_exact(2).flat_map(|p| [over_white(hi(p[0]), hi(p[1])); 3]).collect()
        }
        // Float images (from TIFF): clamped and rounded as the image crate does, then
        // composited like the others.
        other if other.color().has_alpha() => {
            other.to_rgba8().into_raw().chunks_exact(4).flat_map(|p| rgba([p[0], p[1], p[2], p[3]])).collect()
        }
        other => other.to_rgb8().into_raw(),
    }
}

/// One channel of Pillow's `alpha_composite(white, src)`, its integer arithmetic exactly
/// (libImaging/AlphaComposite.c with an opaque destination: coefficients `a·128` and
/// `(255-a)·128`, rounded division by 255 through shifts).
fn over_white(c: u8, a: u8) -> u8 {
    if a == 0 {
        return 255;
    }
    let (c, a) = (u32::from(c), u32::from(a));
    let t = 128 * (c * a + 255 * (255 - a)) + (0x80 << 7);
    ((((t >> 8) + t) >> 8) >> 7).min(255) as u8
}
