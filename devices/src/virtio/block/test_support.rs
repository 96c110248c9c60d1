//! Block test helpers: disk images in temporary files, and requests laid out as
//! Linux's driver does (header, data, status each in their own descriptors).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use vm_memory::GuestMemoryMmap;

use super::{Block, BlockBacking};
use crate::virtio::test_utils::{activation, fill, interrupt, read, readable, writable};
use crate::virtio::test_utils::{Desc, TestQueue, DATA_START};
use crate::virtio::VirtioDevice;

pub const HEADER: u64 = DATA_START;
pub const STATUS: u64 = DATA_START + 0x100;
/// Data buffers start here; the rest of guest memory (~14 MiB) is free.
pub const DATA: u64 = DATA_START + 0x1000;
/// What the status byte holds before the device answers.
pub const UNWRITTEN: u8 = 0xee;

/// A disk image under the temporary directory, removed when dropped.
pub struct TempImage {
    pub path: PathBuf,
}

impl TempImage {
    pub fn new(contents: &[u8]) -> Self {
        let image = Self::unique();
        std::fs::write(&image.path, contents).unwrap();
        image
    }

    /// A sparse image of `len` zero bytes.
    pub fn sized(len: u64) -> Self {
        let image = Self::unique();
        std::fs::File::create(&image.path)
            .unwrap()
            .set_len(len)
            .unwrap();
        image
    }

    fn unique() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "peapod-blk-test-{}-{}.img",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        Self {
            path: std::env::temp_dir().join(name),
        }
    }

    pub fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }

    pub fn backing(&self, read_only: bool, id: &str) -> BlockBacking {
        BlockBacking {
            path: self.path.clone(),
            read_only,
            id: id.to_owned(),
            file: None,
        }
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Bytes that differ from sector to sector.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

pub fn active_block(
    memory: &GuestMemoryMmap,
    q: &TestQueue,
    backing: Option<BlockBacking>,
) -> Block {
    let mut block = Block::new(backing, interrupt()).unwrap();
    let (activation, _kicks) = activation(memory, 0, vec![q.queue()]);
    block.activate(activation).unwrap();
    block
}

pub fn write_header(memory: &GuestMemoryMmap, kind: u32, sector: u64) {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&kind.to_le_bytes());
    header[8..].copy_from_slice(&sector.to_le_bytes());
    fill(memory, HEADER, &header);
}

/// Makes a request available: header, `data`, status. Each request reuses the header
/// and status buffers, so process it before submitting the next with other values.
pub fn submit(memory: &GuestMemoryMmap, q: &TestQueue, kind: u32, sector: u64, data: &[Desc]) {
    write_header(memory, kind, sector);
    fill(memory, STATUS, &[UNWRITTEN]);
    let mut chain = vec![readable(HEADER, 16)];
    chain.extend_from_slice(data);
    chain.push(writable(STATUS, 1));
    q.add_chain(&chain);
}

pub fn status(memory: &GuestMemoryMmap) -> u8 {
    read(memory, STATUS, 1)[0]
}
