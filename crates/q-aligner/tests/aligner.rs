//! The aligner: shapes, query selection, the file format and its errors.

use burn::tensor::{Tensor, TensorData};
use burn_flex::{Flex, FlexDevice};
use model_io::tensor_file::HostTensor;
use q_aligner::{assemble, Aligner, AlignerSettings, QuerySelection};

fn queries(b: usize, q: usize, d: usize) -> Tensor<Flex, 3> {
    let v: Vec<f32> = (0..b * q * d).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    Tensor::from_data(TensorData::new(v, [b, q, d]), &FlexDevice)
}

#[test]
fn forward_matches_a_hand_computation() {
    let s = AlignerSettings { num_queries: 2, query_selection: QuerySelection::First, final_gelu: true };
    let a = Aligner::<Flex>::new(3, 4, 5, &s, &mut seeded::SplitMix64::new(0), &FlexDevice);
    let q = queries(1, 3, 3);
    let got = HostTensor::from_tensor(a.forward(q.clone()).unwrap());
    assert_eq!(got.shape, vec![1, 2, 5]);
    // By hand: exact GELU of Linear(GELU(Linear(x))) on the first two queries.
    let (t, _) = a.to_tensors();
    let w1 = t["fc1.weight"].as_f32("").unwrap();
    let b1 = t["fc1.bias"].as_f32("").unwrap();
    let w2 = t["fc2.weight"].as_f32("").unwrap();
    let b2 = t["fc2.bias"].as_f32("").unwrap();
    let x = HostTensor::from_tensor(q);
    let x = x.as_f32("").unwrap();
    let gelu = |v: f64| 0.5 * v * (1.0 + erf(v / std::f64::consts::SQRT_2));
    for qi in 0..2 {
        let h: Vec<f64> = (0..4)
            .map(|j| gelu((0..3).map(|i| (w1[j * 3 + i] * x[qi * 3 + i]) as f64).sum::<f64>() + b1[j] as f64))
            .collect();
        for o in 0..5 {
            let y = gelu((0..4).map(|j| w2[o * 4 + j] as f64 * h[j]).sum::<f64>() + b2[o] as f64);
            let g = got.as_f32("").unwrap()[qi * 5 + o] as f64;
            assert!((g - y).abs() < 1e-5, "q{qi} o{o}: {g} vs {y}");
        }
    }
}

/// erf by Abramowitz–Stegun 7.1.26 refined with a series; accurate to ~1e-7 here.
fn erf(x: f64) -> f64 {
    // Taylor series converges fast for |x| < 3, which covers these inputs.
    let mut sum = x;
    let mut term = x;
    for n in 1..60 {
        term *= -x * x / n as f64;
        sum += term / (2 * n + 1) as f64;
    }
    2.0 / std::f64::consts::PI.sqrt() * sum
}

#[test]
fn first_and_pool_selection() {
    let q = queries(2, 6, 3);
    let first = AlignerSettings { num_queries: 2, query_selection: QuerySelection::First, final_gelu: false };
    let a = Aligner::<Flex>::new(3, 4, 5, &first, &mut seeded::SplitMix64::new(0), &FlexDevice);
    let sel = HostTensor::from_tensor(a.select(q.clone()).unwrap());
    let all = HostTensor::from_tensor(q.clone());
    assert_eq!(sel.shape, vec![2, 2, 3]);
    assert_eq!(sel.as_f32("").unwrap()[..6], all.as_f32("").unwrap()[..6]);

    let pool = AlignerSettings { num_queries: 4, query_selection: QuerySelection::Pool, final_gelu: false };
    let a = Aligner::<Flex>::new(3, 4, 5, &pool, &mut seeded::SplitMix64::new(0), &FlexDevice);
    let sel = HostTensor::from_tensor(a.select(q).unwrap());
    assert_eq!(sel.shape, vec![2, 4, 3]);
    // adaptive_avg_pool1d(6 → 4): windows [0,2) [1,3) [3,5) [4,6) (torch's start/end rule).
    let v = all.as_f32("").unwrap();
    for (o, (s, e)) in [(0usize, 2usize), (1, 3), (3, 5), (4, 6)].into_iter().enumerate() {
        for c in 0..3 {
            let want: f32 = (s..e).map(|i| v[i * 3 + c]).sum::<f32>() / (e - s) as f32;
            assert!((sel.as_f32("").unwrap()[o * 3 + c] - want).abs() < 1e-6);
        }
    }
}

#[test]
fn context_assembly_and_unconditional_tokens() {
    let a = Aligner::<Flex>::new(
        3,
        4,
        5,
        &AlignerSettings { num_queries: 3, ..Default::default() },
        &mut seeded::SplitMix64::new(0),
        &FlexDevice,
    );
    let text = Tensor::<Flex, 3>::ones([2, 77, 5], &FlexDevice);
    let ctx = assemble(text.clone(), a.forward(queries(2, 6, 3)).unwrap());
    assert_eq!(ctx.dims(), [2, 80, 5]);
    let u = a.unconditional(2, 6, &FlexDevice).unwrap();
    assert_eq!(u.dims(), [2, 3, 5]);
    // Zero queries give gelu(fc2(gelu(b1)) + b2): the same for every token and batch item.
    let h = HostTensor::from_tensor(u);
    let v = h.as_f32("").unwrap();
    assert!(v.chunks(5).all(|c| c == &v[..5]));
    // k = 0: the context is the text alone.
    let a0 = Aligner::<Flex>::new(
        3,
        4,
        5,
        &AlignerSettings { num_queries: 0, ..Default::default() },
        &mut seeded::SplitMix64::new(0),
        &FlexDevice,
    );
    let ctx0 = assemble(text.clone(), a0.forward(queries(2, 6, 3)).unwrap());
    assert_eq!(HostTensor::from_tensor(ctx0), HostTensor::from_tensor(text));
}

#[test]
fn file_round_trip_in_torch_layout_with_metadata() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("aligner.safetensors");
    let s = AlignerSettings { num_queries: 4, query_selection: QuerySelection::Pool, final_gelu: false };
    let a = Aligner::<Flex>::new(6, 7, 5, &s, &mut seeded::SplitMix64::new(0), &FlexDevice);
    a.save(&p).unwrap();
    let (t, meta) = model_io::tensor_file::read_tensors_with_metadata(&p).unwrap();
    assert_eq!(t["fc1.weight"].shape, vec![7, 6]);
    assert_eq!(t["fc2.weight"].shape, vec![5, 7]);
    assert_eq!(meta["num_queries"], "4");
    assert_eq!(meta["query_selection"], "pool");
    assert_eq!(meta["final_activation"], "none");
    let b = Aligner::<Flex>::load(&p, &FlexDevice).unwrap();
    assert_eq!(b.settings(), s);
    let q = queries(1, 8, 6);
    let (x, y) =
        (HostTensor::from_tensor(a.forward(q.clone()).unwrap()), HostTensor::from_tensor(b.forward(q).unwrap()));
    assert_eq!(x.max_abs_diff(&y), 0.0);
}

#[test]
fn bad_files_and_inputs_are_named() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("aligner.safetensors");
    let a = Aligner::<Flex>::new(6, 7, 5, &AlignerSettings::default(), &mut seeded::SplitMix64::new(0), &FlexDevice);
    let (mut t, mut meta) = a.to_tensors();
    t.remove("fc2.bias");
    model_io::tensor_file::write_tensors(&p, &t, &meta).unwrap();
    let msg = Aligner::<Flex>::load(&p, &FlexDevice).err().unwrap().to_string();
    assert!(msg.contains("fc2.bias") && msg.contains("aligner.safetensors"), "{msg}");
    let (t, _) = a.to_tensors();
    meta.insert("query_selection".into(), "random".into());
    model_io::tensor_file::write_tensors(&p, &t, &meta).unwrap();
    let msg = Aligner::<Flex>::load(&p, &FlexDevice).err().unwrap().to_string();
    assert!(msg.contains("query_selection") && msg.contains("random"), "{msg}");
    // Too few queries for `first`, and the wrong width.
    assert!(a.forward(queries(1, 4, 6)).err().unwrap().to_string().contains("first 8"));
    assert!(a.forward(queries(1, 8, 5)).err().unwrap().to_string().contains("width 5"));
}

/// Pooling Q queries into more than Q was accepted (adaptive pooling repeats them); refused.
#[test]
fn pooling_into_more_queries_than_given_is_refused() {
    let s = AlignerSettings { num_queries: 33, query_selection: QuerySelection::Pool, final_gelu: true };
    let a = Aligner::<Flex>::new(3, 4, 5, &s, &mut seeded::SplitMix64::new(0), &FlexDevice);
    let msg = a.forward(queries(1, 32, 3)).err().unwrap().to_string();
    assert!(msg.contains("32") && msg.contains("33") && msg.contains("fewer"), "{msg}");
}
