//! The training helpers' contract and the seeded noise.

use scheduler::{HostSample, NoiseSource, PredictionType, SchedulerConfig, SchedulerError, SeededRng, TrainSchedule};

fn schedule() -> TrainSchedule {
    let cfg = SchedulerConfig::from_json_str(
        r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}"#,
    )
    .unwrap();
    TrainSchedule::from_config(&cfg, true).unwrap()
}

#[test]
fn training_targets_per_prediction_type() {
    let s = schedule();
    let x = HostSample::new((0..8).map(|i| i as f32 * 0.25 - 1.0).collect(), vec![2, 4]).unwrap();
    let n = HostSample::new((0..8).map(|i| 1.0 - i as f32 * 0.125).collect(), vec![2, 4]).unwrap();
    let t = [10usize, 700];
    assert_eq!(s.training_target(PredictionType::Epsilon, &x, &n, &t).unwrap(), n);
    assert_eq!(s.training_target(PredictionType::Sample, &x, &n, &t).unwrap(), x);
    let v = s.training_target(PredictionType::VPrediction, &x, &n, &t).unwrap();
    for (b, &tb) in t.iter().enumerate() {
        let ac = s.alphas_cumprod()[tb];
        for j in 0..4 {
            let k = b * 4 + j;
            let want = ac.sqrt() * n.data[k] - (1.0 - ac).sqrt() * x.data[k];
            assert_eq!(v.data[k], want);
        }
    }
    // One timestep broadcasts over the batch.
    let a = s.add_noise(&x, &n, &[500]).unwrap();
    let b = s.add_noise(&x, &n, &[500, 500]).unwrap();
    assert_eq!(a, b);
}

#[test]
fn training_helpers_reject_bad_input() {
    let s = schedule();
    let x = HostSample::zeros(vec![2, 4]);
    assert!(matches!(s.add_noise(&x, &x, &[1000, 0]), Err(SchedulerError::BadTimestep { .. })));
    assert!(matches!(s.add_noise(&x, &x, &[1, 2, 3]), Err(SchedulerError::Shape(_))));
    assert!(matches!(s.add_noise(&x, &HostSample::zeros(vec![2, 3]), &[1]), Err(SchedulerError::Shape(_))));
    assert!(matches!(
        s.training_target(PredictionType::Epsilon, &x, &x, &[1000]),
        Err(SchedulerError::BadTimestep { .. })
    ));
}

#[test]
fn seeded_rng_is_reproducible_and_standard_normal() {
    let like = HostSample::zeros(vec![1, 4, 64, 64]);
    let a = SeededRng::new(1234).standard_normal_like(&like).unwrap();
    let b = SeededRng::new(1234).standard_normal_like(&like).unwrap();
    let c = SeededRng::new(1235).standard_normal_like(&like).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    let n = a.data.len() as f64;
    let mean = a.data.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = a.data.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05, "mean {mean}, var {var}");
    // The stream is pinned: these values are part of the crate's contract.
    let mut r = SeededRng::new(0);
    let first: Vec<u64> = (0..2).map(|_| r.next_u64()).collect();
    assert_eq!(first, PINNED_U64);
}

/// xoshiro256** seeded by SplitMix64 from 0 (reference values of the published algorithms).
const PINNED_U64: [u64; 2] = [0x99EC5F36CB75F2B4, 0xBF6E1F784956452A];

#[test]
fn stochastic_schedulers_are_reproducible_with_a_seed() {
    let cfg = SchedulerConfig::from_json_str(r#"{"_class_name": "EulerAncestralDiscreteScheduler"}"#).unwrap();
    let run = |seed: u64, name: &str| {
        let mut s = scheduler::from_config::<HostSample>(&cfg, Some(name)).unwrap();
        s.set_timesteps(5).unwrap();
        let mut rng = SeededRng::new(seed);
        let mut x =
            rng.standard_normal_like(&HostSample::zeros(vec![1, 4, 4, 4])).unwrap().scale_by(s.init_noise_sigma());
        for t in s.timesteps().to_vec() {
            let eps = x.scale_by(0.1);
            x = s.step(&eps, t, &x, &mut rng).unwrap();
        }
        x
    };
    for name in ["euler-a", "ddpm"] {
        assert_eq!(run(9, name), run(9, name), "{name}");
        assert_ne!(run(9, name), run(10, name), "{name}");
    }
}

trait ScaleBy {
    fn scale_by(&self, a: f32) -> Self;
}

impl ScaleBy for HostSample {
    fn scale_by(&self, a: f32) -> Self {
        scheduler::Sample::scale(self, a)
    }
}
