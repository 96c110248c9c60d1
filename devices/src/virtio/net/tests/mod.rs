//! The device driven by the synthetic driver, with a datagram socket pair standing in
//! for the tap (one message per frame, like the tap); `live` adds the event loop and
//! a real tap.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_net::*;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::device::{tun_offload, FEATURES, HDR_LEN, MAX_FRAME_LEN, MAX_PACKET_LEN, RX_BUDGET};
use super::fake_tap::FakeTap;
use super::{Net, NetBackend, NetError, NetStats, Tap, TapError};
use crate::virtio::test_utils::*;
use crate::virtio::{VirtioDevice, F_RING_EVENT_IDX, F_VERSION_1, TYPE_NET};

const MAC: [u8; 6] = [0x02, 0x50, 0x45, 0x41, 0x50, 0x01];
const RX_BASE: u64 = 0;
const TX_BASE: u64 = 0x1_0000;
const SIZE: u16 = 256;
const VRING_USED_F_NO_NOTIFY: u16 = 1;

mod live;
mod rx;
mod tx;

struct Harness<'a> {
    rx: TestQueue<'a>,
    tx: TestQueue<'a>,
    net: Net,
    /// The host side of the fake tap.
    peer: UnixDatagram,
    offload: Arc<Mutex<Option<libc::c_uint>>>,
    /// The kicks' write ends: rx, tx.
    kicks: Vec<EventFd>,
}

fn unactivated(memory: &GuestMemoryMmap) -> Harness<'_> {
    let (sock, peer) = UnixDatagram::pair().unwrap();
    sock.set_nonblocking(true).unwrap();
    peer.set_nonblocking(true).unwrap();
    let offload = Arc::new(Mutex::new(None));
    let backend = FakeTap {
        sock,
        offload: offload.clone(),
    };
    let net = Net::with_backend(Box::new(backend), MAC, interrupt()).unwrap();
    Harness {
        rx: TestQueue::new(memory, RX_BASE, SIZE),
        tx: TestQueue::new(memory, TX_BASE, SIZE),
        net,
        peer,
        offload,
        kicks: Vec::new(),
    }
}

fn harness(memory: &GuestMemoryMmap, features: u64) -> Harness<'_> {
    let mut h = unactivated(memory);
    let event_idx = features & F_RING_EVENT_IDX != 0;
    let mut queues = vec![h.rx.queue(), h.tx.queue()];
    for q in &mut queues {
        q.set_event_idx(event_idx);
    }
    let (activation, kicks) = activation(memory, features, queues);
    h.net.activate(activation).unwrap();
    h.kicks = kicks;
    h
}

fn guest_features() -> u64 {
    F_VERSION_1 | FEATURES
}

/// A header and frame as the tap or the driver would write them; the contents are
/// arbitrary but position-dependent, so a misplaced byte shows.
fn packet(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// What the guest should find for a packet from the tap: the same bytes, with
/// `num_buffers` set to 1.
fn as_received(mut p: Vec<u8>) -> Vec<u8> {
    p[10..12].copy_from_slice(&1u16.to_le_bytes());
    p
}

fn received(peer: &UnixDatagram) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut buf = vec![0u8; MAX_PACKET_LEN + 100];
    while let Ok(n) = peer.recv(&mut buf) {
        frames.push(buf[..n].to_vec());
    }
    frames
}

fn used_flags(memory: &GuestMemoryMmap, q: &TestQueue) -> u16 {
    memory.read_obj(GuestAddress(q.used)).unwrap()
}

fn avail_event(memory: &GuestMemoryMmap, q: &TestQueue) -> u16 {
    memory
        .read_obj(GuestAddress(q.used + 4 + 8 * u64::from(SIZE)))
        .unwrap()
}

#[test]
fn identifies_itself_and_exposes_mac_and_link_status() {
    let memory = memory();
    let h = unactivated(&memory);
    assert_eq!(h.net.device_type(), TYPE_NET);
    assert_eq!(h.net.queue_max_sizes(), &[256, 256]);
    let f = h.net.features();
    for b in [
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_STATUS,
    ] {
        assert_ne!(f & (1 << b), 0, "feature bit {b} offered");
    }
    for b in [
        VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_MQ,
        VIRTIO_NET_F_MRG_RXBUF,
    ] {
        assert_eq!(f & (1 << b), 0, "feature bit {b} not offered");
    }
    let mut config = [0xaau8; 12];
    h.net.read_config(0, &mut config);
    assert_eq!(config[..6], MAC);
    assert_eq!(u16::from_le_bytes([config[6], config[7]]), 1, "LINK_UP");
    assert_eq!(config[8..], [0; 4], "nothing past the status word");
    let mut two = [0u8; 2];
    h.net.read_config(5, &mut two);
    assert_eq!(two, [MAC[5], 1]);
}

#[test]
fn bad_macs_are_refused() {
    for (mac, why) in [
        ([0u8; 6], "all zeros"),
        ([0x01, 0, 0x5e, 0, 0, 1], "multicast"),
    ] {
        let (sock, _peer) = UnixDatagram::pair().unwrap();
        let backend = FakeTap {
            sock,
            offload: Arc::default(),
        };
        let Err(e) = Net::with_backend(Box::new(backend), mac, interrupt()) else {
            panic!("MAC {mac:x?} accepted");
        };
        assert!(matches!(e, NetError::BadMac { .. }));
        let msg = e.to_string();
        assert!(msg.starts_with("virtio-net fake0: MAC "), "{msg}");
        assert!(msg.contains(why), "{msg}");
    }
}

#[test]
fn activation_sets_the_offloads_the_guest_accepted() {
    let memory = memory();
    let h = harness(&memory, guest_features());
    assert_eq!(
        *h.offload.lock().unwrap(),
        Some(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
    );
    let h = harness(&memory, F_VERSION_1 | 1 << VIRTIO_NET_F_MAC);
    assert_eq!(*h.offload.lock().unwrap(), Some(0), "no offloads accepted");
    // TSO without checksum offload is meaningless to the tap (and forbidden).
    assert_eq!(tun_offload(1 << VIRTIO_NET_F_GUEST_TSO4), 0);
    assert_eq!(
        tun_offload(1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO6),
        libc::TUN_F_CSUM | libc::TUN_F_TSO6
    );
}

#[test]
fn activation_needs_two_queues() {
    let memory = memory();
    let mut h = unactivated(&memory);
    let (activation, _kicks) = activation(&memory, guest_features(), vec![h.rx.queue()]);
    let e = h.net.activate(activation).unwrap_err();
    assert!(e.to_string().contains("1 queues"), "{e}");
    assert!(!h.net.is_activated());
}

#[test]
fn a_scribbled_ring_stops_the_device_not_the_vmm() {
    let memory = memory();
    let mut h = harness(&memory, guest_features());
    h.peer.send(&packet(HDR_LEN + 60, 1)).unwrap();
    h.rx.set_avail_idx(1000); // 1000 chains in a 256-entry ring
    h.net.process_rx();
    assert!(h.net.interrupt().needs_reset());
    assert!(
        !h.net.wants_backend(),
        "a stopped device does not watch the tap"
    );
    fill(&memory, DATA_START, &packet(HDR_LEN + 60, 2));
    h.tx.add_chain(&[readable(DATA_START, HDR_LEN as u32 + 60)]);
    h.net.process_tx(); // ignored, no panic
    assert_eq!(h.tx.used_idx(), 0);
    assert!(received(&h.peer).is_empty());

    let mut h = harness(&memory, guest_features());
    h.tx.set_avail_idx(300);
    h.net.process_tx();
    assert!(h.net.interrupt().needs_reset());
}
