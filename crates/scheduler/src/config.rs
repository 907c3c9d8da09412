//! `scheduler_config.json`, read the way diffusers' `from_config` reads it.
//!
//! Every scheduler class reads only the keys it knows, each with *its own* default when the key
//! is missing. That is what makes switching classes work as in diffusers: Stable Diffusion 1.5's
//! `PNDMScheduler` config has no `timestep_spacing`, so `EulerDiscreteScheduler` built from it
//! gets Euler's default (`linspace`), not PNDM's (`leading`). Keys listed in
//! `_use_default_values` (written by newer diffusers for values that were defaults when saved)
//! are dropped first, for the same reason. `null` counts as missing.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Result, SchedulerError};

/// The scheduler families this crate implements, with their diffusers class and CLI names.
///
/// ```
/// use scheduler::SchedulerKind;
/// assert_eq!(SchedulerKind::from_name("euler-a"), Some(SchedulerKind::EulerAncestral));
/// assert_eq!(SchedulerKind::from_name("DDIMScheduler"), Some(SchedulerKind::Ddim));
/// assert_eq!(SchedulerKind::DpmSolverMultistep.cli_name(), "dpm++2m");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// `DDIMScheduler` (`ddim`).
    Ddim,
    /// `DDPMScheduler` (`ddpm`), stochastic.
    Ddpm,
    /// `PNDMScheduler` (`pndm`), PLMS steps only (`skip_prk_steps`).
    Pndm,
    /// `EulerDiscreteScheduler` (`euler`).
    Euler,
    /// `EulerAncestralDiscreteScheduler` (`euler-a`), stochastic.
    EulerAncestral,
    /// `DPMSolverMultistepScheduler` (`dpm++2m`).
    DpmSolverMultistep,
}

impl SchedulerKind {
    /// All kinds, in the order of [`CLI_NAMES`].
    pub const ALL: [SchedulerKind; 6] = [
        SchedulerKind::Ddim,
        SchedulerKind::Ddpm,
        SchedulerKind::Pndm,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmSolverMultistep,
    ];

    /// The diffusers class name (`_class_name` in the config).
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Ddpm => "DDPMScheduler",
            SchedulerKind::Pndm => "PNDMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::DpmSolverMultistep => "DPMSolverMultistepScheduler",
        }
    }

    /// The short name the CLI takes (`--scheduler euler-a`).
    pub fn cli_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Ddpm => "ddpm",
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::DpmSolverMultistep => "dpm++2m",
        }
    }

    /// Looks up a CLI name or a diffusers class name.
    pub fn from_name(name: &str) -> Option<SchedulerKind> {
        Self::ALL.into_iter().find(|k| k.cli_name() == name || k.class_name() == name)
    }

    /// Whether `step` draws noise (DDPM, Euler ancestral).
    pub fn is_stochastic(self) -> bool {
        matches!(self, SchedulerKind::Ddpm | SchedulerKind::EulerAncestral)
    }
}

/// The CLI names, as accepted by [`crate::from_dir`]'s `override_name`. `dpm++2m-karras` is also
/// accepted: `dpm++2m` with `use_karras_sigmas` forced on.
pub const CLI_NAMES: [&str; 6] = ["ddim", "ddpm", "pndm", "euler", "euler-a", "dpm++2m"];

/// What the model predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The added noise (`epsilon`).
    Epsilon,
    /// The velocity `sqrt(ac) * noise - sqrt(1 - ac) * x0` (`v_prediction`).
    VPrediction,
    /// The clean sample itself (`sample`).
    Sample,
}

impl PredictionType {
    /// Parses the diffusers string.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "epsilon" => Some(PredictionType::Epsilon),
            "v_prediction" => Some(PredictionType::VPrediction),
            "sample" => Some(PredictionType::Sample),
            _ => None,
        }
    }
}

/// How inference timesteps are spread over the training range (`timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// `np.linspace(0, T - 1, N)`, rounded.
    Linspace,
    /// `arange(N) * (T // N) + steps_offset`.
    Leading,
    /// `round(arange(T, 0, -T / N)) - 1`.
    Trailing,
}

/// How the inference sigmas are spread (`use_karras_sigmas`, `use_exponential_sigmas`), for the
/// classes that have the choice (Euler, DPM-Solver).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigmaSpacing {
    /// Interpolated from the training sigmas at the inference timesteps (the default).
    Interpolated,
    /// Karras et al.'s `rho = 7` ramp between sigma_min and sigma_max.
    Karras,
    /// Log-linear between sigma_min and sigma_max.
    Exponential,
}

impl SigmaSpacing {
    /// The spacing two config flags choose; both set is an error, as in diffusers.
    pub(crate) fn from_flags(cfg: &SchedulerConfig, karras: bool, exponential: bool) -> Result<Self> {
        match (karras, exponential) {
            (true, true) => Err(cfg.invalid("use_karras_sigmas", "and `use_exponential_sigmas` cannot both be true")),
            (true, false) => Ok(SigmaSpacing::Karras),
            (false, true) => Ok(SigmaSpacing::Exponential),
            (false, false) => Ok(SigmaSpacing::Interpolated),
        }
    }

    /// The metadata name of a non-default spacing (`karras`, `exponential`).
    pub fn name(self) -> Option<&'static str> {
        match self {
            SigmaSpacing::Interpolated => None,
            SigmaSpacing::Karras => Some("karras"),
            SigmaSpacing::Exponential => Some("exponential"),
        }
    }
}

/// `beta_schedule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// Betas linear from `beta_start` to `beta_end`.
    Linear,
    /// Square roots linear, then squared (Stable Diffusion).
    ScaledLinear,
    /// Glide's cosine schedule.
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
    /// A sigmoid ramp (DDPM only).
    Sigmoid,
}

/// `final_sigmas_type`: the sigma after the last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmas {
    /// 0: the last step denoises fully.
    Zero,
    /// The smallest training sigma.
    SigmaMin,
}

/// The training-schedule keys every class reads, with diffusers' defaults (the same in all six).
///
/// ```
/// use scheduler::{BetaConfig, BetaSchedule, SchedulerConfig};
/// let b: BetaConfig = SchedulerConfig::from_json_str(r#"{"beta_schedule": "scaled_linear"}"#).unwrap().read().unwrap();
/// assert_eq!((b.beta_schedule, b.num_train_timesteps), (BetaSchedule::ScaledLinear, 1000));
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct BetaConfig {
    /// `num_train_timesteps` (1000).
    #[serde(deserialize_with = "de::count")]
    pub num_train_timesteps: usize,
    /// `beta_start` (0.0001).
    #[serde(deserialize_with = "de::float")]
    pub beta_start: f64,
    /// `beta_end` (0.02).
    #[serde(deserialize_with = "de::float")]
    pub beta_end: f64,
    /// `beta_schedule` (`linear`).
    pub beta_schedule: BetaSchedule,
    /// `trained_betas`: the betas themselves, replacing the schedule.
    #[serde(deserialize_with = "de::floats")]
    pub trained_betas: Option<Vec<f64>>,
    /// `rescale_betas_zero_snr` (false; PNDM has no such key and ignores it).
    pub rescale_betas_zero_snr: bool,
}

impl Default for BetaConfig {
    fn default() -> Self {
        BetaConfig {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            rescale_betas_zero_snr: false,
        }
    }
}

/// `DDIMScheduler`'s own keys, with its defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
#[allow(missing_docs)]
pub struct DdimConfig {
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    #[serde(deserialize_with = "de::int")]
    pub steps_offset: i64,
    pub clip_sample: bool,
    #[serde(deserialize_with = "de::float")]
    pub clip_sample_range: f64,
    pub set_alpha_to_one: bool,
    pub thresholding: bool,
}

impl Default for DdimConfig {
    fn default() -> Self {
        DdimConfig {
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
            clip_sample: true,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            thresholding: false,
        }
    }
}

/// `DDPMScheduler`'s own keys, with its defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
#[allow(missing_docs)]
pub struct DdpmConfig {
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    #[serde(deserialize_with = "de::int")]
    pub steps_offset: i64,
    pub clip_sample: bool,
    #[serde(deserialize_with = "de::float")]
    pub clip_sample_range: f64,
    pub variance_type: String,
    pub thresholding: bool,
}

impl Default for DdpmConfig {
    fn default() -> Self {
        DdpmConfig {
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
            clip_sample: true,
            clip_sample_range: 1.0,
            variance_type: "fixed_small".into(),
            thresholding: false,
        }
    }
}

/// `PNDMScheduler`'s own keys, with its defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
#[allow(missing_docs)]
pub struct PndmConfig {
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    #[serde(deserialize_with = "de::int")]
    pub steps_offset: i64,
    pub skip_prk_steps: bool,
    pub set_alpha_to_one: bool,
}

impl Default for PndmConfig {
    fn default() -> Self {
        PndmConfig {
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
            skip_prk_steps: false,
            set_alpha_to_one: false,
        }
    }
}

/// `EulerDiscreteScheduler`'s own keys, with its defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
#[allow(missing_docs)]
pub struct EulerConfig {
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    #[serde(deserialize_with = "de::int")]
    pub steps_offset: i64,
    pub interpolation_type: String,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    #[serde(deserialize_with = "de::opt_float")]
    pub sigma_min: Option<f64>,
    #[serde(deserialize_with = "de::opt_float")]
    pub sigma_max: Option<f64>,
    pub timestep_type: String,
    pub final_sigmas_type: FinalSigmas,
}

impl Default for EulerConfig {
    fn default() -> Self {
        EulerConfig {
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            interpolation_type: "linear".into(),
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            sigma_min: None,
            sigma_max: None,
            timestep_type: "discrete".into(),
            final_sigmas_type: FinalSigmas::Zero,
        }
    }
}

/// `EulerAncestralDiscreteScheduler`'s own keys, with its defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
#[allow(missing_docs)]
pub struct EulerAncestralConfig {
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    #[serde(deserialize_with = "de::int")]
    pub steps_offset: i64,
}

impl Default for EulerAncestralConfig {
    fn default() -> Self {
        EulerAncestralConfig {
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
        }
    }
}

/// `DPMSolverMultistepScheduler`'s own keys, with its defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
#[allow(missing_docs)]
pub struct DpmSolverConfig {
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    #[serde(deserialize_with = "de::int")]
    pub steps_offset: i64,
    #[serde(deserialize_with = "de::count")]
    pub solver_order: usize,
    pub algorithm_type: String,
    pub solver_type: String,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub use_lu_lambdas: bool,
    pub use_flow_sigmas: bool,
    pub use_dynamic_shifting: bool,
    pub thresholding: bool,
    pub final_sigmas_type: FinalSigmas,
    #[serde(deserialize_with = "de::float")]
    pub lambda_min_clipped: f64,
    pub variance_type: Option<String>,
}

impl Default for DpmSolverConfig {
    fn default() -> Self {
        DpmSolverConfig {
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            solver_order: 2,
            algorithm_type: "dpmsolver++".into(),
            solver_type: "midpoint".into(),
            lower_order_final: true,
            euler_at_final: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            use_dynamic_shifting: false,
            thresholding: false,
            final_sigmas_type: FinalSigmas::Zero,
            lambda_min_clipped: f64::NEG_INFINITY,
            variance_type: None,
        }
    }
}

/// A parsed `scheduler_config.json`: the key/value map plus where it came from (for errors).
/// Each class reads its typed config from it with [`SchedulerConfig::read`].
///
/// ```
/// use scheduler::{DdimConfig, SchedulerConfig};
/// let cfg = SchedulerConfig::from_json_str(r#"{"_class_name": "DDIMScheduler", "steps_offset": 1}"#).unwrap();
/// assert_eq!(cfg.class_name(), Some("DDIMScheduler"));
/// assert_eq!(cfg.read::<DdimConfig>().unwrap().steps_offset, 1);
/// ```
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    path: PathBuf,
    values: Map<String, Value>,
}

impl SchedulerConfig {
    /// Reads and parses a config file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| SchedulerError::Io { path: path.to_path_buf(), cause: source })?;
        Self::parse(&text, path.to_path_buf())
    }

    /// Parses a config from a JSON string (errors name `<config>` as the file).
    pub fn from_json_str(text: &str) -> Result<Self> {
        Self::parse(text, PathBuf::from("<config>"))
    }

    fn parse(text: &str, path: PathBuf) -> Result<Self> {
        let text = quote_non_finite(text);
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| SchedulerError::Json { path: path.clone(), message: e.to_string() })?;
        let Value::Object(mut values) = value else {
            return Err(SchedulerError::Json { path, message: "expected a JSON object".into() });
        };
        // As diffusers' extract_init_dict: keys that were defaults when saved are not carried
        // over, so the class built from this config applies its own defaults. `null` counts
        // as missing.
        if let Some(Value::Array(defaults)) = values.remove("_use_default_values") {
            for key in defaults.iter().filter_map(Value::as_str) {
                values.remove(key);
            }
        }
        values.retain(|_, v| !v.is_null());
        Ok(SchedulerConfig { path, values })
    }

    /// The file this config came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `_class_name`, if present and a string.
    pub fn class_name(&self) -> Option<&str> {
        self.values.get("_class_name").and_then(Value::as_str)
    }

    /// The config as JSON (what `scheduler_config.json` of an exported folder holds).
    pub fn to_json(&self) -> Value {
        Value::Object(self.values.clone())
    }

    /// Sets a key, as a keyword argument to diffusers' `from_config` would.
    pub fn set(&mut self, key: &str, value: Value) {
        self.values.insert(key.to_string(), value);
    }

    /// Reads a typed config ([`BetaConfig`], [`DdimConfig`], ...): the keys it knows, its own
    /// defaults for the missing ones. A wrong type names the key; an unknown choice
    /// (`timestep_spacing: "uniform"`) is [`SchedulerError::Unsupported`].
    pub fn read<T: DeserializeOwned>(&self) -> Result<T> {
        serde_path_to_error::deserialize(Value::Object(self.values.clone())).map_err(|e| {
            let field = e.path().to_string();
            let message = e.into_inner().to_string();
            // serde's wording for an unknown enum variant: "unknown variant `x`, expected ...".
            if let (Some(rest), Some(Value::String(value))) =
                (message.strip_prefix("unknown variant `"), self.values.get(&field))
            {
                let expected = rest.split_once("expected ").map_or("", |(_, e)| e);
                let expected = expected.trim_start_matches("one of ").replace('`', "");
                return SchedulerError::Unsupported { path: self.path.clone(), field, value: value.clone(), expected };
            }
            SchedulerError::Json { path: self.path.clone(), message: format!("`{field}`: {message}") }
        })
    }

    /// An error for a key whose value is not one this crate implements.
    pub(crate) fn unsupported(&self, field: &str, value: impl Into<String>, expected: &str) -> SchedulerError {
        SchedulerError::Unsupported {
            path: self.path.clone(),
            field: field.to_string(),
            value: value.into(),
            expected: expected.to_string(),
        }
    }

    /// An error for a key whose value is out of range.
    pub(crate) fn invalid(&self, field: &'static str, message: impl Into<String>) -> SchedulerError {
        SchedulerError::InvalidField { path: self.path.clone(), field, message: message.into() }
    }
}

/// The number readers of the config structs: diffusers' JSON is written by Python.
mod de {
    use serde::de::{Deserialize, Deserializer, Error};
    use serde_json::Value;

    use super::NON_FINITE;

    /// A float; Python's `Infinity`, `-Infinity` and `NaN` (which `json.dump` writes, e.g.
    /// `lambda_min_clipped: -Infinity`) are accepted.
    pub fn float<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) if s == NON_FINITE[0].1 => Ok(f64::NEG_INFINITY),
            Value::String(s) if s == NON_FINITE[1].1 => Ok(f64::INFINITY),
            Value::String(s) if s == NON_FINITE[2].1 => Ok(f64::NAN),
            v => v.as_f64().ok_or_else(|| D::Error::custom(format!("must be a number, found {v}"))),
        }
    }

    pub fn opt_float<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        float(d).map(Some)
    }

    /// A list of numbers (`trained_betas`).
    pub fn floats<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<f64>>, D::Error> {
        match Value::deserialize(d)? {
            Value::Array(items) => items
                .iter()
                .map(|v| v.as_f64().ok_or_else(|| D::Error::custom(format!("must be a list of numbers, found {v}"))))
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            v => Err(D::Error::custom(format!("must be a list of numbers, found {v}"))),
        }
    }

    /// An integer; integer-valued floats (`1000.0`) are accepted.
    pub fn int<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        let v = Value::deserialize(d)?;
        if let Some(i) = v.as_i64() {
            return Ok(i);
        }
        match v.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => Ok(f as i64),
            _ => Err(D::Error::custom(format!("must be an integer, found {v}"))),
        }
    }

    /// A non-negative integer; integer-valued floats are accepted.
    pub fn count<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        let v = Value::deserialize(d)?;
        match v.as_u64().map(|u| u as f64).or_else(|| v.as_f64()) {
            Some(f) if f >= 0.0 && f.fract() == 0.0 && f < 1e15 => Ok(f as usize),
            _ => Err(D::Error::custom(format!("must be a non-negative integer, found {v}"))),
        }
    }
}

/// Python's non-JSON float literals and the strings they are read as.
const NON_FINITE: [(&str, &str); 3] = [("-Infinity", "\u{0}-inf"), ("Infinity", "\u{0}inf"), ("NaN", "\u{0}nan")];

/// Rewrites the bare tokens `-Infinity`, `Infinity` and `NaN` outside strings (Python's
/// `json.dump` writes them; strict JSON has no such numbers) as marker strings that
/// the config structs' float fields read back as floats.
fn quote_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some((token, marker)) = NON_FINITE.iter().find(|(t, _)| rest.starts_with(t)) {
            out.push_str(&serde_json::Value::String((*marker).to_string()).to_string());
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Floats {
        #[serde(deserialize_with = "de::float")]
        lambda_min_clipped: f64,
        #[serde(deserialize_with = "de::float")]
        a: f64,
        #[serde(deserialize_with = "de::float")]
        b: f64,
        s: String,
    }

    #[test]
    fn python_non_finite_floats_are_read() {
        let cfg = SchedulerConfig::from_json_str(
            r#"{"lambda_min_clipped": -Infinity, "a": Infinity, "b": NaN, "s": "NaN -Infinity"}"#,
        )
        .unwrap();
        let f: Floats = cfg.read().unwrap();
        assert_eq!(f.lambda_min_clipped, f64::NEG_INFINITY);
        assert_eq!(f.a, f64::INFINITY);
        assert!(f.b.is_nan());
        assert_eq!(f.s, "NaN -Infinity");
    }

    #[test]
    fn integral_floats_count_and_wrong_types_name_the_key() {
        let cfg = SchedulerConfig::from_json_str(r#"{"num_train_timesteps": 1000.0, "steps_offset": null}"#).unwrap();
        assert_eq!(cfg.read::<BetaConfig>().unwrap().num_train_timesteps, 1000);
        assert_eq!(cfg.read::<DdimConfig>().unwrap().steps_offset, 0, "null is missing");
        let cfg = SchedulerConfig::from_json_str(r#"{"clip_sample": "yes"}"#).unwrap();
        let e = cfg.read::<DdimConfig>().unwrap_err().to_string();
        assert!(e.contains("`clip_sample`") && e.contains("<config>"), "{e}");
    }
}
