//! Training on the tiny fixture pipeline: the loss falls, only the parameters the mode names
//! change, the aligner gets gradients, resume is exact, the concept folder is complete, the LoRA
//! file matches diffusers, and bad input stops early with a clear reason.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::tensor::{Tensor, TensorData};
use burn_autodiff::Autodiff;
use burn_flex::{Flex, FlexDevice};
use model_io::tensor_file::{read_tensors, write_tensors, HostTensor};
use personalize::train::{self, PriorConfig, StepInfo, TrainConfig, TrainData, TrainRequest, Trainer, UnetMode};
use personalize::{Concept, RgbImage};

type AD = Autodiff<Flex>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn base() -> PathBuf {
    fixtures().join("pipeline")
}

/// A smooth, non-trivial test picture.
fn picture(w: usize, h: usize, seed: u32) -> RgbImage {
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
            let s = seed as f32;
            data.push((127.5 + 120.0 * (6.0 * fx + s).sin()) as u8);
            data.push((127.5 + 120.0 * (5.0 * fy + 2.0 * s).cos()) as u8);
            data.push((127.5 + 120.0 * (4.0 * (fx + fy) + 3.0 * s).sin()) as u8);
        }
    }
    RgbImage { width: w, height: h, data }
}

fn queries(n: usize, seed: u64) -> HostTensor {
    let mut rng = scheduler::SeededRng::new(seed);
    let mut v = vec![0f32; n * 12 * 24];
    rng.fill_standard_normal(&mut v);
    HostTensor::f32(vec![n, 12, 24], v)
}

fn data(n: usize) -> TrainData {
    TrainData {
        images: (0..n).map(|i| picture(40 + 8 * i, 36, i as u32)).collect(),
        queries: queries(n, 7),
        class_images: vec![],
    }
}

fn cfg(mode: UnetMode) -> TrainConfig {
    TrainConfig {
        steps: 4,
        lr: 1e-3,
        batch: 2,
        resolution: 32,
        num_queries: 4,
        aligner_hidden: Some(16),
        unet_mode: mode,
        seed: 3,
        save_every: 0,
        augment: 1,
        sample_steps: 0,
        prompt: "a photo of a toy".into(),
        ..TrainConfig::default()
    }
}

fn snapshot<M: burn::module::Module<Flex>>(m: &M) -> Vec<HostTensor> {
    struct V(Vec<HostTensor>);
    impl burn::module::ModuleVisitor<Flex> for V {
        fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<Flex, D>>) {
            self.0.push(HostTensor::from_tensor(p.val()));
        }
    }
    let mut v = V(Vec::new());
    m.visit(&mut v);
    v.0
}

fn max_diff(a: &[HostTensor], b: &[HostTensor]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x.max_abs_diff(y)).fold(0.0, f32::max)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn loss_falls_when_overfitting_one_image() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(UnetMode::Full);
    c.steps = 40;
    c.batch = 4;
    c.augment = 0;
    c.lr = 2e-3;
    let mut losses = Vec::new();
    let r = train::train::<AD>(
        &TrainRequest {
            base: &personalize::Base::new(base()),
            config: &c,
            data: &data(1),
            out: dir.path(),
            resume: false,
        },
        &FlexDevice,
        &mut |s: &StepInfo| losses.push(s.loss),
    )
    .unwrap();
    assert_eq!(r.steps_done, 40);
    let (first, last) = (mean(&losses[..8]), mean(&losses[32..]));
    eprintln!("loss: first 8 steps {first:.4}, last 8 steps {last:.4}");
    if let Some(p) = personalize::memory::peak_rss_bytes() {
        eprintln!(
            "peak RSS of the test process (tiny pipeline, full mode, batch 4): {:.0} MiB",
            p as f64 / (1 << 20) as f64
        );
    }
    assert!(last < 0.7 * first, "loss did not fall: {first} -> {last}");
}

/// Frozen encoders and, per mode, the frozen UNet weights stay bit-identical; the aligner always
/// changes and receives gradients.
#[test]
fn only_the_named_parameters_change() {
    for mode in [UnetMode::Frozen, UnetMode::Lora { rank: 2, alpha: 4.0 }, UnetMode::Full] {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(mode);
        let mut t = Trainer::<AD>::new(
            &TrainRequest {
                base: &personalize::Base::new(base()),
                config: &c,
                data: &data(2),
                out: dir.path(),
                resume: false,
            },
            &FlexDevice,
        )
        .unwrap();
        let text0 = snapshot(&t.pipe.text_encoder);
        let vae0 = snapshot(&t.pipe.vae);
        let base_unet0 = snapshot(&t.pipe.unet);
        let aligner0 = snapshot(&t.model.aligner.valid());
        let unet0 = snapshot(&t.model.unet.valid());
        let lora0 = sd_unet::lora::lora_tensors(&t.model.unet.valid());
        for _ in 0..3 {
            let s = t.train_step().unwrap();
            assert!(
                s.grad_norm_aligner > 0.0 && s.grad_norm_aligner.is_finite(),
                "{mode:?}: aligner gradient {}",
                s.grad_norm_aligner
            );
            match mode {
                UnetMode::Frozen => assert_eq!(s.grad_norm_unet, 0.0),
                _ => assert!(s.grad_norm_unet > 0.0),
            }
        }
        assert_eq!(max_diff(&text0, &snapshot(&t.pipe.text_encoder)), 0.0, "{mode:?}: text encoder changed");
        assert_eq!(max_diff(&vae0, &snapshot(&t.pipe.vae)), 0.0, "{mode:?}: VAE changed");
        assert!(max_diff(&aligner0, &snapshot(&t.model.aligner.valid())) > 0.0, "{mode:?}: aligner did not change");
        let unet1 = t.model.unet.valid();
        match mode {
            UnetMode::Frozen => assert_eq!(max_diff(&unet0, &snapshot(&unet1)), 0.0),
            UnetMode::Lora { .. } => {
                // The base weights are the pipeline's, untouched; the adapters moved.
                let mut plain = unet1.clone();
                for a in plain.attentions_mut() {
                    for (_, p) in a.projections_mut() {
                        p.lora = None;
                    }
                }
                assert_eq!(max_diff(&base_unet0, &snapshot(&plain)), 0.0, "LoRA mode changed the base UNet");
                let lora1 = sd_unet::lora::lora_tensors(&unet1);
                assert_eq!(lora0.len(), lora1.len());
                assert!(lora0.iter().any(|(k, v)| v.max_abs_diff(&lora1[k]) > 0.0));
                assert!(lora1.keys().all(
                    |k| k.starts_with("unet.") && (k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight"))
                ));
            }
            UnetMode::Full => assert!(max_diff(&unet0, &snapshot(&unet1)) > 0.0),
        }
    }
}

fn file_tensors(p: &Path) -> BTreeMap<String, HostTensor> {
    read_tensors(p).unwrap()
}

#[test]
fn resume_ends_with_the_weights_of_an_uninterrupted_run() {
    for mode in [UnetMode::Lora { rank: 2, alpha: 2.0 }, UnetMode::Full] {
        let mut c = cfg(mode);
        c.steps = 6;
        c.save_every = 2;
        let one = tempfile::tempdir().unwrap();
        let r1 = train::train::<AD>(
            &TrainRequest {
                base: &personalize::Base::new(base()),
                config: &c,
                data: &data(2),
                out: one.path(),
                resume: false,
            },
            &FlexDevice,
            &mut |_| {},
        )
        .unwrap();

        let two = tempfile::tempdir().unwrap();
        let mut half = c.clone();
        half.steps = 3;
        train::train::<AD>(
            &TrainRequest {
                base: &personalize::Base::new(base()),
                config: &half,
                data: &data(2),
                out: two.path(),
                resume: false,
            },
            &FlexDevice,
            &mut |_| {},
        )
        .unwrap();
        // Without --resume an existing run is refused.
        let e = train::train::<AD>(
            &TrainRequest {
                base: &personalize::Base::new(base()),
                config: &c,
                data: &data(2),
                out: two.path(),
                resume: false,
            },
            &FlexDevice,
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--resume"), "{e}");
        let r2 = train::train::<AD>(
            &TrainRequest {
                base: &personalize::Base::new(base()),
                config: &c,
                data: &data(2),
                out: two.path(),
                resume: true,
            },
            &FlexDevice,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(r2.resumed_from, Some(3));
        assert_eq!(r1.losses, r2.losses, "{mode:?}: loss histories differ");
        let files: &[&str] = match mode {
            UnetMode::Full => &["aligner.safetensors", "unet/diffusion_pytorch_model.safetensors"],
            _ => &["aligner.safetensors", "unet_lora.safetensors"],
        };
        for f in files {
            let (a, b) = (file_tensors(&one.path().join(f)), file_tensors(&two.path().join(f)));
            assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
            for (k, v) in &a {
                assert_eq!(v.max_abs_diff(&b[k]), 0.0, "{mode:?}: {f} `{k}` differs after resume");
            }
        }
        // Resuming with other settings is refused.
        let mut other = c.clone();
        other.lr = 5e-4;
        other.steps = 8;
        let e = train::train::<AD>(
            &TrainRequest {
                base: &personalize::Base::new(base()),
                config: &other,
                data: &data(2),
                out: two.path(),
                resume: true,
            },
            &FlexDevice,
            &mut |_| {},
        )
        .unwrap_err();
        assert!(matches!(e, personalize::Error::ResumeMismatch { .. }), "{e:?}");
        let e = e.to_string();
        assert!(e.contains("cannot resume from") && e.contains("`lr`"), "{e}");
    }
}

#[test]
fn concept_folder_is_complete_and_loads() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(UnetMode::Lora { rank: 2, alpha: 1.0 });
    c.steps = 4;
    c.save_every = 2;
    c.sample_steps = 2;
    let r = train::train::<AD>(
        &TrainRequest {
            base: &personalize::Base::new(base()),
            config: &c,
            data: &data(2),
            out: dir.path(),
            resume: false,
        },
        &FlexDevice,
        &mut |_| {},
    )
    .unwrap();
    let d = dir.path();
    for f in [
        "concept.json",
        "aligner.safetensors",
        "unet_lora.safetensors",
        "visual_queries.safetensors",
        "loss.csv",
        "loss.png",
        "samples/step-000002.png",
        "samples/step-000004.png",
        "checkpoints/step-000004/state.json",
    ] {
        assert!(d.join(f).is_file(), "missing {f}");
    }
    assert!(!d.join("checkpoints/step-000002").exists(), "old checkpoint kept");
    let csv = std::fs::read_to_string(d.join("loss.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5, "{csv}");
    let concept = Concept::<Flex>::load(d, &FlexDevice).unwrap();
    assert_eq!(concept.info.unet, personalize::UnetChange::Lora);
    assert_eq!(concept.info.steps_done, 4);
    assert_eq!(concept.info.num_queries, 4);
    assert_eq!(concept.info.final_loss, r.final_loss);
    let mut pipe = personalize::Pipeline::<Flex>::load(&base(), &FlexDevice).unwrap();
    assert_eq!(concept.info.base_unet_fingerprint, pipe.unet_fingerprint);
    assert_eq!(concept.queries.as_ref().unwrap().dims(), [2, 12, 24]);

    // The concept, applied to the base pipeline, reproduces the trained UNet (alpha folded in).
    let mut t = Trainer::<AD>::new(
        &TrainRequest { base: &personalize::Base::new(base()), config: &c, data: &data(2), out: d, resume: true },
        &FlexDevice,
    )
    .unwrap();
    assert_eq!(t.step, 4);
    pipe.apply_concept(&concept, false).unwrap();
    let x = Tensor::<Flex, 4>::from_data(
        TensorData::new((0..64).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>(), [1, 4, 4, 4]),
        &FlexDevice,
    );
    let tt = Tensor::<Flex, 1>::from_floats([321.0], &FlexDevice);
    let ctx = Tensor::<Flex, 3>::from_data(
        TensorData::new((0..81 * 32).map(|i| (i as f32 * 0.11).cos()).collect::<Vec<_>>(), [1, 81, 32]),
        &FlexDevice,
    );
    let ours = HostTensor::from_tensor(t.model.unet.valid().forward(x.clone(), tt.clone(), ctx.clone()).unwrap());
    let loaded = HostTensor::from_tensor(pipe.unet.forward(x, tt, ctx).unwrap());
    assert!(ours.max_abs_diff(&loaded) < 1e-5, "{}", ours.max_abs_diff(&loaded));
    let a0 = snapshot(&t.model.aligner.valid());
    assert_eq!(max_diff(&a0, &snapshot(&concept.aligner)), 0.0);
    let _ = t.train_step().unwrap();

    // A concept of another base model is refused with its own error, unless allowed.
    let mut other = concept;
    other.info.base_unet_fingerprint = "t64:0000000000000000".into();
    let mut fresh = personalize::Pipeline::<Flex>::load(&base(), &FlexDevice).unwrap();
    let e = fresh.apply_concept(&other, false).unwrap_err();
    assert!(matches!(e, personalize::Error::BaseMismatch { .. }), "{e:?}");
    assert!(e.to_string().contains("--allow-base-mismatch"), "{e}");
    fresh.apply_concept(&other, true).unwrap();
}

#[test]
fn full_mode_writes_a_diffusers_unet() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(UnetMode::Full);
    train::train::<AD>(
        &TrainRequest {
            base: &personalize::Base::new(base()),
            config: &c,
            data: &data(1),
            out: dir.path(),
            resume: false,
        },
        &FlexDevice,
        &mut |_| {},
    )
    .unwrap();
    let t = Trainer::<AD>::new(
        &TrainRequest {
            base: &personalize::Base::new(base()),
            config: &c,
            data: &data(1),
            out: dir.path(),
            resume: true,
        },
        &FlexDevice,
    )
    .unwrap();
    let loaded = sd_unet::UNet2DConditionModel::<Flex>::load(&dir.path().join("unet"), &FlexDevice).unwrap();
    assert_eq!(max_diff(&snapshot(&t.model.unet.valid()), &snapshot(&loaded)), 0.0);
    let mut pipe = personalize::Pipeline::<Flex>::load(&base(), &FlexDevice).unwrap();
    let concept = Concept::<Flex>::load(dir.path(), &FlexDevice).unwrap();
    pipe.apply_concept(&concept, false).unwrap();
    assert_eq!(max_diff(&snapshot(&pipe.unet), &snapshot(&loaded)), 0.0);
}

#[test]
fn prior_preservation_adds_the_class_loss() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(UnetMode::Lora { rank: 2, alpha: 2.0 });
    c.steps = 2;
    c.prior = Some(PriorConfig { class_prompt: "a photo of a toy".into(), weight: 1.0 });
    let mut d = data(1);
    let e = train::train::<AD>(
        &TrainRequest { base: &personalize::Base::new(base()), config: &c, data: &d, out: dir.path(), resume: false },
        &FlexDevice,
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("class images"), "{e}");
    d.class_images = vec![picture(32, 32, 9), picture(48, 40, 11)];
    let mut seen = Vec::new();
    train::train::<AD>(
        &TrainRequest { base: &personalize::Base::new(base()), config: &c, data: &d, out: dir.path(), resume: false },
        &FlexDevice,
        &mut |s| seen.push(s.prior_loss),
    )
    .unwrap();
    assert!(seen.iter().all(|p| p.is_some_and(|v| v.is_finite() && v > 0.0)), "{seen:?}");
}

#[test]
fn bad_input_is_refused_before_training() {
    let dir = tempfile::tempdir().unwrap();
    // No images.
    let e = train::load_images(&[]).unwrap_err().to_string();
    assert!(e.contains("no training images"), "{e}");
    let mut d = data(1);
    d.images.clear();
    let e = train::train::<AD>(
        &TrainRequest {
            base: &personalize::Base::new(base()),
            config: &cfg(UnetMode::Frozen),
            data: &d,
            out: dir.path(),
            resume: false,
        },
        &FlexDevice,
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("no training images"), "{e}");
    // One unreadable image among several: named.
    let good = dir.path().join("good.png");
    personalize::write_png(&good, &picture(16, 16, 1), &[]).unwrap();
    let bad = dir.path().join("broken.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let e = train::load_images(&[good.clone(), bad.clone(), good.clone()]).unwrap_err().to_string();
    assert!(e.contains("broken.png"), "{e}");
    let e = train::load_images(&[good.clone(), dir.path().join("missing.jpg")]).unwrap_err().to_string();
    assert!(e.contains("missing.jpg"), "{e}");
    assert_eq!(train::load_images(&[good.clone(), good]).unwrap().len(), 2);
    // Resolution not a multiple of 8.
    let mut c = cfg(UnetMode::Frozen);
    c.resolution = 36;
    let out = dir.path().join("out");
    let e = train::train::<AD>(
        &TrainRequest { base: &personalize::Base::new(base()), config: &c, data: &data(1), out: &out, resume: false },
        &FlexDevice,
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("multiple of 8"), "{e}");
    // Queries that do not match the images.
    let mut d = data(2);
    d.queries = queries(1, 1);
    let e = train::train::<AD>(
        &TrainRequest {
            base: &personalize::Base::new(base()),
            config: &cfg(UnetMode::Frozen),
            data: &d,
            out: &out,
            resume: false,
        },
        &FlexDevice,
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("queries"), "{e}");
    assert!(!out.exists(), "nothing may be written before training starts");
}

#[test]
fn nan_loss_stops_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(UnetMode::Full);
    c.steps = 50;
    c.save_every = 1;
    c.lr = 1e30;
    c.max_grad_norm = None;
    let mut last = 0;
    let e = train::train::<AD>(
        &TrainRequest {
            base: &personalize::Base::new(base()),
            config: &c,
            data: &data(1),
            out: dir.path(),
            resume: false,
        },
        &FlexDevice,
        &mut |s| last = s.step,
    )
    .unwrap_err();
    assert!(matches!(e, personalize::Error::NonFinite(_)), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("NaN"), "{e}");
    assert!(e.contains(&format!("step-{last:06}")), "{e}");
    let ck = train::list_checkpoints(dir.path());
    assert_eq!(ck.last().map(|c| c.0), Some(last));
    let concept = Concept::<Flex>::load(dir.path(), &FlexDevice).unwrap();
    assert_eq!(concept.info.steps_done, last);
}

/// A checkpoint that cannot be written completely (here: a file-size limit, as a full disk)
/// leaves no partial checkpoint behind, and the error says so. Runs itself in a child process
/// with `ulimit -f`.
#[test]
fn full_disk_leaves_no_partial_checkpoint() {
    if let Ok(out) = std::env::var("PERSONALIZE_TRAIN_FULL_DISK_CHILD") {
        let mut c = cfg(UnetMode::Full);
        c.steps = 2;
        c.save_every = 1;
        let r = train::train::<AD>(
            &TrainRequest {
                base: &personalize::Base::new(base()),
                config: &c,
                data: &data(1),
                out: Path::new(&out),
                resume: false,
            },
            &FlexDevice,
            &mut |_| {},
        );
        std::fs::write(
            Path::new(&out).join("child-result.txt"),
            match r {
                Ok(_) => "ok".to_string(),
                Err(e) => format!("error: {e}"),
            },
        )
        .ok();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("concept");
    std::fs::create_dir_all(&out).unwrap();
    let exe = std::env::current_exe().unwrap();
    // 1200 KiB: the UNet weights (~820 KiB) fit, the optimizer state (twice that) does not.
    let status = std::process::Command::new("bash")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 1200; exec \"$0\" full_disk_leaves_no_partial_checkpoint --exact --nocapture --test-threads 1")
        .arg(&exe)
        .env("PERSONALIZE_TRAIN_FULL_DISK_CHILD", &out)
        .status()
        .unwrap();
    assert!(status.success());
    let result = std::fs::read_to_string(out.join("child-result.txt")).unwrap();
    eprintln!("child: {result}");
    assert!(result.starts_with("error:") && result.contains("no partial checkpoint"), "{result}");
    assert!(train::list_checkpoints(&out).is_empty());
    let leftovers: Vec<_> =
        std::fs::read_dir(out.join("checkpoints")).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// The LoRA fixture: a LoRA trained here, written as `unet_lora.safetensors`, and the UNet
/// output diffusers computes after `load_lora_weights` (xtask/fixtures/fixtures_train.py).
#[test]
fn lora_file_matches_diffusers() {
    let fx = fixtures().join("train");
    let lora_path = fx.join("unet_lora.safetensors");
    if std::env::var("PERSONALIZE_WRITE_TRAIN_FIXTURE").is_ok() {
        std::fs::create_dir_all(&fx).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(UnetMode::Lora { rank: 2, alpha: 3.0 });
        c.steps = 5;
        c.lr = 1e-2;
        train::train::<AD>(
            &TrainRequest {
                base: &personalize::Base::new(base()),
                config: &c,
                data: &data(1),
                out: dir.path(),
                resume: false,
            },
            &FlexDevice,
            &mut |_| {},
        )
        .unwrap();
        std::fs::copy(dir.path().join("unet_lora.safetensors"), &lora_path).unwrap();
        let mut rng = scheduler::SeededRng::new(11);
        let mut n = |len: usize| {
            let mut v = vec![0f32; len];
            rng.fill_standard_normal(&mut v);
            v
        };
        let inputs = BTreeMap::from([
            ("sample".to_string(), HostTensor::f32(vec![2, 4, 4, 4], n(128))),
            ("timestep".to_string(), HostTensor::f32(vec![2], vec![17.0, 613.0])),
            ("encoder_hidden_states".to_string(), HostTensor::f32(vec![2, 81, 32], n(2 * 81 * 32))),
        ]);
        write_tensors(&fx.join("lora_unet_inputs.safetensors"), &inputs, &BTreeMap::new()).unwrap();
        eprintln!("wrote {}; now run xtask/fixtures/fixtures_train.py", fx.display());
        return;
    }
    let io = read_tensors(&fx.join("lora_unet_io.safetensors")).expect("fixture missing: see this test's doc");
    let mut unet = sd_unet::UNet2DConditionModel::<Flex>::load(&base().join("unet"), &FlexDevice).unwrap();
    sd_unet::lora::load_lora(&mut unet, &read_tensors(&lora_path).unwrap(), None).unwrap();
    let x = io["sample"].to_float::<Flex, 4>("sample", &FlexDevice).unwrap();
    let t = io["timestep"].to_float::<Flex, 1>("timestep", &FlexDevice).unwrap();
    let c = io["encoder_hidden_states"].to_float::<Flex, 3>("ehs", &FlexDevice).unwrap();
    let ours = HostTensor::from_tensor(unet.forward(x.clone(), t.clone(), c.clone()).unwrap());
    let d = ours.max_abs_diff(&io["out"]);
    eprintln!("LoRA UNet vs diffusers: max abs diff {d:e}");
    assert!(d < 1e-4, "max abs diff {d}");
    // And the LoRA changes the output (the comparison is not the base UNet's).
    let plain = sd_unet::UNet2DConditionModel::<Flex>::load(&base().join("unet"), &FlexDevice).unwrap();
    let base_out = HostTensor::from_tensor(plain.forward(x, t, c).unwrap());
    assert!(base_out.max_abs_diff(&io["out"]) > 1e-3);
}

#[test]
fn write_unet_safetensors_reproduces_the_diffusers_file() {
    // Streamed export of a loaded UNet: the same keys, shapes and values as the file it came from.
    let dir = base().join("unet");
    let unet = sd_unet::UNet2DConditionModel::<Flex>::load(&dir, &FlexDevice).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("diffusion_pytorch_model.safetensors");
    let size = unet.save_safetensors(&out).unwrap();
    assert_eq!(size, std::fs::metadata(&out).unwrap().len());
    let ours = read_tensors(&out).unwrap();
    let reference = read_tensors(&dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    assert_eq!(ours.keys().collect::<Vec<_>>(), reference.keys().collect::<Vec<_>>());
    for (k, v) in &reference {
        assert_eq!(ours[k].shape, v.shape, "{k}");
        assert_eq!(ours[k].max_abs_diff(v), 0.0, "{k}");
    }
}

/// A concept whose cached queries hold no image ([0, Q, D]) panicked in generation; loading
/// it is now an error naming the file and the shape.
#[test]
fn concept_with_empty_queries_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(UnetMode::Frozen);
    train::train::<AD>(
        &TrainRequest {
            base: &personalize::Base::new(base()),
            config: &c,
            data: &data(1),
            out: dir.path(),
            resume: false,
        },
        &FlexDevice,
        &mut |_| {},
    )
    .unwrap();
    let q = dir.path().join("visual_queries.safetensors");
    let d = model_io::tensor_file::read_tensors(&q).unwrap()["queries"].shape[2];
    let empty = std::collections::BTreeMap::from([("queries".to_string(), HostTensor::f32(vec![0, 32, d], vec![]))]);
    model_io::tensor_file::write_tensors(&q, &empty, &Default::default()).unwrap();
    let msg = Concept::<Flex>::load(dir.path(), &FlexDevice).err().unwrap().to_string();
    assert!(msg.contains("visual_queries.safetensors") && msg.contains("[0, 32,"), "{msg}");
}

/// Nothing a user made is lost: `--resume` with nothing to resume, a lower `--steps` on
/// resume, a finished concept without checkpoints, and a folder another run trains into are
/// each refused (they once restarted from 0, rewrote the concept, or finished with one result
/// lost).
#[test]
fn training_refuses_what_would_lose_work() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(UnetMode::Frozen);
    let run = |c: &TrainConfig, resume: bool| {
        train::train::<AD>(
            &TrainRequest { base: &personalize::Base::new(base()), config: c, data: &data(1), out: dir.path(), resume },
            &FlexDevice,
            &mut |_| {},
        )
        .map_err(|e| e.to_string())
    };
    let e = run(&c, true).unwrap_err();
    assert!(e.contains("--resume") && e.contains("no checkpoint"), "{e}");
    run(&c, false).unwrap();
    let mut fewer = c.clone();
    fewer.steps = 2;
    let e = run(&fewer, true).unwrap_err();
    assert!(e.contains("step 4") && e.contains("--steps 2"), "{e}");
    std::fs::remove_dir_all(dir.path().join("checkpoints")).unwrap();
    let before = std::fs::read(dir.path().join("concept.json")).unwrap();
    let e = run(&c, false).unwrap_err();
    assert!(e.contains("concept.json") && e.contains("--overwrite"), "{e}");
    assert_eq!(std::fs::read(dir.path().join("concept.json")).unwrap(), before);

    // A lock held by a live process (this test's parent, say) refuses a second run; the lock
    // of a process that is gone is taken over, and released after the run.
    let other = tempfile::tempdir().unwrap();
    let lock = other.path().join(".lock");
    std::fs::write(&lock, "1").unwrap(); // pid 1 is always alive
    let e = train::train::<AD>(
        &TrainRequest {
            base: &personalize::Base::new(base()),
            config: &c,
            data: &data(1),
            out: other.path(),
            resume: false,
        },
        &FlexDevice,
        &mut |_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("in use by another training run"), "{e}");
    std::fs::write(&lock, "4000000000").unwrap(); // no such process
    train::train::<AD>(
        &TrainRequest {
            base: &personalize::Base::new(base()),
            config: &c,
            data: &data(1),
            out: other.path(),
            resume: false,
        },
        &FlexDevice,
        &mut |_| {},
    )
    .unwrap();
    assert!(!lock.exists(), "the lock is released after the run");
}

/// An image over the pixel limit is refused from its header with the limit named, as
/// `personalize encode` does (training once said only "Memory limit exceeded").
#[test]
fn oversized_training_image_names_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("huge.png");
    {
        let file = std::fs::File::create(&p).unwrap();
        let mut enc = png::Encoder::new(file, 20000, 20000);
        enc.set_color(png::ColorType::Rgb);
        let mut w = enc.write_header().unwrap();
        // A few bytes of image data: the header claims 1.2 GB of pixels.
        w.write_chunk(png::chunk::IDAT, &[0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01]).unwrap();
    }
    let e = train::load_images(&[p]).unwrap_err().to_string();
    assert!(e.contains("huge.png") && e.contains("20000x20000") && e.contains("limit"), "{e}");
}
