//! Moving between `Tensor<B, D>` and burn-flex's `FlexTensor` when `B` is burn-flex.

use std::any::Any;
use std::sync::OnceLock;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Shape, Tensor, TensorData, TensorPrimitive};
#[cfg(feature = "flex")]
pub(crate) use burn_flex::FlexTensor;
#[cfg(not(feature = "flex"))]
pub(crate) use no_flex::FlexTensor;

/// Without the `flex` feature no tensor is ever a `FlexTensor`: [`to_flex`] always hands the
/// tensor back, so every kernel runs Burn's ops, and the code past it is unreachable. These
/// stand-ins only let that code compile.
#[cfg(not(feature = "flex"))]
mod no_flex {
    use burn::tensor::TensorData;

    pub(crate) enum FlexTensor {}
    pub(crate) enum Layout {}

    impl FlexTensor {
        pub(crate) fn to_contiguous(self) -> Self {
            match self {}
        }
        pub(crate) fn layout(&self) -> &Layout {
            match *self {}
        }
        pub(crate) fn storage<T>(&self) -> &[T] {
            match *self {}
        }
        pub(crate) fn as_slice<T>(&self) -> Option<&[T]> {
            match *self {}
        }
        pub(crate) fn from_data(_: TensorData) -> Self {
            unreachable!("no kernel runs without the flex feature")
        }
    }

    impl Layout {
        pub(crate) fn strides(&self) -> &[isize] {
            match *self {}
        }
        pub(crate) fn shape(&self) -> &[usize] {
            match *self {}
        }
        pub(crate) fn start_offset(&self) -> usize {
            match *self {}
        }
    }
}

/// `a` as a `T` when `A` is `T`, else `a` back.
fn cast<A: 'static, T: 'static>(a: A) -> Result<T, A> {
    let mut slot = Some(a);
    match (&mut slot as &mut dyn Any).downcast_mut::<Option<T>>() {
        Some(t) => Ok(t.take().expect("filled just above")),
        None => Err(slot.expect("left untouched")),
    }
}

/// A kernel's first operand as a contiguous f32 `FlexTensor`, or the tensor back when the
/// kernel is switched off, the backend is not burn-flex, or this operand or one of the
/// `others` (the dtypes of the kernel's further operands) is not f32. The further operands
/// then convert with [`operand`].
pub(crate) fn to_flex<B: Backend, const D: usize>(
    t: Tensor<B, D>,
    kernel: Kernel,
    others: &[DType],
) -> Result<FlexTensor, Tensor<B, D>> {
    to_flex_view(t, kernel, others).map(|f| f.to_contiguous())
}

/// [`to_flex`] without making the tensor contiguous (a strided view stays a view; read it
/// with [`rows_3d`] or [`strided_2d`]).
pub(crate) fn to_flex_view<B: Backend, const D: usize>(
    t: Tensor<B, D>,
    kernel: Kernel,
    others: &[DType],
) -> Result<FlexTensor, Tensor<B, D>> {
    if !kernel.enabled() || t.dtype() != DType::F32 || others.iter().any(|&d| d != DType::F32) {
        return Err(t);
    }
    match cast::<_, FlexTensor>(t.into_primitive().tensor()) {
        Ok(f) => Ok(f),
        Err(p) => Err(Tensor::from_primitive(TensorPrimitive::Float(p))),
    }
}

/// A 3-D f32 tensor whose last dimension is contiguous (a column slice such as one of a fused
/// projection's parts): its storage from the first element, the batch stride and the row
/// stride. `None` for any other layout, which [`FlexTensor::to_contiguous`] then resolves.
pub(crate) fn rows_3d(f: &FlexTensor) -> Option<(&[f32], usize, usize)> {
    let l = f.layout();
    let (&[sb, sl, sc], &[b, rows, cols]) = (l.strides(), &l.shape()[..]) else { return None };
    if sb < 0 || sl < 0 || (sc != 1 && cols > 1) {
        return None;
    }
    let storage = &f.storage::<f32>()[l.start_offset()..];
    let span =
        if b == 0 || rows == 0 || cols == 0 { 0 } else { (b - 1) * sb as usize + (rows - 1) * sl as usize + cols };
    (storage.len() >= span).then_some((storage, sb as usize, sl as usize))
}

/// A further operand of a kernel whose first operand [`to_flex`] converted: same backend and
/// an f32 dtype it checked, so this cannot fail.
pub(crate) fn operand<B: Backend, const D: usize>(t: Tensor<B, D>) -> FlexTensor {
    operand_view(t).to_contiguous()
}

/// A further operand as an f32 `FlexTensor` in whatever layout it has (a transposed view
/// stays a view); read it with [`strided_2d`].
pub(crate) fn operand_view<B: Backend, const D: usize>(t: Tensor<B, D>) -> FlexTensor {
    match cast::<_, FlexTensor>(t.into_primitive().tensor()) {
        Ok(f) => f,
        Err(_) => unreachable!("a kernel's operands share one backend"),
    }
}

/// A 2-D f32 tensor's storage from its first element, with its row and column strides; `None`
/// for negative strides (flipped views), which [`FlexTensor::to_contiguous`] then resolves.
pub(crate) fn strided_2d(f: &FlexTensor) -> Option<(&[f32], usize, usize)> {
    let l = f.layout();
    let (&[rs, cs], &[rows, cols]) = (l.strides(), &l.shape()[..]) else { return None };
    if rs < 0 || cs < 0 {
        return None;
    }
    let storage = &f.storage::<f32>()[l.start_offset()..];
    let span = if rows == 0 || cols == 0 { 0 } else { (rows - 1) * rs as usize + (cols - 1) * cs as usize + 1 };
    (storage.len() >= span).then_some((storage, rs as usize, cs as usize))
}

/// The kernels, for switching them off one by one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    Conv,
    Attention,
    /// [`crate::linear`].
    Linear,
    /// [`crate::transpose`], [`crate::geglu`], [`crate::gelu`] and [`crate::quick_gelu`].
    Layout,
    /// [`crate::group_norm`] and [`crate::layer_norm`].
    Norm,
}

impl Kernel {
    /// False when `PERSONALIZE_CPU_KERNELS` leaves this kernel out: `off` (none), or a comma
    /// list of those to keep (`conv`, `attention`, `linear`, `layout`, `norm`). For measuring
    /// each kernel's effect, and for checking a result against Burn's own ops.
    pub(crate) fn enabled(self) -> bool {
        static ON: OnceLock<[bool; 5]> = OnceLock::new();
        let on = ON.get_or_init(|| match std::env::var("PERSONALIZE_CPU_KERNELS") {
            Err(_) => [true; 5],
            Ok(v) => {
                let has = |k: &str| v.split(',').any(|p| p.trim() == k || p.trim() == "all");
                [has("conv"), has("attention"), has("linear"), has("layout"), has("norm")]
            }
        });
        on[self as usize]
    }
}

/// The f32 data of a contiguous tensor made by [`to_flex`].
pub(crate) fn data(f: &FlexTensor) -> &[f32] {
    f.as_slice::<f32>().expect("to_flex made it contiguous f32")
}

/// A new tensor of backend `B` (which is burn-flex: only called after [`to_flex`] succeeded).
pub(crate) fn from_vec<B: Backend, const D: usize>(v: Vec<f32>, shape: [usize; D]) -> Tensor<B, D> {
    let f = FlexTensor::from_data(TensorData::new(v, Shape::new(shape)));
    match cast::<FlexTensor, B::FloatTensorPrimitive>(f) {
        Ok(p) => Tensor::from_primitive(TensorPrimitive::Float(p)),
        Err(_) => unreachable!("from_vec is only called for the burn-flex backend"),
    }
}

/// A pointer that rayon tasks may share; each task writes a disjoint part.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub *mut f32);
// SAFETY: every user writes through it to regions no other task touches.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}
