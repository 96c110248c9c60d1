//! Device models for the Peapod VMM.
//!
//! `legacy` holds the two port-I/O devices a Linux guest needs to have a console and
//! to reset itself (8250 UART and i8042); `bus` is how the vCPU threads dispatch port
//! I/O and MMIO. Virtio devices come next and live beside them, one folder each.

pub mod bus;
pub mod legacy;

pub use bus::{Bus, BusDevice, BusError};
