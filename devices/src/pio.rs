//! The port-I/O bus: which device answers which x86 I/O port.

use std::sync::{Arc, Mutex};

/// A device that answers port I/O. `offset` is relative to the device's base port.
pub trait PioDevice: Send {
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PioError {
    #[error("I/O ports {base:#x}+{len} overlap a device already on the bus")]
    Overlap { base: u16, len: u16 },
    #[error("I/O port range {base:#x}+{len} is empty or runs past port 0xffff")]
    BadRange { base: u16, len: u16 },
}

struct PioRange {
    base: u16,
    len: u16,
    device: Arc<Mutex<dyn PioDevice>>,
}

impl PioRange {
    fn offset_of(&self, port: u16) -> Option<u16> {
        port.checked_sub(self.base).filter(|off| *off < self.len)
    }
}

/// Built once before the vCPUs start, then shared read-only by all vCPU threads.
#[derive(Default)]
pub struct PioBus {
    ranges: Vec<PioRange>,
}

impl PioBus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        base: u16,
        len: u16,
        device: Arc<Mutex<dyn PioDevice>>,
    ) -> Result<(), PioError> {
        let end = base.checked_add(len - len.min(1));
        if len == 0 || end.is_none() {
            return Err(PioError::BadRange { base, len });
        }
        let overlaps =
            |r: &PioRange| base < r.base.saturating_add(r.len) && r.base < base.saturating_add(len);
        if self.ranges.iter().any(overlaps) {
            return Err(PioError::Overlap { base, len });
        }
        self.ranges.push(PioRange { base, len, device });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(&PioRange, u16)> {
        self.ranges
            .iter()
            .find_map(|r| r.offset_of(port).map(|off| (r, off)))
    }

    /// Returns false when no device owns `port`; the caller decides what the guest reads.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(port) {
            Some((range, offset)) => {
                lock(&range.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Returns false when no device owns `port`.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        match self.find(port) {
            Some((range, offset)) => {
                lock(&range.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A device whose lock was poisoned panicked mid-access; its state is still the best
/// we have, and a guest must not be able to turn one device bug into a VMM-wide panic.
fn lock<'a>(
    device: &'a Mutex<dyn PioDevice + 'static>,
) -> std::sync::MutexGuard<'a, dyn PioDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u16, Vec<u8>)>,
    }

    impl PioDevice for Recorder {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_port_with_relative_offsets() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = PioBus::new();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();

        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x3f8, b"x"));
        assert!(!bus.write(0x400, &[0]), "port past the range is unowned");
        assert!(
            !bus.read(0x3f7, &mut data),
            "port before the range is unowned"
        );
        assert_eq!(dev.lock().unwrap().writes, vec![(0, vec![b'x'])]);
    }

    #[test]
    fn refuses_overlaps_and_bad_ranges() {
        let mut bus = PioBus::new();
        bus.insert(0x60, 5, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        let other = Arc::new(Mutex::new(Recorder::default()));
        assert_eq!(
            bus.insert(0x64, 1, other.clone()),
            Err(PioError::Overlap { base: 0x64, len: 1 })
        );
        assert_eq!(
            bus.insert(0x5c, 5, other.clone()),
            Err(PioError::Overlap { base: 0x5c, len: 5 })
        );
        assert_eq!(
            bus.insert(0x70, 0, other.clone()),
            Err(PioError::BadRange { base: 0x70, len: 0 })
        );
        assert_eq!(
            bus.insert(0xfffe, 4, other.clone()),
            Err(PioError::BadRange {
                base: 0xfffe,
                len: 4
            })
        );
        bus.insert(0x65, 1, other).unwrap();
    }
}
