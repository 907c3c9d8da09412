//! The UNet in the original Stable Diffusion (LDM) layout of single-file checkpoints
//! (`model.diffusion_model.input_blocks.1.0.in_layers.0.weight`): the key map both ways, as
//! diffusers' `convert_ldm_unet_checkpoint` and its reverse script lay it out, and the config of
//! a standard SD 1.x/2.x or SDXL UNet inferred from the tensors' shapes, as `from_single_file`
//! infers it.

use std::collections::BTreeMap;

use model_io::KeyMap;

use crate::UNetConfig;

/// More blocks than any UNet has: a larger index in a key is a damaged file.
const MAX_BLOCKS: usize = 1024;

/// The prefix of the UNet's tensors in a single-file checkpoint.
pub const PREFIX: &str = "model.diffusion_model.";

/// A resnet's layers: LDM's `ResBlock` (`in_layers = [GroupNorm, SiLU, Conv]`, ...) against
/// diffusers' `ResnetBlock2D`.
const RESNET: &[(&str, &str)] = &[
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
];

/// The key map of a UNet with `cfg`'s blocks (keys without [`PREFIX`]). The attention blocks'
/// keys are the same in both layouts below their prefix.
///
/// ```
/// let cfg: sd_unet::UNetConfig = serde_json::from_value(serde_json::json!({
///     "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
///     "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
///     "block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 32,
/// })).unwrap();
/// let map = sd_unet::ldm::key_map(&cfg);
/// assert_eq!(map.to_model("input_blocks.2.0.op.weight").unwrap(), "down_blocks.0.downsamplers.0.conv.weight");
/// assert_eq!(map.to_file("up_blocks.1.attentions.1.proj_in.bias").unwrap(), "output_blocks.3.1.proj_in.bias");
/// ```
pub fn key_map(cfg: &UNetConfig) -> KeyMap {
    let n = cfg.block_out_channels.len();
    let l = cfg.layers_per_block;
    let mut m = KeyMap::default()
        .rule("time_embed.0", "time_embedding.linear_1", &[])
        .rule("time_embed.2", "time_embedding.linear_2", &[])
        .rule("input_blocks.0.0", "conv_in", &[])
        .rule("out.0", "conv_norm_out", &[])
        .rule("out.2", "conv_out", &[])
        .rule("middle_block.0", "mid_block.resnets.0", RESNET)
        .rule("middle_block.1", "mid_block.attentions.0", &[])
        .rule("middle_block.2", "mid_block.resnets.1", RESNET)
        // SDXL's added conditioning: `label_emb.0 = Sequential(Linear, SiLU, Linear)`.
        .rule("label_emb.0.0", "add_embedding.linear_1", &[])
        .rule("label_emb.0.2", "add_embedding.linear_2", &[]);
    let mut i = 1;
    for b in 0..n {
        for j in 0..l {
            m = m.rule(format!("input_blocks.{i}.0"), format!("down_blocks.{b}.resnets.{j}"), RESNET).rule(
                format!("input_blocks.{i}.1"),
                format!("down_blocks.{b}.attentions.{j}"),
                &[],
            );
            i += 1;
        }
        if b + 1 < n {
            m = m.rule(format!("input_blocks.{i}.0.op"), format!("down_blocks.{b}.downsamplers.0.conv"), &[]);
            i += 1;
        }
    }
    let mut i = 0;
    for (b, t) in cfg.up_block_types.iter().enumerate() {
        let attn = t == "CrossAttnUpBlock2D";
        for j in 0..=l {
            m = m.rule(format!("output_blocks.{i}.0"), format!("up_blocks.{b}.resnets.{j}"), RESNET);
            if attn {
                m = m.rule(format!("output_blocks.{i}.1"), format!("up_blocks.{b}.attentions.{j}"), &[]);
            }
            if j == l && b + 1 < n {
                let at = if attn { 2 } else { 1 };
                m = m.rule(format!("output_blocks.{i}.{at}.conv"), format!("up_blocks.{b}.upsamplers.0.conv"), &[]);
            }
            i += 1;
        }
    }
    m
}

/// The config of a standard SD 1.x, 2.x or SDXL UNet from the shapes of its LDM tensors (keys
/// without [`PREFIX`]), as diffusers' `create_unet_diffusers_config_from_ldm` builds it from
/// the original YAML: channels, blocks, attention placement and depth, projections and the
/// cross-attention width come from the shapes. The head counts are not in the shapes: SD 2.x
/// (a 1024-wide context) and SDXL have heads of 64 channels, SD 1.x 8 heads per block.
/// `v_prediction` picks SD 2.x's 768-pixel size. SDXL (`label_emb.*`, a 2048-wide context) gets
/// its `text_time` added conditioning, with time ids embedded in 256 channels as in its YAML.
/// A model of other widths is an error: it needs its own config (`--config`).
///
/// Returns the config as `config.json` would hold it, or what is missing or unexpected.
pub fn infer_config(shapes: &BTreeMap<String, Vec<usize>>, v_prediction: bool) -> Result<serde_json::Value, String> {
    let shape = |k: &str| shapes.get(k).ok_or_else(|| format!("no `{PREFIX}{k}`"));
    // Dimension `i` of tensor `k`, an error for a tensor of too few dimensions.
    let dim = |k: &str, i: usize| -> Result<usize, String> {
        shape(k)?.get(i).copied().ok_or_else(|| format!("`{PREFIX}{k}` has shape {:?}, too few dimensions", shapes[k]))
    };
    let in_channels = dim("input_blocks.0.0.weight", 1)?;
    let index = |prefix: &str| -> Vec<usize> {
        let mut v: Vec<usize> = shapes
            .keys()
            .filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse().ok())
            // A block index beyond any real model's is a damaged file, not a loop to run.
            .filter(|&i: &usize| i < MAX_BLOCKS)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let inputs = index("input_blocks.").last().map_or(0, |i| i + 1);
    let first_down = (1..inputs).find(|i| shapes.contains_key(&format!("input_blocks.{i}.0.op.weight")));
    let l = match first_down {
        Some(i) => i - 1,
        None => inputs.saturating_sub(1),
    };
    if l == 0 || inputs % (l + 1) != 0 {
        return Err(format!("{inputs} input blocks do not form blocks of {l} resnets and a downsampler"));
    }
    let n = inputs / (l + 1);
    let first = |b: usize| 1 + b * (l + 1);
    let mut channels = Vec::new();
    let mut down = Vec::new();
    let mut depth = Vec::new();
    let mut context = None;
    let mut linear = false;
    for b in 0..n {
        channels.push(dim(&format!("input_blocks.{}.0.out_layers.3.weight", first(b)), 0)?);
        let attn = format!("input_blocks.{}.1", first(b));
        let has = shapes.contains_key(&format!("{attn}.proj_in.weight"));
        down.push(if has { "CrossAttnDownBlock2D" } else { "DownBlock2D" });
        depth.push(if has { index(&format!("{attn}.transformer_blocks.")).len() } else { 1 });
        if has {
            context = Some(dim(&format!("{attn}.transformer_blocks.0.attn2.to_k.weight"), 1)?);
            linear = shape(&format!("{attn}.proj_in.weight"))?.len() == 2;
        }
    }
    let up: Vec<&str> = (0..n)
        .map(|b| {
            let has = shapes.contains_key(&format!("output_blocks.{}.1.proj_in.weight", b * (l + 1)));
            if has {
                "CrossAttnUpBlock2D"
            } else {
                "UpBlock2D"
            }
        })
        .collect();
    let context = match context {
        Some(c) => c,
        None => dim("middle_block.1.transformer_blocks.0.attn2.to_k.weight", 1)?,
    };
    let depth = if depth.iter().all(|&d| d == 1) { serde_json::json!(1) } else { serde_json::json!(depth) };
    let label = shapes.get("label_emb.0.0.weight");
    let sdxl = label.is_some();
    // Only the standard widths carry the head counts assumed below: a model of other widths
    // (a tiny test model, a distilled one) would load with wrong heads and draw noise.
    let standard = match label {
        Some(l) => channels == [320, 640, 1280] && context == 2048 && l.len() == 2,
        None => channels == [320, 640, 1280, 1280] && matches!(context, 768 | 1024),
    };
    if !standard {
        return Err(format!(
            "block_out_channels {channels:?} with a {context}-wide context{} is not a standard SD 1.x/2.x \
             ([320, 640, 1280, 1280], 768 or 1024) or SDXL ([320, 640, 1280], 2048, label_emb) UNet, so its \
             head counts are unknown",
            if sdxl { " and `label_emb`" } else { "" }
        ));
    }
    let sd2 = context == 1024;
    let heads = if sd2 || sdxl {
        serde_json::json!(channels.iter().map(|c| c / 64).collect::<Vec<_>>())
    } else {
        serde_json::json!(8)
    };
    let mut cfg = serde_json::json!({
        "_class_name": "UNet2DConditionModel",
        "sample_size": if sdxl { 128 } else if sd2 && v_prediction { 96 } else { 64 },
        "in_channels": in_channels,
        "out_channels": dim("out.2.weight", 0)?,
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": channels,
        "layers_per_block": l,
        "cross_attention_dim": context,
        "attention_head_dim": heads,
        "use_linear_projection": linear,
        "transformer_layers_per_block": depth,
        "upcast_attention": sd2 && v_prediction,
    });
    if let Some(label) = label {
        // SDXL's YAML: `adm_in_channels` 2816 = pooled 1280 + 6 time ids × 256.
        for (k, v) in [
            ("addition_embed_type", serde_json::json!("text_time")),
            ("addition_embed_type_num_heads", 64.into()),
            ("addition_time_embed_dim", 256.into()),
            ("projection_class_embeddings_input_dim", label[1].into()),
        ] {
            cfg[k] = v;
        }
    }
    Ok(cfg)
}
