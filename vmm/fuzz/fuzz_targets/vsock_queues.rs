//! The guest's bytes as guest memory: see peapod_devices::virtio::fuzzing::vsock_queues.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    peapod_devices::virtio::fuzzing::vsock_queues(data);
});
