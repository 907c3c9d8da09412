//! The generation settings an image carries in its PNG text chunks, and reading them back.
//!
//! Every image we write gets two text chunks:
//!
//! * `parameters` ([`PARAMETERS_KEY`]): the A1111 "infotext" line that AUTOMATIC1111's PNG
//!   info, ComfyUI's importer and civitai parse —
//!   `<prompt>\nNegative prompt: <neg>\nSteps: N, Sampler: …, Schedule type: …, CFG scale: G,
//!   Seed: S, Size: WxH, Model: <name>`;
//! * `personalize` ([`SETTINGS_KEY`]): our complete settings as one JSON object
//!   ([`ImageSettings`]), which `personalize generate --params-from IMAGE` re-runs.
//!
//! (No chunk is named `prompt`: ComfyUI reads a `prompt` chunk as its workflow JSON.)
//! Texts that are not Latin-1 are written as UTF-8 `iTXt` chunks ([`crate::write_png`]).

use std::path::{Component, Path};

use crate::{Error, Result};
use scheduler::{HostSample, SchedulerConfig, SchedulerKind};
use serde::{Deserialize, Serialize};

/// The keyword of the text chunk with our settings JSON.
pub const SETTINGS_KEY: &str = "personalize";
/// The keyword of the A1111-style text chunk.
pub const PARAMETERS_KEY: &str = "parameters";

fn one() -> usize {
    1
}

/// What made an image: everything `personalize generate` needs to make it again. Serialized
/// as the JSON of the `personalize` text chunk; paths are as they were given (after preset
/// resolution).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageSettings {
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: Option<String>,
    pub seed: u64,
    pub steps: usize,
    pub guidance: f64,
    /// The `--scheduler` name given; `None`: the model's own (see `scheduler_class`).
    #[serde(default)]
    pub scheduler: Option<String>,
    /// The diffusers class of the scheduler that ran (`PNDMScheduler`, ...).
    #[serde(default)]
    pub scheduler_class: Option<String>,
    /// Its sigma schedule when not the class's default: `karras` or `exponential`.
    #[serde(default)]
    pub sigmas: Option<String>,
    #[serde(default)]
    pub height: Option<usize>,
    #[serde(default)]
    pub width: Option<usize>,
    /// SDXL's size conditioning, when given (`--original-size`, `--crop-top-left`,
    /// `--target-size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_size: Option<[usize; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crop_top_left: Option<[usize; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_size: Option<[usize; 2]>,
    /// The base model folder.
    #[serde(default)]
    pub base: Option<String>,
    /// Single-file bases: the `--config` folder and the `--prediction-type` given, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction_type: Option<String>,
    /// LoRAs merged into the base (`--lora`), as `FILE:SCALE`, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<String>,
    /// The concept folder, if any.
    #[serde(default)]
    pub concept: Option<String>,
    /// Reference images of the visual prompt (`--image`), if any, and the BLIP-2 model.
    #[serde(default)]
    pub images: Vec<String>,
    #[serde(default)]
    pub blip2: Option<String>,
    /// The `--latents` file, if the initial noise came from one instead of the seed.
    #[serde(default)]
    pub latents: Option<String>,
    /// How many images the run made, and which of them this is (from 0): image `i`'s initial
    /// noise is the `i`-th slice of the seed's stream.
    #[serde(default = "one")]
    pub num_images: usize,
    #[serde(default)]
    pub image_index: usize,
    /// Images per UNet batch (ancestral schedulers draw their step noise per batch). Images
    /// written before batching record none: they were one batch of `num_images`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// For training sample images: the training step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_step: Option<usize>,
}

impl Default for ImageSettings {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: None,
            seed: 0,
            steps: 50,
            guidance: 7.5,
            scheduler: None,
            scheduler_class: None,
            sigmas: None,
            height: None,
            width: None,
            original_size: None,
            crop_top_left: None,
            target_size: None,
            base: None,
            config: None,
            prediction_type: None,
            loras: Vec::new(),
            concept: None,
            images: Vec::new(),
            blip2: None,
            latents: None,
            num_images: 1,
            image_index: 0,
            batch_size: None,
            training_step: None,
        }
    }
}

/// The diffusers class and the non-default sigma schedule (`karras`, `exponential`) of the
/// scheduler that `cfg` with `override_name` (a `--scheduler` name) builds, as
/// [`scheduler::from_config`] does; its errors are those of the pipeline.
///
/// ```
/// let cfg = scheduler::SchedulerConfig::from_json_str(r#"{"_class_name": "PNDMScheduler"}"#).unwrap();
/// let (class, sigmas) = personalize::scheduler_in_use(&cfg, Some("dpm++2m-karras"))?;
/// assert_eq!((class.as_str(), sigmas.as_deref()), ("DPMSolverMultistepScheduler", Some("karras")));
/// # Ok::<(), personalize::Error>(())
/// ```
pub fn scheduler_in_use(cfg: &SchedulerConfig, override_name: Option<&str>) -> Result<(String, Option<String>)> {
    let s = scheduler::from_config::<HostSample>(cfg, override_name)?;
    let sigmas = s.sigma_spacing().name().map(str::to_string);
    let kind = s.kind();
    Ok((kind.class_name().to_string(), sigmas))
}

/// A1111's name of a scheduler family.
fn a1111_sampler(kind: SchedulerKind) -> &'static str {
    match kind {
        SchedulerKind::Ddim => "DDIM",
        SchedulerKind::Ddpm => "DDPM",
        SchedulerKind::Pndm => "PLMS",
        SchedulerKind::Euler => "Euler",
        SchedulerKind::EulerAncestral => "Euler a",
        SchedulerKind::DpmSolverMultistep => "DPM++ 2M",
    }
}

/// Our `--scheduler` name for an A1111 sampler and schedule type, where there is one.
fn scheduler_from_a1111(sampler: &str, schedule_type: Option<&str>) -> Option<String> {
    let (sampler, karras) = match sampler.strip_suffix(" Karras") {
        Some(s) => (s, true),
        None => (sampler, schedule_type == Some("Karras")),
    };
    let kind = SchedulerKind::ALL.into_iter().find(|k| a1111_sampler(*k) == sampler)?;
    Some(match kind {
        SchedulerKind::DpmSolverMultistep if karras => "dpm++2m-karras".to_string(),
        k => k.cli_name().to_string(),
    })
}

/// A value in an A1111 parameters line: JSON-quoted when it holds `,`, `:` or a newline
/// (A1111's `quote`).
fn quote(v: &str) -> String {
    if v.contains([',', ':', '\n']) {
        serde_json::to_string(v).unwrap_or_else(|_| v.to_string())
    } else {
        v.to_string()
    }
}

/// The name of a base model folder: the repository name of a Hugging Face cache snapshot
/// (`…/models--owner--name/snapshots/<commit>`), else the folder's own name.
///
/// ```
/// use std::path::Path;
/// assert_eq!(personalize::model_name(Path::new("assets/tiny-sd")).as_deref(), Some("tiny-sd"));
/// let snap = Path::new("/hf/hub/models--runwayml--stable-diffusion-v1-5/snapshots/451f4fe");
/// assert_eq!(personalize::model_name(snap).as_deref(), Some("stable-diffusion-v1-5"));
/// ```
pub fn model_name(base: &Path) -> Option<String> {
    let hub = base.components().rev().find_map(|c| match c {
        Component::Normal(s) => {
            s.to_str().and_then(|s| s.strip_prefix("models--")).and_then(|r| r.rsplit("--").next()).map(str::to_string)
        }
        _ => None,
    });
    hub.or_else(|| base.file_name().map(|n| n.to_string_lossy().into_owned()))
        .or_else(|| base.canonicalize().ok()?.file_name().map(|n| n.to_string_lossy().into_owned()))
}

impl ImageSettings {
    /// The A1111 parameters text:
    /// `<prompt>\nNegative prompt: <neg>\nSteps: N, Sampler: …, Schedule type: …, CFG scale: G,
    /// Seed: S, Size: WxH, Model: <name>`. The negative-prompt line is left out when there is
    /// none, and `Size` / `Model` when unknown, as A1111 does.
    ///
    /// ```
    /// let s = personalize::ImageSettings {
    ///     prompt: "a fox".into(), seed: 3, steps: 20, guidance: 7.5, scheduler: Some("euler-a".into()),
    ///     height: Some(512), width: Some(768), base: Some("models/sd15".into()), ..Default::default()
    /// };
    /// assert_eq!(s.to_a1111_parameters(),
    ///     "a fox\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.5, Seed: 3, Size: 768x512, Model: sd15");
    /// ```
    pub fn to_a1111_parameters(&self) -> String {
        let kind = self.scheduler_class.as_deref().and_then(SchedulerKind::from_name).or_else(|| {
            self.scheduler.as_deref().and_then(|s| SchedulerKind::from_name(s.strip_suffix("-karras").unwrap_or(s)))
        });
        let sampler = match (kind, &self.scheduler_class) {
            (Some(k), _) => a1111_sampler(k).to_string(),
            (None, Some(class)) => class.clone(),
            (None, None) => "Automatic".to_string(),
        };
        let karras = self.sigmas.as_deref() == Some("karras") || self.scheduler.as_deref() == Some("dpm++2m-karras");
        let schedule = if karras {
            "Karras"
        } else if self.sigmas.as_deref() == Some("exponential") {
            "Exponential"
        } else {
            "Automatic"
        };
        let mut s = self.prompt.clone();
        if let Some(neg) = self.negative_prompt.as_deref().filter(|n| !n.is_empty()) {
            s.push_str("\nNegative prompt: ");
            s.push_str(neg);
        }
        s.push_str(&format!(
            "\nSteps: {}, Sampler: {}, Schedule type: {schedule}, CFG scale: {}, Seed: {}",
            self.steps,
            quote(&sampler),
            self.guidance,
            self.seed
        ));
        if let (Some(h), Some(w)) = (self.height, self.width) {
            s.push_str(&format!(", Size: {w}x{h}"));
        }
        if let Some(m) = self.base.as_deref().and_then(|b| model_name(Path::new(b))) {
            s.push_str(&format!(", Model: {}", quote(&m)));
        }
        s
    }

    /// The settings as the JSON of the `personalize` chunk.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string(self).map_err(|e| Error::invalid(format!("image settings: {e}")))
    }

    /// Parses the JSON of a `personalize` chunk.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text)
            .map_err(|e| Error::invalid(format!("the `{SETTINGS_KEY}` text chunk is not valid settings JSON: {e}")))
    }

    /// The text chunks for [`crate::write_png`]: `parameters` and `personalize`.
    pub fn png_text(&self) -> Result<Vec<(&'static str, String)>> {
        Ok(vec![(PARAMETERS_KEY, self.to_a1111_parameters()), (SETTINGS_KEY, self.to_json()?)])
    }

    /// Parses A1111 parameters text, as A1111's `parse_generation_parameters`: the prompt lines,
    /// the `Negative prompt:` lines, and the `Key: value, ...` last line (prompt, negative
    /// prompt, steps, CFG scale, seed, size, and the sampler where it maps to one of ours).
    ///
    /// ```
    /// let s = personalize::ImageSettings::from_a1111_parameters(
    ///     "a fox\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 42, Size: 512x768, Model: sd15",
    /// )?;
    /// assert_eq!((s.prompt.as_str(), s.negative_prompt.as_deref()), ("a fox", Some("blurry")));
    /// assert_eq!((s.steps, s.guidance, s.seed, s.width, s.height), (20, 7.0, 42, Some(512), Some(768)));
    /// assert_eq!(s.scheduler.as_deref(), Some("dpm++2m-karras"));
    /// # Ok::<(), personalize::Error>(())
    /// ```
    pub fn from_a1111_parameters(text: &str) -> Result<Self> {
        let mut lines: Vec<&str> = text.trim().split('\n').collect();
        let last = lines.pop().unwrap_or_default();
        let params = match parse_param_line(last) {
            Some(p) if p.len() >= 3 => p,
            _ => {
                lines.push(last);
                Vec::new()
            }
        };
        let (mut prompt, mut negative, mut in_negative) = (Vec::new(), Vec::new(), false);
        for line in lines {
            let mut line = line.trim();
            if let Some(rest) = line.strip_prefix("Negative prompt:") {
                in_negative = true;
                line = rest.trim();
            }
            let part = if in_negative { &mut negative } else { &mut prompt };
            part.push(line);
        }
        let get = |k: &str| params.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        let bad = |k: &str, v: &str| Error::invalid(format!("A1111 parameters: `{k}: {v}` is not a valid value"));
        let need = |k: &str| get(k).ok_or_else(|| Error::invalid(format!("A1111 parameters have no `{k}:`")));
        let steps = need("Steps")?;
        let cfg = need("CFG scale")?;
        let seed = need("Seed")?;
        let size = match get("Size") {
            Some(v) => {
                let parsed: Option<(usize, usize)> =
                    v.split_once('x').and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)));
                Some(parsed.ok_or_else(|| bad("Size", v))?)
            }
            None => None,
        };
        Ok(Self {
            prompt: prompt.join("\n"),
            negative_prompt: in_negative.then(|| negative.join("\n")),
            seed: seed.parse().map_err(|_| bad("Seed", seed))?,
            steps: steps.parse().map_err(|_| bad("Steps", steps))?,
            guidance: cfg.parse().map_err(|_| bad("CFG scale", cfg))?,
            scheduler: get("Sampler").and_then(|s| {
                let ours = scheduler_from_a1111(s, get("Schedule type"));
                if ours.is_none() {
                    tracing::warn!("A1111 sampler `{s}` has no equivalent here; using the model's scheduler");
                }
                ours
            }),
            width: size.map(|(w, _)| w),
            height: size.map(|(_, h)| h),
            ..Default::default()
        })
    }

    /// The settings of an image we wrote (its `personalize` chunk), or, for an image without
    /// one, those of its A1111 `parameters` chunk (as A1111's PNG info reads them).
    pub fn from_png(path: &Path) -> Result<Self> {
        let text = crate::image_out::read_png_text(path)?;
        let get = |k: &str| text.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        let with_path = |e: Error| Error::invalid(format!("{}: {e}", path.display()));
        if let Some(json) = get(SETTINGS_KEY) {
            return Self::from_json(json).map_err(with_path);
        }
        if let Some(params) = get(PARAMETERS_KEY) {
            return Self::from_a1111_parameters(params).map_err(with_path);
        }
        Err(Error::invalid(format!(
            "{} has no `{SETTINGS_KEY}` settings (no `{SETTINGS_KEY}` or A1111 `{PARAMETERS_KEY}` text chunk)",
            path.display()
        )))
    }
}

/// The `Key: value` pairs of an A1111 parameters line (A1111's `re_param`), or `None` when it
/// is not one (a key that is not `\w[\w \-/]+`, an unterminated quote).
fn parse_param_line(line: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = line.trim_start();
    while !rest.is_empty() {
        let colon = rest.find(':')?;
        let key = rest[..colon].trim_end();
        let mut chars = key.chars();
        let word = |c: char| c.is_alphanumeric() || c == '_';
        if !chars.next().is_some_and(word)
            || key.chars().count() < 2
            || !chars.all(|c| word(c) || matches!(c, ' ' | '-' | '/'))
        {
            return None;
        }
        rest = rest[colon + 1..].trim_start();
        let value = if rest.starts_with('"') {
            // A JSON string: up to the first unescaped quote.
            let mut escaped = false;
            let end = rest.char_indices().skip(1).find(|&(_, c)| {
                let close = c == '"' && !escaped;
                escaped = c == '\\' && !escaped;
                close
            })?;
            let quoted = &rest[..end.0 + 1];
            rest = &rest[end.0 + 1..];
            serde_json::from_str::<String>(quoted).ok()?
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            let v = rest[..end].trim().to_string();
            rest = &rest[end..];
            v
        };
        out.push((key.to_string(), value));
        rest = rest.trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ImageSettings {
        ImageSettings {
            prompt: "sks の水彩画 🎨".into(),
            negative_prompt: Some("lowres, blurry".into()),
            seed: 1234,
            steps: 25,
            guidance: 7.5,
            scheduler: None,
            scheduler_class: Some("PNDMScheduler".into()),
            sigmas: None,
            height: Some(512),
            width: Some(768),
            original_size: Some([1024, 1536]),
            crop_top_left: None,
            target_size: Some([512, 768]),
            base: Some("/models/stable-diffusion-v1-5".into()),
            config: None,
            prediction_type: None,
            loras: vec!["/loras/ink.safetensors:0.6".into()],
            concept: Some("concepts/猫".into()),
            images: vec!["ref.png".into()],
            blip2: Some("blip2".into()),
            latents: None,
            num_images: 4,
            image_index: 2,
            batch_size: Some(2),
            training_step: None,
        }
    }

    #[test]
    fn parameters_text_is_exactly_a1111s_format() {
        let s = settings();
        assert_eq!(
            s.to_a1111_parameters(),
            "sks の水彩画 🎨\nNegative prompt: lowres, blurry\nSteps: 25, Sampler: PLMS, Schedule type: Automatic, CFG scale: 7.5, Seed: 1234, Size: 768x512, Model: stable-diffusion-v1-5"
        );
        let plain = ImageSettings { negative_prompt: None, guidance: 5.0, ..s.clone() };
        assert_eq!(
            plain.to_a1111_parameters(),
            "sks の水彩画 🎨\nSteps: 25, Sampler: PLMS, Schedule type: Automatic, CFG scale: 5, Seed: 1234, Size: 768x512, Model: stable-diffusion-v1-5"
        );
        assert!(!ImageSettings { negative_prompt: Some(String::new()), ..s.clone() }
            .to_a1111_parameters()
            .contains("Negative prompt"));
        let cases = [
            (Some("ddim"), "DDIMScheduler", None, "Sampler: DDIM, Schedule type: Automatic"),
            (Some("ddpm"), "DDPMScheduler", None, "Sampler: DDPM, Schedule type: Automatic"),
            (Some("pndm"), "PNDMScheduler", None, "Sampler: PLMS, Schedule type: Automatic"),
            (Some("euler"), "EulerDiscreteScheduler", None, "Sampler: Euler, Schedule type: Automatic"),
            (None, "EulerDiscreteScheduler", Some("karras"), "Sampler: Euler, Schedule type: Karras"),
            (Some("euler-a"), "EulerAncestralDiscreteScheduler", None, "Sampler: Euler a, Schedule type: Automatic"),
            (Some("dpm++2m"), "DPMSolverMultistepScheduler", None, "Sampler: DPM++ 2M, Schedule type: Automatic"),
            (
                Some("dpm++2m-karras"),
                "DPMSolverMultistepScheduler",
                Some("karras"),
                "Sampler: DPM++ 2M, Schedule type: Karras",
            ),
            (None, "DPMSolverMultistepScheduler", Some("exponential"), "Sampler: DPM++ 2M, Schedule type: Exponential"),
        ];
        for (name, class, sigmas, want) in cases {
            let s = ImageSettings {
                scheduler: name.map(str::to_string),
                scheduler_class: Some(class.into()),
                sigmas: sigmas.map(str::to_string),
                ..s.clone()
            };
            assert!(s.to_a1111_parameters().contains(want), "{name:?}: {}", s.to_a1111_parameters());
        }
        let odd =
            ImageSettings { scheduler_class: Some("LMSDiscreteScheduler".into()), base: Some("a, b: c".into()), ..s };
        assert!(odd.to_a1111_parameters().ends_with("Sampler: LMSDiscreteScheduler, Schedule type: Automatic, CFG scale: 7.5, Seed: 1234, Size: 768x512, Model: \"a, b: c\""));
    }

    #[test]
    fn settings_json_round_trips_and_old_fields_default() {
        let s = settings();
        let json = s.to_json().unwrap();
        assert!(json.contains("sks の水彩画 🎨"), "UTF-8 as is: {json}");
        assert_eq!(ImageSettings::from_json(&json).unwrap(), s);
        let t = ImageSettings { training_step: Some(100), ..s };
        assert_eq!(ImageSettings::from_json(&t.to_json().unwrap()).unwrap(), t);
        let min = ImageSettings::from_json(
            r#"{"prompt": "x", "seed": 1, "steps": 2, "guidance": 3.0, "future_field": true}"#,
        )
        .unwrap();
        assert_eq!((min.num_images, min.image_index, min.height), (1, 0, None));
        let err = ImageSettings::from_json(r#"{"prompt": 1}"#).unwrap_err().to_string();
        assert!(err.contains("personalize") && err.contains("JSON"), "{err}");
    }

    #[test]
    fn a1111_parameters_parse_back() {
        let s = settings();
        let back = ImageSettings::from_a1111_parameters(&s.to_a1111_parameters()).unwrap();
        assert_eq!(
            (back.prompt.as_str(), back.negative_prompt.as_deref()),
            ("sks の水彩画 🎨", Some("lowres, blurry"))
        );
        assert_eq!(
            (back.steps, back.guidance, back.seed, back.width, back.height),
            (25, 7.5, 1234, Some(768), Some(512))
        );
        assert_eq!(back.scheduler.as_deref(), Some("pndm"));
        // Multi-line prompts, quoted values, A1111's other fields, no negative prompt.
        let a = "line one\nline two\nSteps: 30, Sampler: Euler a, Schedule type: Automatic, CFG scale: 6.5, Seed: 7, Size: 640x448, \
                 Model hash: abc123, Model: \"x, y\", Lora hashes: \"a: 1, b: 2\", Version: v1.10.1";
        let p = ImageSettings::from_a1111_parameters(a).unwrap();
        assert_eq!((p.prompt.as_str(), p.negative_prompt.as_deref()), ("line one\nline two", None));
        assert_eq!((p.steps, p.guidance, p.seed, p.width, p.height), (30, 6.5, 7, Some(640), Some(448)));
        assert_eq!(p.scheduler.as_deref(), Some("euler-a"));
        let k = ImageSettings::from_a1111_parameters(
            "p\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1",
        )
        .unwrap();
        assert_eq!((k.scheduler.as_deref(), k.height), (Some("dpm++2m-karras"), None));
        let u = ImageSettings::from_a1111_parameters("p\nSteps: 3, Sampler: UniPC, CFG scale: 7, Seed: 1").unwrap();
        assert_eq!(u.scheduler, None);
        let e = ImageSettings::from_a1111_parameters("just a prompt").unwrap_err().to_string();
        assert!(e.contains("Steps"), "{e}");
        let e = ImageSettings::from_a1111_parameters("p\nSteps: many, CFG scale: 7, Seed: 1").unwrap_err().to_string();
        assert!(e.contains("Steps: many"), "{e}");
    }

    #[test]
    fn settings_come_back_from_png_chunks() {
        let d = tempfile::tempdir().unwrap();
        let img = crate::RgbImage { width: 1, height: 1, data: vec![0, 0, 0] };
        let s = settings();
        let ours = d.path().join("ours.png");
        crate::write_png(&ours, &img, &s.png_text().unwrap()).unwrap();
        assert_eq!(ImageSettings::from_png(&ours).unwrap(), s);
        let (_, text) = crate::read_png(&ours).unwrap();
        assert_eq!(text.iter().filter(|(k, _)| k == PARAMETERS_KEY || k == SETTINGS_KEY).count(), 2);
        assert!(!text.iter().any(|(k, _)| k == "prompt"), "ComfyUI reads `prompt` as a workflow");

        let a1111 = d.path().join("a1111.png");
        crate::write_png(
            &a1111,
            &img,
            &[(PARAMETERS_KEY, "a cat\nSteps: 4, Sampler: DDIM, CFG scale: 3, Seed: 9, Size: 64x32".into())],
        )
        .unwrap();
        let p = ImageSettings::from_png(&a1111).unwrap();
        assert_eq!(
            (p.prompt.as_str(), p.steps, p.seed, p.scheduler.as_deref(), p.base),
            ("a cat", 4, 9, Some("ddim"), None)
        );

        let none = d.path().join("none.png");
        crate::write_png(&none, &img, &[("Title", "x".into())]).unwrap();
        let e = ImageSettings::from_png(&none).unwrap_err().to_string();
        assert!(e.contains("none.png") && e.contains("no `personalize` settings"), "{e}");
    }

    #[test]
    fn the_scheduler_in_use_follows_the_config_and_the_override() {
        let cfg = |json: &str| SchedulerConfig::from_json_str(json).unwrap();
        let pndm = cfg(r#"{"_class_name": "PNDMScheduler", "skip_prk_steps": true}"#);
        assert_eq!(scheduler_in_use(&pndm, None).unwrap(), ("PNDMScheduler".into(), None));
        assert_eq!(
            scheduler_in_use(&pndm, Some("dpm++2m-karras")).unwrap(),
            ("DPMSolverMultistepScheduler".into(), Some("karras".into()))
        );
        assert!(scheduler_in_use(&pndm, Some("heun")).unwrap_err().to_string().contains("heun"));
        let euler = cfg(r#"{"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": true}"#);
        assert_eq!(scheduler_in_use(&euler, None).unwrap(), ("EulerDiscreteScheduler".into(), Some("karras".into())));
        assert_eq!(
            scheduler_in_use(&euler, Some("ddim")).unwrap(),
            ("DDIMScheduler".into(), None),
            "DDIM has no sigmas"
        );
    }
}
