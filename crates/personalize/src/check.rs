//! Non-finite values caught where they are cheap to catch (the contexts, each scheduler step,
//! the decode), and the message that names the stage and, when the weights themselves hold
//! NaN or Inf, the first such weight.

use std::path::Path;

use crate::Error;
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{backend::Backend, ElementConversion, Tensor};

/// True when every element is finite: one elementwise pass and one scalar read (`0 · x` sums
/// to 0 exactly unless some `x` is NaN or infinite).
pub fn all_finite<B: Backend, const D: usize>(t: &Tensor<B, D>) -> bool {
    if t.shape().num_elements() == 0 {
        return true;
    }
    let s: f64 = t.clone().mul_scalar(0.0).sum().into_scalar().elem();
    s == 0.0
}

/// The module path of the first parameter of `m` holding NaN or Inf, if any.
pub fn first_nonfinite_param<B: Backend, M: Module<B>>(m: &M) -> Option<String> {
    struct V {
        path: Vec<String>,
        found: Option<String>,
    }
    impl<B: Backend> ModuleVisitor<B> for V {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if self.found.is_none() && !all_finite(&p.val()) {
                self.found = Some(self.path.join("."));
            }
        }
    }
    let mut v = V { path: Vec::new(), found: None };
    m.visit(&mut v);
    v.found
}

/// "tensor `key` in FILE" for the first tensor holding NaN or Inf in the weight files of `dir`
/// (`diffusion_pytorch_model`, `model` or `aligner` safetensors), read in full: a diagnosis.
pub fn nonfinite_in_files(dir: &Path) -> Option<String> {
    let c = model_io::Checkpoint::open_dir(dir, &["diffusion_pytorch_model", "model", "aligner"]).ok()?;
    let key = c.first_nonfinite()?;
    let file = c.file_of(&key).map(|p| p.display().to_string()).unwrap_or_else(|| dir.display().to_string());
    Some(format!("tensor `{key}` in {file}"))
}

/// "`what` holds NaN or infinite values: `key` in the weights of `dir` holds NaN or Inf" when a
/// weight file there does (read in full: this is the failure path), else the first module
/// parameter that does, else "... although the {model}'s weights are finite", with the likely
/// causes: half precision (when `t` is f16 or bf16) or the config and scales.
pub fn nonfinite_error<B: Backend, M: Module<B>>(what: &str, model: &str, m: &M, dir: &Path) -> Error {
    if let Some(t) = nonfinite_in_files(dir) {
        return Error::NonFinite(format!(
            "{what} holds NaN or infinite values: the {model}'s {t} holds NaN or Inf; the file is damaged"
        ));
    }
    if let Some(p) = first_nonfinite_param::<B, M>(m) {
        return Error::NonFinite(format!(
            "{what} holds NaN or infinite values: the {model}'s parameter `{p}` holds NaN or Inf (its files in {} are finite: an adapter or a merged change)",
            dir.display()
        ));
    }
    let half = matches!(
        burn::tensor::Tensor::<B, 1>::empty([1], &Default::default()).dtype(),
        burn::tensor::DType::F16 | burn::tensor::DType::BF16
    );
    let hint = if half {
        "an overflow in half precision; try --dtype f32"
    } else {
        "an overflow: check the scales in its config.json (norm_eps, scaling_factor), a LoRA's alpha, and --guidance"
    };
    Error::NonFinite(format!("{what} holds NaN or infinite values, although the {model}'s weights are finite ({hint})"))
}
