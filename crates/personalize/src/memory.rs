//! Memory estimates, checked before anything is allocated: a size that cannot fit gets an
//! error with the estimate and the limit instead of an abort ("memory allocation failed") or
//! the kernel's OOM killer, and generation picks the largest batch that fits.
//!
//! The estimates count the activations that are alive at the peak of a UNet forward (the skip
//! connections of the down path plus the working set of the widest block) and of a VAE decode
//! (the widest block at its resolution), with the CPU kernels' blockwise attention (scores of
//! one block of queries at a time, not `L²`). The factors were fitted to the peak RSS of SD 1.5
//! shapes (see `tests/memory.rs`), rounded up.

use crate::Error;
use sd_unet::UNetConfig;
use sd_vae::AutoencoderKlConfig;

pub use model_io::{available_memory as available_bytes, parse_size, MEMORY_LIMIT_VAR as LIMIT_VAR};

/// `1.3 GiB`, `512 MiB`.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 40) as f64 * 10.0 {
        format!("{:.0} TiB", b / (1u64 << 40) as f64)
    } else if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.0} MiB", (b / (1u64 << 20) as f64).max(1.0))
    }
}

/// Positions of a `h × w` map after `levels` stride-2 downsamplings (padding 1, kernel 3:
/// `ceil(n / 2)` each time).
fn positions(h: usize, w: usize, level: usize) -> f64 {
    let side = |mut n: usize| {
        for _ in 0..level {
            n = n.div_ceil(2);
        }
        n as f64
    };
    side(h) * side(w)
}

/// Peak activation elements of one UNet forward on `batch` latents of `h × w` (the guided
/// batch counts twice: pass the doubled batch).
///
/// ```
/// let cfg: sd_unet::UNetConfig = serde_json::from_str(r#"{"down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
///   "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "block_out_channels": [32, 64], "cross_attention_dim": 32}"#).unwrap();
/// let one = personalize::memory::unet_elements(&cfg, 1, 8, 8);
/// assert_eq!(personalize::memory::unet_elements(&cfg, 2, 8, 8), 2.0 * one);
/// ```
pub fn unet_elements(cfg: &UNetConfig, batch: usize, h: usize, w: usize) -> f64 {
    let levels = cfg.block_out_channels.len();
    let mut skips = cfg.block_out_channels.first().copied().unwrap_or(0) as f64 * positions(h, w, 0);
    let mut work: f64 = 0.0;
    for (l, &c) in cfg.block_out_channels.iter().enumerate() {
        let p = positions(h, w, l);
        let c = c as f64;
        skips += cfg.layers_per_block as f64 * c * p;
        if l + 1 < levels {
            skips += c * positions(h, w, l + 1);
        }
        let attn = cfg.down_block_types.get(l).is_some_and(|t| t.contains("Attn"))
            || cfg.up_block_types.get(levels - 1 - l).is_some_and(|t| t.contains("Attn"));
        // A transformer block's GEGLU makes 8·C per position, next to its input, the residual
        // and the normed copy; a resnet of the up path reads [C + skip] and makes C.
        work = work.max(if attn { 14.0 } else { 8.0 } * c * p);
    }
    batch as f64 * (skips + work)
}

/// Peak activation elements of one VAE decode of `batch` latents of `h × w`: the decoder's
/// widest block at its resolution (its input, the normed copy and the output of each conv,
/// and the 2× nearest upsample that feeds it).
pub fn vae_decode_elements(cfg: &AutoencoderKlConfig, batch: usize, h: usize, w: usize) -> f64 {
    let levels = cfg.block_out_channels.len();
    let mut peak: f64 = 0.0;
    for (i, &c) in cfg.block_out_channels.iter().rev().enumerate() {
        // Up block i works at 2^i times the latent side; its input has the previous channels.
        let side = |n: usize| (n << i) as f64;
        let prev = if i == 0 { c } else { cfg.block_out_channels[levels - i] };
        let p = side(h) * side(w);
        peak = peak.max((2.0 * prev.max(c) as f64 + 2.0 * c as f64) * p);
    }
    batch as f64 * peak
}

/// Peak activation elements of one VAE encode of `batch` images of `h × w` pixels.
pub fn vae_encode_elements(cfg: &AutoencoderKlConfig, batch: usize, h: usize, w: usize) -> f64 {
    let mut peak: f64 = 0.0;
    for (i, &c) in cfg.block_out_channels.iter().enumerate() {
        let p = positions(h, w, i);
        peak = peak.max(6.0 * c as f64 * p);
    }
    batch as f64 * peak
}

/// Bytes to generate `batch` images of `h × w` latents (`guided`: two UNet rows per image),
/// elements of `dtype_bytes` each. The UNet and the decode do not overlap in time.
pub fn generation_bytes(
    unet: &UNetConfig,
    vae: &AutoencoderKlConfig,
    batch: usize,
    h: usize,
    w: usize,
    guided: bool,
    dtype_bytes: usize,
) -> f64 {
    let rows = if guided { 2 * batch } else { batch };
    let unet = unet_elements(unet, rows, h, w);
    let vae = vae_decode_elements(vae, batch, h, w);
    // The latents, the scheduler's copies and the images (f32 on the host) are small next to
    // these; 1.25 covers them and the allocator's slack.
    1.25 * dtype_bytes as f64 * unet.max(vae)
}

/// Bytes of one training step at `batch` latents of `h × w` (the VAE encode of a `8h × 8w`
/// image happens once, before): autograd keeps every block's intermediates for the backward
/// pass: about 150 values of a level's width per position, 400 where it has a transformer
/// block (fitted to the fixture UNet: 2.2 MB a sample at 8×8 latents, rounded up).
pub fn training_bytes(unet: &UNetConfig, vae: &AutoencoderKlConfig, batch: usize, h: usize, w: usize) -> f64 {
    let levels = unet.block_out_channels.len();
    let mut kept = 0.0;
    for (l, &c) in unet.block_out_channels.iter().enumerate() {
        let attn = unet.down_block_types.get(l).is_some_and(|t| t.contains("Attn"))
            || unet.up_block_types.get(levels - 1 - l).is_some_and(|t| t.contains("Attn"));
        kept += if attn { 400.0 } else { 150.0 } * c as f64 * positions(h, w, l);
    }
    let f = 1usize << cfg_levels(vae);
    let encode = vae_encode_elements(vae, 1, h * f, w * f);
    1.25 * 4.0 * (batch as f64 * kept).max(encode)
}

fn cfg_levels(vae: &AutoencoderKlConfig) -> usize {
    vae.block_out_channels.len().saturating_sub(1)
}

/// An error for work that cannot fit: `what` needs about `need` bytes, `avail` are free.
pub fn too_big(what: &str, need: f64, avail: u64, hint: &str) -> Error {
    let need = if need.is_finite() && need < u64::MAX as f64 { human(need as u64) } else { "more than 16 EiB".into() };
    Error::invalid(format!("{what} needs about {need} of memory, but {} is available{hint}", human(avail)))
}

/// Peak resident memory of this process so far (Linux `VmHWM`), in bytes; `None` elsewhere.
///
/// ```
/// if let Some(b) = personalize::memory::peak_rss_bytes() { assert!(b > 0); }
/// ```
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_variable_caps_what_is_available() {
        // SAFETY: no other test of this binary reads or writes the variable.
        unsafe { std::env::set_var(LIMIT_VAR, "3M") };
        assert_eq!(available_bytes(), Some(3 << 20));
        unsafe { std::env::remove_var(LIMIT_VAR) };
    }
}
