//! Checkpoints under another key layout: the tensors of a single-file checkpoint (or of any
//! other format's file) renamed to the keys a model reads, without copying a byte.

use std::collections::HashMap;
use std::ops::Range;

use crate::checkpoint::dtype_size;
use crate::{Checkpoint, Error, Result};

/// How one tensor of a derived checkpoint is made from a tensor of its source. Every form is a
/// view of the source's bytes: a rename, a new shape of the same elements, a run of rows, or a
/// 2-D tensor read transposed.
///
/// ```
/// use model_io::Derive;
/// // A 1×1 convolution's weight read as a linear layer's.
/// let d = Derive::Reshape(vec![512, 512]);
/// // The key third of a fused `in_proj_weight` [3·C, C].
/// let k = Derive::Rows(1024..2048);
/// // OpenCLIP's `text_projection` [width, proj] as transformers' Linear weight [proj, width].
/// let t = Derive::Transpose;
/// # let _ = (d, k, t);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Derive {
    /// The tensor as it is.
    Same,
    /// The same elements under another shape (the product must match).
    Reshape(Vec<usize>),
    /// Rows `range` of the first dimension (`in_proj_weight[a..b]`).
    Rows(Range<usize>),
    /// A 2-D tensor transposed (read in the other order when loaded).
    Transpose,
}

impl Checkpoint {
    /// A checkpoint holding `entries` (`(key, source key, how)`) of this one, sharing its
    /// memory map: the view a model of another layout is loaded from. `name` is the derived
    /// checkpoint's name in messages (`model.safetensors [unet]`). A source key that is
    /// missing, a reshape to a different element count or rows out of range is an error naming
    /// the source tensor.
    ///
    /// ```no_run
    /// use model_io::{Checkpoint, Derive};
    /// let file = Checkpoint::open_files("v1-5.safetensors", &["v1-5.safetensors".into()])?;
    /// let unet = file.derive("v1-5.safetensors [unet]", [(
    ///     "conv_in.weight".to_string(),
    ///     "model.diffusion_model.input_blocks.0.0.weight".to_string(),
    ///     Derive::Same,
    /// )])?;
    /// assert_eq!(unet.len(), 1);
    /// # Ok::<(), model_io::Error>(())
    /// ```
    pub fn derive(
        &self,
        name: &str,
        entries: impl IntoIterator<Item = (String, String, Derive)>,
    ) -> Result<Checkpoint> {
        let mut tensors = HashMap::new();
        let mut origins = HashMap::new();
        for (key, source, how) in entries {
            let info = self.tensors.get(&source).ok_or_else(|| self.missing(&source))?;
            if info.transposed && !matches!(how, Derive::Same | Derive::Transpose) {
                return Err(Error::invalid(format!(
                    "{}: tensor `{source}` is stored transposed (an ONNX MatMul weight) and cannot be {}",
                    self.name,
                    if matches!(how, Derive::Rows(_)) { "split by rows" } else { "reshaped" }
                )));
            }
            if let Some(o) = self.origins.get(&source) {
                origins.insert(key.clone(), o.clone());
            }
            let mut out = info.clone();
            let numel: usize = info.shape.iter().product();
            match &how {
                Derive::Same => {}
                Derive::Transpose => {
                    if info.shape.len() != 2 {
                        return Err(Error::invalid(format!(
                            "{}: tensor `{source}` has shape {:?}; only a 2-D tensor can be read transposed",
                            self.name, info.shape
                        )));
                    }
                    out.shape.reverse();
                    out.transposed = !info.transposed;
                }
                Derive::Reshape(shape) => {
                    if shape.iter().product::<usize>() != numel {
                        return Err(Error::Shape {
                            checkpoint: self.name.clone(),
                            name: source.clone(),
                            expected: shape.clone(),
                            found: info.shape.clone(),
                        });
                    }
                    out.shape = shape.clone();
                }
                Derive::Rows(rows) => {
                    let first = info.shape.first().copied().unwrap_or(0);
                    if rows.start >= rows.end || rows.end > first {
                        return Err(Error::invalid(format!(
                            "{}: tensor `{source}` has shape {:?}: rows {}..{} are not a run of its rows",
                            self.name, info.shape, rows.start, rows.end
                        )));
                    }
                    let size = dtype_size(&info.dtype).ok_or_else(|| {
                        Error::invalid(format!("{}: tensor `{source}` has unknown dtype {}", self.name, info.dtype))
                    })?;
                    let row_bytes = numel / first * size;
                    out.start = info.start + rows.start * row_bytes;
                    out.end = info.start + rows.end * row_bytes;
                    out.shape[0] = rows.end - rows.start;
                }
            }
            if tensors.insert(key.clone(), out).is_some() {
                return Err(Error::invalid(format!("{}: two tensors map to `{key}`", self.name)));
            }
        }
        Ok(Checkpoint {
            name: name.to_string(),
            shards: self.shards.clone(),
            tensors,
            metadata: self.metadata.clone(),
            absent: HashMap::new(),
            origins,
        })
    }
}

/// One model's key map between its own (diffusers) keys and another layout's, as prefix
/// rules: each rule maps a module path of the other layout (`input_blocks.1.0`) to one of the
/// model (`down_blocks.0.resnets.0`), with renames of the first segments below it
/// (`in_layers.0` → `norm1`). The longest matching prefix wins; the same rules read both
/// ways, so loading and saving cannot disagree.
///
/// ```
/// const RESNET: &[(&str, &str)] = &[("in_layers.0", "norm1")];
/// let map = model_io::KeyMap::default()
///     .rule("input_blocks.1.0", "down_blocks.0.resnets.0", RESNET)
///     .rule("out.2", "conv_out", &[]);
/// assert_eq!(map.to_model("input_blocks.1.0.in_layers.0.weight").unwrap(), "down_blocks.0.resnets.0.norm1.weight");
/// assert_eq!(map.to_file("down_blocks.0.resnets.0.norm1.weight").unwrap(), "input_blocks.1.0.in_layers.0.weight");
/// assert_eq!(map.to_model("out.2.bias").unwrap(), "conv_out.bias");
/// assert!(map.to_model("label_emb.0.weight").is_none());
/// ```
#[derive(Debug, Clone, Default)]
pub struct KeyMap {
    rules: Vec<(String, String, Renames)>,
}

/// Renames of the segments below a rule's prefix: `(other layout, model)`.
pub type Renames = &'static [(&'static str, &'static str)];

impl KeyMap {
    /// Adds a rule: `file` (the other layout's prefix) is `model`, with `inner` renames
    /// `(file segment(s), model segment(s))` of what follows.
    pub fn rule(mut self, file: impl Into<String>, model: impl Into<String>, inner: Renames) -> Self {
        self.rules.push((file.into(), model.into(), inner));
        self
    }

    /// The model's key for `file_key`, `None` when no rule covers it.
    pub fn to_model(&self, file_key: &str) -> Option<String> {
        self.apply(file_key, false)
    }

    /// The other layout's key for the model's `model_key`, `None` when no rule covers it (a
    /// rule with an empty model prefix covers every key).
    pub fn to_file(&self, model_key: &str) -> Option<String> {
        self.apply(model_key, true)
    }

    fn apply(&self, key: &str, reverse: bool) -> Option<String> {
        let under = |k: &str, p: &str| -> Option<usize> {
            if p.is_empty() {
                Some(0)
            } else if k == p {
                Some(p.len())
            } else if k.len() > p.len() && k.starts_with(p) && k.as_bytes()[p.len()] == b'.' {
                Some(p.len() + 1)
            } else {
                None
            }
        };
        let (from, to, inner, at) = self
            .rules
            .iter()
            .filter_map(|(f, m, inner)| {
                let (from, to) = if reverse { (m, f) } else { (f, m) };
                under(key, from).map(|at| (from, to, inner, at))
            })
            .max_by_key(|(from, ..)| from.len())?;
        let _ = from;
        let mut rest = key[at..].to_string();
        for (f, m) in inner.iter() {
            let (a, b) = if reverse { (*m, *f) } else { (*f, *m) };
            if let Some(n) = under(&rest, a) {
                rest = if n == rest.len() { b.to_string() } else { format!("{b}.{}", &rest[n..]) };
                break;
            }
        }
        Some(match (to.is_empty(), rest.is_empty()) {
            (_, true) => to.clone(),
            (true, false) => rest,
            (false, false) => format!("{to}.{rest}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::tensor_file::{write_tensors, HostTensor};

    fn file() -> (tempfile::TempDir, Checkpoint) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.safetensors");
        let t = BTreeMap::from([
            ("qkv".to_string(), HostTensor::f32(vec![6, 2], (0..12).map(|v| v as f32).collect())),
            ("conv".to_string(), HostTensor::f32(vec![2, 2, 1, 1], vec![1.0, 2.0, 3.0, 4.0])),
        ]);
        write_tensors(&p, &t, &BTreeMap::new()).unwrap();
        let c = Checkpoint::open_files("m", &[p]).unwrap();
        (d, c)
    }

    #[test]
    fn rows_reshapes_and_renames_read_the_source_bytes() {
        let (_d, c) = file();
        let v = c
            .derive(
                "m [x]",
                [
                    ("k".to_string(), "qkv".to_string(), Derive::Rows(2..4)),
                    ("lin".to_string(), "conv".to_string(), Derive::Reshape(vec![2, 2])),
                    ("same".to_string(), "conv".to_string(), Derive::Same),
                ],
            )
            .unwrap();
        assert_eq!(v.read_f32("k").unwrap(), (vec![4.0, 5.0, 6.0, 7.0], vec![2, 2]));
        assert_eq!(v.read_f32("lin").unwrap(), (vec![1.0, 2.0, 3.0, 4.0], vec![2, 2]));
        assert_eq!(v.info("same").unwrap().shape, vec![2, 2, 1, 1]);
        assert_eq!(v.len(), 3);
        let t = c.derive("m [t]", [("t".to_string(), "qkv".to_string(), Derive::Transpose)]).unwrap();
        let want: Vec<f32> = (0..2).flat_map(|c| (0..6).map(move |r| (2 * r + c) as f32)).collect();
        assert_eq!(t.read_f32("t").unwrap(), (want, vec![2, 6]));
        // Transposed twice is the source again.
        let tt = t.derive("m [tt]", [("x".to_string(), "t".to_string(), Derive::Transpose)]).unwrap();
        assert_eq!(tt.read_f32("x").unwrap(), c.read_f32("qkv").unwrap());
        assert!(v.info("qkv").is_none());
    }

    #[test]
    fn a_key_map_reads_both_ways_with_the_longest_prefix() {
        const R: &[(&str, &str)] = &[("skip_connection", "conv_shortcut"), ("in_layers.2", "conv1")];
        let m = KeyMap::default()
            .rule("input_blocks.3.0", "down_blocks.0.resnets.1", R)
            .rule("input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv", &[])
            .rule("text", "", &[]);
        for (file, model) in [
            ("input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight"),
            ("input_blocks.3.0.skip_connection.bias", "down_blocks.0.resnets.1.conv_shortcut.bias"),
            ("input_blocks.3.0.in_layers.2.weight", "down_blocks.0.resnets.1.conv1.weight"),
            ("input_blocks.3.0.in_layers.0.weight", "down_blocks.0.resnets.1.in_layers.0.weight"),
            ("text.a.b", "a.b"),
        ] {
            assert_eq!(m.to_model(file).as_deref(), Some(model), "{file}");
            if !model.contains("in_layers") {
                assert_eq!(m.to_file(model).as_deref(), Some(file), "{model}");
            }
        }
        // A prefix matches whole segments only.
        assert_eq!(m.to_model("input_blocks.30.0.weight"), None);
    }

    #[test]
    fn bad_entries_name_the_source_tensor() {
        let (_d, c) = file();
        let e = c.derive("v", [("a".into(), "nope".into(), Derive::Same)]).err().unwrap().to_string();
        assert!(e.contains("`nope`"), "{e}");
        let e = c.derive("v", [("a".into(), "conv".into(), Derive::Reshape(vec![3]))]).err().unwrap().to_string();
        assert!(e.contains("`conv`") && e.contains("[3]"), "{e}");
        let e = c.derive("v", [("a".into(), "qkv".into(), Derive::Rows(4..7))]).err().unwrap().to_string();
        assert!(e.contains("`qkv`") && e.contains("4..7"), "{e}");
        let e = c.derive("v", [("a".into(), "qkv".into(), Derive::Rows(2..2))]).err().unwrap().to_string();
        assert!(e.contains("2..2 are not a run"), "{e}");
        let e = c.derive("v", [("a".into(), "conv".into(), Derive::Transpose)]).err().unwrap().to_string();
        assert!(e.contains("`conv`") && e.contains("only a 2-D tensor"), "{e}");
        let e = c
            .derive("v", [("a".into(), "qkv".into(), Derive::Same), ("a".into(), "conv".into(), Derive::Same)])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("two tensors map to `a`"), "{e}");
    }
}
