//! A synthetic virtio driver for unit tests: guest memory, rings laid out the way a
//! driver would, and chains built from explicit descriptors, hostile ones included.

#![allow(dead_code)] // each device test uses part of the driver

use std::cell::Cell;
use std::sync::Arc;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Activation, Interrupt};

pub const MEM_SIZE: usize = 16 << 20;
/// Where test buffers start: well above the rings `TestQueue` places at 0..1 MiB.
pub const DATA_START: u64 = 0x10_0000;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

pub fn interrupt() -> Arc<Interrupt> {
    Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()))
}

/// Whether the interrupt fired since the last call.
pub fn interrupted(interrupt: &Interrupt) -> bool {
    interrupt.irqfd().read().is_ok()
}

/// One descriptor as a driver writes it.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// A device-readable buffer.
pub fn readable(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        writable: false,
    }
}

/// A device-writable buffer.
pub fn writable(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        writable: true,
    }
}

/// The driver side of one split queue, laid out as virtio 1.2 section 2.7 says:
/// descriptor table, then the available ring, then the used ring (4-aligned).
pub struct TestQueue<'a> {
    memory: &'a GuestMemoryMmap,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: Cell<u16>,
    size: u16,
}

impl<'a> TestQueue<'a> {
    /// Rings at `base`; queues of one test need bases at least 64 KiB apart.
    pub fn new(memory: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        let avail = base + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        Self {
            memory,
            desc: base,
            avail,
            used,
            next_desc: Cell::new(0),
            size,
        }
    }

    /// The device-side queue, as the transport would configure it.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_ready(true);
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.used))
            .unwrap();
        q
    }

    /// Makes a chain of `descs` available; returns its head index.
    pub fn add_chain(&self, descs: &[Desc]) -> u16 {
        let head = self.next_desc.get();
        for (i, d) in descs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let last = i + 1 == descs.len();
            let mut flags = if d.writable { VRING_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT;
            }
            self.write_desc(index, d.addr, d.len, flags, (index + 1) % self.size);
        }
        self.next_desc.set((head + descs.len() as u16) % self.size);
        self.make_available(head);
        head
    }

    /// Two descriptors that name each other as next: a loop.
    pub fn add_loop(&self, addr: u64, writable: bool) -> u16 {
        let head = self.next_desc.get();
        let second = (head + 1) % self.size;
        let flags = VRING_DESC_F_NEXT | if writable { VRING_DESC_F_WRITE } else { 0 };
        self.write_desc(head, addr, 16, flags, second);
        self.write_desc(second, addr, 16, flags, head);
        self.next_desc.set((head + 2) % self.size);
        self.make_available(head);
        head
    }

    /// A chain whose head names a descriptor past the table.
    pub fn add_bad_next(&self, addr: u64) -> u16 {
        let head = self.next_desc.get();
        self.write_desc(head, addr, 16, VRING_DESC_F_NEXT, self.size + 5);
        self.next_desc.set((head + 1) % self.size);
        self.make_available(head);
        head
    }

    fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let raw = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        self.memory
            .write_obj(raw, GuestAddress(self.desc + 16 * u64::from(index)))
            .unwrap();
    }

    /// Puts `head` in the available ring and publishes it.
    pub fn make_available(&self, head: u16) {
        let idx = self.avail_idx();
        let slot = self.avail + 4 + 2 * u64::from(idx % self.size);
        self.memory
            .write_obj(head.to_le(), GuestAddress(slot))
            .unwrap();
        self.set_avail_idx(idx.wrapping_add(1));
    }

    pub fn avail_idx(&self) -> u16 {
        u16::from_le(self.memory.read_obj(GuestAddress(self.avail + 2)).unwrap())
    }

    /// Sets the available index to `idx` (a driver that scribbles on its ring).
    pub fn set_avail_idx(&self, idx: u16) {
        self.memory
            .write_obj(idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
    }

    pub fn used_idx(&self) -> u16 {
        u16::from_le(self.memory.read_obj(GuestAddress(self.used + 2)).unwrap())
    }

    /// The used element `i`: (head index, bytes written by the device).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let elem = self.used + 4 + 8 * u64::from(i % self.size);
        let id: u32 = self.memory.read_obj(GuestAddress(elem)).unwrap();
        let len: u32 = self.memory.read_obj(GuestAddress(elem + 4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    }
}

/// An activation with fresh kick eventfds; returns it with the kicks' write ends.
pub fn activation(
    memory: &GuestMemoryMmap,
    features: u64,
    queues: Vec<Queue>,
) -> (Activation, Vec<EventFd>) {
    let kicks: Vec<EventFd> = queues
        .iter()
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let clones = kicks.iter().map(|k| k.try_clone().unwrap()).collect();
    (
        Activation {
            memory: memory.clone(),
            features,
            queues,
            kicks: clones,
        },
        kicks,
    )
}

pub fn fill(memory: &GuestMemoryMmap, addr: u64, data: &[u8]) {
    memory.write_slice(data, GuestAddress(addr)).unwrap();
}

pub fn read(memory: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    memory.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}
