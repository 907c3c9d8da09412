//! The kernels inside `Autodiff<Flex>`, so that training on the CPU runs them too.
//!
//! Burn's way to add an op to a backend is a backend extension: an op whose forward is the
//! backend's own code and whose backward is registered with burn-autodiff's [`Backward`]
//! trait. Here the extension is reached the way the rest of this crate is, by checking the
//! backend's type at run time instead of bounding callers by a trait of ours, so model code
//! stays generic over `Backend`. It covers the two ops that hold most of a training step's
//! time (convolutions and linear layers), forward and backward:
//!
//! * [`conv2d`]: forward by [`crate::conv2d`]. The input's gradient of a stride-1 convolution
//!   is itself a stride-1 convolution of the output's gradient with the flipped, transposed
//!   kernel, so it runs the same kernel; strided ones and the weight's gradient (only full
//!   fine-tuning needs it) use Burn's own backward.
//! * [`linear`]: forward by [`crate::linear`]; both gradients are GEMMs through the same
//!   kernel (`grad · Wᵀ`, `xᵀ · grad`).
//!
//! Only `Autodiff<Flex>` with its default (no checkpointing) strategy takes this path; any
//! other autodiff backend runs Burn's ops, as before. `PERSONALIZE_CPU_KERNELS` without
//! `train` switches it off, for measuring.

use std::any::TypeId;

use burn::tensor::backend::Backend;
use burn::tensor::ops::{ConvOptions, FloatTensor, ModuleOps};
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_autodiff::{Autodiff, NodeId};
use burn_flex::Flex;

use crate::flex::{cast, data, from_vec, Kernel};

/// The training backend whose tensors this module handles.
type Ad = Autodiff<Flex>;
/// Its tensor: burn-flex's, with a node of the graph.
type AdTensor = FloatTensor<Ad>;

/// The tensors' primitives as `Autodiff<Flex>` tensors, when `B` is that backend, the path is
/// switched on and every operand is f32; the tensors back otherwise.
fn ad_primitive<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<AdTensor, Tensor<B, D>> {
    match cast::<_, AdTensor>(t.into_primitive().tensor()) {
        Ok(p) => Ok(p),
        Err(p) => Err(Tensor::from_primitive(TensorPrimitive::Float(p))),
    }
}

fn applies<B: Backend>(kernel: Kernel, dtypes: &[DType]) -> bool {
    TypeId::of::<B>() == TypeId::of::<Ad>()
        && kernel.enabled()
        && Kernel::Train.enabled()
        && dtypes.iter().all(|&d| d == DType::F32)
}

fn back<B: Backend, const D: usize>(t: AdTensor) -> Tensor<B, D> {
    match cast::<AdTensor, B::FloatTensorPrimitive>(t) {
        Ok(p) => Tensor::from_primitive(TensorPrimitive::Float(p)),
        Err(_) => unreachable!("only called after the backend was checked to be Autodiff<Flex>"),
    }
}

fn flex<const D: usize>(p: FloatTensor<Flex>) -> Tensor<Flex, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

fn prim<const D: usize>(t: Tensor<Flex, D>) -> FloatTensor<Flex> {
    t.into_primitive().tensor()
}

/// A `[cout, cin, k, k]` kernel as `[cin, cout, k, k]`, flipped in both spatial axes: the
/// kernel of the input gradient. Written in one pass; as Burn's `permute` + `flip` view, the
/// kernel's strided copy of it took a fifth of a training step.
fn flipped_transposed(w: FloatTensor<Flex>) -> Tensor<Flex, 4> {
    let w = w.to_contiguous();
    let src = data(&w);
    let &[cout, cin, k, _] = &w.layout().shape()[..] else { unreachable!("a 4-D kernel") };
    let kk = k * k;
    let mut out = vec![0f32; src.len()];
    for o in 0..cout {
        for i in 0..cin {
            let from = &src[(o * cin + i) * kk..][..kk];
            let to = &mut out[(i * cout + o) * kk..][..kk];
            for (t, f) in to.iter_mut().zip(from.iter().rev()) {
                *t = *f;
            }
        }
    }
    from_vec::<Flex, 4>(out, [cin, cout, k, k])
}

/// A convolution's operands, handed back when this path does not apply.
pub(crate) type ConvOperands<B> = (Tensor<B, 4>, Tensor<B, 4>, Option<Tensor<B, 1>>);

/// [`crate::conv2d`] on `Autodiff<Flex>`, with its backward; the operands back on any other
/// backend.
pub(crate) fn conv2d<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
    stride: usize,
    padding: usize,
) -> Result<Tensor<B, 4>, ConvOperands<B>> {
    let dtypes: Vec<DType> = [x.dtype(), weight.dtype()].into_iter().chain(bias.as_ref().map(|b| b.dtype())).collect();
    if !applies::<B>(Kernel::Conv, &dtypes) {
        return Err((x, weight, bias));
    }
    let k = weight.dims()[2];
    // The input's gradient runs the kernel itself where it can; Burn's otherwise, which
    // reads the input.
    let own_x_backward = stride == 1 && padding < k;
    let (Ok(xa), Ok(wa)) = (ad_primitive(x), ad_primitive(weight)) else {
        unreachable!("the backend was checked to be Autodiff<Flex>")
    };

    #[derive(Debug)]
    struct Conv {
        stride: usize,
        padding: usize,
    }

    impl Backward<Flex, 2> for Conv {
        /// The input (kept when the weight needs a gradient, or for Burn's input gradient)
        /// and the weight.
        type State = (Option<NodeId>, NodeId);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
            let [node_x, node_w] = ops.parents;
            let grad = grads.consume::<Flex>(&ops.node);
            let (x_state, w_state) = ops.state;
            let w = checkpointer.retrieve_node_output::<FloatTensor<Flex>>(w_state);
            let x = x_state.map(|s| checkpointer.retrieve_node_output::<FloatTensor<Flex>>(s));
            let options = ConvOptions::new([self.stride; 2], [self.padding; 2], [1, 1], 1);
            if let Some(node) = node_w {
                let x = x.clone().expect("the input is kept when the weight is tracked");
                let g = <Flex as ModuleOps<Flex>>::conv2d_weight_backward(x, w.clone(), grad.clone(), options.clone());
                grads.register::<Flex>(node.id, g);
            }
            if let Some(node) = node_x {
                let k = flex::<4>(w.clone()).dims()[2];
                let g = if self.stride == 1 && self.padding < k {
                    // The adjoint of a stride-1 convolution: the same convolution of the
                    // output's gradient with the kernel flipped and its channels swapped.
                    let wt = flipped_transposed(w);
                    prim(crate::conv2d(flex::<4>(grad), wt, None, 1, k - 1 - self.padding))
                } else {
                    let x = x.expect("the input is kept for a strided convolution");
                    <Flex as ModuleOps<Flex>>::conv2d_x_backward(x, w, grad, options)
                };
                grads.register::<Flex>(node.id, g);
            }
        }
    }

    let w_tracked = wa.is_tracked();
    let op = Conv { stride, padding };
    let out = match op.prepare::<NoCheckpointing>([xa.node.clone(), wa.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(mut prep) => {
            let x_state = (w_tracked || !own_x_backward).then(|| prep.checkpoint(&xa));
            let w_state = prep.checkpoint(&wa);
            let y =
                crate::conv2d(flex::<4>(xa.primitive.clone()), flex::<4>(wa.primitive.clone()), None, stride, padding);
            prep.finish((x_state, w_state), prim(y))
        }
        OpsKind::UnTracked(prep) => {
            let y = crate::conv2d(flex::<4>(xa.primitive), flex::<4>(wa.primitive), None, stride, padding);
            prep.finish(prim(y))
        }
    };
    let y = back::<B, 4>(out);
    // The bias as Burn's broadcast add: cheap, and its gradient is Burn's sum.
    Ok(match bias {
        Some(b) => {
            let c = b.dims()[0];
            y + b.reshape([1, c, 1, 1])
        }
        None => y,
    })
}

/// Layers with fewer inputs or outputs than this run Burn's ops when training.
const THIN: usize = 32;

/// [`crate::linear`] on `Autodiff<Flex>`, with its backward; the operands back on any other
/// backend.
pub(crate) fn linear<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 2>, Option<Tensor<B, 1>>)> {
    let dtypes: Vec<DType> = [x.dtype(), weight.dtype()].into_iter().chain(bias.as_ref().map(|b| b.dtype())).collect();
    let [d_in, d_out] = weight.dims();
    // A LoRA's rank-r factors are thin GEMMs for which Burn's own is as good: a 16-wide
    // microkernel would run a quarter full.
    if d_in.min(d_out) < THIN || !applies::<B>(Kernel::Linear, &dtypes) {
        return Err((x, weight, bias));
    }
    let (Ok(xa), Ok(wa)) = (ad_primitive(x), ad_primitive(weight)) else {
        unreachable!("the backend was checked to be Autodiff<Flex>")
    };

    #[derive(Debug)]
    struct MatMul;

    impl Backward<Flex, 2> for MatMul {
        /// The input (kept when the weight needs a gradient) and the weight (kept when the
        /// input does).
        type State = (Option<NodeId>, Option<NodeId>);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
            let [node_x, node_w] = ops.parents;
            let grad = flex::<2>(grads.consume::<Flex>(&ops.node));
            let (x_state, w_state) = ops.state;
            let x = x_state.map(|s| flex::<2>(checkpointer.retrieve_node_output::<FloatTensor<Flex>>(s)));
            let w = w_state.map(|s| flex::<2>(checkpointer.retrieve_node_output::<FloatTensor<Flex>>(s)));
            if let (Some(node), Some(x)) = (node_w, x) {
                // dW = xᵀ · grad
                grads.register::<Flex>(node.id, prim(crate::linear(x.transpose(), grad.clone(), None)));
            }
            if let (Some(node), Some(w)) = (node_x, w) {
                // dx = grad · Wᵀ
                grads.register::<Flex>(node.id, prim(crate::linear(grad, w.transpose(), None)));
            }
        }
    }

    let (x_tracked, w_tracked) = (xa.is_tracked(), wa.is_tracked());
    let out = match MatMul.prepare::<NoCheckpointing>([xa.node.clone(), wa.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(mut prep) => {
            let x_state = w_tracked.then(|| prep.checkpoint(&xa));
            let w_state = x_tracked.then(|| prep.checkpoint(&wa));
            let y = crate::linear(flex::<2>(xa.primitive.clone()), flex::<2>(wa.primitive.clone()), None);
            prep.finish((x_state, w_state), prim(y))
        }
        OpsKind::UnTracked(prep) => {
            let y = crate::linear(flex::<2>(xa.primitive), flex::<2>(wa.primitive), None);
            prep.finish(prim(y))
        }
    };
    let y = back::<B, 2>(out);
    Ok(match bias {
        Some(b) => y + b.unsqueeze::<2>(),
        None => y,
    })
}

#[cfg(test)]
mod tests {
    use burn::tensor::{module, Distribution, Tensor};
    use burn_flex::FlexDevice;

    use super::*;

    fn max_diff<const D: usize>(a: Tensor<Flex, D>, b: Tensor<Flex, D>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    fn grad_of<const D: usize>(
        t: &Tensor<Ad, D>,
        g: &<Ad as burn::tensor::backend::AutodiffBackend>::Gradients,
    ) -> Tensor<Flex, D> {
        t.grad(g).expect("tracked")
    }

    /// Outputs and gradients (input, weight, bias) of the kernels' backward against Burn's
    /// own autodiff ops, for the convolutions of the UNet and VAE (3×3 padded, 1×1, strided
    /// downsamplers), with the weight trained and frozen.
    #[test]
    fn conv2d_forward_and_backward_match_burns() {
        let dev = FlexDevice;
        for (cin, cout, k, stride, pad, train_w) in [
            (3, 5, 3, 1, 1, true),
            (3, 5, 3, 1, 1, false),
            (4, 6, 1, 1, 0, true),
            (4, 4, 3, 2, 1, false),
            (4, 4, 3, 2, 0, true),
        ] {
            let x0 = Tensor::<Flex, 4>::random([2, cin, 9, 7], Distribution::Default, &dev);
            let w0 = Tensor::<Flex, 4>::random([cout, cin, k, k], Distribution::Default, &dev);
            let b0 = Tensor::<Flex, 1>::random([cout], Distribution::Default, &dev);
            let up = Tensor::<Flex, 4>::random(
                [2, cout, (9 + 2 * pad - k) / stride + 1, (7 + 2 * pad - k) / stride + 1],
                Distribution::Default,
                &dev,
            );
            let run = |ours: bool| {
                let x = Tensor::<Ad, 4>::from_inner(x0.clone()).require_grad();
                let w = Tensor::<Ad, 4>::from_inner(w0.clone());
                let w = if train_w { w.require_grad() } else { w };
                let b = Tensor::<Ad, 1>::from_inner(b0.clone()).require_grad();
                let y = if ours {
                    crate::conv2d(x.clone(), w.clone(), Some(b.clone()), stride, pad)
                } else {
                    module::conv2d(
                        x.clone(),
                        w.clone(),
                        Some(b.clone()),
                        ConvOptions::new([stride; 2], [pad; 2], [1, 1], 1),
                    )
                };
                let loss = (y.clone() * Tensor::from_inner(up.clone())).sum();
                let g = loss.backward();
                (y.inner(), grad_of(&x, &g), train_w.then(|| grad_of(&w, &g)), grad_of(&b, &g))
            };
            let (y, gx, gw, gb) = run(true);
            let (ry, rgx, rgw, rgb) = run(false);
            let case = format!("{cin}→{cout} k{k} s{stride} p{pad}");
            assert!(max_diff(y, ry) < 1e-4, "{case}: output");
            assert!(max_diff(gx, rgx) < 1e-4, "{case}: input gradient");
            assert!(max_diff(gb, rgb) < 1e-4, "{case}: bias gradient");
            if let (Some(gw), Some(rgw)) = (gw, rgw) {
                assert!(max_diff(gw, rgw) < 1e-4, "{case}: weight gradient");
            }
        }
    }

    /// As for the convolutions; the last case is a LoRA factor, which takes Burn's ops.
    #[test]
    fn linear_forward_and_backward_match_burns() {
        let dev = FlexDevice;
        for (rows, d_in, d_out, train_x, train_w) in
            [(7, 40, 48, true, true), (40, 33, 64, true, false), (3, 64, 96, false, true), (40, 33, 4, true, true)]
        {
            let x0 = Tensor::<Flex, 2>::random([rows, d_in], Distribution::Default, &dev);
            let w0 = Tensor::<Flex, 2>::random([d_in, d_out], Distribution::Default, &dev);
            let b0 = Tensor::<Flex, 1>::random([d_out], Distribution::Default, &dev);
            let up = Tensor::<Flex, 2>::random([rows, d_out], Distribution::Default, &dev);
            let run = |ours: bool| {
                let track = |t: Tensor<Ad, 2>, on: bool| if on { t.require_grad() } else { t };
                let x = track(Tensor::from_inner(x0.clone()), train_x);
                let w = track(Tensor::from_inner(w0.clone()), train_w);
                let b = Tensor::<Ad, 1>::from_inner(b0.clone()).require_grad();
                let y = if ours {
                    crate::linear(x.clone(), w.clone(), Some(b.clone()))
                } else {
                    x.clone().matmul(w.clone()) + b.clone().unsqueeze::<2>()
                };
                let g = (y.clone() * Tensor::from_inner(up.clone())).sum().backward();
                (y.inner(), train_x.then(|| grad_of(&x, &g)), train_w.then(|| grad_of(&w, &g)), grad_of(&b, &g))
            };
            let (y, gx, gw, gb) = run(true);
            let (ry, rgx, rgw, rgb) = run(false);
            let case = format!("{rows}×{d_in}→{d_out}");
            assert!(max_diff(y, ry) < 1e-4, "{case}: output");
            assert!(max_diff(gb, rgb) < 1e-4, "{case}: bias gradient");
            for (what, a, b) in [("input", gx, rgx), ("weight", gw, rgw)] {
                if let (Some(a), Some(b)) = (a, b) {
                    assert!(max_diff(a, b) < 1e-4, "{case}: {what} gradient");
                }
            }
        }
    }
}
