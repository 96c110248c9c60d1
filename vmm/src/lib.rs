//! peapod-vmm: the KVM monitor that runs one Peapod pod's microVM.
//!
//! It knows nothing of pods or containers: it boots a kernel and initramfs with the
//! devices it is given, and takes orders over a unix-socket API. See `vm::run`.

pub mod api;
pub mod boot;
pub mod config;
pub mod cpu;
pub mod devices;
pub mod exit;
pub mod layout;
pub mod logger;
pub mod memory;
pub mod mptable;
pub mod platform;
pub mod seccomp;
pub mod snapshot;
pub mod vcpu;
pub mod vm;

pub use config::VmConfig;
pub use exit::ExitReason;
pub use vm::{run, VmError};
