//! Checkpoint reading: dtypes, shards, variants, strict checks and the errors for bad files.

use std::collections::BTreeMap;
use std::path::Path;

use burn_flex::{Flex, FlexDevice};
use model_io::tensor_file::{read_tensors, write_tensors, HostTensor};
use model_io::{Checkpoint, Error, Weights};

/// Writes a safetensors file with tensors of any dtype from raw little-endian bytes.
fn write_raw(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut off = 0;
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [off, off + bytes.len()]}),
        );
        off += bytes.len();
    }
    let h = serde_json::to_vec(&header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    for t in tensors {
        out.extend(&t.3);
    }
    std::fs::write(path, out).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn reads_f32_f16_bf16_as_f32() {
    let dir = tempfile::tempdir().unwrap();
    let vals = [0.5f32, -1.25, 3.0, 1e-3];
    let f16: Vec<u8> = vals.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect();
    let bf16: Vec<u8> = vals.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect();
    write_raw(
        &dir.path().join("model.safetensors"),
        &[("a", "F32", vec![2, 2], f32_bytes(&vals)), ("b", "F16", vec![4], f16), ("c", "BF16", vec![4], bf16)],
    );
    let ckpt = Checkpoint::open_dir(dir.path(), &["model"]).unwrap();
    assert_eq!(ckpt.read_f32("a").unwrap(), (vals.to_vec(), vec![2, 2]));
    let (b, _) = ckpt.read_f32("b").unwrap();
    for (x, y) in b.iter().zip(vals) {
        assert_eq!(*x, half::f16::from_f32(y).to_f32());
    }
    let (c, _) = ckpt.read_f32("c").unwrap();
    for (x, y) in c.iter().zip(vals) {
        assert_eq!(*x, half::bf16::from_f32(y).to_f32());
    }
    // A read releases the tensor's mapped pages; reading it again faults the same bytes back.
    assert_eq!(ckpt.read_f32("a").unwrap(), (vals.to_vec(), vec![2, 2]));
    assert_eq!(ckpt.read_f32("c").unwrap().0, c);
}

/// A large tensor spanning many pages, at an offset that is not page-aligned, reads back
/// exactly twice in a row (the first read releases its pages).
#[test]
fn large_tensor_reads_back_after_its_pages_are_released() {
    let dir = tempfile::tempdir().unwrap();
    let big: Vec<f32> = (0..300_001).map(|i| i as f32 * 0.5 - 7.0).collect();
    write_raw(
        &dir.path().join("model.safetensors"),
        &[("small", "F32", vec![3], f32_bytes(&[1.0, 2.0, 3.0])), ("big", "F32", vec![300_001], f32_bytes(&big))],
    );
    let ckpt = Checkpoint::open_dir(dir.path(), &["model"]).unwrap();
    for _ in 0..2 {
        assert_eq!(ckpt.read_f32("big").unwrap().0, big);
        assert_eq!(ckpt.read_f32("small").unwrap().0, vec![1.0, 2.0, 3.0]);
    }
}

#[test]
fn prefers_full_precision_then_fp16_variant() {
    let dir = tempfile::tempdir().unwrap();
    write_raw(&dir.path().join("diffusion_pytorch_model.fp16.safetensors"), &[("x", "F16", vec![1], vec![0, 0x3c])]);
    let ckpt = Checkpoint::open_dir(dir.path(), &["diffusion_pytorch_model"]).unwrap();
    assert_eq!(ckpt.read_f32("x").unwrap().0, vec![1.0]);
    write_raw(&dir.path().join("diffusion_pytorch_model.safetensors"), &[("x", "F32", vec![1], f32_bytes(&[2.0]))]);
    let ckpt = Checkpoint::open_dir(dir.path(), &["diffusion_pytorch_model"]).unwrap();
    assert_eq!(ckpt.read_f32("x").unwrap().0, vec![2.0]);
}

fn write_sharded(dir: &Path) {
    write_raw(&dir.join("model-00001-of-00002.safetensors"), &[("a", "F32", vec![1], f32_bytes(&[1.0]))]);
    write_raw(&dir.join("model-00002-of-00002.safetensors"), &[("b", "F32", vec![1], f32_bytes(&[2.0]))]);
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
}

#[test]
fn sharded_checkpoint_loads_and_missing_shard_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write_sharded(dir.path());
    let ckpt = Checkpoint::open_dir(dir.path(), &["model"]).unwrap();
    assert_eq!(ckpt.len(), 2);
    assert_eq!(ckpt.read_f32("b").unwrap().0, vec![2.0]);
    // A partial download (only the shards a model needs) opens; reading from the absent shard
    // names it.
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let ckpt = Checkpoint::open_dir(dir.path(), &["model"]).unwrap();
    assert_eq!(ckpt.read_f32("a").unwrap().0, vec![1.0]);
    let err = ckpt.read_f32("b").unwrap_err();
    assert!(matches!(err, Error::MissingShard { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("model-00002-of-00002.safetensors") && msg.contains("missing"), "{msg}");
    let w = model_io::Weights::<burn_flex::Flex>::new(&ckpt, &burn_flex::FlexDevice);
    assert!(matches!(w.get::<1>("b", [1]).unwrap_err(), Error::MissingShard { .. }));
    w.get::<1>("a", [1]).unwrap();
    w.finish(&[]).unwrap();
    // With no shard at all, opening fails.
    std::fs::remove_file(dir.path().join("model-00001-of-00002.safetensors")).unwrap();
    let err = Checkpoint::open_dir(dir.path(), &["model"]).err().unwrap();
    assert!(matches!(err, Error::MissingShard { .. }), "{err}");
}

#[test]
fn truncated_file_is_rejected_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.safetensors");
    write_raw(&p, &[("a", "F32", vec![64], f32_bytes(&[1.0; 64]))]);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
    let msg = Checkpoint::open_dir(dir.path(), &["model"]).err().unwrap().to_string();
    assert!(msg.contains("model.safetensors") && msg.contains("truncated"), "{msg}");
    assert!(!msg.contains('\n'));
    // Garbage instead of a header.
    std::fs::write(&p, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header").unwrap();
    let msg = Checkpoint::open_dir(dir.path(), &["model"]).err().unwrap().to_string();
    assert!(msg.contains("model.safetensors") && msg.contains("header"), "{msg}");
    std::fs::write(&p, b"").unwrap();
    assert!(Checkpoint::open_dir(dir.path(), &["model"]).is_err());
}

/// F32 weights borrow the memory map instead of being copied; writing to such a tensor (here
/// an in-place add on a tensor nobody else holds) copies it first: the file and the other
/// tensors that share the map keep their values, and the model outlives the `Checkpoint`.
#[test]
fn mapped_weights_are_copied_on_write_and_outlive_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.safetensors");
    write_raw(
        &p,
        &[("a", "F32", vec![4], f32_bytes(&[1.0, 2.0, 3.0, 4.0])), ("b", "F32", vec![2], f32_bytes(&[5.0, 6.0]))],
    );
    let before = std::fs::read(&p).unwrap();
    let (a, b) = {
        let ckpt = Checkpoint::open_dir(dir.path(), &["model"]).unwrap();
        let w = model_io::Weights::<Flex>::new(&ckpt, &FlexDevice);
        (w.get::<1>("a", [4]).unwrap(), w.get::<1>("b", [2]).unwrap())
    };
    let a2 = a + 10.0;
    assert_eq!(a2.into_data().to_vec::<f32>().unwrap(), vec![11.0, 12.0, 13.0, 14.0]);
    assert_eq!(b.into_data().to_vec::<f32>().unwrap(), vec![5.0, 6.0]);
    assert_eq!(std::fs::read(&p).unwrap(), before);
    let ckpt = Checkpoint::open_dir(dir.path(), &["model"]).unwrap();
    assert_eq!(ckpt.read_f32("a").unwrap().0, vec![1.0, 2.0, 3.0, 4.0]);
}

#[test]
fn no_weights_names_what_was_looked_for() {
    let dir = tempfile::tempdir().unwrap();
    let msg = Checkpoint::open_dir(dir.path(), &["model"]).err().unwrap().to_string();
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn weights_check_shapes_missing_and_unused_keys() {
    let dir = tempfile::tempdir().unwrap();
    write_raw(
        &dir.path().join("model.safetensors"),
        &[
            ("enc.w", "F32", vec![2, 3], f32_bytes(&[0.0; 6])),
            ("enc.b", "F32", vec![2], f32_bytes(&[0.0; 2])),
            ("lm.head", "F32", vec![1], f32_bytes(&[0.0])),
            ("ids", "I64", vec![1], 7i64.to_le_bytes().to_vec()),
        ],
    );
    let ckpt = Checkpoint::open_dir(dir.path(), &["model"]).unwrap();
    let w = Weights::<Flex>::new(&ckpt, &FlexDevice);
    let e = w.pp("enc");
    let err = e.get::<2>("w", [3, 2]).err().unwrap().to_string();
    assert!(err.contains("enc.w") && err.contains("[2, 3]") && err.contains("[3, 2]"), "{err}");
    let err = e.get::<1>("nope", [2]).err().unwrap().to_string();
    assert!(err.contains("missing tensor `enc.nope`"), "{err}");
    let err = w.get::<1>("ids", [1]).err().unwrap().to_string();
    assert!(err.contains("`ids`") && err.contains("I64"), "{err}");
    e.get::<2>("w", [2, 3]).unwrap();
    let err = w.finish(&["lm."]).err().unwrap().to_string();
    assert!(err.contains("enc.b"), "{err}");
    e.get::<1>("b", [2]).unwrap();
    w.finish(&["lm.", "ids"]).unwrap();
}

#[test]
fn tensor_files_round_trip_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("out.safetensors");
    let t = BTreeMap::from([
        ("x".to_string(), HostTensor::f32(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0])),
        ("ids".to_string(), HostTensor::i64(vec![3], vec![1, -2, 49407])),
    ]);
    let meta = BTreeMap::from([("k".to_string(), "8".to_string())]);
    write_tensors(&p, &t, &meta).unwrap();
    assert_eq!(read_tensors(&p).unwrap(), t);
    let (_, m) = model_io::tensor_file::read_tensors_with_metadata(&p).unwrap();
    assert_eq!(m, meta);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "temporary files left: {leftovers:?}");
    // A write into a folder that does not exist fails and names the target.
    let err = write_tensors(&dir.path().join("no/such/out.safetensors"), &t, &meta).err().unwrap().to_string();
    assert!(err.contains("out.safetensors"), "{err}");
}

/// A safetensors file from its header entries (name -> [start, end]) and data bytes.
fn write_with_offsets(path: &Path, entries: &[(&str, [usize; 2])], data_len: usize) {
    let mut header = serde_json::Map::new();
    for (name, [a, b]) in entries {
        header.insert(name.to_string(), serde_json::json!({"dtype": "U8", "shape": [b - a], "data_offsets": [a, b]}));
    }
    let h = serde_json::to_vec(&header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(vec![7u8; data_len]);
    std::fs::write(path, out).unwrap();
}

/// Python's safetensors refuses overlapping, gapped and trailing data; so do we.
#[test]
fn tensor_byte_ranges_must_tile_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    let err = |entries: &[(&str, [usize; 2])], len: usize| {
        write_with_offsets(&p, entries, len);
        Checkpoint::open_files("m", std::slice::from_ref(&p)).err().map(|e| e.to_string())
    };
    assert_eq!(err(&[("a", [0, 4]), ("b", [4, 6]), ("z", [6, 6])], 6), None);
    let overlap = err(&[("a", [0, 4]), ("b", [2, 6])], 6).unwrap();
    assert!(overlap.contains("m.safetensors") && overlap.contains("`b`") && overlap.contains("overlaps"), "{overlap}");
    let gap = err(&[("a", [0, 2]), ("b", [4, 6])], 6).unwrap();
    assert!(gap.contains("`b`") && gap.contains("gap"), "{gap}");
    let trailing = err(&[("a", [0, 4])], 6).unwrap();
    assert!(trailing.contains("end at byte 4") && trailing.contains("6 bytes"), "{trailing}");
}

/// A shard index may only name files of its own folder.
#[test]
fn shard_index_outside_the_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("x.safetensors");
    write_raw(&outside, &[("w", "F32", vec![1], f32_bytes(&[1.0]))]);
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for shard in ["../x.safetensors".to_string(), outside.display().to_string()] {
        let index = model.join("model.safetensors.index.json");
        std::fs::write(&index, serde_json::json!({"weight_map": {"w": shard}}).to_string()).unwrap();
        let msg = Checkpoint::open_index(&index).err().expect("refused").to_string();
        assert!(
            msg.contains("index.json") && msg.contains("outside the model folder") && msg.contains(&shard),
            "{msg}"
        );
    }
}

/// The OS error is part of the message, not also its source: printed as a chain (the CLI's
/// `{:#}`) it appears once.
#[test]
fn io_errors_carry_their_cause_once() {
    use std::error::Error as _;
    let e = model_io::read_config::<serde_json::Value>(Path::new("/no/such/folder"), "config.json").err().unwrap();
    assert!(e.to_string().contains("config.json") && e.to_string().contains("No such file"), "{e}");
    assert!(e.source().is_none());
}

/// A folder, or a device such as /dev/zero, in place of a weight file is named as such.
#[test]
fn folder_or_device_in_place_of_weights_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("model.safetensors")).unwrap();
    let msg = Checkpoint::open_dir(dir.path(), &["model"]).err().unwrap().to_string();
    assert!(msg.contains("model.safetensors") && msg.contains("is a folder"), "{msg}");
    if Path::new("/dev/zero").exists() {
        let msg = Checkpoint::open_files("zero", &[Path::new("/dev/zero").to_path_buf()]).err().unwrap().to_string();
        assert!(msg.contains("/dev/zero") && msg.contains("not a regular file"), "{msg}");
    }
}

/// The base-model fingerprint is of the tensors (names, shapes, values as read), not of the
/// files: the same weights sharded, or stored as F64 or F16 holding the same values, match;
/// one changed value or shape does not.
#[test]
fn the_fingerprint_is_of_the_tensors_not_the_files() {
    let d = tempfile::tempdir().unwrap();
    let a: Vec<f32> = (0..40).map(|i| i as f32 * 0.25 - 3.0).collect();
    let b = [0.5f32, -1.5, 2.0];
    let f64b = |v: &[f32]| v.iter().flat_map(|&x| (x as f64).to_le_bytes()).collect::<Vec<u8>>();
    let f16b = |v: &[f32]| v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect::<Vec<u8>>();
    let one = d.path().join("one");
    std::fs::create_dir_all(&one).unwrap();
    write_raw(
        &one.join("m.safetensors"),
        &[("a", "F32", vec![8, 5], f32_bytes(&a)), ("b", "F32", vec![3], f32_bytes(&b))],
    );
    let fp = |dir: &Path| Checkpoint::open_dir(dir, &["m"]).unwrap().fingerprint();
    let reference = fp(&one);
    assert!(reference.starts_with("t64:"));

    let sharded = d.path().join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    write_raw(&sharded.join("m-00001-of-00002.safetensors"), &[("b", "F32", vec![3], f32_bytes(&b))]);
    write_raw(&sharded.join("m-00002-of-00002.safetensors"), &[("a", "F32", vec![8, 5], f32_bytes(&a))]);
    std::fs::write(
        sharded.join("m.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {"a": "m-00002-of-00002.safetensors", "b": "m-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    assert_eq!(fp(&sharded), reference, "sharded");

    let wide = d.path().join("f64");
    std::fs::create_dir_all(&wide).unwrap();
    write_raw(&wide.join("m.safetensors"), &[("b", "F64", vec![3], f64b(&b)), ("a", "F16", vec![8, 5], f16b(&a))]);
    assert_eq!(fp(&wide), reference, "F64 and F16 holding the same values");

    let mut a2 = a.clone();
    a2[39] += 1.0;
    write_raw(
        &one.join("m.safetensors"),
        &[("a", "F32", vec![8, 5], f32_bytes(&a2)), ("b", "F32", vec![3], f32_bytes(&b))],
    );
    assert_ne!(fp(&one), reference, "a changed value");
    write_raw(
        &one.join("m.safetensors"),
        &[("a", "F32", vec![5, 8], f32_bytes(&a)), ("b", "F32", vec![3], f32_bytes(&b))],
    );
    assert_ne!(fp(&one), reference, "another shape");
}
