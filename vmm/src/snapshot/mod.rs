//! Snapshots of a running VM (issue 20): what KVM holds of it, in state files that
//! carry a version and a checksum.
//!
//! ```text
//!  pause vCPUs -> VcpuState::save (each vCPU) + VmKvmState::save (irqchip, PIT, clock)
//!    -> state_file::write (header line: format, version, length, crc32; then JSON)
//!  new VMM: state_file::read (refuses another format, version, length or checksum)
//!    -> VmKvmState::restore, VcpuState::restore (refuses another host CPU's CPUID)
//! ```

pub mod kvm_state;
pub mod state_file;

pub use kvm_state::{VcpuState, VmKvmState};
pub use state_file::StateFileError;
