#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| qdirty_fuzz_targets::open_cycle(data));
