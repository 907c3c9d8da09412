//! Training on the tiny SDXL folder (tests/fixtures/sdxl_pipeline): LoRA and full UNet, the
//! concept records `sdxl` and generates, the kohya file uses SGM's names and merges as the PEFT
//! file does, and both files load in diffusers' `StableDiffusionXLPipeline`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn_autodiff::Autodiff;
use burn_flex::{Flex, FlexDevice};
use model_io::tensor_file::{read_tensors, write_tensors, HostTensor};
use personalize::train::{self, TrainConfig, TrainData, TrainRequest, UnetMode};
use personalize::{Base, Concept, Pipeline, RgbImage};

type AD = Autodiff<Flex>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn xl() -> PathBuf {
    fixtures().join("sdxl_pipeline")
}

fn picture(w: usize, h: usize, seed: u32) -> RgbImage {
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let (fx, fy, s) = (x as f32 / w as f32, y as f32 / h as f32, seed as f32);
            data.push((127.5 + 120.0 * (6.0 * fx + s).sin()) as u8);
            data.push((127.5 + 120.0 * (5.0 * fy + 2.0 * s).cos()) as u8);
            data.push((127.5 + 120.0 * (4.0 * (fx + fy) + 3.0 * s).sin()) as u8);
        }
    }
    RgbImage { width: w, height: h, data }
}

fn data() -> TrainData {
    let mut rng = scheduler::SeededRng::new(5);
    let mut q = vec![0f32; 2 * 12 * 24];
    rng.fill_standard_normal(&mut q);
    TrainData {
        // A wide and a tall image: their views get different time ids.
        images: vec![picture(48, 36, 0), picture(32, 44, 1)],
        queries: HostTensor::f32(vec![2, 12, 24], q),
        class_images: vec![],
    }
}

fn cfg(mode: UnetMode) -> TrainConfig {
    TrainConfig {
        steps: 4,
        lr: 1e-2,
        batch: 2,
        resolution: 32,
        num_queries: 4,
        aligner_hidden: Some(16),
        unet_mode: mode,
        seed: 3,
        save_every: 0,
        augment: 1,
        sample_steps: 2,
        prompt: "a photo of a toy".into(),
        ..TrainConfig::default()
    }
}

fn run(c: &TrainConfig, out: &Path) -> train::TrainReport {
    let request = TrainRequest { base: &Base::new(xl()), config: c, data: &data(), out, resume: false };
    train::train::<AD>(&request, &FlexDevice, &mut |_| {}).unwrap()
}

#[test]
fn sdxl_lora_training_writes_a_concept_that_generates() {
    let d = tempfile::tempdir().unwrap();
    let c = cfg(UnetMode::Lora { rank: 2, alpha: 2.0 });
    let r = run(&c, d.path());
    assert_eq!(r.steps_done, 4);
    assert!(r.losses.iter().all(|l| l.is_finite()), "{:?}", r.losses);
    for f in [
        "concept.json",
        "aligner.safetensors",
        "unet_lora.safetensors",
        "unet_lora.kohya.safetensors",
        "samples/step-000004.png",
    ] {
        assert!(d.path().join(f).is_file(), "missing {f}");
    }
    let concept = Concept::<Flex>::load(d.path(), &FlexDevice).unwrap();
    assert_eq!(concept.info.architecture.as_deref(), Some("sdxl"));
    let mut pipe = Pipeline::<Flex>::load(&xl(), &FlexDevice).unwrap();
    let before = pipe.unet_fingerprint.clone();
    assert_eq!(concept.info.base_unet_fingerprint, before);
    pipe.apply_concept(&concept, false).unwrap();
    let opts = personalize::GenerateOptions {
        prompt: "a photo of a toy".into(),
        steps: 2,
        guidance: 5.0,
        seed: 1,
        ..Default::default()
    };
    let v = personalize::VisualPrompt { aligner: &concept.aligner, queries: concept.queries.clone().unwrap() };
    assert_eq!(pipe.contexts(&opts, Some(&v), 1).unwrap().dims(), [2, 77 + 4, 36], "[77 text][k visual] of 36");
    let with = pipe.generate(personalize::GenerateRequest::new(&opts).visual(&v)).unwrap();
    let text_only = pipe.generate(personalize::GenerateRequest::new(&opts)).unwrap();
    assert_ne!(with[0].data, text_only[0].data, "the visual prompt changes nothing");

    // The kohya file names SDXL's modules as sd-scripts does, and merges to the PEFT file's weights.
    let kohya = read_tensors(&d.path().join("unet_lora.kohya.safetensors")).unwrap();
    let sgm = ["lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"];
    assert!(kohya.keys().all(|k| sgm.iter().any(|p| k.starts_with(p))), "{:?}", kohya.keys().next());
    let ucfg = sd_unet::UNetConfig::load(&xl().join("unet")).unwrap();
    let merged = |file: &str| {
        let mut u = model_io::Checkpoint::open_dir(&xl().join("unet"), &["diffusion_pytorch_model"]).unwrap();
        let mut t = model_io::Checkpoint::open_dir(&xl().join("text_encoder"), &["model"]).unwrap();
        let spec = personalize::LoraSpec { path: d.path().join(file), scale: 1.0 };
        let s = personalize::merge_loras::<Flex>(&[spec], &mut u, &ucfg, &mut t, None, &FlexDevice).unwrap();
        assert!(s[0].unet_layers > 0);
        let names: Vec<String> = u.names().map(str::to_string).collect();
        names.into_iter().map(|k| (k.clone(), u.read_f32(&k).unwrap().0)).collect::<BTreeMap<_, _>>()
    };
    let (a, b) = (merged("unet_lora.safetensors"), merged("unet_lora.kohya.safetensors"));
    let worst = a
        .iter()
        .map(|(k, v)| v.iter().zip(&b[k]).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max))
        .fold(0f32, f32::max);
    assert!(worst < 1e-6, "kohya and PEFT merges differ by {worst}");
}

#[test]
fn sdxl_full_unet_training_changes_the_unet_and_records_sdxl() {
    let d = tempfile::tempdir().unwrap();
    let mut c = cfg(UnetMode::Full);
    c.steps = 2;
    c.sample_steps = 0;
    c.lr = 1e-4;
    let r = run(&c, d.path());
    assert!(r.losses.iter().all(|l| l.is_finite()), "{:?}", r.losses);
    let concept = Concept::<Flex>::load(d.path(), &FlexDevice).unwrap();
    assert_eq!(concept.info.architecture.as_deref(), Some("sdxl"));
    let trained = read_tensors(&d.path().join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("unet/config.json")).unwrap()).unwrap();
    assert_eq!(cfg_json["addition_embed_type"], "text_time");
    // add_embedding is trained too: the pooled embeddings and time ids reach the UNet.
    let base = model_io::Checkpoint::open_dir(&xl().join("unet"), &["diffusion_pytorch_model"]).unwrap();
    let key = "add_embedding.linear_1.weight";
    let (was, _) = base.read_f32(key).unwrap();
    let now = trained[key].as_f32(key).unwrap();
    assert!(was.iter().zip(now).any(|(a, b)| (a - b).abs() > 1e-7), "{key} did not change");
}

/// The SDXL LoRA and its kohya file against diffusers' `load_lora_weights` on the SDXL pipeline
/// (xtask/fixtures/fixtures_train.py `make_sdxl`). With PERSONALIZE_WRITE_TRAIN_FIXTURE=1 this
/// trains the LoRA and writes the inputs instead (then run `make_fixtures.py train_sdxl`).
#[test]
fn sdxl_lora_files_load_in_diffusers() {
    let fx = fixtures().join("train/sdxl");
    if std::env::var("PERSONALIZE_WRITE_TRAIN_FIXTURE").is_ok() {
        std::fs::create_dir_all(&fx).unwrap();
        let d = tempfile::tempdir().unwrap();
        let mut c = cfg(UnetMode::Lora { rank: 2, alpha: 3.0 });
        c.steps = 5;
        c.sample_steps = 0;
        run(&c, d.path());
        for f in ["unet_lora.safetensors", "unet_lora.kohya.safetensors"] {
            std::fs::copy(d.path().join(f), fx.join(f)).unwrap();
        }
        let mut rng = scheduler::SeededRng::new(11);
        let mut n = |len: usize| {
            let mut v = vec![0f32; len];
            rng.fill_standard_normal(&mut v);
            v
        };
        let inputs = BTreeMap::from([
            ("sample".to_string(), HostTensor::f32(vec![2, 4, 4, 4], n(128))),
            ("timestep".to_string(), HostTensor::f32(vec![2], vec![17.0, 613.0])),
            ("encoder_hidden_states".to_string(), HostTensor::f32(vec![2, 81, 36], n(2 * 81 * 36))),
            ("text_embeds".to_string(), HostTensor::f32(vec![2, 12], n(24))),
            (
                "time_ids".to_string(),
                HostTensor::f32(vec![2, 6], vec![36., 48., 0., 3., 32., 32., 44., 32., 5., 0., 32., 32.]),
            ),
        ]);
        write_tensors(&fx.join("lora_unet_inputs.safetensors"), &inputs, &BTreeMap::new()).unwrap();
        eprintln!("wrote {}; now run make_fixtures.py train_sdxl", fx.display());
        return;
    }
    let io = read_tensors(&fx.join("lora_unet_io.safetensors")).expect("fixture missing: see this test's doc");
    let mut unet = sd_unet::UNet2DConditionModel::<Flex>::load(&xl().join("unet"), &FlexDevice).unwrap();
    sd_unet::lora::load_lora(&mut unet, &read_tensors(&fx.join("unet_lora.safetensors")).unwrap(), None).unwrap();
    let f = |k: &str| io[k].clone();
    let x = f("sample").to_float::<Flex, 4>("sample", &FlexDevice).unwrap();
    let t = f("timestep").to_float::<Flex, 1>("timestep", &FlexDevice).unwrap();
    let c = f("encoder_hidden_states").to_float::<Flex, 3>("ehs", &FlexDevice).unwrap();
    let added = sd_unet::AddedConditioning {
        text_embeds: f("text_embeds").to_float::<Flex, 2>("text_embeds", &FlexDevice).unwrap(),
        time_ids: f("time_ids").to_float::<Flex, 2>("time_ids", &FlexDevice).unwrap(),
    };
    let ours = HostTensor::from_tensor(unet.forward_with(x.clone(), t.clone(), c.clone(), Some(&added)).unwrap());
    for name in ["out_peft", "out_kohya"] {
        let d = ours.max_abs_diff(&io[name]);
        eprintln!("SDXL LoRA UNet vs diffusers ({name}): max abs diff {d:e}");
        assert!(d < 1e-4, "{name}: max abs diff {d}");
    }
    let plain = sd_unet::UNet2DConditionModel::<Flex>::load(&xl().join("unet"), &FlexDevice).unwrap();
    let base_out = HostTensor::from_tensor(plain.forward_with(x, t, c, Some(&added)).unwrap());
    assert!(base_out.max_abs_diff(&io["out_peft"]) > 1e-3, "the LoRA does not change the output");
}
