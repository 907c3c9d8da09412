//! The Euler samplers of Karras et al. (2022), as diffusers' `EulerDiscreteScheduler` and
//! `EulerAncestralDiscreteScheduler`: one type, [`Euler`], with an ancestral flag. They work in sigma space: the sample is scaled by
//! `init_noise_sigma` at the start and the model input by `1 / sqrt(sigma^2 + 1)`.

use crate::config::{
    EulerAncestralConfig, EulerConfig, FinalSigmas, PredictionType, SchedulerConfig, SchedulerKind, SigmaSpacing,
    TimestepSpacing,
};
use crate::error::{Result, SchedulerError};
use crate::noise::NoiseSource;
use crate::sample::Sample;
use crate::schedule::{
    check_steps, exponential_sigmas, karras_sigmas, np_arange, np_interp, np_linspace, sigma_to_t, train_sigmas,
    TrainSchedule,
};
use crate::{check_same_shape, Scheduler};

/// Float32 inference timesteps as the Euler classes compute them (descending).
fn euler_timesteps(spacing: TimestepSpacing, train: usize, n: usize, steps_offset: i64) -> Vec<f32> {
    match spacing {
        // np.linspace(0, T - 1, N, dtype=np.float32)[::-1]: float64 values cast to float32.
        TimestepSpacing::Linspace => {
            np_linspace(0.0, (train - 1) as f64, n).into_iter().rev().map(|v| v as f32).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = train / n;
            (0..n).rev().map(|i| (i * ratio) as f32 + steps_offset as f32).collect()
        }
        TimestepSpacing::Trailing => np_arange(train as f64, 0.0, -(train as f64 / n as f64))
            .into_iter()
            .map(|v| v.round_ties_even() as f32 - 1.0)
            .collect(),
    }
}

/// diffusers' `index_for_timestep`: the position of `t` in the schedule, the second one if it
/// occurs twice (so a schedule starting in the middle does not skip a sigma).
fn index_for_timestep(timesteps: &[f32], t: f32) -> Option<usize> {
    let hits: Vec<usize> = timesteps.iter().enumerate().filter(|(_, &v)| v == t).map(|(i, _)| i).collect();
    match hits.len() {
        0 => None,
        1 => Some(hits[0]),
        _ => Some(hits[1]),
    }
}

/// `init_noise_sigma` of the Euler classes: the largest sigma, or `sqrt(max^2 + 1)` for
/// `leading` spacing (float32).
fn init_sigma(sigmas: &[f32], spacing: TimestepSpacing) -> f32 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
    }
}

/// The x0 prediction of the Euler classes at `sigma`.
fn predict_x0<S: Sample>(prediction: PredictionType, model_output: &S, sample: &S, sigma: f32) -> S {
    match prediction {
        PredictionType::Epsilon => S::lin(1.0, sample, -sigma, model_output),
        PredictionType::VPrediction => {
            let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
            S::lin(c_out, model_output, 1.0, &sample.div(sigma * sigma + 1.0))
        }
        PredictionType::Sample => model_output.clone(),
    }
}

/// Shared step bookkeeping: the step index, initialised from the first timestep seen.
fn step_index(current: &mut Option<usize>, timesteps: &[f32], t: f32) -> Result<usize> {
    if timesteps.is_empty() {
        return Err(SchedulerError::NotInitialized("step"));
    }
    if let Some(i) = *current {
        return Ok(i);
    }
    let i = index_for_timestep(timesteps, t).ok_or_else(|| SchedulerError::BadTimestep {
        timestep: t as f64,
        message: "not in the current schedule; pass one of timesteps()".into(),
    })?;
    *current = Some(i);
    Ok(i)
}

/// `EulerDiscreteScheduler` (deterministic; `s_churn = 0`) and
/// `EulerAncestralDiscreteScheduler` (an Euler step to `sigma_down` plus fresh noise of scale
/// `sigma_up`; it draws one noise tensor every step, the last one too, scaled by 0, as
/// diffusers). The two share the schedule, the model-input scaling and the x0 prediction.
///
/// Config keys ([`EulerConfig`]): `num_train_timesteps`, `beta_start`, `beta_end`,
/// `beta_schedule`, `trained_betas`, `prediction_type`, `timestep_spacing` (default linspace),
/// `steps_offset`, `rescale_betas_zero_snr`; for the plain class also `interpolation_type`
/// (`linear`), `use_karras_sigmas`, `use_exponential_sigmas`, `sigma_min`, `sigma_max`,
/// `timestep_type` (`discrete`, or `continuous` with v-prediction) and `final_sigmas_type`
/// (`zero`, `sigma_min`).
///
/// ```
/// use scheduler::{Euler, HostSample, Scheduler, SchedulerConfig, SeededRng};
/// let cfg = SchedulerConfig::from_json_str("{}").unwrap();
/// let mut s = Euler::from_config(&cfg).unwrap();
/// Scheduler::<HostSample>::set_timesteps(&mut s, 3).unwrap();
/// assert_eq!(Scheduler::<HostSample>::timesteps(&s), &[999.0, 499.5, 0.0]);
///
/// let mut a = Euler::ancestral_from_config(&cfg).unwrap();
/// Scheduler::<HostSample>::set_timesteps(&mut a, 5).unwrap();
/// let x = HostSample::zeros(vec![1, 4]);
/// let y = a.step(&x, 999.0, &x, &mut SeededRng::new(0)).unwrap();
/// assert!(y.data.iter().all(|v| v.is_finite()));
/// ```
#[derive(Debug, Clone)]
pub struct Euler {
    ancestral: bool,
    schedule: TrainSchedule,
    sigma_alphas: Vec<f32>,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    sigma_spacing: SigmaSpacing,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    continuous_timesteps: bool,
    final_sigma_min: bool,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    step_index: Option<usize>,
}

impl Euler {
    /// `EulerDiscreteScheduler` from a config (its defaults for missing keys).
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        Self::build(cfg, false)
    }

    /// `EulerAncestralDiscreteScheduler` from a config (its defaults for missing keys).
    pub fn ancestral_from_config(cfg: &SchedulerConfig) -> Result<Self> {
        Self::build(cfg, true)
    }

    fn build(cfg: &SchedulerConfig, ancestral: bool) -> Result<Self> {
        let schedule = TrainSchedule::from_config(cfg, true)?;
        let c: EulerConfig = if ancestral {
            // Only the keys of the ancestral class are read (a config written for Euler keeps
            // the others, unread and unchecked, as diffusers does).
            let own: EulerAncestralConfig = cfg.read()?;
            EulerConfig {
                prediction_type: own.prediction_type,
                timestep_spacing: own.timestep_spacing,
                steps_offset: own.steps_offset,
                ..EulerConfig::default()
            }
        } else {
            cfg.read()?
        };
        if ancestral && c.prediction_type == PredictionType::Sample {
            // diffusers raises NotImplementedError at the first step; fail early instead.
            return Err(cfg.unsupported(
                "prediction_type",
                "sample",
                "epsilon, v_prediction (for EulerAncestralDiscreteScheduler)",
            ));
        }
        if c.interpolation_type != "linear" {
            return Err(cfg.unsupported("interpolation_type", &c.interpolation_type, "linear"));
        }
        if c.use_beta_sigmas {
            return Err(cfg.unsupported("use_beta_sigmas", "true", "false"));
        }
        let continuous_timesteps = match c.timestep_type.as_str() {
            "discrete" => false,
            // diffusers uses continuous timesteps (0.25 ln sigma) only with v-prediction.
            "continuous" => c.prediction_type == PredictionType::VPrediction,
            other => return Err(cfg.unsupported("timestep_type", other, "discrete, continuous")),
        };
        Ok(Euler {
            ancestral,
            sigma_alphas: schedule.sigma_alphas(),
            schedule,
            prediction: c.prediction_type,
            spacing: c.timestep_spacing,
            steps_offset: c.steps_offset,
            sigma_spacing: SigmaSpacing::from_flags(cfg, c.use_karras_sigmas, c.use_exponential_sigmas)?,
            sigma_min: c.sigma_min,
            sigma_max: c.sigma_max,
            continuous_timesteps,
            final_sigma_min: c.final_sigmas_type == FinalSigmas::SigmaMin,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            step_index: None,
        })
    }

    /// The sigmas of the current schedule (one more than the timesteps: the final one).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

impl<S: Sample> Scheduler<S> for Euler {
    fn kind(&self) -> SchedulerKind {
        if self.ancestral {
            SchedulerKind::EulerAncestral
        } else {
            SchedulerKind::Euler
        }
    }

    fn prediction_type(&self) -> PredictionType {
        self.prediction
    }

    fn sigma_spacing(&self) -> SigmaSpacing {
        self.sigma_spacing
    }

    fn train_schedule(&self) -> &TrainSchedule {
        &self.schedule
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let train = self.schedule.num_train_timesteps();
        check_steps(n, train)?;
        let ts32 = euler_timesteps(self.spacing, train, n, self.steps_offset);
        let train_sig = train_sigmas(&self.sigma_alphas);
        let log_sigmas: Vec<f32> = train_sig.iter().map(|s| s.ln()).collect();
        // np.interp works in float64 on the float32 timesteps and sigmas.
        let mut sigmas: Vec<f64> = ts32.iter().map(|&t| np_interp(t as f64, &train_sig)).collect();
        let mut ts: Vec<f64> = ts32.iter().map(|&t| t as f64).collect();
        if self.sigma_spacing != SigmaSpacing::Interpolated && !sigmas.is_empty() {
            let lo = self.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let hi = self.sigma_max.unwrap_or(sigmas[0]);
            sigmas = match self.sigma_spacing {
                SigmaSpacing::Karras => karras_sigmas(lo, hi, n),
                _ => exponential_sigmas(lo, hi, n),
            };
            ts = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
        }
        let last = if self.final_sigma_min { train_sig[0] } else { 0.0 };
        self.sigmas = sigmas.iter().map(|&s| s as f32).chain(std::iter::once(last)).collect();
        self.timesteps = if self.continuous_timesteps {
            self.sigmas[..self.sigmas.len() - 1].iter().map(|s| 0.25 * s.ln()).collect()
        } else {
            ts.iter().map(|&t| t as f32).collect()
        };
        self.step_index = None;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f32 {
        // Before set_timesteps, from the training sigmas, as diffusers does.
        if self.sigmas.is_empty() {
            let mut s = train_sigmas(&self.sigma_alphas);
            s.push(0.0);
            return init_sigma(&s, self.spacing);
        }
        init_sigma(&self.sigmas, self.spacing)
    }

    /// `sample / sqrt(sigma² + 1)`.
    fn scale_model_input(&mut self, sample: &S, timestep: f32) -> Result<S> {
        let i = step_index(&mut self.step_index, &self.timesteps, timestep)?;
        let sigma = self.sigmas[i];
        Ok(sample.div((sigma * sigma + 1.0).sqrt()))
    }

    fn step(&mut self, model_output: &S, timestep: f32, sample: &S, noise: &mut dyn NoiseSource<S>) -> Result<S> {
        check_same_shape(model_output, sample)?;
        let i = step_index(&mut self.step_index, &self.timesteps, timestep)?;
        if i + 1 >= self.sigmas.len() {
            return Err(SchedulerError::PastEnd { calls: i + 1, len: self.timesteps.len() });
        }
        // gamma = 0 (no churn): sigma_hat = sigma.
        let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
        let x0 = predict_x0(self.prediction, model_output, sample, sigma);
        let derivative = S::lin(1.0, sample, -1.0, &x0).div(sigma);
        let out = if self.ancestral {
            let sigma_up = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).sqrt();
            let sigma_down = (next * next - sigma_up * sigma_up).sqrt();
            let prev = S::lin(1.0, sample, sigma_down - sigma, &derivative);
            let n = noise.standard_normal_like(model_output)?;
            S::lin(1.0, &prev, sigma_up, &n)
        } else {
            S::lin(1.0, sample, next - sigma, &derivative)
        };
        self.step_index = Some(i + 1);
        Ok(out)
    }
}
