//! `scheduler_config.json`, read the way diffusers' `from_config` reads it.
//!
//! Every scheduler class reads only the keys it knows, each with *its own* default when the key
//! is missing. That is what makes switching classes work as in diffusers: Stable Diffusion 1.5's
//! `PNDMScheduler` config has no `timestep_spacing`, so `EulerDiscreteScheduler` built from it
//! gets Euler's default (`linspace`), not PNDM's (`leading`). Keys listed in
//! `_use_default_values` (written by newer diffusers for values that were defaults when saved)
//! are dropped first, for the same reason. `null` counts as missing.

use std::path::{Path, PathBuf};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// `np.linspace(0, T - 1, N)`, rounded.
    Linspace,
    /// `arange(N) * (T // N) + steps_offset`.
    Leading,
    /// `round(arange(T, 0, -T / N)) - 1`.
    Trailing,
}

/// A parsed `scheduler_config.json`: the raw key/value map plus where it came from (for errors).
///
/// ```
/// use scheduler::SchedulerConfig;
/// let cfg = SchedulerConfig::from_json_str(r#"{"_class_name": "DDIMScheduler", "steps_offset": 1}"#).unwrap();
/// assert_eq!(cfg.class_name(), Some("DDIMScheduler"));
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
        // over, so the class built from this config applies its own defaults.
        if let Some(Value::Array(defaults)) = values.remove("_use_default_values") {
            for key in defaults.iter().filter_map(Value::as_str) {
                values.remove(key);
            }
        }
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

    /// Sets a key, as a keyword argument to diffusers' `from_config` would.
    pub fn set(&mut self, key: &str, value: Value) {
        self.values.insert(key.to_string(), value);
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key).filter(|v| !v.is_null())
    }

    fn type_error(&self, key: &str, expected: &str, found: &Value) -> SchedulerError {
        SchedulerError::Json { path: self.path.clone(), message: format!("`{key}` must be {expected}, found {found}") }
    }

    /// A float key, or `default`.
    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }

    /// A float key, or `None` when missing or null. Python's `Infinity`, `-Infinity` and `NaN`
    /// (which `json.dump` writes, e.g. `lambda_min_clipped: -Infinity`) are accepted.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) if s == NON_FINITE[0].1 => Ok(Some(f64::NEG_INFINITY)),
            Some(Value::String(s)) if s == NON_FINITE[1].1 => Ok(Some(f64::INFINITY)),
            Some(Value::String(s)) if s == NON_FINITE[2].1 => Ok(Some(f64::NAN)),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.type_error(key, "a number", v)),
        }
    }

    /// A non-negative integer key, or `default`. Integer-valued floats (`1000.0`) are accepted.
    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => {
                if let Some(u) = v.as_u64() {
                    return usize::try_from(u).map_err(|_| self.type_error(key, "a small integer", v));
                }
                match v.as_f64() {
                    Some(f) if f >= 0.0 && f.fract() == 0.0 && f < 1e15 => Ok(f as usize),
                    _ => Err(self.type_error(key, "a non-negative integer", v)),
                }
            }
        }
    }

    /// An integer key (may be negative), or `default`.
    pub fn i64_or(&self, key: &str, default: i64) -> Result<i64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => {
                if let Some(i) = v.as_i64() {
                    return Ok(i);
                }
                match v.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => Ok(f as i64),
                    _ => Err(self.type_error(key, "an integer", v)),
                }
            }
        }
    }

    /// A boolean key, or `default`.
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.type_error(key, "true or false", v)),
        }
    }

    /// A string key, or `default`.
    pub fn str_or<'a>(&'a self, key: &str, default: &'a str) -> Result<&'a str> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_str().ok_or_else(|| self.type_error(key, "a string", v)),
        }
    }

    /// A list of numbers (`trained_betas`), or `None`.
    pub fn opt_f64_list(&self, key: &str) -> Result<Option<Vec<f64>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_f64().ok_or_else(|| self.type_error(key, "a list of numbers", v)))
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(self.type_error(key, "a list of numbers", v)),
        }
    }

    /// An error for a key whose value is not one this crate implements.
    pub(crate) fn unsupported(&self, field: &'static str, value: impl Into<String>, expected: &str) -> SchedulerError {
        SchedulerError::Unsupported {
            path: self.path.clone(),
            field,
            value: value.into(),
            expected: expected.to_string(),
        }
    }

    /// An error for a key whose value is out of range.
    pub(crate) fn invalid(&self, field: &'static str, message: impl Into<String>) -> SchedulerError {
        SchedulerError::InvalidField { path: self.path.clone(), field, message: message.into() }
    }

    /// `prediction_type` with the class's default (`epsilon` for all six).
    pub fn prediction_type(&self) -> Result<PredictionType> {
        let s = self.str_or("prediction_type", "epsilon")?;
        PredictionType::parse(s).ok_or_else(|| self.unsupported("prediction_type", s, "epsilon, v_prediction, sample"))
    }

    /// `timestep_spacing` with the given class default.
    pub fn timestep_spacing(&self, default: &str) -> Result<TimestepSpacing> {
        match self.str_or("timestep_spacing", default)? {
            "linspace" => Ok(TimestepSpacing::Linspace),
            "leading" => Ok(TimestepSpacing::Leading),
            "trailing" => Ok(TimestepSpacing::Trailing),
            s => Err(self.unsupported("timestep_spacing", s, "leading, trailing, linspace")),
        }
    }
}

/// Python's non-JSON float literals and the strings they are read as.
const NON_FINITE: [(&str, &str); 3] = [("-Infinity", "\u{0}-inf"), ("Infinity", "\u{0}inf"), ("NaN", "\u{0}nan")];

/// Rewrites the bare tokens `-Infinity`, `Infinity` and `NaN` outside strings (Python's
/// `json.dump` writes them; strict JSON has no such numbers) as marker strings that
/// [`SchedulerConfig::opt_f64`] reads back as floats.
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

    #[test]
    fn python_non_finite_floats_are_read() {
        let cfg = SchedulerConfig::from_json_str(
            r#"{"lambda_min_clipped": -Infinity, "a": Infinity, "b": NaN, "s": "NaN -Infinity"}"#,
        )
        .unwrap();
        assert_eq!(cfg.opt_f64("lambda_min_clipped").unwrap(), Some(f64::NEG_INFINITY));
        assert_eq!(cfg.opt_f64("a").unwrap(), Some(f64::INFINITY));
        assert!(cfg.opt_f64("b").unwrap().unwrap().is_nan());
        assert_eq!(cfg.str_or("s", "").unwrap(), "NaN -Infinity");
    }
}
