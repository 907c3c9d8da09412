//! DDPM (Ho et al. 2020), as diffusers' `DDPMScheduler`.

use crate::config::{DdpmConfig, PredictionType, SchedulerConfig, SchedulerKind, TimestepSpacing};
use crate::error::{Result, SchedulerError};
use crate::noise::NoiseSource;
use crate::sample::Sample;
use crate::schedule::{check_steps, integer_timestep, integer_timesteps, TrainSchedule};
use crate::{check_same_shape, Scheduler};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VarianceType {
    /// `fixed_small`: the posterior variance.
    Small,
    /// `fixed_small_log`: the same, through exp(0.5 log(v)) as diffusers computes it.
    SmallLog,
    /// `fixed_large`: beta_t.
    Large,
}

/// `DDPMScheduler`: ancestral sampling; every step but the last (`t > 0`) draws one noise
/// tensor from the noise source, exactly where diffusers calls `randn_tensor`.
///
/// Config keys: `num_train_timesteps`, `beta_start`, `beta_end`, `beta_schedule` (also
/// `sigmoid`), `trained_betas`, `variance_type` (`fixed_small`, `fixed_small_log`,
/// `fixed_large`), `clip_sample` (default true), `clip_sample_range`, `prediction_type`,
/// `timestep_spacing` (default leading), `steps_offset`, `rescale_betas_zero_snr`.
///
/// ```
/// use scheduler::{Ddpm, HostSample, Scheduler, SchedulerConfig, SeededRng};
/// let mut s = Ddpm::from_config(&SchedulerConfig::from_json_str("{}").unwrap()).unwrap();
/// Scheduler::<HostSample>::set_timesteps(&mut s, 2).unwrap();
/// let x = HostSample::zeros(vec![1, 4]);
/// let y = s.step(&x, 500.0, &x, &mut SeededRng::new(1)).unwrap();
/// assert!(y.data.iter().any(|v| *v != 0.0)); // noise was added
/// ```
#[derive(Debug, Clone)]
pub struct Ddpm {
    schedule: TrainSchedule,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    variance_type: VarianceType,
    clip_range: Option<f32>,
    timesteps: Vec<f32>,
}

impl Ddpm {
    /// Builds the scheduler from a config (DDPM's defaults for missing keys).
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        let c: DdpmConfig = cfg.read()?;
        if c.thresholding {
            return Err(cfg.unsupported("thresholding", "true", "false"));
        }
        let variance_type = match c.variance_type.as_str() {
            "fixed_small" => VarianceType::Small,
            "fixed_small_log" => VarianceType::SmallLog,
            "fixed_large" => VarianceType::Large,
            other => return Err(cfg.unsupported("variance_type", other, "fixed_small, fixed_small_log, fixed_large")),
        };
        Ok(Ddpm {
            schedule: TrainSchedule::build(cfg, true, true)?,
            prediction: c.prediction_type,
            spacing: c.timestep_spacing,
            steps_offset: c.steps_offset,
            variance_type,
            clip_range: c.clip_sample.then_some(c.clip_sample_range as f32),
            timesteps: Vec::new(),
        })
    }

    /// diffusers' `previous_timestep`: the next entry of the schedule, or -1 after the last.
    fn previous_timestep(&self, t: f32) -> Result<i64> {
        let i = self.timesteps.iter().position(|&v| v == t).ok_or_else(|| SchedulerError::BadTimestep {
            timestep: t as f64,
            message: "not in the current schedule".into(),
        })?;
        Ok(self.timesteps.get(i + 1).map_or(-1, |&v| v as i64))
    }
}

impl<S: Sample> Scheduler<S> for Ddpm {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddpm
    }

    fn prediction_type(&self) -> PredictionType {
        self.prediction
    }

    fn train_schedule(&self) -> &TrainSchedule {
        &self.schedule
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let train = self.schedule.num_train_timesteps();
        check_steps(n, train)?;
        self.timesteps =
            integer_timesteps(self.spacing, train, n, self.steps_offset).into_iter().map(|t| t as f32).collect();
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn step(&mut self, model_output: &S, timestep: f32, sample: &S, noise: &mut dyn NoiseSource<S>) -> Result<S> {
        if self.timesteps.is_empty() {
            return Err(SchedulerError::NotInitialized("step"));
        }
        check_same_shape(model_output, sample)?;
        let t = integer_timestep(timestep, self.schedule.num_train_timesteps())?;
        let prev_t = self.previous_timestep(timestep)?;
        let ac = self.schedule.alphas_cumprod();
        let alpha_t = ac[t as usize];
        let alpha_prev = if prev_t >= 0 { ac[prev_t as usize] } else { 1.0 };
        let beta_t = 1.0 - alpha_t;
        let beta_prev = 1.0 - alpha_prev;
        let current_alpha = alpha_t / alpha_prev;
        let current_beta = 1.0 - current_alpha;

        let mut x0 = match self.prediction {
            PredictionType::Epsilon => S::lin(1.0, sample, -beta_t.sqrt(), model_output).div(alpha_t.sqrt()),
            PredictionType::Sample => model_output.clone(),
            PredictionType::VPrediction => S::lin(alpha_t.sqrt(), sample, -beta_t.sqrt(), model_output),
        };
        if let Some(r) = self.clip_range {
            x0 = x0.clamp(-r, r);
        }
        let x0_coeff = alpha_prev.sqrt() * current_beta / beta_t;
        let sample_coeff = current_alpha.sqrt() * beta_prev / beta_t;
        let prev = S::lin(x0_coeff, &x0, sample_coeff, sample);
        if t == 0 {
            return Ok(prev);
        }
        // _get_variance, float32; clamped as diffusers does so the log stays finite.
        let variance = (beta_prev / beta_t * current_beta).max(1e-20);
        let std = match self.variance_type {
            VarianceType::Small => variance.sqrt(),
            VarianceType::SmallLog => (0.5 * variance.ln()).exp(),
            VarianceType::Large => current_beta.sqrt(),
        };
        let n = noise.standard_normal_like(model_output)?;
        Ok(S::lin(1.0, &prev, std, &n))
    }
}
