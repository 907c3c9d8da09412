//! Bad input gives clear, one-line errors; CLI override names pick the right class.

mod common;

use std::path::PathBuf;

use common::fixtures;
use scheduler::{HostSample, NoNoise, SchedulerConfig, SchedulerError, SchedulerKind, CLI_NAMES};

const SD15: &str = r#"{"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
  "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true,
  "steps_offset": 1, "trained_betas": null, "clip_sample": false}"#;

fn temp_dir(name: &str, config: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("scheduler-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("scheduler_config.json"), config).unwrap();
    dir
}

fn err_of(r: scheduler::Result<Box<dyn scheduler::Scheduler<HostSample>>>) -> SchedulerError {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

#[test]
fn unknown_class_lists_the_supported_ones() {
    let dir = temp_dir("lms", r#"{"_class_name": "LMSDiscreteScheduler"}"#);
    let e = err_of(scheduler::from_dir(&dir, None));
    let msg = e.to_string();
    assert!(matches!(e, SchedulerError::UnknownClass { .. }), "{msg}");
    assert!(msg.contains("scheduler_config.json") && msg.contains("LMSDiscreteScheduler"), "{msg}");
    for k in SchedulerKind::ALL {
        assert!(msg.contains(k.class_name()) && msg.contains(k.cli_name()), "{msg}");
    }
    assert!(!msg.contains('\n'), "one line: {msg}");

    let e = err_of(scheduler::from_dir(&temp_dir("nocls", "{}"), None));
    assert!(e.to_string().contains("<missing>"), "{e}");
    let e = err_of(scheduler::from_dir(&temp_dir("sd15", SD15), Some("heun")));
    assert!(e.to_string().contains("--scheduler") && e.to_string().contains("\"heun\""), "{e}");
}

#[test]
fn missing_or_malformed_config_names_the_file() {
    let dir = std::env::temp_dir().join(format!("scheduler-test-{}-empty", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let e = err_of(scheduler::from_dir(&dir, None));
    assert!(matches!(e, SchedulerError::Io { .. }) && e.to_string().contains("scheduler_config.json"), "{e}");
    let e = err_of(scheduler::from_dir(&temp_dir("badjson", "{not json"), None));
    assert!(matches!(e, SchedulerError::Json { .. }), "{e}");
    let e = err_of(scheduler::from_dir(
        &temp_dir("badtype", r#"{"_class_name": "DDIMScheduler", "steps_offset": "one"}"#),
        None,
    ));
    assert!(e.to_string().contains("steps_offset"), "{e}");
}

#[test]
fn zero_and_too_many_steps_are_errors_for_every_scheduler() {
    let dir = temp_dir("steps", SD15);
    for name in CLI_NAMES {
        let mut s = scheduler::from_dir(&dir, Some(name)).unwrap();
        let e = s.set_timesteps(0).unwrap_err();
        assert!(matches!(e, SchedulerError::ZeroSteps), "{name}: {e}");
        let e = s.set_timesteps(1001).unwrap_err();
        assert!(matches!(e, SchedulerError::TooManySteps { steps: 1001, train: 1000 }), "{name}: {e}");
        assert!(e.to_string().contains("num_train_timesteps = 1000"), "{e}");
        s.set_timesteps(1000).unwrap();
    }
}

#[test]
fn unknown_config_values_are_named() {
    for (key, value) in
        [("beta_schedule", "\"quadratic\""), ("timestep_spacing", "\"uniform\""), ("prediction_type", "\"flow\"")]
    {
        let cfg = format!(r#"{{"_class_name": "DDIMScheduler", "{key}": {value}}}"#);
        let e = err_of(scheduler::from_dir(&temp_dir(key, &cfg), None));
        let msg = e.to_string();
        assert!(matches!(e, SchedulerError::Unsupported { .. }), "{msg}");
        assert!(msg.contains(key) && msg.contains(value.trim_matches('"')) && msg.contains("expected one of"), "{msg}");
    }
    let e = err_of(scheduler::from_dir(&temp_dir("prk", r#"{"_class_name": "PNDMScheduler"}"#), None));
    assert!(e.to_string().contains("skip_prk_steps"), "{e}");
    let e = err_of(scheduler::from_dir(
        &temp_dir("sde", r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}"#),
        None,
    ));
    assert!(e.to_string().contains("algorithm_type"), "{e}");
    let e = err_of(scheduler::from_dir(
        &temp_dir("t0", r#"{"_class_name": "DDIMScheduler", "num_train_timesteps": 0}"#),
        None,
    ));
    assert!(e.to_string().contains("num_train_timesteps"), "{e}");
}

#[test]
fn step_errors_are_clear() {
    let dir = temp_dir("step-errors", SD15);
    let x = HostSample::zeros(vec![1, 2]);
    let mut s = scheduler::from_dir(&dir, Some("ddim")).unwrap();
    assert!(matches!(s.step(&x, 1.0, &x, &mut NoNoise), Err(SchedulerError::NotInitialized(_))));
    s.set_timesteps(10).unwrap();
    assert!(matches!(s.step(&x, 1.5, &x, &mut NoNoise), Err(SchedulerError::BadTimestep { .. })));
    assert!(matches!(s.step(&x, 1000.0, &x, &mut NoNoise), Err(SchedulerError::BadTimestep { .. })));
    // Stochastic schedulers refuse to run without noise.
    let mut s = scheduler::from_dir(&dir, Some("euler-a")).unwrap();
    s.set_timesteps(3).unwrap();
    let t = s.timesteps()[0];
    assert!(matches!(s.step(&x, t, &x, &mut NoNoise), Err(SchedulerError::Noise(_))));
    // Euler: a timestep not in the schedule.
    let mut s = scheduler::from_dir(&dir, Some("euler")).unwrap();
    s.set_timesteps(3).unwrap();
    assert!(matches!(s.scale_model_input(&x, 123.25), Err(SchedulerError::BadTimestep { .. })));
    // Past the end.
    let ts = s.timesteps().to_vec();
    let mut y = x.clone();
    for &t in &ts {
        y = s.step(&x, t, &y, &mut NoNoise).unwrap();
    }
    assert!(matches!(s.step(&x, ts[0], &y, &mut NoNoise), Err(SchedulerError::PastEnd { .. })));
}

#[test]
fn override_names_pick_classes() {
    let dir = temp_dir("names", SD15);
    assert_eq!(scheduler::from_dir(&dir, None).unwrap().kind(), SchedulerKind::Pndm);
    for (name, kind) in CLI_NAMES.iter().zip(SchedulerKind::ALL) {
        let s = scheduler::from_dir(&dir, Some(name)).unwrap();
        assert_eq!(s.kind(), kind, "{name}");
        assert_eq!(kind.cli_name(), *name);
        // A class name works as well.
        assert_eq!(scheduler::from_dir(&dir, Some(kind.class_name())).unwrap().kind(), kind);
    }
    assert!(SchedulerKind::Ddpm.is_stochastic() && SchedulerKind::EulerAncestral.is_stochastic());
    assert!(!SchedulerKind::DpmSolverMultistep.is_stochastic());
}

#[test]
fn dpm_karras_alias_forces_karras_sigmas() {
    let dir = temp_dir("karras", SD15);
    let mut plain = scheduler::from_dir(&dir, Some("dpm++2m")).unwrap();
    let mut karras = scheduler::from_dir(&dir, Some("dpm++2m-karras")).unwrap();
    plain.set_timesteps(7).unwrap();
    karras.set_timesteps(7).unwrap();
    // Matches the dpm++2m_sd15_karras_eps_n7 fixture's timesteps (diffusers, SD1.5 config).
    let io = common::read_safetensors(&fixtures().join("dpm++2m_sd15_karras_eps_n7/io.safetensors"));
    let want: Vec<f32> = io["timesteps"].values.iter().map(|&v| v as f32).collect();
    assert_eq!(karras.timesteps(), want.as_slice());
    assert_ne!(plain.timesteps(), karras.timesteps());
}

#[test]
fn use_default_values_are_dropped_on_class_switch() {
    let cfg = SchedulerConfig::from_json_str(
        r#"{"_class_name": "DDIMScheduler", "timestep_spacing": "leading", "_use_default_values": ["timestep_spacing"]}"#,
    )
    .unwrap();
    let mut s = scheduler::from_config::<HostSample>(&cfg, Some("euler")).unwrap();
    s.set_timesteps(2).unwrap();
    assert_eq!(s.timesteps(), &[999.0, 0.0], "Euler's own default spacing (linspace)");
}

/// Betas outside [0, 1) made every step NaN (a black image with exit 0); they are refused.
#[test]
fn betas_outside_zero_one_are_refused() {
    for (name, cfg) in [
        ("beta_end_2", r#"{"_class_name": "DDIMScheduler", "beta_end": 2.0}"#),
        ("beta_start_neg", r#"{"_class_name": "DDIMScheduler", "beta_start": -0.1, "beta_end": 0.02}"#),
        (
            "beta_end_1",
            r#"{"_class_name": "EulerDiscreteScheduler", "beta_end": 1.0, "beta_schedule": "scaled_linear"}"#,
        ),
    ] {
        let cfg = SchedulerConfig::from_json_str(cfg).unwrap();
        let msg = err_of(scheduler::from_config::<HostSample>(&cfg, None)).to_string();
        assert!(msg.contains("beta_start/beta_end") && msg.contains("[0, 1)"), "{name}: {msg}");
    }
    // Zero-terminal-SNR rescaling makes the last beta 1 on purpose: still accepted.
    let zsnr = r#"{"_class_name": "DDIMScheduler", "rescale_betas_zero_snr": true, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "beta_end": 0.012}"#;
    assert!(scheduler::from_config::<HostSample>(&SchedulerConfig::from_json_str(zsnr).unwrap(), None).is_ok());
}

/// A class reads only its own keys: Euler ancestral ignores the Euler-only keys of a config
/// written for Euler, even values Euler would refuse (as diffusers ignores them).
#[test]
fn euler_ancestral_ignores_the_euler_only_keys() {
    let json = r#"{"_class_name": "EulerAncestralDiscreteScheduler", "final_sigmas_type": "foo", "sigma_min": "x"}"#;
    let cfg = SchedulerConfig::from_json_str(json).unwrap();
    assert!(scheduler::from_config::<HostSample>(&cfg, None).is_ok());
    let e = err_of(scheduler::from_config::<HostSample>(&cfg, Some("euler")));
    assert!(e.to_string().contains("final_sigmas_type") || e.to_string().contains("sigma_min"), "{e}");
}
