//! Credit-based flow control both ways, and fairness between connections.

use std::os::unix::net::UnixListener;

use super::super::host_port_path;
use super::*;

/// Receives until nothing more comes; returns the data for `g` and the other packets.
fn recv_all(h: &mut Harness, g: &mut GuestConn) -> (Vec<u8>, Vec<Rx>) {
    let mut data = Vec::new();
    let mut other = Vec::new();
    loop {
        let got = h.recv();
        if got.is_empty() {
            return (data, other);
        }
        for p in got {
            if p.hdr.op == op::RW {
                g.take(&p);
                data.extend_from_slice(&p.data);
            } else {
                other.push(p);
            }
        }
    }
}

#[test]
fn host_to_guest_stops_at_the_guests_credit_and_resumes() {
    const WINDOW: u32 = 10_000;
    let memory = memory();
    let mut h = Harness::new(&memory);
    let mut host = connect(h.uds());
    writeln!(host, "CONNECT 77").unwrap();
    let req = h.expect_one();
    let mut g = GuestConn::new(77, req.hdr.src_port);
    g.buf_alloc = WINDOW;
    h.send(g.hdr(op::RESPONSE), &[]);
    assert_eq!(read_line(&mut host), format!("OK {}\n", g.host_port));

    let sent = pattern(3 * WINDOW as usize, 5);
    host.write_all(&sent).unwrap();
    let mut received = Vec::new();
    for round in 0..3 {
        let (data, other) = recv_all(&mut h, &mut g);
        assert_eq!(
            data.len(),
            WINDOW as usize,
            "round {round}: exactly one window"
        );
        received.extend(data);
        if round < 2 {
            assert_eq!(other.len(), 1, "round {round}: {other:?}");
            assert_eq!(other[0].hdr.op, op::CREDIT_REQUEST);
        }
        // The guest's application read it all: tell the host.
        h.send(g.hdr(op::CREDIT_UPDATE), &[]);
    }
    assert!(received == sent);
}

#[test]
fn guest_to_host_beyond_our_buffer_is_buffered_and_credited() {
    let memory = memory();
    let mut h = Harness::new(&memory);
    let listener = UnixListener::bind(host_port_path(h.uds(), 6000)).unwrap();
    let mut g = GuestConn::new(3333, 6000);
    h.send(g.hdr(op::REQUEST), &[]);
    g.take(&h.expect_one());
    let (mut host, _) = listener.accept().unwrap();

    let data = pattern(2 * BUF_ALLOC as usize + 12_345, 6);
    let mut delivered = Vec::new();
    let mut sent = h.send_data(&mut g, &data);
    assert_eq!(
        sent, BUF_ALLOC as usize,
        "a full window while the host reads nothing"
    );
    assert!(
        h.vsock.backend().buffered_bytes() > 0,
        "the socket alone cannot hold it"
    );
    assert_eq!(g.credit(), 0);
    let mut updates = 0;
    wait_until(&mut h, |h| {
        delivered.extend(drain(&mut host));
        for p in h.recv() {
            assert_eq!(p.hdr.op, op::CREDIT_UPDATE, "{p:?}");
            g.take(&p);
            updates += 1;
        }
        sent += h.send_data(&mut g, &data[sent..]);
        delivered.len() == data.len()
    });
    assert!(delivered == data, "byte-exact, nothing lost");
    assert!(updates >= 2, "credit came back in updates");
    assert_eq!(h.vsock.backend().buffered_bytes(), 0);
}

#[test]
fn a_guest_overrunning_its_credit_is_reset() {
    let memory = memory();
    let mut h = Harness::new(&memory);
    let listener = UnixListener::bind(host_port_path(h.uds(), 6000)).unwrap();
    let g = GuestConn::new(3333, 6000);
    h.send(g.hdr(op::REQUEST), &[]);
    assert_eq!(h.expect_one().hdr.op, op::RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    let chunk = pattern(64 << 10, 7);
    for _ in 0..16 {
        h.send(g.hdr(op::RW), &chunk);
        if h.connections() == 0 {
            break;
        }
    }
    assert_eq!(h.connections(), 0);
    assert!(h.recv().iter().any(|p| p.hdr.op == op::RST));
    let _ = drain(&mut host);
    assert!(at_eof(&mut host));
}

#[test]
fn a_credit_request_gets_an_update() {
    let memory = memory();
    let mut h = Harness::new(&memory);
    let (_host, g) = h.host_connect(9);
    h.send(g.hdr(op::RW), b"12345");
    h.send(g.hdr(op::CREDIT_REQUEST), &[]);
    let p = h.expect_one();
    assert_eq!(p.hdr.op, op::CREDIT_UPDATE);
    assert_eq!((p.hdr.buf_alloc, p.hdr.fwd_cnt), (BUF_ALLOC, 5));
}

#[test]
fn connections_take_turns() {
    let memory = memory();
    // A guest short of buffers: it posts them one handful at a time.
    let mut h = Harness::inactive(&memory);
    h.refill.set(false);
    h.activate();
    h.post_rx(1);
    let (mut a_host, a) = h.host_connect(1);
    h.post_rx(1);
    let (mut b_host, b) = h.host_connect(2);
    a_host.write_all(&pattern(40_000, 1)).unwrap();
    b_host.write_all(&pattern(40_000, 2)).unwrap();
    assert!(h.recv().is_empty());
    h.post_rx(4);
    h.vsock.process_rx();
    let got = h.recv();
    assert_eq!(got.len(), 4);
    let from_a = got.iter().filter(|p| a.owns(p)).count();
    let from_b = got.iter().filter(|p| b.owns(p)).count();
    assert_eq!((from_a, from_b), (2, 2), "neither starves the other");
}

/// Whether the backend's fd would wake the event loop now.
fn backend_wakes(h: &Harness) -> bool {
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
    let fd = h.vsock.backend().poll_fd();
    let epoll = Epoll::new().unwrap();
    epoll
        .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0))
        .unwrap();
    let mut events = [EpollEvent::default(); 1];
    epoll.wait(0, &mut events).unwrap() > 0
}

#[test]
fn waiting_connections_do_not_spin_the_event_loop() {
    let memory = memory();
    let mut h = Harness::inactive(&memory);
    h.refill.set(false);
    h.activate();
    // One connection waits for RX buffers, one for credit; both hosts hang up.
    h.post_rx(1);
    let (mut no_buffers, _) = h.host_connect(1);
    h.post_rx(1);
    let mut host = connect(h.uds());
    writeln!(host, "CONNECT 2").unwrap();
    let req = h.expect_one();
    let mut g = GuestConn::new(2, req.hdr.src_port);
    g.buf_alloc = 100;
    h.send(g.hdr(op::RESPONSE), &[]);
    assert_eq!(read_line(&mut host), format!("OK {}\n", g.host_port));
    h.post_rx(2);
    host.write_all(&[1; 1000]).unwrap();
    let got = h.recv();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(
        (got[0].data.len(), got[1].hdr.op),
        (100, op::CREDIT_REQUEST)
    );

    no_buffers.write_all(b"data").unwrap();
    h.pump();
    drop(no_buffers);
    drop(host);
    h.pump();
    assert!(!backend_wakes(&h), "nothing the backend can act on");
    assert_eq!(h.connections(), 2);
}

#[test]
fn header_only_rx_buffers_carry_control_packets_not_a_false_eof() {
    let memory = memory();
    let mut h = Harness::inactive(&memory);
    h.refill.set(false);
    h.activate();
    h.post_rx(1);
    let (mut host, mut g) = h.host_connect(3);
    host.write_all(b"abc").unwrap();
    h.pump();
    // Room for a header and nothing else: no data fits, and nothing else waits.
    h.post_rx_sized(HDR_SIZE as u32);
    h.post_rx(1);
    h.vsock.process_rx();
    let got = h.recv();
    assert_eq!(h.empty_rx.get(), 1, "the tiny buffer came back unused");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0].hdr.op, got[0].data.as_slice()),
        (op::RW, &b"abc"[..])
    );
    g.take(&got[0]);
    assert_eq!(h.connections(), 1);

    // A control packet fits one, though.
    h.send(g.hdr(op::CREDIT_REQUEST), &[]);
    h.post_rx_sized(HDR_SIZE as u32);
    h.vsock.process_rx();
    assert_eq!(h.expect_one().hdr.op, op::CREDIT_UPDATE);
    assert!(nothing_to_read(&mut host), "the stream is still open");
}
