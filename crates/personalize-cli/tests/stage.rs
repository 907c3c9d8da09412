//! The stage runner as other tools call it: the binary, files in, files out, exit codes.

mod common;

use common::{fixtures, one_line_error, root, run};

use std::collections::BTreeMap;
use std::path::Path;

use model_io::tensor_file::{read_tensors, write_tensors, HostTensor};

#[test]
fn tokenizer_stage_writes_padded_ids() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ids.safetensors");
    let (ok, err) = run(&[
        "stage",
        "tokenizer",
        "--model",
        root().join("crates/clip-text/vocab").to_str().unwrap(),
        "--prompt",
        "a photo of a cat",
        "--prompt",
        "",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let t = read_tensors(&out).unwrap();
    let ids = &t["input_ids"];
    assert_eq!(ids.shape, vec![2, 77]);
    let model_io::tensor_file::HostData::I64(v) = &ids.data else { panic!("ids are not i64") };
    assert_eq!(&v[..8], &[49406, 320, 1125, 539, 320, 2368, 49407, 49407]);
    assert_eq!(&v[77..80], &[49406, 49407, 49407]);
}

#[test]
fn text_encoder_stage_matches_reference() {
    let model = fixtures().join("text_encoder/clip_quick_gelu");
    let io = read_tensors(&model.join("io.safetensors")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    write_tensors(&input, &BTreeMap::from([("input_ids".into(), io["input_ids"].clone())]), &BTreeMap::new()).unwrap();
    let out = dir.path().join("out.safetensors");
    let (ok, err) = run(&[
        "stage",
        "text-encoder",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--repeat",
        "2",
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("text-encoder: ") && err.contains(" warmup=1 runs=1 median_s="),
        "--repeat reports timings: {err}"
    );
    let got = read_tensors(&out).unwrap();
    assert!(got["last_hidden_state"].max_abs_diff(&io["last_hidden_state"]) <= 1e-4);
}

#[test]
fn vae_stages_match_reference() {
    let model = fixtures().join("vae");
    let io = read_tensors(&model.join("io.safetensors")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (stage, input_name, src, outputs) in [
        ("vae-encode", "sample", "sample", vec![("mean", "mean"), ("logvar", "logvar")]),
        ("vae-decode", "latent", "latent", vec![("sample", "decoded")]),
    ] {
        let input = dir.path().join(format!("{stage}-in.safetensors"));
        write_tensors(&input, &BTreeMap::from([(input_name.to_string(), io[src].clone())]), &BTreeMap::new()).unwrap();
        let out = dir.path().join(format!("{stage}-out.safetensors"));
        let (ok, err) = run(&[
            "stage",
            stage,
            "--model",
            model.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{stage}: {err}");
        let got = read_tensors(&out).unwrap();
        for (name, reference) in outputs {
            let e = got[name].max_abs_diff(&io[reference]);
            assert!(e <= 1e-4, "{stage} {name}: {e}");
        }
    }
}

#[test]
fn unknown_stage_is_a_one_line_error() {
    let (ok, err) = run(&["stage", "upscaler", "--model", ".", "--output", "/tmp/x.safetensors"]);
    assert!(!ok);
    one_line_error(&err, &["upscaler", "tokenizer", "vae-decode"]);
}

#[test]
fn input_file_lacking_a_tensor_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let t = BTreeMap::from([("ids".to_string(), HostTensor::i64(vec![1, 2], vec![1, 2]))]);
    write_tensors(&input, &t, &BTreeMap::new()).unwrap();
    let model = fixtures().join("text_encoder/clip_quick_gelu");
    let (ok, err) = run(&[
        "stage",
        "text-encoder",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        dir.path().join("o.safetensors").to_str().unwrap(),
    ]);
    assert!(!ok);
    one_line_error(&err, &["input_ids", "in.safetensors"]);
}

#[test]
fn wrong_dtype_and_shape_inputs_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let out = dir.path().join("o.safetensors");
    let model = fixtures().join("text_encoder/clip_quick_gelu");
    let t = BTreeMap::from([("input_ids".to_string(), HostTensor::f32(vec![1, 2], vec![1.0, 2.0]))]);
    write_tensors(&input, &t, &BTreeMap::new()).unwrap();
    let args = [
        "stage",
        "text-encoder",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    let (ok, err) = run(&args);
    assert!(!ok);
    one_line_error(&err, &["input_ids", "f32", "i64"]);

    let vae = fixtures().join("vae");
    let t = BTreeMap::from([("latent".to_string(), HostTensor::f32(vec![1, 3, 2, 2], vec![0.0; 12]))]);
    write_tensors(&input, &t, &BTreeMap::new()).unwrap();
    let (ok, err) = run(&[
        "stage",
        "vae-decode",
        "--model",
        vae.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    one_line_error(&err, &["latent", "[1, 3, 2, 2]"]);
    assert!(!out.exists(), "no output on failure");
}

#[test]
fn truncated_weights_and_bad_config_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("text_encoder/clip_quick_gelu");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(dir.path().join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let input = dir.path().join("in.safetensors");
    let t = BTreeMap::from([("input_ids".to_string(), HostTensor::i64(vec![1, 2], vec![1, 2]))]);
    write_tensors(&input, &t, &BTreeMap::new()).unwrap();
    let args = |m: &Path| {
        vec![
            "stage".to_string(),
            "text-encoder".into(),
            "--model".into(),
            m.display().to_string(),
            "--input".into(),
            input.display().to_string(),
            "--output".into(),
            dir.path().join("o.safetensors").display().to_string(),
        ]
    };
    let a = args(dir.path());
    let (ok, err) = run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok);
    one_line_error(&err, &["model.safetensors", "truncated"]);

    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "t5", "d_model": 4}"#).unwrap();
    let (ok, err) = run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok);
    one_line_error(&err, &["config.json", "t5"]);

    // A shape that does not match the config.
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["intermediate_size"] = serde_json::json!(40);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    std::fs::write(dir.path().join("model.safetensors"), &bytes).unwrap();
    let (ok, err) = run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok);
    one_line_error(&err, &["fc1.weight", "[37, 32]", "[40, 32]"]);
}

#[test]
fn missing_input_flag_is_named() {
    let (ok, err) = run(&[
        "stage",
        "vae-decode",
        "--model",
        fixtures().join("vae").to_str().unwrap(),
        "--output",
        "/tmp/never.safetensors",
    ]);
    assert!(!ok);
    one_line_error(&err, &["--input"]);
}

/// `personalize stage unet --model M --input I --output O [extra…]`.
fn unet_stage(model: &Path, input: &Path, out: &Path, extra: &[&str]) -> (bool, String) {
    let mut args = vec![
        "stage",
        "unet",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn unet_stage_matches_reference_with_any_context_length() {
    let model = fixtures().join("unet/sd1");
    let io = read_tensors(&model.join("io.safetensors")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let t: BTreeMap<String, HostTensor> =
        ["sample", "timestep", "encoder_hidden_states"].iter().map(|k| (k.to_string(), io[*k].clone())).collect();
    write_tensors(&input, &t, &BTreeMap::new()).unwrap();
    let out = dir.path().join("out.safetensors");
    let (ok, err) = unet_stage(&model, &input, &out, &[]);
    assert!(ok, "{err}");
    let e = read_tensors(&out).unwrap()["sample"].max_abs_diff(&io["out"]);
    assert!(e <= 5e-4, "unet stage: {e}");

    // Random weights from the config alone run and report timing and memory.
    let (ok, err) = unet_stage(&model, &input, &out, &["--random-weights", "--repeat", "2"]);
    assert!(ok, "{err}");
    let line = err.lines().find(|l| l.starts_with("unet: ")).unwrap_or_else(|| panic!("no summary line: {err}"));
    for k in ["load_s=", "load_peak_mib=", "warmup=1", "runs=1", "median_s=", "peak_mib="] {
        assert!(line.contains(k), "`{k}` not in {line}");
    }
}

/// SDXL's UNet stage takes `text_embeds` and `time_ids` besides the three inputs; without
/// them it names them, and a SD 1.x UNet refuses them rather than dropping them.
#[test]
fn sdxl_unet_stage_takes_the_added_conditioning() {
    let dir = tempfile::tempdir().unwrap();
    let stage = |model: &str, keys: &[&str]| {
        let model = fixtures().join("unet").join(model);
        let io = read_tensors(&model.join("io.safetensors")).unwrap();
        let input = dir.path().join("in.safetensors");
        let t: BTreeMap<String, HostTensor> = keys.iter().map(|k| (k.to_string(), io[*k].clone())).collect();
        write_tensors(&input, &t, &BTreeMap::new()).unwrap();
        let out = dir.path().join("out.safetensors");
        let _ = std::fs::remove_file(&out);
        let (ok, err) = unet_stage(&model, &input, &out, &[]);
        (ok, err, ok.then(|| read_tensors(&out).unwrap()["sample"].max_abs_diff(&io["out"])))
    };
    let base = ["sample", "timestep", "encoder_hidden_states"];
    let (ok, err, e) = stage("sdxl_fp16", &[&base[..], &["text_embeds", "time_ids"]].concat());
    assert!(ok, "{err}");
    let e = e.unwrap();
    assert!(e <= 5e-4, "sdxl unet stage: {e}");

    let (ok, err, _) = stage("sdxl_fp16", &[&base[..], &["text_embeds"]].concat());
    assert!(!ok);
    one_line_error(&err, &["time_ids"]);

    // sd1's io has no added conditioning: borrow sdxl's tensors under sd1's inputs.
    let sdxl = read_tensors(&fixtures().join("unet/sdxl_fp16/io.safetensors")).unwrap();
    let sd1 = fixtures().join("unet/sd1");
    let mut t = read_tensors(&sd1.join("io.safetensors")).unwrap();
    t.remove("out");
    t.insert("time_ids".into(), sdxl["time_ids"].clone());
    let input = dir.path().join("sd1.safetensors");
    write_tensors(&input, &t, &BTreeMap::new()).unwrap();
    let out = dir.path().join("sd1_out.safetensors");
    let (ok, err) = unet_stage(&sd1, &input, &out, &[]);
    assert!(!ok);
    one_line_error(&err, &["`time_ids`", "takes none"]);
}

#[test]
fn scheduler_stage_matches_diffusers_and_checks_output_count() {
    let fx = fixtures().join("scheduler");
    let case = std::fs::read_dir(&fx)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("dpm") && p.join("io.safetensors").exists())
        .min()
        .expect("a DPM-Solver fixture");
    let io = read_tensors(&case.join("io.safetensors")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let t: BTreeMap<String, HostTensor> =
        ["sample", "model_outputs", "num_inference_steps"].iter().map(|k| (k.to_string(), io[*k].clone())).collect();
    write_tensors(&input, &t, &BTreeMap::new()).unwrap();
    let out = dir.path().join("out.safetensors");
    let (ok, err) = run(&[
        "stage",
        "scheduler",
        "--model",
        case.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{}: {err}", case.display());
    let got = read_tensors(&out).unwrap();
    for name in ["timesteps", "samples"] {
        let (a, b) = (got[name].as_f32(name).unwrap(), io[name].as_f32(name).unwrap());
        assert_eq!(a.len(), b.len(), "{name}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{name}: {x} vs {y}");
        }
    }

    // One model output too few: an error naming the count, as PNDM's N+1 timesteps need.
    let mut short = t.clone();
    let mo = &t["model_outputs"];
    let per: usize = mo.shape[1..].iter().product();
    let mut shape = mo.shape.clone();
    shape[0] -= 1;
    short.insert("model_outputs".into(), HostTensor::f32(shape, mo.as_f32("m").unwrap()[per..].to_vec()));
    write_tensors(&input, &short, &BTreeMap::new()).unwrap();
    let (ok, err) = run(&[
        "stage",
        "scheduler",
        "--model",
        case.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    one_line_error(&err, &["model output"]);
}

#[test]
fn aligner_stage_reads_a_concept_folder() {
    let dir = tempfile::tempdir().unwrap();
    let s = q_aligner::AlignerSettings {
        num_queries: 3,
        query_selection: q_aligner::QuerySelection::Pool,
        final_gelu: true,
    };
    let a = q_aligner::Aligner::<burn_flex::Flex>::new(
        8,
        16,
        12,
        &s,
        &mut seeded::SplitMix64::new(0),
        &burn_flex::FlexDevice,
    );
    a.save(&dir.path().join("aligner.safetensors")).unwrap();
    let q = HostTensor::f32(vec![2, 5, 8], (0..80).map(|i| (i as f32 * 0.37).sin()).collect());
    let input = dir.path().join("in.safetensors");
    write_tensors(&input, &BTreeMap::from([("queries".to_string(), q.clone())]), &BTreeMap::new()).unwrap();
    let out = dir.path().join("out.safetensors");
    let (ok, err) = run(&[
        "stage",
        "aligner",
        "--model",
        dir.path().to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let got = &read_tensors(&out).unwrap()["visual_prompt"];
    let want = HostTensor::from_tensor(
        a.forward(q.to_float::<burn_flex::Flex, 3>("q", &burn_flex::FlexDevice).unwrap()).unwrap(),
    );
    assert_eq!(got.shape, vec![2, 3, 12]);
    assert!(got.max_abs_diff(&want) < 1e-6);
}

#[test]
fn blip2_stage_matches_transformers() {
    let model = fixtures().join("blip2/opt_sharded");
    let io = read_tensors(&model.join("io.safetensors")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    write_tensors(
        &input,
        &BTreeMap::from([("pixel_values".to_string(), io["pixel_values"].clone())]),
        &BTreeMap::new(),
    )
    .unwrap();
    let out = dir.path().join("out.safetensors");
    let (ok, err) = run(&[
        "stage",
        "blip2",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let got = read_tensors(&out).unwrap();
    for name in ["query_output", "image_embeds"] {
        let e = got[name].max_abs_diff(&io[name]);
        assert!(e <= 5e-4, "{name}: {e}");
    }
}

/// `--dtype f16|bf16` computes in half precision (the GPU's fast path) and still writes f32.
/// Bounds are relative to the output's largest value: f16 keeps 11 significant bits, bf16 8,
/// and the error grows through the network's ~20 layers.
#[test]
fn unet_stage_runs_in_half_precision() {
    let model = fixtures().join("unet/sd1");
    let io = read_tensors(&model.join("io.safetensors")).unwrap();
    let reference = &io["out"];
    let scale = reference.as_f32("out").unwrap().iter().fold(0f32, |m, v| m.max(v.abs()));
    let dir = tempfile::tempdir().unwrap();
    for (dtype, bound) in [("f16", 0.01), ("bf16", 0.1)] {
        let out = dir.path().join(format!("{dtype}.safetensors"));
        let (ok, err) = run(&[
            "--dtype",
            dtype,
            "stage",
            "unet",
            "--model",
            model.to_str().unwrap(),
            "--input",
            model.join("io.safetensors").to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{dtype}: {err}");
        let got = read_tensors(&out).unwrap();
        let e = got["sample"].max_abs_diff(reference) / scale;
        assert!(e <= bound, "{dtype}: error {e} of the output's scale");
        // f32 is within 1e-6 of the scale here; a half-precision run cannot be.
        assert!(e > 1e-4, "{dtype}: error {e} is f32's, so half precision was not used");
    }
    let (ok, err) = run(&["--dtype", "f8", "stage", "unet", "--model", ".", "--output", "x.safetensors"]);
    assert!(!ok && err.contains("f8"), "{err}");
}

/// `--output` over `--input`, or into a folder that does not exist, is refused before any
/// work; the input is left as it was.
#[test]
fn output_over_the_input_or_into_a_missing_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("text_encoder/clip_quick_gelu");
    let input = dir.path().join("in.safetensors");
    let t = BTreeMap::from([("input_ids".to_string(), HostTensor::i64(vec![1, 2], vec![1, 2]))]);
    write_tensors(&input, &t, &BTreeMap::new()).unwrap();
    let before = std::fs::read(&input).unwrap();
    let m = model.to_str().unwrap();
    let same = dir.path().join(".").join("in.safetensors");
    let (ok, err) = run(&[
        "stage",
        "text-encoder",
        "--model",
        m,
        "--input",
        input.to_str().unwrap(),
        "--output",
        same.to_str().unwrap(),
    ]);
    assert!(!ok);
    one_line_error(&err, &["--output", "--input"]);
    assert_eq!(std::fs::read(&input).unwrap(), before);
    let missing = dir.path().join("no/such/out.safetensors");
    let (ok, err) = run(&[
        "stage",
        "text-encoder",
        "--model",
        m,
        "--input",
        input.to_str().unwrap(),
        "--output",
        missing.to_str().unwrap(),
    ]);
    assert!(!ok);
    one_line_error(&err, &["no/such", "does not exist"]);
}

/// Logs written to a pipe (CI, a file) carry no ANSI colour codes.
#[test]
fn logs_to_a_pipe_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ids.safetensors");
    let long = "cat ".repeat(100);
    let (ok, err) = run(&[
        "stage",
        "tokenizer",
        "--model",
        root().join("crates/clip-text/vocab").to_str().unwrap(),
        "--prompt",
        &long,
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("too long"), "the truncation warning is logged: {err}");
    assert!(!err.contains('\u{1b}'), "colour codes in {err:?}");
}

/// With no command the help is printed as clap lays it out (not flattened into one line).
#[test]
fn no_command_prints_the_help() {
    let (ok, err) = run(&[]);
    assert!(!ok);
    assert!(err.lines().count() > 5 && err.contains("Usage:") && err.contains("generate"), "{err}");
}
