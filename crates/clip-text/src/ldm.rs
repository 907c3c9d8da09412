//! The text encoder in single-file checkpoints: SD 1.x's CLIP under
//! `cond_stage_model.transformer.` (transformers' keys), and SD 2.x's OpenCLIP under
//! `cond_stage_model.model.` (`resblocks`, fused `in_proj_weight`), mapped to a
//! `CLIPTextModel`'s keys as diffusers' `convert_ldm_clip_checkpoint` and
//! `convert_open_clip_checkpoint` map them, with the config inferred from the shapes. SDXL's
//! two encoders are the same layouts under `conditioner.embedders.0.transformer.` and
//! `conditioner.embedders.1.model.`, the second with its `text_projection`
//! (`CLIPTextModelWithProjection`).

use std::collections::BTreeMap;

use model_io::{Derive, KeyMap};

/// The prefix of SD 1.x's CLIP text encoder in a single file.
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
/// The prefix of SD 2.x's OpenCLIP text encoder in a single file.
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
/// The prefix of SDXL's first text encoder (CLIP ViT-L, transformers' keys) in a single file.
pub const SDXL_CLIP_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// The prefix of SDXL's second text encoder (OpenCLIP ViT-bigG) in a single file.
pub const SDXL_OPEN_CLIP_PREFIX: &str = "conditioner.embedders.1.model.";

/// An entry of a derived checkpoint: `(CLIPTextModel key, file key, how)`.
pub type Entry = (String, String, Derive);

/// SD 1.x: the keys are transformers' under [`CLIP_PREFIX`] (older files lack `text_model.`).
/// `keys` are the file's keys without the prefix; the position-id buffer is dropped.
///
/// ```
/// let e = clip_text::ldm::clip_entries(["text_model.final_layer_norm.weight", "embeddings.position_ids"]);
/// assert_eq!(e.len(), 1);
/// assert_eq!(e[0].1, "cond_stage_model.transformer.text_model.final_layer_norm.weight");
/// ```
pub fn clip_entries<'a>(keys: impl IntoIterator<Item = &'a str>) -> Vec<Entry> {
    clip_entries_under(CLIP_PREFIX, keys)
}

/// [`clip_entries`] for the encoder under `prefix` (SDXL's [`SDXL_CLIP_PREFIX`]).
pub fn clip_entries_under<'a>(prefix: &str, keys: impl IntoIterator<Item = &'a str>) -> Vec<Entry> {
    keys.into_iter()
        .filter(|k| !k.ends_with("embeddings.position_ids"))
        .map(|k| {
            let model = if k.starts_with("text_model.") { k.to_string() } else { format!("text_model.{k}") };
            (model, format!("{prefix}{k}"), Derive::Same)
        })
        .collect()
}

/// OpenCLIP's names against transformers' (what follows `resblocks.{i}.`).
const RESBLOCK: &[(&str, &str)] = &[
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
    ("attn.out_proj", "self_attn.out_proj"),
];

/// OpenCLIP's key map (keys without [`OPEN_CLIP_PREFIX`]) for `layers` blocks.
pub fn open_clip_key_map(layers: usize) -> KeyMap {
    let mut m = KeyMap::default()
        .rule("token_embedding", "text_model.embeddings.token_embedding", &[])
        .rule("positional_embedding", "text_model.embeddings.position_embedding.weight", &[])
        .rule("ln_final", "text_model.final_layer_norm", &[]);
    for i in 0..layers {
        m = m.rule(format!("transformer.resblocks.{i}"), format!("text_model.encoder.layers.{i}"), RESBLOCK);
    }
    m
}

/// SD 2.x: OpenCLIP's tensors (`shapes` by key without [`OPEN_CLIP_PREFIX`]) as a
/// `CLIPTextModel` of `layers` blocks, the fused `in_proj_weight`/`in_proj_bias` split in
/// thirds into q/k/v. Blocks from `layers` on are skipped (SD 2.x runs 23 of its 24, as
/// diffusers' `SD_2_TEXT_ENCODER_KEYS_TO_IGNORE`), as are the projection head and the logit
/// scale. A key that maps to nothing is an error naming it.
///
/// ```
/// use std::collections::BTreeMap;
/// let shapes = BTreeMap::from([("transformer.resblocks.0.attn.in_proj_weight".to_string(), vec![96, 32])]);
/// let e = clip_text::ldm::open_clip_entries(&shapes, 1).unwrap();
/// assert_eq!(e[1].0, "text_model.encoder.layers.0.self_attn.k_proj.weight");
/// assert_eq!(e[1].2, model_io::Derive::Rows(32..64));
/// ```
pub fn open_clip_entries(shapes: &BTreeMap<String, Vec<usize>>, layers: usize) -> Result<Vec<Entry>, String> {
    open_clip_entries_under(OPEN_CLIP_PREFIX, shapes, layers, false)
}

/// [`open_clip_entries`] for the encoder under `prefix`; with `projection` (SDXL's second
/// encoder, a `CLIPTextModelWithProjection`) OpenCLIP's `text_projection` `[width, proj]`
/// (applied as `x @ P`) is read transposed as `text_projection.weight` `[proj, width]`, as
/// diffusers' `convert_open_clip_checkpoint` does.
///
/// ```
/// use std::collections::BTreeMap;
/// let shapes = BTreeMap::from([("text_projection".to_string(), vec![1280, 1280])]);
/// let e = clip_text::ldm::open_clip_entries_under(clip_text::ldm::SDXL_OPEN_CLIP_PREFIX, &shapes, 32, true).unwrap();
/// assert_eq!(e[0].0, "text_projection.weight");
/// assert_eq!(e[0].2, model_io::Derive::Transpose);
/// ```
pub fn open_clip_entries_under(
    prefix: &str,
    shapes: &BTreeMap<String, Vec<usize>>,
    layers: usize,
    projection: bool,
) -> Result<Vec<Entry>, String> {
    let map = open_clip_key_map(layers);
    let mut out = Vec::new();
    for (k, shape) in shapes {
        let file = format!("{prefix}{k}");
        if projection && k == "text_projection" {
            if shape.len() != 2 {
                return Err(format!("`{file}` has shape {shape:?}, expected [width, projection_dim]"));
            }
            out.push(("text_projection.weight".to_string(), file, Derive::Transpose));
            continue;
        }
        if matches!(k.as_str(), "text_projection" | "logit_scale" | "attn_mask") {
            continue;
        }
        if let Some(i) = block_index(k) {
            if i >= layers {
                continue;
            }
        }
        if let Some(stem) = k.strip_suffix(".attn.in_proj_weight").or_else(|| k.strip_suffix(".attn.in_proj_bias")) {
            let kind = if k.ends_with("weight") { "weight" } else { "bias" };
            let base = map.to_model(stem).ok_or_else(|| format!("`{file}` has no place in the text encoder"))?;
            let d = shape.first().copied().unwrap_or(0) / 3;
            if d == 0 || shape.first() != Some(&(3 * d)) {
                return Err(format!("`{file}` has shape {shape:?}, expected [3·hidden, ...]"));
            }
            for (j, p) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                out.push((format!("{base}.self_attn.{p}.{kind}"), file.clone(), Derive::Rows(j * d..(j + 1) * d)));
            }
            continue;
        }
        let model = map.to_model(k).ok_or_else(|| format!("`{file}` has no place in the text encoder"))?;
        out.push((model, file, Derive::Same));
    }
    Ok(out)
}

/// The block of an OpenCLIP key; indices beyond any real model's (a damaged file) are ignored.
fn block_index(k: &str) -> Option<usize> {
    k.strip_prefix("transformer.resblocks.")?.split('.').next()?.parse().ok().filter(|&i: &usize| i < 1024)
}

/// A `CLIPTextModel` config (as `config.json`) from the shapes of either layout, keys
/// without their prefix: widths, depth and vocabulary from the shapes, heads of 64 channels
/// (ViT-L/14 and ViT-H/14 alike), QuickGELU for CLIP and GELU for OpenCLIP. Of OpenCLIP's 24
/// blocks SD 2.x runs 23 (it takes the penultimate layer); a file with fewer blocks runs them all.
///
/// ```
/// use std::collections::BTreeMap;
/// let s = BTreeMap::from([
///     ("text_model.embeddings.token_embedding.weight".to_string(), vec![49408, 768]),
///     ("text_model.embeddings.position_embedding.weight".to_string(), vec![77, 768]),
///     ("text_model.encoder.layers.0.mlp.fc1.weight".to_string(), vec![3072, 768]),
///     ("text_model.encoder.layers.11.mlp.fc1.weight".to_string(), vec![3072, 768]),
/// ]);
/// let cfg = clip_text::ldm::infer_config(&s, false).unwrap();
/// assert_eq!((cfg["num_hidden_layers"].as_u64(), cfg["num_attention_heads"].as_u64()), (Some(12), Some(12)));
/// ```
pub fn infer_config(shapes: &BTreeMap<String, Vec<usize>>, open_clip: bool) -> Result<serde_json::Value, String> {
    infer(shapes, open_clip, false)
}

/// The config of SDXL's second encoder (OpenCLIP ViT-bigG with its `text_projection`, keys
/// without [`SDXL_OPEN_CLIP_PREFIX`]) as its `text_encoder_2/config.json`: as
/// [`infer_config`]'s OpenCLIP, but every block runs (SDXL takes `hidden_states[-2]` itself),
/// and `projection_dim` is the projection's width.
///
/// ```
/// use std::collections::BTreeMap;
/// let s = BTreeMap::from([
///     ("token_embedding.weight".to_string(), vec![49408, 1280]),
///     ("positional_embedding".to_string(), vec![77, 1280]),
///     ("transformer.resblocks.0.mlp.c_fc.weight".to_string(), vec![5120, 1280]),
///     ("transformer.resblocks.31.mlp.c_fc.weight".to_string(), vec![5120, 1280]),
///     ("text_projection".to_string(), vec![1280, 1280]),
/// ]);
/// let cfg = clip_text::ldm::infer_config_with_projection(&s).unwrap();
/// assert_eq!((cfg["num_hidden_layers"].as_u64(), cfg["projection_dim"].as_u64()), (Some(32), Some(1280)));
/// ```
pub fn infer_config_with_projection(shapes: &BTreeMap<String, Vec<usize>>) -> Result<serde_json::Value, String> {
    let mut cfg = infer(shapes, true, true)?;
    let proj = shapes.get("text_projection").ok_or("no `text_projection` (under the text encoder's prefix)")?;
    match proj.as_slice() {
        [w, p] if Some(*w as u64) == cfg["hidden_size"].as_u64() => cfg["projection_dim"] = (*p).into(),
        _ => return Err(format!("`text_projection` has shape {proj:?}, expected [hidden_size, projection_dim]")),
    }
    Ok(cfg)
}

fn infer(
    shapes: &BTreeMap<String, Vec<usize>>,
    open_clip: bool,
    all_blocks: bool,
) -> Result<serde_json::Value, String> {
    let get = |k: &str| shapes.get(k).ok_or_else(|| format!("no `{k}` (under the text encoder's prefix)"));
    let (tok, pos, fc1, blocks) = if open_clip {
        let n = shapes.keys().filter_map(|k| block_index(k)).max().map_or(0, |i| i + 1);
        (
            get("token_embedding.weight")?,
            get("positional_embedding")?,
            get("transformer.resblocks.0.mlp.c_fc.weight")?,
            // SD 2.x conditions on the penultimate of OpenCLIP ViT-H's 24 blocks. Files with
            // fewer come from diffusers' conversion script (or `personalize export`), which
            // writes only the 23 blocks the model runs.
            if n >= 24 && !all_blocks { n - 1 } else { n },
        )
    } else {
        let p = if shapes.keys().any(|k| k.starts_with("text_model.")) { "text_model." } else { "" };
        let n = shapes
            .keys()
            .filter_map(|k| k.strip_prefix(&format!("{p}encoder.layers."))?.split('.').next()?.parse::<usize>().ok())
            .filter(|&i| i < 1024)
            .max()
            .map_or(0, |i| i + 1);
        (
            get(&format!("{p}embeddings.token_embedding.weight"))?,
            get(&format!("{p}embeddings.position_embedding.weight"))?,
            get(&format!("{p}encoder.layers.0.mlp.fc1.weight"))?,
            n,
        )
    };
    let hidden = tok.get(1).copied().unwrap_or(0);
    if tok.len() != 2 || pos.is_empty() || fc1.is_empty() {
        return Err(format!("embedding shapes {tok:?} and {pos:?}, MLP {fc1:?}: not a CLIP text encoder's"));
    }
    if blocks == 0 || hidden == 0 || !hidden.is_multiple_of(64) {
        return Err(format!("{blocks} layers of width {hidden}: not a standard CLIP text encoder"));
    }
    Ok(serde_json::json!({
        "model_type": "clip_text_model",
        "vocab_size": tok[0],
        "hidden_size": hidden,
        "intermediate_size": fc1[0],
        "num_hidden_layers": blocks,
        "num_attention_heads": hidden / 64,
        "max_position_embeddings": pos[0],
        "hidden_act": if open_clip { "gelu" } else { "quick_gelu" },
        "layer_norm_eps": 1e-5,
    }))
}
