//! See `checks/ws_frame.rs` for what this target asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| anyproxy_fuzz::ws_frame::check(input));
