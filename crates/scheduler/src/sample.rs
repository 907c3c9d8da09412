//! The few elementwise operations a scheduler step needs, so the same scheduler code runs on
//! host vectors ([`HostSample`]) and, with the `burn` feature, on Burn tensors on any device
//! (no copy to the host per step: every coefficient is a host scalar).

use crate::error::{Result, SchedulerError};

/// A latent a scheduler can step: elementwise linear combinations, scaling and clamping.
///
/// Each product is rounded to float32 before the sum, as torch evaluates `a * x + b * y`, so a
/// host implementation matches diffusers to the last bit where the coefficients do.
///
/// ```
/// use scheduler::{HostSample, Sample};
/// let x = HostSample::new(vec![1.0, 2.0], vec![2]).unwrap();
/// let y = HostSample::new(vec![10.0, 20.0], vec![2]).unwrap();
/// assert_eq!(HostSample::lin(2.0, &x, 0.5, &y).data, vec![7.0, 14.0]);
/// ```
pub trait Sample: Clone + Send {
    /// The dimensions, for shape checks.
    fn shape(&self) -> Vec<usize>;

    /// `a * x + b * y`, elementwise. `x` and `y` have the same shape (checked by the callers).
    fn lin(a: f32, x: &Self, b: f32, y: &Self) -> Self;

    /// `a * self`.
    fn scale(&self, a: f32) -> Self;

    /// `self / d`. (Not `scale(1 / d)`: diffusers divides, and in its ill-conditioned steps,
    /// such as Euler at sigma = 4096 under zero-terminal-SNR, the last bit shows.)
    fn div(&self, d: f32) -> Self;

    /// Each element clamped to `[lo, hi]`.
    fn clamp(&self, lo: f32, hi: f32) -> Self;

    /// `a[i] * x[i] + b[i] * y[i]` where `i` indexes the leading (batch) dimension; `a` and `b`
    /// have one value per batch item (checked by the callers). Used by `add_noise` with one
    /// timestep per batch item.
    fn lin_batched(a: &[f32], x: &Self, b: &[f32], y: &Self) -> Self;
}

/// A float32 tensor on the host: row-major `data` with its `shape`.
///
/// ```
/// use scheduler::HostSample;
/// let s = HostSample::new(vec![0.0; 6], vec![1, 2, 3]).unwrap();
/// assert_eq!(s.len(), 6);
/// assert!(HostSample::new(vec![0.0; 5], vec![2, 3]).is_err());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct HostSample {
    /// The values, row-major.
    pub data: Vec<f32>,
    /// The dimensions.
    pub shape: Vec<usize>,
}

impl HostSample {
    /// Wraps `data`, checking that it holds `shape.iter().product()` values.
    pub fn new(data: Vec<f32>, shape: Vec<usize>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(SchedulerError::Shape(format!("{} values do not fill shape {shape:?}", data.len())));
        }
        Ok(HostSample { data, shape })
    }

    /// Zeros of the given shape.
    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        HostSample { data: vec![0.0; n], shape }
    }

    /// The number of values.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Splits the leading dimension: `[N, ...]` into N samples of shape `[...]`.
    pub fn unstack(&self) -> Result<Vec<HostSample>> {
        let Some((&n, rest)) = self.shape.split_first() else {
            return Err(SchedulerError::Shape("cannot unstack a scalar".into()));
        };
        let item: usize = rest.iter().product();
        Ok((0..n)
            .map(|i| HostSample { data: self.data[i * item..(i + 1) * item].to_vec(), shape: rest.to_vec() })
            .collect())
    }

    /// Stacks samples of one shape into `[N, ...]`.
    pub fn stack(items: &[HostSample]) -> Result<HostSample> {
        let Some(first) = items.first() else {
            return Err(SchedulerError::Shape("cannot stack zero samples".into()));
        };
        let mut data = Vec::with_capacity(first.len() * items.len());
        for it in items {
            if it.shape != first.shape {
                return Err(SchedulerError::Shape(format!("cannot stack {:?} with {:?}", it.shape, first.shape)));
            }
            data.extend_from_slice(&it.data);
        }
        let mut shape = vec![items.len()];
        shape.extend_from_slice(&first.shape);
        Ok(HostSample { data, shape })
    }
}

impl Sample for HostSample {
    fn shape(&self) -> Vec<usize> {
        self.shape.clone()
    }

    fn lin(a: f32, x: &Self, b: f32, y: &Self) -> Self {
        assert_eq!(x.shape, y.shape, "Sample::lin on different shapes");
        let data = x.data.iter().zip(&y.data).map(|(&u, &v)| a * u + b * v).collect();
        HostSample { data, shape: x.shape.clone() }
    }

    fn scale(&self, a: f32) -> Self {
        HostSample { data: self.data.iter().map(|&v| a * v).collect(), shape: self.shape.clone() }
    }

    fn div(&self, d: f32) -> Self {
        HostSample { data: self.data.iter().map(|&v| v / d).collect(), shape: self.shape.clone() }
    }

    fn clamp(&self, lo: f32, hi: f32) -> Self {
        // torch.clamp propagates NaN; f32::clamp does too.
        HostSample { data: self.data.iter().map(|&v| v.clamp(lo, hi)).collect(), shape: self.shape.clone() }
    }

    fn lin_batched(a: &[f32], x: &Self, b: &[f32], y: &Self) -> Self {
        assert_eq!(x.shape, y.shape, "Sample::lin_batched on different shapes");
        let batch = x.shape.first().copied().unwrap_or(1);
        assert!(a.len() == batch && b.len() == batch, "Sample::lin_batched needs one coefficient per batch item");
        let item = x.data.len().checked_div(batch).unwrap_or(0);
        let mut data = Vec::with_capacity(x.data.len());
        for i in 0..batch {
            let r = i * item..(i + 1) * item;
            data.extend(x.data[r.clone()].iter().zip(&y.data[r]).map(|(&u, &v)| a[i] * u + b[i] * v));
        }
        HostSample { data, shape: x.shape.clone() }
    }
}

#[cfg(feature = "burn")]
mod burn_impl {
    use burn::tensor::{backend::Backend, Shape, Tensor, TensorData};

    use super::Sample;

    /// Burn tensors step on their own device; coefficients are scalars (`mul_scalar`), so no
    /// data moves between host and device except the per-batch coefficients of
    /// [`Sample::lin_batched`] (a handful of floats).
    impl<B: Backend, const D: usize> Sample for Tensor<B, D> {
        fn shape(&self) -> Vec<usize> {
            self.dims().to_vec()
        }

        fn lin(a: f32, x: &Self, b: f32, y: &Self) -> Self {
            x.clone().mul_scalar(a).add(y.clone().mul_scalar(b))
        }

        fn scale(&self, a: f32) -> Self {
            self.clone().mul_scalar(a)
        }

        fn div(&self, d: f32) -> Self {
            self.clone().div_scalar(d)
        }

        fn clamp(&self, lo: f32, hi: f32) -> Self {
            self.clone().clamp(lo, hi)
        }

        fn lin_batched(a: &[f32], x: &Self, b: &[f32], y: &Self) -> Self {
            let device = x.device();
            let mut dims = [1usize; D];
            dims[0] = a.len();
            let coef = |c: &[f32]| {
                Tensor::<B, 1>::from_data(TensorData::new(c.to_vec(), [c.len()]), &device).reshape(Shape::from(dims))
            };
            x.clone().mul(coef(a)).add(y.clone().mul(coef(b)))
        }
    }
}
