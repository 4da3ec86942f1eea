//! See `checks/policy_rule.rs` for what this target asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| anyproxy_fuzz::policy_rule::check(input));
