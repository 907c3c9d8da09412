//! The diffusers noise schedulers, step for step: DDIM, DDPM, PNDM (PLMS), Euler, Euler
//! ancestral and DPM-Solver++ (2M, optionally with Karras sigmas), built from a diffusers
//! `scheduler_config.json`.
//!
//! * [`Scheduler`] is the interface: [`Scheduler::set_timesteps`], [`Scheduler::timesteps`],
//!   [`Scheduler::init_noise_sigma`], [`Scheduler::scale_model_input`], [`Scheduler::step`],
//!   and the training helpers [`Scheduler::add_noise`] / [`Scheduler::training_target`].
//! * It is generic over the latent type through [`Sample`]: [`HostSample`] (a `Vec<f32>` with a
//!   shape) and, with the default `burn` feature, `burn::tensor::Tensor<B, D>` on any backend.
//!   Coefficients are computed on the host as scalars, in the float precision diffusers uses, so
//!   a step is a few elementwise tensor ops.
//! * Stochastic schedulers take their noise from an explicit [`NoiseSource`] ([`SeededRng`],
//!   [`NoiseQueue`], or `BurnNoise` on the device).
//! * [`from_dir`] / [`load`] read a folder's `scheduler_config.json`; an override name
//!   ([`CLI_NAMES`]) builds another class from the same config, as diffusers' `from_config`.
//! * [`run_stage`] is the `scheduler` stage of the stage runner (see the README).
//!
//! ```
//! use scheduler::{HostSample, NoNoise, Scheduler, SchedulerConfig};
//! let cfg = SchedulerConfig::from_json_str(r#"{"_class_name": "EulerDiscreteScheduler",
//!     "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}"#).unwrap();
//! let mut s = scheduler::from_config::<HostSample>(&cfg, None).unwrap();
//! s.set_timesteps(4).unwrap();
//! let mut x = HostSample::new(vec![s.init_noise_sigma(); 8], vec![1, 2, 2, 2]).unwrap();
//! for t in s.timesteps().to_vec() {
//!     let _unet_input = s.scale_model_input(&x, t).unwrap();
//!     let eps = HostSample::zeros(vec![1, 2, 2, 2]); // the model's prediction
//!     x = s.step(&eps, t, &x, &mut NoNoise).unwrap();
//! }
//! ```

mod config;
mod ddim;
mod ddpm;
mod dpm_solver;
mod error;
mod euler;
mod noise;
mod pndm;
mod sample;
mod schedule;

use std::path::Path;

pub use config::{PredictionType, SchedulerConfig, SchedulerKind, TimestepSpacing, CLI_NAMES};
pub use ddim::Ddim;
pub use ddpm::Ddpm;
pub use dpm_solver::DpmSolverMultistep;
pub use error::{Result, SchedulerError};
pub use euler::{Euler, EulerAncestral};
#[cfg(feature = "burn")]
pub use noise::BurnNoise;
pub use noise::{NoNoise, NoiseQueue, NoiseSource, SeededRng};
pub use pndm::Pndm;
pub use sample::{HostSample, Sample};
pub use schedule::TrainSchedule;

/// A diffusion sampler, as diffusers' `SchedulerMixin`: call [`Scheduler::set_timesteps`], then
/// for each of [`Scheduler::timesteps`] run the model on [`Scheduler::scale_model_input`] and
/// pass its output to [`Scheduler::step`]. The contract is one model output per timestep
/// (PNDM's list has N + 1 entries for N > 1 inference steps).
///
/// ```
/// use scheduler::{HostSample, NoNoise, Scheduler, SchedulerConfig};
/// let cfg = SchedulerConfig::from_json_str(r#"{"_class_name": "DDIMScheduler"}"#).unwrap();
/// let mut s = scheduler::from_config::<HostSample>(&cfg, None).unwrap();
/// s.set_timesteps(10).unwrap();
/// assert_eq!(s.timesteps()[0], 900.0);
/// ```
pub trait Scheduler<S: Sample>: Send {
    /// Which family this is.
    fn kind(&self) -> SchedulerKind;

    /// `prediction_type` of the config.
    fn prediction_type(&self) -> PredictionType;

    /// The training schedule (betas, alphas_cumprod) the training helpers use.
    fn train_schedule(&self) -> &TrainSchedule;

    /// Computes the timesteps (and sigmas) for `num_inference_steps` and resets the step state.
    /// Errors on 0 or on more steps than `num_train_timesteps`.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;

    /// The timesteps to run the model at, in order; empty before `set_timesteps`. Integers for
    /// DDIM, DDPM, PNDM and DPM-Solver; fractional for Euler with Karras or exponential sigmas.
    fn timesteps(&self) -> &[f32];

    /// The standard deviation of the initial noise (1 except for the Euler family).
    /// The default, 1, is that of the DDPM-family schedulers.
    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    /// The model input for `timestep`: `sample / sqrt(sigma^2 + 1)` for the Euler family, the
    /// sample itself otherwise.
    /// The default is the identity (DDPM-family schedulers); sigma-space schedulers override it.
    fn scale_model_input(&mut self, sample: &S, _timestep: f32) -> Result<S> {
        Ok(sample.clone())
    }

    /// One denoising step from `timestep`: the sample before the next timestep. `noise` is asked
    /// for standard normals only by stochastic schedulers (DDPM, Euler ancestral).
    fn step(&mut self, model_output: &S, timestep: f32, sample: &S, noise: &mut dyn NoiseSource<S>) -> Result<S>;

    /// Whether `step` draws noise.
    fn is_stochastic(&self) -> bool {
        self.kind().is_stochastic()
    }

    /// The training forward process at integer training `timesteps` (one per batch item, or one
    /// for all), as `DDPMScheduler.add_noise` (for every class: the trainer's noising does not
    /// depend on the sampler).
    fn add_noise(&self, original: &S, noise: &S, timesteps: &[usize]) -> Result<S> {
        self.train_schedule().add_noise(original, noise, timesteps)
    }

    /// The regression target for this config's prediction type: the noise (`epsilon`), the
    /// velocity (`v_prediction`, as `get_velocity`) or the original (`sample`).
    fn training_target(&self, original: &S, noise: &S, timesteps: &[usize]) -> Result<S> {
        self.train_schedule().training_target(self.prediction_type(), original, noise, timesteps)
    }
}

/// Builds the scheduler a config names (`_class_name`), or the one `override_name` names (a CLI
/// name from [`CLI_NAMES`], `dpm++2m-karras`, or a diffusers class name), reading the same config
/// with the chosen class's defaults, as diffusers' `from_config`. The CLI names force what they
/// promise: `pndm` sets `skip_prk_steps`, `dpm++2m` sets `algorithm_type = dpmsolver++` and
/// `solver_order = 2`, `dpm++2m-karras` also `use_karras_sigmas`.
///
/// ```
/// use scheduler::{HostSample, SchedulerConfig, SchedulerKind};
/// let cfg = SchedulerConfig::from_json_str(r#"{"_class_name": "PNDMScheduler", "skip_prk_steps": true}"#).unwrap();
/// let s = scheduler::from_config::<HostSample>(&cfg, Some("euler-a")).unwrap();
/// assert_eq!(s.kind(), SchedulerKind::EulerAncestral);
/// assert!(scheduler::from_config::<HostSample>(&cfg, Some("lms")).is_err());
/// ```
pub fn from_config<S: Sample + 'static>(
    cfg: &SchedulerConfig,
    override_name: Option<&str>,
) -> Result<Box<dyn Scheduler<S>>> {
    let supported = || {
        let classes: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.class_name()).collect();
        format!("{} (CLI names: {}, dpm++2m-karras)", classes.join(", "), CLI_NAMES.join(", "))
    };
    let mut cfg = cfg.clone();
    let kind = match override_name {
        Some(name) => {
            let (base, karras) = match name {
                "dpm++2m-karras" => ("dpm++2m", true),
                other => (other, false),
            };
            let kind = SchedulerKind::from_name(base)
                .ok_or_else(|| SchedulerError::UnknownName { name: name.to_string(), supported: supported() })?;
            // Only the short names force settings; a class name behaves as plain from_config.
            if base == kind.cli_name() {
                match kind {
                    SchedulerKind::Pndm => cfg.set("skip_prk_steps", true.into()),
                    SchedulerKind::DpmSolverMultistep => {
                        cfg.set("algorithm_type", "dpmsolver++".into());
                        cfg.set("solver_order", 2.into());
                    }
                    _ => {}
                }
            }
            if karras {
                cfg.set("use_karras_sigmas", true.into());
            }
            kind
        }
        None => {
            let name = cfg.class_name().unwrap_or("<missing>").to_string();
            SchedulerKind::ALL.into_iter().find(|k| k.class_name() == name).ok_or_else(|| {
                SchedulerError::UnknownClass {
                    path: cfg.path().to_path_buf(),
                    field: "_class_name",
                    name,
                    supported: supported(),
                }
            })?
        }
    };
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(Ddim::from_config(&cfg)?),
        SchedulerKind::Ddpm => Box::new(Ddpm::from_config(&cfg)?),
        SchedulerKind::Pndm => Box::new(Pndm::<S>::from_config(&cfg)?),
        SchedulerKind::Euler => Box::new(Euler::from_config(&cfg)?),
        SchedulerKind::EulerAncestral => Box::new(EulerAncestral::from_config(&cfg)?),
        SchedulerKind::DpmSolverMultistep => Box::new(DpmSolverMultistep::<S>::from_config(&cfg)?),
    })
}

/// [`from_config`] on `dir/scheduler_config.json`, for any [`Sample`] type: [`HostSample`], or
/// with the `burn` feature `burn::tensor::Tensor<B, 4>` (for example
/// `scheduler::load::<Tensor<Cuda, 4>>(dir, Some("dpm++2m"))`), so sampling stays on the device.
///
/// ```no_run
/// use scheduler::HostSample;
/// let s = scheduler::load::<HostSample>("sd15/scheduler".as_ref(), Some("dpm++2m"))?;
/// # Ok::<(), scheduler::SchedulerError>(())
/// ```
pub fn load<S: Sample + 'static>(dir: &Path, override_name: Option<&str>) -> Result<Box<dyn Scheduler<S>>> {
    let cfg = SchedulerConfig::from_file(&dir.join("scheduler_config.json"))?;
    from_config(&cfg, override_name)
}

/// [`load`] for host samples: the scheduler of a folder holding `scheduler_config.json`.
///
/// ```no_run
/// let mut s = scheduler::from_dir("sd15/scheduler".as_ref(), Some("euler-a"))?;
/// s.set_timesteps(25)?;
/// # Ok::<(), scheduler::SchedulerError>(())
/// ```
pub fn from_dir(dir: &Path, override_name: Option<&str>) -> Result<Box<dyn Scheduler<HostSample>>> {
    load(dir, override_name)
}

/// The seed of the host noise [`run_stage`] gives stochastic schedulers.
pub const STAGE_NOISE_SEED: u64 = 0;

/// The `scheduler` stage: sets `num_inference_steps`, then steps `sample` with one model output
/// per timestep. Returns the timesteps and the sample after each step. Stochastic schedulers get
/// [`SeededRng`] noise seeded with [`STAGE_NOISE_SEED`]; use [`run_stage_with`] to choose.
///
/// ```no_run
/// use scheduler::HostSample;
/// let x = HostSample::zeros(vec![1, 4, 8, 8]);
/// let outs = vec![HostSample::zeros(vec![1, 4, 8, 8]); 25];
/// let (timesteps, samples) = scheduler::run_stage("sd15/scheduler".as_ref(), &x, &outs, 25)?;
/// # Ok::<(), scheduler::SchedulerError>(())
/// ```
pub fn run_stage(
    dir: &Path,
    sample: &HostSample,
    model_outputs: &[HostSample],
    num_inference_steps: usize,
) -> Result<(Vec<f32>, Vec<HostSample>)> {
    run_stage_with(dir, None, sample, model_outputs, num_inference_steps, &mut SeededRng::new(STAGE_NOISE_SEED))
}

/// [`run_stage`] with a scheduler override name and an explicit noise source.
pub fn run_stage_with(
    dir: &Path,
    override_name: Option<&str>,
    sample: &HostSample,
    model_outputs: &[HostSample],
    num_inference_steps: usize,
    noise: &mut dyn NoiseSource<HostSample>,
) -> Result<(Vec<f32>, Vec<HostSample>)> {
    let mut s = from_dir(dir, override_name)?;
    run_loop(s.as_mut(), sample, model_outputs, num_inference_steps, noise)
}

/// The sampling loop on given model outputs: `set_timesteps`, then per timestep
/// `scale_model_input` (whose result the caller's model would consume) and `step`.
///
/// ```
/// use scheduler::{HostSample, NoNoise, SchedulerConfig};
/// let cfg = SchedulerConfig::from_json_str(r#"{"_class_name": "PNDMScheduler", "skip_prk_steps": true}"#).unwrap();
/// let mut s = scheduler::from_config::<HostSample>(&cfg, None).unwrap();
/// let x = HostSample::zeros(vec![1, 1]);
/// // PNDM runs the model N + 1 times for N steps: 4 outputs are one short for 4 steps.
/// let e = scheduler::run_loop(s.as_mut(), &x, &vec![x.clone(); 4], 4, &mut NoNoise).unwrap_err();
/// assert!(e.to_string().contains("5 timesteps"));
/// ```
pub fn run_loop(
    scheduler: &mut dyn Scheduler<HostSample>,
    sample: &HostSample,
    model_outputs: &[HostSample],
    num_inference_steps: usize,
    noise: &mut dyn NoiseSource<HostSample>,
) -> Result<(Vec<f32>, Vec<HostSample>)> {
    scheduler.set_timesteps(num_inference_steps)?;
    let timesteps = scheduler.timesteps().to_vec();
    if model_outputs.len() != timesteps.len() {
        return Err(SchedulerError::Shape(format!(
            "{} model outputs, but {} with {num_inference_steps} inference steps has {} timesteps; \
             give one model output per timestep",
            model_outputs.len(),
            scheduler.kind().class_name(),
            timesteps.len()
        )));
    }
    if let Some(bad) = model_outputs.iter().find(|m| m.shape != sample.shape) {
        return Err(SchedulerError::Shape(format!(
            "model output {:?} does not match sample {:?}",
            bad.shape, sample.shape
        )));
    }
    let mut x = sample.clone();
    let mut samples = Vec::with_capacity(timesteps.len());
    for (&t, out) in timesteps.iter().zip(model_outputs) {
        scheduler.scale_model_input(&x, t)?;
        x = scheduler.step(out, t, &x, noise)?;
        samples.push(x.clone());
    }
    Ok((timesteps, samples))
}

/// Checks that a model output has the sample's shape (every `step` does, so a wrong tensor is a
/// clear error rather than a panic inside an elementwise op).
pub(crate) fn check_same_shape<S: Sample>(model_output: &S, sample: &S) -> Result<()> {
    let (a, b) = (model_output.shape(), sample.shape());
    if a != b {
        return Err(SchedulerError::Shape(format!("model output {a:?} does not match sample {b:?}")));
    }
    Ok(())
}
