#![no_main]
// cargo +nightly fuzz run frame_decode (from worker-protocol/)
libfuzzer_sys::fuzz_target!(|data: &[u8]| worker_protocol::fuzz::frame_decode(data));
