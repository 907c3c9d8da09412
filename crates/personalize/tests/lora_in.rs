//! LoRAs in (`Base::with_loras`, `generate --lora`): kohya and PEFT files against diffusers'
//! `load_lora_weights` + `set_adapters`, and the errors for files that do not fit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn_flex::{Flex, FlexDevice};
use model_io::tensor_file::{read_tensors, read_tensors_with_metadata, to_bytes, HostTensor};
use personalize::{Base, LoraSpec, Pipeline, RgbImage};

#[path = "support/images.rs"]
mod images;
#[path = "support/single_file.rs"]
mod support;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn lora(name: &str) -> PathBuf {
    fixtures().join("lora/in").join(name)
}

fn spec(path: &Path, scale: f64) -> LoraSpec {
    LoraSpec { path: path.to_path_buf(), scale }
}

use images::compare;

fn generate(base: &Base) -> Vec<RgbImage> {
    let io = read_tensors(&lora("io.safetensors")).unwrap();
    images::generate(base, &io["latents"])
}

fn folder() -> Base {
    Base::new(fixtures().join("pipeline"))
}

#[test]
fn kohya_and_peft_loras_generate_as_diffusers_set_adapters() {
    let io = read_tensors(&lora("io.safetensors")).unwrap();
    let (kohya, peft) = (lora("kohya.safetensors"), lora("peft.safetensors"));
    let cases = [
        ("kohya", vec![spec(&kohya, 0.6)]),
        ("peft", vec![spec(&peft, 1.4)]),
        ("both", vec![spec(&kohya, 0.6), spec(&peft, 1.4)]),
    ];
    let plain = generate(&folder());
    for (name, loras) in cases {
        let imgs = generate(&folder().with_loras(loras));
        let max = compare(&imgs, &io[&format!("{name}.images")]);
        let change = compare(&plain, &io[&format!("{name}.images")]);
        eprintln!("{name}: max {max} levels against diffusers (the LoRA changes the image by {change})");
        assert!(max <= 3, "{name}: {max} levels from diffusers' set_adapters");
        assert!(change > 20, "{name}: without the LoRA only {change} levels off: the test would be weak");
    }
}

/// SDXL's LoRAs: kohya's SGM names (`lora_unet_input_blocks_*`, `lora_te1_`/`lora_te2_`) and a
/// diffusers file with `text_encoder_2` adapters and metadata, against StableDiffusionXLPipeline's
/// `load_lora_weights` + `set_adapters` (tests/fixtures/lora/sdxl); and on the SDXL single file.
#[test]
fn sdxl_loras_generate_as_diffusers_set_adapters() {
    let dir = fixtures().join("lora/sdxl");
    let io = read_tensors(&dir.join("io.safetensors")).unwrap();
    let (kohya, peft) = (dir.join("kohya.safetensors"), dir.join("peft.safetensors"));
    let xl = || Base::new(fixtures().join("sdxl_pipeline"));
    let run = |base: &Base| images::generate_sdxl_lora_case(base, &io["latents"]);
    let plain = run(&xl());
    let cases = [
        ("kohya", vec![spec(&kohya, 0.7)]),
        ("peft", vec![spec(&peft, 1.3)]),
        ("both", vec![spec(&kohya, 0.7), spec(&peft, 1.3)]),
    ];
    for (name, loras) in cases {
        let want = &io[&format!("{name}.images")];
        let (max, mean) = images::levels(&run(&xl().with_loras(loras)), want);
        let change = compare(&plain, want);
        eprintln!("sdxl {name}: max {max}, mean {mean:.3} levels against diffusers (the LoRA changes it by {change})");
        assert!(max <= 3, "sdxl {name}: {max} levels from diffusers' set_adapters");
        assert!(change > 20, "sdxl {name}: without the LoRA only {change} levels off: the test would be weak");
    }
    // Every module of each file lands on the model it names.
    let xl_dir = fixtures().join("sdxl_pipeline");
    let open = |sub: &str, stem: &str| model_io::Checkpoint::open_dir(&xl_dir.join(sub), &[stem]).unwrap();
    let cfg = sd_unet::UNetConfig::load(&xl_dir.join("unet")).unwrap();
    for (file, [unet, te, te2]) in
        [(&kohya, ["lora_unet_", "lora_te1_", "lora_te2_"]), (&peft, ["unet.", "text_encoder.", "text_encoder_2."])]
    {
        let keys: Vec<String> = read_tensors(file).unwrap().into_keys().collect();
        let count = |p: &str| {
            keys.iter()
                .filter(|k| k.starts_with(p) && (k.ends_with("lora_down.weight") || k.ends_with("lora_A.weight")))
                .count()
        };
        let (mut u, mut t, mut t2) =
            (open("unet", "diffusion_pytorch_model"), open("text_encoder", "model"), open("text_encoder_2", "model"));
        let s = personalize::merge_loras::<Flex>(&[spec(file, 1.0)], &mut u, &cfg, &mut t, Some(&mut t2), &FlexDevice)
            .unwrap();
        let got = (s[0].unet_layers, s[0].text_encoder_layers, s[0].text_encoder_2_layers);
        assert_eq!(got, (count(unet), count(te), count(te2)), "{}", file.display());
        assert!(got.0 > 0 && got.1 > 0 && got.2 > 0, "{got:?}");
    }
    // The single file (f16 weights) with the kohya LoRA gives the folder's image to a level or two.
    let tmp = tempfile::tempdir().unwrap();
    let file = support::write_single_file(&fixtures(), "sdxl", tmp.path());
    let single = run(&Base::new(file).with_config(&xl_dir).with_loras(vec![spec(&kohya, 0.7)]));
    let max = compare(&single, &io["kohya.images"]);
    assert!(max <= 3, "SDXL single file with a kohya LoRA: {max} levels from diffusers");
}

/// Rewrites a LoRA file's tensors (and keeps its metadata) under `dir`.
fn rewrite(
    src: &Path,
    dir: &Path,
    name: &str,
    f: impl Fn(BTreeMap<String, HostTensor>) -> BTreeMap<String, HostTensor>,
) -> PathBuf {
    let (t, meta) = read_tensors_with_metadata(src).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, to_bytes(&f(t), &meta)).unwrap();
    path
}

#[test]
fn older_spellings_and_single_files_give_the_same_images() {
    let tmp = tempfile::tempdir().unwrap();
    let want = generate(&folder().with_loras(vec![spec(&lora("peft.safetensors"), 1.4)]));
    // diffusers with transformers 4 wrote the text encoder's modules under `text_model.`.
    let tf4 = rewrite(&lora("peft.safetensors"), tmp.path(), "tf4.safetensors", |t| {
        t.into_iter()
            .map(|(k, v)| (k.replace("text_encoder.encoder.", "text_encoder.text_model.encoder."), v))
            .collect()
    });
    assert_eq!(generate(&folder().with_loras(vec![spec(&tf4, 1.4)])), want, "transformers 4 key spelling");
    // diffusers' attention-processor format (`attn1.processor.to_q_lora.down.weight`; the text
    // encoder's `self_attn.to_q_lora`), alphas as integer tensors.
    let processor = rewrite(&lora("peft.safetensors"), tmp.path(), "processor.safetensors", |t| {
        t.into_iter()
            .map(|(k, v)| {
                let k = k.replace(".lora_A.weight", "_lora.down.weight").replace(".lora_B.weight", "_lora.up.weight");
                let k = k
                    .replace("attn1.to_", "attn1.processor.to_")
                    .replace("attn2.to_", "attn2.processor.to_")
                    .replace("self_attn.q_proj_lora", "self_attn.to_q_lora");
                (k, v)
            })
            .collect()
    });
    assert_eq!(generate(&folder().with_loras(vec![spec(&processor, 1.4)])), want, "processor format");
    // A kohya file is the same with its scale split between the file's alphas and the weight.
    let kohya = generate(&folder().with_loras(vec![spec(&lora("kohya.safetensors"), 0.6)]));
    let halved = rewrite(&lora("kohya.safetensors"), tmp.path(), "halved.safetensors", |t| {
        t.into_iter()
            .map(|(k, v)| if k.ends_with(".alpha") { (k, HostTensor::i64(vec![], vec![6])) } else { (k, v) })
            .collect()
    });
    let max = compare(&generate(&folder().with_loras(vec![spec(&halved, 0.3)])), &to_host(&kohya));
    assert!(max <= 1, "alpha 6 at 0.3 vs alpha 3 at 0.6: {max} levels");
    // The same LoRA on the pipeline's single-file form (f16) gives the folder's image to a level or two.
    let file = support::write_single_file(&fixtures(), "sd1", tmp.path());
    let single = generate(
        &Base::new(file)
            .with_config(fixtures().join("pipeline"))
            .with_loras(vec![spec(&lora("kohya.safetensors"), 0.6)]),
    );
    let max = compare(&single, &to_host(&kohya));
    assert!(max <= 3, "single file with LoRA vs folder with LoRA: {max} levels");
}

fn to_host(imgs: &[RgbImage]) -> HostTensor {
    let v: Vec<f32> = imgs.iter().flat_map(|i| i.data.iter().map(|&b| b as f32 / 255.0)).collect();
    HostTensor::f32(vec![v.len()], v)
}

fn open_err(loras: Vec<LoraSpec>) -> String {
    match Pipeline::<Flex>::open(&folder().with_loras(loras), &FlexDevice) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn loras_that_do_not_fit_are_errors_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let src = lora("kohya.safetensors");
    let q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let case = |name: &str, f: &dyn Fn(&mut BTreeMap<String, HostTensor>)| {
        let path = rewrite(&src, tmp.path(), name, |mut t| {
            f(&mut t);
            t
        });
        let e = open_err(vec![spec(&path, 1.0)]);
        assert!(e.contains(name), "{e}");
        e
    };
    // Another architecture: a wider layer.
    let e = case("wide.safetensors", &|t| {
        t.insert(format!("{q}.lora_down.weight"), HostTensor::f32(vec![4, 64], vec![0.0; 256]));
    });
    assert!(e.contains(&format!("{q}.lora_down.weight")) && e.contains("[4, 64]") && e.contains("[16, 16]"), "{e}");
    let e = case("stray.safetensors", &|t| {
        t.insert(
            "lora_unet_input_blocks_9_1_proj_in.lora_down.weight".into(),
            HostTensor::f32(vec![4, 16], vec![0.0; 64]),
        );
        t.insert(
            "lora_unet_input_blocks_9_1_proj_in.lora_up.weight".into(),
            HostTensor::f32(vec![16, 4], vec![0.0; 64]),
        );
    });
    assert!(
        e.contains("lora_unet_input_blocks_9_1_proj_in.lora_down.weight") && e.contains("another architecture"),
        "{e}"
    );
    let e = case("half.safetensors", &|t| {
        t.remove(&format!("{q}.lora_up.weight"));
    });
    assert!(e.contains(&format!("{q}.lora_down.weight")) && e.contains("comes without its up"), "{e}");
    let e = case("sdxl.safetensors", &|t| {
        t.insert(
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight".into(),
            HostTensor::f32(vec![4, 16], vec![0.0; 64]),
        );
        t.insert(
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight".into(),
            HostTensor::f32(vec![16, 4], vec![0.0; 64]),
        );
    });
    assert!(e.contains("lora_te2_text_model_encoder_layers_0_mlp_fc1") && e.contains("SDXL LoRA"), "{e}");
    let e = case("loha.safetensors", &|t| {
        t.insert(format!("{q}.hada_w1_a"), HostTensor::f32(vec![4, 16], vec![0.0; 64]));
    });
    assert!(e.contains("LoHa"), "{e}");
    let e = case("nan.safetensors", &|t| {
        t.insert(format!("{q}.alpha"), HostTensor::f32(vec![], vec![f32::NAN]));
    });
    assert!(e.contains(&format!("{q}.alpha")) && e.contains("damaged"), "{e}");
    // A truncated file and a missing one name the file.
    let bytes = std::fs::read(&src).unwrap();
    let cut = tmp.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert!(open_err(vec![spec(&cut, 1.0)]).contains("cut.safetensors"));
    assert!(open_err(vec![spec(&tmp.path().join("none.safetensors"), 1.0)]).contains("none.safetensors"));
}

#[test]
fn lora_arguments_parse_with_their_scales() {
    let l: LoraSpec = "a/b.safetensors:-0.5".parse().unwrap();
    assert_eq!((l.path, l.scale), (PathBuf::from("a/b.safetensors"), -0.5));
    let l: LoraSpec = "C:\\loras\\b.safetensors".parse().unwrap();
    assert_eq!((l.path, l.scale), (PathBuf::from("C:\\loras\\b.safetensors"), 1.0));
    for bad in ["b.safetensors:nan", "b.safetensors:inf", "b.safetensors:500"] {
        let e = bad.parse::<LoraSpec>().unwrap_err().to_string();
        assert!(e.contains(bad), "{e}");
    }
    // A scale that is not a number, after an existing file.
    let e = format!("{}:x", lora("kohya.safetensors").display()).parse::<LoraSpec>().unwrap_err().to_string();
    assert!(e.contains("`x` is not a number"), "{e}");
}
