//! The UNet back to diffusers' file layout (`unet/diffusion_pytorch_model.safetensors`), through
//! the key map of [`crate::keys`]: what full fine-tuning writes.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{backend::Backend, Tensor};
use model_io::tensor_file::HostTensor;
use model_io::Result;

use crate::UNet2DConditionModel;

/// A visitor's callback: a diffusers key, its shape, and a reader of its values.
pub type KeyVisit<'a> = dyn FnMut(String, Vec<usize>, &dyn Fn() -> HostTensor) + 'a;

/// Calls `f(key, shape, tensor)` for each parameter of `m` (a UNet, or any module of this
/// crate) under diffusers' keys, in PyTorch layout (linear weights `[out, in]`); `tensor()`
/// copies it to the host on demand. LoRA adapters are not included.
pub fn visit_diffusers<B: Backend, M: Module<B>>(m: &M, f: &mut KeyVisit<'_>) {
    struct V<'a> {
        names: Vec<String>,
        types: Vec<String>,
        f: &'a mut KeyVisit<'a>,
    }
    impl<B: Backend> ModuleVisitor<B> for V<'_> {
        fn enter_module(&mut self, name: &str, ty: &str) {
            self.names.push(name.to_string());
            self.types.push(ty.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.names.pop();
            self.types.pop();
        }
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let Some(key) = crate::keys::diffusers_key(&self.names, &self.types) else { return };
            let mut shape = p.val().dims().to_vec();
            // model_io's Linear keeps its weight as [in, out]; the file has [out, in].
            let linear = D == 2
                && self.names.last().is_some_and(|n| n == "weight")
                && self.types.last().is_some_and(|t| t == "Struct:Linear");
            if linear {
                shape.reverse();
            }
            let host = || {
                let t = p.val();
                if linear {
                    let d = t.dims();
                    let t2: Tensor<B, 2> = t.reshape([d[0], d[1]]);
                    HostTensor::from_tensor(t2.transpose())
                } else {
                    HostTensor::from_tensor(t)
                }
            };
            (self.f)(key, shape, &host);
        }
    }
    m.visit(&mut V { names: Vec::new(), types: Vec::new(), f });
}

/// The parameters under diffusers' keys ([`visit_diffusers`]), copied to the host.
pub fn diffusers_tensors<B: Backend, M: Module<B>>(m: &M) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    visit_diffusers::<B, M>(m, &mut |key, _, host| {
        out.insert(key, host());
    });
    out
}

impl<B: Backend> UNet2DConditionModel<B> {
    /// Writes the weights as diffusers' `diffusion_pytorch_model.safetensors` (f32, keys
    /// sorted, metadata `format: pt`) one tensor at a time, so only the model and one tensor's
    /// copy are in memory, atomically. Returns the file size in bytes.
    ///
    /// ```no_run
    /// use burn_flex::{Flex, FlexDevice};
    /// let unet = sd_unet::UNet2DConditionModel::<Flex>::load("sd/unet".as_ref(), &FlexDevice)?;
    /// unet.save_safetensors("copy/diffusion_pytorch_model.safetensors".as_ref())?;
    /// # Ok::<(), model_io::Error>(())
    /// ```
    pub fn save_safetensors(&self, path: &Path) -> Result<u64> {
        let mut shapes = BTreeMap::new();
        visit_diffusers::<B, _>(self, &mut |key, shape, _| {
            shapes.insert(key, shape);
        });
        // The visit is in module order, the file in key order: each tensor is fetched by key.
        let mut pending: Option<(String, Vec<f32>)> = None;
        model_io::tensor_file::write_f32_streamed(path, &shapes, &mut |want| {
            let mut err = None;
            visit_diffusers::<B, _>(self, &mut |key, _, host| {
                if key == want && pending.is_none() {
                    match host().as_f32(&key) {
                        Ok(v) => pending = Some((key, v.to_vec())),
                        Err(e) => err = Some(e),
                    }
                }
            });
            if let Some(e) = err {
                return Err(e);
            }
            pending
                .take()
                .map(|(_, v)| v)
                .ok_or_else(|| model_io::Error::invalid(format!("`{want}` vanished during the export")))
        })
    }
}
