//! Which files of a repository the pipeline reads.
//!
//! The same plan serves downloads (what exists is the Hub's file listing) and cache lookups
//! (what exists is the snapshot folder), so a fetched folder is exactly what resolution checks.
//!
//! ```
//! use hub::select::{plan, Layout, Variant};
//!
//! let published = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
//!     "tokenizer/merges.txt", "text_encoder/config.json", "text_encoder/model.fp16.safetensors",
//!     "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors", "vae/config.json",
//!     "vae/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin"];
//! let has = |f: &str| published.contains(&f);
//! let p = plan(Layout::Diffusers, Variant::Fp16, &has, &mut |_| unreachable!())?;
//! assert!(p.missing.is_empty());
//! assert!(p.files.contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_string()));
//! assert!(!p.files.iter().any(|f| f.ends_with(".bin")));
//! # Ok::<(), hub::Error>(())
//! ```

use std::collections::BTreeMap;

use crate::{Error, Result};

/// How a repository is laid out, which decides the files read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// A diffusers Stable Diffusion pipeline (`model_index.json`, `unet/`, `vae/`, ...).
    Diffusers,
    /// A transformers BLIP-2 checkpoint (`config.json` and weights, maybe sharded). Only the
    /// vision model, Q-Former and query tokens are read, never the language model.
    Blip2,
}

/// Which weight files of a diffusers pipeline to take. Each variant falls back to the other
/// for a component that lacks it, as the loader does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// `diffusion_pytorch_model.safetensors`, `model.safetensors` first (the loader's order).
    Full,
    /// The `.fp16.safetensors` variants first (half the download).
    Fp16,
}

/// The tensor-name prefixes of BLIP-2 that the pipeline reads.
pub const BLIP2_PREFIXES: &[&str] = &["vision_model.", "qformer.", "query_tokens"];

/// A diffusers pipeline's files besides the weights: (file, required).
const DIFFUSERS_FILES: &[(&str, bool)] = &[
    ("model_index.json", true),
    ("scheduler/scheduler_config.json", true),
    // The tokenizer: vocab.json + merges.txt as the SD repositories publish it, or the
    // tokenizer.json transformers 5 saves (see `tokenizer_files`).
    ("tokenizer/tokenizer_config.json", false),
    ("tokenizer/special_tokens_map.json", false),
    ("text_encoder/config.json", true),
    ("unet/config.json", true),
    ("vae/config.json", true),
];

/// SDXL's additions besides the second tokenizer's vocabulary and the second encoder's weights:
/// (file, required).
const SDXL_FILES: &[(&str, bool)] = &[
    ("text_encoder_2/config.json", true),
    ("tokenizer_2/tokenizer_config.json", true),
    ("tokenizer_2/special_tokens_map.json", false),
];

/// The weight stems of a diffusers pipeline.
const DIFFUSERS_WEIGHTS: &[&str] =
    &["text_encoder/model", "unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model"];

/// BLIP-2's files besides the weights: (file, required).
const BLIP2_FILES: &[(&str, bool)] = &[("config.json", true), ("preprocessor_config.json", false)];

/// The files to read from a repository, and the required ones that are absent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Files present and needed, in order (shard indexes before their shards).
    pub files: Vec<String>,
    /// Needed files that are absent, with a hint in parentheses where one helps.
    pub missing: Vec<String>,
}

/// Detects the layout from the files present.
///
/// ```
/// use hub::select::{detect, Layout};
/// assert_eq!(detect(&|f: &str| f == "model_index.json"), Some(Layout::Diffusers));
/// assert_eq!(detect(&|f: &str| f == "config.json"), Some(Layout::Blip2));
/// assert_eq!(detect(&|_: &str| false), None);
/// ```
pub fn detect(has: &dyn Fn(&str) -> bool) -> Option<Layout> {
    if has("model_index.json") {
        Some(Layout::Diffusers)
    } else if has("config.json") {
        Some(Layout::Blip2)
    } else {
        None
    }
}

/// Plans the files of a `layout` repository. `has` says whether a file exists; `read` returns
/// the text of a shard index (`*.safetensors.index.json`) from the plan, which is needed to
/// pick shards: a download fetches it first, a cache lookup reads it from the snapshot.
/// BLIP-2 ignores `variant` (no `.fp16` files are published) and takes only the shards that
/// hold [`BLIP2_PREFIXES`] tensors.
pub fn plan(
    layout: Layout,
    variant: Variant,
    has: &dyn Fn(&str) -> bool,
    read: &mut dyn FnMut(&str) -> Result<String>,
) -> Result<Plan> {
    let mut p = Plan::default();
    let (files, stems, prefixes, variant): (_, &[&str], _, _) = match layout {
        Layout::Diffusers => (DIFFUSERS_FILES, DIFFUSERS_WEIGHTS, None, variant),
        Layout::Blip2 => (BLIP2_FILES, &["model"], Some(BLIP2_PREFIXES), Variant::Full),
    };
    for &(f, required) in files {
        if has(f) {
            p.files.push(f.to_string());
        } else if required {
            p.missing.push(f.to_string());
        }
    }
    let mut stems = stems.to_vec();
    if layout == Layout::Diffusers {
        tokenizer_files(has, "tokenizer", &mut p);
        // SDXL's second text encoder and tokenizer, when the repository has either.
        if has("text_encoder_2/config.json") || has("tokenizer_2/tokenizer_config.json") {
            for (f, required) in SDXL_FILES {
                if has(f) {
                    p.files.push(f.to_string());
                } else if *required {
                    p.missing.push(format!("{f} (SDXL's second text encoder)"));
                }
            }
            tokenizer_files(has, "tokenizer_2", &mut p);
            stems.push("text_encoder_2/model");
        }
    }
    for stem in stems {
        match weights(stem, variant, has) {
            Ok(Weights::Single(f)) => p.files.push(f),
            Ok(Weights::Sharded(index)) => {
                let shards = shards(&index, &read(&index)?, prefixes)?;
                p.files.push(index);
                for s in shards {
                    if has(&s) {
                        p.files.push(s);
                    } else {
                        p.missing.push(s);
                    }
                }
            }
            Err(missing) => p.missing.push(missing),
        }
    }
    Ok(p)
}

/// `DIR/tokenizer.json` when the repository has it (what transformers 5 saves, and what it
/// reads first), else `vocab.json` + `merges.txt`.
fn tokenizer_files(has: &dyn Fn(&str) -> bool, dir: &str, p: &mut Plan) {
    let json = format!("{dir}/tokenizer.json");
    if has(&json) {
        p.files.push(json);
        return;
    }
    for f in [format!("{dir}/vocab.json"), format!("{dir}/merges.txt")] {
        if has(&f) {
            p.files.push(f);
        } else {
            p.missing.push(format!("{f} (or {json})"));
        }
    }
}

enum Weights {
    Single(String),
    Sharded(String),
}

/// The weight file (or shard index) of `stem`, `variant` first; or the missing file's name.
fn weights(stem: &str, variant: Variant, has: &dyn Fn(&str) -> bool) -> Result<Weights, String> {
    let order = match variant {
        Variant::Full => ["", ".fp16"],
        Variant::Fp16 => [".fp16", ""],
    };
    for v in order {
        let single = format!("{stem}{v}.safetensors");
        let index = format!("{single}.index.json");
        if has(&single) {
            return Ok(Weights::Single(single));
        }
        if has(&index) {
            return Ok(Weights::Sharded(index));
        }
    }
    Err(format!("{stem}(.fp16).safetensors"))
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// The shards named by a `*.safetensors.index.json` (paths relative to the repository), only
/// those holding tensors that start with one of `prefixes` when given.
///
/// ```
/// let index = r#"{"weight_map": {"vision_model.a": "m-1.safetensors",
///     "language_model.b": "m-2.safetensors", "query_tokens": "m-1.safetensors"}}"#;
/// let s = hub::select::shards("model.safetensors.index.json", index, Some(hub::select::BLIP2_PREFIXES))?;
/// assert_eq!(s, ["m-1.safetensors"]);
/// # Ok::<(), hub::Error>(())
/// ```
pub fn shards(index_file: &str, text: &str, prefixes: Option<&[&str]>) -> Result<Vec<String>> {
    let idx: ShardIndex =
        serde_json::from_str(text).map_err(|e| Error::Invalid { what: index_file.into(), msg: e.to_string() })?;
    let dir = index_file.rsplit_once('/').map(|(d, _)| format!("{d}/")).unwrap_or_default();
    let mut out: Vec<String> = Vec::new();
    for (key, shard) in &idx.weight_map {
        if prefixes.is_some_and(|ps| !ps.iter().any(|p| key.starts_with(p))) {
            continue;
        }
        if shard.contains("..") || shard.starts_with('/') {
            return Err(Error::Invalid {
                what: index_file.into(),
                msg: format!("shard name `{shard}` leaves the folder"),
            });
        }
        let s = format!("{dir}{shard}");
        if !out.contains(&s) {
            out.push(s);
        }
    }
    if out.is_empty() {
        let what = prefixes.map_or("tensors".to_string(), |ps| format!("{} tensors", ps.join(", ")));
        return Err(Error::Invalid { what: index_file.into(), msg: format!("maps no {what}") });
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd_files(weights: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = DIFFUSERS_FILES.iter().map(|(f, _)| f.to_string()).collect();
        v.extend(["tokenizer/vocab.json".to_string(), "tokenizer/merges.txt".to_string()]);
        v.extend(weights.iter().map(|s| s.to_string()));
        v
    }

    #[test]
    fn diffusers_variants() {
        let full = [
            "text_encoder/model.safetensors",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
        ];
        let files = sd_files(&full);
        let has = |f: &str| files.iter().any(|x| x == f);
        let p = plan(Layout::Diffusers, Variant::Full, &has, &mut |_| unreachable!()).unwrap();
        assert!(p.missing.is_empty(), "{:?}", p.missing);
        assert_eq!(p.files.len(), DIFFUSERS_FILES.len() + 5);
        // Where fp16 is published it is taken; elsewhere the full weights are.
        let mixed = sd_files(&[
            full[0],
            "unet/diffusion_pytorch_model.fp16.safetensors",
            full[2],
            "vae/diffusion_pytorch_model.fp16.safetensors",
        ]);
        let has = |f: &str| mixed.iter().any(|x| x == f);
        let p = plan(Layout::Diffusers, Variant::Fp16, &has, &mut |_| unreachable!()).unwrap();
        let weights: Vec<&String> = p.files.iter().filter(|f| f.ends_with(".safetensors")).collect();
        assert_eq!(
            weights,
            [full[0], "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"]
        );
        let p = plan(Layout::Diffusers, Variant::Full, &has, &mut |_| unreachable!()).unwrap();
        assert!(p.files.contains(&full[2].to_string()));
        // Neither variant: the missing file is named.
        let none = sd_files(&[full[0], full[2]]);
        let has = |f: &str| none.iter().any(|x| x == f);
        let p = plan(Layout::Diffusers, Variant::Fp16, &has, &mut |_| unreachable!()).unwrap();
        assert_eq!(p.missing, ["unet/diffusion_pytorch_model(.fp16).safetensors"]);
    }

    /// A pipeline saved by transformers 5 has `tokenizer/tokenizer.json` and no vocab.json:
    /// that is what is read. With neither, both alternatives are named.
    #[test]
    fn tokenizer_json_or_vocab_and_merges() {
        let w = [
            "text_encoder/model.safetensors",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
        ];
        let mut files: Vec<String> =
            sd_files(&w).into_iter().filter(|f| !f.ends_with("vocab.json") && !f.ends_with("merges.txt")).collect();
        files.push("tokenizer/tokenizer.json".into());
        let has = |f: &str| files.iter().any(|x| x == f);
        let p = plan(Layout::Diffusers, Variant::Full, &has, &mut |_| unreachable!()).unwrap();
        assert!(p.missing.is_empty(), "{:?}", p.missing);
        assert!(p.files.contains(&"tokenizer/tokenizer.json".to_string()));
        files.pop();
        let has = |f: &str| files.iter().any(|x| x == f);
        let p = plan(Layout::Diffusers, Variant::Full, &has, &mut |_| unreachable!()).unwrap();
        assert_eq!(
            p.missing,
            [
                "tokenizer/vocab.json (or tokenizer/tokenizer.json)",
                "tokenizer/merges.txt (or tokenizer/tokenizer.json)"
            ]
        );
    }

    #[test]
    fn optional_files_and_sharded_unet() {
        let files = [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "text_encoder/config.json",
            "unet/config.json",
            "vae/config.json",
            "text_encoder/model.safetensors",
            "unet/diffusion_pytorch_model.safetensors.index.json",
            "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
        ];
        let has = |f: &str| files.contains(&f);
        let index = r#"{"metadata": {}, "weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",
            "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}"#;
        let mut read = |f: &str| {
            assert_eq!(f, "unet/diffusion_pytorch_model.safetensors.index.json");
            Ok(index.to_string())
        };
        let p = plan(Layout::Diffusers, Variant::Full, &has, &mut read).unwrap();
        assert_eq!(p.missing, ["unet/diffusion_pytorch_model-00002-of-00002.safetensors"]);
        assert!(!p.files.iter().any(|f| f.contains("special_tokens")));
    }

    /// stabilityai/stable-diffusion-xl-base-1.0's listing (weights abridged): the second
    /// encoder and tokenizer are taken, fp16 where published, and nothing else (no refiner
    /// VAE folder, no ONNX or OpenVINO exports); without `text_encoder_2` weights it is named.
    #[test]
    fn sdxl_takes_the_second_encoder_and_tokenizer() {
        let mut files: Vec<String> = sd_files(&[
            "text_encoder/model.fp16.safetensors",
            "text_encoder/model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.fp16.safetensors",
            "vae_1_0/diffusion_pytorch_model.fp16.safetensors",
            "text_encoder_2/model.fp16.safetensors",
            "text_encoder_2/model.safetensors",
            "text_encoder_2/model.onnx",
            "sd_xl_base_1.0.safetensors",
            "text_encoder_2/config.json",
            "tokenizer_2/tokenizer_config.json",
            "tokenizer_2/special_tokens_map.json",
            "tokenizer_2/vocab.json",
            "tokenizer_2/merges.txt",
        ]);
        let has = |f: &str| files.iter().any(|x| x == f);
        let p = plan(Layout::Diffusers, Variant::Fp16, &has, &mut |_| unreachable!()).unwrap();
        assert!(p.missing.is_empty(), "{:?}", p.missing);
        for f in ["text_encoder_2/config.json", "text_encoder_2/model.fp16.safetensors", "tokenizer_2/vocab.json"] {
            assert!(p.files.contains(&f.to_string()), "{f}: {:?}", p.files);
        }
        let weights: Vec<&String> = p.files.iter().filter(|f| f.ends_with(".safetensors")).collect();
        assert_eq!(weights.len(), 4, "{weights:?}");
        assert!(weights.iter().all(|f| f.contains(".fp16.")));
        files.retain(|f| !f.starts_with("text_encoder_2/model"));
        let has = |f: &str| files.iter().any(|x| x == f);
        let p = plan(Layout::Diffusers, Variant::Fp16, &has, &mut |_| unreachable!()).unwrap();
        assert_eq!(p.missing, ["text_encoder_2/model(.fp16).safetensors"]);
    }

    #[test]
    fn blip2_takes_only_the_encoder_shards() {
        let index = r#"{"weight_map": {"language_model.x": "model-00001-of-00003.safetensors",
            "vision_model.embeddings.patch": "model-00002-of-00003.safetensors",
            "qformer.layer.0": "model-00003-of-00003.safetensors", "query_tokens": "model-00003-of-00003.safetensors"}}"#;
        let files = [
            "config.json",
            "model.safetensors.index.json",
            "model-00001-of-00003.safetensors",
            "model-00002-of-00003.safetensors",
        ];
        let has = |f: &str| files.contains(&f);
        let p = plan(Layout::Blip2, Variant::Fp16, &has, &mut |_| Ok(index.into())).unwrap();
        assert_eq!(p.files, ["config.json", "model.safetensors.index.json", "model-00002-of-00003.safetensors"]);
        assert_eq!(p.missing, ["model-00003-of-00003.safetensors"]);
        // An index with no BLIP-2 encoder tensors is not a BLIP-2 checkpoint.
        let err = shards(
            "model.safetensors.index.json",
            r#"{"weight_map": {"lm.x": "a.safetensors"}}"#,
            Some(BLIP2_PREFIXES),
        );
        assert!(err.unwrap_err().to_string().contains("maps no vision_model."));
        assert!(shards("i.json", r#"{"weight_map": {"query_tokens": "../x"}}"#, None).is_err());
        assert!(shards("i.json", "not json", None).is_err());
    }
}
