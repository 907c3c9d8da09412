//! Memory-mapped safetensors checkpoints, single or sharded.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use burn::tensor::{AllocationProperty, Bytes, DType, TensorData};
use memmap2::Mmap;
use serde::Deserialize;

use crate::{Error, Fnv64, Result};

/// One tensor's entry in a safetensors header.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// safetensors dtype name: `F32`, `F16`, `BF16`, `I64`, ...
    pub dtype: String,
    pub shape: Vec<usize>,
    pub(crate) shard: usize,
    pub(crate) start: usize,
    pub(crate) end: usize,
    /// Stored as the transpose of `shape` (2-D): an ONNX MatMul's `[in, out]` weight.
    pub(crate) transposed: bool,
}

#[derive(Clone)]
pub(crate) struct Shard {
    pub(crate) path: PathBuf,
    /// The file's memory map; `None` for values held in memory ([`Checkpoint::set_f32`]).
    pub(crate) map: Option<Arc<Mmap>>,
    /// The same mapping as reference-counted bytes, for tensors that borrow it.
    pub(crate) shared: bytes::Bytes,
    pub(crate) data_start: usize,
}

/// A mapping as the owner of `bytes::Bytes` (which keeps it alive while any tensor uses it).
pub(crate) struct SharedMap(pub(crate) Arc<Mmap>);

impl AsRef<[u8]> for SharedMap {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// A checkpoint: one or more memory-mapped safetensors files and the index of their tensors.
///
/// Opening reads and validates every header (offsets inside the file, byte counts matching
/// shapes), so a truncated download fails here with the file's name rather than later with a
/// wrong tensor. Tensor data stays on disk until [`Checkpoint::read_f32`] asks for it, or, for
/// [`Checkpoint::tensor_data_f32`], until a tensor borrowing the map first reads it.
pub struct Checkpoint {
    pub(crate) name: String,
    pub(crate) shards: Vec<Shard>,
    pub(crate) tensors: HashMap<String, TensorInfo>,
    pub(crate) metadata: BTreeMap<String, String>,
    /// Sharded checkpoints only: tensors the index lists in shards that are not on disk, with
    /// the index and the shard's path. Reading one is a [`Error::MissingShard`].
    pub(crate) absent: HashMap<String, (PathBuf, PathBuf)>,
    /// Where a tensor came from, for messages, where its key is not the file's own (an ONNX
    /// initializer's consumer node).
    pub(crate) origins: HashMap<String, String>,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Opens the weights of a published model folder. `bases` are the file stems to look for,
    /// in order (`["diffusion_pytorch_model"]`, `["model"]`); for each, the full-precision file
    /// is preferred, then the `.fp16` variant, each either single or sharded (`.index.json`).
    ///
    /// ```no_run
    /// let ckpt = model_io::Checkpoint::open_dir("sd/unet".as_ref(), &["diffusion_pytorch_model"])?;
    /// println!("{} tensors", ckpt.len());
    /// # Ok::<(), model_io::Error>(())
    /// ```
    pub fn open_dir(dir: &Path, bases: &[&str]) -> Result<Self> {
        let mut tried = Vec::new();
        for base in bases {
            for variant in ["", ".fp16"] {
                let single = dir.join(format!("{base}{variant}.safetensors"));
                let index = dir.join(format!("{base}{variant}.safetensors.index.json"));
                if single.exists() {
                    return Self::open_files(&dir.display().to_string(), &[single]);
                }
                if index.exists() {
                    return Self::open_index(&index);
                }
                tried.push(format!("{base}{variant}.safetensors[.index.json]"));
            }
        }
        // An ONNX export of the model (diffusers' ONNX pipelines, optimum).
        let onnx = dir.join("model.onnx");
        if onnx.exists() {
            return Self::open_onnx(&onnx);
        }
        tried.push("model.onnx".into());
        if !dir.is_dir() {
            return Err(Error::Io {
                path: dir.to_path_buf(),
                cause: std::io::Error::new(std::io::ErrorKind::NotFound, "model folder not found"),
            });
        }
        Err(Error::NoWeights { dir: dir.to_path_buf(), expected: tried.join(", ") })
    }

    /// Opens a sharded checkpoint from its `*.safetensors.index.json`.
    ///
    /// Shards that are not on disk are allowed as long as one is: a model that needs only part
    /// of a checkpoint (BLIP-2's encoder without its language model, as `cargo xtask fetch
    /// blip2` downloads it) opens, and reading a tensor of an absent shard fails naming it.
    pub fn open_index(index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index).map_err(|e| Error::Io { path: index.into(), cause: e })?;
        let idx: ShardIndex = serde_json::from_str(&text).map_err(|e| Error::Json { path: index.into(), cause: e })?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut files: Vec<PathBuf> = Vec::new();
        let mut absent = HashMap::new();
        for (name, shard) in &idx.weight_map {
            // A shard is a file of the model folder: no absolute path, no `..`.
            let rel = Path::new(shard);
            if rel.is_absolute() || !rel.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)) {
                return Err(Error::Config {
                    path: index.into(),
                    message: format!("tensor `{name}` names shard `{shard}`, outside the model folder"),
                });
            }
            let p = dir.join(shard);
            if !p.is_file() {
                absent.insert(name.clone(), (index.to_path_buf(), p));
            } else if !files.contains(&p) {
                files.push(p);
            }
        }
        if files.is_empty() {
            if let Some((index, shard)) = absent.values().min_by(|a, b| a.1.cmp(&b.1)) {
                return Err(Error::MissingShard { index: index.clone(), shard: shard.clone() });
            }
        }
        files.sort();
        let mut ckpt = Self::open_files(&dir.display().to_string(), &files)?;
        ckpt.absent = absent;
        for (name, shard) in &idx.weight_map {
            if !ckpt.tensors.contains_key(name) && !ckpt.absent.contains_key(name) {
                return Err(Error::MissingTensor {
                    checkpoint: dir.join(shard).display().to_string(),
                    name: name.clone(),
                    hint: format!(" (listed in {})", index.display()),
                });
            }
        }
        Ok(ckpt)
    }

    /// Opens explicit safetensors files as one checkpoint, under a display `name`.
    pub fn open_files(name: &str, files: &[PathBuf]) -> Result<Self> {
        let mut ckpt = Checkpoint {
            name: name.to_string(),
            shards: Vec::new(),
            tensors: HashMap::new(),
            metadata: BTreeMap::new(),
            absent: HashMap::new(),
            origins: HashMap::new(),
        };
        for path in files {
            regular_file(path)?;
            let (map, shared) = map_file(path)?;
            let shard = ckpt.shards.len();
            let (data_start, infos, meta) = parse_header(path, &map, shard)?;
            for (k, info) in infos {
                ckpt.tensors.insert(k, info);
            }
            ckpt.metadata.extend(meta);
            ckpt.shards.push(Shard { path: path.clone(), map: Some(map), shared, data_start });
        }
        Ok(ckpt)
    }

    /// The name used in error messages (the folder or file).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the checkpoint holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// All tensor names (unordered).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The header entry of `name`, if present.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The `__metadata__` strings of the header(s).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// A cheap fingerprint of the weights, for "was this concept trained on this base model?":
    /// FNV-1a over every tensor in name order, its name, shape, and the values (as f32) of 8
    /// evenly spaced elements. It does not depend on how the weights are stored: sharded or in
    /// one file, F32, F64, or F16/BF16 holding the same values all give the same fingerprint.
    /// Reads a few KiB, not the whole model.
    ///
    /// ```no_run
    /// let a = model_io::Checkpoint::open_dir("sd/unet".as_ref(), &["diffusion_pytorch_model"])?;
    /// println!("{}", a.fingerprint()); // t64:...
    /// # Ok::<(), model_io::Error>(())
    /// ```
    pub fn fingerprint(&self) -> String {
        let mut h = Fnv64::new();
        let mut feed = |bytes: &[u8]| h.feed(bytes);
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        for name in names {
            let info = &self.tensors[name];
            feed(name.as_bytes());
            feed(&[0]);
            for &d in &info.shape {
                feed(&(d as u64).to_le_bytes());
            }
            let n: usize = info.shape.iter().product();
            let b = self.bytes(info);
            let samples = n.min(8);
            for i in 0..samples {
                let at = if samples < 2 { 0 } else { (n - 1) * i / (samples - 1) };
                // The same element whatever the storage order (ONNX keeps Linear weights transposed).
                let at = if info.transposed { (at % info.shape[1]) * info.shape[0] + at / info.shape[1] } else { at };
                let v = match info.dtype.as_str() {
                    "F32" => b.get(at * 4..at * 4 + 4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                    "F16" => b.get(at * 2..at * 2 + 2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
                    "BF16" => b.get(at * 2..at * 2 + 2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
                    "F64" => {
                        b.get(at * 8..at * 8 + 8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                    }
                    // Integer tensors: their bytes as stored.
                    _ => None,
                };
                match v {
                    // -0.0 and 0.0 are one value as read.
                    Some(v) => feed(&(if v == 0.0 { 0.0f32 } else { v }).to_bits().to_le_bytes()),
                    None => {
                        let size = b.len() / n.max(1);
                        feed(b.get(at * size..(at + 1) * size).unwrap_or_default());
                    }
                }
            }
        }
        format!("t64:{:016x}", h.finish())
    }

    /// The fingerprint the first releases wrote into `concept.json` (FNV-1a over each file's
    /// header, its length and 64 evenly spaced 4 KiB samples of its data): it changes with the
    /// storage (shards, dtype), so it is only compared, for concepts those releases trained.
    pub fn legacy_fingerprint(&self) -> String {
        let mut h = Fnv64::new();
        let mut feed = |bytes: &[u8]| h.feed(bytes);
        for s in &self.shards {
            let Some(map) = &s.map else { continue };
            feed(&map[..s.data_start]);
            feed(&(map.len() as u64).to_le_bytes());
            let data = &map[s.data_start..];
            let n = 64usize;
            for i in 0..n {
                let start = data.len().saturating_sub(4096) * i / (n - 1);
                feed(&data[start..(start + 4096).min(data.len())]);
            }
        }
        format!("fnv64:{:016x}", h.finish())
    }

    /// The first tensor (in name order) holding NaN or Inf, if any: reads every float tensor,
    /// for a diagnosis after a model made non-finite values.
    pub fn first_nonfinite(&self) -> Option<String> {
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        names.into_iter().find(|n| self.read_f32(n).is_ok_and(|(v, _)| v.iter().any(|x| !x.is_finite()))).cloned()
    }

    /// Where tensor `name` came from when its key is not the file's own: for an ONNX file, the
    /// node that consumes the initializer (`node `/conv_in/Conv` (Conv)`).
    pub fn origin(&self, name: &str) -> Option<&str> {
        self.origins.get(name).map(String::as_str)
    }

    /// One checkpoint of this one's tensors and `other`'s, under `name`: the halves of a model
    /// exported in two files (diffusers' ONNX `vae_encoder/` and `vae_decoder/`). A key in
    /// both is an error naming it.
    ///
    /// ```no_run
    /// use model_io::Checkpoint;
    /// let enc = Checkpoint::open_onnx("sd-onnx/vae_encoder/model.onnx".as_ref())?;
    /// let dec = Checkpoint::open_onnx("sd-onnx/vae_decoder/model.onnx".as_ref())?;
    /// let vae = enc.merge(dec, "sd-onnx [vae]")?;
    /// # Ok::<(), model_io::Error>(())
    /// ```
    pub fn merge(mut self, other: Checkpoint, name: &str) -> Result<Checkpoint> {
        let offset = self.shards.len();
        for (k, mut info) in other.tensors {
            if self.tensors.contains_key(&k) {
                return Err(Error::invalid(format!("{name}: `{k}` is in both {} and {}", self.name, other.name)));
            }
            info.shard += offset;
            self.tensors.insert(k, info);
        }
        self.shards.extend(other.shards);
        self.origins.extend(other.origins);
        self.absent.extend(other.absent);
        self.metadata.extend(other.metadata);
        self.name = name.to_string();
        Ok(self)
    }

    /// Path of the file holding `name`, for messages.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.tensors.get(name).map(|i| self.shards[i.shard].path.as_path())
    }

    /// Replaces tensor `name` by `values` (f32, the same element count) held in memory: a
    /// patched weight, such as a LoRA merged into its base layer. Reads and
    /// [`Checkpoint::fingerprint`] see the new values; the file is
    /// not touched; views derived after the call see the new values. `source` names where they
    /// came from, for messages. Each call keeps its values in a new in-memory shard: set a
    /// tensor once (summing several changes first), not repeatedly.
    ///
    /// ```no_run
    /// let mut ckpt = model_io::Checkpoint::open_dir("sd/unet".as_ref(), &["diffusion_pytorch_model"])?;
    /// let (mut w, _) = ckpt.read_f32("conv_in.weight")?;
    /// w.iter_mut().for_each(|v| *v *= 2.0);
    /// ckpt.set_f32("conv_in.weight", w, "doubled".as_ref())?;
    /// # Ok::<(), model_io::Error>(())
    /// ```
    pub fn set_f32(&mut self, name: &str, values: Vec<f32>, source: &Path) -> Result<()> {
        let info = self.tensors.get(name).ok_or_else(|| self.missing(name))?;
        let numel: usize = info.shape.iter().product();
        if values.len() != numel {
            return Err(Error::invalid(format!(
                "{}: `{name}` has {numel} elements ({:?}); {} values cannot replace them",
                self.name,
                info.shape,
                values.len()
            )));
        }
        let shape = info.shape.clone();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let end = bytes.len();
        let shared = bytes::Bytes::from(bytes);
        self.shards.push(Shard { path: source.to_path_buf(), map: None, shared, data_start: 0 });
        let shard = self.shards.len() - 1;
        self.tensors.insert(
            name.to_string(),
            TensorInfo { dtype: "F32".into(), shape, shard, start: 0, end, transposed: false },
        );
        Ok(())
    }

    fn bytes(&self, info: &TensorInfo) -> &[u8] {
        let s = &self.shards[info.shard];
        &s.shared[s.data_start + info.start..s.data_start + info.end]
    }

    /// The error for reading `name`, which is not in any shard on disk.
    pub fn missing(&self, name: &str) -> Error {
        match self.absent.get(name) {
            Some((index, shard)) => Error::MissingShard { index: index.clone(), shard: shard.clone() },
            None => {
                // An ONNX graph's weights are named from its nodes: say what it holds instead.
                let hint = match self.origins.keys().filter(|k| !k.is_empty()).min() {
                    Some(k) => format!(
                        " (this ONNX graph's weights are, e.g., `{k}` from {}: a graph of another model?)",
                        self.origins[k]
                    ),
                    None => String::new(),
                };
                Error::MissingTensor { checkpoint: self.name.clone(), name: name.to_string(), hint }
            }
        }
    }

    /// Reads a floating-point tensor (F32, F16 or BF16 on disk) as f32 values and its shape.
    pub fn read_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let info = self.tensors.get(name).ok_or_else(|| self.missing(name))?;
        let Some(data) = decode_f32(&info.dtype, self.bytes(info)) else {
            return Err(Error::DType {
                checkpoint: self.name.clone(),
                name: name.into(),
                expected: "F32, F16 or BF16".into(),
                found: info.dtype.clone(),
            });
        };
        self.release(info);
        let data = if info.transposed { transpose(&data, &info.shape) } else { data };
        Ok((data, info.shape.clone()))
    }

    /// A floating-point tensor as f32 [`TensorData`]. Little-endian F32 data aligned for f32
    /// (every F32 checkpoint in practice) is not copied: the data borrows the memory map, which
    /// stays alive while any tensor uses it, and is copied only if something writes to it. As
    /// with PyTorch's `from_pretrained`, the bytes are read from disk when first used, and the
    /// process holds one copy of the weights. Other dtypes are converted ([`Self::read_f32`]).
    pub fn tensor_data_f32(&self, name: &str) -> Result<TensorData> {
        let info = self.tensors.get(name).ok_or_else(|| self.missing(name))?;
        let s = &self.shards[info.shard];
        let (start, end) = (s.data_start + info.start, s.data_start + info.end);
        let aligned = (s.shared.as_ptr() as usize + start).is_multiple_of(std::mem::align_of::<f32>());
        if info.dtype == "F32" && cfg!(target_endian = "little") && aligned && !info.transposed {
            let bytes = Bytes::from_shared(s.shared.slice(start..end), AllocationProperty::File);
            return Ok(TensorData::from_bytes(bytes, info.shape.clone(), DType::F32));
        }
        let (data, shape) = self.read_f32(name)?;
        Ok(TensorData::new(data, shape))
    }

    /// Drops the pages of tensor `name` from this process's resident memory (the page cache
    /// keeps them; a later read faults them back in), for a caller that copied it out and
    /// dropped the tensor. Unknown names are ignored.
    pub fn release_tensor(&self, name: &str) {
        if let Some(info) = self.tensors.get(name) {
            self.release(info);
        }
    }

    /// Drops a tensor's pages, once copied out, from this process's resident memory (the page
    /// cache keeps them). Without it a load holds every page of the file next to the copy:
    /// twice the weights at the peak.
    fn release(&self, info: &TensorInfo) {
        #[cfg(unix)]
        {
            let s = &self.shards[info.shard];
            let Some(map) = &s.map else { return };
            // SAFETY: the map is read-only and backed by the file, so MADV_DONTNEED only drops
            // page-table entries: a later read of the range faults the same bytes back in from
            // the page cache or the file. Best effort: an error leaves the pages mapped.
            let _ = unsafe {
                map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    s.data_start + info.start,
                    info.end - info.start,
                )
            };
        }
    }

    /// Reads an integer tensor (I64, I32, I16, I8, U8 or BOOL on disk) as i64 values and its shape.
    pub fn read_i64(&self, name: &str) -> Result<(Vec<i64>, Vec<usize>)> {
        let info = self.tensors.get(name).ok_or_else(|| self.missing(name))?;
        let b = self.bytes(info);
        let data = match info.dtype.as_str() {
            "I64" => b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(),
            "I32" => b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64).collect(),
            "I16" => b.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]]) as i64).collect(),
            "I8" => b.iter().map(|&v| v as i8 as i64).collect(),
            "U8" | "BOOL" => b.iter().map(|&v| v as i64).collect(),
            other => {
                return Err(Error::DType {
                    checkpoint: self.name.clone(),
                    name: name.into(),
                    expected: "an integer dtype (I64, I32)".into(),
                    found: other.into(),
                })
            }
        };
        Ok((data, info.shape.clone()))
    }
}

/// Size in bytes of one element of a safetensors dtype.
pub(crate) fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return None,
    })
}

#[derive(Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

type Header = (usize, Vec<(String, TensorInfo)>, BTreeMap<String, String>);

/// Fails unless `path` is a regular file: a folder, FIFO or device (`/dev/zero`) in place of a
/// weight file is named as such, not read.
pub(crate) fn regular_file(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::Io { path: path.to_path_buf(), cause: e })?;
    if meta.is_file() {
        return Ok(());
    }
    let what = if meta.is_dir() { "a folder" } else { "not a regular file (a FIFO, socket or device)" };
    Err(Error::Config { path: path.to_path_buf(), message: format!("is {what}; expected a model file") })
}

/// Memory-maps `path` read-only: the map, and the same bytes as `bytes::Bytes` that keep it
/// alive while any view of them lives.
pub(crate) fn map_file(path: &Path) -> Result<(Arc<Mmap>, bytes::Bytes)> {
    let file = std::fs::File::open(path).map_err(|e| Error::Io { path: path.to_path_buf(), cause: e })?;
    // SAFETY: the map is read-only; a file changed underneath us while loading is a user
    // error we cannot guard against without copying the whole model into memory.
    let map = Arc::new(unsafe { Mmap::map(&file) }.map_err(|e| Error::Io { path: path.to_path_buf(), cause: e })?);
    let shared = bytes::Bytes::from_owner(SharedMap(map.clone()));
    Ok((map, shared))
}

/// The largest header accepted, as Python's safetensors (100 MB).
const MAX_HEADER: usize = 100_000_000;

fn parse_header(path: &Path, buf: &[u8], shard: usize) -> Result<Header> {
    let bad = |reason: String| Error::BadSafetensors { path: path.to_path_buf(), reason };
    if buf.len() < 8 {
        return Err(bad(format!("{} bytes, shorter than the 8-byte header length", buf.len())));
    }
    let n = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes")) as usize;
    if n > buf.len() - 8 {
        return Err(bad(format!("header claims {n} bytes but the file has {}", buf.len())));
    }
    if n > MAX_HEADER {
        return Err(bad(format!("header of {n} bytes, above the limit of {MAX_HEADER}")));
    }
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&buf[8..8 + n]).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let data_len = buf.len() - 8 - n;
    let mut infos = Vec::with_capacity(header.len());
    let mut meta = BTreeMap::new();
    for (k, v) in header {
        if k == "__metadata__" {
            if let Some(m) = v.as_object() {
                for (mk, mv) in m {
                    meta.insert(mk.clone(), mv.as_str().map(str::to_string).unwrap_or_else(|| mv.to_string()));
                }
            }
            continue;
        }
        let raw: RawInfo = serde_json::from_value(v).map_err(|e| bad(format!("entry `{k}` is malformed: {e}")))?;
        let (start, end) = raw.data_offsets;
        let size =
            dtype_size(&raw.dtype).ok_or_else(|| bad(format!("tensor `{k}` has unknown dtype {}", raw.dtype)))?;
        let numel = raw.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if end < start || numel.and_then(|n| n.checked_mul(size)) != Some(end - start) {
            let numel: usize = raw.shape.iter().fold(1usize, |a, &d| a.saturating_mul(d));
            return Err(bad(format!(
                "tensor `{k}` spans {} bytes but its shape {:?} needs {}",
                end.saturating_sub(start),
                raw.shape,
                numel.saturating_mul(size)
            )));
        }
        if end > data_len {
            return Err(bad(format!("tensor `{k}` ends at byte {end} but the data section has {data_len} bytes")));
        }
        infos.push((k, TensorInfo { dtype: raw.dtype, shape: raw.shape, shard, start, end, transposed: false }));
    }
    // As Python's safetensors validates: the tensors tile the data section, in order of their
    // offsets, with no overlap, no gap and nothing after the last.
    let mut spans: Vec<(usize, usize, &str)> = infos.iter().map(|(k, t)| (t.start, t.end, k.as_str())).collect();
    spans.sort_unstable();
    let mut at = 0;
    for (start, end, name) in spans {
        if start != at {
            let what = if start < at { "overlaps the tensor before it" } else { "leaves a gap before it" };
            return Err(bad(format!("tensor `{name}` starts at byte {start}, which {what} (expected {at})")));
        }
        at = end;
    }
    if at != data_len {
        return Err(bad(format!("the tensors end at byte {at} but the data section has {data_len} bytes")));
    }
    Ok((8 + n, infos, meta))
}

/// A floating-point tensor's little-endian bytes as f32 values; `None` for other dtypes.
pub(crate) fn decode_f32(dtype: &str, b: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        "F32" => f32_from_le(b),
        "F16" => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        "BF16" => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        "F64" => b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8-byte chunk")) as f32).collect(),
        _ => return None,
    })
}

/// Little-endian f32 bytes to values: one memcpy on little-endian machines.
fn f32_from_le(b: &[u8]) -> Vec<f32> {
    if cfg!(target_endian = "little") {
        let mut v = vec![0f32; b.len() / 4];
        // SAFETY: `v` holds exactly `b.len() / 4 * 4` bytes, f32 has no invalid bit patterns,
        // and the byte order matches.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), v.as_mut_ptr().cast::<u8>(), v.len() * 4) };
        v
    } else {
        b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }
}

/// `data`, stored as the transpose of `shape` (`[shape[1], shape[0]]`), in `shape`'s order.
fn transpose(data: &[f32], shape: &[usize]) -> Vec<f32> {
    let (rows, cols) = (shape[0], shape[1]);
    let mut out = vec![0f32; data.len()];
    // Tiles keep both sides in cache for the large Linear weights.
    const T: usize = 32;
    for r0 in (0..rows).step_by(T) {
        for c0 in (0..cols).step_by(T) {
            for c in c0..(c0 + T).min(cols) {
                for r in r0..(r0 + T).min(rows) {
                    out[r * cols + c] = data[c * rows + r];
                }
            }
        }
    }
    out
}
