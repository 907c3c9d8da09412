#![no_main]
//! `cargo +nightly fuzz run png_text`: see fuzz_targets::png_text.
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::png_text(data));
