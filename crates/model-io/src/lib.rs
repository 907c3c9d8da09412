//! Load published Hugging Face model folders into Burn.
//!
//! `model-io` is the one place where the project touches files on disk:
//!
//! * [`read_config`] parses a folder's `config.json` into a typed config and names the file
//!   on any error;
//! * [`Checkpoint`] memory-maps single or sharded safetensors checkpoints (`model.safetensors`,
//!   `diffusion_pytorch_model.fp16.safetensors`, `*.safetensors.index.json`, ...), validates
//!   every header up front, and converts f16/bf16/f32 on disk to f32 tensors one at a time, so
//!   a model is never held twice in memory;
//! * [`Checkpoint::open_onnx`] reads the weights of an ONNX export (`model.onnx`, inline or
//!   with external data) under the published keys, the same way; [`Checkpoint::open_dir`]
//!   takes a folder's `model.onnx` when it has no safetensors;
//! * [`Checkpoint::derive`] renames, reshapes or splits a checkpoint's tensors without copying
//!   them, so a file of another layout (a single-file checkpoint) loads as the model's own;
//! * [`Weights`] walks a checkpoint by module path (`down_blocks.0.resnets.1.conv1`), checks
//!   each tensor's shape when it is read and, at the end, that every tensor was used (apart
//!   from prefixes the caller declared to skip, which are never read);
//! * the layers built from those weights are in the `model-layers` crate;
//! * [`tensor_file`] reads and writes named host tensors (the stage runner's files),
//!   atomically.
//!
//! ```no_run
//! use burn_flex::{Flex, FlexDevice};
//! use model_io::{Checkpoint, Weights};
//!
//! let ckpt = Checkpoint::open_dir("text_encoder".as_ref(), &["model"])?;
//! let w = Weights::<Flex>::new(&ckpt, &FlexDevice);
//! let q_weight = w.pp("text_model.encoder.layers.0.self_attn.q_proj").get::<2>("weight", [768, 768])?;
//! # Ok::<(), model_io::Error>(())
//! ```

mod checkpoint;
mod config;
mod derive;
mod error;
pub mod image_file;
mod onnx;
pub mod tensor_file;
mod weights;

pub use checkpoint::{Checkpoint, TensorInfo};
pub use config::read_config;
pub use derive::{Derive, KeyMap};
pub use error::{Error, Result};
/// The fingerprints' hash (FNV-1a, 64 bits), from the `seeded` crate.
pub use seeded::Fnv64;
pub use weights::Weights;

/// The environment variable that caps the memory estimates may use (bytes, or with a `K`,
/// `M`, `G` or `T` suffix), below what the machine has: for shared machines and tests.
pub const MEMORY_LIMIT_VAR: &str = "PERSONALIZE_MEMORY_LIMIT";

/// Bytes this process may still allocate: the least of `MemAvailable`, the cgroup's
/// `memory.max − memory.current` and [`MEMORY_LIMIT_VAR`]. `None` where none is known.
///
/// ```
/// if let Some(b) = model_io::available_memory() { assert!(b > 0); }
/// ```
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    });
    let cgroup = (|| {
        let max = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok()?.trim().parse::<u64>().ok()?;
        let cur = std::fs::read_to_string("/sys/fs/cgroup/memory.current").ok()?.trim().parse::<u64>().ok()?;
        Some(max.saturating_sub(cur))
    })();
    let var = std::env::var(MEMORY_LIMIT_VAR).ok().and_then(|v| parse_size(&v));
    [meminfo, cgroup, var].into_iter().flatten().min()
}

/// `123`, `64M`, `1.5G`, ... as bytes.
///
/// ```
/// assert_eq!(model_io::parse_size("64M"), Some(64 << 20));
/// ```
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()?.to_ascii_uppercase() {
        'K' => (&s[..s.len() - 1], 1u64 << 10),
        'M' => (&s[..s.len() - 1], 1 << 20),
        'G' => (&s[..s.len() - 1], 1 << 30),
        'T' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let v: f64 = num.trim().parse().ok()?;
    (v.is_finite() && v >= 0.0).then_some((v * mult as f64) as u64)
}

/// The most pixels an input image may have (64 megapixels), checked from its header before
/// any pixel is decoded, so an oversized or crafted file is refused without allocating it.
pub const MAX_IMAGE_PIXELS: u64 = 1 << 26;

/// Checks an input image's size (from its header) against [`MAX_IMAGE_PIXELS`], naming the file.
///
/// ```
/// assert!(model_io::check_image_size("a.png".as_ref(), 512, 512).is_ok());
/// assert!(model_io::check_image_size("a.png".as_ref(), 100_000, 100_000).unwrap_err().to_string().contains("a.png"));
/// ```
pub fn check_image_size(path: &std::path::Path, w: u32, h: u32) -> Result<()> {
    let pixels = u64::from(w) * u64::from(h);
    if pixels > MAX_IMAGE_PIXELS {
        return Err(Error::invalid(format!(
            "{}: image is {w}x{h} ({:.0} megapixels), above the limit of {MAX_IMAGE_PIXELS} pixels ({:.0} megapixels)",
            path.display(),
            pixels as f64 / 1e6,
            MAX_IMAGE_PIXELS as f64 / 1e6
        )));
    }
    if pixels == 0 {
        return Err(Error::invalid(format!("{}: image is {w}x{h}, it has no pixels", path.display())));
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, then a rename,
/// so a crash or a full disk never leaves a half-written file under the final name.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let io = |e: std::io::Error| Error::Io { path: path.to_path_buf(), cause: e };
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(())
}
