//! `device.rs` tests the device alone with a scripted backend; the rest test the
//! device and the unix backend together, driven by the synthetic driver on one side
//! and real unix sockets on the other.

mod device;
mod flow;
mod guest_to_host;
mod host_to_guest;
mod setup;
mod teardown;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;

use super::packet::HDR_SIZE;
use super::unix::{Timeouts, CONN_BUF_ALLOC};
use super::{op, PacketHeader, Vsock, VsockBackend, HOST_CID, TYPE_STREAM};
use crate::virtio::test_utils::*;
use crate::virtio::VirtioDevice;

pub const GUEST_CID: u64 = 3;
/// Linux fills its RX queue with 4 KiB buffers.
pub const RX_BUF: u32 = 4096;
const RX_BASE: u64 = DATA_START;
const RX_SLOTS: u64 = 256;
const TX_BASE: u64 = RX_BASE + RX_SLOTS * RX_BUF as u64;
/// RX buffers the guest keeps posted.
const RX_POSTED: u16 = 128;
const HOST_TIMEOUT: Duration = Duration::from_secs(5);

/// A directory under the system temp dir, removed with everything in it on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("pvs-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A packet as the guest received it.
#[derive(Debug, Clone)]
pub struct Rx {
    pub hdr: PacketHeader,
    pub data: Vec<u8>,
}

/// The guest's end of one connection: it consumes what it receives at once, so its
/// fwd_cnt is what it has received.
#[derive(Debug, Clone, Copy)]
pub struct GuestConn {
    pub guest_port: u32,
    pub host_port: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
    /// Bytes sent to the host, and the host's credit as last heard.
    pub tx_cnt: u32,
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
}

impl GuestConn {
    pub fn new(guest_port: u32, host_port: u32) -> Self {
        Self {
            guest_port,
            host_port,
            buf_alloc: 1 << 20,
            fwd_cnt: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
        }
    }

    pub fn hdr(&self, op: u16) -> PacketHeader {
        PacketHeader {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: self.guest_port,
            dst_port: self.host_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Whether `p` belongs to this connection.
    pub fn owns(&self, p: &Rx) -> bool {
        p.hdr.src_port == self.host_port && p.hdr.dst_port == self.guest_port
    }

    /// Takes in a packet from the host: data counts as consumed, credit is noted.
    pub fn take(&mut self, p: &Rx) {
        assert!(self.owns(p), "packet {:?} is not for {self:?}", p.hdr);
        self.fwd_cnt = self.fwd_cnt.wrapping_add(p.data.len() as u32);
        self.peer_buf_alloc = p.hdr.buf_alloc;
        self.peer_fwd_cnt = p.hdr.fwd_cnt;
    }

    /// What the host lets us send now.
    pub fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// The device with the unix backend, activated, with RX buffers posted.
pub struct Harness<'m> {
    memory: &'m GuestMemoryMmap,
    rxq: TestQueue<'m>,
    txq: TestQueue<'m>,
    pub evq: TestQueue<'m>,
    pub vsock: Vsock,
    /// Keeps the socket directory alive as long as the device.
    _dir: TempDir,
    rx_seen: Cell<u16>,
    rx_posted_total: Cell<u64>,
    rx_addr: RefCell<HashMap<u16, u64>>,
    /// Repost RX buffers as they are used (a guest that keeps up).
    pub refill: Cell<bool>,
    /// RX buffers the device gave back unused.
    pub empty_rx: Cell<usize>,
}

impl<'m> Harness<'m> {
    /// Activated and accepting host connections.
    pub fn new(memory: &'m GuestMemoryMmap) -> Self {
        let mut h = Self::inactive(memory);
        h.activate();
        h.post_rx(RX_POSTED);
        h
    }

    /// Bound but not yet activated by the guest.
    pub fn inactive(memory: &'m GuestMemoryMmap) -> Self {
        let dir = TempDir::new();
        let vsock = Vsock::new(GUEST_CID, dir.path().join("vm.sock"), interrupt()).unwrap();
        Self {
            memory,
            rxq: TestQueue::new(memory, 0, 256),
            txq: TestQueue::new(memory, 0x1_0000, 256),
            evq: TestQueue::new(memory, 0x2_0000, 256),
            vsock,
            _dir: dir,
            rx_seen: Cell::new(0),
            rx_posted_total: Cell::new(0),
            rx_addr: RefCell::new(HashMap::new()),
            refill: Cell::new(true),
            empty_rx: Cell::new(0),
        }
    }

    /// What the event handler does on activation, minus the event loop. No RX
    /// buffers are posted yet.
    pub fn activate(&mut self) {
        let queues = vec![self.rxq.queue(), self.txq.queue(), self.evq.queue()];
        let (activation, _kicks) = activation(self.memory, 0, queues);
        self.vsock.activate(activation).unwrap();
        self.vsock.backend.start();
    }

    pub fn uds(&self) -> &Path {
        self.vsock.uds_path()
    }

    pub fn set_timeouts(&mut self, timeouts: Timeouts) {
        self.vsock.backend.set_timeouts(timeouts);
    }

    pub fn post_rx(&self, n: u16) {
        for _ in 0..n {
            self.post_rx_sized(RX_BUF);
        }
    }

    pub fn post_rx_sized(&self, len: u32) {
        assert!(len <= RX_BUF);
        let slot = self.rx_posted_total.get() % RX_SLOTS;
        self.rx_posted_total.set(self.rx_posted_total.get() + 1);
        let addr = RX_BASE + slot * u64::from(RX_BUF);
        let head = self.rxq.add_chain(&[writable(addr, len)]);
        self.rx_addr.borrow_mut().insert(head, addr);
    }

    /// Lets the backend handle its events a few rounds (a new stream is watched from
    /// the round after it appears).
    pub fn pump(&mut self) {
        for _ in 0..4 {
            self.vsock.process_backend();
        }
    }

    /// Packets delivered since the last call, reposting buffers if `refill`.
    pub fn recv(&mut self) -> Vec<Rx> {
        self.pump();
        let mut out = Vec::new();
        loop {
            let used = self.rxq.used_idx();
            if used == self.rx_seen.get() {
                return out;
            }
            let mut consumed = 0;
            while self.rx_seen.get() != used {
                let i = self.rx_seen.get();
                let (head, len) = self.rxq.used(i);
                self.rx_seen.set(i.wrapping_add(1));
                consumed += 1;
                if len == 0 {
                    self.empty_rx.set(self.empty_rx.get() + 1);
                    continue;
                }
                let addr = self.rx_addr.borrow()[&(head as u16)];
                let raw = read(self.memory, addr, len as usize);
                let hdr = PacketHeader::from_bytes(raw[..HDR_SIZE].try_into().unwrap());
                assert_eq!(hdr.len as usize + HDR_SIZE, len as usize, "{hdr:?}");
                assert_eq!((hdr.src_cid, hdr.dst_cid), (HOST_CID, GUEST_CID));
                assert_eq!(hdr.type_, TYPE_STREAM);
                out.push(Rx {
                    hdr,
                    data: raw[HDR_SIZE..].to_vec(),
                });
            }
            if !self.refill.get() {
                return out;
            }
            self.post_rx(consumed);
            self.vsock.process_rx();
        }
    }

    /// Transmits one packet (header and payload in separate descriptors, as Linux
    /// does) and lets the device handle it.
    pub fn send(&mut self, hdr: PacketHeader, data: &[u8]) {
        let hdr = PacketHeader {
            len: data.len() as u32,
            ..hdr
        };
        fill(self.memory, TX_BASE, &hdr.to_bytes());
        if data.is_empty() {
            self.txq.add_chain(&[readable(TX_BASE, HDR_SIZE as u32)]);
        } else {
            let data_at = TX_BASE + 0x1000;
            fill(self.memory, data_at, data);
            self.txq.add_chain(&[
                readable(TX_BASE, HDR_SIZE as u32),
                readable(data_at, data.len() as u32),
            ]);
        }
        self.vsock.process_tx();
    }

    /// Sends `data` on `conn` in RW packets as its credit allows; returns the bytes
    /// sent.
    pub fn send_data(&mut self, conn: &mut GuestConn, data: &[u8]) -> usize {
        let mut sent = 0;
        while sent < data.len() && conn.credit() > 0 {
            let n = (data.len() - sent)
                .min(conn.credit() as usize)
                .min(64 << 10);
            self.send(conn.hdr(op::RW), &data[sent..sent + n]);
            conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
            sent += n;
        }
        sent
    }

    /// A host process connects and asks for guest port `port`; the guest answers the
    /// REQUEST. Returns the host's stream (past its `OK` line) and the guest's end.
    pub fn host_connect(&mut self, port: u32) -> (UnixStream, GuestConn) {
        let mut host = connect(self.uds());
        writeln!(host, "CONNECT {port}").unwrap();
        let req = self.expect_one();
        assert_eq!(req.hdr.op, op::REQUEST);
        assert_eq!(req.hdr.dst_port, port);
        let mut conn = GuestConn::new(port, req.hdr.src_port);
        conn.take(&req);
        self.send(conn.hdr(op::RESPONSE), &[]);
        assert_eq!(read_line(&mut host), format!("OK {}\n", conn.host_port));
        (host, conn)
    }

    /// Exactly one packet arrives.
    pub fn expect_one(&mut self) -> Rx {
        let mut got = self.recv();
        assert_eq!(got.len(), 1, "expected one packet, got {got:?}");
        got.remove(0)
    }

    pub fn connections(&self) -> usize {
        self.vsock.backend().connection_count()
    }

    /// Receives until `conn` has got `len` bytes of data; returns them.
    pub fn recv_data(&mut self, conn: &mut GuestConn, len: usize) -> Vec<u8> {
        let deadline = Instant::now() + HOST_TIMEOUT;
        let mut data = Vec::new();
        while data.len() < len {
            assert!(
                Instant::now() < deadline,
                "got {} of {len} bytes",
                data.len()
            );
            for p in self.recv() {
                assert_eq!(p.hdr.op, op::RW, "{:?}", p.hdr);
                conn.take(&p);
                data.extend_from_slice(&p.data);
            }
        }
        data
    }
}

pub fn connect(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(HOST_TIMEOUT)).unwrap();
    s
}

/// Reads one line, byte by byte (so nothing after it is consumed).
pub fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8];
    while line.last() != Some(&b'\n') {
        assert_eq!(s.read(&mut b).unwrap(), 1, "EOF after {line:?}");
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

/// Whether the peer closed the stream: a read returns EOF (or a reset).
pub fn at_eof(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
    }
}

/// Whether the stream has nothing to read right now (and is still open).
pub fn nothing_to_read(s: &mut UnixStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let r = matches!(s.read(&mut b), Err(e) if e.kind() == ErrorKind::WouldBlock);
    s.set_nonblocking(false).unwrap();
    r
}

/// Reads whatever the stream has without blocking.
pub fn drain(s: &mut UnixStream) -> Vec<u8> {
    s.set_nonblocking(true).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    s.set_nonblocking(false).unwrap();
    out
}

/// Bytes that differ at every position, so reordering or loss shows.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

/// Short timeouts, for tests that wait for them; long enough that a loaded machine
/// still sees the state before they fire.
pub fn quick_timeouts() -> Timeouts {
    let t = Duration::from_millis(300);
    Timeouts {
        connect_line: t,
        response: t,
        shutdown: t,
    }
}

/// Pumps until `done` or a few seconds pass.
pub fn wait_until(h: &mut Harness, mut done: impl FnMut(&mut Harness) -> bool) {
    let deadline = Instant::now() + HOST_TIMEOUT;
    while !done(h) {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(5));
        h.pump();
    }
}

pub const BUF_ALLOC: u32 = CONN_BUF_ALLOC;

/// Reads `len` bytes from a host stream, letting the device flush between reads.
pub fn read_host(h: &mut Harness, s: &mut UnixStream, len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    wait_until(h, |_| {
        out.extend(drain(s));
        out.len() >= len
    });
    assert_eq!(out.len(), len, "the host got more than was sent");
    out
}
