//! The VAE in the original Stable Diffusion (LDM) layout of single-file checkpoints
//! (`first_stage_model.encoder.down.0.block.1.conv1.weight`): the key map both ways, as
//! diffusers' `convert_ldm_vae_checkpoint` and its reverse script lay it out (decoder blocks
//! numbered the other way round, attention projections stored as 1×1 convolutions), and the
//! config of a standard SD VAE inferred from the shapes.

use std::collections::BTreeMap;

use model_io::{Derive, KeyMap};

use crate::AutoencoderKlConfig;

/// The prefixes of the VAE's tensors in a single file (`vae.` in some merges).
pub const PREFIXES: [&str; 2] = ["first_stage_model.", "vae."];

const RESNET: &[(&str, &str)] = &[("nin_shortcut", "conv_shortcut")];
/// The middle block's attention: LDM's `AttnBlock` against diffusers' `Attention`.
const ATTENTION: &[(&str, &str)] =
    &[("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")];

/// The key map of a VAE with `cfg`'s blocks (keys without the prefix).
///
/// ```
/// let cfg: sd_vae::AutoencoderKlConfig =
///     serde_json::from_value(serde_json::json!({"block_out_channels": [32, 64], "layers_per_block": 1})).unwrap();
/// let map = sd_vae::ldm::key_map(&cfg);
/// assert_eq!(map.to_model("decoder.up.1.block.0.nin_shortcut.bias").unwrap(), "decoder.up_blocks.0.resnets.0.conv_shortcut.bias");
/// assert_eq!(map.to_file("encoder.mid_block.attentions.0.to_q.weight").unwrap(), "encoder.mid.attn_1.q.weight");
/// ```
pub fn key_map(cfg: &AutoencoderKlConfig) -> KeyMap {
    let n = cfg.block_out_channels.len();
    let l = cfg.layers_per_block;
    let mut m = KeyMap::default().rule("quant_conv", "quant_conv", &[]).rule("post_quant_conv", "post_quant_conv", &[]);
    for side in ["encoder", "decoder"] {
        m = m
            .rule(format!("{side}.conv_in"), format!("{side}.conv_in"), &[])
            .rule(format!("{side}.conv_out"), format!("{side}.conv_out"), &[])
            .rule(format!("{side}.norm_out"), format!("{side}.conv_norm_out"), &[])
            .rule(format!("{side}.mid.block_1"), format!("{side}.mid_block.resnets.0"), RESNET)
            .rule(format!("{side}.mid.block_2"), format!("{side}.mid_block.resnets.1"), RESNET)
            .rule(format!("{side}.mid.attn_1"), format!("{side}.mid_block.attentions.0"), ATTENTION);
    }
    for i in 0..n {
        for j in 0..l {
            m = m.rule(format!("encoder.down.{i}.block.{j}"), format!("encoder.down_blocks.{i}.resnets.{j}"), RESNET);
        }
        if i + 1 < n {
            m = m.rule(format!("encoder.down.{i}.downsample"), format!("encoder.down_blocks.{i}.downsamplers.0"), &[]);
        }
        let b = n - 1 - i;
        for j in 0..=l {
            m = m.rule(format!("decoder.up.{b}.block.{j}"), format!("decoder.up_blocks.{i}.resnets.{j}"), RESNET);
        }
        if i + 1 < n {
            m = m.rule(format!("decoder.up.{b}.upsample"), format!("decoder.up_blocks.{i}.upsamplers.0"), &[]);
        }
    }
    m
}

/// How the model reads the file's tensor `file_key` of `shape`, mapped to `model_key`: the
/// attention projections' 1×1 convolution weights `[C, C, 1, 1]` as linear `[C, C]`.
pub fn derive(model_key: &str, shape: &[usize]) -> Derive {
    let attention = model_key.contains(".mid_block.attentions.") && model_key.ends_with(".weight");
    if attention && shape.len() > 2 && shape[2..].iter().all(|&d| d == 1) {
        Derive::Reshape(shape[..2].to_vec())
    } else {
        Derive::Same
    }
}

/// The file's shape of the model's tensor `model_key` of `shape` (the reverse of [`derive`]):
/// the attention projections back to 1×1 convolutions.
pub fn file_shape(model_key: &str, shape: &[usize]) -> Vec<usize> {
    let attention = model_key.contains(".mid_block.attentions.")
        && model_key.ends_with(".weight")
        && !model_key.contains("group_norm");
    if attention && shape.len() == 2 {
        vec![shape[0], shape[1], 1, 1]
    } else {
        shape.to_vec()
    }
}

/// The config of a standard SD VAE from its LDM tensors' shapes (keys without the prefix),
/// as `config.json` would hold it: channels, depth and latent width from the shapes; the
/// groups (32) and scaling factor (0.18215) of every SD 1.x/2.x VAE.
pub fn infer_config(shapes: &BTreeMap<String, Vec<usize>>) -> Result<serde_json::Value, String> {
    let get = |k: &str| shapes.get(k).ok_or_else(|| format!("no `{k}` (under the VAE's prefix)"));
    let dim = |k: &str, i: usize| -> Result<usize, String> {
        get(k)?.get(i).copied().ok_or_else(|| format!("`{k}` has shape {:?}, too few dimensions", shapes[k]))
    };
    let index = |prefix: &str| -> usize {
        shapes
            .keys()
            .filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok())
            .filter(|&i| i < 1024)
            .max()
            .map_or(0, |i| i + 1)
    };
    let n = index("encoder.down.");
    let l = index("encoder.down.0.block.");
    if n == 0 || l == 0 {
        return Err("no encoder blocks (`encoder.down.0.block.0.*`)".into());
    }
    let channels: Vec<usize> =
        (0..n).map(|i| dim(&format!("encoder.down.{i}.block.0.conv2.weight"), 0)).collect::<Result<_, _>>()?;
    Ok(serde_json::json!({
        "_class_name": "AutoencoderKL",
        "in_channels": dim("encoder.conv_in.weight", 1)?,
        "out_channels": dim("decoder.conv_out.weight", 0)?,
        "down_block_types": vec!["DownEncoderBlock2D"; n],
        "up_block_types": vec!["UpDecoderBlock2D"; n],
        "block_out_channels": channels,
        "layers_per_block": l,
        "latent_channels": dim("decoder.conv_in.weight", 1)?,
        "norm_num_groups": 32,
        "scaling_factor": 0.18215,
        "use_quant_conv": shapes.contains_key("quant_conv.weight"),
        "use_post_quant_conv": shapes.contains_key("post_quant_conv.weight"),
    }))
}
