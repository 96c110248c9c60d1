//! Connections ending from either side, cleanly or not.

use std::net::Shutdown;
use std::os::unix::net::UnixListener;

use super::super::{host_port_path, shutdown};
use super::*;

#[test]
fn host_close_sends_shutdown_after_the_data() {
    let memory = memory();
    let mut h = Harness::new(&memory);
    let (mut host, mut g) = h.host_connect(8);
    host.write_all(b"bye").unwrap();
    drop(host);
    let got = h.recv();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(
        (got[0].hdr.op, got[0].data.as_slice()),
        (op::RW, &b"bye"[..])
    );
    assert_eq!(
        (got[1].hdr.op, got[1].hdr.flags),
        (op::SHUTDOWN, shutdown::SEND),
        "the host's end of input is the guest's end of input, nothing more"
    );
    g.take(&got[0]);
    assert_eq!(h.connections(), 1, "waiting for the guest's reset");
    h.send(g.hdr(op::RST), &[]);
    assert_eq!(h.connections(), 0);
    assert!(h.recv().is_empty());
}

#[test]
fn a_guest_shutdown_after_ours_ends_with_a_reset() {
    let memory = memory();
    let mut h = Harness::new(&memory);
    let (host, g) = h.host_connect(8);
    drop(host);
    assert_eq!(h.expect_one().hdr.op, op::SHUTDOWN);
    h.send(
        PacketHeader {
            flags: shutdown::BOTH,
            ..g.hdr(op::SHUTDOWN)
        },
        &[],
    );
    assert_eq!(h.expect_one().hdr.op, op::RST);
    assert_eq!(h.connections(), 0);
}

#[test]
fn a_host_that_half_closes_still_reads_the_reply() {
    let memory = memory();
    let mut h = Harness::new(&memory);
    let (mut host, mut g) = h.host_connect(8);
    host.write_all(b"question").unwrap();
    host.shutdown(Shutdown::Write).unwrap();
    let got = h.recv();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[1].hdr.op, op::SHUTDOWN);
    g.take(&got[0]);
    h.send_data(&mut g, b"answer");
    let mut reply = [0u8; 6];
    host.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"answer");
    h.send(
        PacketHeader {
            flags: shutdown::BOTH,
            ..g.hdr(op::SHUTDOWN)
        },
        &[],
    );
    assert_eq!(h.expect_one().hdr.op, op::RST);
    assert!(at_eof(&mut host));
    assert_eq!(h.connections(), 0);
}

#[test]
fn a_guest_writing_after_the_host_closed_is_reset() {
    let memory = memory();
    let mut h = Harness::new(&memory);
    let (host, mut g) = h.host_connect(8);
    drop(host);
    assert_eq!(h.expect_one().hdr.op, op::SHUTDOWN);
    h.send_data(&mut g, b"late");
    assert_eq!(h.expect_one().hdr.op, op::RST);
    assert_eq!(h.connections(), 0);
}

#[test]
fn a_guest_reset_closes_the_host_stream() {
    let memory = memory();
    let mut h = Harness::new(&memory);
    let (mut host, g) = h.host_connect(8);
    h.send(g.hdr(op::RST), &[]);
    assert!(at_eof(&mut host));
    assert_eq!(h.connections(), 0);
    assert!(h.recv().is_empty());
}

#[test]
fn a_guest_shutdown_flushes_buffered_data_then_closes() {
    let memory = memory();
    let mut h = Harness::new(&memory);
    let listener = UnixListener::bind(host_port_path(h.uds(), 6000)).unwrap();
    let mut g = GuestConn::new(3333, 6000);
    h.send(g.hdr(op::REQUEST), &[]);
    g.take(&h.expect_one());
    let (mut host, _) = listener.accept().unwrap();

    // More than the host socket holds, so part of it waits in our buffer.
    let data = pattern(BUF_ALLOC as usize, 9);
    assert_eq!(h.send_data(&mut g, &data), data.len());
    assert!(h.vsock.backend().buffered_bytes() > 0);
    h.send(
        PacketHeader {
            flags: shutdown::BOTH,
            ..g.hdr(op::SHUTDOWN)
        },
        &[],
    );
    let early = h.recv();
    assert!(
        early.iter().all(|p| p.hdr.op != op::RST),
        "no reset before the flush"
    );
    assert_eq!(h.connections(), 1);

    assert!(read_host(&mut h, &mut host, data.len()) == data);
    let mut got = Vec::new();
    wait_until(&mut h, |h| {
        got.extend(h.recv());
        got.iter().any(|p| p.hdr.op == op::RST)
    });
    assert!(at_eof(&mut host));
    assert_eq!(h.connections(), 0);
}

#[test]
fn a_guest_send_shutdown_half_closes() {
    let memory = memory();
    let mut h = Harness::new(&memory);
    let (mut host, mut g) = h.host_connect(8);
    h.send(g.hdr(op::RW), b"last");
    h.send(
        PacketHeader {
            flags: shutdown::SEND,
            ..g.hdr(op::SHUTDOWN)
        },
        &[],
    );
    let mut got = Vec::new();
    host.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"last", "data, then EOF");
    // The other direction still works.
    host.write_all(b"reply").unwrap();
    assert_eq!(h.recv_data(&mut g, 5), b"reply");
    // Data after the guest's own SHUTDOWN(SEND) breaks the protocol.
    h.send(g.hdr(op::RW), b"more");
    assert_eq!(h.expect_one().hdr.op, op::RST);
    assert_eq!(h.connections(), 0);
}

#[test]
fn a_guest_receive_shutdown_fails_host_writes() {
    let memory = memory();
    let mut h = Harness::new(&memory);
    let (mut host, g) = h.host_connect(8);
    h.send(
        PacketHeader {
            flags: shutdown::RCV,
            ..g.hdr(op::SHUTDOWN)
        },
        &[],
    );
    let e = host.write_all(b"unwanted").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BrokenPipe);
    assert!(h.recv().iter().all(|p| p.hdr.op != op::RW));
    // Guest to host still flows.
    h.send(g.hdr(op::RW), b"still");
    let mut buf = [0u8; 5];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still");
}

#[test]
fn a_broken_host_stream_resets_the_guest() {
    let memory = memory();
    let mut h = Harness::new(&memory);
    let (host, g) = h.host_connect(8);
    host.shutdown(Shutdown::Both).unwrap();
    drop(host);
    // The guest writes before the device noticed the hang-up: EPIPE, then a reset.
    h.send(g.hdr(op::RW), b"into the void");
    let got = h.recv();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].hdr.op, op::RST);
    assert_eq!(h.connections(), 0);
}
