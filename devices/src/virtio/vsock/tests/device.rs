//! The device alone, with a scripted backend: queue handling and packet checks.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::super::packet::{PacketHeader, HDR_SIZE};
use super::super::{op, Vsock, VsockBackend, VsockError, HOST_CID, MAX_PKT_PAYLOAD, TYPE_STREAM};
use crate::virtio::test_utils::*;
use crate::virtio::{ActivateError, VirtioDevice, TYPE_VSOCK};

const CID: u64 = 3;
const RX_BASE: u64 = DATA_START;
const TX_BASE: u64 = DATA_START + 0x10_0000;
const EV_BASE: u64 = DATA_START + 0x20_0000;

/// Records what the device hands it and replays scripted packets for the guest.
struct TestBackend {
    sent: Vec<(PacketHeader, Vec<u8>)>,
    to_guest: VecDeque<(PacketHeader, Vec<u8>)>,
    /// The sizes of the buffers `recv_pkt` was given.
    offered: Vec<usize>,
    wake: EventFd,
}

impl VsockBackend for TestBackend {
    fn start(&mut self) {}
    fn send_pkt(&mut self, hdr: &PacketHeader, data: &[u8]) {
        self.sent.push((*hdr, data.to_vec()));
    }
    fn has_pending_rx(&self) -> bool {
        !self.to_guest.is_empty()
    }
    fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<PacketHeader> {
        self.offered.push(buf.len());
        let (hdr, data) = self.to_guest.pop_front()?;
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        Some(PacketHeader {
            len: n as u32,
            ..hdr
        })
    }
    fn poll_fd(&self) -> std::os::fd::RawFd {
        self.wake.as_raw_fd()
    }
    fn process_events(&mut self) {}
}

fn backend() -> TestBackend {
    TestBackend {
        sent: Vec::new(),
        to_guest: VecDeque::new(),
        offered: Vec::new(),
        wake: EventFd::new(EFD_NONBLOCK).unwrap(),
    }
}

struct Rig<'m> {
    memory: &'m GuestMemoryMmap,
    rx: TestQueue<'m>,
    tx: TestQueue<'m>,
    ev: TestQueue<'m>,
    dev: Vsock<TestBackend>,
}

fn rig(memory: &GuestMemoryMmap) -> Rig<'_> {
    let rx = TestQueue::new(memory, 0, 16);
    let tx = TestQueue::new(memory, 0x1_0000, 16);
    let ev = TestQueue::new(memory, 0x2_0000, 16);
    let mut dev = Vsock::with_backend(CID, backend(), interrupt()).unwrap();
    let (activation, _kicks) = activation(memory, 0, vec![rx.queue(), tx.queue(), ev.queue()]);
    dev.activate(activation).unwrap();
    Rig {
        memory,
        rx,
        tx,
        ev,
        dev,
    }
}

fn guest_hdr(op: u16, len: u32) -> PacketHeader {
    PacketHeader {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: 1000,
        dst_port: 2000,
        len,
        type_: TYPE_STREAM,
        op,
        ..PacketHeader::default()
    }
}

impl Rig<'_> {
    /// Writes `hdr` then `data` at `addr`; returns the bytes written.
    fn put(&self, addr: u64, hdr: &PacketHeader, data: &[u8]) -> u32 {
        fill(self.memory, addr, &hdr.to_bytes());
        fill(self.memory, addr + HDR_SIZE as u64, data);
        (HDR_SIZE + data.len()) as u32
    }

    /// The packet the device wrote into RX used element `i` (at RX_BASE + i * 4 KiB).
    fn rx_packet(&self, i: u16) -> (PacketHeader, Vec<u8>) {
        let (_, len) = self.rx.used(i);
        assert!(
            len as usize >= HDR_SIZE,
            "used element {i} holds {len} bytes"
        );
        let addr = RX_BASE + u64::from(i) * 0x1000;
        let raw = read(self.memory, addr, len as usize);
        let hdr = PacketHeader::from_bytes(raw[..HDR_SIZE].try_into().unwrap());
        assert_eq!(hdr.len as usize, len as usize - HDR_SIZE);
        (hdr, raw[HDR_SIZE..].to_vec())
    }

    fn post_rx(&self, n: u16) {
        for i in 0..n {
            let head = self
                .rx
                .add_chain(&[writable(RX_BASE + u64::from(i) * 0x1000, 0x1000)]);
            assert_eq!(head, i, "rx_packet assumes one slot per head");
        }
    }
}

#[test]
fn identifies_as_vsock_with_its_cid_in_config() {
    let dev = Vsock::with_backend(0x8765_4321, backend(), interrupt()).unwrap();
    assert_eq!(dev.device_type(), TYPE_VSOCK);
    assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(dev.features(), 0);
    let mut cfg = [0xffu8; 8];
    dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 0x8765_4321);
    let mut byte = [0u8; 1];
    dev.read_config(1, &mut byte);
    assert_eq!(byte, [0x43]);
    let mut past = [0xffu8; 4];
    dev.read_config(8, &mut past);
    assert_eq!(past, [0; 4]);
}

#[test]
fn reserved_cids_are_refused() {
    for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 32] {
        assert!(matches!(
            Vsock::with_backend(cid, backend(), interrupt()),
            Err(VsockError::ReservedCid(c)) if c == cid
        ));
    }
}

#[test]
fn activation_needs_three_queues() {
    let memory = memory();
    let q = TestQueue::new(&memory, 0, 16);
    let mut dev = Vsock::with_backend(CID, backend(), interrupt()).unwrap();
    let (activation, _kicks) = activation(&memory, 0, vec![q.queue()]);
    assert!(matches!(
        dev.activate(activation),
        Err(ActivateError::QueueCount { got: 1, wanted: 3 })
    ));
    assert!(!dev.is_activated());
    dev.process_tx(); // inert, no panic
}

#[test]
fn tx_packets_reach_the_backend_with_their_payload() {
    let memory = memory();
    let mut r = rig(&memory);
    r.put(TX_BASE, &guest_hdr(op::RW, 5), b"hello");
    // Header and payload in separate descriptors, as Linux sends them.
    r.tx.add_chain(&[readable(TX_BASE, 44), readable(TX_BASE + 44, 5)]);
    r.dev.process_tx();
    assert_eq!(r.tx.used_idx(), 1);
    assert_eq!(r.tx.used(0).1, 0, "TX buffers are only read");
    assert_eq!(
        r.dev.backend().sent,
        vec![(guest_hdr(op::RW, 5), b"hello".to_vec())]
    );
    assert!(interrupted(r.dev.interrupt()));
}

#[test]
fn hostile_tx_packets_fail_alone_and_get_resets_where_addressable() {
    let memory = memory();
    let mut r = rig(&memory);
    r.post_rx(8);
    let good = guest_hdr(op::RW, 3);
    let a = |i: u64| TX_BASE + i * 0x1_0000;
    // 0: header short by one byte.
    r.put(a(0), &good, b"abc");
    r.tx.add_chain(&[readable(a(0), 43)]);
    // 1: header in a device-writable descriptor.
    r.tx.add_chain(&[writable(a(0), 47)]);
    // 2: len larger than the buffer.
    let n = r.put(a(2), &guest_hdr(op::RW, 100), b"abc");
    r.tx.add_chain(&[readable(a(2), n)]);
    // 3: someone else's source CID: dropped without a reply.
    let spoofed = PacketHeader { src_cid: 4, ..good };
    let n = r.put(a(3), &spoofed, b"abc");
    r.tx.add_chain(&[readable(a(3), n)]);
    // 4: a descriptor loop.
    r.tx.add_loop(a(0), false);
    // 5: a chain running past guest memory.
    r.tx.add_chain(&[readable(a(0), 44), readable(MEM_SIZE as u64 - 4, 64)]);
    // 6: oversize payload.
    let huge = guest_hdr(op::RW, MAX_PKT_PAYLOAD + 1);
    r.put(a(6), &huge, &[]);
    r.tx.add_chain(&[readable(a(6), 44), readable(a(7), MAX_PKT_PAYLOAD + 1)]);
    // 7: a next index past the table.
    r.tx.add_bad_next(a(0));
    // 8: to another guest.
    let n = r.put(a(8), &PacketHeader { dst_cid: 5, ..good }, b"abc");
    r.tx.add_chain(&[readable(a(8), n)]);
    // 9: and a good one after them all.
    let n = r.put(a(9), &good, b"xyz");
    r.tx.add_chain(&[readable(a(9), n)]);
    r.dev.process_tx();

    assert_eq!(r.tx.used_idx(), 10, "every chain went back to the driver");
    assert_eq!(r.dev.backend().sent, vec![(good, b"xyz".to_vec())]);
    assert!(!r.dev.interrupt().needs_reset());
    // Resets for 2, 6 and 8, in order; none for the rest.
    assert_eq!(r.rx.used_idx(), 3);
    let resets: Vec<PacketHeader> = (0..3).map(|i| r.rx_packet(i).0).collect();
    for rst in &resets {
        assert_eq!((rst.op, rst.dst_cid, rst.dst_port), (op::RST, CID, 1000));
    }
    assert_eq!(resets[0].src_cid, HOST_CID);
    assert_eq!(
        resets[2].src_cid, 5,
        "the reset comes from where the packet went"
    );
}

#[test]
fn rx_packets_wait_for_buffers_and_skip_bad_ones() {
    let memory = memory();
    let mut r = rig(&memory);
    let hdr = PacketHeader {
        op: op::RW,
        ..guest_hdr(op::RW, 0).reset_reply()
    };
    r.dev.backend.to_guest.push_back((hdr, b"first".to_vec()));
    r.dev.backend.to_guest.push_back((hdr, vec![7; 6000]));
    r.dev.process_rx();
    assert_eq!(r.rx.used_idx(), 0, "no buffers, nothing sent, nothing lost");
    assert_eq!(r.dev.backend().to_guest.len(), 2);

    r.rx.add_chain(&[readable(RX_BASE, 0x1000)]); // wrong direction
    r.rx.add_chain(&[writable(RX_BASE + 0x1000, 43)]); // cannot hold a header
    r.rx.add_chain(&[writable(MEM_SIZE as u64 - 8, 0x1000)]); // past memory
    r.rx.add_chain(&[writable(RX_BASE + 0x3000, 0x1000)]);
    r.rx.add_chain(&[writable(RX_BASE + 0x4000, 0x1000)]);
    r.dev.process_rx();
    assert_eq!(r.rx.used_idx(), 5);
    for i in 0..3 {
        assert_eq!(r.rx.used(i).1, 0, "bad buffer {i} returned empty");
    }
    let (h, data) = r.rx_packet(3);
    assert_eq!((h.op, h.len, data.as_slice()), (op::RW, 5, &b"first"[..]));
    // The second packet is cut to what its buffer holds.
    let (h, data) = r.rx_packet(4);
    assert_eq!(h.len as usize, 0x1000 - HDR_SIZE);
    assert!(data.iter().all(|&b| b == 7));
    assert_eq!(r.dev.backend().offered, vec![0x1000 - HDR_SIZE; 2]);
    assert!(interrupted(r.dev.interrupt()));
}

#[test]
fn payload_room_is_capped_at_the_packet_limit() {
    let memory = memory();
    let mut r = rig(&memory);
    r.dev
        .backend
        .to_guest
        .push_back((guest_hdr(op::RW, 0), vec![1; 10]));
    r.rx.add_chain(&[writable(RX_BASE, 1 << 20)]);
    r.dev.process_rx();
    assert_eq!(r.dev.backend().offered, vec![MAX_PKT_PAYLOAD as usize]);
    assert_eq!(r.rx.used(0).1 as usize, HDR_SIZE + 10);
}

#[test]
fn the_event_queue_keeps_its_buffers() {
    let memory = memory();
    let mut r = rig(&memory);
    r.ev.add_chain(&[writable(EV_BASE, 8)]);
    r.dev.process_tx();
    r.dev.process_rx();
    r.dev.process_backend();
    assert_eq!(r.ev.used_idx(), 0);
}

#[test]
fn scribbled_rings_stop_the_device() {
    let memory = memory();
    let mut r = rig(&memory);
    r.tx.set_avail_idx(1000);
    r.dev.process_tx();
    assert!(r.dev.interrupt().needs_reset());
    let n = r.put(TX_BASE, &guest_hdr(op::RW, 0), &[]);
    r.tx.add_chain(&[readable(TX_BASE, n)]);
    r.dev.process_tx(); // ignored
    assert!(r.dev.backend().sent.is_empty());

    let mut r = rig(&memory);
    r.dev
        .backend
        .to_guest
        .push_back((guest_hdr(op::RW, 0), vec![]));
    r.rx.set_avail_idx(40);
    r.dev.process_rx();
    assert!(r.dev.interrupt().needs_reset());
    assert_eq!(r.rx.used_idx(), 0);
}

#[test]
fn a_transport_reset_is_an_event_the_guest_gets() {
    let memory = memory();
    let inactive = Vsock::with_backend(CID, backend(), interrupt());
    assert!(
        !inactive.unwrap().reset_transport(),
        "not running: nothing sent"
    );

    let mut rig = rig(&memory);
    assert!(!rig.dev.reset_transport(), "no event buffer yet");
    fill(&memory, EV_BASE, &[0xff; 8]);
    let head = rig.ev.add_chain(&[writable(EV_BASE, 8)]);
    let _ = rig.dev.interrupt().irqfd().read();
    assert!(rig.dev.reset_transport());
    assert_eq!(rig.ev.used(0), (u32::from(head), 4));
    assert_eq!(
        read(&memory, EV_BASE, 4),
        [0; 4],
        "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET"
    );
    assert!(interrupted(rig.dev.interrupt()));
    assert!(!rig.dev.reset_transport(), "its one buffer is used");

    // A buffer too small for the event comes back empty.
    let head = rig.ev.add_chain(&[writable(EV_BASE, 2)]);
    assert!(!rig.dev.reset_transport());
    assert_eq!(rig.ev.used(1), (u32::from(head), 0));
}
