//! SDXL generation against diffusers' StableDiffusionXLPipeline on a tiny SDXL folder
//! (fixture: two text encoders, two tokenizers as the SDXL repository ships them), visual
//! prompts included, and the errors of a broken SDXL folder.

use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use burn_flex::{Flex, FlexDevice};
use model_io::tensor_file::{read_tensors, HostTensor};
use personalize::{GenerateOptions, GenerateRequest, Pipeline, VisualPrompt};
#[path = "support/images.rs"]
mod images;
use images::levels;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn pipe() -> Pipeline<Flex> {
    Pipeline::load(&fixtures().join("sdxl_pipeline"), &FlexDevice).unwrap()
}

/// The fixture's stand-in BLIP-2 queries: sin(0.37·i + 0.11·image), `[1, 32, 768]`.
fn queries() -> Tensor<Flex, 3> {
    let v: Vec<f32> = (0..32 * 768).map(|i| (0.37 * i as f64).sin() as f32).collect();
    Tensor::from_data(TensorData::new(v, [1, 32, 768]), &FlexDevice)
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn both_encoders_match_encode_prompt() {
    let pipe = pipe();
    let io = read_tensors(&fixtures().join("sdxl_pipeline_io.safetensors")).unwrap();
    let xl = pipe.text_encoder_2.as_ref().expect("the SDXL folder loads its second encoder");
    let p = "a photo of a cat";
    for (tok, key) in [(&pipe.tokenizer, "encode.ids"), (&xl.tokenizer, "encode.ids_2")] {
        let want: Vec<i64> =
            io[key].to_int::<Flex, 2>(key, &FlexDevice).unwrap().into_data().convert::<i64>().to_vec().unwrap();
        assert_eq!(tok.encode(p).unwrap(), want, "{key}");
    }
    // tokenizer_2 pads with `!` (id 0), the first with end-of-text.
    assert_eq!(xl.tokenizer.special_ids().2, 0);
    assert_ne!(pipe.tokenizer.special_ids().2, 0);
    let (ctx, pooled) = pipe.encode_text(&[p.to_string()]).unwrap();
    assert_eq!(ctx.dims(), [1, 77, 36]);
    let ctx = HostTensor::from_tensor(ctx);
    let pooled = HostTensor::from_tensor(pooled.expect("SDXL has pooled text embeds"));
    let e = max_abs(ctx.as_f32("ctx").unwrap(), io["encode.prompt_embeds"].as_f32("pe").unwrap());
    let ep = max_abs(pooled.as_f32("pooled").unwrap(), io["encode.pooled"].as_f32("pooled").unwrap());
    eprintln!("prompt_embeds max {e:.2e}, pooled max {ep:.2e}");
    assert!(e < 1e-4 && ep < 1e-4, "prompt_embeds {e}, pooled {ep}");
}

#[test]
fn generate_matches_stable_diffusion_xl_pipeline() {
    let pipe = pipe();
    assert_eq!(pipe.architecture(), "sdxl");
    assert_eq!(pipe.default_size(), 32, "sample_size 4 × VAE factor 8 (1024 for SDXL's 128)");
    let aligner = q_aligner::Aligner::<Flex>::load(&fixtures().join("sdxl_aligner.safetensors"), &FlexDevice).unwrap();
    let io = read_tensors(&fixtures().join("sdxl_pipeline_io.safetensors")).unwrap();
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("sdxl_pipeline_cases.json")).unwrap()).unwrap();
    for c in cases.as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let opts = images::case_options(c);
        let lat = io[&format!("{name}.latents")].to_float::<Flex, 4>("latents", &FlexDevice).unwrap();
        let visual = VisualPrompt { aligner: &aligner, queries: queries() };
        let mut req = GenerateRequest::new(&opts).latents(lat);
        if c["visual"].as_bool() == Some(true) {
            req = req.visual(&visual);
        }
        let imgs = pipe.generate(req).unwrap();
        assert_eq!(imgs.len(), opts.num_images);
        let (max, mean) = levels(&imgs, &io[&format!("{name}.images")]);
        eprintln!("{name}: max {max} levels, mean {mean:.4}");
        assert!(max <= 3 && mean <= 0.5, "{name}: max {max} levels, mean {mean}");
    }
}

#[test]
fn size_conditioning_and_zeroed_negatives_change_the_image() {
    let pipe = pipe();
    let base = GenerateOptions { prompt: "a castle".into(), steps: 2, guidance: 5.0, ..Default::default() };
    let run = |o: &GenerateOptions| pipe.generate(GenerateRequest::new(o)).unwrap().remove(0).data;
    let plain = run(&base);
    let cropped = run(&GenerateOptions { crop_top_left: Some([16, 0]), ..base.clone() });
    assert_ne!(plain, cropped, "the crop coordinates reach the UNet");
    // An explicit empty negative prompt is encoded; none gives zeros (force_zeros_for_empty_prompt).
    let empty = run(&GenerateOptions { negative_prompt: Some(String::new()), ..base.clone() });
    assert_ne!(plain, empty);
    let ids = pipe.time_ids(&GenerateOptions { height: Some(48), ..base.clone() }).unwrap();
    assert_eq!(ids, [48.0, 32.0, 0.0, 0.0, 48.0, 32.0], "(height, width) defaults from the image size");
    let err = pipe.time_ids(&GenerateOptions { original_size: Some([0, 1024]), ..base.clone() }).unwrap_err();
    assert!(err.to_string().contains("--original-size 0,1024"), "{err}");
}

/// A copy of the SDXL fixture in a temporary folder, changed by `edit`.
fn broken(edit: impl FnOnce(&Path)) -> (tempfile::TempDir, String) {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("sdxl");
    copy_dir(&fixtures().join("sdxl_pipeline"), &root);
    edit(&root);
    let err = Pipeline::<Flex>::load(&root, &FlexDevice).err().expect("the broken folder is refused").to_string();
    assert!(!err.contains('\n'), "one line: {err}");
    (d, err)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn a_broken_sdxl_folder_is_named() {
    let (_d, err) = broken(|r| std::fs::remove_dir_all(r.join("text_encoder_2")).unwrap());
    assert!(err.contains("text_encoder_2"), "{err}");
    let (_d, err) = broken(|r| std::fs::remove_dir_all(r.join("tokenizer_2")).unwrap());
    assert!(err.contains("tokenizer_2"), "{err}");
    let (_d, err) = broken(|r| {
        let p = r.join("unet/config.json");
        let t =
            std::fs::read_to_string(&p).unwrap().replace("\"cross_attention_dim\": 36", "\"cross_attention_dim\": 48");
        std::fs::write(p, t).unwrap();
    });
    assert!(err.contains("cross_attention_dim is 48") && err.contains("text_encoder_2"), "{err}");
}

#[test]
fn a_concept_of_another_architecture_is_refused() {
    let mut pipe = pipe();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("concept");
    std::fs::create_dir_all(&dir).unwrap();
    let aligner = q_aligner::Aligner::<Flex>::load(&fixtures().join("sdxl_aligner.safetensors"), &FlexDevice).unwrap();
    aligner.save(&dir.join("aligner.safetensors")).unwrap();
    let fingerprint = pipe.unet_fingerprint.clone();
    let info = |architecture: Option<&str>| personalize::ConceptInfo {
        version: personalize::CONCEPT_VERSION,
        base_model: "sd15".into(),
        base_config: None,
        prediction_type: None,
        base_unet_fingerprint: fingerprint.clone(),
        architecture: architecture.map(str::to_string),
        num_queries: 8,
        query_selection: "first".into(),
        prompt: None,
        unet: personalize::UnetChange::Frozen,
        lora_rank: None,
        lora_alpha: None,
        training: serde_json::Value::Null,
        steps_done: 0,
        final_loss: None,
    };
    // A concept without `architecture` predates SDXL: SD 1.x/2.x.
    personalize::Concept::<Flex>::write_info(&dir, &info(None)).unwrap();
    let concept = personalize::Concept::<Flex>::load(&dir, &FlexDevice).unwrap();
    let err = pipe.apply_concept(&concept, true).unwrap_err().to_string();
    assert!(err.contains("SD 1.x/2.x") && err.contains("SDXL") && err.contains("concept.json"), "{err}");
    personalize::Concept::<Flex>::write_info(&dir, &info(Some("sdxl"))).unwrap();
    let concept = personalize::Concept::<Flex>::load(&dir, &FlexDevice).unwrap();
    pipe.apply_concept(&concept, false).unwrap();
}
