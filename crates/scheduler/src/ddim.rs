//! DDIM (Song et al. 2020), as diffusers' `DDIMScheduler`.

use crate::config::{DdimConfig, PredictionType, SchedulerConfig, SchedulerKind, TimestepSpacing};
use crate::error::{Result, SchedulerError};
use crate::noise::NoiseSource;
use crate::sample::Sample;
use crate::schedule::{check_steps, integer_timestep, integer_timesteps, TrainSchedule};
use crate::{check_same_shape, Scheduler};

/// `DDIMScheduler`. Deterministic with the default `eta = 0` (what the Stable Diffusion
/// pipelines use); [`Ddim::set_eta`] adds DDIM's stochastic term, drawing from the noise source.
///
/// Config keys: `num_train_timesteps`, `beta_start`, `beta_end`, `beta_schedule`,
/// `trained_betas`, `clip_sample` (default true), `clip_sample_range`, `set_alpha_to_one`
/// (default true), `steps_offset`, `prediction_type`, `timestep_spacing` (default leading),
/// `rescale_betas_zero_snr`. `thresholding = true` is rejected.
///
/// ```
/// use scheduler::{Ddim, HostSample, NoNoise, Scheduler, SchedulerConfig};
/// let mut s = Ddim::from_config(&SchedulerConfig::from_json_str("{}").unwrap()).unwrap();
/// Scheduler::<HostSample>::set_timesteps(&mut s, 4).unwrap();
/// assert_eq!(Scheduler::<HostSample>::timesteps(&s), &[750.0, 500.0, 250.0, 0.0]);
/// ```
#[derive(Debug, Clone)]
pub struct Ddim {
    schedule: TrainSchedule,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    final_alpha_cumprod: f32,
    clip_range: Option<f32>,
    eta: f32,
    num_inference_steps: usize,
    timesteps: Vec<f32>,
}

impl Ddim {
    /// Builds the scheduler from a config (DDIM's defaults for missing keys).
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        let c: DdimConfig = cfg.read()?;
        if c.thresholding {
            return Err(cfg.unsupported("thresholding", "true", "false"));
        }
        let schedule = TrainSchedule::from_config(cfg, true)?;
        let final_alpha_cumprod = if c.set_alpha_to_one { 1.0 } else { schedule.alphas_cumprod()[0] };
        Ok(Ddim {
            schedule,
            prediction: c.prediction_type,
            spacing: c.timestep_spacing,
            steps_offset: c.steps_offset,
            final_alpha_cumprod,
            clip_range: c.clip_sample.then_some(c.clip_sample_range as f32),
            eta: 0.0,
            num_inference_steps: 0,
            timesteps: Vec::new(),
        })
    }

    /// Sets DDIM's `eta` (0: deterministic DDIM, 1: DDPM-like variance). With `eta > 0`, `step`
    /// draws one noise tensor per step.
    pub fn set_eta(&mut self, eta: f32) {
        self.eta = eta;
    }
}

impl<S: Sample> Scheduler<S> for Ddim {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
    }

    fn prediction_type(&self) -> PredictionType {
        self.prediction
    }

    fn train_schedule(&self) -> &TrainSchedule {
        &self.schedule
    }

    fn is_stochastic(&self) -> bool {
        self.eta > 0.0
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let train = self.schedule.num_train_timesteps();
        check_steps(n, train)?;
        self.num_inference_steps = n;
        self.timesteps =
            integer_timesteps(self.spacing, train, n, self.steps_offset).into_iter().map(|t| t as f32).collect();
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn step(&mut self, model_output: &S, timestep: f32, sample: &S, noise: &mut dyn NoiseSource<S>) -> Result<S> {
        if self.num_inference_steps == 0 {
            return Err(SchedulerError::NotInitialized("step"));
        }
        check_same_shape(model_output, sample)?;
        let train = self.schedule.num_train_timesteps();
        let t = integer_timestep(timestep, train)?;
        let ac = self.schedule.alphas_cumprod();
        // diffusers steps back by T // N whatever the spacing (so `trailing` and `linspace`
        // look up an alpha that need not be the next timestep's).
        let prev_t = t - (train / self.num_inference_steps) as i64;
        let alpha_t = ac[t as usize];
        let alpha_prev = if prev_t >= 0 { ac[prev_t as usize] } else { self.final_alpha_cumprod };
        let beta_t = 1.0 - alpha_t;

        let (mut x0, eps) = match self.prediction {
            PredictionType::Epsilon => {
                let x0 = S::lin(1.0, sample, -beta_t.sqrt(), model_output).div(alpha_t.sqrt());
                (x0, model_output.clone())
            }
            PredictionType::Sample => {
                let x0 = model_output.clone();
                let eps = S::lin(1.0, sample, -alpha_t.sqrt(), &x0).div(beta_t.sqrt());
                (x0, eps)
            }
            PredictionType::VPrediction => (
                S::lin(alpha_t.sqrt(), sample, -beta_t.sqrt(), model_output),
                S::lin(alpha_t.sqrt(), model_output, beta_t.sqrt(), sample),
            ),
        };
        if let Some(r) = self.clip_range {
            x0 = x0.clamp(-r, r);
        }
        let beta_prev = 1.0 - alpha_prev;
        let variance = beta_prev / beta_t * (1.0 - alpha_t / alpha_prev);
        let std_dev = self.eta * variance.sqrt();
        let direction = (1.0 - alpha_prev - std_dev * std_dev).sqrt();
        let prev = S::lin(alpha_prev.sqrt(), &x0, direction, &eps);
        if self.eta > 0.0 {
            let n = noise.standard_normal_like(model_output)?;
            return Ok(S::lin(1.0, &prev, std_dev, &n));
        }
        Ok(prev)
    }
}
