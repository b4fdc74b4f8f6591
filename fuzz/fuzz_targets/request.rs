#![no_main]
// cargo +nightly fuzz run request (from the repository root)
libfuzzer_sys::fuzz_target!(|data: &[u8]| mlxd::api::fuzz_request(data));
