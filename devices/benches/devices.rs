//! Device-side cost of virtio requests, next to the same work without a VMM.
//!
//! `cargo bench -p peapod-devices --features test-utils`
//!
//! A synthetic driver (the one the unit tests use) plays the guest, so the figures are
//! what the VMM's event-loop thread spends per request, without this host's very slow
//! guest in the way. Each figure is printed beside the raw system calls doing the same
//! work in the same run; the ratio is the figure to watch.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use peapod_devices::virtio::block::{Block, BlockBacking};
use peapod_devices::virtio::test_utils::{activation, fill, memory, readable, writable, TestQueue};
use peapod_devices::virtio::{Interrupt, VirtioDevice};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const BLOCK: usize = 4096;
const DISK_BYTES: u64 = 64 << 20;
const REQUESTS: usize = 20_000;
/// Requests made available per kick: three descriptors each in a 256-entry ring.
const BATCH: usize = 64;
const HEADER_AREA: u64 = 0x10_0000;
const STATUS_AREA: u64 = 0x11_0000;
const DATA_AREA: u64 = 0x20_0000;

fn main() {
    let path = std::env::temp_dir().join(format!("peapod-bench-{}.img", std::process::id()));
    let image = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    image
        .write_all_at(&vec![0x5a; DISK_BYTES as usize], 0)
        .unwrap();
    let offsets = offsets();

    println!("virtio-blk, {REQUESTS} requests of 4 KiB at random offsets, page cache warm:");
    for (name, kind) in [("read", 0u32), ("write", 1u32)] {
        let raw = raw_io(&image, &offsets, kind);
        let device = device_io(&path, &offsets, kind);
        println!(
            "  {name:5}: device {:6.2} us/request, raw p{name} {:6.2} us -> ratio {:.2}",
            per_request(device),
            per_request(raw),
            device.as_secs_f64() / raw.as_secs_f64()
        );
    }
    let _ = std::fs::remove_file(&path);

    println!(
        "virtio-vsock, {} MiB through one connection, 4 KiB guest buffers, median of {ROUNDS}:",
        STREAM_BYTES >> 20
    );
    // Interleaved rounds and medians: this machine is shared, and one round of each
    // can land on a busy or an idle moment.
    let (mut to, mut from, mut pairs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let (t, f) = vsock::device_throughput();
        to.push(t);
        from.push(f);
        pairs.push(vsock::socketpair_throughput());
    }
    let (to_guest, from_guest, pair) = (median(to), median(from), median(pairs));
    for (name, device) in [("host->guest", to_guest), ("guest->host", from_guest)] {
        println!(
            "  {name}: device {:7.0} MiB/s, unix socket pair {:7.0} MiB/s -> ratio {:.2}",
            device,
            pair,
            device / pair
        );
    }
}

const STREAM_BYTES: usize = 64 << 20;
const ROUNDS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

mod vsock;

fn per_request(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6 / REQUESTS as f64
}

/// Random 4 KiB-aligned offsets (a fixed LCG, so both sides do the same I/O).
fn offsets() -> Vec<u64> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..REQUESTS)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) % (DISK_BYTES / BLOCK as u64) * BLOCK as u64
        })
        .collect()
}

fn raw_io(file: &std::fs::File, offsets: &[u64], kind: u32) -> Duration {
    let mut buf = vec![0u8; BLOCK];
    let start = Instant::now();
    for &off in offsets {
        if kind == 0 {
            file.read_exact_at(&mut buf, off).unwrap();
        } else {
            file.write_all_at(&buf, off).unwrap();
        }
    }
    start.elapsed()
}

fn device_io(path: &std::path::Path, offsets: &[u64], kind: u32) -> Duration {
    let memory = memory();
    let q = TestQueue::new(&memory, 0, 256);
    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let backing = BlockBacking {
        path: path.into(),
        read_only: false,
        id: "bench".into(),
        file: None,
    };
    let mut block = Block::new(Some(backing), interrupt).unwrap();
    let (act, _kicks) = activation(&memory, 0, vec![q.queue()]);
    block.activate(act).unwrap();

    let mut elapsed = Duration::ZERO;
    for batch in offsets.chunks(BATCH) {
        // The driver's side of the work is not the device's cost: lay out a batch,
        // then time only the device serving it.
        for (i, &off) in batch.iter().enumerate() {
            let i = i as u64;
            let mut header = [0u8; 16];
            header[..4].copy_from_slice(&kind.to_le_bytes());
            header[8..].copy_from_slice(&(off / 512).to_le_bytes());
            fill(&memory, HEADER_AREA + 16 * i, &header);
            let data = DATA_AREA + BLOCK as u64 * i;
            let data = if kind == 0 {
                writable(data, BLOCK as u32)
            } else {
                readable(data, BLOCK as u32)
            };
            q.add_chain(&[
                readable(HEADER_AREA + 16 * i, 16),
                data,
                writable(STATUS_AREA + i, 1),
            ]);
        }
        let start = Instant::now();
        block.process_queue();
        elapsed += start.elapsed();
        let status = peapod_devices::virtio::test_utils::read(&memory, STATUS_AREA, batch.len());
        assert!(status.iter().all(|&s| s == 0), "every request succeeds");
    }
    elapsed
}
