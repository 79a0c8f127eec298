#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| qdirty_fuzz::targets::open_cycle(data));
