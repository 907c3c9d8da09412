//! The ONNX reader's unit tests: graphs built in memory.

use super::proto::*;
use super::*;

fn raw_f32(name: &str, dims: &[i64], v: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: 1,
        raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>().into(),
        ..Default::default()
    }
}

fn node(name: &str, op: &str, inputs: &[&str]) -> NodeProto {
    NodeProto {
        name: name.into(),
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![format!("{name}_out")],
        ..Default::default()
    }
}

fn write(dir: &Path, nodes: Vec<NodeProto>, inits: Vec<TensorProto>) -> PathBuf {
    let m = ModelProto {
        ir_version: 8,
        graph: Some(GraphProto { node: nodes, initializer: inits, ..Default::default() }),
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 17 }],
        ..Default::default()
    };
    let p = dir.join("model.onnx");
    std::fs::write(&p, m.encode_to_vec()).unwrap();
    p
}

fn err(r: Result<Checkpoint>) -> String {
    r.err().expect("an error").to_string()
}

#[test]
fn weights_are_named_by_their_consumers_and_read_as_published() {
    let d = tempfile::tempdir().unwrap();
    let ones =
        TensorProto { name: "s".into(), dims: vec![2], data_type: 1, float_data: vec![1.0; 2], ..Default::default() };
    let zeros =
        TensorProto { name: "z".into(), dims: vec![2], data_type: 1, float_data: vec![0.0; 2], ..Default::default() };
    // FLOAT16 bit patterns in int32_data (1.0, 2.0, -0.5), BFLOAT16 as raw bytes, INT64 typed.
    let f16 = TensorProto {
        name: "blk.conv.weight".into(),
        dims: vec![3, 1, 1, 1],
        data_type: 10,
        int32_data: [1.0f32, 2.0, -0.5].iter().map(|v| i32::from(half::f16::from_f32(*v).to_bits())).collect(),
        ..Default::default()
    };
    let bf16 = TensorProto {
        name: "blk.conv.bias".into(),
        dims: vec![3],
        data_type: 16,
        raw_data: [0.25f32, 4.0, 8.0]
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect::<Vec<u8>>()
            .into(),
        ..Default::default()
    };
    let ids = TensorProto {
        name: "blk.ids".into(),
        dims: vec![3],
        data_type: 7,
        int64_data: vec![5, 6, 7],
        ..Default::default()
    };
    let mut dynamo = node("node_linear_3", "MatMul", &["x", "val_9"]);
    dynamo.metadata_props = vec![StringStringEntryProto {
        key: "pkg.torch.onnx.name_scopes".into(),
        value: "['', 'blk', 'blk.to_k', 'linear_3']".into(),
    }];
    let p = write(
        d.path(),
        vec![
            node("/blk/to_q/MatMul", "MatMul", &["x", "onnx::MatMul_1"]),
            node("/blk/norm/InstanceNormalization", "InstanceNormalization", &["x", "s", "z"]),
            node("/blk/norm/Mul", "Mul", &["y", "onnx::Mul_2"]),
            // One constant shared by two GroupNorms.
            node("/blk/norm2/InstanceNormalization", "InstanceNormalization", &["x", "s", "z"]),
            NodeProto {
                op_type: "Identity".into(),
                input: vec!["onnx::Mul_2".into()],
                output: vec!["onnx::Mul_6".into()],
                ..Default::default()
            },
            node("/blk/norm2/Mul", "Mul", &["y", "onnx::Mul_6"]),
            node("/blk/norm/Add", "Add", &["y", "onnx::Add_3"]),
            node("/blk/conv/Conv", "Conv", &["x", "blk.conv.weight", "blk.conv.bias"]),
            node("/time_proj/Mul", "Mul", &["t", "onnx::Mul_4"]),
            node("/blk/Reshape", "Reshape", &["x", "onnx::Reshape_5"]),
            dynamo,
        ],
        vec![
            raw_f32("onnx::MatMul_1", &[2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]),
            ones,
            zeros,
            raw_f32("onnx::Mul_2", &[4, 1, 1], &[1.0, 2.0, 3.0, 4.0]),
            raw_f32("onnx::Add_3", &[4, 1, 1], &[5.0, 6.0, 7.0, 8.0]),
            f16,
            bf16,
            ids,
            // The sinusoid's exponents: constants of a module without weights.
            raw_f32("onnx::Mul_4", &[16], &[0.5; 16]),
            TensorProto {
                name: "onnx::Reshape_5".into(),
                dims: vec![3],
                data_type: 7,
                int64_data: vec![1, -1, 4],
                ..Default::default()
            },
            raw_f32("val_9", &[2, 2], &[1.0, 2.0, 3.0, 4.0]),
        ],
    );
    let c = Checkpoint::open_onnx(&p).unwrap();
    let mut names: Vec<&str> = c.names().collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "blk.conv.bias",
            "blk.conv.weight",
            "blk.ids",
            "blk.norm.bias",
            "blk.norm.weight",
            "blk.norm2.weight",
            "blk.to_k.weight",
            "blk.to_q.weight"
        ]
    );
    // Stored [in, out] = [2, 3]: read as the Linear's [out, in] = [3, 2].
    assert_eq!(c.read_f32("blk.to_q.weight").unwrap(), (vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0], vec![3, 2]));
    assert_eq!(c.read_f32("blk.to_k.weight").unwrap(), (vec![1.0, 3.0, 2.0, 4.0], vec![2, 2]));
    assert_eq!(c.read_f32("blk.norm.weight").unwrap(), (vec![1.0, 2.0, 3.0, 4.0], vec![4]));
    assert_eq!(c.read_f32("blk.norm.bias").unwrap(), (vec![5.0, 6.0, 7.0, 8.0], vec![4]));
    assert_eq!(c.read_f32("blk.norm2.weight").unwrap(), (vec![1.0, 2.0, 3.0, 4.0], vec![4]));
    assert_eq!(c.read_f32("blk.conv.weight").unwrap(), (vec![1.0, 2.0, -0.5], vec![3, 1, 1, 1]));
    assert_eq!(c.info("blk.conv.weight").unwrap().dtype, "F16");
    assert_eq!(c.read_f32("blk.conv.bias").unwrap(), (vec![0.25, 4.0, 8.0], vec![3]));
    assert_eq!(c.read_i64("blk.ids").unwrap(), (vec![5, 6, 7], vec![3]));
    assert_eq!(c.origin("blk.to_q.weight"), Some("node `/blk/to_q/MatMul` (MatMul)"));
    // The borrowed f32 path agrees with the copied one for a transposed tensor.
    let data = c.tensor_data_f32("blk.to_q.weight").unwrap();
    assert_eq!(data.to_vec::<f32>().unwrap(), vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    // A transposed tensor is not split or reshaped as a view.
    let e = c.derive("v", [("a".into(), "blk.to_q.weight".into(), crate::Derive::Rows(0..1))]).err().unwrap();
    assert!(e.to_string().contains("stored transposed"), "{e}");
}

#[test]
fn external_data_is_read_from_the_models_folder_only() {
    let d = tempfile::tempdir().unwrap();
    let values: Vec<u8> = [9.0f32, 8.0, 7.0, 6.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut w = vec![0u8; 16];
    w.extend(&values);
    std::fs::write(d.path().join("weights.pb"), &w).unwrap();
    let ext = |location: &str, offset: usize, length: usize| TensorProto {
        name: "blk.conv.weight".into(),
        dims: vec![4, 1, 1, 1],
        data_type: 1,
        data_location: 1,
        external_data: [
            ("location", location.to_string()),
            ("offset", offset.to_string()),
            ("length", length.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| StringStringEntryProto { key: k.into(), value: v })
        .collect(),
        ..Default::default()
    };
    let conv = || vec![node("/blk/conv/Conv", "Conv", &["x", "blk.conv.weight"])];
    let p = write(d.path(), conv(), vec![ext("weights.pb", 16, 16)]);
    let c = Checkpoint::open_onnx(&p).unwrap();
    assert_eq!(c.read_f32("blk.conv.weight").unwrap().0, vec![9.0, 8.0, 7.0, 6.0]);
    assert!(c.file_of("blk.conv.weight").unwrap().ends_with("weights.pb"));
    for bad in ["../weights.pb", "/etc/passwd", "a/../../weights.pb"] {
        let p = write(d.path(), conv(), vec![ext(bad, 0, 16)]);
        let e = err(Checkpoint::open_onnx(&p));
        assert!(e.contains("outside the model's folder") && e.contains(bad), "{e}");
    }
    let p = write(d.path(), conv(), vec![ext("gone.bin", 0, 16)]);
    let e = err(Checkpoint::open_onnx(&p));
    assert!(e.contains("gone.bin") && e.contains("missing") && e.contains("blk.conv.weight"), "{e}");
    // A truncated external file.
    let p = write(d.path(), conv(), vec![ext("weights.pb", 24, 16)]);
    let e = err(Checkpoint::open_onnx(&p));
    assert!(e.contains("weights.pb") && e.contains("truncated"), "{e}");
    // A length that does not match the shape.
    let p = write(d.path(), conv(), vec![ext("weights.pb", 0, 12)]);
    let e = err(Checkpoint::open_onnx(&p));
    assert!(e.contains("needs 16 bytes"), "{e}");
}

#[test]
fn bad_graphs_are_one_line_errors() {
    let d = tempfile::tempdir().unwrap();
    // Truncated.
    let p = write(d.path(), vec![node("/a/MatMul", "MatMul", &["x", "w"])], vec![raw_f32("w", &[4, 4], &[0.5; 16])]);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 9]).unwrap();
    let e = err(Checkpoint::open_onnx(&p));
    assert!(e.contains("model.onnx") && e.contains("cannot be decoded"), "{e}");
    assert!(!e.contains('\n'));
    // Not ONNX at all.
    std::fs::write(&p, b"{\"not\": \"onnx\"}").unwrap();
    assert!(err(Checkpoint::open_onnx(&p)).contains("model.onnx"));
    // ORT's fused ops.
    let mut fused = node("Attention_0", "Attention", &["x", "w"]);
    fused.domain = "com.microsoft".into();
    let p = write(d.path(), vec![fused], vec![raw_f32("w", &[4, 4], &[0.5; 16])]);
    let e = err(Checkpoint::open_onnx(&p));
    assert!(e.contains("`Attention`") && e.contains("com.microsoft") && e.contains("without optimisation"), "{e}");
    // A weight-sized constant in a module with weights that maps to nothing.
    let p = write(
        d.path(),
        vec![
            node("/blk/to_q/MatMul", "MatMul", &["x", "onnx::MatMul_1"]),
            node("/blk/to_q/Sin", "Sin", &["onnx::Sin_2"]),
        ],
        vec![raw_f32("onnx::MatMul_1", &[4, 4], &[0.5; 16]), raw_f32("onnx::Sin_2", &[16], &[0.5; 16])],
    );
    let e = err(Checkpoint::open_onnx(&p));
    assert!(e.contains("`onnx::Sin_2`") && e.contains("`/blk/to_q/Sin` (Sin)"), "{e}");
    // Two initializers of one name.
    let p = write(d.path(), vec![], vec![raw_f32("a.w", &[2], &[1.0, 2.0]), raw_f32("a.w", &[2], &[3.0, 4.0])]);
    assert!(err(Checkpoint::open_onnx(&p)).contains("two initializers or constants named `a.w`"));
    // A Gemm that scales its weight.
    let mut gemm = node("/fc/Gemm", "Gemm", &["x", "onnx::Gemm_1"]);
    gemm.attribute = vec![AttributeProto { name: "alpha".into(), f: 0.5, ..Default::default() }];
    let p = write(d.path(), vec![gemm], vec![raw_f32("onnx::Gemm_1", &[4, 4], &[0.5; 16])]);
    let e = err(Checkpoint::open_onnx(&p));
    assert!(e.contains("`/fc/Gemm` (Gemm) has alpha 0.5"), "{e}");
    // A weight-sized constant read by a node with no module path.
    let p =
        write(d.path(), vec![node("Sin_7", "Sin", &["onnx::Sin_2"])], vec![raw_f32("onnx::Sin_2", &[16], &[0.5; 16])]);
    let e = err(Checkpoint::open_onnx(&p));
    assert!(e.contains("`onnx::Sin_2`") && e.contains("`Sin_7` (Sin)"), "{e}");
    // A dimension no file can hold, even next to a zero.
    let huge = TensorProto { name: "h".into(), dims: vec![0, 1 << 62], data_type: 1, ..Default::default() };
    let p = write(d.path(), vec![], vec![huge]);
    assert!(err(Checkpoint::open_onnx(&p)).contains("has dimension"));
    // A raw payload shorter than its shape.
    let mut short = raw_f32("blk.w", &[4, 4], &[0.5; 16]);
    short.raw_data.truncate(60);
    let p = write(d.path(), vec![], vec![short]);
    assert!(err(Checkpoint::open_onnx(&p)).contains("needs 64 bytes but holds 60"));
    // An empty graph.
    let p = write(d.path(), vec![], vec![]);
    assert!(err(Checkpoint::open_onnx(&p)).contains("no nodes"));
}

#[test]
fn an_onnx_folder_opens_as_a_model_folder() {
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        vec![node("/c/Conv", "Conv", &["x", "c.weight"])],
        vec![raw_f32("c.weight", &[1, 1, 1, 1], &[2.0])],
    );
    let c = Checkpoint::open_dir(d.path(), &["diffusion_pytorch_model"]).unwrap();
    assert_eq!(c.read_f32("c.weight").unwrap().0, vec![2.0]);
    let e = Checkpoint::open_dir(tempfile::tempdir().unwrap().path(), &["model"]).err().unwrap().to_string();
    assert!(e.contains("model.onnx"), "{e}");
}
