//! The VM's virtio devices: where each sits (MMIO window and interrupt line), how KVM
//! reaches it (irqfd out, ioeventfd in), and the kernel command-line words that
//! announce it. Devices are announced in a fixed order, so the guest names disks in
//! the order they were given: block devices and slots, then net, vsock, rng.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use kvm_ioctls::{IoEventAddress, VmFd};
use peapod_devices::virtio::block::{Block, BlockBacking, BlockError, PassedFile};
use peapod_devices::virtio::net::{Net, Tap, TapError};
use peapod_devices::virtio::persist::TransportSnapshot;
use peapod_devices::virtio::rng::Rng;
use peapod_devices::virtio::vsock::Vsock;
use peapod_devices::virtio::{
    Interrupt, MmioTransport, VirtioDevice, MMIO_DEVICE_SIZE, QUEUE_NOTIFY_OFFSET,
};
use peapod_devices::{lock, Bus, BusDevice, BusError};
use peapod_vmm_api::{BlockRegion, DeviceInfo, DeviceKind, QueueInfo};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{parse_mac, NetConfig, VmConfig, MAX_VIRTIO_DEVICES};
use crate::layout::{VIRTIO_IRQ_FIRST, VIRTIO_MMIO_START};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{device}: {what}: {source}")]
    Io {
        device: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{device}: KVM: {what}: {source}")]
    Kvm {
        device: String,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("{device}: {message}")]
    Setup { device: String, message: String },
    #[error("{0}: more virtio devices than interrupt lines")]
    NoIrq(String),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// Why a block slot could not be changed; the API answers with it (and chooses the
/// status).
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error(
        "block slot {slot}: no such slot (this VM has {count} block devices, numbered from 0)"
    )]
    NoSuchSlot { slot: usize, count: usize },
    #[error("block slot {slot}: {source}")]
    Backing { slot: usize, source: BlockError },
}

struct Attached {
    kind: DeviceKind,
    base: u64,
    irq: u32,
    transport: Arc<Mutex<MmioTransport>>,
}

/// Every virtio device of the VM, and the words that tell the guest about them.
pub struct VirtioDevices {
    attached: Vec<Attached>,
    /// Block devices in slot order (boot disks, then empty slots).
    block: Vec<Arc<Mutex<Block>>>,
    /// Told of a restore: its host side starts with no connections.
    vsock: Option<Arc<Mutex<Vsock>>>,
    subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    cmdline: Vec<String>,
}

impl VirtioDevices {
    /// Builds the devices `config` asks for and puts them on `bus`.
    pub fn build(
        vm: &VmFd,
        memory: &GuestMemoryMmap,
        config: &VmConfig,
        bus: &mut Bus,
    ) -> Result<Self, DeviceError> {
        let mut devices = Self {
            attached: Vec::new(),
            block: Vec::new(),
            vsock: None,
            subscribers: Vec::new(),
            cmdline: Vec::new(),
        };
        let disks = config.block.iter().map(Some);
        let slots = std::iter::repeat_n(None, usize::from(config.block_slots));
        for (slot, disk) in disks.chain(slots).enumerate() {
            let backing = disk.map(|d| backing(d.path.clone(), d.read_only, d.id.clone(), None));
            let block = devices.attach(
                vm,
                memory,
                bus,
                DeviceKind::Block,
                format!("block slot {slot}"),
                |interrupt| Block::new(backing, interrupt).map_err(|e| e.to_string()),
            )?;
            devices.block.push(block);
        }
        if let Some(net) = &config.net {
            let name = match &net.tap {
                Some(tap) => format!("virtio-net on tap {tap}"),
                None => format!("virtio-net on fd {}", net.fd.unwrap_or(-1)),
            };
            let mac = match net.mac.as_deref().and_then(parse_mac) {
                Some(mac) => mac,
                None => random_mac(),
            };
            let tap = open_tap(net).map_err(|e| DeviceError::Setup {
                device: name.clone(),
                message: e.to_string(),
            })?;
            devices.attach(vm, memory, bus, DeviceKind::Net, name, |interrupt| {
                Net::new(tap, mac, interrupt).map_err(|e| e.to_string())
            })?;
        }
        if let Some(v) = &config.vsock {
            let name = format!("virtio-vsock cid {} on {}", v.cid, v.socket.display());
            let vsock = devices.attach(vm, memory, bus, DeviceKind::Vsock, name, |interrupt| {
                Vsock::new(v.cid, v.socket.clone(), interrupt).map_err(|e| e.to_string())
            })?;
            devices.vsock = Some(vsock);
        }
        devices.attach(
            vm,
            memory,
            bus,
            DeviceKind::Rng,
            "virtio-rng".into(),
            |interrupt| Rng::new(interrupt).map_err(|e| format!("cannot create its eventfd: {e}")),
        )?;
        Ok(devices)
    }

    /// Places one device: the next MMIO window and interrupt line, an irqfd for its
    /// interrupt, an ioeventfd per queue, the transport on the bus.
    fn attach<D, F>(
        &mut self,
        vm: &VmFd,
        memory: &GuestMemoryMmap,
        bus: &mut Bus,
        kind: DeviceKind,
        name: String,
        make: F,
    ) -> Result<Arc<Mutex<D>>, DeviceError>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
        F: FnOnce(Arc<Interrupt>) -> Result<D, String>,
    {
        let index = self.attached.len();
        if index >= MAX_VIRTIO_DEVICES {
            return Err(DeviceError::NoIrq(name));
        }
        let base = VIRTIO_MMIO_START + index as u64 * MMIO_DEVICE_SIZE;
        let irq = VIRTIO_IRQ_FIRST + index as u32;
        let io = |what| {
            let device = name.to_string();
            move |source| DeviceError::Io {
                device,
                what,
                source,
            }
        };
        let kvm = |what| {
            let device = name.to_string();
            move |source| DeviceError::Kvm {
                device,
                what,
                source,
            }
        };

        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(io("irqfd"))?;
        vm.register_irqfd(&irqfd, irq)
            .map_err(kvm("register irqfd"))?;
        let device =
            make(Arc::new(Interrupt::new(irqfd))).map_err(|message| DeviceError::Setup {
                device: name.clone(),
                message,
            })?;
        let device = Arc::new(Mutex::new(device));
        let transport =
            MmioTransport::new(memory.clone(), device.clone()).map_err(io("queue eventfds"))?;
        for (i, kick) in transport.queue_kicks().iter().enumerate() {
            vm.register_ioevent(
                kick,
                &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                i as u32,
            )
            .map_err(kvm("register queue ioeventfd"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        bus.insert(
            base,
            MMIO_DEVICE_SIZE,
            transport.clone() as Arc<Mutex<dyn BusDevice>>,
        )?;
        self.cmdline
            .push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        self.subscribers.push(device.clone());
        self.attached.push(Attached {
            kind,
            base,
            irq,
            transport,
        });
        Ok(device)
    }

    /// Every device's transport and queues, for a snapshot of the paused VM. Disks
    /// are not in a snapshot: every block slot must be empty.
    pub fn save(&self) -> Result<Vec<TransportSnapshot>, DeviceError> {
        for (slot, block) in self.block.iter().enumerate() {
            let block = lock(block);
            if block.capacity_sectors() > 0 || block.backing().is_some() {
                return Err(DeviceError::Setup {
                    device: format!("block slot {slot}"),
                    message: format!(
                        "it holds {}: a snapshot is of a VM whose block slots are empty \
                         (a restored VM gets its disks through the API)",
                        block.describe()
                    ),
                });
            }
        }
        Ok(self
            .attached
            .iter()
            .map(|a| lock(&a.transport).save())
            .collect())
    }

    /// Takes a snapshot's device states, in the order [`VirtioDevices::save`] gave
    /// them, into these new devices built from the same configuration; then tells
    /// the guest that its vsock connections are gone.
    pub fn restore(&mut self, saved: &[TransportSnapshot]) -> Result<(), DeviceError> {
        if saved.len() != self.attached.len() {
            return Err(DeviceError::Setup {
                device: "virtio devices".into(),
                message: format!(
                    "the snapshot has {} devices, this VM's configuration {}: give the \
                     restored VMM the devices the snapshot's VM had",
                    saved.len(),
                    self.attached.len()
                ),
            });
        }
        for (i, (attached, state)) in self.attached.iter().zip(saved).enumerate() {
            lock(&attached.transport)
                .restore(state)
                .map_err(|e| DeviceError::Setup {
                    device: format!("virtio device {i} ({:?})", attached.kind),
                    message: e.to_string(),
                })?;
        }
        if let Some(vsock) = &self.vsock {
            if lock(vsock).is_activated() && !lock(vsock).reset_transport() {
                log::warn!("virtio-vsock: the guest left no event buffer for the transport reset");
            }
        }
        Ok(())
    }

    /// `virtio_mmio.device=4K@<base>:<irq>` for each device, in order.
    pub fn cmdline_words(&self) -> impl Iterator<Item = &str> {
        self.cmdline.iter().map(String::as_str)
    }

    /// The devices' event handlers, for the event loop.
    pub fn subscribers(&self) -> &[Arc<Mutex<dyn MutEventSubscriber + Send>>] {
        &self.subscribers
    }

    /// Gives block device `slot` a new backing file, and tells the guest.
    pub fn set_block_slot(&mut self, slot: usize, backing: BlockBacking) -> Result<(), SlotError> {
        self.change_block_slot(slot, Some(backing))
    }

    /// Empties block device `slot`; the guest sees a disk of size 0.
    pub fn clear_block_slot(&mut self, slot: usize) -> Result<(), SlotError> {
        self.change_block_slot(slot, None)
    }

    /// Adds `backing` to the store in block device `slot` (an empty slot becomes
    /// one), and tells the guest; where the file is.
    pub fn append_to_store(
        &mut self,
        slot: usize,
        backing: BlockBacking,
    ) -> Result<BlockRegion, SlotError> {
        let mut block = lock(self.block_slot(slot)?);
        let path = backing.path.clone();
        let region = block
            .append(backing)
            .map_err(|source| SlotError::Backing { slot, source })?;
        log::info!(
            "block slot {slot}: {} at sector {} ({} sectors); {}",
            path.display(),
            region.start_sector,
            region.sectors,
            block.describe()
        );
        Ok(BlockRegion {
            start_sector: region.start_sector,
            sectors: region.sectors,
        })
    }

    /// Drops the file at `start_sector` from the store in block device `slot`.
    pub fn remove_from_store(&mut self, slot: usize, start_sector: u64) -> Result<(), SlotError> {
        let block = self.block_slot(slot)?;
        let removed = lock(block)
            .remove(start_sector)
            .map_err(|source| SlotError::Backing { slot, source })?;
        log::info!(
            "block slot {slot}: {} removed from sector {start_sector}",
            removed.path.display()
        );
        Ok(())
    }

    fn block_slot(&self, slot: usize) -> Result<&Arc<Mutex<Block>>, SlotError> {
        self.block.get(slot).ok_or(SlotError::NoSuchSlot {
            slot,
            count: self.block.len(),
        })
    }

    fn change_block_slot(
        &mut self,
        slot: usize,
        backing: Option<BlockBacking>,
    ) -> Result<(), SlotError> {
        let block = self.block_slot(slot)?;
        lock(block)
            .set_backing(backing)
            .map_err(|source| SlotError::Backing { slot, source })?;
        log::info!("block slot {slot}: {}", lock(block).describe());
        Ok(())
    }

    pub fn info(&self) -> Vec<DeviceInfo> {
        let mut slot = 0..;
        self.attached
            .iter()
            .map(|a| {
                let t = lock(&a.transport);
                let slot = (a.kind == DeviceKind::Block).then(|| slot.next()).flatten();
                let backing = slot
                    .and_then(|s| self.block.get(s))
                    .map(|b| lock(b).describe());
                DeviceInfo {
                    kind: a.kind,
                    slot: slot.map(|s| s as u32),
                    backing,
                    mmio_base: a.base,
                    irq: a.irq,
                    status: t.status(),
                    queues: t
                        .queues()
                        .iter()
                        .map(|q| QueueInfo {
                            size: q.size(),
                            ready: q.ready(),
                            desc: q.desc_table(),
                            avail: q.avail_ring(),
                            used: q.used_ring(),
                        })
                        .collect(),
                }
            })
            .collect()
    }
}

fn open_tap(net: &NetConfig) -> Result<Tap, TapError> {
    match (&net.tap, net.fd) {
        (Some(name), _) => Tap::open_named(name),
        (None, Some(fd)) => {
            // SAFETY: the parent handed this fd to the VMM to own (--net fd=N); config
            // validation made sure it is the only way the VMM refers to it.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            Tap::from_fd(fd)
        }
        (None, None) => unreachable!("NetConfig::validate requires a tap name or an fd"),
    }
}

/// A locally administered unicast MAC (02:xx:..) when the config names none.
fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    // SAFETY: getrandom writes at most mac.len() bytes into the array.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if n != mac.len() as isize {
        // Without entropy, tell VMs apart by pid; the shim sets MACs anyway.
        mac[2..].copy_from_slice(&std::process::id().to_be_bytes());
    }
    mac[0] = 0x02;
    mac[1] = 0x50; // 'P'
    mac
}

/// What a slot serves, from the config file or the API (`file`: passed open with
/// the request); a disk without an ID has an empty serial.
pub fn backing(
    path: PathBuf,
    read_only: bool,
    id: Option<String>,
    file: Option<PassedFile>,
) -> BlockBacking {
    BlockBacking {
        path,
        read_only,
        id: id.unwrap_or_default(),
        file,
    }
}
