//! The bundled miniature models under assets/, made by this project's own model code from a
//! fixed seed: `cargo xtask tiny-model` runs this crate's binary
//! (`cargo run --release -p tiny-models -- .` from the workspace root).
//!
//! * `assets/tiny-sd/`: a Stable Diffusion folder in the diffusers layout (model_index.json,
//!   scheduler, the real CLIP tokenizer, a 2-layer CLIP text encoder, a small UNet and VAE).
//! * `assets/tiny-blip2/`: a BLIP-2 folder in the transformers layout (vision transformer,
//!   Q-Former, 32 query tokens; the language model is left out, as the encoder never reads it).
//! * `assets/examples/`: two drawn example images of one toy.
//!
//! Each model is built from its config.json through the same `from_weights` the loaders use,
//! with [`model_io::Weights::seeded`], so every key and shape is exactly what the loader reads;
//! the recorded tensors are then written as safetensors. Random, not trained: the pipeline runs
//! end to end and training lowers the loss, but the pictures are noise-like.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn_flex::{Flex, FlexDevice};
use model_io::tensor_file::to_bytes_as;
use model_io::{write_atomic, Weights};

/// The seed of every bundled weight.
pub const SEED: u64 = 20261126;

const MODEL_INDEX: &str = r#"{
  "_class_name": "StableDiffusionPipeline",
  "_diffusers_version": "0.35.1",
  "feature_extractor": [null, null],
  "image_encoder": [null, null],
  "requires_safety_checker": false,
  "safety_checker": [null, null],
  "scheduler": ["diffusers", "PNDMScheduler"],
  "text_encoder": ["transformers", "CLIPTextModel"],
  "tokenizer": ["transformers", "CLIPTokenizer"],
  "unet": ["diffusers", "UNet2DConditionModel"],
  "vae": ["diffusers", "AutoencoderKL"]
}
"#;

/// CLIPTextModel with SD 1.5's vocabulary and 77 positions, 32 wide, 2 layers.
const TEXT_ENCODER: &str = r#"{
  "architectures": ["CLIPTextModel"],
  "attention_dropout": 0.0,
  "bos_token_id": 49406,
  "dtype": "float16",
  "eos_token_id": 49407,
  "hidden_act": "quick_gelu",
  "hidden_size": 32,
  "initializer_factor": 1.0,
  "initializer_range": 0.02,
  "intermediate_size": 64,
  "layer_norm_eps": 1e-05,
  "max_position_embeddings": 77,
  "model_type": "clip_text_model",
  "num_attention_heads": 4,
  "num_hidden_layers": 2,
  "pad_token_id": 1,
  "projection_dim": 32,
  "transformers_version": "4.56.1",
  "vocab_size": 49408
}
"#;

/// SD 1.5's UNet layout, two levels of 32 and 64 channels; sample_size 8 → 64×64 images.
const UNET: &str = r#"{
  "_class_name": "UNet2DConditionModel",
  "_diffusers_version": "0.35.1",
  "act_fn": "silu",
  "attention_head_dim": 8,
  "block_out_channels": [32, 64],
  "center_input_sample": false,
  "cross_attention_dim": 32,
  "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1,
  "flip_sin_to_cos": true,
  "freq_shift": 0,
  "in_channels": 4,
  "layers_per_block": 1,
  "mid_block_scale_factor": 1,
  "mid_block_type": "UNetMidBlock2DCrossAttn",
  "norm_eps": 1e-05,
  "norm_num_groups": 8,
  "out_channels": 4,
  "sample_size": 8,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
  "upcast_attention": false,
  "use_linear_projection": false
}
"#;

/// AutoencoderKL with SD's four levels (factor 8) at 16–32 channels.
const VAE: &str = r#"{
  "_class_name": "AutoencoderKL",
  "_diffusers_version": "0.35.1",
  "act_fn": "silu",
  "block_out_channels": [16, 32, 32, 32],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "force_upcast": true,
  "in_channels": 3,
  "latent_channels": 4,
  "layers_per_block": 1,
  "norm_num_groups": 8,
  "out_channels": 3,
  "sample_size": 64,
  "scaling_factor": 0.18215,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
}
"#;

/// blip2-opt-2.7b's layout at width 32: ViT on 224×224 images in 14-pixel patches, a Q-Former
/// with 32 queries and cross-attention in every layer. The OPT config is kept so that the
/// folder reads as a Blip2ForConditionalGeneration config; its weights are not bundled.
const BLIP2: &str = r#"{
  "architectures": ["Blip2ForConditionalGeneration"],
  "initializer_factor": 1.0,
  "initializer_range": 0.02,
  "model_type": "blip-2",
  "num_query_tokens": 32,
  "qformer_config": {
    "attention_probs_dropout_prob": 0.1,
    "cross_attention_frequency": 1,
    "encoder_hidden_size": 32,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "blip_2_qformer",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "position_embedding_type": "absolute",
    "vocab_size": 30522
  },
  "text_config": {
    "activation_function": "relu",
    "ffn_dim": 64,
    "hidden_size": 32,
    "max_position_embeddings": 64,
    "model_type": "opt",
    "num_attention_heads": 4,
    "num_hidden_layers": 1,
    "vocab_size": 50272,
    "word_embed_proj_dim": 32
  },
  "transformers_version": "4.56.1",
  "use_decoder_only_language_model": true,
  "vision_config": {
    "attention_dropout": 0.0,
    "hidden_act": "gelu",
    "hidden_size": 32,
    "image_size": 224,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-06,
    "model_type": "blip_2_vision_model",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "patch_size": 14,
    "qkv_bias": true
  }
}
"#;

/// BLIP-2's published preprocessing (224×224, bicubic, CLIP mean and std).
const BLIP2_PREPROCESSOR: &str = r#"{
  "do_convert_rgb": true,
  "do_normalize": true,
  "do_rescale": true,
  "do_resize": true,
  "image_mean": [0.48145466, 0.4578275, 0.40821073],
  "image_processor_type": "BlipImageProcessor",
  "image_std": [0.26862954, 0.26130258, 0.27577711],
  "processor_class": "Blip2Processor",
  "resample": 3,
  "rescale_factor": 0.00392156862745098,
  "size": {"height": 224, "width": 224}
}
"#;

const TOKENIZER_FILES: [&str; 4] = ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"];

/// Every file of the bundle: path under the output folder, and its bytes.
pub fn build(root: &Path) -> Result<BTreeMap<PathBuf, Vec<u8>>> {
    let dev = FlexDevice;
    let mut files: BTreeMap<PathBuf, Vec<u8>> = BTreeMap::new();
    let mut put = |p: &str, b: Vec<u8>| files.insert(PathBuf::from(p), b);
    let fmt = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let tmp = tempfile::tempdir()?;
    // Each config is parsed by its crate's own loader, from a file, as a user's would be.
    let config_dir = |name: &str, file: &str, text: &str| -> Result<PathBuf> {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join(file), text)?;
        Ok(d)
    };

    put("tiny-sd/model_index.json", MODEL_INDEX.into());
    put("tiny-sd/scheduler/scheduler_config.json", scheduler::SD15_SCHEDULER_CONFIG.into());
    for f in TOKENIZER_FILES {
        let src = root.join("crates/clip-text/vocab").join(f);
        put(&format!("tiny-sd/tokenizer/{f}"), std::fs::read(&src).with_context(|| format!("{}", src.display()))?);
    }

    // Builds a model through its crate's `from_weights` and returns the safetensors bytes of
    // every tensor it read, under the published keys.
    let made = |build: &dyn Fn(&Weights<Flex>) -> Result<()>, f16: bool| -> Result<Vec<u8>> {
        let w = Weights::<Flex>::seeded(SEED, &dev);
        build(&w)?;
        Ok(to_bytes_as(&w.recorded(), &fmt, f16))
    };

    let cfg = clip_text::ClipTextConfig::load(&config_dir("text", "config.json", TEXT_ENCODER)?)?;
    put("tiny-sd/text_encoder/config.json", TEXT_ENCODER.into());
    // f16 on disk, as the published fp16 variant: the 49408-token embedding dominates the bundle.
    let bytes = made(&|w| Ok(clip_text::ClipTextModel::from_weights(&cfg, &w.pp("text_model")).map(drop)?), true)?;
    put("tiny-sd/text_encoder/model.fp16.safetensors", bytes);

    let cfg = sd_unet::UNetConfig::load(&config_dir("unet", "config.json", UNET)?)?;
    put("tiny-sd/unet/config.json", UNET.into());
    let bytes = made(&|w| Ok(sd_unet::UNet2DConditionModel::from_weights(&cfg, w).map(drop)?), false)?;
    put("tiny-sd/unet/diffusion_pytorch_model.safetensors", bytes);

    let cfg = sd_vae::AutoencoderKlConfig::load(&config_dir("vae", "config.json", VAE)?)?;
    put("tiny-sd/vae/config.json", VAE.into());
    let bytes = made(&|w| Ok(sd_vae::AutoencoderKl::from_weights(&cfg, w).map(drop)?), false)?;
    put("tiny-sd/vae/diffusion_pytorch_model.safetensors", bytes);

    let cfg = blip2_encoder::Blip2Config::load(&config_dir("blip2", "config.json", BLIP2)?)?;
    put("tiny-blip2/config.json", BLIP2.into());
    put("tiny-blip2/preprocessor_config.json", BLIP2_PREPROCESSOR.into());
    let bytes = made(&|w| Ok(blip2_encoder::Blip2Encoder::from_weights(&cfg, w).map(drop)?), false)?;
    put("tiny-blip2/model.safetensors", bytes);

    put("examples/toy-1.png", example_image(0)?);
    put("examples/toy-2.png", example_image(1)?);
    Ok(files)
}

/// A drawn 256×256 picture of one toy (an orange ball with eyes and a green hat), on one of two
/// backgrounds, slightly shifted: the "concept" of the quick start.
fn example_image(variant: u32) -> Result<Vec<u8>> {
    let (bg_a, bg_b) = if variant == 0 {
        ([200.0, 220.0, 245.0], [120.0, 160.0, 220.0])
    } else {
        ([245.0, 235.0, 200.0], [170.0, 200.0, 120.0])
    };
    let (cx, cy) = if variant == 0 { (128.0, 140.0) } else { (112.0, 132.0) };
    let img = image::RgbImage::from_fn(256, 256, |x, y| {
        let (fx, fy) = (x as f32, y as f32);
        let t = fy / 255.0;
        let mut c: [f32; 3] = std::array::from_fn(|i| bg_a[i] * (1.0 - t) + bg_b[i] * t);
        let d = ((fx - cx).powi(2) + (fy - cy).powi(2)).sqrt();
        if d < 70.0 {
            // Shaded ball: lighter towards the upper left.
            let light = 1.0 - 0.35 * (((fx - cx + 25.0).powi(2) + (fy - cy + 25.0).powi(2)).sqrt() / 100.0).min(1.0);
            c = [250.0 * light, 140.0 * light, 40.0 * light];
        } else if d < 74.0 {
            c = [90.0, 40.0, 10.0];
        }
        for ex in [cx - 24.0, cx + 24.0] {
            if ((fx - ex).powi(2) + (fy - cy + 12.0).powi(2)).sqrt() < 9.0 {
                c = [20.0, 20.0, 30.0];
            }
        }
        // A hat: a green band and crown above the ball.
        if (fx - cx).abs() < 50.0 && (cy - 78.0..cy - 66.0).contains(&fy)
            || (fx - cx).abs() < 30.0 && (cy - 118.0..cy - 78.0).contains(&fy)
        {
            c = [40.0, 140.0, 70.0];
        }
        image::Rgb(c.map(|v| v.round().clamp(0.0, 255.0) as u8))
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

/// Writes the bundle under `out` (atomically, file by file) and reports its size.
pub fn write(root: &Path, out: &Path) -> Result<()> {
    let files = build(root)?;
    let mut total = 0usize;
    for (rel, bytes) in &files {
        let path = out.join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        write_atomic(&path, bytes)?;
        total += bytes.len();
    }
    eprintln!("wrote {} files, {:.1} MB, under {}", files.len(), total as f64 / 1e6, out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    #[test]
    fn committed_assets_are_what_the_generator_makes() {
        let files = build(&root()).unwrap();
        let mut total = 0;
        for (rel, bytes) in &files {
            let committed = root().join("assets").join(rel);
            let on_disk = std::fs::read(&committed)
                .unwrap_or_else(|e| panic!("{}: {e} (run `cargo xtask tiny-model`)", committed.display()));
            assert!(on_disk == *bytes, "{} differs from what `cargo xtask tiny-model` makes", committed.display());
            total += bytes.len();
        }
        // The issue's budget for the two tiny models and the examples.
        assert!(total < 15_000_000, "bundle is {total} bytes");
    }

    /// The loaders reject missing and unused tensors, so this shows the generator wrote exactly
    /// the published keys.
    #[test]
    fn generated_models_load_through_the_public_loaders() {
        let dir = tempfile::tempdir().unwrap();
        write(&root(), dir.path()).unwrap();
        let sd = dir.path().join("tiny-sd");
        clip_text::ClipTextModel::<Flex>::load(&sd.join("text_encoder"), &FlexDevice).unwrap();
        sd_unet::UNet2DConditionModel::<Flex>::load(&sd.join("unet"), &FlexDevice).unwrap();
        sd_vae::AutoencoderKl::<Flex>::load(&sd.join("vae"), &FlexDevice).unwrap();
        let enc = blip2_encoder::Blip2Encoder::<Flex>::load(&dir.path().join("tiny-blip2"), &FlexDevice).unwrap();
        assert_eq!((enc.num_query_tokens(), enc.hidden_size(), enc.image_size()), (32, 32, 224));
    }

    #[test]
    fn seeded_weights_do_not_depend_on_the_run() {
        let a = Weights::<Flex>::seeded(SEED, &FlexDevice);
        let b = Weights::<Flex>::seeded(SEED, &FlexDevice);
        a.get::<2>("x.weight", [3, 5]).unwrap();
        b.get::<1>("y.bias", [2]).unwrap();
        b.get::<2>("x.weight", [3, 5]).unwrap();
        assert_eq!(a.recorded()["x.weight"], b.recorded()["x.weight"]);
        let other = Weights::<Flex>::seeded(SEED + 1, &FlexDevice);
        other.get::<2>("x.weight", [3, 5]).unwrap();
        assert_ne!(a.recorded()["x.weight"], other.recorded()["x.weight"]);
    }
}
