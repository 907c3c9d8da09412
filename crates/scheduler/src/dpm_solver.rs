//! DPM-Solver++ (Lu et al. 2022), multistep, as diffusers' `DPMSolverMultistepScheduler` with
//! `algorithm_type = "dpmsolver++"`: "DPM++ 2M" at `solver_order = 2`, "DPM++ 2M Karras" with
//! `use_karras_sigmas`.

use crate::config::{
    BetaSchedule, DpmSolverConfig, FinalSigmas, PredictionType, SchedulerConfig, SchedulerKind, SigmaSpacing,
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

/// `DPMSolverMultistepScheduler` with the data-prediction (`dpmsolver++`) algorithm.
///
/// Config keys: `num_train_timesteps`, `beta_start`, `beta_end`, `beta_schedule`,
/// `trained_betas`, `solver_order` (1 to 3), `prediction_type`, `algorithm_type`
/// (`dpmsolver++`; `deis` is read as `dpmsolver++`, as diffusers does), `solver_type`
/// (`midpoint`, `heun`; `logrho`/`bh1`/`bh2` read as `midpoint`), `lower_order_final`,
/// `euler_at_final`, `use_karras_sigmas`, `use_exponential_sigmas`, `final_sigmas_type`
/// (`zero`, `sigma_min`), `lambda_min_clipped`, `timestep_spacing` (default linspace),
/// `steps_offset`, `rescale_betas_zero_snr`.
///
/// ```
/// use scheduler::{DpmSolverMultistep, HostSample, Scheduler, SchedulerConfig};
/// let cfg = SchedulerConfig::from_json_str(r#"{"use_karras_sigmas": true,
///     "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}"#).unwrap();
/// let mut s = DpmSolverMultistep::<HostSample>::from_config(&cfg).unwrap();
/// s.set_timesteps(7).unwrap();
/// assert_eq!(s.timesteps()[0], 999.0);
/// ```
#[derive(Debug, Clone)]
pub struct DpmSolverMultistep<S> {
    schedule: TrainSchedule,
    sigma_alphas: Vec<f32>,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    solver_order: usize,
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    sigma_spacing: SigmaSpacing,
    round_karras_timesteps: bool,
    final_sigma_min: bool,
    lambda_min_clipped: f64,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    model_outputs: Vec<Option<S>>,
    lower_order_nums: usize,
    step_index: Option<usize>,
}

impl<S: Sample> DpmSolverMultistep<S> {
    /// Builds the scheduler from a config (DPM-Solver's defaults for missing keys).
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        let c: DpmSolverConfig = cfg.read()?;
        let schedule = TrainSchedule::from_config(cfg, true)?;
        match c.algorithm_type.as_str() {
            "dpmsolver++" | "deis" => {}
            other => {
                return Err(cfg.unsupported(
                    "algorithm_type",
                    other,
                    "dpmsolver++ (the CLI name dpm++2m sets it on any config)",
                ))
            }
        }
        let heun = match c.solver_type.as_str() {
            "midpoint" | "logrho" | "bh1" | "bh2" => false,
            "heun" => true,
            other => return Err(cfg.unsupported("solver_type", other, "midpoint, heun")),
        };
        if !(1..=3).contains(&c.solver_order) {
            return Err(cfg.unsupported("solver_order", c.solver_order.to_string(), "1, 2, 3"));
        }
        for (key, set) in [
            ("thresholding", c.thresholding),
            ("use_lu_lambdas", c.use_lu_lambdas),
            ("use_beta_sigmas", c.use_beta_sigmas),
            ("use_flow_sigmas", c.use_flow_sigmas),
            ("use_dynamic_shifting", c.use_dynamic_shifting),
        ] {
            if set {
                return Err(cfg.unsupported(key, "true", "false"));
            }
        }
        if let Some(v @ ("learned" | "learned_range")) = c.variance_type.as_deref() {
            return Err(cfg.unsupported("variance_type", v, "null (learned variances are not supported)"));
        }
        // diffusers leaves Karras timesteps fractional for the cosine schedule (then truncates
        // them to integers).
        let round_karras_timesteps = schedule.beta_schedule() != BetaSchedule::SquaredcosCapV2;
        Ok(DpmSolverMultistep {
            sigma_alphas: schedule.sigma_alphas(),
            schedule,
            prediction: c.prediction_type,
            spacing: c.timestep_spacing,
            steps_offset: c.steps_offset,
            solver_order: c.solver_order,
            heun,
            lower_order_final: c.lower_order_final,
            euler_at_final: c.euler_at_final,
            sigma_spacing: SigmaSpacing::from_flags(cfg, c.use_karras_sigmas, c.use_exponential_sigmas)?,
            round_karras_timesteps,
            final_sigma_min: c.final_sigmas_type == FinalSigmas::SigmaMin,
            lambda_min_clipped: c.lambda_min_clipped,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            model_outputs: vec![None; c.solver_order],
            lower_order_nums: 0,
            step_index: None,
        })
    }

    /// The sigmas of the current schedule (one more than the timesteps).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// `(alpha_t, sigma_t)` of the VP process at Karras sigma `sigma` (float32).
    fn alpha_sigma(sigma: f32) -> (f32, f32) {
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        (alpha, sigma * alpha)
    }

    /// diffusers' `convert_model_output` for dpmsolver++: the x0 prediction.
    fn convert_model_output(&self, model_output: &S, sample: &S, i: usize) -> S {
        let (alpha_t, sigma_t) = Self::alpha_sigma(self.sigmas[i]);
        match self.prediction {
            PredictionType::Epsilon => S::lin(1.0, sample, -sigma_t, model_output).div(alpha_t),
            PredictionType::Sample => model_output.clone(),
            PredictionType::VPrediction => S::lin(alpha_t, sample, -sigma_t, model_output),
        }
    }

    fn lambda(alpha: f32, sigma: f32) -> f32 {
        alpha.ln() - sigma.ln()
    }

    fn first_order(&self, x0: &S, sample: &S, i: usize) -> S {
        let (alpha_t, sigma_t) = Self::alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s, sigma_s) = Self::alpha_sigma(self.sigmas[i]);
        let h = Self::lambda(alpha_t, sigma_t) - Self::lambda(alpha_s, sigma_s);
        S::lin(sigma_t / sigma_s, sample, -(alpha_t * ((-h).exp() - 1.0)), x0)
    }

    fn second_order(&self, m0: &S, m1: &S, sample: &S, i: usize) -> S {
        let (alpha_t, sigma_t) = Self::alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = Self::alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = Self::alpha_sigma(self.sigmas[i - 1]);
        let lambda_t = Self::lambda(alpha_t, sigma_t);
        let lambda_s0 = Self::lambda(alpha_s0, sigma_s0);
        let lambda_s1 = Self::lambda(alpha_s1, sigma_s1);
        let (h, h0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h0 / h;
        let d1 = S::lin(1.0, m0, -1.0, m1).scale(1.0 / r0);
        let em1 = (-h).exp() - 1.0;
        let x = S::lin(sigma_t / sigma_s0, sample, -(alpha_t * em1), m0);
        if self.heun {
            S::lin(1.0, &x, alpha_t * (em1 / h + 1.0), &d1)
        } else {
            S::lin(1.0, &x, -(0.5 * (alpha_t * em1)), &d1)
        }
    }

    fn third_order(&self, m0: &S, m1: &S, m2: &S, sample: &S, i: usize) -> S {
        let (alpha_t, sigma_t) = Self::alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = Self::alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = Self::alpha_sigma(self.sigmas[i - 1]);
        let (alpha_s2, sigma_s2) = Self::alpha_sigma(self.sigmas[i - 2]);
        let lambda_t = Self::lambda(alpha_t, sigma_t);
        let lambda_s0 = Self::lambda(alpha_s0, sigma_s0);
        let lambda_s1 = Self::lambda(alpha_s1, sigma_s1);
        let lambda_s2 = Self::lambda(alpha_s2, sigma_s2);
        let (h, h0, h1) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2);
        let (r0, r1) = (h0 / h, h1 / h);
        let d1_0 = S::lin(1.0, m0, -1.0, m1).scale(1.0 / r0);
        let d1_1 = S::lin(1.0, m1, -1.0, m2).scale(1.0 / r1);
        let diff = S::lin(1.0, &d1_0, -1.0, &d1_1);
        let d1 = S::lin(1.0, &d1_0, r0 / (r0 + r1), &diff);
        let d2 = diff.scale(1.0 / (r0 + r1));
        let em1 = (-h).exp() - 1.0;
        let x = S::lin(sigma_t / sigma_s0, sample, -(alpha_t * em1), m0);
        let x = S::lin(1.0, &x, alpha_t * (em1 / h + 1.0), &d1);
        S::lin(1.0, &x, -(alpha_t * (((-h).exp() - 1.0 + h) / (h * h) - 0.5)), &d2)
    }
}

impl<S: Sample> Scheduler<S> for DpmSolverMultistep<S> {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::DpmSolverMultistep
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
        let ac = &self.sigma_alphas;
        // lambda_min_clipped: searchsorted(flip(lambda_t), lambda_min_clipped).
        let lambdas: Vec<f32> = ac.iter().map(|&a| a.sqrt().ln() - (1.0 - a).sqrt().ln()).collect();
        let clipped = lambdas.iter().rev().take_while(|&&l| (l as f64) < self.lambda_min_clipped).count();
        let last_timestep = train - clipped;
        let mut ts: Vec<f64> = match self.spacing {
            TimestepSpacing::Linspace => {
                let mut v: Vec<f64> = np_linspace(0.0, last_timestep as f64 - 1.0, n + 1)
                    .into_iter()
                    .map(f64::round_ties_even)
                    .rev()
                    .collect();
                v.pop();
                v
            }
            TimestepSpacing::Leading => {
                let ratio = last_timestep / (n + 1);
                (1..=n).rev().map(|i| (i * ratio) as f64 + self.steps_offset as f64).collect()
            }
            TimestepSpacing::Trailing => np_arange(last_timestep as f64, 0.0, -(train as f64 / n as f64))
                .into_iter()
                .map(|v| v.round_ties_even() - 1.0)
                .collect(),
        };
        let train_sig = train_sigmas(ac);
        let log_sigmas: Vec<f32> = train_sig.iter().map(|s| s.ln()).collect();
        let sigmas: Vec<f64> = match self.sigma_spacing {
            SigmaSpacing::Interpolated => ts.iter().map(|&t| np_interp(t, &train_sig)).collect(),
            spacing => {
                // The full training range: sigma_min = sigma(0), sigma_max = sigma(T - 1).
                let lo = train_sig[0] as f64;
                let hi = train_sig[train_sig.len() - 1] as f64;
                let s = if spacing == SigmaSpacing::Karras {
                    karras_sigmas(lo, hi, n)
                } else {
                    exponential_sigmas(lo, hi, n)
                };
                ts = s.iter().map(|&x| sigma_to_t(x, &log_sigmas)).collect();
                if spacing == SigmaSpacing::Karras && self.round_karras_timesteps {
                    ts.iter_mut().for_each(|t| *t = t.round_ties_even());
                }
                s
            }
        };
        let last = if self.final_sigma_min { train_sig[0] } else { 0.0 };
        self.sigmas = sigmas.iter().map(|&s| s as f32).chain(std::iter::once(last)).collect();
        // torch's .to(int64) truncates toward zero.
        self.timesteps = ts.iter().map(|&t| t.trunc() as f32).collect();
        self.model_outputs = vec![None; self.solver_order];
        self.lower_order_nums = 0;
        self.step_index = None;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn step(&mut self, model_output: &S, timestep: f32, sample: &S, _noise: &mut dyn NoiseSource<S>) -> Result<S> {
        if self.timesteps.is_empty() {
            return Err(SchedulerError::NotInitialized("step"));
        }
        check_same_shape(model_output, sample)?;
        let len = self.timesteps.len();
        let i = match self.step_index {
            Some(i) => i,
            None => {
                // index_for_timestep: the second match if repeated, the last index if absent.
                let hits: Vec<usize> =
                    self.timesteps.iter().enumerate().filter(|(_, &v)| v == timestep).map(|(i, _)| i).collect();
                match hits.len() {
                    0 => len - 1,
                    1 => hits[0],
                    _ => hits[1],
                }
            }
        };
        if i >= len {
            return Err(SchedulerError::PastEnd { calls: i + 1, len });
        }
        let lower_order_final =
            i == len - 1 && (self.euler_at_final || (self.lower_order_final && len < 15) || !self.final_sigma_min);
        let lower_order_second = i + 2 == len && self.lower_order_final && len < 15;

        // The history must have this sample's shape (a new shape needs set_timesteps).
        if let Some(prev) = self.model_outputs.iter().flatten().next() {
            if prev.shape() != sample.shape() {
                return Err(SchedulerError::Shape(format!(
                    "sample {:?} differs from the previous steps' {:?}; call set_timesteps to restart",
                    sample.shape(),
                    prev.shape()
                )));
            }
        }
        let x0 = self.convert_model_output(model_output, sample, i);
        self.model_outputs.rotate_left(1);
        if let Some(last) = self.model_outputs.last_mut() {
            *last = Some(x0.clone());
        }
        let order = self.solver_order;
        let hist = |k: usize| self.model_outputs[order - 1 - k].as_ref();
        let prev = if order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(&x0, sample, i)
        } else if order == 2 || self.lower_order_nums < 2 || lower_order_second {
            match hist(1) {
                Some(m1) => self.second_order(&x0, m1, sample, i),
                None => self.first_order(&x0, sample, i),
            }
        } else {
            match (hist(1), hist(2)) {
                (Some(m1), Some(m2)) => self.third_order(&x0, m1, m2, sample, i),
                _ => self.first_order(&x0, sample, i),
            }
        };
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.step_index = Some(i + 1);
        Ok(prev)
    }
}
