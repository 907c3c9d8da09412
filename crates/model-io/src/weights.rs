//! Reading a checkpoint by module path, with shape checks and a strict "all keys used" check.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;

use burn::tensor::{backend::Backend, Tensor};

use crate::tensor_file::HostTensor;
use crate::{Checkpoint, Error, Result};

/// What a seeded random source made: the tensors by full key, in the on-disk layout.
type Recorded = Rc<RefCell<std::collections::BTreeMap<String, HostTensor>>>;

/// A view of a [`Checkpoint`] at a module path, in the style of candle's `VarBuilder`.
///
/// Model code mirrors the published key layout: `w.pp("attn1").pp("to_q").get("weight", ..)`
/// reads `...attn1.to_q.weight`. Every key read is recorded, so [`Weights::finish`] can report
/// tensors the model did not use (a sign of the wrong model type or config).
///
/// ```no_run
/// use burn_flex::{Flex, FlexDevice};
/// let ckpt = model_io::Checkpoint::open_dir("vae".as_ref(), &["diffusion_pytorch_model"])?;
/// let w = model_io::Weights::<Flex>::new(&ckpt, &FlexDevice);
/// let k = w.pp("encoder.conv_in").get::<4>("weight", [128, 3, 3, 3])?;
/// w.finish(&[])?;
/// # Ok::<(), model_io::Error>(())
/// ```
#[derive(Clone)]
pub struct Weights<'a, B: Backend> {
    /// `None`: random weights of the requested shapes (benchmarks of full-size configs).
    ckpt: Option<&'a Checkpoint>,
    prefix: String,
    device: B::Device,
    used: Rc<RefCell<BTreeSet<String>>>,
    /// Random weights only: `Some((seed, made))` draws each tensor from a generator seeded by
    /// `seed` and the key (so the values do not depend on load order) and keeps a copy.
    seeded: Option<(u64, Recorded)>,
    /// Copy each tensor out of the checkpoint's memory map (see [`Weights::copied`]).
    copy: bool,
    /// The model is never trained (see [`Weights::frozen`]).
    frozen: bool,
    /// The float type of the tensors read (`None`: the device's default, `--dtype`).
    float_dtype: Option<burn::tensor::FloatDType>,
    /// Random weights only: bytes made so far, checked against the memory available before
    /// each tensor, so an absurd config is an error instead of an abort.
    made_bytes: Rc<RefCell<u64>>,
}

impl<'a, B: Backend> Weights<'a, B> {
    /// A view at the root of `ckpt`, creating tensors on `device`.
    pub fn new(ckpt: &'a Checkpoint, device: &B::Device) -> Self {
        Self {
            ckpt: Some(ckpt),
            prefix: String::new(),
            device: device.clone(),
            used: Rc::default(),
            seeded: None,
            copy: false,
            frozen: false,
            float_dtype: None,
            made_bytes: Rc::default(),
        }
    }

    /// A source of random weights (normal, scaled by `1/sqrt(fan_in)`) of whatever shape the
    /// model asks for: builds a full-size model from its config alone, for benchmarks.
    /// Optional tensors (those probed with [`Weights::contains`]) are absent.
    pub fn random(device: &B::Device) -> Weights<'static, B> {
        Weights {
            ckpt: None,
            prefix: String::new(),
            device: device.clone(),
            used: Rc::default(),
            seeded: None,
            copy: false,
            frozen: false,
            float_dtype: None,
            made_bytes: Rc::default(),
        }
    }

    /// Deterministic random weights that are also recorded, so a model built from a config can
    /// be saved as a checkpoint (the bundled tiny models). Each tensor depends only on `seed`
    /// and its key: matrices are normal with std `1/sqrt(fan_in)`, vectors named `bias` are
    /// N(0, 0.02²), other vectors (norm scales) 1 + N(0, 0.02²).
    ///
    /// ```
    /// use burn_flex::{Flex, FlexDevice};
    /// let w = model_io::Weights::<Flex>::seeded(7, &FlexDevice);
    /// let a = w.pp("fc").get::<2>("weight", [3, 4])?;
    /// let made = w.recorded();
    /// assert_eq!(made["fc.weight"].shape, vec![3, 4]);
    /// # Ok::<(), model_io::Error>(())
    /// ```
    pub fn seeded(seed: u64, device: &B::Device) -> Weights<'static, B> {
        Weights { seeded: Some((seed, Rc::default())), ..Self::random(device) }
    }

    /// The tensors a [`Weights::seeded`] source has made so far, by key (empty otherwise).
    pub fn recorded(&self) -> std::collections::BTreeMap<String, HostTensor> {
        self.seeded.as_ref().map(|(_, r)| r.borrow().clone()).unwrap_or_default()
    }

    fn checkpoint_name(&self) -> String {
        self.ckpt.map_or_else(|| "random weights".to_string(), |c| c.name().to_string())
    }

    /// The same view, but every tensor read from here on is copied out of the checkpoint's
    /// memory map and its pages released at once. For a frozen model whose large weights are
    /// laid out anew at load (model-layers' `Linear::load` under [`Weights::frozen`], which reads those
    /// through the map, then releases them once packed): its small tensors (biases, norms)
    /// read through the mapping on every forward would otherwise fault back whole page-cache
    /// folios (up to 2 MiB on ext4 and XFS) of the released weights around them. A large
    /// table read a few rows at a time (token embeddings) is better read [`Weights::mapped`].
    ///
    /// ```no_run
    /// # fn f(ckpt: &model_io::Checkpoint) -> model_io::Result<()> {
    /// let w = model_io::Weights::<burn_flex::Flex>::new(ckpt, &burn_flex::FlexDevice).copied();
    /// let bias = w.pp("fc").get::<1>("bias", [6144])?; // copied out, the map's pages untouched
    /// # Ok(()) }
    /// ```
    pub fn copied(&self) -> Self {
        Self { copy: true, ..self.clone() }
    }

    /// The same view reading through the memory map again (undoes [`Weights::copied`]): for a
    /// tensor that is laid out anew at once and then released, or a large table of which each
    /// forward touches a few rows.
    pub fn mapped(&self) -> Self {
        Self { copy: false, ..self.clone() }
    }

    /// The view a model that is never trained (the frozen encoders) is built from, set once by
    /// the model at the top of its construction: the layers built from it lay their weights
    /// out for the backend that wants it (model-layers' `Linear` packs for the CPU GEMM) and
    /// release the mapped originals, and the small tensors are copied ([`Weights::copied`]).
    /// The model code itself only calls the layers' `load`.
    ///
    /// ```no_run
    /// # fn f(ckpt: &model_io::Checkpoint) -> model_io::Result<()> {
    /// let w = model_io::Weights::<burn_flex::Flex>::new(ckpt, &burn_flex::FlexDevice).frozen();
    /// assert!(w.pp("encoder").is_frozen());
    /// # Ok(()) }
    /// ```
    pub fn frozen(&self) -> Self {
        Self { copy: true, frozen: true, ..self.clone() }
    }

    /// Whether this view is [`Weights::frozen`].
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// The same view, reading every tensor of the checkpoint as `dtype` whatever the device's
    /// default float type: SDXL's VAE (`force_upcast`) runs in f32 inside a half-precision
    /// pipeline, as diffusers upcasts it. The model's inputs must then be cast to `dtype` too.
    ///
    /// ```no_run
    /// use burn::tensor::{DType, FloatDType};
    /// use burn_flex::{Flex, FlexDevice};
    /// let ckpt = model_io::Checkpoint::open_dir("vae".as_ref(), &["diffusion_pytorch_model"])?;
    /// let w = model_io::Weights::<Flex>::new(&ckpt, &FlexDevice).in_float_dtype(FloatDType::F32);
    /// assert_eq!(w.pp("decoder.conv_in").get_any::<1>("bias")?.dtype(), DType::F32);
    /// # Ok::<(), model_io::Error>(())
    /// ```
    pub fn in_float_dtype(&self, dtype: burn::tensor::FloatDType) -> Self {
        Self { float_dtype: Some(dtype), ..self.clone() }
    }

    /// The view one level down (`push prefix`).
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        Self { prefix, ..self.clone() }
    }

    /// The device tensors are created on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// The full key of `name` under this view.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Whether `name` exists under this view.
    pub fn contains(&self, name: &str) -> bool {
        self.ckpt.is_some_and(|c| c.info(&self.key(name)).is_some())
    }

    /// The on-disk shape of `name`, if present.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.ckpt.and_then(|c| c.info(&self.key(name)).map(|i| i.shape.clone()))
    }

    /// Reads `name` as an f32 tensor and checks it has exactly `shape`.
    pub fn get<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<B, D>> {
        let key = self.key(name);
        let Some(ckpt) = self.ckpt else {
            let bytes = 4 * shape.iter().map(|&d| d as u64).fold(1u64, u64::saturating_mul);
            let total = self.made_bytes.borrow().saturating_add(bytes);
            if let Some(avail) = crate::available_memory() {
                if total > avail {
                    return Err(Error::invalid(format!(
                        "random weights: `{key}` {shape:?} brings the model to {:.1} GiB, more than the {:.1} GiB of memory available (check the config's sizes)",
                        total as f64 / (1u64 << 30) as f64,
                        avail as f64 / (1u64 << 30) as f64
                    )));
                }
            }
            *self.made_bytes.borrow_mut() = total;
            if let Some((seed, made)) = &self.seeded {
                let host = seeded_tensor(*seed, &key, &shape);
                let t = host.to_float(&key, &self.device)?;
                made.borrow_mut().insert(key, host);
                return Ok(t);
            }
            // Random weights for timing full-size models only (`stage --random-weights`, the
            // benches): drawn on the device, as gigabytes of host-made values would take longer
            // than the work timed. Models that are trained or shipped are seeded (`seeded`).
            let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
            let std = 1.0 / (fan_in as f64).sqrt();
            return Ok(Tensor::random(shape, burn::tensor::Distribution::Normal(0.0, std), &self.device));
        };
        let info = ckpt.info(&key).ok_or_else(|| ckpt.missing(&key))?;
        if info.shape != shape {
            return Err(Error::Shape {
                checkpoint: ckpt.name().into(),
                name: key,
                expected: shape.to_vec(),
                found: info.shape.clone(),
            });
        }
        self.read(&key)
    }

    /// Reads `name` with whatever shape it has, checking only its rank.
    pub fn get_any<const D: usize>(&self, name: &str) -> Result<Tensor<B, D>> {
        let key = self.key(name);
        if let Some(info) = self.ckpt.and_then(|c| c.info(&key)) {
            if info.shape.len() != D {
                return Err(Error::Shape {
                    checkpoint: self.checkpoint_name(),
                    name: key,
                    expected: vec![0; D],
                    found: info.shape.clone(),
                });
            }
        }
        self.read(&key)
    }

    fn read<const D: usize>(&self, key: &str) -> Result<Tensor<B, D>> {
        let ckpt = self.ckpt.ok_or_else(|| Error::invalid(format!("`{key}`: random weights need a known shape")))?;
        let data = if self.copy {
            let (data, shape) = ckpt.read_f32(key)?;
            burn::tensor::TensorData::new(data, shape)
        } else {
            ckpt.tensor_data_f32(key)?
        };
        self.used.borrow_mut().insert(key.to_string());
        Ok(match self.float_dtype {
            Some(d) => Tensor::from_data(data, (&self.device, burn::tensor::DType::from(d))),
            None => Tensor::from_data(data, &self.device),
        })
    }

    /// Drops the pages of `name` (under this prefix) from resident memory once a copy of it is
    /// all that is used (see [`Checkpoint::release_tensor`]); nothing for random weights.
    pub fn release(&self, name: &str) {
        if let Some(ckpt) = self.ckpt {
            ckpt.release_tensor(&self.key(name));
        }
    }

    /// Fails if the checkpoint holds tensors that were never read, ignoring keys that start
    /// with one of `skip` (for example a BLIP-2 language model the encoder does not need).
    pub fn finish(&self, skip: &[&str]) -> Result<()> {
        let Some(ckpt) = self.ckpt else { return Ok(()) };
        let used = self.used.borrow();
        let mut unused: Vec<&str> =
            ckpt.names().filter(|k| !used.contains(*k) && !skip.iter().any(|p| k.starts_with(p))).collect();
        unused.sort_unstable();
        match unused.first() {
            None => Ok(()),
            Some(first) => {
                let origin = ckpt.origin(first).map(|o| format!(" from {o}")).unwrap_or_default();
                Err(Error::Unused {
                    checkpoint: ckpt.name().into(),
                    count: unused.len(),
                    first: first.to_string(),
                    origin,
                })
            }
        }
    }
}

/// One tensor of [`Weights::seeded`]: a splitmix64 stream seeded by `seed` and the key's FNV-1a
/// hash, turned into normals by Box-Muller. Plain integer arithmetic, so every machine makes the
/// same bytes.
fn seeded_tensor(seed: u64, key: &str, shape: &[usize]) -> HostTensor {
    let mut h = seeded::Fnv64::with_seed(seed);
    h.feed(key.as_bytes());
    let mut stream = seeded::SplitMix64::new(h.finish());
    let mut next = move || stream.next_open01();
    let n: usize = shape.iter().product();
    let (mean, std) = if shape.len() >= 2 {
        (0.0, 1.0 / (shape[1..].iter().product::<usize>().max(1) as f64).sqrt())
    } else if key.ends_with("bias") {
        (0.0, 0.02)
    } else {
        (1.0, 0.02)
    };
    let data = (0..n)
        .map(|_| {
            let (u, v) = (next(), next());
            (mean + std * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect();
    HostTensor::f32(shape.to_vec(), data)
}
