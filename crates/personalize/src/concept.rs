//! Concept folders: what `personalize train` writes and `personalize generate --concept` reads.

use std::path::{Path, PathBuf};

use crate::{Error, Result};
use burn::tensor::{backend::Backend, Tensor};
use q_aligner::Aligner;
use serde::{Deserialize, Serialize};

/// `concept.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConceptInfo {
    /// Format version of the folder.
    pub version: u32,
    /// The base model folder (or single file) the concept was trained on.
    pub base_model: String,
    /// A single-file base's `--config` folder and `--prediction-type`, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_config: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction_type: Option<String>,
    /// [`model_io::Checkpoint::fingerprint`] of the base UNet's weights.
    pub base_unet_fingerprint: String,
    /// The base's architecture ([`crate::Pipeline::architecture`]): `sd` (1.x/2.x) or `sdxl`;
    /// concepts written before it was recorded are `sd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    /// Visual tokens (`k`).
    pub num_queries: usize,
    /// `first` or `pool`.
    pub query_selection: String,
    /// The training prompt.
    #[serde(default)]
    pub prompt: Option<String>,
    /// What the concept changes in the UNet: `lora`, `full` or `frozen`.
    pub unet: UnetChange,
    #[serde(default)]
    pub lora_rank: Option<usize>,
    #[serde(default)]
    pub lora_alpha: Option<f64>,
    /// Training settings as given (learning rate, resolution, ...).
    #[serde(default)]
    pub training: serde_json::Value,
    #[serde(default)]
    pub steps_done: usize,
    #[serde(default)]
    pub final_loss: Option<f64>,
}

/// A concept's change to the base UNet (`concept.json`'s `unet`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnetChange {
    /// LoRA adapters, in `unet_lora.safetensors`.
    Lora,
    /// Full fine-tuned weights, in `unet/`.
    Full,
    /// None: the aligner alone.
    Frozen,
}

impl UnetChange {
    /// The name in `concept.json`.
    ///
    /// ```
    /// assert_eq!(personalize::UnetChange::Lora.as_str(), "lora");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            UnetChange::Lora => "lora",
            UnetChange::Full => "full",
            UnetChange::Frozen => "frozen",
        }
    }
}

/// The `concept.json` format version this release writes and reads.
pub const CONCEPT_VERSION: u32 = 1;

impl ConceptInfo {
    /// Checks the settings against the files beside `concept.json`: the version, the query
    /// selection, `num_queries` against the aligner, and the UNet mode against the files (a
    /// `frozen` concept with a LoRA or UNet beside it would silently drop them; `lora_rank`
    /// against the LoRA's `lora_A` tensors).
    pub fn check_files<B: Backend>(&self, dir: &Path, aligner: &Aligner<B>) -> Result<()> {
        let path = dir.join("concept.json");
        let bad = |message: String| Err(Error::Config { path: path.clone(), message });
        if self.version != CONCEPT_VERSION {
            return bad(format!(
                "version {} is not one this release reads (it reads {CONCEPT_VERSION}){}",
                self.version,
                if self.version > CONCEPT_VERSION { "; made by a newer release?" } else { "" }
            ));
        }
        if q_aligner::QuerySelection::parse(&self.query_selection).is_err() {
            return bad(format!("query_selection `{}` unknown (first or pool)", self.query_selection));
        }
        let settings = aligner.settings();
        if self.num_queries != settings.num_queries {
            let aligner_file = dir.join("aligner.safetensors");
            let recorded = model_io::tensor_file::read_tensors_with_metadata(&aligner_file)
                .map(|(_, m)| m.contains_key("num_queries"))
                .unwrap_or(true);
            let source = if recorded {
                "its metadata's num_queries".to_string()
            } else {
                format!(
                    "the default: it has no num_queries metadata; {} was not written by personalize train?",
                    aligner_file.display()
                )
            };
            return bad(format!(
                "num_queries is {}, but aligner.safetensors makes {} visual tokens ({source})",
                self.num_queries, settings.num_queries
            ));
        }
        if self.query_selection != settings.query_selection.as_str() {
            return bad(format!(
                "query_selection is `{}`, but aligner.safetensors records `{}`",
                self.query_selection,
                settings.query_selection.as_str()
            ));
        }
        let lora = dir.join("unet_lora.safetensors");
        let full = dir.join("unet");
        match self.unet {
            UnetChange::Full if lora.exists() => {
                return bad(format!(
                    "unet is `full`, but {} is beside it and would be ignored; remove it or set unet to `lora`",
                    lora.display()
                ));
            }
            UnetChange::Lora if full.exists() => {
                return bad(format!(
                    "unet is `lora`, but {} is beside it and would be ignored; remove it or set unet to `full`",
                    full.display()
                ));
            }
            UnetChange::Frozen if lora.exists() || full.exists() => {
                let found = if lora.exists() { &lora } else { &full };
                return bad(format!(
                    "unet is `frozen`, but {} is beside it and would be ignored; set unet to `{}` or remove it",
                    found.display(),
                    if lora.exists() { "lora" } else { "full" }
                ));
            }
            UnetChange::Lora => {
                if !lora.is_file() {
                    return bad(format!("unet is `lora`, but {} is missing", lora.display()));
                }
                if let Some(rank) = self.lora_rank {
                    let ckpt =
                        model_io::Checkpoint::open_files(&lora.display().to_string(), std::slice::from_ref(&lora))?;
                    for name in ckpt.names() {
                        let shape = ckpt.info(name).map(|i| i.shape.clone()).unwrap_or_default();
                        if name.contains("lora_A") && shape.first() != Some(&rank) {
                            return bad(format!(
                                "lora_rank is {rank}, but {} holds `{name}` of shape {shape:?} (rank {})",
                                lora.display(),
                                shape.first().copied().unwrap_or(0)
                            ));
                        }
                    }
                }
            }
            UnetChange::Full if !full.join("config.json").is_file() => {
                return bad(format!("unet is `full`, but {} is missing", full.join("config.json").display()));
            }
            _ => {}
        }
        Ok(())
    }
}

/// A loaded concept: its settings, aligner and cached BLIP-2 queries.
pub struct Concept<B: Backend> {
    pub dir: PathBuf,
    pub info: ConceptInfo,
    pub aligner: Aligner<B>,
    /// `[N, Q, 768]`: the queries of the N training images, if the folder has them.
    pub queries: Option<Tensor<B, 3>>,
}

impl<B: Backend> Concept<B> {
    /// Reads `dir/concept.json`, `dir/aligner.safetensors` and, when present,
    /// `dir/visual_queries.safetensors` (tensor `queries`).
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        let info: ConceptInfo = model_io::read_config(dir, "concept.json")?;
        let aligner = Aligner::load(&dir.join("aligner.safetensors"), device)?;
        info.check_files(dir, &aligner)?;
        if let Some(p) = crate::check::first_nonfinite_param::<B, _>(&aligner) {
            return Err(Error::invalid(format!(
                "{}: the aligner's weight `{p}` holds NaN or Inf; the file is damaged",
                dir.join("aligner.safetensors").display()
            )));
        }
        let qpath = dir.join("visual_queries.safetensors");
        let queries = if qpath.is_file() {
            let mut t = model_io::tensor_file::read_tensors(&qpath)?;
            let q = model_io::tensor_file::take(&mut t, &qpath, "queries")?
                .to_float::<B, 3>("queries", device)
                .map_err(|e| Error::invalid(format!("{}: {e}", qpath.display())))?;
            let [n, k, d] = q.dims();
            if k < aligner.num_queries() && aligner.settings().query_selection == q_aligner::QuerySelection::First {
                return Err(Error::invalid(format!(
                    "{}: tensor `queries` holds {k} queries per image; the aligner takes the first {}",
                    qpath.display(),
                    aligner.num_queries()
                )));
            }
            if n == 0 || k == 0 || d != aligner.query_dim() {
                return Err(Error::invalid(format!(
                    "{}: tensor `queries` has shape [{n}, {k}, {d}]; expected [N >= 1, Q >= 1, {}]",
                    qpath.display(),
                    aligner.query_dim()
                )));
            }
            if !crate::check::all_finite(&q) {
                return Err(Error::NonFinite(format!("{}: tensor `queries` holds NaN or Inf", qpath.display())));
            }
            let max: f64 = burn::tensor::ElementConversion::elem(q.clone().abs().max().into_scalar());
            if max > 1e4 {
                return Err(Error::invalid(format!(
                    "{}: tensor `queries` reaches {max:.1e}, not BLIP-2 output (a few units at most)",
                    qpath.display()
                )));
            }
            Some(q)
        } else {
            None
        };
        Ok(Self { dir: dir.to_path_buf(), info, aligner, queries })
    }

    /// Writes `concept.json` atomically.
    pub fn write_info(dir: &Path, info: &ConceptInfo) -> Result<()> {
        let text = serde_json::to_string_pretty(info).map_err(|e| Error::invalid(e.to_string()))?;
        Ok(model_io::write_atomic(&dir.join("concept.json"), text.as_bytes())?)
    }
}
