use super::*;

#[test]
fn a_transmitted_frame_reaches_the_tap_byte_exact_in_one_write() {
    let memory = memory();
    let mut h = harness(&memory, guest_features());
    let p = packet(HDR_LEN + 1500, 7);
    // Header alone, then the frame split unevenly, as Linux's driver lays it out.
    fill(&memory, DATA_START, &p[..HDR_LEN]);
    fill(&memory, DATA_START + 0x1000, &p[HDR_LEN..HDR_LEN + 100]);
    fill(&memory, DATA_START + 0x3000, &p[HDR_LEN + 100..]);
    let head = h.tx.add_chain(&[
        readable(DATA_START, HDR_LEN as u32),
        readable(DATA_START + 0x1000, 100),
        readable(DATA_START + 0x3000, 1400),
    ]);
    h.net.process_tx();
    assert_eq!(received(&h.peer), vec![p]);
    assert_eq!(h.tx.used_idx(), 1);
    assert_eq!(h.tx.used(0), (u32::from(head), 0));
    assert!(interrupted(h.net.interrupt()));
    let stats = h.net.stats();
    assert_eq!((stats.tx_frames, stats.tx_bytes), (1, 1500));
}

#[test]
fn the_largest_segmentation_offload_frame_goes_through_and_one_byte_more_does_not() {
    let memory = memory();
    let mut h = harness(&memory, guest_features());
    let p = packet(MAX_PACKET_LEN, 3);
    fill(&memory, DATA_START, &p);
    h.tx.add_chain(&[
        readable(DATA_START, 40_000),
        readable(DATA_START + 40_000, (MAX_PACKET_LEN - 40_000) as u32),
    ]);
    h.tx.add_chain(&[readable(DATA_START, MAX_PACKET_LEN as u32 + 1)]);
    h.net.process_tx();
    assert_eq!(received(&h.peer), vec![p]);
    assert_eq!(h.tx.used_idx(), 2);
    assert_eq!(h.net.stats().tx_bad_chains, 1);
    assert_eq!(h.net.stats().tx_bytes, MAX_FRAME_LEN as u64);
}

#[test]
fn hostile_transmit_chains_fail_only_their_request() {
    let memory = memory();
    let mut h = harness(&memory, guest_features());
    let good = packet(HDR_LEN + 64, 9);
    fill(&memory, DATA_START + 0x8000, &good);
    h.tx.add_loop(DATA_START, false);
    h.tx.add_chain(&[readable(MEM_SIZE as u64 - 8, 64)]); // runs past guest memory
    h.tx.add_chain(&[readable(DATA_START, 0)]); // zero length
    h.tx.add_chain(&[readable(DATA_START, HDR_LEN as u32 - 1)]); // shorter than a header
    h.tx.add_chain(&[readable(DATA_START, u32::MAX)]); // oversize
    h.tx.add_chain(&[readable(DATA_START, 64), writable(DATA_START, 64)]); // wrong direction
    h.tx.add_chain(&[writable(DATA_START, 64), readable(DATA_START, 64)]); // misordered
    h.tx.add_bad_next(DATA_START);
    h.tx.add_chain(&[readable(DATA_START + 0x8000, good.len() as u32)]);
    h.net.process_tx();
    assert_eq!(h.tx.used_idx(), 9, "every chain is returned to the driver");
    assert_eq!(
        received(&h.peer),
        vec![good],
        "only the good frame went out"
    );
    assert_eq!(h.net.stats().tx_bad_chains, 8);
    assert_eq!(h.net.stats().tx_frames, 1);
    assert!(!h.net.interrupt().needs_reset());
}

#[test]
fn a_full_tap_drops_frames_and_keeps_the_ring_moving() {
    let memory = memory();
    let mut h = harness(&memory, guest_features());
    fill(&memory, DATA_START, &packet(HDR_LEN + 1000, 1));
    // Nobody reads the peer: its queue fills and sends fail with EAGAIN.
    let n = 200;
    for _ in 0..n {
        h.tx.add_chain(&[readable(DATA_START, HDR_LEN as u32 + 1000)]);
    }
    h.net.process_tx();
    let stats = h.net.stats();
    assert_eq!(h.tx.used_idx(), n);
    assert!(stats.tx_dropped > 0, "the socket never filled: {stats:?}");
    assert_eq!(stats.tx_frames + stats.tx_dropped, u64::from(n));
    assert_eq!(received(&h.peer).len() as u64, stats.tx_frames);
    assert!(!h.net.interrupt().needs_reset());
}
