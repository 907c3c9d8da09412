//! Generation against diffusers' StableDiffusionPipeline on a tiny pipeline (fixture), and
//! the visual-prompt conditioning.

use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use burn_flex::{Flex, FlexDevice};
use model_io::tensor_file::read_tensors;
use personalize::{GenerateOptions, GenerateRequest, Pipeline, RgbImage, VisualPrompt};
use q_aligner::{Aligner, AlignerSettings, QuerySelection};
#[path = "support/images.rs"]
mod images;
use images::levels;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn pipe() -> Pipeline<Flex> {
    Pipeline::load(&fixtures().join("pipeline"), &FlexDevice).unwrap()
}

#[test]
fn generate_matches_stable_diffusion_pipeline() {
    let pipe = pipe();
    let io = read_tensors(&fixtures().join("pipeline_io.safetensors")).unwrap();
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("pipeline_cases.json")).unwrap()).unwrap();
    for c in cases.as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let opts = images::case_options(c);
        let lat = io[&format!("{name}.latents")].to_float::<Flex, 4>("latents", &FlexDevice).unwrap();
        let mut steps = 0;
        let mut imgs = Vec::new();
        pipe.generate_each(GenerateRequest::new(&opts).latents(lat), &mut |_, _| steps += 1, &mut |_, img| {
            imgs.push(img);
            Ok(())
        })
        .unwrap();
        assert_eq!(steps, opts.steps, "{name}: one callback per step");
        assert_eq!(imgs.len(), opts.num_images);
        let (max, mean) = levels(&imgs, &io[&format!("{name}.images")]);
        eprintln!("{name}: max {max} levels, mean {mean:.4}");
        assert!(max <= 3 && mean <= 0.5, "{name}: max {max} levels, mean {mean}");
    }
}

fn aligner(k: usize) -> Aligner<Flex> {
    let s = AlignerSettings { num_queries: k, query_selection: QuerySelection::First, final_gelu: true };
    Aligner::new(8, 16, 32, &s, &mut seeded::SplitMix64::new(0), &FlexDevice)
}

fn queries() -> Tensor<Flex, 3> {
    let v: Vec<f32> = (0..2 * 6 * 8).map(|i| ((i * 29 % 53) as f32 / 26.0) - 1.0).collect();
    Tensor::from_data(TensorData::new(v, [2, 6, 8]), &FlexDevice)
}

#[test]
fn visual_prompt_adds_k_tokens_and_changes_the_image() {
    let pipe = pipe();
    let opts = GenerateOptions {
        prompt: "a photo of sks".into(),
        steps: 3,
        guidance: 3.0,
        height: Some(32),
        width: Some(32),
        seed: 5,
        ..Default::default()
    };
    let a = aligner(4);
    let v = VisualPrompt { aligner: &a, queries: queries() };
    let ctx = pipe.contexts(&opts, Some(&v), 1).unwrap();
    assert_eq!(ctx.dims(), [2, 77 + 4, 32], "uncond and cond, 77 + k tokens each");
    let text_only = pipe.generate(GenerateRequest::new(&opts)).unwrap();
    let with = pipe.generate(GenerateRequest::new(&opts).visual(&v)).unwrap();
    assert_ne!(text_only[0].data, with[0].data, "the visual prompt changes the image");

    // k = 0: identical to text-only.
    let a0 = aligner(0);
    let v0 = VisualPrompt { aligner: &a0, queries: queries() };
    assert_eq!(pipe.contexts(&opts, Some(&v0), 1).unwrap().dims(), [2, 77, 32]);
    let zero = pipe.generate(GenerateRequest::new(&opts).visual(&v0)).unwrap();
    assert_eq!(text_only[0].data, zero[0].data);
}

#[test]
fn seeds_are_reproducible_and_distinct() {
    let pipe = pipe();
    let opts = GenerateOptions {
        prompt: "a cat".into(),
        steps: 2,
        guidance: 1.0,
        height: Some(32),
        width: Some(32),
        num_images: 2,
        seed: 9,
        ..Default::default()
    };
    let a = pipe.generate(GenerateRequest::new(&opts)).unwrap();
    let b = pipe.generate(GenerateRequest::new(&opts)).unwrap();
    assert_eq!(a, b);
    assert_ne!(a[0].data, a[1].data, "two images of one batch differ");
    let c = pipe.generate(GenerateRequest::new(&GenerateOptions { seed: 10, ..opts })).unwrap();
    assert_ne!(a[0].data, c[0].data);
}

#[test]
fn bad_sizes_latents_and_aligners_are_errors() {
    let pipe = pipe();
    let opts =
        GenerateOptions { prompt: "x".into(), steps: 1, height: Some(30), width: Some(32), ..Default::default() };
    let msg = pipe.generate(GenerateRequest::new(&opts)).err().unwrap().to_string();
    assert!(msg.contains("--height 30") && msg.contains("multiple of 8"), "{msg}");
    let opts = GenerateOptions { height: Some(32), ..opts };
    let lat = Tensor::<Flex, 4>::zeros([1, 4, 5, 4], &FlexDevice);
    let msg = pipe.generate(GenerateRequest::new(&opts).latents(lat)).err().unwrap().to_string();
    assert!(msg.contains("latents have shape [1, 4, 5, 4]") && msg.contains("[N >= 1, 4, 4, 4]"), "{msg}");
    let wide =
        Aligner::<Flex>::new(8, 16, 24, &AlignerSettings::default(), &mut seeded::SplitMix64::new(0), &FlexDevice);
    let v = VisualPrompt { aligner: &wide, queries: Tensor::zeros([1, 8, 8], &FlexDevice) };
    let msg = pipe.generate(GenerateRequest::new(&opts).visual(&v)).err().unwrap().to_string();
    assert!(msg.contains("24") && msg.contains("32"), "{msg}");
}

#[test]
fn png_text_chunks_round_trip() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("0000.png");
    let img = RgbImage { width: 2, height: 1, data: vec![1, 2, 3, 250, 251, 252] };
    personalize::write_png(&p, &img, &[("prompt", "a cat".into()), ("seed", "7".into())]).unwrap();
    let (back, text) = personalize::read_png(&p).unwrap();
    assert_eq!(back, img);
    assert!(text.contains(&("prompt".to_string(), "a cat".to_string())));
    assert!(text.contains(&("seed".to_string(), "7".to_string())));
}

#[test]
fn a_pipeline_from_parts_generates_as_the_loaded_one() {
    let dir = fixtures().join("pipeline");
    let loaded = pipe();
    let parts = personalize::PipelineParts::<Flex> {
        tokenizer: clip_text::ClipTokenizer::from_dir(&dir.join("tokenizer")).unwrap(),
        text_encoder: clip_text::ClipTextModel::load(&dir.join("text_encoder"), &FlexDevice).unwrap(),
        unet: sd_unet::UNet2DConditionModel::load(&dir.join("unet"), &FlexDevice).unwrap(),
        unet_config: sd_unet::UNetConfig::load(&dir.join("unet")).unwrap(),
        vae: sd_vae::AutoencoderKl::load(&dir.join("vae"), &FlexDevice).unwrap(),
        vae_config: sd_vae::AutoencoderKlConfig::load(&dir.join("vae")).unwrap(),
        scheduler_dir: dir.join("scheduler"),
    };
    let parts = Pipeline::from_parts(parts, &FlexDevice).unwrap();
    assert_eq!(parts.default_size(), loaded.default_size());
    let opts = GenerateOptions {
        prompt: "a cat".into(),
        steps: 2,
        height: Some(32),
        width: Some(32),
        seed: 3,
        ..Default::default()
    };
    let a = loaded.generate(GenerateRequest::new(&opts)).unwrap();
    let b = parts.generate(GenerateRequest::new(&opts)).unwrap();
    assert_eq!(a, b);
}

/// A pipeline folder whose UNet is SDXL's but which lacks SDXL's second text encoder is refused
/// when loaded, naming `text_encoder_2` and SDXL, rather than failing on its first step for
/// lack of the added conditioning.
#[test]
fn an_sdxl_unet_without_the_second_encoder_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("pipe");
    for part in ["scheduler", "text_encoder", "tokenizer", "vae", "unet"] {
        let from =
            if part == "unet" { fixtures().join("unet/sdxl_fp16") } else { fixtures().join("pipeline").join(part) };
        std::fs::create_dir_all(base.join(part)).unwrap();
        for f in std::fs::read_dir(&from).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, base.join(part).join(f.file_name().unwrap())).unwrap();
        }
    }
    std::fs::copy(fixtures().join("pipeline/model_index.json"), base.join("model_index.json")).unwrap();
    let e = Pipeline::<Flex>::load(&base, &FlexDevice).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("text_encoder_2") && e.contains("SDXL"), "{e}");
}
