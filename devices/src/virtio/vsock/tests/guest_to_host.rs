//! Guest connections to host port P, carried to the listener at `<uds_path>_P`.

use std::os::unix::net::UnixListener;

use super::super::host_port_path;
use super::*;

/// The guest connects from port 3333 to host `port`, where `listener` waits.
fn guest_connect(h: &mut Harness, listener: &UnixListener, port: u32) -> (UnixStream, GuestConn) {
    let mut g = GuestConn::new(3333, port);
    h.send(g.hdr(op::REQUEST), &[]);
    let resp = h.expect_one();
    assert_eq!(resp.hdr.op, op::RESPONSE);
    assert_eq!((resp.hdr.src_port, resp.hdr.dst_port), (port, 3333));
    assert_eq!(resp.hdr.buf_alloc, BUF_ALLOC);
    g.take(&resp);
    let (host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (host, g)
}

#[test]
fn a_guest_connect_reaches_the_listener_and_data_flows() {
    let memory = memory();
    let mut h = Harness::new(&memory);
    let listener = UnixListener::bind(host_port_path(h.uds(), 5000)).unwrap();
    let (mut host, mut g) = guest_connect(&mut h, &listener, 5000);
    assert_eq!(h.connections(), 1);

    let up = pattern(70_000, 3);
    assert_eq!(h.send_data(&mut g, &up), up.len());
    assert!(read_host(&mut h, &mut host, up.len()) == up);

    let down = pattern(50_000, 4);
    host.write_all(&down).unwrap();
    assert!(h.recv_data(&mut g, down.len()) == down);
}

#[test]
fn a_guest_connect_without_listener_is_reset() {
    let memory = memory();
    let mut h = Harness::new(&memory);
    let g = GuestConn::new(3333, 5001);
    h.send(g.hdr(op::REQUEST), &[]);
    let rst = h.expect_one();
    assert_eq!(rst.hdr.op, op::RST);
    assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (5001, 3333));

    // A socket file nobody listens on any more: the same.
    drop(UnixListener::bind(host_port_path(h.uds(), 5002)).unwrap());
    let g = GuestConn::new(3334, 5002);
    h.send(g.hdr(op::REQUEST), &[]);
    assert_eq!(h.expect_one().hdr.op, op::RST);
    assert_eq!(h.connections(), 0);
}

#[test]
fn a_second_request_for_a_live_connection_is_reset() {
    let memory = memory();
    let mut h = Harness::new(&memory);
    let listener = UnixListener::bind(host_port_path(h.uds(), 5000)).unwrap();
    let (mut host, g) = guest_connect(&mut h, &listener, 5000);
    h.send(g.hdr(op::REQUEST), &[]);
    let rst = h.expect_one();
    assert_eq!((rst.hdr.op, rst.hdr.dst_port), (op::RST, 3333));
    assert!(at_eof(&mut host));
    assert_eq!(h.connections(), 0);
}

#[test]
fn packets_for_unknown_connections_are_reset() {
    let memory = memory();
    let mut h = Harness::new(&memory);
    let g = GuestConn::new(40, 41);
    for op in [
        op::RW,
        op::SHUTDOWN,
        op::CREDIT_UPDATE,
        op::CREDIT_REQUEST,
        op::RESPONSE,
        99,
    ] {
        h.send(g.hdr(op), b"x");
        let rst = h.expect_one();
        assert_eq!(rst.hdr.op, op::RST, "after op {op}");
        assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (41, 40));
    }
    // Never a reset for a reset.
    h.send(g.hdr(op::RST), &[]);
    assert!(h.recv().is_empty());
}

#[test]
fn unexpected_ops_on_a_live_connection_reset_it() {
    let memory = memory();
    let mut h = Harness::new(&memory);
    let listener = UnixListener::bind(host_port_path(h.uds(), 5000)).unwrap();
    for bad in [op::RESPONSE, 42] {
        let (mut host, g) = guest_connect(&mut h, &listener, 5000);
        h.send(g.hdr(bad), &[]);
        assert_eq!(h.expect_one().hdr.op, op::RST, "after op {bad}");
        assert!(at_eof(&mut host));
        assert_eq!(h.connections(), 0);
    }
}
