//! A control-API connection's bytes: parsed and routed as the API thread does it.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = peapod_vmm::api::requests_in(data);
});
