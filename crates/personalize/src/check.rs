//! Non-finite values caught where they are cheap to catch (the contexts, each scheduler step,
//! the decode), and the message that names the stage and, when the weights themselves hold
//! NaN or Inf, the first such weight.

use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{backend::Backend, ElementConversion, Tensor};
use model_io::Error;

/// True when every element is finite: one elementwise pass and one scalar read (`0 · x` sums
/// to 0 exactly unless some `x` is NaN or infinite).
pub(crate) fn all_finite<B: Backend, const D: usize>(t: &Tensor<B, D>) -> bool {
    if t.shape().num_elements() == 0 {
        return true;
    }
    let s: f64 = t.clone().mul_scalar(0.0).sum().into_scalar().elem();
    s == 0.0
}

/// The module path of the first parameter of `m` holding NaN or Inf, if any.
pub(crate) fn first_nonfinite_param<B: Backend, M: Module<B>>(m: &M) -> Option<String> {
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

/// "`what` holds NaN or infinite values: the {model}'s weight `x` (in `dir`) holds NaN or Inf"
/// when a weight does, else "... although the {model}'s weights are finite (an overflow: in f16,
/// use bf16 or f32)".
pub(crate) fn nonfinite_error<B: Backend, M: Module<B>>(what: &str, model: &str, m: &M, dir: &Path) -> Error {
    match first_nonfinite_param::<B, M>(m) {
        Some(p) => Error::invalid(format!(
            "{what} holds NaN or infinite values: the {model}'s weight `{p}` ({}) holds NaN or Inf; the model file is damaged",
            dir.display()
        )),
        None => Error::invalid(format!(
            "{what} holds NaN or infinite values, although the {model}'s weights are finite (an overflow; in f16, use --dtype bf16 or f32)"
        )),
    }
}
