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
//! * Each class reads its own typed config ([`DdimConfig`], [`EulerConfig`], ...) from the
//!   same JSON with [`SchedulerConfig::read`], with that class's defaults, as diffusers does.
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

pub use config::{
    BetaConfig, BetaSchedule, DdimConfig, DdpmConfig, DpmSolverConfig, EulerAncestralConfig, EulerConfig, FinalSigmas,
    PndmConfig, PredictionType, SchedulerConfig, SchedulerKind, SigmaSpacing, TimestepSpacing, CLI_NAMES,
};
pub use ddim::Ddim;
pub use ddpm::Ddpm;
pub use dpm_solver::DpmSolverMultistep;
pub use error::{Result, SchedulerError};
pub use euler::Euler;
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

    /// How the inference sigmas are spread (Karras, exponential); the default, interpolated,
    /// is the only choice of the classes without sigma options.
    fn sigma_spacing(&self) -> SigmaSpacing {
        SigmaSpacing::Interpolated
    }

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
        SchedulerKind::EulerAncestral => Box::new(Euler::ancestral_from_config(&cfg)?),
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

/// Checks that a model output has the sample's shape (every `step` does, so a wrong tensor is a
/// clear error rather than a panic inside an elementwise op).
pub(crate) fn check_same_shape<S: Sample>(model_output: &S, sample: &S) -> Result<()> {
    let (a, b) = (model_output.shape(), sample.shape());
    if a != b {
        return Err(SchedulerError::Shape(format!("model output {a:?} does not match sample {b:?}")));
    }
    Ok(())
}

/// Stable Diffusion 1.5's published `scheduler/scheduler_config.json` (PNDM, scaled-linear betas):
/// the scheduler of a model that comes without one (single-file checkpoints, the tiny models).
///
/// ```
/// let cfg = scheduler::SchedulerConfig::from_json_str(scheduler::SD15_SCHEDULER_CONFIG).unwrap();
/// assert_eq!(cfg.class_name(), Some("PNDMScheduler"));
/// ```
pub const SD15_SCHEDULER_CONFIG: &str = r#"{
  "_class_name": "PNDMScheduler",
  "_diffusers_version": "0.35.1",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "clip_sample": false,
  "num_train_timesteps": 1000,
  "prediction_type": "epsilon",
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "timestep_spacing": "leading",
  "trained_betas": null
}
"#;

/// stabilityai/stable-diffusion-xl-base-1.0's `scheduler/scheduler_config.json`: what a SDXL
/// single file without `--config` samples with, as diffusers' `from_single_file` does.
///
/// ```
/// let cfg = scheduler::SchedulerConfig::from_json_str(scheduler::SDXL_SCHEDULER_CONFIG).unwrap();
/// assert_eq!(cfg.class_name(), Some("EulerDiscreteScheduler"));
/// ```
pub const SDXL_SCHEDULER_CONFIG: &str = r#"{
  "_class_name": "EulerDiscreteScheduler",
  "_diffusers_version": "0.19.0.dev0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "clip_sample": false,
  "interpolation_type": "linear",
  "num_train_timesteps": 1000,
  "prediction_type": "epsilon",
  "sample_max_value": 1.0,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "timestep_spacing": "leading",
  "trained_betas": null,
  "use_karras_sigmas": false
}
"#;
