//! Step-for-step parity with diffusers on the fixtures of xtask/fixtures/fixtures_scheduler.py.
//!
//! Every folder holds a config, a start sample, one model output per timestep and the diffusers
//! reference: timesteps, `scale_model_input` results (Euler family) and the sample after every
//! step. Tolerance: |a - b| <= 1e-5 * max(|b|, 1) on every value.
//!
//! Stochastic schedulers (DDPM, Euler ancestral) are compared fairly by replaying the exact noise
//! diffusers drew (recorded by wrapping its `randn_tensor`, not replacing it) through a
//! `NoiseQueue`: the scheduler arithmetic must then match step for step, and the test also checks
//! that the Rust side asks for noise exactly as often as diffusers did.

mod common;

use std::path::Path;

use common::{fixtures, max_rel_err, read_safetensors, TOL};
use scheduler::NoiseQueue;

/// Runs one fixture folder; returns the largest relative error seen.
fn check_case(dir: &Path) -> f64 {
    let name = dir.file_name().unwrap().to_string_lossy().to_string();
    let case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let override_name = case["override"].as_str();
    let io = read_safetensors(&dir.join("io.safetensors"));
    let n = io["num_inference_steps"].values[0] as usize;
    let sample = io["sample"].host();
    let outputs = io["model_outputs"].host().unstack().unwrap();
    let ref_ts = &io["timesteps"].values;
    let ref_samples = io["samples"].host().unstack().unwrap();
    let noises = io.get("noises").map(|t| t.host().unstack().unwrap()).unwrap_or_default();
    let n_noises = noises.len();

    let mut s = scheduler::from_dir(dir, override_name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(s.kind().class_name(), case["class"].as_str().unwrap(), "{name}: class");
    s.set_timesteps(n).unwrap();
    let ts = s.timesteps().to_vec();
    assert_eq!(ts.len(), ref_ts.len(), "{name}: number of timesteps {ts:?} vs {ref_ts:?}");
    let mut worst = max_rel_err(&ts, ref_ts);
    assert!(worst <= TOL, "{name}: timesteps {ts:?} vs {ref_ts:?}");
    let sigma_err = max_rel_err(&[s.init_noise_sigma()], &io["init_noise_sigma"].values);
    assert!(
        sigma_err <= TOL,
        "{name}: init_noise_sigma {} vs {:?}",
        s.init_noise_sigma(),
        io["init_noise_sigma"].values
    );
    worst = worst.max(sigma_err);

    let scaled_ref = io.get("scaled_inputs").map(|t| t.host().unstack().unwrap());
    let mut queue = NoiseQueue::new(noises.clone());
    let mut x = sample.clone();
    for (i, &t) in ts.iter().enumerate() {
        let scaled = s.scale_model_input(&x, t).unwrap();
        let e = match &scaled_ref {
            Some(r) => max_rel_err(&scaled.data, &r[i].data.iter().map(|&v| v as f64).collect::<Vec<_>>()),
            None => max_rel_err(&scaled.data, &x.data.iter().map(|&v| v as f64).collect::<Vec<_>>()),
        };
        assert!(e <= TOL, "{name}: scale_model_input at step {i} (t = {t}): rel err {e:e}");
        x = s.step(&outputs[i], t, &x, &mut queue).unwrap_or_else(|e| panic!("{name}: step {i}: {e}"));
        let r: Vec<f64> = ref_samples[i].data.iter().map(|&v| v as f64).collect();
        let e2 = max_rel_err(&x.data, &r);
        assert!(e2 <= TOL, "{name}: sample after step {i} (t = {t}): rel err {e2:e}");
        worst = worst.max(e).max(e2);
    }
    assert_eq!(queue.used(), n_noises, "{name}: noise draws");

    worst
}

/// Runs every fixture folder whose name starts with `prefix`; prints the worst error.
fn check_family(prefix: &str) {
    let mut dirs: Vec<_> = std::fs::read_dir(fixtures())
        .expect("fixtures: run xtask/fixtures/fixtures_scheduler.py")
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no fixtures for {prefix}");
    let mut worst = (0.0f64, String::new());
    for d in &dirs {
        let e = check_case(d);
        if e >= worst.0 {
            worst = (e, d.file_name().unwrap().to_string_lossy().to_string());
        }
    }
    println!("{prefix}: {} cases, max rel err {:.3e} ({})", dirs.len(), worst.0, worst.1);
}

#[test]
fn ddim_matches_diffusers() {
    check_family("ddim_");
}

#[test]
fn ddpm_matches_diffusers_with_recorded_noise() {
    check_family("ddpm_");
}

#[test]
fn pndm_matches_diffusers() {
    check_family("pndm_");
}

#[test]
fn euler_matches_diffusers() {
    check_family("euler_");
}

#[test]
fn euler_ancestral_matches_diffusers_with_recorded_noise() {
    check_family("euler-a_");
}

#[test]
fn dpm_solver_matches_diffusers() {
    check_family("dpm++");
}

#[test]
fn override_names_match_from_config() {
    check_family("override_");
}

#[test]
fn train_schedules_match_diffusers() {
    for name in [
        "schedule_linear",
        "schedule_scaled_linear",
        "schedule_cosine",
        "schedule_scaled_linear_zsnr",
        "schedule_linear_t777",
        "schedule_sigmoid",
    ] {
        let dir = fixtures().join(name);
        // DDPMScheduler configs: the only class with the sigmoid schedule.
        let s = scheduler::from_dir(&dir, None).unwrap();
        let s = s.train_schedule();
        let io = read_safetensors(&dir.join("io.safetensors"));
        // Bit-exact where torch's kernels are reproduced (linspace with FMA, cumprod in float64).
        // The zero-SNR rescaling takes torch.sqrt and the sigmoid torch.sigmoid, which on the
        // CPU (MKL, SLEEF) are not correctly rounded: there the stated 1e-5 applies.
        let tol = if name.contains("zsnr") || name.contains("sigmoid") { TOL } else { 0.0 };
        let eb = max_rel_err(s.betas(), &io["betas"].values);
        let ea = max_rel_err(s.alphas_cumprod(), &io["alphas_cumprod"].values);
        println!("{name}: betas {eb:e}, alphas_cumprod {ea:e}");
        assert!(eb <= tol && ea <= tol, "{name}: betas {eb:e}, alphas_cumprod {ea:e}");
    }
}

#[test]
fn add_noise_and_velocity_match_diffusers() {
    for name in ["add_noise_sd15", "add_noise_zsnr"] {
        let dir = fixtures().join(name);
        let s = scheduler::from_dir(&dir, None).unwrap();
        let io = read_safetensors(&dir.join("io.safetensors"));
        let (x, n) = (io["original"].host(), io["noise"].host());
        let t: Vec<usize> = io["timesteps"].values.iter().map(|&v| v as usize).collect();
        let noisy = s.add_noise(&x, &n, &t).unwrap();
        let v = s.train_schedule().velocity(&x, &n, &t).unwrap();
        let (e1, e2) = (max_rel_err(&noisy.data, &io["noisy"].values), max_rel_err(&v.data, &io["velocity"].values));
        println!("{name}: add_noise {e1:e}, velocity {e2:e}");
        assert!(e1 <= TOL && e2 <= TOL, "{name}: add_noise {e1:e}, velocity {e2:e}");
        // The training target follows the config's prediction type.
        let target = s.training_target(&x, &n, &t).unwrap();
        match s.prediction_type() {
            scheduler::PredictionType::VPrediction => assert_eq!(target.data, v.data),
            scheduler::PredictionType::Epsilon => assert_eq!(target.data, n.data),
            scheduler::PredictionType::Sample => assert_eq!(target.data, x.data),
        }
    }
}

#[test]
fn fixtures_cover_every_scheduler_spacing_and_prediction_type() {
    let names: Vec<String> =
        std::fs::read_dir(fixtures()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    for prefix in ["ddim_", "ddpm_", "pndm_", "euler_", "euler-a_", "dpm++2m_"] {
        for word in ["leading", "trailing", "linspace", "eps", "_v"] {
            assert!(
                names.iter().any(|n| n.starts_with(prefix) && n.contains(word)),
                "no fixture for {prefix} with {word}"
            );
        }
    }
}
