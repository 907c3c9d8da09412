//! Pillow's `Image.resize` for 8-bit RGB, reproduced operation for operation.
//!
//! BlipImageProcessor resizes with Pillow, and the model has only seen images resized that
//! way, so this follows Pillow's `Resample.c` exactly rather than using the `image` crate's
//! filters: the same kernel support scaling when shrinking, the same per-pixel coefficient
//! windows, 22-bit fixed-point coefficients, a horizontal pass rounded to 8 bits before the
//! vertical pass, and the same rounding and clipping. On PNG inputs the result is bit-identical
//! to Pillow's.

/// Pillow's resampling filters (`PIL.Image.Resampling`), by their numeric values as they
/// appear in `preprocessor_config.json` (`"resample": 3` is bicubic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `LANCZOS` (1): a 3-lobe windowed sinc.
    Lanczos,
    /// `BILINEAR` (2): a triangle.
    Bilinear,
    /// `BICUBIC` (3): the cubic convolution kernel with a = -0.5 (BLIP-2's setting).
    Bicubic,
    /// `BOX` (4).
    Box,
    /// `HAMMING` (5).
    Hamming,
}

impl Filter {
    /// The filter for Pillow's numeric `resample` value; `None` for `NEAREST` (0), which Pillow
    /// implements as an affine transform rather than a convolution, and for unknown values.
    pub fn from_pil(value: u64) -> Option<Self> {
        Some(match value {
            1 => Self::Lanczos,
            2 => Self::Bilinear,
            3 => Self::Bicubic,
            4 => Self::Box,
            5 => Self::Hamming,
            _ => return None,
        })
    }

    fn support(self) -> f64 {
        match self {
            Self::Box => 0.5,
            Self::Bilinear | Self::Hamming => 1.0,
            Self::Bicubic => 2.0,
            Self::Lanczos => 3.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                return 1.0;
            }
            let x = x * std::f64::consts::PI;
            x.sin() / x
        }
        match self {
            Self::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Self::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Self::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    x.sin() / x * (0.54 + 0.46 * x.cos())
                }
            }
            Self::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Self::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// Pillow's `PRECISION_BITS` for 8-bit images: 32 - 8 - 2, leaving two bits of headroom for
/// the negative lobes.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// One output pixel's source window and fixed-point weights.
struct Coeffs {
    ksize: usize,
    /// `(first source index, count)` per output index.
    bounds: Vec<(usize, usize)>,
    /// `ksize` weights per output index.
    weights: Vec<i32>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` of Pillow's Resample.c, for the whole input
/// range (`box` = the full image).
fn precompute(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's `(int)` truncates toward zero; negative starts are clamped to 0 right after.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(xmin as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let w = filter.eval((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..(xx + 1) * ksize];
        for x in 0..xmax {
            let w = if ww != 0.0 { k[x] / ww } else { k[x] };
            let f = w * (1u32 << PRECISION_BITS) as f64;
            // Round half away from zero, as `(int)(±0.5 + f)` does.
            row[x] = if w < 0.0 { (f - 0.5) as i32 } else { (f + 0.5) as i32 };
        }
        bounds.push((xmin, xmax));
    }
    Coeffs { ksize, bounds, weights }
}

fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an interleaved RGB8 image `src` (`w`×`h`) to `out_w`×`out_h` as Pillow's
/// `Image.resize((out_w, out_h), filter)` does on an `RGB` image.
pub fn resize_rgb8(src: &[u8], w: usize, h: usize, out_w: usize, out_h: usize, filter: Filter) -> Vec<u8> {
    debug_assert_eq!(src.len(), w * h * 3);
    let need_h = out_w != w;
    let need_v = out_h != h;
    if !need_h && !need_v {
        return src.to_vec();
    }
    let horiz = precompute(w, out_w, filter);
    let mut vert = precompute(h, out_h, filter);

    // Horizontal pass over only the rows the vertical pass will read, rounded to 8 bits.
    let (mut img, mut img_w, mut row0) = (std::borrow::Cow::Borrowed(src), w, 0usize);
    if need_h {
        let first = vert.bounds[0].0;
        let last = vert.bounds.last().map_or(h, |&(s, n)| s + n);
        let (first, last) = if need_v { (first, last) } else { (0, h) };
        let rows = last - first;
        let mut tmp = vec![0u8; rows * out_w * 3];
        for y in 0..rows {
            let line = &src[(y + first) * w * 3..(y + first + 1) * w * 3];
            let out = &mut tmp[y * out_w * 3..(y + 1) * out_w * 3];
            for (xx, &(xmin, xmax)) in horiz.bounds.iter().enumerate() {
                let k = &horiz.weights[xx * horiz.ksize..xx * horiz.ksize + xmax];
                let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
                for (x, &kx) in k.iter().enumerate() {
                    let p = &line[(x + xmin) * 3..(x + xmin) * 3 + 3];
                    for c in 0..3 {
                        ss[c] = ss[c].wrapping_add(p[c] as i32 * kx);
                    }
                }
                for c in 0..3 {
                    out[xx * 3 + c] = clip8(ss[c]);
                }
            }
        }
        img = std::borrow::Cow::Owned(tmp);
        img_w = out_w;
        row0 = first;
    }
    if !need_v {
        return img.into_owned();
    }
    for b in &mut vert.bounds {
        b.0 -= row0;
    }
    let mut out = vec![0u8; out_h * img_w * 3];
    for (yy, &(ymin, ymax)) in vert.bounds.iter().enumerate() {
        let k = &vert.weights[yy * vert.ksize..yy * vert.ksize + ymax];
        let dst = &mut out[yy * img_w * 3..(yy + 1) * img_w * 3];
        for xx in 0..img_w * 3 {
            let mut ss = 1i32 << (PRECISION_BITS - 1);
            for (y, &ky) in k.iter().enumerate() {
                ss = ss.wrapping_add(img[(y + ymin) * img_w * 3 + xx] as i32 * ky);
            }
            dst[xx] = clip8(ss);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_size_is_a_copy() {
        let src: Vec<u8> = (0..5 * 4 * 3).map(|i| i as u8).collect();
        assert_eq!(resize_rgb8(&src, 5, 4, 5, 4, Filter::Bicubic), src);
    }

    #[test]
    fn constant_images_stay_constant_for_every_filter() {
        let src = vec![77u8; 13 * 9 * 3];
        for f in [Filter::Lanczos, Filter::Bilinear, Filter::Bicubic, Filter::Box, Filter::Hamming] {
            for (ow, oh) in [(4, 3), (20, 31), (13, 5), (7, 9)] {
                let out = resize_rgb8(&src, 13, 9, ow, oh, f);
                assert_eq!(out.len(), ow * oh * 3);
                assert!(out.iter().all(|&v| v == 77), "{f:?} {ow}x{oh}");
            }
        }
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(300, 64), (30, 64), (224, 224), (1000, 7)] {
            let c = precompute(i, o, Filter::Bicubic);
            for xx in 0..o {
                let s: i32 = c.weights[xx * c.ksize..(xx + 1) * c.ksize].iter().sum();
                assert!((s - (1 << PRECISION_BITS)).abs() <= c.ksize as i32, "{i}->{o} at {xx}: {s}");
            }
        }
    }
}
