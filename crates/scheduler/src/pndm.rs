//! PNDM's pseudo linear multistep (PLMS) sampler, as diffusers' `PNDMScheduler` with
//! `skip_prk_steps = true` (the Stable Diffusion setting).

use crate::config::{PndmConfig, PredictionType, SchedulerConfig, SchedulerKind, TimestepSpacing};
use crate::error::{Result, SchedulerError};
use crate::noise::NoiseSource;
use crate::sample::Sample;
use crate::schedule::{check_steps, integer_timestep, integer_timesteps, TrainSchedule};
use crate::{check_same_shape, Scheduler};

/// `PNDMScheduler` (PLMS only). For N > 1 inference steps the schedule has N + 1 timesteps: the
/// second timestep is repeated, because the first PLMS step is a two-evaluation (Heun-like)
/// warm-up. So the model runs N + 1 times and `step` takes N + 1 model outputs.
///
/// Config keys: `num_train_timesteps`, `beta_start`, `beta_end`, `beta_schedule`,
/// `trained_betas`, `skip_prk_steps` (must be true), `set_alpha_to_one` (default false),
/// `prediction_type` (`epsilon` or `v_prediction`), `timestep_spacing` (default leading),
/// `steps_offset`. (PNDM has no `rescale_betas_zero_snr` in diffusers.)
///
/// ```
/// use scheduler::{HostSample, Pndm, Scheduler, SchedulerConfig};
/// let cfg = SchedulerConfig::from_json_str(r#"{"skip_prk_steps": true, "steps_offset": 1}"#).unwrap();
/// let mut s = Pndm::<HostSample>::from_config(&cfg).unwrap();
/// s.set_timesteps(4).unwrap();
/// assert_eq!(s.timesteps(), &[751.0, 501.0, 501.0, 251.0, 1.0]);
/// ```
#[derive(Debug, Clone)]
pub struct Pndm<S> {
    schedule: TrainSchedule,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    final_alpha_cumprod: f32,
    num_inference_steps: usize,
    timesteps: Vec<f32>,
    counter: usize,
    ets: Vec<S>,
    cur_sample: Option<S>,
}

impl<S: Sample> Pndm<S> {
    /// Builds the scheduler from a config (PNDM's defaults for missing keys).
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        let c: PndmConfig = cfg.read()?;
        if !c.skip_prk_steps {
            return Err(cfg.unsupported(
                "skip_prk_steps",
                "false",
                "true (the Runge-Kutta warm-up steps are not implemented; Stable Diffusion configs set true)",
            ));
        }
        let schedule = TrainSchedule::from_config(cfg, false)?;
        if c.prediction_type == PredictionType::Sample {
            return Err(cfg.unsupported("prediction_type", "sample", "epsilon, v_prediction (for PNDMScheduler)"));
        }
        let final_alpha_cumprod = if c.set_alpha_to_one { 1.0 } else { schedule.alphas_cumprod()[0] };
        Ok(Pndm {
            schedule,
            prediction: c.prediction_type,
            spacing: c.timestep_spacing,
            steps_offset: c.steps_offset,
            final_alpha_cumprod,
            num_inference_steps: 0,
            timesteps: Vec::new(),
            counter: 0,
            ets: Vec::new(),
            cur_sample: None,
        })
    }

    fn alpha(&self, t: i64) -> Result<f32> {
        let ac = self.schedule.alphas_cumprod();
        ac.get(t as usize).copied().ok_or_else(|| SchedulerError::BadTimestep {
            timestep: t as f64,
            message: format!("PLMS looks up a training timestep past 0..{}", ac.len()),
        })
    }

    /// diffusers' `_get_prev_sample` (formula (9) of the PNDM paper).
    fn prev_sample(&self, sample: &S, t: i64, prev_t: i64, model_output: &S) -> Result<S> {
        let alpha_t = self.alpha(t)?;
        let alpha_prev = if prev_t >= 0 { self.alpha(prev_t)? } else { self.final_alpha_cumprod };
        let beta_t = 1.0 - alpha_t;
        let beta_prev = 1.0 - alpha_prev;
        let eps = match self.prediction {
            PredictionType::VPrediction => S::lin(alpha_t.sqrt(), model_output, beta_t.sqrt(), sample),
            _ => model_output.clone(),
        };
        let sample_coeff = (alpha_prev / alpha_t).sqrt();
        let denom = alpha_t * beta_prev.sqrt() + (alpha_t * beta_t * alpha_prev).sqrt();
        // As diffusers: ((alpha_prev - alpha_t) * eps) / denom, then the difference.
        let update = eps.scale(alpha_prev - alpha_t).div(denom);
        Ok(S::lin(sample_coeff, sample, -1.0, &update))
    }
}

/// `sum(w_i * x_i)` left to right, with the integer weights applied first as diffusers writes
/// the Adams–Bashforth combinations (`(23 e1 - 16 e2 + 5 e3) / 12`).
fn combine<S: Sample>(terms: &[(f32, &S)]) -> S {
    let mut acc = S::lin(terms[0].0, terms[0].1, terms[1].0, terms[1].1);
    for &(w, x) in &terms[2..] {
        acc = S::lin(1.0, &acc, w, x);
    }
    acc
}

impl<S: Sample> Scheduler<S> for Pndm<S> {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Pndm
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
        self.num_inference_steps = n;
        // diffusers' `_timesteps` is ascending; PLMS repeats the second-to-last and reverses:
        // concat(ts[:-1], ts[-2:-1], ts[-1:])[::-1].
        let mut asc = integer_timesteps(self.spacing, train, n, self.steps_offset);
        asc.reverse();
        let k = asc.len();
        let mut plms: Vec<i64> = asc[..k.saturating_sub(1)].to_vec();
        if k >= 2 {
            plms.push(asc[k - 2]);
        }
        if k >= 1 {
            plms.push(asc[k - 1]);
        }
        plms.reverse();
        self.timesteps = plms.into_iter().map(|t| t as f32).collect();
        self.ets.clear();
        self.counter = 0;
        self.cur_sample = None;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn step(&mut self, model_output: &S, timestep: f32, sample: &S, _noise: &mut dyn NoiseSource<S>) -> Result<S> {
        if self.num_inference_steps == 0 {
            return Err(SchedulerError::NotInitialized("step"));
        }
        check_same_shape(model_output, sample)?;
        // The history must have this sample's shape (a new shape needs set_timesteps).
        if let Some(prev) = self.ets.first().or(self.cur_sample.as_ref()) {
            if prev.shape() != sample.shape() {
                return Err(SchedulerError::Shape(format!(
                    "sample {:?} differs from the previous steps' {:?}; call set_timesteps to restart",
                    sample.shape(),
                    prev.shape()
                )));
            }
        }
        let ratio = (self.schedule.num_train_timesteps() / self.num_inference_steps) as i64;
        let mut t = integer_timestep(timestep, self.schedule.num_train_timesteps())?;
        let mut prev_t = t - ratio;
        if self.counter != 1 {
            // Keep the last three outputs plus this one.
            if self.ets.len() > 3 {
                self.ets.drain(..self.ets.len() - 3);
            }
            self.ets.push(model_output.clone());
        } else {
            // The repeated timestep: re-evaluate the first step from its start.
            prev_t = t;
            t += ratio;
        }
        let mut sample = sample.clone();
        let e = &self.ets;
        let n = e.len();
        let eps = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            model_output.clone()
        } else if n == 1 && self.counter == 1 {
            if let Some(cur) = self.cur_sample.take() {
                sample = cur;
            }
            combine(&[(1.0, model_output), (1.0, &e[n - 1])]).div(2.0)
        } else if n == 2 {
            combine(&[(3.0, &e[1]), (-1.0, &e[0])]).div(2.0)
        } else if n == 3 {
            combine(&[(23.0, &e[2]), (-16.0, &e[1]), (5.0, &e[0])]).div(12.0)
        } else {
            combine(&[(55.0, &e[n - 1]), (-59.0, &e[n - 2]), (37.0, &e[n - 3]), (-9.0, &e[n - 4])]).scale(1.0 / 24.0)
        };
        let prev = self.prev_sample(&sample, t, prev_t, &eps)?;
        self.counter += 1;
        Ok(prev)
    }
}
