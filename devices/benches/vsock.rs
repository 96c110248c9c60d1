//! vsock throughput through the device and its unix backend, driven by a minimal
//! guest driver and the real event loop, against a unix socket pair.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use peapod_devices::virtio::test_utils::{
    activation, fill, memory, read, readable, writable, TestQueue,
};
use peapod_devices::virtio::vsock::packet::HDR_SIZE;
use peapod_devices::virtio::vsock::{op, PacketHeader, Vsock, HOST_CID, TYPE_STREAM};
use peapod_devices::virtio::{Interrupt, VirtioDevice};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::STREAM_BYTES;

const GUEST_CID: u64 = 3;
const GUEST_PORT: u32 = 1024;
const BUF: u32 = 4096;
const RX_BUFFERS: u16 = 128;
const RX_AREA: u64 = 0x10_0000;
const TX_AREA: u64 = 0x80_0000;
/// What the driver advertises: Linux's default vsock buffer.
const GUEST_BUF_ALLOC: u32 = 256 << 10;

type Loop = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// A packet header from the guest to the host, carrying the guest's credit.
fn header(dst_port: u32, op: u16, len: u32, fwd_cnt: u32) -> [u8; HDR_SIZE] {
    PacketHeader {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: GUEST_PORT,
        dst_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: GUEST_BUF_ALLOC,
        fwd_cnt,
    }
    .to_bytes()
}

/// The guest's side: RX buffers kept posted, packets sent one per TX chain.
struct Driver<'m> {
    memory: &'m GuestMemoryMmap,
    rx: TestQueue<'m>,
    tx: TestQueue<'m>,
    kicks: Vec<EventFd>,
    rx_seen: u16,
    rx_posted: u64,
    tx_slot: u64,
    /// Bytes the guest consumed (its fwd_cnt), and the host port it talks to.
    fwd_cnt: u32,
    host_port: u32,
    /// The device's credit, as last heard.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
}

impl Driver<'_> {
    fn post_rx(&mut self, n: u16) {
        for _ in 0..n {
            let slot = self.rx_posted % u64::from(RX_BUFFERS * 2);
            self.rx.add_chain(&[writable(
                RX_AREA + slot * u64::from(BUF + 64),
                BUF + HDR_SIZE as u32,
            )]);
            self.rx_posted += 1;
        }
        let _ = self.kicks[0].write(1);
    }

    fn send(&mut self, op: u16, payload: usize) {
        let slot = self.tx_slot % 128;
        self.tx_slot += 1;
        let at = TX_AREA + slot * u64::from(BUF + 64);
        fill(
            self.memory,
            at,
            &header(self.host_port, op, payload as u32, self.fwd_cnt),
        );
        if payload == 0 {
            self.tx.add_chain(&[readable(at, HDR_SIZE as u32)]);
        } else {
            self.tx.add_chain(&[
                readable(at, HDR_SIZE as u32),
                readable(at + 64, payload as u32),
            ]);
        }
        let _ = self.kicks[1].write(1);
    }

    /// Packets the device delivered since the last call: (header, payload length).
    fn take_rx(&mut self) -> Vec<PacketHeader> {
        let mut out = Vec::new();
        let used = self.rx.used_idx();
        let mut consumed = 0;
        while self.rx_seen != used {
            let (head, len) = self.rx.used(self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            consumed += 1;
            if len == 0 {
                continue;
            }
            let addr = self.rx_addr(head as u16);
            let raw = read(self.memory, addr, HDR_SIZE);
            let hdr = PacketHeader::from_bytes(raw.as_slice().try_into().unwrap());
            self.peer_buf_alloc = hdr.buf_alloc;
            self.peer_fwd_cnt = hdr.fwd_cnt;
            out.push(hdr);
        }
        if consumed > 0 {
            self.post_rx(consumed);
        }
        out
    }

    /// Head indices go round the 256-entry table in step with the posted buffers.
    fn rx_addr(&self, head: u16) -> u64 {
        let slot = u64::from(head) % u64::from(RX_BUFFERS * 2);
        RX_AREA + slot * u64::from(BUF + 64)
    }

    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

fn run(events: &mut Loop) {
    events.run_with_timeout(0).unwrap();
}

/// Returns (host->guest, guest->host) in MiB/s.
pub fn device_throughput() -> (f64, f64) {
    let dir = std::env::temp_dir().join(format!("peapod-bench-vsock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let uds = dir.join("vm.sock");
    let memory = memory();
    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let vsock = Arc::new(Mutex::new(
        Vsock::new(GUEST_CID, uds.clone(), interrupt).unwrap(),
    ));
    let rx = TestQueue::new(&memory, 0, 256);
    let tx = TestQueue::new(&memory, 0x1_0000, 256);
    let ev = TestQueue::new(&memory, 0x2_0000, 256);
    let (act, kicks) = activation(&memory, 0, vec![rx.queue(), tx.queue(), ev.queue()]);
    vsock.lock().unwrap().activate(act).unwrap();
    let mut events: Loop = EventManager::new().unwrap();
    events.add_subscriber(vsock.clone());
    let mut d = Driver {
        memory: &memory,
        rx,
        tx,
        kicks,
        rx_seen: 0,
        rx_posted: 0,
        tx_slot: 0,
        fwd_cnt: 0,
        host_port: 0,
        peer_buf_alloc: 0,
        peer_fwd_cnt: 0,
        tx_cnt: 0,
    };
    d.post_rx(RX_BUFFERS);
    run(&mut events);

    // Handshake: the host asks, the guest answers the REQUEST.
    let mut host = UnixStream::connect(&uds).unwrap();
    writeln!(host, "CONNECT {GUEST_PORT}").unwrap();
    while d.host_port == 0 {
        run(&mut events);
        for p in d.take_rx() {
            if p.op == op::REQUEST {
                d.host_port = p.src_port;
            }
        }
    }
    d.send(op::RESPONSE, 0);
    // The OK line goes out when the backend next runs.
    host.set_nonblocking(true).unwrap();
    let mut ok = Vec::new();
    while !ok.ends_with(b"\n") {
        run(&mut events);
        let mut byte = [0u8; 1];
        if let Ok(1) = host.read(&mut byte) {
            ok.push(byte[0]);
        }
    }
    host.set_nonblocking(false).unwrap();
    assert!(ok.starts_with(b"OK "), "{:?}", String::from_utf8_lossy(&ok));

    // Host -> guest: a thread writes, the guest consumes and returns credit.
    let writer = std::thread::spawn(move || {
        let chunk = vec![0xa5u8; 64 << 10];
        let mut sent = 0;
        while sent < STREAM_BYTES {
            host.write_all(&chunk).unwrap();
            sent += chunk.len();
        }
        host
    });
    let start = Instant::now();
    let mut got = 0usize;
    let mut credited = 0u32;
    while got < STREAM_BYTES {
        run(&mut events);
        for p in d.take_rx() {
            if p.op == op::RW {
                got += p.len as usize;
                d.fwd_cnt = d.fwd_cnt.wrapping_add(p.len);
            }
        }
        if d.fwd_cnt.wrapping_sub(credited) >= GUEST_BUF_ALLOC / 2 {
            credited = d.fwd_cnt;
            d.send(op::CREDIT_UPDATE, 0);
        }
    }
    let to_guest = mib_per_s(got, start.elapsed().as_secs_f64());
    let host = writer.join().unwrap();

    // Guest -> host: the guest sends 4 KiB packets as the device's credit allows.
    let reader = std::thread::spawn(move || {
        let mut host = host;
        let mut buf = vec![0u8; 64 << 10];
        let mut n = 0;
        while n < STREAM_BYTES {
            n += host.read(&mut buf).unwrap();
        }
    });
    let start = Instant::now();
    let mut sent = 0usize;
    while sent < STREAM_BYTES {
        run(&mut events);
        d.take_rx();
        let mut batch = 0;
        while d.credit() >= BUF && sent < STREAM_BYTES && batch < 64 {
            d.send(op::RW, BUF as usize);
            d.tx_cnt = d.tx_cnt.wrapping_add(BUF);
            sent += BUF as usize;
            batch += 1;
        }
    }
    // The last packets leave when the device next runs.
    while !reader.is_finished() {
        run(&mut events);
    }
    reader.join().unwrap();
    let from_guest = mib_per_s(sent, start.elapsed().as_secs_f64());
    drop(events);
    drop(vsock);
    let _ = std::fs::remove_dir_all(&dir);
    (to_guest, from_guest)
}

/// The same bytes through a unix socket pair, 64 KiB writes, 4 KiB reads.
pub fn socketpair_throughput() -> f64 {
    let dir = std::env::temp_dir().join(format!("peapod-bench-pair-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("pair.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let mut a = UnixStream::connect(&path).unwrap();
    let (mut b, _) = listener.accept().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![0xa5u8; 64 << 10];
        let mut sent = 0;
        while sent < STREAM_BYTES {
            a.write_all(&chunk).unwrap();
            sent += chunk.len();
        }
    });
    let start = Instant::now();
    let mut buf = vec![0u8; BUF as usize];
    let mut got = 0;
    while got < STREAM_BYTES {
        got += b.read(&mut buf).unwrap();
    }
    let rate = mib_per_s(got, start.elapsed().as_secs_f64());
    writer.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    rate
}

fn mib_per_s(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / (1 << 20) as f64
}
