//! What a slot serves, and where a request's sectors land in it.
//!
//! A slot holds nothing, one disk from sector 0, or a *store*: files laid end to end,
//! each from its own start sector, added (`append`) and dropped (`remove`) while the
//! guest runs. A store is how one device carries any number of a pod's disks (its
//! images and its containers' upper disks): the guest maps each region as a device of
//! its own (device-mapper's linear target), so the number of disks a pod can have is
//! not bounded by the VM's device slots or interrupt lines.
//!
//! A store only grows: a region's sectors are never given to another file, and
//! dropping a file leaves a hole whose requests fail. The guest sees the capacity
//! grow with each append (a configuration-change interrupt) and never shrink, so a
//! region it mapped can never come to mean another file's data.

use std::collections::BTreeMap;

use super::disk::{id_bytes, Disk, SECTOR_SIZE};
use super::request::{RequestError, MAX_REQUEST_BYTES};
use super::{BlockBacking, BlockError, MAX_ID_BYTES};

/// Regions of a store start on 1 MiB boundaries, so the guest's mappings of them are
/// aligned for any block size it uses.
pub const STORE_ALIGN_SECTORS: u64 = 2048;

pub(super) enum Contents {
    Empty,
    Disk(Disk),
    Store(Store),
}

/// A file's place in a store, as `append` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub start_sector: u64,
    pub sectors: u64,
}

pub(super) struct Store {
    id: [u8; MAX_ID_BYTES],
    id_text: String,
    /// Start sector to file.
    regions: BTreeMap<u64, Disk>,
    /// The capacity, in sectors: the end of the last region ever appended.
    end: u64,
}

impl Contents {
    pub fn capacity_sectors(&self) -> u64 {
        match self {
            Contents::Empty => 0,
            Contents::Disk(d) => d.sectors,
            Contents::Store(s) => s.end,
        }
    }

    /// The GET_ID answer; none for an empty slot.
    pub fn id(&self) -> Option<&[u8; MAX_ID_BYTES]> {
        match self {
            Contents::Empty => None,
            Contents::Disk(d) => Some(&d.id),
            Contents::Store(s) => Some(&s.id),
        }
    }

    /// The file and offset that `len` bytes at `sector` are read from (or written to,
    /// with `write`), once they are whole sectors that lie wholly in one file that may
    /// be written: a request is done entirely or not at all.
    pub fn locate(
        &self,
        sector: u64,
        len: usize,
        write: bool,
    ) -> Result<(&Disk, u64), RequestError> {
        if !len.is_multiple_of(SECTOR_SIZE as usize) {
            return Err(RequestError::Unaligned(len));
        }
        if len > MAX_REQUEST_BYTES {
            return Err(RequestError::TooLarge(len));
        }
        let sectors = len as u64 / SECTOR_SIZE;
        let (disk, start) = match self {
            Contents::Empty => return Err(RequestError::NoBacking),
            Contents::Disk(d) => (d, 0),
            Contents::Store(s) => match s.regions.range(..=sector).next_back() {
                Some((&start, d)) => (d, start),
                None => return Err(RequestError::NoRegion { sector }),
            },
        };
        let within = sector - start;
        if within
            .checked_add(sectors)
            .is_none_or(|end| end > disk.sectors)
        {
            return Err(match self {
                // Past the file it follows: a gap, or the end of the store.
                Contents::Store(_) if within >= disk.sectors => RequestError::NoRegion { sector },
                _ => RequestError::OutOfRange {
                    sector,
                    len,
                    capacity: (start + disk.sectors) * SECTOR_SIZE,
                },
            });
        }
        // F_RO is fixed at negotiation, but a slot's backing changes later: the
        // device, not the guest, keeps a read-only file unwritten.
        if write && disk.backing.read_only {
            return Err(RequestError::ReadOnly);
        }
        Ok((disk, within * SECTOR_SIZE))
    }

    /// Makes the guest's completed writes durable, in every file.
    pub fn flush(&self) -> Result<(), RequestError> {
        match self {
            Contents::Empty => Err(RequestError::NoBacking),
            Contents::Disk(d) => d.flush(),
            Contents::Store(s) => s.regions.values().try_for_each(Disk::flush),
        }
    }

    /// For logs and the API's device list.
    pub fn describe(&self) -> String {
        match self {
            Contents::Empty => "empty".into(),
            Contents::Disk(d) => format!(
                "{} ({} sectors{}, id {:?})",
                d.backing.path.display(),
                d.sectors,
                if d.backing.read_only {
                    ", read-only"
                } else {
                    ""
                },
                d.backing.id
            ),
            Contents::Store(s) => format!(
                "store {:?} of {} files in {} sectors",
                s.id_text,
                s.regions.len(),
                s.end
            ),
        }
    }

    pub fn backing(&self) -> Option<&BlockBacking> {
        match self {
            Contents::Disk(d) => Some(&d.backing),
            Contents::Empty | Contents::Store(_) => None,
        }
    }

    /// Adds `backing` to the store this slot holds (an empty slot becomes one, with
    /// the backing's ID); where the guest finds it. Nothing changes on error.
    pub fn append(&mut self, backing: BlockBacking) -> Result<Region, BlockError> {
        if let Contents::Disk(d) = self {
            return Err(BlockError::NotAStore {
                path: d.backing.path.clone(),
            });
        }
        if let Contents::Store(s) = self {
            if backing.id != s.id_text {
                return Err(BlockError::StoreId {
                    id: backing.id,
                    store: s.id_text.clone(),
                });
            }
        }
        // Checked before the file is opened, and again by `Disk::open`.
        id_bytes(&backing.id)?;
        let disk = Disk::open(backing)?;
        if disk.sectors == 0 {
            return Err(BlockError::EmptyRegion {
                path: disk.backing.path.clone(),
            });
        }
        if let Contents::Empty = self {
            *self = Contents::Store(Store {
                id: disk.id,
                id_text: disk.backing.id.clone(),
                regions: BTreeMap::new(),
                end: 0,
            });
        }
        let Contents::Store(store) = self else {
            unreachable!("an empty slot became a store above")
        };
        let start_sector = store.end.next_multiple_of(STORE_ALIGN_SECTORS);
        let sectors = disk.sectors;
        let end = start_sector
            .checked_add(sectors)
            .ok_or(BlockError::StoreFull)?;
        store.regions.insert(start_sector, disk);
        store.end = end;
        Ok(Region {
            start_sector,
            sectors,
        })
    }

    /// Drops the file at `start_sector` from the store: its sectors fail from now on
    /// and are never given to another file.
    pub fn remove(&mut self, start_sector: u64) -> Result<BlockBacking, BlockError> {
        let Contents::Store(store) = self else {
            return Err(BlockError::NoSuchRegion { start_sector });
        };
        match store.regions.remove(&start_sector) {
            Some(disk) => Ok(disk.backing),
            None => Err(BlockError::NoSuchRegion { start_sector }),
        }
    }
}
