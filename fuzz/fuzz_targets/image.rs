#![no_main]
//! `cargo +nightly fuzz run image`: see fuzz_targets::image.
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::image(data));
