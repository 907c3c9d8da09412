//! The aligner of visual prompts: it turns BLIP-2 Q-Former queries `[B, Q, 768]` into `k`
//! tokens of the text-embedding width `[B, k, D]`, appended after the 77 CLIP tokens.
//!
//! * [`Aligner`]: Linear → GELU → Linear → GELU (the method's default; the final activation
//!   can be `none`), hidden width configurable;
//! * [`QuerySelection`]: the first `k` queries, or adaptive average pooling of the `Q`
//!   queries into `k` (as torch's `adaptive_avg_pool1d`);
//! * [`assemble`] / [`Aligner::unconditional`]: the conditional context `[text][visual]` and
//!   its unconditional counterpart (the aligner applied to all-zero queries);
//! * `aligner.safetensors` read and written in PyTorch's `nn.Linear` layout with the settings in
//!   the file's metadata, so `torch.load`-side code can use it as is.
//!
//! ```no_run
//! use burn::tensor::Tensor;
//! use burn_flex::{Flex, FlexDevice};
//! use q_aligner::{Aligner, AlignerSettings};
//! let aligner = Aligner::<Flex>::load("concept/aligner.safetensors".as_ref(), &FlexDevice)?;
//! let queries = Tensor::<Flex, 3>::zeros([1, 32, 768], &FlexDevice);
//! let visual = aligner.forward(queries)?;                  // [1, k, D]
//! let text = Tensor::<Flex, 3>::zeros([1, 77, visual.dims()[2]], &FlexDevice);
//! let context = q_aligner::assemble(text, visual);         // [1, 77 + k, D]
//! # Ok::<(), model_io::Error>(())
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::tensor::activation::gelu;
use burn::tensor::module::adaptive_avg_pool1d;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use model_io::tensor_file::{read_tensors_with_metadata, write_tensors, HostTensor};
use model_io::{Error, Result};
use model_layers::nn::Linear;

/// Which of the Q-Former's queries feed the aligner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuerySelection {
    /// The first `k` queries (the method's choice: 32 would overwhelm the text).
    First,
    /// Adaptive average pooling of all `Q` queries into `k`.
    Pool,
}

impl QuerySelection {
    /// `first` or `pool`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "first" => Ok(Self::First),
            "pool" => Ok(Self::Pool),
            o => Err(Error::invalid(format!("query selection `{o}` unknown; expected `first` or `pool`"))),
        }
    }

    /// The metadata / CLI name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::First => "first",
            Self::Pool => "pool",
        }
    }
}

/// Settings of an aligner, stored in the metadata of `aligner.safetensors`.
#[derive(Debug, Clone, PartialEq)]
pub struct AlignerSettings {
    /// Visual tokens appended to the context (`k`, default 8).
    pub num_queries: usize,
    pub query_selection: QuerySelection,
    /// GELU after the second linear layer (the method's default) or not.
    pub final_gelu: bool,
}

impl Default for AlignerSettings {
    fn default() -> Self {
        Self { num_queries: 8, query_selection: QuerySelection::First, final_gelu: true }
    }
}

/// The aligner FFN. Field names follow the file's keys (`fc1`, `fc2`).
#[derive(Module, Debug)]
pub struct Aligner<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
    num_queries: usize,
    pool: bool,
    final_gelu: bool,
}

impl<B: Backend> Aligner<B> {
    /// A freshly initialised aligner (`q_dim` → `hidden` → `out_dim`), weights as
    /// PyTorch's `nn.Linear` default (uniform in ±1/sqrt(fan_in)), drawn from `init` in the
    /// order fc1.weight, fc1.bias, fc2.weight, fc2.bias.
    ///
    /// ```
    /// use burn_flex::{Flex, FlexDevice};
    /// let mut init = seeded::SplitMix64::new(0);
    /// let a = q_aligner::Aligner::<Flex>::new(768, 768, 768, &Default::default(), &mut init, &FlexDevice);
    /// assert_eq!(a.out_dim(), 768);
    /// ```
    pub fn new(
        q_dim: usize,
        hidden: usize,
        out_dim: usize,
        settings: &AlignerSettings,
        init: &mut dyn seeded::Init,
        device: &B::Device,
    ) -> Self {
        let mut lin = |i: usize, o: usize| {
            let b = 1.0 / (i as f64).sqrt();
            // Drawn in PyTorch's `[out, in]` layout, as a loaded aligner holds it: the same
            // weights then give bit-identical outputs before and after a save and load.
            let w = Tensor::from_data(TensorData::new(init.uniform(o * i, b), [o, i]), device);
            let bias = Tensor::from_data(TensorData::new(init.uniform(o, b), [o]), device);
            Linear::from_torch(w, Some(bias))
        };
        Self::from_parts(lin(q_dim, hidden), lin(hidden, out_dim), settings)
    }

    fn from_parts(fc1: Linear<B>, fc2: Linear<B>, s: &AlignerSettings) -> Self {
        Self {
            fc1,
            fc2,
            num_queries: s.num_queries,
            pool: s.query_selection == QuerySelection::Pool,
            final_gelu: s.final_gelu,
        }
    }

    /// The settings this aligner was built with.
    pub fn settings(&self) -> AlignerSettings {
        AlignerSettings {
            num_queries: self.num_queries,
            query_selection: if self.pool { QuerySelection::Pool } else { QuerySelection::First },
            final_gelu: self.final_gelu,
        }
    }

    /// Width of the queries it takes (768 for BLIP-2).
    pub fn query_dim(&self) -> usize {
        self.fc1.dims().0
    }

    /// Width of the tokens it makes (the text-embedding width).
    pub fn out_dim(&self) -> usize {
        self.fc2.dims().1
    }

    /// `k`, the number of visual tokens.
    pub fn num_queries(&self) -> usize {
        self.num_queries
    }

    /// Reads `aligner.safetensors`: `fc1.weight` `[H, Q]`, `fc1.bias`, `fc2.weight` `[D, H]`,
    /// `fc2.bias`, with `num_queries`, `query_selection` and `final_activation` in the metadata.
    pub fn load(path: &Path, device: &B::Device) -> Result<Self> {
        let (t, meta) = read_tensors_with_metadata(path)?;
        let file = path.display().to_string();
        let get = |name: &str, rank: usize| -> Result<&HostTensor> {
            let v = t.get(name).ok_or_else(|| Error::MissingTensor {
                checkpoint: file.clone(),
                name: name.into(),
                hint: String::new(),
            })?;
            if v.shape.len() != rank {
                return Err(Error::Shape {
                    checkpoint: file.clone(),
                    name: name.into(),
                    expected: vec![0; rank],
                    found: v.shape.clone(),
                });
            }
            Ok(v)
        };
        let (w1, b1, w2, b2) = (get("fc1.weight", 2)?, get("fc1.bias", 1)?, get("fc2.weight", 2)?, get("fc2.bias", 1)?);
        let (h, d) = (w1.shape[0], w2.shape[0]);
        for (name, v, want) in [("fc1.bias", b1, vec![h]), ("fc2.weight", w2, vec![d, h]), ("fc2.bias", b2, vec![d])] {
            if v.shape != want {
                return Err(Error::Shape {
                    checkpoint: file.clone(),
                    name: name.into(),
                    expected: want,
                    found: v.shape.clone(),
                });
            }
        }
        let meta_err =
            |key: &str, msg: String| Error::Config { path: path.into(), message: format!("metadata `{key}`: {msg}") };
        let num_queries = match meta.get("num_queries") {
            Some(v) => v.parse().map_err(|_| meta_err("num_queries", format!("`{v}` is not a number")))?,
            None => 8,
        };
        let query_selection = match meta.get("query_selection") {
            Some(v) => QuerySelection::parse(v).map_err(|e| meta_err("query_selection", e.to_string()))?,
            None => QuerySelection::First,
        };
        let final_gelu = match meta.get("final_activation").map(String::as_str) {
            None | Some("gelu") => true,
            Some("none") => false,
            Some(o) => return Err(meta_err("final_activation", format!("`{o}` unknown; expected gelu or none"))),
        };
        let lin = |w: &HostTensor, b: &HostTensor, n: &str| -> Result<Linear<B>> {
            Ok(Linear::from_torch(
                w.to_float(&format!("{n}.weight"), device)?,
                Some(b.to_float(&format!("{n}.bias"), device)?),
            ))
        };
        let s = AlignerSettings { num_queries, query_selection, final_gelu };
        Ok(Self::from_parts(lin(w1, b1, "fc1")?, lin(w2, b2, "fc2")?, &s))
    }

    /// The tensors and metadata of `aligner.safetensors`.
    pub fn to_tensors(&self) -> (BTreeMap<String, HostTensor>, BTreeMap<String, String>) {
        let lin = |l: &Linear<B>, n: &str, out: &mut BTreeMap<String, HostTensor>| {
            out.insert(format!("{n}.weight"), HostTensor::from_tensor(l.weight.val().transpose()));
            if let Some(b) = &l.bias {
                out.insert(format!("{n}.bias"), HostTensor::from_tensor(b.val()));
            }
        };
        let mut t = BTreeMap::new();
        lin(&self.fc1, "fc1", &mut t);
        lin(&self.fc2, "fc2", &mut t);
        let s = self.settings();
        let meta = BTreeMap::from([
            ("num_queries".to_string(), s.num_queries.to_string()),
            ("query_selection".to_string(), s.query_selection.as_str().to_string()),
            ("final_activation".to_string(), if s.final_gelu { "gelu" } else { "none" }.to_string()),
            ("format".to_string(), "pt".to_string()),
        ]);
        (t, meta)
    }

    /// Writes `aligner.safetensors` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let (t, meta) = self.to_tensors();
        write_tensors(path, &t, &meta)
    }

    /// Picks or pools `k` of the `Q` queries: `[B, Q, 768]` → `[B, k, 768]`.
    pub fn select(&self, queries: Tensor<B, 3>) -> Result<Tensor<B, 3>> {
        let [b, q, d] = queries.dims();
        if d != self.query_dim() {
            return Err(Error::invalid(format!("queries have width {d}; the aligner takes {}", self.query_dim())));
        }
        let k = self.num_queries;
        if k == 0 {
            return Ok(Tensor::zeros([b, 0, d], &queries.device()));
        }
        if !self.pool && k > q {
            return Err(Error::invalid(format!("the aligner takes the first {k} queries but only {q} were given")));
        }
        if self.pool && k > q {
            return Err(Error::invalid(format!("the aligner pools {q} queries into {k}: it can only pool into fewer")));
        }
        Ok(if self.pool {
            adaptive_avg_pool1d(queries.swap_dims(1, 2), k).swap_dims(1, 2)
        } else {
            queries.narrow(1, 0, k)
        })
    }

    /// Queries `[B, Q, 768]` → visual tokens `[B, k, D]`.
    pub fn forward(&self, queries: Tensor<B, 3>) -> Result<Tensor<B, 3>> {
        let sel = self.select(queries)?;
        let [b, k, _] = sel.dims();
        if k == 0 {
            return Ok(Tensor::zeros([b, 0, self.out_dim()], &sel.device()));
        }
        let h = self.fc2.forward(gelu(self.fc1.forward(sel)));
        Ok(if self.final_gelu { gelu(h) } else { h })
    }

    /// The unconditional visual tokens: the aligner applied to all-zero queries, `[B, k, D]`.
    pub fn unconditional(&self, batch: usize, num_queries: usize, device: &B::Device) -> Result<Tensor<B, 3>> {
        self.forward(Tensor::zeros([batch, num_queries.max(self.num_queries), self.query_dim()], device))
    }
}

/// The cross-attention context `[text][visual]`: `[B, 77, D]` + `[B, k, D]` → `[B, 77 + k, D]`.
pub fn assemble<B: Backend>(text: Tensor<B, 3>, visual: Tensor<B, 3>) -> Tensor<B, 3> {
    if visual.dims()[1] == 0 {
        return text;
    }
    Tensor::cat(vec![text, visual], 1)
}
