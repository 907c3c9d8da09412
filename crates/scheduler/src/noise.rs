//! Noise for the stochastic schedulers (DDPM, Euler ancestral), always passed in explicitly.
//!
//! A scheduler asks its [`NoiseSource`] for a standard-normal tensor shaped like the sample each
//! time diffusers would call `randn_tensor`, in the same order. So:
//! * [`SeededRng`] gives reproducible host noise from a `u64` seed;
//! * [`NoiseQueue`] replays given tensors (for example noise recorded from diffusers: the parity
//!   tests use it);
//! * [`NoNoise`] is for deterministic schedulers and fails if noise is asked for;
//! * with the `burn` feature, [`BurnNoise`] draws on the tensor's own device.
//!
//! Bit parity with torch's generator is a non-goal.

use std::collections::VecDeque;

use crate::error::{Result, SchedulerError};
use crate::sample::{HostSample, Sample};

/// Something that produces standard-normal noise shaped like a sample.
///
/// ```
/// use scheduler::{HostSample, NoiseSource, SeededRng};
/// let like = HostSample::zeros(vec![1, 4, 2, 2]);
/// let n = SeededRng::new(42).standard_normal_like(&like).unwrap();
/// assert_eq!(n.shape, like.shape);
/// ```
pub trait NoiseSource<S> {
    /// Independent N(0, 1) values with the shape (and device) of `like`.
    fn standard_normal_like(&mut self, like: &S) -> Result<S>;
}

/// For deterministic schedulers: asking it for noise is an error.
///
/// ```
/// use scheduler::{HostSample, NoNoise, NoiseSource};
/// assert!(NoNoise.standard_normal_like(&HostSample::zeros(vec![1])).is_err());
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct NoNoise;

impl<S> NoiseSource<S> for NoNoise {
    fn standard_normal_like(&mut self, _like: &S) -> Result<S> {
        Err(SchedulerError::Noise("this scheduler is stochastic and needs a noise source (got NoNoise)".into()))
    }
}

/// A small, fully specified, seedable generator for host noise, so results are reproducible
/// across platforms and crate versions (no dependency whose stream could change):
///
/// * state: xoshiro256** (Blackman and Vigna), its four words filled by SplitMix64 from the seed;
/// * uniforms: `(next_u64() >> 11) * 2^-53`, in `[0, 1)`;
/// * normals: Box–Muller in float64 from two uniforms `u1, u2`:
///   `r = sqrt(-2 ln(1 - u1))`, yielding `r cos(2 pi u2)` then `r sin(2 pi u2)`, each rounded to
///   float32.
///
/// ```
/// use scheduler::SeededRng;
/// let (mut a, mut b) = (SeededRng::new(7), SeededRng::new(7));
/// assert_eq!(a.standard_normal(), b.standard_normal());
/// ```
#[derive(Debug, Clone)]
pub struct SeededRng {
    s: [u64; 4],
    spare: Option<f32>,
}

impl SeededRng {
    /// A generator seeded from `seed`.
    pub fn new(seed: u64) -> Self {
        let mut sm = seeded::SplitMix64::new(seed);
        SeededRng { s: [sm.next_u64(), sm.next_u64(), sm.next_u64(), sm.next_u64()], spare: None }
    }

    /// The next 64 random bits (xoshiro256**).
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// A uniform float64 in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// One standard-normal float32.
    pub fn standard_normal(&mut self) -> f32 {
        if let Some(v) = self.spare.take() {
            return v;
        }
        let u1 = self.next_f64();
        let u2 = self.next_f64();
        let r = (-2.0 * (1.0 - u1).ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some((r * theta.sin()) as f32);
        (r * theta.cos()) as f32
    }

    /// Fills `out` with standard normals.
    pub fn fill_standard_normal(&mut self, out: &mut [f32]) {
        for v in out {
            *v = self.standard_normal();
        }
    }
}

/// The trainer seeds fresh aligner and LoRA weights with the same generator as its steps.
impl seeded::Init for SeededRng {
    fn uniform(&mut self, n: usize, bound: f64) -> Vec<f32> {
        (0..n).map(|_| ((self.next_f64() * 2.0 - 1.0) * bound) as f32).collect()
    }
}

impl NoiseSource<HostSample> for SeededRng {
    fn standard_normal_like(&mut self, like: &HostSample) -> Result<HostSample> {
        let mut data = vec![0.0; like.len()];
        self.fill_standard_normal(&mut data);
        Ok(HostSample { data, shape: like.shape.clone() })
    }
}

/// Replays the given noise tensors in order; an error when empty or on a shape mismatch.
///
/// ```
/// use scheduler::{HostSample, NoiseQueue, NoiseSource};
/// let n = HostSample::new(vec![0.5, -0.5], vec![2]).unwrap();
/// let mut q = NoiseQueue::new(vec![n.clone()]);
/// assert_eq!(q.standard_normal_like(&n).unwrap(), n);
/// assert!(q.standard_normal_like(&n).is_err());
/// ```
#[derive(Debug, Clone)]
pub struct NoiseQueue<S> {
    items: VecDeque<S>,
    used: usize,
}

impl<S> NoiseQueue<S> {
    /// A queue of noise tensors, returned first to last.
    pub fn new(items: Vec<S>) -> Self {
        NoiseQueue { items: items.into(), used: 0 }
    }

    /// How many tensors have been handed out.
    pub fn used(&self) -> usize {
        self.used
    }

    /// How many are left.
    pub fn remaining(&self) -> usize {
        self.items.len()
    }
}

impl<S: Sample> NoiseSource<S> for NoiseQueue<S> {
    fn standard_normal_like(&mut self, like: &S) -> Result<S> {
        let Some(next) = self.items.pop_front() else {
            return Err(SchedulerError::Noise(format!("noise queue exhausted after {} tensors", self.used)));
        };
        if next.shape() != like.shape() {
            return Err(SchedulerError::Noise(format!(
                "queued noise {:?} does not match sample {:?}",
                next.shape(),
                like.shape()
            )));
        }
        self.used += 1;
        Ok(next)
    }
}

#[cfg(feature = "burn")]
pub use burn_noise::BurnNoise;

#[cfg(feature = "burn")]
mod burn_noise {
    use burn::tensor::{backend::Backend, Distribution, Tensor};

    use super::NoiseSource;
    use crate::error::Result;

    /// Draws noise on the tensor's device with the backend's generator
    /// (`Tensor::random_like(Normal(0, 1))`), so GPU sampling never copies noise from the host.
    /// [`BurnNoise::seeded`] seeds the backend (`B::seed`, global to the device).
    ///
    /// ```
    /// use burn_flex::{Flex, FlexDevice};
    /// use burn::tensor::Tensor;
    /// use scheduler::{BurnNoise, NoiseSource};
    /// let like = Tensor::<Flex, 4>::zeros([1, 4, 2, 2], &FlexDevice);
    /// let mut noise = BurnNoise::seeded::<Flex>(&FlexDevice, 3);
    /// let n = noise.standard_normal_like(&like).unwrap();
    /// assert_eq!(n.dims(), [1, 4, 2, 2]);
    /// ```
    #[derive(Debug, Clone, Copy, Default)]
    pub struct BurnNoise;

    impl BurnNoise {
        /// Seeds backend `B` on `device`, then returns the source.
        pub fn seeded<B: Backend>(device: &B::Device, seed: u64) -> Self {
            B::seed(device, seed);
            BurnNoise
        }
    }

    impl<B: Backend, const D: usize> NoiseSource<Tensor<B, D>> for BurnNoise {
        fn standard_normal_like(&mut self, like: &Tensor<B, D>) -> Result<Tensor<B, D>> {
            Ok(like.random_like(Distribution::Normal(0.0, 1.0)))
        }
    }
}
