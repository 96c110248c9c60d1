//! Regions of the pod's disk store as block devices of their own: device-mapper's
//! linear target, driven through `/dev/mapper/control` (the kernel's ioctl interface,
//! `include/uapi/linux/dm-ioctl.h`).
//!
//! The host puts every image and upper disk of a pod in one virtio-blk device (a
//! store) and names each by its start sector and length; the agent maps each region
//! once, as `/dev/dm-N`, and shares the mapping among the containers that use it (one
//! image's layers, mounted by each of its containers, then share one page cache, as
//! they did when each image was a device of its own). A mapping is named after its
//! start sector: the host never gives a region's sectors to another file, so the name
//! cannot come to mean other data.
//!
//! Written by hand rather than with the `devicemapper` crate: that crate generates
//! its bindings with bindgen at build time (a libclang on every build machine, for the
//! static guest target too) to make the four ioctls below.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// The control device devtmpfs makes for device-mapper.
const CONTROL: &str = "/dev/mapper/control";
/// The interface version asked for: 4.0.0 (every kernel since 2.6 has 4.x).
const VERSION: [u32; 3] = [4, 0, 0];
const NAME_LEN: usize = 128;
const UUID_LEN: usize = 129;
const READONLY_FLAG: u32 = 1 << 0;
/// Remove a device still open (a mount detached lazily) when its last user closes it.
const DEFERRED_REMOVE_FLAG: u32 = 1 << 17;

const DEV_CREATE: u8 = 3;
const DEV_REMOVE: u8 = 4;
const DEV_SUSPEND: u8 = 6;
const TABLE_LOAD: u8 = 9;

/// `struct dm_ioctl`.
#[repr(C)]
#[derive(Clone, Copy)]
struct DmIoctl {
    version: [u32; 3],
    data_size: u32,
    data_start: u32,
    target_count: u32,
    open_count: i32,
    flags: u32,
    event_nr: u32,
    padding: u32,
    dev: u64,
    name: [u8; NAME_LEN],
    uuid: [u8; UUID_LEN],
    data: [u8; 7],
}

/// `struct dm_target_spec`, followed by its parameters.
#[repr(C)]
#[derive(Clone, Copy)]
struct DmTargetSpec {
    sector_start: u64,
    length: u64,
    status: i32,
    next: u32,
    target_type: [u8; 16],
}

const _: () = assert!(std::mem::size_of::<DmIoctl>() == 312);
const _: () = assert!(std::mem::size_of::<DmTargetSpec>() == 40);

#[derive(Debug, thiserror::Error)]
pub enum DmError {
    #[error(
        "cannot open {CONTROL}: {0} (the guest kernel needs CONFIG_BLK_DEV_DM, and /dev \
         a devtmpfs)"
    )]
    Control(io::Error),
    #[error("cannot stat {}: {source}", path.display())]
    Stat { path: PathBuf, source: io::Error },
    #[error("{} is not a block device", path.display())]
    NotABlockDevice { path: PathBuf },
    #[error("device-mapper: {what} {name}: {source}")]
    Ioctl {
        what: &'static str,
        name: String,
        source: io::Error,
    },
}

/// A region of a block device: where it starts and how long it is, in 512-byte sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Region {
    pub start_sector: u64,
    pub sectors: u64,
}

struct Mapping {
    path: PathBuf,
    refs: usize,
}

/// The guest's mappings of store regions, by device number and region, shared by
/// reference count.
static MAPPINGS: Mutex<BTreeMap<(u64, Region), Mapping>> = Mutex::new(BTreeMap::new());

fn lock() -> MutexGuard<'static, BTreeMap<(u64, Region), Mapping>> {
    MAPPINGS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A shared mapping of a region, held until [`release`]d.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// The mapped device, `/dev/dm-N`.
    pub path: PathBuf,
    key: (u64, Region),
}

/// Maps `region` of `device` (read-only if `read_only`), or takes another reference to
/// its mapping.
pub fn acquire(device: &Path, region: Region, read_only: bool) -> Result<Mapped, DmError> {
    let rdev = block_device_number(device)?;
    let key = (rdev, region);
    let mut map = lock();
    if let Some(m) = map.get_mut(&key) {
        m.refs += 1;
        return Ok(Mapped {
            path: m.path.clone(),
            key,
        });
    }
    let name = name_of(rdev, region);
    let path = create_linear(&name, rdev, region, read_only)?;
    map.insert(
        key,
        Mapping {
            path: path.clone(),
            refs: 1,
        },
    );
    Ok(Mapped { path, key })
}

/// Drops one reference; the last removes the mapping (which must no longer be
/// mounted). On error the reference is kept, so that a later release can retry.
pub fn release(mapped: &Mapped) -> Result<(), DmError> {
    let mut map = lock();
    let Some(m) = map.get_mut(&mapped.key) else {
        return Ok(());
    };
    if m.refs > 1 {
        m.refs -= 1;
        return Ok(());
    }
    remove(&name_of(mapped.key.0, mapped.key.1))?;
    map.remove(&mapped.key);
    Ok(())
}

fn name_of(rdev: u64, region: Region) -> String {
    format!(
        "peapod-{}:{}-{}",
        libc::major(rdev),
        libc::minor(rdev),
        region.start_sector
    )
}

fn block_device_number(device: &Path) -> Result<u64, DmError> {
    let meta = std::fs::metadata(device).map_err(|source| DmError::Stat {
        path: device.to_owned(),
        source,
    })?;
    if !meta.file_type().is_block_device() {
        return Err(DmError::NotABlockDevice {
            path: device.to_owned(),
        });
    }
    Ok(std::os::unix::fs::MetadataExt::rdev(&meta))
}

/// Creates device `name` mapping `region` of device `rdev`, and activates it; its
/// device node. Nothing is left on error.
fn create_linear(
    name: &str,
    rdev: u64,
    region: Region,
    read_only: bool,
) -> Result<PathBuf, DmError> {
    let control = control()?;
    let flags = if read_only { READONLY_FLAG } else { 0 };
    let created = call(&control, DEV_CREATE, "creating", name, flags, &[])?;
    let params = format!(
        "{}:{} {}",
        libc::major(rdev),
        libc::minor(rdev),
        region.start_sector
    );
    let target = DmTargetSpec {
        sector_start: 0,
        length: region.sectors,
        status: 0,
        next: 0,
        target_type: padded(b"linear"),
    };
    let loaded = call(
        &control,
        TABLE_LOAD,
        "loading the table of",
        name,
        flags,
        &target_bytes(&target, &params),
    )
    .and_then(|_| call(&control, DEV_SUSPEND, "activating", name, 0, &[]));
    if let Err(e) = loaded {
        if let Err(undo) = call(&control, DEV_REMOVE, "removing", name, 0, &[]) {
            log::warn!("{undo}");
        }
        return Err(e);
    }
    let minor = libc::minor(created.dev);
    Ok(PathBuf::from(format!("/dev/dm-{minor}")))
}

fn remove(name: &str) -> Result<(), DmError> {
    call(
        &control()?,
        DEV_REMOVE,
        "removing",
        name,
        DEFERRED_REMOVE_FLAG,
        &[],
    )
    .map(drop)
}

fn control() -> Result<File, DmError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(CONTROL)
        .map_err(DmError::Control)
}

fn padded<const N: usize>(text: &[u8]) -> [u8; N] {
    let mut out = [0; N];
    out[..text.len()].copy_from_slice(text);
    out
}

/// One target spec and its NUL-terminated parameters, padded to 8 bytes.
fn target_bytes(target: &DmTargetSpec, params: &str) -> Vec<u8> {
    let size = std::mem::size_of::<DmTargetSpec>();
    let mut bytes = vec![0u8; size];
    // SAFETY: DmTargetSpec is repr(C) plain data of exactly `size` bytes, with no
    // padding between its fields (checked by the size assertion above); copying it
    // byte for byte into a buffer of that size reads only initialised memory.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (target as *const DmTargetSpec).cast::<u8>(),
            bytes.as_mut_ptr(),
            size,
        );
    }
    bytes.extend_from_slice(params.as_bytes());
    bytes.push(0);
    bytes.resize(bytes.len().next_multiple_of(8), 0);
    bytes
}

/// One device-mapper ioctl on device `name` with `payload` after the header; the
/// header the kernel answered.
fn call(
    control: &File,
    cmd: u8,
    what: &'static str,
    name: &str,
    flags: u32,
    payload: &[u8],
) -> Result<DmIoctl, DmError> {
    let header_len = std::mem::size_of::<DmIoctl>();
    let mut header = DmIoctl {
        version: VERSION,
        data_size: 0,
        data_start: header_len as u32,
        target_count: u32::from(!payload.is_empty()),
        open_count: 0,
        flags,
        event_nr: 0,
        padding: 0,
        dev: 0,
        name: [0; NAME_LEN],
        uuid: [0; UUID_LEN],
        data: [0; 7],
    };
    let err = |source| DmError::Ioctl {
        what,
        name: name.to_owned(),
        source,
    };
    if name.len() >= NAME_LEN {
        return Err(err(io::Error::from_raw_os_error(libc::ENAMETOOLONG)));
    }
    header.name[..name.len()].copy_from_slice(name.as_bytes());
    // The kernel copies data_size bytes in and writes the answer back over them; a
    // little room past the payload keeps any answer data from being cut.
    let total = header_len + payload.len() + 1024;
    header.data_size = total as u32;
    let mut buf = vec![0u64; total.div_ceil(8)];
    let bytes = buf.as_mut_ptr().cast::<u8>();
    // SAFETY: `buf` holds `total` bytes, 8-byte aligned; the header (repr(C) plain
    // data, `header_len` bytes) and the payload are copied into it without overlap
    // and within its bounds.
    unsafe {
        std::ptr::copy_nonoverlapping((&header as *const DmIoctl).cast::<u8>(), bytes, header_len);
        std::ptr::copy_nonoverlapping(payload.as_ptr(), bytes.add(header_len), payload.len());
    }
    let request = request_code(cmd);
    // SAFETY: the request is a device-mapper ioctl whose argument is a dm_ioctl
    // header followed by data_size - header bytes, all inside `buf`, which outlives
    // the call; the kernel writes no more than data_size bytes back.
    let rc = unsafe { libc::ioctl(control.as_raw_fd(), request, bytes) };
    if rc < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: `buf` starts with a dm_ioctl the kernel filled; DmIoctl is plain data
    // for which every bit pattern is valid, and `buf` is aligned for it.
    Ok(unsafe { std::ptr::read(bytes.cast::<DmIoctl>()) })
}

/// `_IOWR(0xfd, cmd, struct dm_ioctl)`.
fn request_code(cmd: u8) -> libc::Ioctl {
    const IOC_READ_WRITE: u64 = 3;
    let size = std::mem::size_of::<DmIoctl>() as u64;
    let code = (IOC_READ_WRITE << 30) | (size << 16) | (0xfd << 8) | u64::from(cmd);
    code as libc::Ioctl
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_codes_are_the_kernels() {
        // DM_DEV_CREATE and DM_TABLE_LOAD as the kernel's headers define them.
        assert_eq!(request_code(DEV_CREATE) as u64 & 0xffff_ffff, 0xc138_fd03);
        assert_eq!(request_code(TABLE_LOAD) as u64 & 0xffff_ffff, 0xc138_fd09);
    }

    #[test]
    fn a_target_is_its_spec_then_its_padded_parameters() {
        let t = DmTargetSpec {
            sector_start: 0,
            length: 100,
            status: 0,
            next: 0,
            target_type: padded(b"linear"),
        };
        let b = target_bytes(&t, "254:0 2048");
        assert_eq!(b.len(), 40 + 16);
        assert_eq!(&b[8..16], &100u64.to_ne_bytes());
        assert_eq!(&b[24..30], b"linear");
        assert_eq!(&b[40..50], b"254:0 2048");
        assert_eq!(b[50], 0);
    }

    #[test]
    fn names_fit_and_tell_the_region() {
        let rdev = libc::makedev(254, 16);
        let region = Region {
            start_sector: 4096,
            sectors: 8,
        };
        assert_eq!(name_of(rdev, region), "peapod-254:16-4096");
    }
}
