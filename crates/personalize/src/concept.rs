//! Concept folders: what `personalize train` writes and `personalize generate --concept` reads.

use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, Tensor};
use model_io::{Error, Result};
use q_aligner::Aligner;
use serde::{Deserialize, Serialize};

/// `concept.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConceptInfo {
    /// Format version of the folder.
    pub version: u32,
    /// The base model folder the concept was trained on.
    pub base_model: String,
    /// [`model_io::Checkpoint::fingerprint`] of the base UNet's weights.
    pub base_unet_fingerprint: String,
    /// Visual tokens (`k`).
    pub num_queries: usize,
    /// `first` or `pool`.
    pub query_selection: String,
    /// The training prompt.
    #[serde(default)]
    pub prompt: Option<String>,
    /// `lora` (unet_lora.safetensors), `full` (unet/), or `frozen` (aligner only).
    pub unet: String,
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
        if !matches!(info.unet.as_str(), "lora" | "full" | "frozen") {
            return Err(Error::Config {
                path: dir.join("concept.json"),
                message: format!("unet `{}` unknown (lora, full or frozen)", info.unet),
            });
        }
        let aligner = Aligner::load(&dir.join("aligner.safetensors"), device)?;
        let qpath = dir.join("visual_queries.safetensors");
        let queries = if qpath.is_file() {
            let mut t = model_io::tensor_file::read_tensors(&qpath)?;
            let q = model_io::tensor_file::take(&mut t, &qpath, "queries")?.to_float::<B, 3>("queries", device)?;
            let [n, k, d] = q.dims();
            if n == 0 || k == 0 || d != aligner.query_dim() {
                return Err(Error::invalid(format!(
                    "{}: tensor `queries` has shape [{n}, {k}, {d}]; expected [N >= 1, Q >= 1, {}]",
                    qpath.display(),
                    aligner.query_dim()
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
        model_io::write_atomic(&dir.join("concept.json"), text.as_bytes())
    }
}
