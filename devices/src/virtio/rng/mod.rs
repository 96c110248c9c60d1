//! virtio-rng (entropy device, virtio 1.2 section 5.4), fed by the host's getrandom.
//! Without it the guest kernel's RNG initialises slowly and every early random read
//! costs a full hash (see PLATFORM.md).

mod device;
mod event_handler;

pub use device::Rng;
