//! Training images: reading, augmentation (crop / resize / flip), conversion to the VAE's
//! input, and the loss-curve plot.

use std::path::{Path, PathBuf};

use crate::{Error, Result};
use image::imageops::FilterType;
use scheduler::SeededRng;

use crate::image_out::RgbImage;

/// Reads every image (PNG or JPEG, any colour type, converted to 8-bit RGB), stopping at the
/// first one that cannot be read and naming it. An empty list is an error.
///
/// ```no_run
/// let imgs = personalize::train::load_images(&["dog1.jpg".into(), "dog2.png".into()])?;
/// # Ok::<(), personalize::Error>(())
/// ```
pub fn load_images(paths: &[PathBuf]) -> Result<Vec<RgbImage>> {
    if paths.is_empty() {
        return Err(Error::invalid("no training images given (pass at least one --image)"));
    }
    paths.iter().map(|p| load_image(p)).collect()
}

/// Reads one image as 8-bit RGB, or fails naming the file ([`model_io::image_file::open`]:
/// the size limit and message of `personalize encode`, truncated files refused). Alpha is
/// dropped, as diffusers' training scripts' `convert("RGB")` does.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let rgb = model_io::image_file::open(path)?.to_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    Ok(RgbImage { width: w, height: h, data: rgb.into_raw() })
}

/// Every image file (png, jpg, jpeg) in `dir`, sorted by name.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::Io { path: dir.into(), cause: e })?;
    let mut out: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// One augmented view: a square crop `(x, y, side)` of the source, optionally mirrored, resized to
/// the training resolution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct View {
    pub x: usize,
    pub y: usize,
    pub side: usize,
    pub flip: bool,
}

/// The views of an image: the centre crop of the shorter side first, then `extra` random square
/// crops whose side is a uniform fraction in `[min_scale, 1]` of the shorter side, at a uniform
/// position; each mirrored with probability 1/2 when `flip`.
pub(crate) fn views(w: usize, h: usize, extra: usize, min_scale: f64, flip: bool, rng: &mut SeededRng) -> Vec<View> {
    let short = w.min(h);
    let mut out = vec![View { x: (w - short) / 2, y: (h - short) / 2, side: short, flip: false }];
    for _ in 0..extra {
        let s = min_scale + (1.0 - min_scale) * rng.next_f64();
        let side = ((short as f64 * s).round() as usize).clamp(1, short);
        let x = (rng.next_f64() * (w - side + 1) as f64) as usize;
        let y = (rng.next_f64() * (h - side + 1) as f64) as usize;
        let f = flip && rng.next_f64() < 0.5;
        out.push(View { x: x.min(w - side), y: y.min(h - side), side, flip: f });
    }
    out
}

/// SDXL's `add_time_ids` for a view of a `w`×`h` image trained at `res`, as diffusers'
/// `train_dreambooth_lora_sdxl.py` computes them: the original size (h, w), the crop's top-left
/// corner in the image resized to the crop's scale (after the mirror, which moves it), and the
/// target size (res, res).
pub(crate) fn time_ids(v: View, w: usize, h: usize, res: usize) -> [f32; 6] {
    let scale = res as f64 / v.side as f64;
    let x = if v.flip { w - v.x - v.side } else { v.x };
    let at = |p: usize| (p as f64 * scale).round() as f32;
    [h as f32, w as f32, at(v.y), at(x), res as f32, res as f32]
}

/// Crops, resizes (antialiased bilinear: the image crate's triangle filter) and mirrors `img`,
/// then maps it to the VAE's input range: CHW floats in `[-1, 1]`.
pub(crate) fn render(img: &RgbImage, v: View, res: usize) -> Vec<f32> {
    let buf =
        image::RgbImage::from_raw(img.width as u32, img.height as u32, img.data.clone()).expect("RGB buffer size");
    let crop = image::imageops::crop_imm(&buf, v.x as u32, v.y as u32, v.side as u32, v.side as u32).to_image();
    let mut out =
        if v.side == res { crop } else { image::imageops::resize(&crop, res as u32, res as u32, FilterType::Triangle) };
    if v.flip {
        image::imageops::flip_horizontal_in_place(&mut out);
    }
    let raw = out.into_raw();
    let mut chw = vec![0f32; 3 * res * res];
    for (i, px) in raw.chunks_exact(3).enumerate() {
        for c in 0..3 {
            chw[c * res * res + i] = px[c] as f32 / 127.5 - 1.0;
        }
    }
    chw
}

/// Draws the loss curve (raw values in light blue, an exponential moving average in dark red)
/// on a white `w`×`h` canvas with axes and ten grid lines each way.
pub fn plot_losses(losses: &[f64], w: usize, h: usize) -> RgbImage {
    let mut img = RgbImage { width: w, height: h, data: vec![255; w * h * 3] };
    let (l, r, t, b) = (40usize, w - 12, 12usize, h - 30);
    let put = |img: &mut RgbImage, x: i64, y: i64, c: [u8; 3]| {
        if x >= 0 && y >= 0 && (x as usize) < w && (y as usize) < h {
            let i = (y as usize * w + x as usize) * 3;
            img.data[i..i + 3].copy_from_slice(&c);
        }
    };
    for k in 0..=10 {
        let x = l + (r - l) * k / 10;
        let y = t + (b - t) * k / 10;
        for yy in t..=b {
            put(&mut img, x as i64, yy as i64, [232, 232, 232]);
        }
        for xx in l..=r {
            put(&mut img, xx as i64, y as i64, [232, 232, 232]);
        }
    }
    for yy in t..=b {
        put(&mut img, l as i64, yy as i64, [0, 0, 0]);
    }
    for xx in l..=r {
        put(&mut img, xx as i64, b as i64, [0, 0, 0]);
    }
    let finite: Vec<f64> = losses.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.is_empty() {
        return img;
    }
    let lo = 0f64.min(finite.iter().copied().fold(f64::INFINITY, f64::min));
    let hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max).max(lo + 1e-12);
    let n = losses.len().max(2);
    let px = |i: usize| l as f64 + (r - l) as f64 * i as f64 / (n - 1) as f64;
    let py = |v: f64| b as f64 - (b - t) as f64 * (v - lo) / (hi - lo);
    let line = |img: &mut RgbImage, pts: &[(f64, f64)], c: [u8; 3]| {
        for p in pts.windows(2) {
            let (x0, y0, x1, y1) = (p[0].0, p[0].1, p[1].0, p[1].1);
            let steps = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
            for s in 0..=steps {
                let f = s as f64 / steps as f64;
                put(img, (x0 + (x1 - x0) * f).round() as i64, (y0 + (y1 - y0) * f).round() as i64, c);
            }
        }
    };
    let raw: Vec<(f64, f64)> =
        losses.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(i, &v)| (px(i), py(v))).collect();
    line(&mut img, &raw, [150, 190, 240]);
    let mut ema = Vec::with_capacity(raw.len());
    let mut acc: Option<f64> = None;
    for (i, &v) in losses.iter().enumerate() {
        if !v.is_finite() {
            continue;
        }
        let a = match acc {
            Some(a) => 0.9 * a + 0.1 * v,
            None => v,
        };
        acc = Some(a);
        ema.push((px(i), py(a)));
    }
    line(&mut img, &ema, [160, 20, 20]);
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As diffusers' SDXL DreamBooth script: (h, w) of the image, the crop corner at the
    /// training scale, the square target; a mirrored crop's corner measured from the other side.
    #[test]
    fn time_ids_follow_the_crop() {
        let centre = View { x: 6, y: 0, side: 36, flip: false };
        assert_eq!(time_ids(centre, 48, 36, 32), [36.0, 48.0, 0.0, 5.0, 32.0, 32.0]);
        let mirrored = View { x: 0, y: 10, side: 20, flip: true };
        assert_eq!(time_ids(mirrored, 48, 36, 32), [36.0, 48.0, 16.0, 45.0, 32.0, 32.0]);
        let whole = View { x: 0, y: 0, side: 1024, flip: false };
        assert_eq!(time_ids(whole, 1024, 1024, 1024), [1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]);
    }
}
