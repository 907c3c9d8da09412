//! `MergedModel`: a base with LoRAs merged, written as a diffusers folder and as a single file,
//! read back by the loaders (whose forward mapping is tested against diffusers).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn_flex::{Flex, FlexDevice};
use model_io::tensor_file::read_tensors;
use personalize::{Base, LoraSpec, MergedModel, RgbImage};

#[path = "support/images.rs"]
mod images;
#[path = "support/single_file.rs"]
mod support;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn kohya(scale: f64) -> Vec<LoraSpec> {
    vec![LoraSpec { path: fixtures().join("lora/in/kohya.safetensors"), scale }]
}

fn generate(base: &Base) -> Vec<RgbImage> {
    let io = read_tensors(&fixtures().join("lora/in/io.safetensors")).unwrap();
    images::generate(base, &io["latents"])
}

fn folder() -> PathBuf {
    fixtures().join("pipeline")
}

#[test]
fn a_merged_diffusers_folder_generates_as_the_base_with_its_loras() {
    let tmp = tempfile::tempdir().unwrap();
    let base = Base::new(folder()).with_loras(kohya(0.6));
    let want = generate(&base);
    let m = MergedModel::open::<Flex>(&base, None, false, &FlexDevice).unwrap();
    let out = tmp.path().join("merged");
    m.write_diffusers(&out, false).unwrap();
    assert_eq!(generate(&Base::new(&out)), want);
    // The folder's other files are copied; nothing is left beside it.
    for f in ["model_index.json", "tokenizer/tokenizer.json", "scheduler/scheduler_config.json", "vae/config.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let names: Vec<String> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    assert_eq!(names, ["merged"]);
    // Nothing is replaced unasked; with overwrite the folder is replaced whole.
    let e = m.write_diffusers(&out, false).unwrap_err().to_string();
    assert!(e.contains("merged") && e.contains("--overwrite"), "{e}");
    let plain = MergedModel::open::<Flex>(&Base::new(folder()), None, false, &FlexDevice).unwrap();
    plain.write_diffusers(&out, true).unwrap();
    assert_eq!(generate(&Base::new(&out)), generate(&Base::new(folder())));
}

/// The keys of a single file written from the recipe (diffusers' reverse mapping).
fn recipe_keys(name: &str) -> BTreeSet<String> {
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("single_file/recipe.json")).unwrap()).unwrap();
    r[name].as_array().unwrap().iter().map(|e| e["key"].as_str().unwrap().to_string()).collect()
}

fn file_keys(path: &Path) -> BTreeSet<String> {
    model_io::Checkpoint::open_files("f", &[path.to_path_buf()]).unwrap().names().map(String::from).collect()
}

#[test]
fn single_files_are_written_in_the_layout_diffusers_reverse_mapping_writes() {
    let tmp = tempfile::tempdir().unwrap();
    // SD 1.x from the folder, a LoRA merged: the keys of diffusers' conversion script, and the
    // images of the folder with the LoRA.
    let base = Base::new(folder()).with_loras(kohya(0.6));
    let out = tmp.path().join("sd1.safetensors");
    MergedModel::open::<Flex>(&base, None, false, &FlexDevice).unwrap().write_single_file(&out, false).unwrap();
    let want: BTreeSet<String> = recipe_keys("sd1").into_iter().filter(|k| !k.ends_with("position_ids")).collect();
    assert_eq!(file_keys(&out), want);
    assert_eq!(generate(&Base::new(&out).with_config(folder())), generate(&base));
    // SD 2.x's OpenCLIP layout, from an SD 2.x single file: q/k/v fused back into in_proj.
    let sd2 = support::write_single_file(&fixtures(), "sd2", tmp.path());
    let base = Base::new(&sd2).with_config(folder());
    let out = tmp.path().join("sd2-again.safetensors");
    MergedModel::open::<Flex>(&base, None, false, &FlexDevice).unwrap().write_single_file(&out, false).unwrap();
    assert_eq!(file_keys(&out), file_keys(&sd2));
    assert_eq!(generate(&Base::new(&out).with_config(folder())), generate(&base));
    // A single file to a diffusers folder.
    let dir = tmp.path().join("from-sd2");
    MergedModel::open::<Flex>(&base, None, false, &FlexDevice).unwrap().write_diffusers(&dir, false).unwrap();
    assert_eq!(generate(&Base::new(&dir)), generate(&base));
}

/// A folder as older releases and `fetch --fp16` leave them: the text encoder with its integer
/// `position_ids`, the VAE only as `.fp16`, a whole-model checkpoint at the top.
#[test]
fn older_folders_export_to_plain_diffusers_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("base");
    for sub in ["", "unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        std::fs::create_dir_all(src.join(sub)).unwrap();
    }
    for f in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "text_encoder/config.json",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "scheduler/scheduler_config.json",
    ] {
        std::fs::copy(folder().join(f), src.join(f)).unwrap();
    }
    std::fs::copy(
        folder().join("vae/diffusion_pytorch_model.safetensors"),
        src.join("vae/diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    let mut text = read_tensors(&folder().join("text_encoder/model.fp16.safetensors")).unwrap();
    text.insert("embeddings.position_ids".into(), model_io::tensor_file::HostTensor::i64(vec![1, 8], (0..8).collect()));
    model_io::tensor_file::write_tensors(&src.join("text_encoder/model.safetensors"), &text, &Default::default())
        .unwrap();
    std::fs::write(src.join("model.safetensors"), b"a whole-model file").unwrap();
    let out = tmp.path().join("out");
    let m = MergedModel::open::<Flex>(&Base::new(&src), None, false, &FlexDevice).unwrap();
    m.write_diffusers(&out, false).unwrap();
    assert!(out.join("vae/diffusion_pytorch_model.safetensors").is_file());
    assert!(!out.join("vae/diffusion_pytorch_model.fp16.safetensors").exists());
    assert!(!out.join("model.safetensors").exists());
    let written = read_tensors(&out.join("text_encoder/model.safetensors")).unwrap();
    assert!(!written.contains_key("embeddings.position_ids"));
    assert_eq!(generate(&Base::new(&out)), generate(&Base::new(folder())));
    // --config and --prediction-type belong to single files.
    let e = MergedModel::open::<Flex>(&Base::new(&src).with_prediction_type("epsilon"), None, false, &FlexDevice)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("single-file"), "{e}");
}

/// SDXL bases: LoRAs for the UNet and both text encoders merged, written as a
/// `StableDiffusionXLPipeline` folder (with `text_encoder_2`, `tokenizer_2`) and as an SDXL single
/// file in the keys of diffusers' reverse mapping (`conditioner.embedders.{0,1}`, OpenCLIP's
/// transposed `text_projection`); each generates as the base with the LoRAs, which is diffusers'
/// `set_adapters` image within 3 levels (`lora_in.rs`).
#[test]
fn sdxl_bases_export_with_their_second_text_encoder() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixtures().join("lora/sdxl");
    let io = read_tensors(&dir.join("io.safetensors")).unwrap();
    let xl_dir = fixtures().join("sdxl_pipeline");
    let loras = vec![
        LoraSpec { path: dir.join("kohya.safetensors"), scale: 0.7 },
        LoraSpec { path: dir.join("peft.safetensors"), scale: 1.3 },
    ];
    let run = |base: &Base| images::generate_sdxl_lora_case(base, &io["latents"]);
    let base = Base::new(&xl_dir).with_loras(loras);
    let want = run(&base);
    let (max, _) = images::levels(&want, &io["both.images"]);
    assert!(max <= 3, "{max} levels from diffusers' set_adapters");
    let m = MergedModel::open::<Flex>(&base, None, false, &FlexDevice).unwrap();

    let folder = tmp.path().join("merged");
    m.write_diffusers(&folder, false).unwrap();
    for f in ["text_encoder_2/model.safetensors", "text_encoder_2/config.json", "tokenizer_2/vocab.json"] {
        assert!(folder.join(f).is_file(), "{f}");
    }
    assert_eq!(run(&Base::new(&folder)), want);

    let file = tmp.path().join("merged.safetensors");
    m.write_single_file(&file, false).unwrap();
    let keys: BTreeSet<String> = recipe_keys("sdxl").into_iter().filter(|k| !k.ends_with("position_ids")).collect();
    assert_eq!(file_keys(&file), keys);
    assert!(Base::new(&file).is_sdxl());
    assert_eq!(run(&Base::new(&file).with_config(&xl_dir)), want);
    // Without LoRAs the file holds the recipe's tensors (diffusers' reverse mapping of the folder).
    let plain = tmp.path().join("plain.safetensors");
    let m = MergedModel::open::<Flex>(&Base::new(&xl_dir), None, false, &FlexDevice).unwrap();
    m.write_single_file(&plain, false).unwrap();
    let recipe = read_tensors(&support::write_single_file(&fixtures(), "sdxl", tmp.path())).unwrap();
    let ours = read_tensors(&plain).unwrap();
    for (k, t) in &ours {
        let r = recipe[k].as_f32(k).unwrap();
        assert_eq!(t.as_f32(k).unwrap(), r, "{k}");
    }
    // A folder from the single file: an SDXL pipeline again.
    let again = tmp.path().join("from-file");
    let m = MergedModel::open::<Flex>(&Base::new(&plain).with_config(&xl_dir), None, false, &FlexDevice).unwrap();
    m.write_diffusers(&again, false).unwrap();
    let index = std::fs::read_to_string(again.join("model_index.json")).unwrap();
    assert!(index.contains("StableDiffusionXLPipeline") && index.contains("tokenizer_2"), "{index}");
    assert_eq!(run(&Base::new(&again)), run(&Base::new(&xl_dir)));
}
