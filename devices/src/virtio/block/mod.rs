//! virtio-blk (virtio 1.2 section 5.2): one disk image file per device, one request
//! queue, served synchronously on the event loop.
//!
//! A block device is a *slot*: it can exist with no backing file (capacity 0, every
//! request fails) and the VMM's control API can put a file in it, swap it or empty it
//! while the guest runs (`Block::set_backing`). The guest learns the new capacity from
//! a configuration-change interrupt, and finds a disk by its ID (the serial GET_ID
//! returns, visible as /sys/block/vdX/serial) rather than by its vdX name.
//!
//! A slot can also be a *store* of many files, each at its own start sector, that the
//! guest maps as devices of their own (`contents`): how a pod gets any number of
//! disks from one device.
//!
//! `disk` owns an opened file and moves data between it and guest buffers; `contents`
//! is what a slot serves and where a request lands in it; `request` parses one
//! descriptor chain and answers it; `device` is the slot and the virtio device model.

mod contents;
mod device;
mod disk;
mod event_handler;
mod request;
#[cfg(test)]
mod test_support;

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

pub use contents::{Region, STORE_ALIGN_SECTORS};
pub use device::Block;

/// Longest disk ID: the size of the GET_ID answer (virtio 1.2, 5.2.6).
pub const MAX_ID_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;

/// What a slot serves: a disk image file and the ID the guest finds it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockBacking {
    pub path: PathBuf,
    /// Opened O_RDONLY; the device fails the guest's writes.
    pub read_only: bool,
    /// Returned by GET_ID: at most `MAX_ID_BYTES` of printable ASCII.
    pub id: String,
    /// The file already open, passed by the VMM's caller (a jailed VMM cannot open
    /// host paths): `path` then only names it in logs and errors. `None`: open `path`.
    pub file: Option<PassedFile>,
}

/// A backing file opened by someone else. Equal only to itself.
#[derive(Debug, Clone)]
pub struct PassedFile(pub Arc<File>);

impl PartialEq for PassedFile {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for PassedFile {}

/// Why a slot could not be created or given a backing file. The VMM prefixes the slot
/// number.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error(
        "backing file {} not found (was the layer cache cleaned while a pod used \
         it?); recreate the file or give an existing path",
        path.display()
    )]
    NotFound { path: PathBuf },
    #[error(
        "cannot open backing file {} {}: {source}; check the file's permissions \
         and that no one else holds it",
        path.display(),
        if *read_only { "read-only" } else { "read-write" }
    )]
    Open {
        path: PathBuf,
        read_only: bool,
        source: std::io::Error,
    },
    #[error(
        "{} is not a regular file or a block device; give the path of a disk image",
        path.display()
    )]
    NotADisk { path: PathBuf },
    #[error(
        "the file passed for {} is open read-only but the slot is read-write; open it \
         O_RDWR or ask for a read-only slot",
        path.display()
    )]
    PassedReadOnly { path: PathBuf },
    #[error("cannot find the size of backing file {}: {source}", path.display())]
    Size {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "disk ID {id:?} is {len} bytes, virtio-blk serials hold at most \
         {MAX_ID_BYTES}; use a shorter ID"
    )]
    IdTooLong { id: String, len: usize },
    #[error(
        "disk ID {id:?} has characters other than printable ASCII; the guest reads \
         it from /sys/block/vdX/serial, so use letters, digits and punctuation"
    )]
    IdNotPrintable { id: String },
    #[error(
        "cannot add a file to the slot: it serves {} as a whole disk; empty the slot \
         first, or add files only to an empty slot or a store",
        path.display()
    )]
    NotAStore { path: PathBuf },
    #[error(
        "disk ID {id:?} differs from the store's ID {store:?}; every file of a store \
         carries the store's ID"
    )]
    StoreId { id: String, store: String },
    #[error(
        "{} holds no whole sector; a file in a store needs at least 512 bytes",
        path.display()
    )]
    EmptyRegion { path: PathBuf },
    #[error("the store has no sectors left; start a new VM")]
    StoreFull,
    #[error(
        "no file of the store starts at sector {start_sector}; give the start sector \
         the append answered"
    )]
    NoSuchRegion { start_sector: u64 },
    #[error(
        "cannot create the device's activation eventfd: {0}; the VMM may be out of \
         file descriptors"
    )]
    EventFd(std::io::Error),
}
