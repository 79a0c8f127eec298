#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| qdirty_fuzz_targets::header_and_extensions(data));
