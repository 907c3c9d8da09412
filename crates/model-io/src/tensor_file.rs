//! Named host tensors in safetensors files: the stage runner's inputs and outputs, cached
//! queries, small adapters. Writes are atomic.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use crate::{write_atomic, Checkpoint, Error, Result};

/// The values of a host tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// A tensor in host memory with its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
}

impl HostTensor {
    /// An f32 tensor; panics if `data` does not match `shape` (a programming error).
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "shape and data length differ");
        Self { shape, data: HostData::F32(data) }
    }

    /// An i64 tensor; panics if `data` does not match `shape` (a programming error).
    pub fn i64(shape: Vec<usize>, data: Vec<i64>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "shape and data length differ");
        Self { shape, data: HostData::I64(data) }
    }

    /// Copies a Burn float tensor to the host.
    pub fn from_tensor<B: Backend, const D: usize>(t: Tensor<B, D>) -> Self {
        let shape = t.dims().to_vec();
        let data = t.into_data().convert::<f32>().into_vec::<f32>().expect("f32 data after convert");
        Self::f32(shape, data)
    }

    /// The f32 values, or an error naming `name` if this is an integer tensor.
    pub fn as_f32(&self, name: &str) -> Result<&[f32]> {
        match &self.data {
            HostData::F32(v) => Ok(v),
            HostData::I64(_) => Err(Error::invalid(format!("tensor `{name}` is an integer tensor, expected f32"))),
        }
    }

    /// Converts to a Burn float tensor of rank `D`, checking the rank.
    pub fn to_float<B: Backend, const D: usize>(&self, name: &str, device: &B::Device) -> Result<Tensor<B, D>> {
        self.check_rank(name, D)?;
        Ok(Tensor::from_data(self.f32_data(), device))
    }

    /// The values as f32 `TensorData` of this shape (integers converted).
    fn f32_data(&self) -> TensorData {
        let v = match &self.data {
            HostData::F32(v) => v.clone(),
            HostData::I64(v) => v.iter().map(|&x| x as f32).collect(),
        };
        TensorData::new(v, self.shape.clone())
    }

    /// [`HostTensor::to_float`] in f32 whatever the device's default float type: values that
    /// half precision would round (a timestep of 999 is 1000 in bf16).
    pub fn to_f32_tensor<B: Backend, const D: usize>(&self, name: &str, device: &B::Device) -> Result<Tensor<B, D>> {
        self.check_rank(name, D)?;
        Ok(Tensor::from_data(self.f32_data(), (device, burn::tensor::DType::F32)))
    }

    /// Converts to a Burn int tensor of rank `D`, checking the rank.
    pub fn to_int<B: Backend, const D: usize>(&self, name: &str, device: &B::Device) -> Result<Tensor<B, D, Int>> {
        self.check_rank(name, D)?;
        let v = match &self.data {
            HostData::I64(v) => v.clone(),
            HostData::F32(_) => {
                return Err(Error::invalid(format!("tensor `{name}` is f32, expected an integer tensor (i64)")))
            }
        };
        Ok(Tensor::from_data(TensorData::new(v, self.shape.clone()), device))
    }

    /// Largest absolute difference to `other` (infinite if the shapes differ); for parity tests.
    pub fn max_abs_diff(&self, other: &HostTensor) -> f32 {
        match (&self.data, &other.data) {
            (HostData::F32(a), HostData::F32(b)) if self.shape == other.shape => {
                a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
            }
            (HostData::I64(a), HostData::I64(b)) if self.shape == other.shape && a == b => 0.0,
            _ => f32::INFINITY,
        }
    }

    fn check_rank(&self, name: &str, d: usize) -> Result<()> {
        if self.shape.len() != d {
            return Err(Error::invalid(format!("tensor `{name}` has shape {:?}, expected {d} dimensions", self.shape)));
        }
        Ok(())
    }
}

/// Reads every tensor of a safetensors file (floats become f32, integers i64).
///
/// ```no_run
/// let t = model_io::tensor_file::read_tensors("in.safetensors".as_ref())?;
/// let ids = t.get("input_ids");
/// # Ok::<(), model_io::Error>(())
/// ```
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    Ok(read_tensors_with_metadata(path)?.0)
}

/// Like [`read_tensors`], also returning the header's `__metadata__`.
pub fn read_tensors_with_metadata(path: &Path) -> Result<(BTreeMap<String, HostTensor>, BTreeMap<String, String>)> {
    let ckpt = Checkpoint::open_files(&path.display().to_string(), &[path.to_path_buf()])?;
    let mut out = BTreeMap::new();
    let names: Vec<String> = ckpt.names().map(str::to_string).collect();
    for name in names {
        let dtype = ckpt.info(&name).map(|i| i.dtype.clone()).unwrap_or_default();
        let t = if matches!(dtype.as_str(), "F32" | "F16" | "BF16" | "F64") {
            let (v, s) = ckpt.read_f32(&name)?;
            HostTensor::f32(s, v)
        } else {
            let (v, s) = ckpt.read_i64(&name)?;
            HostTensor::i64(s, v)
        };
        out.insert(name, t);
    }
    Ok((out, ckpt.metadata().clone()))
}

/// Takes tensor `name` out of `tensors`, or fails naming the file and the tensor.
pub fn take(tensors: &mut BTreeMap<String, HostTensor>, file: &Path, name: &str) -> Result<HostTensor> {
    tensors.remove(name).ok_or_else(|| Error::MissingTensor {
        checkpoint: file.display().to_string(),
        name: name.into(),
        hint: String::new(),
    })
}

/// Serialises tensors (and string metadata) in the safetensors format.
pub fn to_bytes(tensors: &BTreeMap<String, HostTensor>, metadata: &BTreeMap<String, String>) -> Vec<u8> {
    to_bytes_as(tensors, metadata, false)
}

/// Like [`to_bytes`], but with float tensors stored as F16 when `f16` is set (as published
/// `.fp16.safetensors` files are; values round to nearest).
///
/// ```
/// use model_io::tensor_file::{to_bytes_as, HostTensor};
/// let t = [("w".to_string(), HostTensor::f32(vec![2], vec![1.0, 0.5]))].into();
/// assert_eq!(to_bytes_as(&t, &Default::default(), true).len() % 8, 4); // header + 2×2 bytes
/// ```
pub fn to_bytes_as(tensors: &BTreeMap<String, HostTensor>, metadata: &BTreeMap<String, String>, f16: bool) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata).expect("string map"));
    }
    let mut offset = 0usize;
    for (name, t) in tensors {
        let (dtype, len) = match &t.data {
            HostData::F32(v) if f16 => ("F16", v.len() * 2),
            HostData::F32(v) => ("F32", v.len() * 4),
            HostData::I64(v) => ("I64", v.len() * 8),
        };
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": dtype, "shape": t.shape, "data_offsets": [offset, offset + len] }),
        );
        offset += len;
    }
    let mut h = serde_json::to_vec(&header).expect("header serialises");
    // The data section must start 8-byte aligned; pad the header with spaces as safetensors does.
    while !(8 + h.len()).is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + offset);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    for t in tensors.values() {
        match &t.data {
            HostData::F32(v) if f16 => {
                v.iter().for_each(|x| out.extend_from_slice(&half::f16::from_f32(*x).to_le_bytes()))
            }
            HostData::F32(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            HostData::I64(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        }
    }
    out
}

/// Writes an F32 safetensors file (keys sorted, metadata `format: pt`) one tensor at a time:
/// `entries` gives each key's shape, `fill(key)` its values when their turn comes, so only one
/// tensor's copy is in memory next to its source. Atomic (temporary file, then rename).
/// Returns the file size in bytes.
///
/// ```
/// let d = tempfile::tempdir().unwrap();
/// let p = d.path().join("w.safetensors");
/// let entries = std::collections::BTreeMap::from([("a".to_string(), vec![2usize])]);
/// model_io::tensor_file::write_f32_streamed(&p, &entries, &mut |_| Ok(vec![1.0, 2.0])).unwrap();
/// assert_eq!(model_io::tensor_file::read_tensors(&p).unwrap()["a"].as_f32("a").unwrap(), &[1.0, 2.0]);
/// ```
pub fn write_f32_streamed(
    path: &Path,
    entries: &BTreeMap<String, Vec<usize>>,
    fill: &mut dyn FnMut(&str) -> Result<Vec<f32>>,
) -> Result<u64> {
    write_f32_streamed_with_metadata(path, entries, &BTreeMap::new(), fill)
}

/// [`write_f32_streamed`] with string `metadata` in the header next to `format: pt`.
pub fn write_f32_streamed_with_metadata(
    path: &Path,
    entries: &BTreeMap<String, Vec<usize>>,
    metadata: &BTreeMap<String, String>,
    fill: &mut dyn FnMut(&str) -> Result<Vec<f32>>,
) -> Result<u64> {
    use std::io::{Seek, SeekFrom, Write};
    let mut header = serde_json::Map::new();
    let mut meta = serde_json::Map::from_iter([("format".to_string(), serde_json::json!("pt"))]);
    meta.extend(metadata.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))));
    header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    let mut offsets = BTreeMap::new();
    let mut end = 0u64;
    for (k, shape) in entries {
        let len = 4 * shape.iter().product::<usize>() as u64;
        header
            .insert(k.clone(), serde_json::json!({ "dtype": "F32", "shape": shape, "data_offsets": [end, end + len] }));
        offsets.insert(k.clone(), (end, len));
        end += len;
    }
    let mut h = serde_json::to_vec(&header).expect("header serialises");
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let data_start = 8 + h.len() as u64;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let io = |e: std::io::Error| Error::Io { path: path.to_path_buf(), cause: e };
    let result = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
        f.write_all(&h).map_err(io)?;
        f.set_len(data_start + end).map_err(io)?;
        for (key, &(at, len)) in &offsets {
            let v = fill(key)?;
            if v.len() as u64 * 4 != len {
                return Err(Error::invalid(format!(
                    "{}: `{key}` gave {} values, expected {}",
                    path.display(),
                    v.len(),
                    len / 4
                )));
            }
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            f.seek(SeekFrom::Start(data_start + at)).and_then(|_| f.write_all(&bytes)).map_err(io)?;
        }
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| data_start + end)
}

/// Writes tensors to `path` atomically (temporary file, then rename).
pub fn write_tensors(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    write_atomic(path, &to_bytes(tensors, metadata))
}
