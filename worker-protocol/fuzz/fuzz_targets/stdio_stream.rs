#![no_main]
// cargo +nightly fuzz run stdio_stream (from worker-protocol/)
libfuzzer_sys::fuzz_target!(|data: &[u8]| worker_protocol::fuzz::stdio_stream(data));
