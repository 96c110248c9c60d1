//! An address bus: which device answers which address. The VMM builds two, one for
//! x86 port I/O and one for MMIO; both are built before the vCPUs start and then shared
//! read-only by the vCPU threads.

use std::sync::{Arc, Mutex};

use crate::lock;

/// A device on a bus. `offset` is relative to the device's base address.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("addresses {base:#x}+{len:#x} overlap a device already on the bus")]
    Overlap { base: u64, len: u64 },
    #[error("address range {base:#x}+{len:#x} is empty or runs past the end of the bus")]
    BadRange { base: u64, len: u64 },
}

struct BusRange {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

impl BusRange {
    fn offset_of(&self, addr: u64) -> Option<u64> {
        addr.checked_sub(self.base).filter(|off| *off < self.len)
    }
}

/// Built once before the vCPUs start, then shared read-only by all vCPU threads.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<BusRange>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        let end = base.checked_add(len - len.min(1));
        if len == 0 || end.is_none() {
            return Err(BusError::BadRange { base, len });
        }
        let overlaps =
            |r: &BusRange| base < r.base.saturating_add(r.len) && r.base < base.saturating_add(len);
        if self.ranges.iter().any(overlaps) {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.push(BusRange { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&BusRange, u64)> {
        self.ranges
            .iter()
            .find_map(|r| r.offset_of(addr).map(|off| (r, off)))
    }

    /// Returns false when no device owns `addr`; the caller decides what the guest reads.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((range, offset)) => {
                lock(&range.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Returns false when no device owns `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((range, offset)) => {
                lock(&range.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_address_with_relative_offsets() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();

        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x3f8, b"x"));
        assert!(
            !bus.write(0x400, &[0]),
            "an address past the range is unowned"
        );
        assert!(
            !bus.read(0x3f7, &mut data),
            "an address before the range is unowned"
        );
        assert_eq!(dev.lock().unwrap().writes, vec![(0, vec![b'x'])]);
    }

    #[test]
    fn refuses_overlaps_and_bad_ranges() {
        let mut bus = Bus::new();
        bus.insert(0x60, 5, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        let other = Arc::new(Mutex::new(Recorder::default()));
        assert_eq!(
            bus.insert(0x64, 1, other.clone()),
            Err(BusError::Overlap { base: 0x64, len: 1 })
        );
        assert_eq!(
            bus.insert(0x5c, 5, other.clone()),
            Err(BusError::Overlap { base: 0x5c, len: 5 })
        );
        assert_eq!(
            bus.insert(0x70, 0, other.clone()),
            Err(BusError::BadRange { base: 0x70, len: 0 })
        );
        assert_eq!(
            bus.insert(u64::MAX - 1, 4, other.clone()),
            Err(BusError::BadRange {
                base: u64::MAX - 1,
                len: 4
            })
        );
        bus.insert(0x65, 1, other).unwrap();
    }
}
