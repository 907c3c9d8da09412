//! The same schedulers on Burn tensors (burn-flex on the CPU): every step matches the host run.
#![cfg(feature = "burn")]

mod common;

use burn::tensor::{Tensor, TensorData};
use burn_flex::{Flex, FlexDevice};
use common::{fixtures, read_safetensors};
use scheduler::{BurnNoise, HostSample, NoiseQueue, NoiseSource, Sample};

type T4 = Tensor<Flex, 4>;

fn to_tensor(h: &HostSample) -> T4 {
    let dims: [usize; 4] = h.shape.clone().try_into().unwrap();
    Tensor::from_data(TensorData::new(h.data.clone(), dims), &FlexDevice)
}

fn to_vec(t: &T4) -> Vec<f32> {
    t.to_data().to_vec::<f32>().unwrap()
}

#[test]
fn tensor_steps_match_host_steps() {
    for name in [
        "ddim_sd15_leading_eps_n7",
        "pndm_sd15_leading_eps_n7",
        "euler_sd15_karras_eps_n7",
        "euler-a_sd15_leading_v_n7",
        "ddpm_sd15_trailing_v_n7",
        "dpm++3m_sd15_order3_eps_n25",
    ] {
        let dir = fixtures().join(name);
        let io = read_safetensors(&dir.join("io.safetensors"));
        let n = io["num_inference_steps"].values[0] as usize;
        let outputs = io["model_outputs"].host().unstack().unwrap();
        let noises = io.get("noises").map(|t| t.host().unstack().unwrap()).unwrap_or_default();

        let mut host = scheduler::from_dir(&dir, None).unwrap();
        let mut dev = scheduler::load::<T4>(&dir, None).unwrap();
        host.set_timesteps(n).unwrap();
        dev.set_timesteps(n).unwrap();
        assert_eq!(host.timesteps(), dev.timesteps());
        let mut hq = NoiseQueue::new(noises.clone());
        let mut dq = NoiseQueue::new(noises.iter().map(to_tensor).collect());
        let mut x = io["sample"].host();
        let mut y = to_tensor(&x);
        for (i, t) in host.timesteps().to_vec().into_iter().enumerate() {
            let xs = host.scale_model_input(&x, t).unwrap();
            let ys = dev.scale_model_input(&y, t).unwrap();
            assert_eq!(xs.data, to_vec(&ys), "{name}: scale_model_input {i}");
            x = host.step(&outputs[i], t, &x, &mut hq).unwrap();
            y = dev.step(&to_tensor(&outputs[i]), t, &y, &mut dq).unwrap();
            let diff =
                x.data.iter().zip(to_vec(&y)).map(|(a, b)| (a - b).abs() / a.abs().max(1.0)).fold(0.0f32, f32::max);
            // Same float32 ops; a backend may fuse a multiply-add, so allow a few ulp.
            assert!(diff <= 1e-6, "{name}: step {i}: {diff:e}");
        }
    }
}

#[test]
fn training_helpers_on_tensors() {
    let dir = fixtures().join("add_noise_sd15");
    let io = read_safetensors(&dir.join("io.safetensors"));
    let s = scheduler::load::<T4>(&dir, None).unwrap();
    let (x, n) = (to_tensor(&io["original"].host()), to_tensor(&io["noise"].host()));
    let t: Vec<usize> = io["timesteps"].values.iter().map(|&v| v as usize).collect();
    let noisy = to_vec(&s.add_noise(&x, &n, &t).unwrap());
    let v = to_vec(&s.train_schedule().velocity(&x, &n, &t).unwrap());
    for (got, want) in [(noisy, &io["noisy"].values), (v, &io["velocity"].values)] {
        let e = got.iter().zip(want).map(|(&a, &b)| (a as f64 - b).abs() / b.abs().max(1.0)).fold(0.0, f64::max);
        assert!(e <= 1e-6, "{e:e}");
    }
}

#[test]
fn burn_noise_is_shaped_and_seeded() {
    let like = T4::zeros([2, 4, 8, 8], &FlexDevice);
    let a = BurnNoise::seeded::<Flex>(&FlexDevice, 5).standard_normal_like(&like).unwrap();
    let b = BurnNoise::seeded::<Flex>(&FlexDevice, 5).standard_normal_like(&like).unwrap();
    assert_eq!(Sample::shape(&a), vec![2, 4, 8, 8]);
    assert_eq!(to_vec(&a), to_vec(&b));
    let m = to_vec(&a).iter().map(|&v| v as f64).sum::<f64>() / 512.0;
    assert!(m.abs() < 0.2, "mean {m}");
}
