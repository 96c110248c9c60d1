//! Fuzz cases for what the guest controls (the targets are in `vmm/fuzz/`): each takes
//! the fuzzer's bytes as the guest's memory, rings, descriptors and buffers alike (the
//! way a hostile driver would lay them out), and lets a device serve its queues from
//! it. A case may fail every request; it must never panic, hang or touch memory outside
//! the guest's. The unit tests run each case on a few fixed inputs.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::block::{Block, BlockBacking, PassedFile};
use super::net::fake_tap::FakeTap;
use super::net::Net;
use super::test_utils::{activation, interrupt, TestQueue};
use super::vsock::{PacketHeader, Vsock, VsockBackend, VsockMuxer};
use super::{MmioTransport, VirtioDevice};
use crate::BusDevice;

/// Guest RAM of a case: the input is copied to its start.
const GUEST_BYTES: usize = 1 << 20;
const QUEUE_SIZE: u16 = 16;
/// Queue `i`'s rings start at `i * QUEUE_STRIDE`.
const QUEUE_STRIDE: u64 = 0x1000;
/// Where the net case's frame for the guest comes from in the input.
const RX_FRAME_AT: usize = 0x4000;
const GUEST_CID: u64 = 3;

/// Guest memory holding `data` from address 0.
fn guest(data: &[u8]) -> GuestMemoryMmap {
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), GUEST_BYTES)])
        .expect("map fuzz guest memory");
    let n = data.len().min(GUEST_BYTES);
    memory
        .write_slice(&data[..n], GuestAddress(0))
        .expect("the input fits");
    memory
}

/// The device's `n` queues, configured as a driver would, rings wherever the input put
/// them: their contents are the input's.
fn queues(memory: &GuestMemoryMmap, n: usize) -> Vec<Queue> {
    (0..n as u64)
        .map(|i| TestQueue::new(memory, i * QUEUE_STRIDE, QUEUE_SIZE).queue())
        .collect()
}

/// Activates `device` with every feature it offers (the most code to reach).
fn activate(device: &mut dyn VirtioDevice, memory: &GuestMemoryMmap, n: usize) -> bool {
    let features = device.features();
    let (act, _kicks) = activation(memory, features, queues(memory, n));
    device.activate(act).is_ok()
}

/// A 64 KiB disk in a memfd, passed to the device as an open file (as a jailed VMM
/// gets its disks); nothing is left on disk.
fn disk() -> BlockBacking {
    static DISK: OnceLock<OwnedFd> = OnceLock::new();
    let fd = DISK.get_or_init(|| {
        // SAFETY: memfd_create with a NUL-terminated name; the fd is checked and owned.
        let fd = unsafe { libc::memfd_create(c"peapod-fuzz-disk".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: fd was just returned by memfd_create and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on the memfd we own.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 64 << 10) }, 0);
        fd
    });
    let file = fd.try_clone().expect("duplicating the fuzz disk's memfd");
    BlockBacking {
        path: PathBuf::from("fuzz-disk"),
        read_only: false,
        id: "fuzz".into(),
        file: Some(PassedFile(Arc::new(File::from(file)))),
    }
}

/// virtio-blk: the guest's request queue.
pub fn block_queue(data: &[u8]) {
    let memory = guest(data);
    let mut block = Block::new(Some(disk()), interrupt()).expect("open the fuzz disk");
    if activate(&mut block, &memory, 1) {
        block.process_queue();
    }
}

/// virtio-net: what the guest transmits, and a frame from the host (the input's bytes
/// at `RX_FRAME_AT`) into the buffers it posted.
pub fn net_queues(data: &[u8]) {
    let memory = guest(data);
    let (ours, peer) = UnixDatagram::pair().expect("socket pair");
    ours.set_nonblocking(true).expect("non-blocking");
    peer.set_nonblocking(true).expect("non-blocking");
    let mac = [0x02, 0x50, 0x45, 0x41, 0x50, 0x01];
    let tap = FakeTap {
        sock: ours,
        offload: Arc::default(),
    };
    let mut net = Net::with_backend(Box::new(tap), mac, interrupt()).expect("net");
    if let Some(frame) = data.get(RX_FRAME_AT..) {
        let _ = peer.send(&frame[..frame.len().min(1600)]);
    }
    if activate(&mut net, &memory, 2) {
        net.process_tx();
        net.process_rx();
    }
}

/// The host side's unix socket for the vsock cases; each muxer removes it when dropped.
fn vsock_socket() -> PathBuf {
    std::env::temp_dir().join(format!("peapod-fuzz-{}.sock", std::process::id()))
}

/// virtio-vsock: the TX queue's packets through the real connection muxer, and its
/// answers into the RX queue.
pub fn vsock_queues(data: &[u8]) {
    let memory = guest(data);
    let muxer = VsockMuxer::new(GUEST_CID, vsock_socket()).expect("vsock muxer");
    let mut vsock = Vsock::with_backend(GUEST_CID, muxer, interrupt()).expect("vsock");
    if activate(&mut vsock, &memory, 3) {
        vsock.process_tx();
        vsock.process_backend();
        vsock.process_rx();
    }
}

/// vsock packet headers (and payloads) straight into the muxer, as a sequence: the
/// connection state machine, past the queue's checks. Each record is a 44-byte header
/// and then its payload, up to the header's `len` or the input's end.
pub fn vsock_packets(data: &[u8]) {
    let mut muxer = VsockMuxer::new(GUEST_CID, vsock_socket()).expect("vsock muxer");
    muxer.start();
    let mut rest = data;
    let mut buf = vec![0u8; 64 << 10];
    while let Some((raw, tail)) = rest.split_first_chunk::<{ super::vsock::packet::HDR_SIZE }>() {
        let hdr = PacketHeader::from_bytes(raw);
        let len = (hdr.len as usize).min(tail.len());
        muxer.send_pkt(&hdr, &tail[..len]);
        rest = &tail[len..];
        muxer.process_events();
        while muxer.recv_pkt(&mut buf).is_some() {}
    }
}

/// A block device behind its MMIO transport, driven by register accesses: each record
/// is 7 bytes, `[op, offset lo, offset hi, value (4, little-endian)]`; op bit 0 says
/// write, bits 1-2 the width (1, 2, 4 or 8 bytes). Queue addresses the input sets point
/// into its own bytes, which are guest memory too; a device it activates then serves
/// its queue.
pub fn mmio_registers(data: &[u8]) {
    let memory = guest(data);
    let block: Arc<Mutex<Block>> = Arc::new(Mutex::new(
        Block::new(Some(disk()), interrupt()).expect("open the fuzz disk"),
    ));
    let mut mmio = MmioTransport::new(memory, block.clone()).expect("transport");
    for op in data.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]));
        let width = 1 << ((op[0] >> 1) & 3);
        let mut value = [0u8; 8];
        value[..4].copy_from_slice(&op[3..7]);
        if op[0] & 1 == 1 {
            mmio.write(offset, &value[..width]);
        } else {
            mmio.read(offset, &mut value[..width]);
        }
    }
    crate::lock(&block).process_queue();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs that reach past the first checks: empty, zeros, ones, and a ring whose
    /// available index says there are requests.
    fn seeds() -> Vec<Vec<u8>> {
        let mut ring = vec![0u8; 0x5000];
        // Queue 0: one descriptor at 0x8000 of 16 bytes, made available.
        ring[..8].copy_from_slice(&0x8000u64.to_le_bytes());
        ring[8..12].copy_from_slice(&16u32.to_le_bytes());
        let avail = 16 * usize::from(QUEUE_SIZE);
        ring[avail + 2..avail + 4].copy_from_slice(&1u16.to_le_bytes());
        vec![Vec::new(), vec![0; 0x5000], vec![0xff; 0x5000], ring]
    }

    #[test]
    fn every_case_survives_its_seeds() {
        for seed in seeds() {
            block_queue(&seed);
            net_queues(&seed);
            vsock_queues(&seed);
            vsock_packets(&seed);
            mmio_registers(&seed);
        }
    }
}
