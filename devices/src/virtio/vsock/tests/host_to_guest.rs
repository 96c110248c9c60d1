//! Host processes connecting to the guest through `CONNECT <port>\n`.

use std::collections::HashSet;

use super::*;

#[test]
fn handshake_then_data_both_ways() {
    let memory = memory();
    let mut h = Harness::new(&memory);
    let mut host = connect(h.uds());
    // Data right behind the line must not be swallowed by the handshake.
    host.write_all(b"CONNECT 1024\nearly").unwrap();
    let req = h.expect_one();
    assert_eq!(req.hdr.op, op::REQUEST);
    assert_eq!(req.hdr.dst_port, 1024);
    assert!(req.hdr.src_port >= 1 << 30, "host ports count up from 2^30");
    assert_eq!(req.hdr.buf_alloc, BUF_ALLOC);
    assert!(nothing_to_read(&mut host), "no OK before the guest answers");

    let mut g = GuestConn::new(1024, req.hdr.src_port);
    g.take(&req);
    h.send(g.hdr(op::RESPONSE), &[]);
    assert_eq!(read_line(&mut host), format!("OK {}\n", g.host_port));
    assert_eq!(h.recv_data(&mut g, 5), b"early");

    let to_guest = pattern(100_000, 1);
    host.write_all(&to_guest).unwrap();
    assert!(h.recv_data(&mut g, to_guest.len()) == to_guest);

    let to_host = pattern(150_000, 2);
    assert_eq!(h.send_data(&mut g, &to_host), to_host.len());
    assert!(read_host(&mut h, &mut host, to_host.len()) == to_host);
    assert_eq!(h.connections(), 1);
}

#[test]
fn a_bad_connect_line_closes_only_its_stream() {
    let memory = memory();
    let mut h = Harness::new(&memory);
    let mut garbage = connect(h.uds());
    garbage.write_all(b"HELLO 12\n").unwrap();
    let mut endless = connect(h.uds());
    endless.write_all(&[b'9'; 40]).unwrap();
    let mut no_port = connect(h.uds());
    no_port.write_all(b"CONNECT \n").unwrap();
    let mut good = connect(h.uds());
    good.write_all(b"CONNECT 7\n").unwrap();

    let got = h.recv();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].hdr.op, got[0].hdr.dst_port), (op::REQUEST, 7));
    assert!(at_eof(&mut garbage));
    assert!(at_eof(&mut endless));
    assert!(at_eof(&mut no_port));
    assert!(nothing_to_read(&mut good), "the good stream stays open");
    assert_eq!(h.vsock.backend().handshake_count(), 0);
    assert_eq!(h.connections(), 1);
}

#[test]
fn a_silent_host_stream_times_out() {
    let memory = memory();
    let mut h = Harness::new(&memory);
    h.set_timeouts(quick_timeouts());
    let mut silent = connect(h.uds());
    silent.write_all(b"CONN").unwrap();
    h.pump();
    assert_eq!(h.vsock.backend().handshake_count(), 1);
    wait_until(&mut h, |h| h.vsock.backend().handshake_count() == 0);
    assert!(at_eof(&mut silent));
    assert!(h.recv().is_empty(), "the guest never heard of it");
}

#[test]
fn a_guest_refusal_closes_the_host_stream() {
    let memory = memory();
    let mut h = Harness::new(&memory);
    let mut host = connect(h.uds());
    host.write_all(b"CONNECT 99\n").unwrap();
    let req = h.expect_one();
    let g = GuestConn::new(99, req.hdr.src_port);
    h.send(g.hdr(op::RST), &[]);
    assert!(at_eof(&mut host), "EOF, and no OK line");
    assert_eq!(h.connections(), 0);
    assert!(h.recv().is_empty(), "a reset is not answered");
}

#[test]
fn a_guest_that_never_answers_is_reset() {
    let memory = memory();
    let mut h = Harness::new(&memory);
    h.set_timeouts(quick_timeouts());
    let mut host = connect(h.uds());
    host.write_all(b"CONNECT 99\n").unwrap();
    let req = h.expect_one();
    let mut got = Vec::new();
    wait_until(&mut h, |h| {
        got.extend(h.recv());
        !got.is_empty()
    });
    assert_eq!(got[0].hdr.op, op::RST);
    assert_eq!(
        (got[0].hdr.src_port, got[0].hdr.dst_port),
        (req.hdr.src_port, 99)
    );
    assert!(at_eof(&mut host));
    assert_eq!(h.connections(), 0);
}

#[test]
fn nothing_is_accepted_before_activation() {
    let memory = memory();
    let mut h = Harness::inactive(&memory);
    let mut host = connect(h.uds());
    host.write_all(b"CONNECT 5\n").unwrap();
    h.vsock.backend.process_events();
    h.vsock.process_backend();
    assert_eq!(h.vsock.backend().handshake_count(), 0);
    assert_eq!(h.connections(), 0);
    assert!(
        nothing_to_read(&mut host),
        "the connect waits in the backlog"
    );

    h.activate();
    h.post_rx(1);
    let req = h.expect_one();
    assert_eq!((req.hdr.op, req.hdr.dst_port), (op::REQUEST, 5));
}

#[test]
fn hundreds_of_connections_get_distinct_ports_and_stay_apart() {
    const N: usize = 200;
    let memory = memory();
    let mut h = Harness::new(&memory);
    let mut hosts = Vec::new();
    let mut requests = Vec::new();
    for i in 0..N {
        let mut s = connect(h.uds());
        writeln!(s, "CONNECT {}", 100 + i).unwrap();
        hosts.push(s);
        // Keep the listener's backlog short: a full one blocks connect().
        if i % 16 == 15 {
            requests.extend(h.recv());
        }
    }
    requests.extend(h.recv());
    assert_eq!(requests.len(), N);
    let ports: HashSet<u32> = requests.iter().map(|r| r.hdr.src_port).collect();
    assert_eq!(ports.len(), N, "every connection has its own host port");

    let mut guests: Vec<GuestConn> = Vec::new();
    for (i, s) in hosts.iter_mut().enumerate() {
        let req = requests
            .iter()
            .find(|r| r.hdr.dst_port == (100 + i) as u32)
            .unwrap();
        let mut g = GuestConn::new(req.hdr.dst_port, req.hdr.src_port);
        g.take(req);
        h.send(g.hdr(op::RESPONSE), &[]);
        assert_eq!(read_line(s), format!("OK {}\n", g.host_port));
        s.write_all(&pattern(1000, i as u8)).unwrap();
        guests.push(g);
    }
    assert_eq!(h.connections(), N);

    let mut received: Vec<Vec<u8>> = vec![Vec::new(); N];
    wait_until(&mut h, |h| {
        for p in h.recv() {
            let i = guests.iter().position(|g| g.owns(&p)).unwrap();
            guests[i].take(&p);
            received[i].extend_from_slice(&p.data);
        }
        received.iter().all(|r| r.len() >= 1000)
    });
    for (i, r) in received.iter().enumerate() {
        assert!(
            *r == pattern(1000, i as u8),
            "connection {i} got someone else's bytes"
        );
    }
    for (i, g) in guests.iter_mut().enumerate() {
        h.send_data(g, &pattern(500, !(i as u8)));
    }
    for (i, s) in hosts.iter_mut().enumerate() {
        assert!(read_host(&mut h, s, 500) == pattern(500, !(i as u8)));
    }
}
