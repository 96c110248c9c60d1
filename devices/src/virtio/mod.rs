//! Virtio devices and their MMIO transport.
//!
//! Data flow: the guest's driver programs a device through `mmio::MmioTransport`
//! (registers, on vCPU threads). When the driver sets DRIVER_OK the transport hands the
//! device its queues and the queues' kick eventfds (`Activation`); from then on the
//! device runs only on the VMM's event loop: a kick (an ioeventfd KVM signals on the
//! guest's QueueNotify write) or a backend fd wakes it, it walks its queues through
//! `virtio-queue` (every descriptor checked against guest memory by `vm-memory`), and it
//! tells the guest through `Interrupt` (an irqfd).
//!
//! A device is inert until activated: before that its event handler listens only for
//! its activation eventfd.

pub mod block;
/// The fuzz targets' cases (vmm/fuzz), on the synthetic driver.
#[cfg(any(test, feature = "test-utils"))]
pub mod fuzzing;
pub mod mmio;
pub mod net;
pub mod persist;
pub mod rng;
pub mod single_queue;
/// The synthetic driver, for unit tests and the device benchmark.
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
pub mod vsock;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub use mmio::{MmioTransport, MMIO_DEVICE_SIZE, QUEUE_NOTIFY_OFFSET};

/// Device IDs (virtio 1.2, section 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;

/// Feature bits every Peapod device offers.
pub const F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
pub const F_RING_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
pub const F_RING_INDIRECT_DESC: u64 =
    1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// What the transport offers on behalf of every device (the queue crate handles
/// indirect descriptors and event suppression).
pub const TRANSPORT_FEATURES: u64 = F_VERSION_1 | F_RING_EVENT_IDX | F_RING_INDIRECT_DESC;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// What a device model implements; the transport knows registers, the device knows
/// its own job.
pub trait VirtioDevice: Send {
    /// The virtio device ID (`TYPE_*`).
    fn device_type(&self) -> u32;
    /// One entry per queue: the most descriptors the device accepts in it.
    fn queue_max_sizes(&self) -> &[u16];
    /// Device-specific feature bits; the transport adds `TRANSPORT_FEATURES`.
    fn features(&self) -> u64;
    /// Reads the device configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space; most devices ignore this.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The interrupt the device raises; the transport reads and acknowledges it.
    fn interrupt(&self) -> &std::sync::Arc<Interrupt>;
    /// Called once, when the driver sets DRIVER_OK. The device keeps the queues and
    /// kicks and wakes its event handler; it must not do queue work on this thread.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    fn is_activated(&self) -> bool;
    /// Where the running device is in each of its queues, in queue order, for a
    /// snapshot taken while the event loop does not run it; `None` before activation.
    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>>;
    /// The driver wrote 0 to the status register: drop queues and return to the state
    /// before activation. Returns false if the device cannot, and then the transport
    /// reports DEVICE_NEEDS_RESET until the VM is restarted.
    fn reset(&mut self) -> bool {
        !self.is_activated()
    }
}

/// Everything a device needs to start work.
pub struct Activation {
    pub memory: GuestMemoryMmap,
    /// The negotiated feature bits (device and transport ones).
    pub features: u64,
    /// In the order of `queue_max_sizes`.
    pub queues: Vec<Queue>,
    /// `kicks[i]` becomes readable when the guest notifies queue `i`.
    pub kicks: Vec<EventFd>,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver set up {got} queues, the device needs {wanted}")]
    QueueCount { got: usize, wanted: usize },
    #[error("{0}")]
    Backend(String),
    #[error("cannot wake the device's event handler: {0}")]
    Wake(std::io::Error),
}

/// A device's line to the guest: the interrupt status register the transport exposes,
/// the irqfd that raises the guest interrupt, and the "needs reset" flag a device sets
/// when the driver broke the queue protocol.
pub struct Interrupt {
    status: AtomicU32,
    /// Bumped on every configuration change, so a driver re-reads it consistently.
    config_generation: AtomicU32,
    needs_reset: AtomicBool,
    irqfd: EventFd,
}

impl Interrupt {
    /// `irqfd` is registered with KVM for the device's IRQ line.
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            irqfd,
        }
    }

    /// The device put buffers in a used ring.
    pub fn signal_used_queue(&self) {
        self.raise(virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING);
    }

    /// The device's configuration changed (a block slot got a new backing file).
    pub fn signal_config_change(&self) {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.raise(virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG);
    }

    /// The driver broke the protocol (say, an available index that jumps past the
    /// queue): the device stops and tells the driver to reset it.
    pub fn signal_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.signal_config_change();
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    pub(crate) fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Takes a snapshot's interrupt state; raises the interrupt again if one was
    /// pending, since the guest may not have seen it.
    pub(crate) fn restore(&self, status: u32, config_generation: u32, needs_reset: bool) {
        self.config_generation
            .store(config_generation, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
        self.status.store(0, Ordering::SeqCst);
        if status != 0 {
            self.raise(status);
        }
    }

    pub(crate) fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            log::error!("virtio: cannot raise the guest interrupt: {e}");
        }
    }

    /// For tests: the irqfd, to see whether an interrupt was raised.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// Serves every chain the driver made available in `queue`: `serve` handles one
/// chain and returns how many bytes it wrote into it. Notifications are suppressed
/// while the device works and the guest is interrupted once at the end, if the
/// driver asked for it. An error means the driver broke the ring itself (not just
/// one chain): the caller stops the device and signals that it needs a reset.
pub fn serve_queue<F>(
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    interrupt: &Interrupt,
    mut serve: F,
) -> Result<usize, virtio_queue::Error>
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
{
    let mut served = 0;
    loop {
        queue.disable_notification(memory)?;
        while let Some(chain) = queue.iter(memory)?.next() {
            let head = chain.head_index();
            let written = serve(chain);
            queue.add_used(memory, head, written)?;
            served += 1;
        }
        if !queue.enable_notification(memory)? {
            break;
        }
    }
    if served > 0 && queue.needs_notification(memory)? {
        interrupt.signal_used_queue();
    }
    Ok(served)
}

/// The shape of a descriptor chain that passed `check_chain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainSize {
    /// Bytes in the device-readable descriptors (they come first).
    pub readable: u32,
    /// Bytes in the device-writable descriptors (they come last).
    pub writable: u32,
}

/// Why a chain is refused. The request fails; the device and the VMM carry on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("the chain loops, names a descriptor past the table, or cannot be read")]
    Truncated,
    #[error("descriptor {addr:#x}+{len:#x} lies outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
}

/// Walks a chain once before a device uses it. `virtio-queue` already bounds a walk
/// (a loop ends after queue-size descriptors) and `vm-memory` checks each access, but
/// both end a bad chain silently; this turns a loop, a bad next index, a buffer
/// outside guest memory or a misordered chain into a refused request.
pub fn check_chain(chain: &DescriptorChain<&GuestMemoryMmap>) -> Result<ChainSize, ChainError> {
    let memory = chain.memory();
    let mut size = ChainSize {
        readable: 0,
        writable: 0,
    };
    let mut descriptors = 0usize;
    let mut more = false;
    for desc in chain.clone() {
        descriptors += 1;
        more = desc.has_next();
        let len = desc.len();
        if len > 0
            && !memory.check_range(desc.addr(), len as usize, vm_memory::Permissions::ReadWrite)
        {
            return Err(ChainError::OutsideMemory {
                addr: desc.addr().0,
                len,
            });
        }
        if desc.is_write_only() {
            size.writable = size.writable.saturating_add(len);
        } else if size.writable > 0 {
            return Err(ChainError::ReadableAfterWritable);
        } else {
            size.readable = size.readable.saturating_add(len);
        }
    }
    if descriptors == 0 || more {
        return Err(ChainError::Truncated);
    }
    Ok(size)
}

/// Adds `fd` to the event loop for reading; a failure is logged, naming `what`.
pub fn watch(ops: &mut event_manager::EventOps, fd: std::os::fd::RawFd, what: &str) {
    if let Err(e) = ops.add(event_manager::Events::new_raw(
        fd,
        vmm_sys_util::epoll::EventSet::IN,
    )) {
        log::error!("{what}: cannot watch fd {fd} on the event loop: {e:?}");
    }
}

/// Copies `data.len()` bytes of a configuration space starting at `offset`; bytes
/// outside it read as zero, as a guest reading past a small config space expects.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}
