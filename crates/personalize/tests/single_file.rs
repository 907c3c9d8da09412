//! Single-file checkpoints (LDM layout) against diffusers' `from_single_file`, the inferred
//! configs of full-size SD 1.5 and 2.1 files, and the errors for files that are not one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn_flex::{Flex, FlexDevice};
use model_io::tensor_file::{read_tensors, write_tensors, HostTensor};
use personalize::{Base, Pipeline, SingleFile};

#[path = "support/images.rs"]
mod images;
#[path = "support/single_file.rs"]
mod support;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

use images::compare;

#[test]
fn single_files_generate_as_diffusers_from_single_file() {
    let io = read_tensors(&fixtures().join("single_file/io.safetensors")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let folder = Pipeline::<Flex>::load(&fixtures().join("pipeline"), &FlexDevice).unwrap();
    for (name, layout) in [("sd1", personalize::TextLayout::Clip), ("sd2", personalize::TextLayout::OpenClip)] {
        let file = support::write_single_file(&fixtures(), name, tmp.path());
        let base = Base::new(file).with_config(fixtures().join("pipeline"));
        assert_eq!(SingleFile::open(&base).unwrap().text_layout, layout);
        let pipe = Pipeline::<Flex>::open(&base, &FlexDevice).unwrap();
        let imgs = images::generate_on(&pipe, &io["latents"]);
        let max = compare(&imgs, &io[&format!("{name}.images")]);
        eprintln!("{name}: max {max} levels against from_single_file");
        assert!(max <= 3, "{name}: {max} levels from diffusers' from_single_file");
        // The UNet is the folder's under the same keys and shapes (its values rounded to f16/bf16).
        assert_eq!(pipe.base_unet_shapes, folder.base_unet_shapes, "{name}");
    }
}

/// The tiny SDXL pipeline as a single file (`conditioner.embedders.{0,1}.*`, OpenCLIP's
/// `text_projection` transposed) with the folder's configs: diffusers' `from_single_file` loaded
/// every weight back as the folder's (the fixture script checks), and the images match it with
/// and without a negative prompt (`force_zeros_for_empty_prompt` from model_index.json).
#[test]
fn sdxl_single_files_generate_as_diffusers_from_single_file() {
    let io = read_tensors(&fixtures().join("single_file/io.safetensors")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let folder = fixtures().join("sdxl_pipeline");
    let file = support::write_single_file(&fixtures(), "sdxl", tmp.path());
    let base = Base::new(&file).with_config(&folder);
    let f = SingleFile::open(&base).unwrap();
    assert!(f.text_encoder_2.is_some() && f.force_zeros_for_empty_prompt);
    let pipe = Pipeline::<Flex>::open(&base, &FlexDevice).unwrap();
    assert_eq!(pipe.architecture(), "sdxl");
    let from_folder = Pipeline::<Flex>::load(&folder, &FlexDevice).unwrap();
    assert_eq!(pipe.base_unet_shapes, from_folder.base_unet_shapes);
    // The same conditioning as the folder's, the second encoder's projection included.
    let p = ["a photo of a cat".to_string()];
    let (a, b) = (pipe.encode_text(&p).unwrap(), from_folder.encode_text(&p).unwrap());
    let pooled = |t: Option<burn::tensor::Tensor<Flex, 2>>| t.unwrap().into_data().to_vec::<f32>().unwrap();
    assert_eq!(a.0.into_data().to_vec::<f32>().unwrap(), b.0.into_data().to_vec::<f32>().unwrap());
    assert_eq!(pooled(a.1), pooled(b.1));
    for (case, negative) in [("neg", Some("blurry")), ("zeros", None)] {
        let opts = personalize::GenerateOptions {
            prompt: "a photo of a cat".into(),
            negative_prompt: negative.map(str::to_string),
            steps: 4,
            guidance: 5.0,
            height: Some(32),
            width: Some(48),
            ..Default::default()
        };
        let lat = io["sdxl.latents"].to_float::<Flex, 4>("latents", &FlexDevice).unwrap();
        let imgs = pipe.generate(personalize::GenerateRequest::new(&opts).latents(lat)).unwrap();
        let (max, mean) = images::levels(&imgs, &io[&format!("sdxl.{case}.images")]);
        eprintln!("sdxl {case}: max {max}, mean {mean:.3} levels against from_single_file");
        assert!(max <= 3, "sdxl {case}: {max} levels from diffusers' from_single_file");
    }
}

/// The key/shape lists of full-size SD 1.5 and 2.1 files, with their published configs.
fn shapes() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("single_file/shapes.json")).unwrap()).unwrap()
}

fn under(all: &serde_json::Value, prefix: &str) -> BTreeMap<String, Vec<usize>> {
    all.as_object()
        .unwrap()
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), serde_json::from_value(v.clone()).unwrap())))
        .collect()
}

#[test]
fn standard_configs_are_inferred_from_the_shapes() {
    for (name, open_clip) in [("sd15", false), ("sd21", true), ("sdxl", false)] {
        let m = &shapes()[name];
        let unet = sd_unet::ldm::infer_config(&under(&m["shapes"], sd_unet::ldm::PREFIX), name == "sd21").unwrap();
        for (k, want) in m["unet"].as_object().unwrap() {
            assert_eq!(&unet[k], want, "{name}: unet {k}");
        }
        let vae = sd_vae::ldm::infer_config(&under(&m["shapes"], "first_stage_model.")).unwrap();
        for (k, want) in m["vae"].as_object().unwrap() {
            // SDXL's VAE has SD's layout: its scale is set from the other parts (SingleFile::open).
            if !(name == "sdxl" && k == "scaling_factor") {
                assert_eq!(&vae[k], want, "{name}: vae {k}");
            }
        }
        let prefix = match (open_clip, name) {
            (true, _) => clip_text::ldm::OPEN_CLIP_PREFIX,
            (false, "sdxl") => clip_text::ldm::SDXL_CLIP_PREFIX,
            _ => clip_text::ldm::CLIP_PREFIX,
        };
        let text = clip_text::ldm::infer_config(&under(&m["shapes"], prefix), open_clip).unwrap();
        for (k, want) in m["text_encoder"].as_object().unwrap() {
            assert_eq!(&text[k], want, "{name}: text encoder {k}");
        }
        // Every UNet and VAE key has a place, and maps back to itself.
        let ucfg: sd_unet::UNetConfig = serde_json::from_value(unet).unwrap();
        let umap = sd_unet::ldm::key_map(&ucfg);
        let vcfg: sd_vae::AutoencoderKlConfig = serde_json::from_value(vae).unwrap();
        let vmap = sd_vae::ldm::key_map(&vcfg);
        for (k, _) in under(&m["shapes"], sd_unet::ldm::PREFIX) {
            let d = umap.to_model(&k).unwrap_or_else(|| panic!("{name}: {k} has no place"));
            assert_eq!(umap.to_file(&d).as_deref(), Some(k.as_str()), "{name}: {k} -> {d}");
        }
        for (k, _) in under(&m["shapes"], "first_stage_model.") {
            let d = vmap.to_model(&k).unwrap_or_else(|| panic!("{name}: {k} has no place"));
            assert_eq!(vmap.to_file(&d).as_deref(), Some(k.as_str()), "{name}: {k} -> {d}");
        }
        if name == "sdxl" {
            // OpenCLIP bigG: all 32 blocks run, its projection read transposed.
            let shapes2 = under(&m["shapes"], clip_text::ldm::SDXL_OPEN_CLIP_PREFIX);
            let text2 = clip_text::ldm::infer_config_with_projection(&shapes2).unwrap();
            for (k, want) in m["text_encoder_2"].as_object().unwrap() {
                assert_eq!(&text2[k], want, "{name}: text encoder 2 {k}");
            }
            let e = clip_text::ldm::open_clip_entries_under(clip_text::ldm::SDXL_OPEN_CLIP_PREFIX, &shapes2, 32, true)
                .unwrap();
            assert_eq!(e.iter().filter(|(k, ..)| k.ends_with("q_proj.weight")).count(), 32);
            assert!(e.iter().any(|(k, _, d)| k == "text_projection.weight" && *d == model_io::Derive::Transpose));
            // Every tensor of the file has a place.
            let prefixes = [sd_unet::ldm::PREFIX, "first_stage_model.", prefix, clip_text::ldm::SDXL_OPEN_CLIP_PREFIX];
            for k in m["shapes"].as_object().unwrap().keys() {
                assert!(prefixes.iter().any(|p| k.starts_with(p)), "{k}");
            }
        }
        if open_clip {
            // 24 blocks in the file, 23 run: the last is skipped, the rest split into q/k/v.
            let e = clip_text::ldm::open_clip_entries(&under(&m["shapes"], prefix), 23).unwrap();
            assert!(e.iter().all(|(_, f, _)| !f.contains("resblocks.23.")));
            assert_eq!(e.iter().filter(|(k, ..)| k.ends_with("q_proj.weight")).count(), 23);
        }
    }
}

#[test]
fn a_non_standard_file_without_config_asks_for_one() {
    let d = tempfile::tempdir().unwrap();
    let file = support::write_single_file(&fixtures(), "sd1", d.path());
    let e = SingleFile::open(&Base::new(file)).err().unwrap().to_string();
    assert!(e.contains("sd1.safetensors") && e.contains("--config") && e.contains("[16, 32]"), "{e}");
}

fn write(dir: &Path, name: &str, keys: &[&str]) -> PathBuf {
    let p = dir.join(name);
    let t: BTreeMap<String, HostTensor> =
        keys.iter().map(|k| (k.to_string(), HostTensor::f32(vec![1], vec![0.0]))).collect();
    write_tensors(&p, &t, &BTreeMap::new()).unwrap();
    p
}

#[test]
fn files_that_are_not_sd_single_files_are_named_errors() {
    let d = tempfile::tempdir().unwrap();
    let open = |p: PathBuf| SingleFile::open(&Base::new(p)).err().unwrap().to_string();
    // A pickle is refused without being read, with a way out.
    let ckpt = d.path().join("model.ckpt");
    std::fs::write(&ckpt, b"PK\x03\x04rest").unwrap();
    let e = open(ckpt);
    assert!(e.contains("model.ckpt") && e.contains("arbitrary code") && e.contains("safetensors"), "{e}");
    // An SDXL file missing its second encoder, and a refiner, say so.
    let e = open(write(
        d.path(),
        "xl.safetensors",
        &["conditioner.embedders.0.transformer.x", "model.diffusion_model.a", "first_stage_model.b"],
    ));
    assert!(e.contains("xl.safetensors") && e.contains("SDXL") && e.contains("conditioner.embedders.1.model"), "{e}");
    let e =
        open(write(d.path(), "refiner.safetensors", &["conditioner.embedders.0.model.x", "model.diffusion_model.a"]));
    assert!(e.contains("refiner") && e.contains("not supported"), "{e}");
    let e = open(write(
        d.path(),
        "mixed.safetensors",
        &["conditioner.embedders.0.transformer.x", "cond_stage_model.transformer.y", "model.diffusion_model.a"],
    ));
    assert!(e.contains("keep one"), "{e}");
    let e = open(write(d.path(), "flux.safetensors", &["double_blocks.0.img_attn.x", "double_blocks.1.y"]));
    assert!(e.contains("flux.safetensors") && e.contains("`double_blocks.0.*`: 1 tensors"), "{e}");
    let both = [
        "model.diffusion_model.a",
        "first_stage_model.b",
        "cond_stage_model.transformer.c",
        "cond_stage_model.model.d",
    ];
    let e = open(write(d.path(), "both.safetensors", &both));
    assert!(e.contains("two text encoders"), "{e}");
    let e = open(write(d.path(), "novae.safetensors", &["model.diffusion_model.a", "cond_stage_model.transformer.b"]));
    assert!(e.contains("no VAE") && e.contains("unet: 1 tensors"), "{e}");
    // Damaged shapes and indices are errors, not panics or endless loops.
    let p = d.path().join("rank0.safetensors");
    let t: BTreeMap<String, HostTensor> = [
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.18446744073709551615.0.weight",
        "first_stage_model.encoder.conv_in.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    ]
    .iter()
    .map(|k| (k.to_string(), HostTensor::f32(vec![], vec![1.0])))
    .collect();
    write_tensors(&p, &t, &BTreeMap::new()).unwrap();
    let e = open(p);
    assert!(e.contains("input_blocks.0.0.weight") && e.contains("too few dimensions"), "{e}");
    // A truncated download.
    let bytes = std::fs::read(support::write_single_file(&fixtures(), "sd1", d.path())).unwrap();
    let cut = d.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = open(cut);
    assert!(e.contains("cut.safetensors") && e.contains("truncated"), "{e}");
    // --config and --prediction-type are for single files.
    let e = Pipeline::<Flex>::open(&Base::new(fixtures().join("pipeline")).with_config("x"), &FlexDevice)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("single-file"), "{e}");
    let e = SingleFile::open(
        &Base::new(support::write_single_file(&fixtures(), "sd1", d.path()))
            .with_config(fixtures().join("pipeline"))
            .with_prediction_type("x0"),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("--prediction-type `x0`"), "{e}");
}

#[test]
fn the_prediction_type_reaches_the_scheduler() {
    let d = tempfile::tempdir().unwrap();
    let base =
        Base::new(support::write_single_file(&fixtures(), "sd1", d.path())).with_config(fixtures().join("pipeline"));
    let f = SingleFile::open(&base.clone().with_prediction_type("v_prediction")).unwrap();
    let got: serde_json::Value = f.scheduler_config.read().unwrap();
    assert_eq!(got["prediction_type"], "v_prediction");
    let f = SingleFile::open(&base).unwrap();
    let got: serde_json::Value = f.scheduler_config.read().unwrap();
    assert_eq!(got["prediction_type"], "epsilon");
    // An SD 2.x file takes its config's prediction type; only without one is it SD 2.1's.
    let sd2 =
        Base::new(support::write_single_file(&fixtures(), "sd2", d.path())).with_config(fixtures().join("pipeline"));
    let got: serde_json::Value = SingleFile::open(&sd2).unwrap().scheduler_config.read().unwrap();
    assert_eq!(got["prediction_type"], "epsilon");
}
