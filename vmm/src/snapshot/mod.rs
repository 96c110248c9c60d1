//! Snapshots of a running VM (issue 20): what KVM holds of it, its devices' state
//! and its memory, in a directory a new VMM starts from.
//!
//! ```text
//!  vm.snapshot (VM paused): each vCPU thread reads its vCPU (VcpuState), the event
//!    loop reads the VM (VmKvmState) and the devices (TransportSnapshot each) and
//!    writes <dir>/memory (holes for zero pages), then <dir>/vm.state (last: a
//!    directory without it is no snapshot)
//!  peapod-vmm --restore <dir>: vm.state read (format, version, length, CRC-32),
//!    memory mapped MAP_PRIVATE, VM state set, vCPUs set (a snapshot of another CPU
//!    is refused), devices built from the configuration and given their state, the
//!    guest told its vsock transport was reset; then the vCPUs run
//! ```

pub mod kvm_state;
pub mod memory;
pub mod state_file;

use std::path::{Path, PathBuf};

use peapod_devices::virtio::persist::TransportSnapshot;
use serde::{Deserialize, Serialize};

pub use kvm_state::{KvmStateError, VcpuState, VmKvmState};
pub use memory::MemoryFileError;
pub use state_file::StateFileError;

/// The state file in a snapshot's directory.
pub const STATE_FILE: &str = "vm.state";
/// The memory file in a snapshot's directory.
pub const MEMORY_FILE: &str = "memory";

/// Everything of a VM but its memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    pub vcpu_count: u8,
    pub memory_mib: u32,
    pub vm: VmKvmState,
    pub vcpus: Vec<VcpuState>,
    /// In the order the VMM attaches devices.
    pub devices: Vec<TransportSnapshot>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    StateFile(#[from] StateFileError),
    #[error(transparent)]
    MemoryFile(#[from] MemoryFileError),
    #[error(transparent)]
    Kvm(#[from] KvmStateError),
    #[error(transparent)]
    Vcpus(#[from] crate::vcpu::VcpuError),
    #[error(transparent)]
    Devices(#[from] crate::devices::DeviceError),
    #[error(
        "snapshot {dir}: its VM has {saved}, this VMM was given {given}: restore it with \
         the snapshot's size"
    )]
    Shape {
        dir: PathBuf,
        saved: String,
        given: String,
    },
}

impl VmSnapshot {
    /// Reads the state of the snapshot in `dir`, refusing one made for another
    /// VM shape than `vcpus` and `memory_mib`.
    pub fn load(dir: &Path, vcpus: u8, memory_mib: u32) -> Result<Self, SnapshotError> {
        let snapshot: VmSnapshot = state_file::read(&dir.join(STATE_FILE))?;
        let shape = |v: u8, m: u32| format!("{v} vCPUs and {m} MiB");
        if (snapshot.vcpu_count, snapshot.memory_mib) != (vcpus, memory_mib)
            || snapshot.vcpus.len() != usize::from(vcpus)
        {
            return Err(SnapshotError::Shape {
                dir: dir.to_path_buf(),
                saved: shape(snapshot.vcpu_count, snapshot.memory_mib),
                given: shape(vcpus, memory_mib),
            });
        }
        Ok(snapshot)
    }
}
