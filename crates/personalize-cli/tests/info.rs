//! `personalize info`: the kernels this CPU runs, as the library picks them.

mod common;

use common::*;

fn info(env: &[(&str, &str)]) -> String {
    let mut c = cmd(&["info"]);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("binary runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn value(text: &str, key: &str) -> String {
    let prefix = format!("{key}: ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no `{key}:` line in\n{text}"))
        .to_string()
}

#[test]
fn info_names_the_gemm_kernels_and_what_bf16_runs() {
    let text = info(&[]);
    assert_eq!(value(&text, "f32 gemm"), cpu_kernels::gemm_path());
    let bf16 = cpu_kernels::bf16_path();
    assert_eq!(value(&text, "bf16 gemm"), bf16.unwrap_or("none"));
    let runs = value(&text, "dtype bf16");
    match bf16 {
        Some(kernel) => assert!(runs.contains("bf16 GEMMs") && runs.contains(kernel), "{runs}"),
        None => assert!(runs.contains("Burn's bf16 ops"), "{runs}"),
    }
    assert!(value(&text, "threads").parse::<usize>().unwrap() >= 1);
    // The variable that keeps an AMX CPU on the AVX512-BF16 kernel is honoured.
    let forced = info(&[("PERSONALIZE_GEMM_BF16", "avx512bf16")]);
    let expected = if bf16.is_some() { "avx512bf16" } else { "none" };
    assert_eq!(value(&forced, "bf16 gemm"), expected);
    let off = info(&[("PERSONALIZE_GEMM_BF16", "off")]);
    assert_eq!(value(&off, "bf16 gemm"), "none");
    assert!(value(&off, "dtype bf16").contains("Burn's bf16 ops"));
}
