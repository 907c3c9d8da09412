#![no_main]
//! `cargo +nightly fuzz run onnx`: see fuzz_targets::onnx.
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::onnx(data));
