//! The virtio-mmio transport, version 2 ("modern"), virtio 1.2 section 4.2.2.
//!
//! It knows registers, not devices: it keeps the queue configuration the driver writes,
//! negotiates features, and on DRIVER_OK hands the queues to the device. Register
//! accesses run on vCPU threads; QueueNotify writes never reach it, because KVM turns
//! them into ioeventfd signals (`queue_kicks`) that the event loop sees.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::persist::{QueueSnapshot, RestoreError, TransportSnapshot};
use super::{status, ActivateError, Activation, Interrupt, VirtioDevice, TRANSPORT_FEATURES};
use crate::{lock, BusDevice};

/// The MMIO window of one device: registers, then configuration space.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// Where KVM must watch for queue kicks (with the queue index as data).
pub const QUEUE_NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;
const MAGIC: u32 = u32::from_le_bytes(*b"virt");
const VERSION_MODERN: u32 = 2;
/// No PCI vendor: the spec lets a device pick any ID; this spells "PEAP".
const VENDOR_ID: u32 = u32::from_le_bytes(*b"PEAP");
const CONFIG_START: u64 = VIRTIO_MMIO_CONFIG as u64;

pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<Interrupt>,
    memory: GuestMemoryMmap,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u32,
    queues: Vec<Queue>,
    kicks: Vec<EventFd>,
    status: u32,
    /// The device could not be reset or activated: only a VM restart helps.
    broken: bool,
}

impl MmioTransport {
    pub fn new(
        memory: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> std::io::Result<Self> {
        let (interrupt, queues) = {
            let dev = lock(&device);
            let queues = dev
                .queue_max_sizes()
                .iter()
                .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
                .collect::<Vec<_>>();
            (dev.interrupt().clone(), queues)
        };
        let kicks = queues
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            device,
            interrupt,
            memory,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            queue_select: 0,
            queues,
            kicks,
            status: 0,
            broken: false,
        })
    }

    /// One eventfd per queue, in queue order; the VMM registers `kicks[i]` as an
    /// ioeventfd on `base + QUEUE_NOTIFY_OFFSET` with data `i`.
    pub fn queue_kicks(&self) -> &[EventFd] {
        &self.kicks
    }

    /// The queues as the driver configured them (for reporting).
    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }

    /// The driver status register as the guest reads it.
    pub fn status(&self) -> u32 {
        let mut s = self.status;
        if self.broken || self.interrupt.needs_reset() {
            s |= status::DEVICE_NEEDS_RESET;
        }
        s
    }

    /// The transport's state and where the device is in its queues, for a snapshot;
    /// the vCPUs are paused and the event loop is not running the device.
    pub fn save(&self) -> TransportSnapshot {
        let device = lock(&self.device);
        TransportSnapshot {
            device_type: device.device_type(),
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            status: self.status,
            broken: self.broken,
            interrupt_status: self.interrupt.status(),
            config_generation: self.interrupt.config_generation(),
            needs_reset: self.interrupt.needs_reset(),
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            active_queues: device
                .queue_states()
                .map(|queues| queues.into_iter().map(Into::into).collect()),
        }
    }

    /// Sets a snapshot's state into this transport, new and of the same device type;
    /// a device that was running is started again where it was in its queues.
    pub fn restore(&mut self, saved: &TransportSnapshot) -> Result<(), RestoreError> {
        let here = lock(&self.device).device_type();
        if saved.device_type != here {
            return Err(RestoreError::DeviceType {
                saved: saved.device_type,
                here,
            });
        }
        if self.status != 0 || lock(&self.device).is_activated() {
            return Err(RestoreError::InUse);
        }
        let queues = self.queues_of(&saved.queues)?;
        let active = match &saved.active_queues {
            Some(active) => Some(self.queues_of(active)?),
            None => None,
        };
        self.queues = queues;
        self.device_features_select = saved.device_features_select;
        self.driver_features_select = saved.driver_features_select;
        self.driver_features = saved.driver_features;
        self.queue_select = saved.queue_select;
        self.status = saved.status;
        self.broken = saved.broken;
        if let Some(queues) = active {
            for (index, q) in queues.iter().enumerate() {
                if !q.is_valid(&self.memory) {
                    return Err(RestoreError::QueueOutsideMemory { index });
                }
            }
            let kicks = self
                .kicks
                .iter()
                .map(EventFd::try_clone)
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(|e| RestoreError::Activate(ActivateError::Wake(e)))?;
            lock(&self.device).activate(Activation {
                memory: self.memory.clone(),
                features: self.driver_features,
                queues,
                kicks,
            })?;
        }
        self.interrupt.restore(
            saved.interrupt_status,
            saved.config_generation,
            saved.needs_reset,
        );
        Ok(())
    }

    /// A snapshot's queues as queues of this device.
    fn queues_of(&self, saved: &[QueueSnapshot]) -> Result<Vec<Queue>, RestoreError> {
        if saved.len() != self.queues.len() {
            return Err(RestoreError::QueueCount {
                saved: saved.len(),
                here: self.queues.len(),
            });
        }
        saved
            .iter()
            .zip(&self.queues)
            .enumerate()
            .map(|(index, (s, mine))| {
                if s.max_size != mine.max_size() {
                    return Err(RestoreError::Queue {
                        index,
                        source: virtio_queue::Error::InvalidMaxSize,
                    });
                }
                Queue::try_from(QueueState::from(s))
                    .map_err(|source| RestoreError::Queue { index, source })
            })
            .collect()
    }

    fn offered_features(&self) -> u64 {
        lock(&self.device).features() | TRANSPORT_FEATURES
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queue configuration is frozen once the device runs.
        if self.status & status::DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_select as usize)
    }

    fn read_register(&self, offset: u32) -> u32 {
        let queue = self.queues.get(self.queue_select as usize);
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION_MODERN,
            VIRTIO_MMIO_DEVICE_ID => lock(&self.device).device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_select {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status(),
            // No shared memory regions: their length reads as all ones (4.2.2.1).
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            VIRTIO_MMIO_SHM_BASE_LOW | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => {
                log::debug!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES if self.status & status::FEATURES_OK == 0 => {
                match self.driver_features_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            VIRTIO_MMIO_QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    // Queue::set_size refuses sizes that are not powers of two or too
                    // big, and is_valid() then fails activation.
                    q.set_size(value as u16);
                }
            }
            VIRTIO_MMIO_QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW => {
                self.set_queue_address(|q| q.set_desc_table_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                self.set_queue_address(|q| q.set_desc_table_address(None, Some(value)))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                self.set_queue_address(|q| q.set_avail_ring_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                self.set_queue_address(|q| q.set_avail_ring_address(None, Some(value)))
            }
            VIRTIO_MMIO_QUEUE_USED_LOW => {
                self.set_queue_address(|q| q.set_used_ring_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH => {
                self.set_queue_address(|q| q.set_used_ring_address(None, Some(value)))
            }
            // Only reached when KVM has no ioeventfd for it (unit tests); kicks are
            // the event loop's job either way.
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                if let Some(kick) = self.kicks.get(value as usize) {
                    let _ = kick.write(1);
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            VIRTIO_MMIO_STATUS => self.write_status(value),
            VIRTIO_MMIO_SHM_SEL => {}
            _ => log::debug!("virtio-mmio: write of read-only or unknown register {offset:#x}"),
        }
    }

    fn set_queue_address(&mut self, set: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            set(q);
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits (3.1.1); anything else is ignored.
        if value & self.status != self.status {
            log::warn!(
                "virtio-mmio: driver cleared status bits ({:#x} -> {value:#x}); ignored",
                self.status
            );
            return;
        }
        let added = value & !self.status;
        if added & status::FEATURES_OK != 0 {
            let offered = self.offered_features();
            let acceptable = self.driver_features & !offered == 0
                && self.driver_features & super::F_VERSION_1 != 0;
            if !acceptable {
                log::warn!(
                    "virtio-mmio: driver features {:#x} are not a modern subset of {offered:#x}; \
                     FEATURES_OK refused",
                    self.driver_features
                );
                self.status = value & !status::FEATURES_OK;
                return;
            }
        }
        self.status = value;
        if added & status::DRIVER_OK != 0 && self.status & status::FEATURES_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & super::F_RING_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            if !q.is_valid(&self.memory) {
                log::warn!("virtio-mmio: queue {i} is not set up validly; device not started");
                self.status |= status::FAILED;
                return;
            }
            let Ok(mut q) = Queue::try_from(q.state()) else {
                self.status |= status::FAILED;
                return;
            };
            q.set_event_idx(event_idx);
            queues.push(q);
        }
        let kicks = match self.kicks.iter().map(EventFd::try_clone).collect() {
            Ok(k) => k,
            Err(e) => {
                log::error!("virtio-mmio: cannot share queue kicks with the device: {e}");
                self.broken = true;
                return;
            }
        };
        let activation = Activation {
            memory: self.memory.clone(),
            features: self.driver_features,
            queues,
            kicks,
        };
        if let Err(e) = lock(&self.device).activate(activation) {
            log::error!("virtio-mmio: device activation failed: {e}");
            self.broken = true;
        }
    }

    fn reset(&mut self) {
        if !lock(&self.device).reset() {
            // Linux resets its devices on the way to power-off; nothing to do then.
            log::debug!("virtio-mmio: device cannot be reset while running");
            self.broken = true;
            return;
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
        self.interrupt.clear();
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_START {
            lock(&self.device).read_config(offset - CONFIG_START, data);
            return;
        }
        // Registers are 32 bits wide and read as a whole (4.2.2.2).
        match (<&mut [u8; 4]>::try_from(data), u32::try_from(offset)) {
            (Ok(bytes), Ok(reg)) if reg % 4 == 0 => {
                *bytes = self.read_register(reg).to_le_bytes();
            }
            (Ok(bytes), _) => bytes.fill(0),
            (Err(_), _) => {
                log::debug!("virtio-mmio: register read at {offset:#x} is not 4 bytes wide");
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_START {
            lock(&self.device).write_config(offset - CONFIG_START, data);
            return;
        }
        match (<[u8; 4]>::try_from(data), u32::try_from(offset)) {
            (Ok(bytes), Ok(reg)) if reg % 4 == 0 => {
                self.write_register(reg, u32::from_le_bytes(bytes));
            }
            _ => log::debug!(
                "virtio-mmio: register write at {offset:#x} of {} bytes ignored",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::rng::Rng;
    use crate::virtio::test_utils::{self, TestQueue};

    fn reg(t: &mut MmioTransport, offset: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(offset), &mut b);
        u32::from_le_bytes(b)
    }

    fn set(t: &mut MmioTransport, offset: u32, value: u32) {
        t.write(u64::from(offset), &value.to_le_bytes());
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Rng>>, GuestMemoryMmap) {
        let memory = test_utils::memory();
        let rng = Arc::new(Mutex::new(Rng::new(test_utils::interrupt()).unwrap()));
        let t = MmioTransport::new(memory.clone(), rng.clone()).unwrap();
        (t, rng, memory)
    }

    /// What Linux's virtio_mmio driver does, in order (virtio 1.2, 3.1.1).
    fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
        set(t, VIRTIO_MMIO_STATUS, 0);
        set(t, VIRTIO_MMIO_STATUS, status::ACKNOWLEDGE);
        set(t, VIRTIO_MMIO_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        set(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        set(t, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        set(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        set(t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        set(
            t,
            VIRTIO_MMIO_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        reg(t, VIRTIO_MMIO_STATUS)
    }

    fn program_queue(t: &mut MmioTransport, q: &TestQueue, size: u32) {
        let (desc, avail, used) = (q.desc, q.avail, q.used);
        set(t, VIRTIO_MMIO_QUEUE_SEL, 0);
        set(t, VIRTIO_MMIO_QUEUE_NUM, size);
        set(t, VIRTIO_MMIO_QUEUE_DESC_LOW, desc as u32);
        set(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
        set(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail as u32);
        set(t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
        set(t, VIRTIO_MMIO_QUEUE_USED_LOW, used as u32);
        set(t, VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
        set(t, VIRTIO_MMIO_QUEUE_READY, 1);
    }

    #[test]
    fn identifies_as_a_modern_device() {
        let (mut t, _, _) = transport();
        assert_eq!(reg(&mut t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(reg(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(reg(&mut t, VIRTIO_MMIO_DEVICE_ID), crate::virtio::TYPE_RNG);
        set(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            reg(&mut t, VIRTIO_MMIO_DEVICE_FEATURES),
            1,
            "VERSION_1 (bit 32)"
        );
        assert_eq!(reg(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 64);
        set(&mut t, VIRTIO_MMIO_QUEUE_SEL, 7);
        assert_eq!(reg(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "no queue 7");
    }

    #[test]
    fn activates_on_driver_ok_and_serves_the_queue() {
        let (mut t, rng, memory) = transport();
        let q = TestQueue::new(&memory, 0x4000, 16);
        assert_ne!(
            negotiate(&mut t, TRANSPORT_FEATURES) & status::FEATURES_OK,
            0
        );
        program_queue(&mut t, &q, 16);
        assert!(!rng.lock().unwrap().is_activated());
        let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        set(&mut t, VIRTIO_MMIO_STATUS, ok);
        assert_eq!(reg(&mut t, VIRTIO_MMIO_STATUS), ok);
        assert!(rng.lock().unwrap().is_activated());

        q.add_chain(&[test_utils::writable(test_utils::DATA_START, 8)]);
        rng.lock().unwrap().process_queue();
        assert_eq!(q.used(0), (0, 8));
        assert_eq!(reg(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        set(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, 1);
        assert_eq!(reg(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn a_restored_transport_goes_on_in_its_queue_and_a_wrong_one_is_refused() {
        let (mut t, rng, memory) = transport();
        let q = TestQueue::new(&memory, 0x4000, 16);
        negotiate(&mut t, TRANSPORT_FEATURES);
        program_queue(&mut t, &q, 16);
        set(&mut t, VIRTIO_MMIO_STATUS, 0xf);
        for _ in 0..2 {
            q.add_chain(&[test_utils::writable(test_utils::DATA_START, 8)]);
        }
        rng.lock().unwrap().process_queue();
        assert_eq!(q.used_idx(), 2);
        let saved = t.save();
        assert_eq!(saved.status, 0xf);
        assert_eq!(
            saved.interrupt_status, 1,
            "the guest has not acknowledged it"
        );
        let active = saved.active_queues.as_ref().expect("the device runs");
        assert_eq!((active[0].next_avail, active[0].next_used), (2, 2));

        // A new device on the same memory, as after a restore.
        let rng2 = Arc::new(Mutex::new(Rng::new(test_utils::interrupt()).unwrap()));
        let mut t2 = MmioTransport::new(memory.clone(), rng2.clone()).unwrap();
        t2.restore(&saved).unwrap();
        assert!(rng2.lock().unwrap().is_activated());
        assert_eq!(reg(&mut t2, VIRTIO_MMIO_STATUS), 0xf);
        assert_eq!(reg(&mut t2, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        assert!(
            test_utils::interrupted(rng2.lock().unwrap().interrupt()),
            "the pending interrupt is raised again"
        );
        let head = q.add_chain(&[test_utils::writable(test_utils::DATA_START, 4)]);
        rng2.lock().unwrap().process_queue();
        assert_eq!(q.used_idx(), 3, "the used ring goes on from 2");
        assert_eq!(q.used(2), (u32::from(head), 4));
        assert_eq!(t2.save().active_queues.unwrap()[0].next_avail, 3);

        let e = t2.restore(&saved).unwrap_err();
        assert!(matches!(e, RestoreError::InUse), "{e}");
        let mut other = saved.clone();
        other.device_type = crate::virtio::TYPE_BLOCK;
        let e = transport().0.restore(&other).unwrap_err();
        assert!(matches!(e, RestoreError::DeviceType { .. }), "{e}");
        let mut other = saved.clone();
        other.queues.push(other.queues[0]);
        let e = transport().0.restore(&other).unwrap_err();
        assert!(
            matches!(e, RestoreError::QueueCount { saved: 2, here: 1 }),
            "{e}"
        );
        let mut other = saved.clone();
        other.active_queues.as_mut().unwrap()[0].desc_table = test_utils::MEM_SIZE as u64;
        let e = transport().0.restore(&other).unwrap_err();
        assert!(
            matches!(e, RestoreError::QueueOutsideMemory { index: 0 }),
            "{e}"
        );
    }

    #[test]
    fn refuses_legacy_drivers_and_unknown_features() {
        let (mut t, _, _) = transport();
        assert_eq!(
            negotiate(&mut t, 0) & status::FEATURES_OK,
            0,
            "no VERSION_1"
        );
        let (mut t, _, _) = transport();
        assert_eq!(
            negotiate(&mut t, TRANSPORT_FEATURES | 1 << 40) & status::FEATURES_OK,
            0,
            "a feature never offered"
        );
    }

    #[test]
    fn a_queue_outside_memory_fails_activation_not_the_vmm() {
        let (mut t, rng, memory) = transport();
        let q = TestQueue::new(&memory, test_utils::MEM_SIZE as u64 + 0x1000, 16);
        negotiate(&mut t, TRANSPORT_FEATURES);
        program_queue(&mut t, &q, 16);
        set(&mut t, VIRTIO_MMIO_STATUS, 0xf);
        assert_ne!(reg(&mut t, VIRTIO_MMIO_STATUS) & status::FAILED, 0);
        assert!(!rng.lock().unwrap().is_activated());
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let (mut t, _, _) = transport();
        let mut two = [0xaau8; 2];
        t.read(0, &mut two); // not 4 bytes wide
        assert_eq!(two, [0xaa; 2]);
        let mut b = [0xaau8; 4];
        t.read(2, &mut b); // unaligned
        assert_eq!(b, [0; 4]);
        t.write(VIRTIO_MMIO_STATUS.into(), &[1, 2]);
        assert_eq!(reg(&mut t, VIRTIO_MMIO_STATUS), 0);
        let mut cfg = [0xaau8; 8];
        t.read(CONFIG_START + 0x800, &mut cfg);
        assert_eq!(cfg, [0; 8], "rng has no config space");
    }
}
