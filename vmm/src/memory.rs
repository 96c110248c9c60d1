//! Guest RAM: one memfd (so it shows up named in /proc/<pid>/smaps and can later be
//! shared), mapped as one region below the MMIO gap and, for large guests, one above.

use std::fs::File;
use std::os::fd::FromRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// The name guest RAM has in /proc/<pid>/maps: `/memfd:peapod-guest-ram (deleted)`.
pub const GUEST_RAM_NAME: &std::ffi::CStr = c"peapod-guest-ram";

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory: cannot create the backing memfd: {0}")]
    Memfd(std::io::Error),
    #[error("guest memory: cannot size the backing memfd to {size} bytes: {source}")]
    Size { size: u64, source: std::io::Error },
    #[error("guest memory: cannot map {size} bytes: {source} (is the host short of memory, or is RLIMIT_AS too low?)")]
    Map {
        size: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("guest memory: KVM refused memory slot {slot}: {source}")]
    KvmSlot {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

/// Guest-physical ranges for `size` bytes of RAM, skipping the MMIO gap below 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START),
        ]
    }
}

pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd
    // or -1, and we take ownership of the fd only when it is valid.
    let fd = unsafe { libc::memfd_create(GUEST_RAM_NAME.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a freshly created, valid file descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| MemoryError::Size { size, source })?;

    let mut offset = 0;
    let mut regions = Vec::new();
    for (addr, len) in ram_ranges(size) {
        let file = file.try_clone().map_err(MemoryError::Memfd)?;
        regions.push((addr, len as usize, Some(FileOffset::new(file, offset))));
        offset += len;
    }
    GuestMemoryMmap::from_ranges_with_files(regions)
        .map_err(|source| MemoryError::Map { size, source })
}

/// Tells KVM where each guest RAM region lives in this process.
pub fn register_guest_memory(vm: &VmFd, memory: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in memory.iter().enumerate() {
        let slot = slot as u32;
        let mem_region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping of exactly `memory_size` bytes owned by
        // `memory`, which the VMM keeps alive for as long as the VM exists.
        unsafe { vm.set_user_memory_region(mem_region) }
            .map_err(|source| MemoryError::KvmSlot { slot, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn small_guests_are_one_range_large_ones_skip_the_mmio_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
        let big = 4u64 << 30;
        assert_eq!(
            ram_ranges(big),
            vec![
                (GuestAddress(0), MMIO_GAP_START),
                (GuestAddress(MMIO_GAP_END), big - MMIO_GAP_START)
            ]
        );
    }

    #[test]
    fn guest_memory_is_a_named_memfd_and_bounds_checked() {
        let mem = create_guest_memory(4 << 20).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert!(mem.write_obj(0u32, GuestAddress(4 << 20)).is_err());
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(maps.contains("/memfd:peapod-guest-ram"));
    }
}
