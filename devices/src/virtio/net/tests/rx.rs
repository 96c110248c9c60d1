use super::*;

#[test]
fn a_received_frame_lands_in_the_guest_buffers() {
    let memory = memory();
    let mut h = harness(&memory, guest_features());
    let p = packet(HDR_LEN + 1000, 5);
    h.peer.send(&p).unwrap();
    let head = h.rx.add_chain(&[
        writable(DATA_START, 512),
        writable(DATA_START + 0x10000, 2048),
    ]);
    h.net.process_rx();
    assert_eq!(h.rx.used_idx(), 1);
    assert_eq!(h.rx.used(0), (u32::from(head), p.len() as u32));
    let mut got = read(&memory, DATA_START, 512);
    got.extend(read(&memory, DATA_START + 0x10000, p.len() - 512));
    assert_eq!(got, as_received(p));
    assert!(interrupted(h.net.interrupt()));
    assert_eq!(
        h.net.stats(),
        NetStats {
            rx_frames: 1,
            rx_bytes: 1000,
            ..NetStats::default()
        }
    );
    assert!(h.net.wants_backend(), "buffers left or not, nothing waits");
}

#[test]
fn without_buffers_the_frame_waits_for_the_guest() {
    let memory = memory();
    let mut h = harness(&memory, guest_features());
    let (a, b) = (packet(HDR_LEN + 100, 1), packet(HDR_LEN + 200, 2));
    h.peer.send(&a).unwrap();
    h.peer.send(&b).unwrap();
    h.net.process_rx();
    assert_eq!(h.rx.used_idx(), 0);
    assert!(!h.net.wants_backend(), "starved: the tap is not watched");
    assert_eq!(
        used_flags(&memory, &h.rx) & VRING_USED_F_NO_NOTIFY,
        0,
        "the guest is asked to kick"
    );

    h.rx.add_chain(&[writable(DATA_START, 4096)]);
    h.net.process_rx(); // the kick
    assert_eq!(h.rx.used_idx(), 1);
    assert_eq!(read(&memory, DATA_START, a.len()), as_received(a.clone()));
    assert!(!h.net.wants_backend(), "b waits now");

    h.rx.add_chain(&[writable(DATA_START + 0x2000, 4096)]);
    h.rx.add_chain(&[writable(DATA_START + 0x4000, 4096)]);
    h.net.process_rx();
    assert_eq!(h.rx.used_idx(), 2);
    assert_eq!(h.rx.used(1).1, b.len() as u32);
    assert_eq!(read(&memory, DATA_START + 0x2000, b.len()), as_received(b));
    assert!(
        h.net.wants_backend(),
        "a buffer is left: watch the tap again"
    );
    assert_ne!(
        used_flags(&memory, &h.rx) & VRING_USED_F_NO_NOTIFY,
        0,
        "kicks are not needed while buffers last"
    );
    assert_eq!(h.net.stats().rx_dropped, 0, "nothing was lost");
}

#[test]
fn with_event_idx_a_starved_device_asks_for_the_next_buffer() {
    let memory = memory();
    let mut h = harness(&memory, guest_features() | F_RING_EVENT_IDX);
    h.rx.add_chain(&[writable(DATA_START, 4096)]);
    h.rx.add_chain(&[writable(DATA_START + 0x2000, 4096)]);
    for seed in 0..3 {
        h.peer.send(&packet(HDR_LEN + 60, seed)).unwrap();
    }
    h.net.process_rx();
    assert_eq!(h.rx.used_idx(), 2);
    assert!(!h.net.wants_backend());
    assert_eq!(
        avail_event(&memory, &h.rx),
        2,
        "kick me when buffer 2 comes"
    );
    h.rx.add_chain(&[writable(DATA_START + 0x4000, 4096)]);
    h.net.process_rx();
    assert_eq!(h.rx.used_idx(), 3);
    assert_eq!(
        read(&memory, DATA_START + 0x4000, HDR_LEN + 60),
        as_received(packet(HDR_LEN + 60, 2))
    );
}

#[test]
fn a_buffer_too_small_drops_the_frame_not_the_ring() {
    let memory = memory();
    let mut h = harness(&memory, guest_features());
    let (big, zero, small) = (
        packet(HDR_LEN + 1500, 1),
        packet(HDR_LEN + 10, 2),
        packet(HDR_LEN + 60, 3),
    );
    h.peer.send(&big).unwrap();
    h.peer.send(&zero).unwrap();
    h.peer.send(&small).unwrap();
    let h0 = h.rx.add_chain(&[writable(DATA_START, 100)]);
    let h1 = h.rx.add_chain(&[writable(DATA_START + 0x1000, 0)]);
    let h2 = h.rx.add_chain(&[writable(DATA_START + 0x2000, 2000)]);
    h.net.process_rx();
    assert_eq!(h.rx.used_idx(), 3);
    assert_eq!(h.rx.used(0), (u32::from(h0), 0));
    assert_eq!(h.rx.used(1), (u32::from(h1), 0));
    assert_eq!(h.rx.used(2), (u32::from(h2), small.len() as u32));
    assert_eq!(
        read(&memory, DATA_START + 0x2000, small.len()),
        as_received(small)
    );
    assert_eq!(h.net.stats().rx_dropped, 2);
    assert_eq!(h.net.stats().rx_frames, 1);
    assert!(!h.net.interrupt().needs_reset());
}

#[test]
fn hostile_receive_chains_fail_only_their_request_and_the_frame_waits() {
    let memory = memory();
    let mut h = harness(&memory, guest_features());
    let p = packet(HDR_LEN + 300, 4);
    h.peer.send(&p).unwrap();
    h.rx.add_chain(&[readable(DATA_START, 4096)]); // wrong direction
    h.rx.add_chain(&[readable(DATA_START, 16), writable(DATA_START, 4096)]); // wrong direction
    h.rx.add_chain(&[writable(MEM_SIZE as u64 - 8, 4096)]); // runs past guest memory
    h.rx.add_chain(&[writable(DATA_START, u32::MAX)]); // oversize
    h.rx.add_loop(DATA_START, true);
    h.rx.add_chain(&[writable(DATA_START, 16), readable(DATA_START, 16)]); // misordered
    h.rx.add_bad_next(DATA_START);
    let good = h.rx.add_chain(&[writable(DATA_START + 0x8000, 4096)]);
    h.net.process_rx();
    assert_eq!(h.rx.used_idx(), 8, "every chain is returned to the driver");
    for i in 0..7 {
        assert_eq!(h.rx.used(i).1, 0, "hostile chain {i} got no data");
    }
    assert_eq!(h.rx.used(7), (u32::from(good), p.len() as u32));
    assert_eq!(read(&memory, DATA_START + 0x8000, p.len()), as_received(p));
    assert_eq!(h.net.stats().rx_bad_chains, 7);
    assert_eq!(h.net.stats().rx_dropped, 0);
    assert!(!h.net.interrupt().needs_reset());
}

#[test]
fn runts_from_the_backend_are_dropped() {
    let memory = memory();
    let mut h = harness(&memory, guest_features());
    h.peer.send(&[1, 2, 3]).unwrap();
    let p = packet(HDR_LEN + 20, 8);
    h.peer.send(&p).unwrap();
    h.rx.add_chain(&[writable(DATA_START, 4096)]);
    h.net.process_rx();
    assert_eq!(h.rx.used_idx(), 1);
    assert_eq!(h.rx.used(0).1, p.len() as u32);
    assert_eq!(h.net.stats().rx_dropped, 1);
}

/// A backend that always has another frame.
struct Flood(EventFd);

impl Read for Flood {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let p = packet(HDR_LEN + 60, 0);
        buf[..p.len()].copy_from_slice(&p);
        Ok(p.len())
    }
}

impl Write for Flood {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Flood {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl NetBackend for Flood {
    fn name(&self) -> &str {
        "flood0"
    }

    fn set_offload(&mut self, _: libc::c_uint) -> Result<(), TapError> {
        Ok(())
    }
}

#[test]
fn a_flood_is_taken_in_budgets() {
    let memory = memory();
    let rxq = TestQueue::new(&memory, RX_BASE, SIZE);
    let txq = TestQueue::new(&memory, TX_BASE, SIZE);
    let flood = Flood(EventFd::new(0).unwrap());
    let mut net = Net::with_backend(Box::new(flood), MAC, interrupt()).unwrap();
    let (activation, _kicks) =
        activation(&memory, guest_features(), vec![rxq.queue(), txq.queue()]);
    net.activate(activation).unwrap();
    let chains = RX_BUDGET as u16 + 36;
    for i in 0..chains {
        rxq.add_chain(&[writable(DATA_START + u64::from(i) * 0x1000, 4096)]);
    }
    net.process_rx();
    assert_eq!(
        usize::from(rxq.used_idx()),
        RX_BUDGET,
        "one budget per wakeup"
    );
    assert!(
        net.wants_backend(),
        "the tap stays watched: the loop comes back"
    );
    net.process_rx();
    assert_eq!(rxq.used_idx(), chains);
    assert!(!net.wants_backend(), "out of buffers, a frame waits");
    assert_eq!(net.stats().rx_frames, u64::from(chains));
}
