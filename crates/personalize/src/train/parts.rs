//! The trainer's module plumbing: parameter paths, gradient norms, AdamW (with moments kept by
//! parameter path, so optimizer state survives a checkpoint exactly), loading trainable
//! parameters back.

use std::collections::BTreeMap;

use crate::{Error, Result};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use model_io::tensor_file::HostTensor;

/// Keeps the module path (`down_blocks.0.attentions.0...`) during a visit or a map, and the
/// container type of the innermost field (`Struct:Linear` for a linear layer's weight).
#[derive(Default)]
pub(crate) struct PathStack {
    names: Vec<String>,
    types: Vec<String>,
}

impl PathStack {
    fn enter(&mut self, name: &str, ty: &str) {
        self.names.push(name.to_string());
        self.types.push(ty.to_string());
    }
    fn exit(&mut self) {
        self.names.pop();
        self.types.pop();
    }
    fn path(&self) -> String {
        self.names.join(".")
    }
}

/// Every float parameter as a host tensor, by path; `trainable_only` keeps those that require
/// gradients. Linear weights stay in Burn's `[in, out]` layout (`sd_unet::export` gives the file layout).
pub(crate) fn host_params<B: Backend, M: Module<B>>(m: &M, trainable_only: bool) -> BTreeMap<String, HostTensor> {
    struct V {
        stack: PathStack,
        only: bool,
        out: BTreeMap<String, HostTensor>,
    }
    impl<B: Backend> ModuleVisitor<B> for V {
        fn enter_module(&mut self, name: &str, ty: &str) {
            self.stack.enter(name, ty);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.exit();
        }
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let t = p.val();
            if !self.only || t.is_require_grad() {
                self.out.insert(self.stack.path(), HostTensor::from_tensor(t));
            }
        }
    }
    let mut v = V { stack: PathStack::default(), only: trainable_only, out: BTreeMap::new() };
    m.visit(&mut v);
    v.out
}

/// Sets `require_grad` on every float parameter.
pub(crate) fn set_require_grad<B: Backend, M: Module<B>>(m: M, flag: bool) -> M {
    struct S(bool);
    impl<B: Backend> ModuleMapper<B> for S {
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, t, mapper) = p.consume();
            Param::from_mapped_value(id, t.set_require_grad(self.0), mapper)
        }
    }
    m.map(&mut S(flag))
}

/// Replaces the values of the parameters named in `values` (by path), keeping each one's
/// `require_grad`. Errors if a name is missing from the module or a shape differs.
pub(crate) fn load_params<B: Backend, M: Module<B>>(
    m: M,
    values: &BTreeMap<String, HostTensor>,
    what: &str,
) -> Result<M> {
    struct L<'a, B: Backend> {
        stack: PathStack,
        values: &'a BTreeMap<String, HostTensor>,
        used: usize,
        err: Option<String>,
        device: Option<B::Device>,
    }
    impl<B: Backend> ModuleMapper<B> for L<'_, B> {
        fn enter_module(&mut self, name: &str, ty: &str) {
            self.stack.enter(name, ty);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.exit();
        }
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let path = self.stack.path();
            let Some(h) = self.values.get(&path) else { return p };
            let (id, t, mapper) = p.consume();
            let dims = t.dims().to_vec();
            if h.shape != dims {
                self.err
                    .get_or_insert(format!("`{path}` has shape {:?} in the file, {:?} in the model", h.shape, dims));
                return Param::from_mapped_value(id, t, mapper);
            }
            let device = self.device.get_or_insert_with(|| t.device()).clone();
            let grad = t.is_require_grad();
            match h.to_float::<B, D>(&path, &device) {
                Ok(v) => {
                    self.used += 1;
                    Param::from_mapped_value(id, v.set_require_grad(grad), mapper)
                }
                Err(e) => {
                    self.err.get_or_insert(e.to_string());
                    Param::from_mapped_value(id, t, mapper)
                }
            }
        }
    }
    let mut l = L::<B> { stack: PathStack::default(), values, used: 0, err: None, device: None };
    let m = m.map(&mut l);
    if let Some(e) = l.err {
        return Err(Error::invalid(format!("{what}: {e}")));
    }
    if l.used != values.len() {
        let known = host_params::<B, M>(&m, false);
        let stray = values.keys().find(|k| !known.contains_key(*k)).cloned().unwrap_or_default();
        return Err(Error::invalid(format!("{what}: tensor `{stray}` matches no parameter of the model")));
    }
    Ok(m)
}

/// Sum of squared gradients of the trainable parameters (0 when none has a gradient), summed
/// on the device and read once (as `torch.nn.utils.clip_grad_norm_` sums the per-tensor norms
/// in f32 there).
pub(crate) fn grad_sq_norm<B: AutodiffBackend, M: Module<B>>(m: &M, grads: &B::Gradients) -> f64 {
    struct G<'a, B: AutodiffBackend> {
        grads: &'a B::Gradients,
        sum: Option<Tensor<B::InnerBackend, 1>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for G<'_, B> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let t = p.val();
            if !t.is_require_grad() {
                return;
            }
            if let Some(g) = t.grad(self.grads) {
                let s = g.powi_scalar(2).sum();
                self.sum = Some(match self.sum.take() {
                    Some(acc) => acc + s,
                    None => s,
                });
            }
        }
    }
    let mut g = G::<B> { grads, sum: None };
    m.visit(&mut g);
    match g.sum {
        Some(s) => s.into_data().convert::<f64>().as_slice::<f64>().map(|v| v[0]).unwrap_or(f64::NAN),
        None => 0.0,
    }
}

/// AdamW as `torch.optim.AdamW` (decoupled weight decay `p -= lr·wd·p`, bias-corrected moments,
/// `eps` added to `sqrt(v̂)`), with the moments of each parameter stored by path.
pub struct AdamW<B: Backend> {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps taken (the `t` of the bias correction).
    pub t: u64,
    /// `(m, v)` per parameter path, flattened.
    pub moments: BTreeMap<String, (Tensor<B, 1>, Tensor<B, 1>)>,
}

impl<B: Backend> AdamW<B> {
    /// diffusers' DreamBooth defaults: betas (0.9, 0.999), eps 1e-8, weight decay 1e-2.
    pub fn new(weight_decay: f64) -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay, t: 0, moments: BTreeMap::new() }
    }

    /// The moments as host tensors (`m.<path>`, `v.<path>`), for a checkpoint.
    pub fn to_host(&self, prefix: &str) -> BTreeMap<String, HostTensor> {
        let mut out = BTreeMap::new();
        for (k, (m, v)) in &self.moments {
            out.insert(format!("m.{prefix}{k}"), HostTensor::from_tensor(m.clone()));
            out.insert(format!("v.{prefix}{k}"), HostTensor::from_tensor(v.clone()));
        }
        out
    }

    /// Restores the moments written by [`Self::to_host`] with the same `prefix`.
    pub fn load_host(&mut self, t: &BTreeMap<String, HostTensor>, prefix: &str, device: &B::Device) -> Result<()> {
        let mp = format!("m.{prefix}");
        for (k, m) in t.iter().filter(|(k, _)| k.starts_with(&mp)) {
            let path = &k[mp.len()..];
            let v = t
                .get(&format!("v.{prefix}{path}"))
                .ok_or_else(|| Error::invalid(format!("optimizer state: `v.{prefix}{path}` missing")))?;
            self.moments.insert(path.to_string(), (m.to_float(k, device)?, v.to_float(k, device)?));
        }
        Ok(())
    }
}

/// One AdamW update of every trainable parameter of `m` that has a gradient, with the gradients
/// multiplied by `grad_scale` (clipping). Returns the updated module.
pub(crate) fn adamw_step<B: AutodiffBackend, M: Module<B>>(
    m: M,
    opt: &mut AdamW<B::InnerBackend>,
    grads: &B::Gradients,
    lr: f64,
    grad_scale: f64,
) -> M {
    struct S<'a, B: AutodiffBackend> {
        stack: PathStack,
        opt: &'a mut AdamW<B::InnerBackend>,
        grads: &'a B::Gradients,
        lr: f64,
        scale: f64,
    }
    impl<B: AutodiffBackend> ModuleMapper<B> for S<'_, B> {
        fn enter_module(&mut self, name: &str, ty: &str) {
            self.stack.enter(name, ty);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.exit();
        }
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, t, mapper) = p.consume();
            if !t.is_require_grad() {
                return Param::from_mapped_value(id, t, mapper);
            }
            let Some(g) = t.grad(self.grads) else { return Param::from_mapped_value(id, t, mapper) };
            let shape = t.shape();
            let n = shape.num_elements();
            let o = &mut *self.opt;
            let g: Tensor<B::InnerBackend, 1> = g.reshape([n]);
            let g = if self.scale != 1.0 { g * self.scale } else { g };
            let p: Tensor<B::InnerBackend, 1> = t.inner().reshape([n]);
            let path = self.stack.path();
            let (m0, v0) = match o.moments.remove(&path) {
                Some(mv) => mv,
                None => (p.zeros_like(), p.zeros_like()),
            };
            let m1 = m0 * o.beta1 + g.clone() * (1.0 - o.beta1);
            let v1 = v0 * o.beta2 + g.powi_scalar(2) * (1.0 - o.beta2);
            let bc1 = 1.0 - o.beta1.powi(o.t as i32);
            let bc2 = 1.0 - o.beta2.powi(o.t as i32);
            let step_size = self.lr / bc1;
            let denom = v1.clone().sqrt() / bc2.sqrt() + o.eps;
            let p = p * (1.0 - self.lr * o.weight_decay);
            let p = p - m1.clone() / denom * step_size;
            o.moments.insert(path, (m1, v1));
            let p = Tensor::<B, 1>::from_inner(p).reshape(shape).require_grad();
            Param::from_mapped_value(id, p, mapper)
        }
    }
    let mut s = S::<B> { stack: PathStack::default(), opt, grads, lr, scale: grad_scale };
    m.map(&mut s)
}
