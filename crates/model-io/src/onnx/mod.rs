//! ONNX model files as checkpoints: the initializers of a `model.onnx` (inline, or in external
//! data such as `weights.pb` or `model.onnx_data`) under the published (PyTorch state-dict)
//! keys, so every model loads from an ONNX export as from safetensors.
//!
//! Exporters keep the names of weights that a Conv, Gather or LayerNormalization reads. The
//! others become new constants named by the exporter (`onnx::MatMul_1234`), often changed by
//! constant folding; their key is read back from the node that consumes them, whose name is
//! the module path (`/down_blocks.0/attentions.0/proj_in/MatMul` → `down_blocks.0.attentions.0
//! .proj_in.weight`):
//!
//! * a MatMul's second input is a Linear layer's weight, stored `[in, out]`: read transposed;
//! * a Gemm's second input is one as well (transposed unless `transB`), its third the bias;
//! * GroupNorm is exported as InstanceNormalization over the groups (scale 1, bias 0) followed
//!   by a Mul and an Add with the GroupNorm's weight and bias as `[C, 1, 1]`: read as `[C]`;
//! * a Conv's, LayerNormalization's or Gather's inputs keep their role under any name.
//!
//! Initializers that are not weights (shape constants, the attention scale, the sinusoidal
//! time embedding's exponents) are left out: integer tensors, tensors of at most
//! 8 elements ([`SMALL`]), and constants of modules that own no weight. Any other initializer that
//! maps to no weight is an error naming it and its node, so a graph that a runtime optimiser
//! rewrote, or one of another architecture, is refused rather than half-loaded.
//!
//! The renames are the same views the single-file layouts use: the initializers form a
//! checkpoint under their ONNX names, and the published keys are [`Checkpoint::derive`]d from
//! it ([`Derive::Same`], [`Derive::Transpose`], [`Derive::Reshape`]), so an ONNX export and a
//! single file differ only in how the entries are found.

mod proto;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Component, Path, PathBuf};

use prost::Message;

use crate::checkpoint::{decode_f32, dtype_size, map_file, regular_file, Shard, TensorInfo};
use crate::{Checkpoint, Derive, Error, Result};

/// Initializers of at most this many elements that map to no weight are constants of the
/// computation (scales, shapes, Resize factors), not weights, and are skipped.
pub(crate) const SMALL: usize = 8;

/// A shard index not yet known: values decoded from typed fields, placed in one in-memory
/// shard once every tensor is read.
const TYPED: usize = usize::MAX;

impl Checkpoint {
    /// Opens an ONNX model file (`model.onnx`) as a checkpoint of its weights under the
    /// published keys (see the module docs). Its external data (`weights.pb`,
    /// `model.onnx_data`, ...) must lie in the model's folder. Data stored as raw bytes, in the
    /// file or beside it, is memory-mapped and read when used; values in typed fields
    /// (`float_data`, `int64_data`, ...) are decoded at open.
    ///
    /// ```no_run
    /// let unet = model_io::Checkpoint::open_onnx("sd-onnx/unet/model.onnx".as_ref())?;
    /// assert!(unet.info("conv_in.weight").is_some());
    /// # Ok::<(), model_io::Error>(())
    /// ```
    pub fn open_onnx(path: &Path) -> Result<Self> {
        regular_file(path)?;
        let (map, shared) = map_file(path)?;
        let bad = |reason: String| Error::BadOnnx { path: path.to_path_buf(), reason };
        let model = proto::ModelProto::decode(shared.clone())
            .map_err(|e| bad(format!("cannot be decoded as an ONNX model ({e})")))?;
        let graph = model.graph.as_ref().ok_or_else(|| bad("holds no graph".into()))?;
        if graph.node.is_empty() && graph.initializer.is_empty() {
            return Err(bad("its graph has no nodes and no initializers".into()));
        }
        if !graph.sparse_initializer.is_empty() {
            return Err(bad(format!(
                "holds {} sparse initializers, which are not read",
                graph.sparse_initializer.len()
            )));
        }
        // Functions' bodies are checked for fused ops; their nodes have their own name scope, so
        // only the graph's nodes name its initializers.
        let nodes: Vec<&proto::NodeProto> = graph.node.iter().collect();
        for n in graph.node.iter().chain(model.functions.iter().flat_map(|f| f.node.iter())) {
            if n.domain.starts_with("com.microsoft") || n.domain.starts_with("com.ms.") {
                return Err(bad(format!(
                    "node `{}` is ONNX Runtime's fused `{}` op (domain {}): an ORT- or Olive-optimised graph, whose \
                     weights are rearranged for its kernels; export the model again without optimisation \
                     (torch.onnx.export, or optimum-cli export onnx without --optimize)",
                    n.name, n.op_type, n.domain
                )));
            }
        }
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
        let mut reader = Reader {
            model: path.to_path_buf(),
            dir,
            shards: vec![Shard { path: path.to_path_buf(), map: Some(map), shared: shared.clone(), data_start: 0 }],
            externals: HashMap::new(),
            typed: Vec::new(),
        };
        // Initializers, then the values of Constant nodes (some exporters store weights so).
        let mut stored: BTreeMap<String, TensorInfo> = BTreeMap::new();
        let constants = nodes.iter().filter(|n| n.op_type == "Constant" && n.domain.is_empty()).filter_map(|n| {
            let t = n.attribute.iter().find(|a| a.name == "value")?.t.as_ref()?;
            Some((n.output.first()?.clone(), t))
        });
        for (name, t) in graph.initializer.iter().map(|t| (t.name.clone(), t)).chain(constants) {
            if let Some(info) = reader.tensor(&name, t)? {
                if stored.contains_key(&name) {
                    return Err(bad(format!("holds two initializers or constants named `{name}`")));
                }
                stored.insert(name, info);
            }
        }
        let typed_shard = reader.shards.len();
        let typed = std::mem::take(&mut reader.typed);
        reader.shards.push(Shard {
            path: path.to_path_buf(),
            map: None,
            shared: bytes::Bytes::from(typed),
            data_start: 0,
        });
        for info in stored.values_mut() {
            if info.shard == TYPED {
                info.shard = typed_shard;
            }
        }
        let plan = name_map(path, &nodes, &stored, &reader)?;
        let name = path.display().to_string();
        let raw = Checkpoint {
            name: name.clone(),
            shards: reader.shards,
            tensors: stored.into_iter().collect(),
            metadata: model.metadata_props.iter().map(|p| (p.key.clone(), p.value.clone())).collect(),
            absent: HashMap::new(),
            origins: HashMap::new(),
        };
        let mut origins = HashMap::new();
        let entries: Vec<(String, String, Derive)> = plan
            .into_iter()
            .map(|(key, (onnx_name, how, origin))| {
                origins.insert(key.clone(), origin);
                (key, onnx_name, how)
            })
            .collect();
        let mut ckpt = raw.derive(&name, entries)?;
        ckpt.origins = origins;
        Ok(ckpt)
    }
}

struct Reader {
    model: PathBuf,
    dir: PathBuf,
    shards: Vec<Shard>,
    /// External data files by path, as shard indices.
    externals: HashMap<PathBuf, usize>,
    /// Values of typed fields, little-endian, each tensor 8-byte aligned.
    typed: Vec<u8>,
}

impl Reader {
    fn bad(&self, reason: String) -> Error {
        Error::BadOnnx { path: self.model.clone(), reason }
    }

    /// The tensor's entry, or `None` for a small tensor of a type no model reads (strings).
    fn tensor(&mut self, name: &str, t: &proto::TensorProto) -> Result<Option<TensorInfo>> {
        let mut shape = Vec::with_capacity(t.dims.len());
        for &d in &t.dims {
            let d = usize::try_from(d)
                .ok()
                .filter(|d| *d < 1 << 40)
                .ok_or_else(|| self.bad(format!("tensor `{name}` has dimension {d}")))?;
            shape.push(d);
        }
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let Some(numel) = numel.filter(|n| *n < 1 << 40) else {
            return Err(self.bad(format!("tensor `{name}` has shape {shape:?}, too large to be a weight")));
        };
        let Some(dtype) = proto::dtype_name(t.data_type) else {
            if numel <= SMALL {
                return Ok(None);
            }
            return Err(self.bad(format!(
                "tensor `{name}` {shape:?} is {}: read are FLOAT, FLOAT16, BFLOAT16, DOUBLE and integer types",
                proto::onnx_dtype(t.data_type)
            )));
        };
        let size = dtype_size(dtype).expect("every mapped dtype has a size");
        let nbytes = numel * size;
        let info = |shard: usize, start: usize| TensorInfo {
            dtype: dtype.to_string(),
            shape: shape.clone(),
            shard,
            start,
            end: start + nbytes,
            transposed: false,
        };
        if t.data_location == 1 {
            let entry = |k: &str| t.external_data.iter().find(|e| e.key == k).map(|e| e.value.as_str());
            let location = entry("location")
                .ok_or_else(|| self.bad(format!("tensor `{name}` is stored externally but names no location")))?;
            let number = |k: &str| -> Result<Option<usize>> {
                entry(k)
                    .map(|v| v.trim().parse::<usize>().map_err(|_| self.bad(format!("tensor `{name}` has {k} `{v}`"))))
                    .transpose()
            };
            let (offset, length) = (number("offset")?.unwrap_or(0), number("length")?);
            let shard = self.external(name, location)?;
            let file_len = self.shards[shard].shared.len();
            let length = length.unwrap_or(nbytes);
            if length != nbytes {
                return Err(self.bad(format!(
                    "tensor `{name}` {shape:?} {dtype} needs {nbytes} bytes but its external data is {length} bytes"
                )));
            }
            if offset.checked_add(length).is_none_or(|end| end > file_len) {
                return Err(Error::BadOnnx {
                    path: self.shards[shard].path.clone(),
                    reason: format!(
                        "tensor `{name}` lies at bytes {offset}..{} but the file has {file_len}: is it truncated?",
                        offset.saturating_add(length)
                    ),
                });
            }
            return Ok(Some(info(shard, offset)));
        }
        if !t.raw_data.is_empty() || nbytes == 0 {
            if t.raw_data.len() != nbytes {
                return Err(self.bad(format!(
                    "tensor `{name}` {shape:?} {dtype} needs {nbytes} bytes but holds {}",
                    t.raw_data.len()
                )));
            }
            // A view of the memory map when the decoder kept it one; otherwise a copy.
            let base = self.shards[0].shared.as_ptr() as usize;
            let at = (t.raw_data.as_ptr() as usize).wrapping_sub(base);
            if at.checked_add(nbytes).is_some_and(|end| end <= self.shards[0].shared.len()) {
                return Ok(Some(info(0, at)));
            }
            let start = self.push_typed(&t.raw_data);
            return Ok(Some(info(TYPED, start)));
        }
        let count = |n: usize, field: &str| -> Result<()> {
            if n == numel {
                Ok(())
            } else {
                Err(self.bad(format!("tensor `{name}` {shape:?} needs {numel} values but `{field}` holds {n}")))
            }
        };
        let bytes: Vec<u8> = match dtype {
            "F32" if !t.float_data.is_empty() => {
                count(t.float_data.len(), "float_data")?;
                t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            "F64" if !t.double_data.is_empty() => {
                count(t.double_data.len(), "double_data")?;
                t.double_data.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            "I64" if !t.int64_data.is_empty() => {
                count(t.int64_data.len(), "int64_data")?;
                t.int64_data.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            "U64" | "U32" if !t.uint64_data.is_empty() => {
                count(t.uint64_data.len(), "uint64_data")?;
                t.uint64_data.iter().flat_map(|v| v.to_le_bytes()[..size].to_vec()).collect()
            }
            "I32" | "I16" | "I8" | "U16" | "U8" | "BOOL" | "F16" | "BF16" if !t.int32_data.is_empty() => {
                count(t.int32_data.len(), "int32_data")?;
                t.int32_data.iter().flat_map(|v| v.to_le_bytes()[..size].to_vec()).collect()
            }
            _ => return Err(self.bad(format!("tensor `{name}` {shape:?} {dtype} holds no data"))),
        };
        let start = self.push_typed(&bytes);
        Ok(Some(info(TYPED, start)))
    }

    fn push_typed(&mut self, bytes: &[u8]) -> usize {
        while !self.typed.len().is_multiple_of(8) {
            self.typed.push(0);
        }
        let start = self.typed.len();
        self.typed.extend_from_slice(bytes);
        start
    }

    /// The shard of external data file `location`, mapped on first use. Only files inside
    /// the model's folder are read.
    fn external(&mut self, tensor: &str, location: &str) -> Result<usize> {
        let rel = Path::new(location);
        if location.is_empty()
            || rel.is_absolute()
            || !rel.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(self.bad(format!(
                "tensor `{tensor}` names external data `{location}`, outside the model's folder: refused"
            )));
        }
        let path = self.dir.join(rel);
        if let Some(&s) = self.externals.get(&path) {
            return Ok(s);
        }
        if !path.exists() {
            return Err(Error::Config {
                path: path.clone(),
                message: format!(
                    "missing: the external data of `{}` (tensor `{tensor}`); copy it beside the model",
                    self.model.display()
                ),
            });
        }
        regular_file(&path)?;
        let (map, shared) = map_file(&path)?;
        self.shards.push(Shard { path: path.clone(), map: Some(map), shared, data_start: 0 });
        let s = self.shards.len() - 1;
        self.externals.insert(path, s);
        Ok(s)
    }
}

/// Whether an initializer's name is a state-dict key (`down_blocks.0.resnets.0.conv1.weight`),
/// not one the exporter made (`onnx::MatMul_1234`, `/down_blocks.0/Constant_output_0`).
fn is_state_dict_key(name: &str) -> bool {
    !name.is_empty()
        && !name.contains("::")
        && !name.contains('/')
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.contains('.')
}

/// A node's module path, from its name (`/text_model/encoder/layers.0/self_attn/q_proj/MatMul`
/// → `text_model.encoder.layers.0.self_attn.q_proj`), or, for the dynamo exporter, from its
/// `pkg.torch.onnx.name_scopes` metadata.
fn module_path(node: &proto::NodeProto) -> Option<String> {
    if let Some(scopes) = node.metadata_props.iter().find(|p| p.key == "pkg.torch.onnx.name_scopes") {
        // A Python list of the module paths from the root, then the op's own name:
        // `['', 'down_blocks.0', 'down_blocks.0.resnets.0', 'down_blocks.0.resnets.0.norm1', 'group_norm']`.
        let scopes: Vec<&str> = scopes
            .value
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|s| s.trim().trim_matches(|c| c == '\'' || c == '"'))
            .collect();
        return Some(scopes[..scopes.len().saturating_sub(1)].iter().rfind(|s| !s.is_empty())?.to_string());
    }
    // `/Mul`: an op of the root module, which owns no weight of its own.
    let rest = node.name.strip_prefix('/')?;
    Some(rest.rsplit_once('/').map_or_else(String::new, |(path, _op)| path.replace('/', ".")))
}

/// Each published key: the initializer it is read from, how, and the node that says so.
type Plan = BTreeMap<String, (String, Derive, String)>;

/// The published key of every initializer that is a weight (see the module docs).
fn name_map(
    path: &Path,
    nodes: &[&proto::NodeProto],
    stored: &BTreeMap<String, TensorInfo>,
    r: &Reader,
) -> Result<Plan> {
    let bad = |reason: String| Error::BadOnnx { path: path.to_path_buf(), reason };
    // The TorchScript exporter stores equal constants once and feeds the other consumers
    // through Identity nodes (`onnx::Mul_5261 = Identity(onnx::Mul_5259)`): follow them.
    let mut alias: HashMap<&str, &str> = HashMap::new();
    for n in nodes {
        if let (true, [input], [output]) = (n.op_type == "Identity", n.input.as_slice(), n.output.as_slice()) {
            alias.insert(output.as_str(), input.as_str());
        }
    }
    fn root<'a>(alias: &HashMap<&'a str, &'a str>, mut name: &'a str) -> &'a str {
        for _ in 0..64 {
            match alias.get(name) {
                Some(next) => name = next,
                None => break,
            }
        }
        name
    }
    let mut uses: HashMap<&str, Vec<(usize, usize)>> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        if n.op_type == "Identity" {
            continue;
        }
        for (j, input) in n.input.iter().enumerate() {
            let input = root(&alias, input);
            if stored.contains_key(input) {
                uses.entry(input).or_default().push((i, j));
            }
        }
    }
    let paths: Vec<Option<String>> = nodes.iter().map(|n| module_path(n)).collect();
    let group_norms: HashSet<&str> = nodes
        .iter()
        .zip(&paths)
        .filter(|(n, _)| n.op_type == "InstanceNormalization")
        .filter_map(|(_, p)| p.as_deref())
        .collect();
    let origin = |i: usize| format!("node `{}` ({})", nodes[i].name, nodes[i].op_type);
    let mut plan: Plan = BTreeMap::new();
    let put = |plan: &mut Plan, key: String, name: &str, role: Derive, from: String| -> Result<()> {
        if let Some((other, ..)) = plan.get(&key) {
            if other != name {
                return Err(bad(format!("initializers `{other}` and `{name}` both map to weight `{key}`")));
            }
            return Ok(());
        }
        plan.insert(key, (name.to_string(), role, from));
        Ok(())
    };
    let mut unmapped = Vec::new();
    for (name, info) in stored {
        let consumers = uses.get(name.as_str()).map(Vec::as_slice).unwrap_or_default();
        // A weight that keeps its name is itself; the consumer rules below then give it the
        // keys of other modules that read it through an Identity (equal weights stored once).
        let named = is_state_dict_key(name);
        if named {
            let from = consumers.first().map_or_else(|| "an initializer".to_string(), |&(i, _)| origin(i));
            put(&mut plan, name.clone(), name, Derive::Same, from)?;
        }
        let float = matches!(info.dtype.as_str(), "F32" | "F16" | "BF16" | "F64");
        let numel: usize = info.shape.iter().product();
        let mut mapped = false;
        for &(i, j) in consumers {
            let n = nodes[i];
            let Some(module) = paths[i].as_deref().filter(|p| !p.is_empty()) else { continue };
            let key = |leaf: &str| format!("{module}.{leaf}");
            let transb = n.attribute.iter().find(|a| a.name == "transB").is_some_and(|a| a.i != 0);
            if n.op_type == "Gemm" && j > 0 {
                // A Gemm that scales or transposes its input is not a Linear layer as exported.
                let odd = n.attribute.iter().find(|a| {
                    (matches!(a.name.as_str(), "alpha" | "beta") && a.f != 1.0) || (a.name == "transA" && a.i != 0)
                });
                if let Some(a) = odd {
                    return Err(bad(format!(
                        "node `{}` (Gemm) has {} {}: its weights are not a Linear layer's as stored",
                        n.name,
                        a.name,
                        if a.name == "transA" { a.i.to_string() } else { a.f.to_string() }
                    )));
                }
            }
            let vector = info.shape.iter().filter(|&&d| d != 1).count() <= 1;
            let role = match (n.op_type.as_str(), j) {
                ("MatMul", 1) if info.shape.len() == 2 => Some(("weight", Derive::Transpose)),
                ("Gemm", 1) if info.shape.len() == 2 => {
                    Some(("weight", if transb { Derive::Same } else { Derive::Transpose }))
                }
                ("Gemm", 2) | ("Conv", 2) | ("LayerNormalization", 2) => Some(("bias", Derive::Reshape(vec![numel]))),
                ("Conv", 1) | ("Gather", 0) => Some(("weight", Derive::Same)),
                ("LayerNormalization", 1) => Some(("weight", Derive::Reshape(vec![numel]))),
                ("Mul", _) if vector && group_norms.contains(module) => Some(("weight", Derive::Reshape(vec![numel]))),
                ("Add", _) if vector && group_norms.contains(module) => Some(("bias", Derive::Reshape(vec![numel]))),
                // A Linear's bias after its MatMul, when stored once for several layers.
                ("Add", _) if named && info.shape.len() == 1 => Some(("bias", Derive::Same)),
                ("InstanceNormalization", 1 | 2) => {
                    // Over the groups of a GroupNorm: 1 and 0, not weights. A real
                    // InstanceNorm's scale and bias are.
                    let identity = if j == 1 { 1.0 } else { 0.0 };
                    let ckpt_values = read_values(r, info);
                    if ckpt_values.is_some_and(|v| v.iter().all(|&x| x == identity)) {
                        mapped = true;
                        None
                    } else {
                        Some((if j == 1 { "weight" } else { "bias" }, Derive::Reshape(vec![numel])))
                    }
                }
                _ => None,
            };
            // Every consumer: exporters store identical constants once (the GroupNorms of a
            // freshly initialised model share one `[C, 1, 1]` of ones), each a weight of its own.
            // A named weight is never re-laid out by its consumer: only renames apply to it.
            let role = role.filter(|(_, r)| !named || !matches!(r, Derive::Transpose));
            if let Some((leaf, role)) = role {
                if named && key(leaf) == *name {
                    continue;
                }
                if float {
                    put(&mut plan, key(leaf), name, role, origin(i))?;
                    mapped = true;
                }
            }
        }
        if !mapped && !named && float && numel > SMALL {
            unmapped.push((name, consumers.first().copied()));
        }
    }
    // Constants of modules that own no weight (the time embedding's sinusoid) are not weights.
    let owners: HashSet<&str> = plan.keys().filter_map(|k| k.rsplit_once('.').map(|(m, _)| m)).collect();
    for (name, first_use) in unmapped {
        let Some((i, _)) = first_use else { continue };
        // A node without a module path cannot name what it reads: refused as well.
        if paths[i].as_deref().is_some_and(|m| !owners.contains(m)) {
            continue;
        }
        return Err(bad(format!(
            "initializer `{name}` {:?}, an input of {}, maps to no weight of the published model: a graph \
             rewritten by an optimiser, or an op this reader does not map",
            stored[name].shape,
            origin(i)
        )));
    }
    Ok(plan)
}

/// A small float tensor's values, for the identity check of InstanceNormalization.
fn read_values(r: &Reader, info: &TensorInfo) -> Option<Vec<f32>> {
    let s = r.shards.get(info.shard)?;
    decode_f32(&info.dtype, s.shared.get(s.data_start + info.start..s.data_start + info.end)?)
}

#[cfg(test)]
mod tests;
