//! A snapshot's guest memory: one file, the RAM regions end to end, pages of zeros
//! left as holes. A restored VM maps it copy-on-write (MAP_PRIVATE): every VM
//! restored from one file shares the host's page cache of it, and a page is copied
//! only when its guest writes it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Bytes, FileOffset, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};

use crate::memory::ram_ranges;

const PAGE: usize = 4096;
/// How much is read from guest memory at a time.
const CHUNK: usize = 1 << 20;
/// A page of zeros to compare with (a slice comparison is a memcmp).
static ZEROS: [u8; PAGE] = [0; PAGE];

#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("memory file {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error(
        "memory file {path}: {found} bytes, but a VM of {mib} MiB has {expected}: it is \
         another VM's or truncated; boot the VM instead, and make the snapshot again"
    )]
    Size {
        path: PathBuf,
        mib: u64,
        expected: u64,
        found: u64,
    },
    #[error("memory file {path}: mapping it as guest memory: {message}")]
    Map { path: PathBuf, message: String },
}

/// Writes `memory` to a new file at `path` (replacing one there), synced; the bytes
/// written (pages of zeros are holes, which cost nothing).
pub fn write(memory: &GuestMemoryMmap, path: &Path) -> Result<u64, MemoryFileError> {
    let io = |what| {
        move |source| MemoryFileError::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    let file = File::create(path).map_err(io("creating it"))?;
    let total: u64 = memory.iter().map(|r| r.len()).sum();
    let mut offset = 0u64;
    let mut written = 0u64;
    let mut buf = vec![0u8; CHUNK];
    for region in memory.iter() {
        let len = region.len() as usize;
        let mut at = 0usize;
        while at < len {
            let n = CHUNK.min(len - at);
            region
                .read_slice(&mut buf[..n], MemoryRegionAddress(at as u64))
                .map_err(|e| io("reading guest memory")(std::io::Error::other(e)))?;
            for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                let page_offset = offset + (at + i * PAGE) as u64;
                // The last page always, so that the file has the memory's size.
                let last = page_offset + page.len() as u64 == total;
                if last || page != &ZEROS[..page.len()] {
                    file.write_all_at(page, page_offset)
                        .map_err(io("writing it"))?;
                    written += page.len() as u64;
                }
            }
            at += n;
        }
        offset += region.len();
    }
    file.sync_data().map_err(io("syncing it"))?;
    Ok(written)
}

/// Maps the file at `path`, written by [`write`] for a VM of `size` bytes of memory,
/// copy-on-write as that VM's guest memory.
pub fn map(path: &Path, size: u64) -> Result<GuestMemoryMmap, MemoryFileError> {
    let file = File::open(path).map_err(|source| MemoryFileError::Io {
        path: path.to_path_buf(),
        what: "opening it",
        source,
    })?;
    let found = file
        .metadata()
        .map_err(|source| MemoryFileError::Io {
            path: path.to_path_buf(),
            what: "reading its size",
            source,
        })?
        .len();
    if found != size {
        return Err(MemoryFileError::Size {
            path: path.to_path_buf(),
            mib: size >> 20,
            expected: size,
            found,
        });
    }
    let file = Arc::new(file);
    let map_err = |message: String| MemoryFileError::Map {
        path: path.to_path_buf(),
        message,
    };
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (addr, len) in ram_ranges(size) {
        let mapping = MmapRegion::build(
            Some(FileOffset::from_arc(file.clone(), offset)),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_NORESERVE | libc::MAP_PRIVATE,
        )
        .map_err(|e| map_err(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, addr)
            .ok_or_else(|| map_err(format!("a region at {:#x} overflows", addr.0)))?;
        regions.push(region);
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| map_err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use vm_memory::GuestAddress;

    use super::*;
    use crate::layout::MMIO_GAP_END;
    use crate::memory::create_guest_memory;

    #[test]
    fn memory_round_trips_sparsely_and_copies_on_write() {
        let size = 16u64 << 20;
        let memory = create_guest_memory(size).unwrap();
        memory.write_slice(b"first page", GuestAddress(0)).unwrap();
        memory
            .write_slice(b"middle", GuestAddress(5 << 20))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let written = write(&memory, &path).unwrap();
        assert_eq!(written, 3 * PAGE as u64, "two pages of data and the last");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), size);
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "holes: {} blocks",
            meta.blocks()
        );

        let restored = map(&path, size).unwrap();
        let mut buf = [0u8; 10];
        restored.read_slice(&mut buf, GuestAddress(0)).unwrap();
        assert_eq!(&buf, b"first page");
        restored
            .read_slice(&mut buf[..6], GuestAddress(5 << 20))
            .unwrap();
        assert_eq!(&buf[..6], b"middle");
        restored.write_slice(b"changed", GuestAddress(0)).unwrap();
        let again = map(&path, size).unwrap();
        again.read_slice(&mut buf, GuestAddress(0)).unwrap();
        assert_eq!(&buf, b"first page", "a guest's write stays its own");

        let e = map(&path, 32 << 20).unwrap_err();
        assert!(matches!(e, MemoryFileError::Size { .. }), "{e}");
        assert!(e.to_string().contains("boot the VM instead"), "{e}");
    }

    #[test]
    fn memory_above_the_mmio_gap_goes_after_the_low_memory() {
        let size = 3u64 << 30 | 4 << 20;
        let memory = create_guest_memory(size).unwrap();
        memory
            .write_slice(b"high", GuestAddress(MMIO_GAP_END))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        write(&memory, &path).unwrap();
        let restored = map(&path, size).unwrap();
        let mut buf = [0u8; 4];
        restored
            .read_slice(&mut buf, GuestAddress(MMIO_GAP_END))
            .unwrap();
        assert_eq!(&buf, b"high");
    }
}
