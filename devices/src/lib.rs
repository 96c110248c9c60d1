//! Device models for the Peapod VMM.
//!
//! `legacy` holds the two port-I/O devices a Linux guest needs to have a console and
//! to reset itself (8250 UART and i8042); `bus` is how the vCPU threads dispatch port
//! I/O and MMIO; `virtio` holds the virtio-mmio transport and one folder per virtio
//! device.

pub mod bus;
pub mod legacy;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};

/// Locks `m` even if a thread panicked holding it: the state is still the best there
/// is, and a guest must not be able to turn one device bug into a VMM-wide panic.
pub fn lock<T: ?Sized>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
