//! The training noise schedule (betas, alphas_cumprod), the training helpers (`add_noise`,
//! velocity, training target), and the numpy/torch numerics the schedulers reproduce.
//!
//! diffusers computes these with a mix of float32 torch ops and float64 numpy ops; every helper
//! here says which one it mirrors. The differences matter only at the last bit, but they are what
//! lets the crate match diffusers to ~1e-7 instead of ~1e-5.

use crate::config::{BetaConfig, BetaSchedule, PredictionType, SchedulerConfig};
use crate::error::{Result, SchedulerError};
use crate::sample::Sample;

/// The training schedule shared by all schedulers: `betas` and `alphas_cumprod` in float32,
/// exactly as diffusers builds them.
///
/// ```
/// use scheduler::{SchedulerConfig, TrainSchedule};
/// let cfg = SchedulerConfig::from_json_str(
///     r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}"#).unwrap();
/// let s = TrainSchedule::from_config(&cfg, true).unwrap();
/// assert_eq!(s.num_train_timesteps(), 1000);
/// assert!((s.alphas_cumprod()[999] - 0.0047).abs() < 1e-4);
/// ```
#[derive(Debug, Clone)]
pub struct TrainSchedule {
    betas: Vec<f32>,
    alphas_cumprod: Vec<f32>,
    /// `beta_schedule` of the config (what the sigma-space classes also read).
    beta_schedule: BetaSchedule,
    /// Whether the betas were rescaled to zero terminal SNR.
    zero_snr: bool,
}

impl TrainSchedule {
    /// Builds the schedule from `num_train_timesteps`, `beta_start`, `beta_end`, `beta_schedule`,
    /// `trained_betas` and, where the class has it (`rescale_supported`), `rescale_betas_zero_snr`.
    pub fn from_config(cfg: &SchedulerConfig, rescale_supported: bool) -> Result<Self> {
        Self::build(cfg, rescale_supported, false)
    }

    /// As [`TrainSchedule::from_config`]; `sigmoid_supported` adds DDPM's `sigmoid` schedule.
    pub(crate) fn build(cfg: &SchedulerConfig, rescale_supported: bool, sigmoid_supported: bool) -> Result<Self> {
        let c: BetaConfig = cfg.read()?;
        let n = c.num_train_timesteps;
        if n == 0 {
            return Err(cfg.invalid("num_train_timesteps", "must be at least 1, got 0"));
        }
        let (beta_start, beta_end) = (c.beta_start, c.beta_end);
        let mut betas = if let Some(trained) = &c.trained_betas {
            if trained.len() != n {
                return Err(cfg.invalid(
                    "trained_betas",
                    format!("has {} values, but num_train_timesteps is {n}", trained.len()),
                ));
            }
            trained.iter().map(|&b| b as f32).collect()
        } else {
            match c.beta_schedule {
                BetaSchedule::Linear => torch_linspace_f32(beta_start as f32, beta_end as f32, n),
                // torch.linspace(start ** 0.5, end ** 0.5) ** 2: the square roots in Python
                // float64, the ramp and the square in float32.
                BetaSchedule::ScaledLinear => {
                    torch_linspace_f32(beta_start.powf(0.5) as f32, beta_end.powf(0.5) as f32, n)
                        .into_iter()
                        .map(|b| b * b)
                        .collect()
                }
                BetaSchedule::SquaredcosCapV2 => betas_for_alpha_bar(n),
                BetaSchedule::Sigmoid if sigmoid_supported => {
                    let scale = (beta_end - beta_start) as f32;
                    torch_linspace_f32(-6.0, 6.0, n)
                        .into_iter()
                        .map(|x| 1.0 / (1.0 + (-x).exp()) * scale + beta_start as f32)
                        .collect()
                }
                BetaSchedule::Sigmoid => {
                    return Err(cfg.unsupported(
                        "beta_schedule",
                        "sigmoid",
                        "linear, scaled_linear, squaredcos_cap_v2 (sigmoid: DDPMScheduler only)",
                    ));
                }
            }
        };
        // A beta outside [0, 1) makes alphas_cumprod negative or NaN: every step would then be
        // silent garbage (a black image).
        if let Some((i, b)) = betas.iter().enumerate().find(|(_, b)| !(b.is_finite() && (0.0..1.0).contains(*b))) {
            let field = if c.trained_betas.is_some() { "trained_betas" } else { "beta_start/beta_end" };
            return Err(cfg.invalid(field, format!("gives beta {b} at timestep {i}; betas must be in [0, 1)")));
        }
        let zero_snr = rescale_supported && c.rescale_betas_zero_snr;
        if zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let alphas_cumprod = cumprod_f32(&alphas);
        Ok(TrainSchedule { betas, alphas_cumprod, beta_schedule: c.beta_schedule, zero_snr })
    }

    /// `num_train_timesteps`.
    pub fn num_train_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// The betas, float32.
    pub fn betas(&self) -> &[f32] {
        &self.betas
    }

    /// `beta_schedule` of the config.
    pub(crate) fn beta_schedule(&self) -> BetaSchedule {
        self.beta_schedule
    }

    /// The `alphas_cumprod` the sigma-space classes (Euler, DPM-Solver) derive sigmas from:
    /// after zero-terminal-SNR rescaling diffusers sets the last one to 2^-24 so the last
    /// sigma is finite.
    pub(crate) fn sigma_alphas(&self) -> Vec<f32> {
        let mut ac = self.alphas_cumprod.clone();
        if self.zero_snr {
            if let Some(last) = ac.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        ac
    }

    /// The cumulative products of `1 - beta`, float32.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// `sqrt(ac[t])` and `sqrt(1 - ac[t])` per batch item, checking shapes and timesteps.
    fn coefficients<S: Sample>(&self, a: &S, b: &S, timesteps: &[usize]) -> Result<(Vec<f32>, Vec<f32>)> {
        let (sa, sb) = (a.shape(), b.shape());
        if sa != sb {
            return Err(SchedulerError::Shape(format!("sample {sa:?} and noise {sb:?} differ")));
        }
        let batch = sa.first().copied().unwrap_or(1);
        // One timestep broadcasts over the batch, as diffusers' unsqueeze-and-broadcast does.
        let ts: Vec<usize> = match timesteps.len() {
            1 => vec![timesteps[0]; batch],
            n if n == batch => timesteps.to_vec(),
            n => {
                return Err(SchedulerError::Shape(format!(
                    "{n} timesteps for a batch of {batch} (shape {sa:?}); give one per batch item or one for all"
                )))
            }
        };
        let mut sqrt_a = Vec::with_capacity(ts.len());
        let mut sqrt_b = Vec::with_capacity(ts.len());
        for &t in &ts {
            let ac = *self.alphas_cumprod.get(t).ok_or_else(|| SchedulerError::BadTimestep {
                timestep: t as f64,
                message: format!("training timesteps are 0..{}", self.alphas_cumprod.len()),
            })?;
            sqrt_a.push(ac.sqrt());
            sqrt_b.push((1.0 - ac).sqrt());
        }
        Ok((sqrt_a, sqrt_b))
    }

    /// The forward process `sqrt(ac[t]) * original + sqrt(1 - ac[t]) * noise`, one timestep per
    /// batch item (leading dimension) or one for all: diffusers' `DDPMScheduler.add_noise`.
    ///
    /// ```
    /// use scheduler::{HostSample, SchedulerConfig, TrainSchedule};
    /// let s = TrainSchedule::from_config(&SchedulerConfig::from_json_str("{}").unwrap(), false).unwrap();
    /// let x = HostSample::new(vec![1.0; 4], vec![2, 2]).unwrap();
    /// let n = HostSample::new(vec![0.5; 4], vec![2, 2]).unwrap();
    /// let noisy = s.add_noise(&x, &n, &[10, 900]).unwrap();
    /// assert_eq!(noisy.shape, vec![2, 2]);
    /// ```
    pub fn add_noise<S: Sample>(&self, original: &S, noise: &S, timesteps: &[usize]) -> Result<S> {
        let (a, b) = self.coefficients(original, noise, timesteps)?;
        Ok(S::lin_batched(&a, original, &b, noise))
    }

    /// The velocity `sqrt(ac[t]) * noise - sqrt(1 - ac[t]) * sample`: diffusers' `get_velocity`.
    pub fn velocity<S: Sample>(&self, sample: &S, noise: &S, timesteps: &[usize]) -> Result<S> {
        let (a, b) = self.coefficients(sample, noise, timesteps)?;
        let neg_b: Vec<f32> = b.iter().map(|v| -v).collect();
        Ok(S::lin_batched(&a, noise, &neg_b, sample))
    }

    /// What the model is trained to predict for `original` noised with `noise` at `timesteps`:
    /// the noise (`epsilon`), the velocity (`v_prediction`), or the original (`sample`), as in
    /// diffusers' training scripts.
    ///
    /// ```
    /// use scheduler::{HostSample, PredictionType, SchedulerConfig, TrainSchedule};
    /// let s = TrainSchedule::from_config(&SchedulerConfig::from_json_str("{}").unwrap(), false).unwrap();
    /// let x = HostSample::new(vec![1.0; 2], vec![1, 2]).unwrap();
    /// let n = HostSample::new(vec![0.5; 2], vec![1, 2]).unwrap();
    /// let eps = s.training_target(PredictionType::Epsilon, &x, &n, &[3]).unwrap();
    /// assert_eq!(eps.data, n.data);
    /// ```
    pub fn training_target<S: Sample>(
        &self,
        prediction: PredictionType,
        original: &S,
        noise: &S,
        timesteps: &[usize],
    ) -> Result<S> {
        // Validate in every branch, so a bad timestep is caught for epsilon too.
        self.coefficients(original, noise, timesteps)?;
        match prediction {
            PredictionType::Epsilon => Ok(noise.clone()),
            PredictionType::VPrediction => self.velocity(original, noise, timesteps),
            PredictionType::Sample => Ok(original.clone()),
        }
    }
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU, bit for bit: the step
/// is computed in float32, the first half counts up from `start` and the second half down from
/// `end`, each value as one fused multiply-add (as the compiled kernel does).
pub(crate) fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    match steps {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (steps - 1) as f32;
            let halfway = steps / 2;
            (0..steps)
                .map(|i| {
                    if i < halfway {
                        step.mul_add(i as f32, start)
                    } else {
                        (-step).mul_add((steps - i - 1) as f32, end)
                    }
                })
                .collect()
        }
    }
}

/// `torch.cumprod` of a float32 tensor on the CPU: the running product is kept in float64 and
/// each output rounded to float32.
pub(crate) fn cumprod_f32(x: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    x.iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` (cosine): float64 Python math, then float32.
fn betas_for_alpha_bar(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        let c = ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos();
        c * c
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr`, in float32 as torch computes it.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt: Vec<f32> = cumprod_f32(&alphas).iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt[0], sqrt[sqrt.len() - 1]);
    let scale = first / (first - last);
    for v in sqrt.iter_mut() {
        *v -= last;
    }
    for v in sqrt.iter_mut() {
        *v *= scale;
    }
    let bar: Vec<f32> = sqrt.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

/// `((1 - ac) / ac) ** 0.5` in float32 (the Karras-style sigmas of the training timesteps).
pub(crate) fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
}

/// `np.linspace(start, stop, num)` in float64, as numpy computes it (`i * step + start`, the
/// last value set to `stop`).
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    let div = num - 1;
    let delta = stop - start;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64).collect();
    if div > 0 {
        let step = delta / div as f64;
        if step == 0.0 {
            y.iter_mut().for_each(|v| *v = *v / div as f64 * delta);
        } else {
            y.iter_mut().for_each(|v| *v *= step);
        }
    } else {
        y.iter_mut().for_each(|v| *v *= delta);
    }
    y.iter_mut().for_each(|v| *v += start);
    if div > 0 {
        y[num - 1] = stop;
    }
    y
}

/// `np.arange(start, stop, step)` in float64, as numpy computes it: the length is
/// `ceil((stop - start) / step)` and values are `start + i * ((start + step) - start)`.
/// (That length can be one more than the intended count: `arange(1000, 0, -1000 / 61)` has 62
/// values, and diffusers' `trailing` spacing inherits it.)
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    // NaN (a zero step) or a non-positive length: empty, as numpy.
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.interp(x, arange(len(fp)), fp)` in float64.
pub(crate) fn np_interp(x: f64, fp: &[f32]) -> f64 {
    let n = fp.len();
    if n == 0 {
        return f64::NAN;
    }
    let last = (n - 1) as f64;
    if x.is_nan() {
        return x;
    }
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last {
        return fp[n - 1] as f64;
    }
    let j = x.floor() as usize;
    if x == j as f64 {
        return fp[j] as f64;
    }
    let (y0, y1) = (fp[j] as f64, fp[j + 1] as f64);
    let slope = (y1 - y0) / 1.0;
    let r = slope * (x - j as f64) + y0;
    if r.is_nan() {
        let r2 = slope * (x - (j + 1) as f64) + y1;
        if r2.is_nan() && y0 == y1 {
            return y0;
        }
        return r2;
    }
    r
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose log-sigma (float32 table,
/// float64 arithmetic) matches `sigma` by linear interpolation.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // np.cumsum(dists >= 0).argmax(): the first index where the running count of
    // `log_sigmas[i] <= log_sigma` reaches its maximum.
    let (mut count, mut best, mut low_idx) = (0usize, 0usize, 0usize);
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls as f64 >= 0.0 {
            count += 1;
        }
        if count > best {
            best = count;
            low_idx = i;
        }
    }
    let low_idx = low_idx.min(log_sigmas.len().saturating_sub(2));
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx] as f64;
    let high = log_sigmas[high_idx] as f64;
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// Karras et al. (2022) sigmas, rho = 7, from `sigma_max` down to `sigma_min` (float64).
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n).into_iter().map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho)).collect()
}

/// Exponentially spaced sigmas from `sigma_max` down to `sigma_min` (float64).
pub(crate) fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), n).into_iter().map(f64::exp).collect()
}

/// Integer inference timesteps, descending, as DDIM and DDPM compute them (PNDM uses the same
/// values in ascending order).
pub(crate) fn integer_timesteps(
    spacing: crate::config::TimestepSpacing,
    num_train: usize,
    n: usize,
    steps_offset: i64,
) -> Vec<i64> {
    use crate::config::TimestepSpacing::*;
    match spacing {
        Linspace => {
            np_linspace(0.0, (num_train - 1) as f64, n).into_iter().rev().map(|v| v.round_ties_even() as i64).collect()
        }
        Leading => {
            let ratio = num_train / n;
            (0..n).rev().map(|i| (i * ratio) as i64 + steps_offset).collect()
        }
        Trailing => {
            let ratio = num_train as f64 / n as f64;
            np_arange(num_train as f64, 0.0, -ratio).into_iter().map(|v| v.round_ties_even() as i64 - 1).collect()
        }
    }
}

/// Checks `1 <= n <= num_train`, the common precondition of `set_timesteps`.
pub(crate) fn check_steps(n: usize, num_train: usize) -> Result<()> {
    if n == 0 {
        return Err(SchedulerError::ZeroSteps);
    }
    if n > num_train {
        return Err(SchedulerError::TooManySteps { steps: n, train: num_train });
    }
    Ok(())
}

/// A float timestep that must be an integer training timestep (DDIM, DDPM, PNDM index
/// `alphas_cumprod` with it).
pub(crate) fn integer_timestep(t: f32, num_train: usize) -> Result<i64> {
    if t.fract() != 0.0 || t < 0.0 || t as f64 >= num_train as f64 {
        return Err(SchedulerError::BadTimestep {
            timestep: t as f64,
            message: format!("expected an integer training timestep in 0..{num_train}"),
        });
    }
    Ok(t as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arange_length_quirk() {
        // numpy: len(np.arange(1000, 0, -1000/61)) == 62
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 61.0).len(), 62);
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 7.0).len(), 7);
    }

    #[test]
    fn linspace_one_value_is_start() {
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        assert_eq!(torch_linspace_f32(0.5, 2.0, 1), vec![0.5]);
    }

    #[test]
    fn interp_matches_endpoints() {
        let fp = [1.0f32, 2.0, 4.0];
        assert_eq!(np_interp(0.0, &fp), 1.0);
        assert_eq!(np_interp(1.5, &fp), 3.0);
        assert_eq!(np_interp(9.0, &fp), 4.0);
    }
}
