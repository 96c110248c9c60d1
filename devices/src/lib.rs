//! Device models for the Peapod VMM.
//!
//! `legacy` holds the two port-I/O devices a Linux guest needs to have a console and
//! to reset itself (8250 UART and i8042); `pio` is the bus the vCPU threads dispatch
//! port I/O through. Virtio devices come next and live beside them, one folder each.

pub mod legacy;
pub mod pio;

pub use pio::{PioBus, PioDevice, PioError};
