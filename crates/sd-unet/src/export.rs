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

/// A parameter as the visit finds it, left on the device: linear weights are transposed to
/// the file's `[out, in]` only when read, so holding every parameter copies nothing.
enum Stored<B: Backend> {
    Flat(Tensor<B, 1>),
    /// A linear weight in Burn's `[in, out]`.
    Linear(Tensor<B, 2>),
}

impl<B: Backend> Stored<B> {
    fn host(&self) -> HostTensor {
        match self {
            Stored::Flat(t) => HostTensor::from_tensor(t.clone()),
            Stored::Linear(t) => HostTensor::from_tensor(t.clone().transpose()),
        }
    }
}

/// Each parameter of `m` under its diffusers key, with its shape in the file.
fn visit_stored<B: Backend, M: Module<B>>(m: &M, f: &mut dyn FnMut(String, Vec<usize>, Stored<B>)) {
    struct V<'a, B: Backend> {
        names: Vec<String>,
        types: Vec<String>,
        f: &'a mut dyn FnMut(String, Vec<usize>, Stored<B>),
    }
    impl<B: Backend> ModuleVisitor<B> for V<'_, B> {
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
            let t = p.val();
            let mut shape = t.dims().to_vec();
            // model_io's Linear keeps its weight as [in, out]; the file has [out, in].
            let linear = D == 2
                && self.names.last().is_some_and(|n| n == "weight")
                && self.types.last().is_some_and(|t| t == "Struct:Linear");
            let stored = if linear {
                let t2: Tensor<B, 2> = t.reshape([shape[0], shape[1]]);
                shape.reverse();
                Stored::Linear(t2)
            } else {
                Stored::Flat(t.reshape([shape.iter().product::<usize>()]))
            };
            (self.f)(key, shape, stored);
        }
    }
    m.visit(&mut V { names: Vec::new(), types: Vec::new(), f });
}

/// Calls `f(key, shape, tensor)` for each parameter of `m` (a UNet, or any module of this
/// crate) under diffusers' keys, in PyTorch layout (linear weights `[out, in]`); `tensor()`
/// copies it to the host on demand. LoRA adapters are not included.
pub fn visit_diffusers<B: Backend, M: Module<B>>(m: &M, f: &mut KeyVisit<'_>) {
    visit_stored::<B, M>(m, &mut |key, shape, stored| {
        let shape_now = shape.clone();
        let host = move || {
            let mut h = stored.host();
            h.shape = shape_now.clone();
            h
        };
        f(key, shape, &host);
    });
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
        // One visit holds every parameter (a tensor clone shares its buffer): the file is in
        // key order, the visit in module order.
        let mut params: BTreeMap<String, Stored<B>> = BTreeMap::new();
        let mut shapes = BTreeMap::new();
        visit_stored::<B, _>(self, &mut |key, shape, t| {
            shapes.insert(key.clone(), shape);
            params.insert(key, t);
        });
        model_io::tensor_file::write_f32_streamed(path, &shapes, &mut |want| {
            let t = params
                .remove(want)
                .ok_or_else(|| model_io::Error::invalid(format!("`{want}` vanished during the export")))?;
            t.host().as_f32(want).map(<[f32]>::to_vec)
        })
    }
}
