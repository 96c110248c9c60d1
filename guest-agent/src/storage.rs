//! A container's root filesystem from the disks the host attached.
//!
//! The host puts each image layer and the container's writable layer on a virtio-blk
//! disk and names it by its serial (`/sys/block/vdX/serial`), never by its vdX name,
//! which depends on the order the guest found the slots in. Building a rootfs is two
//! separate steps, so that the second can be tested on loop devices:
//!
//! 1. [`resolve_rootfs`] (or [`wait_for_disks`]) turns serials into `/dev/vdX` paths,
//!    waiting for slots the host filled just before asking;
//! 2. [`ContainerRootfs::mount`] mounts the layers read-only, the upper layer (a disk or
//!    a tmpfs) and an overlay of them, under the container's directory:
//!
//! ```text
//! <base>/layers/0 .. layers/N-1   the read-only layers, topmost first
//! <base>/upper                     the upper disk or tmpfs, holding fs/ and work/
//! <base>/rootfs                    the overlay: the container's root
//! ```
//!
//! [`ContainerRootfs::teardown`] undoes it all; nothing unmounts on drop.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, DirBuilder, File};
use std::io::{self, Read};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

pub use crate::dm::{Mapped, Region};

/// Where the guest's sysfs lists its block devices.
pub const SYSFS_BLOCK: &str = "/sys/block";
/// How long [`resolve_rootfs`] callers should wait for a disk by default.
pub const DEFAULT_DISK_TIMEOUT: Duration = Duration::from_secs(10);
/// A virtio-blk serial (the GET_ID answer) holds at most this many bytes.
pub const MAX_SERIAL_BYTES: usize = 20;

/// The first pause between two looks at sysfs; it doubles up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(2);
const MAX_BACKOFF: Duration = Duration::from_millis(100);
/// mount(2) copies at most a page of options, and silently cuts longer ones.
const MAX_MOUNT_DATA: usize = 4095;

/// Everything that can go wrong finding disks and mounting or unmounting a rootfs.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("disk serial \"{serial}\": {reason}")]
    InvalidSerial { serial: String, reason: String },
    #[error(
        "cannot list block devices in {}: {source} (is sysfs mounted at /sys?)",
        path.display()
    )]
    ListBlockDevices { path: PathBuf, source: io::Error },
    #[error(
        "disk with serial \"{serial}\": not attached (no {}/vd* has this serial with a \
         non-zero size after {}; attach it to a block slot before CreateContainer){}{}",
        sysfs_block.display(),
        show_duration(*waited),
        show_also_missing(also_missing),
        show_unreadable(unreadable)
    )]
    NotAttached {
        serial: String,
        sysfs_block: PathBuf,
        waited: Duration,
        /// Other serials asked for in the same call that were not found either.
        also_missing: Vec<String>,
        /// vd* attributes that could not be read, with why.
        unreadable: Vec<String>,
    },
    #[error(
        "disk with serial \"{serial}\": attached twice, as {} and {} (give the disk in \
         every block slot its own serial)",
        first.display(),
        second.display()
    )]
    DuplicateSerial {
        serial: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error(
        "disk with serial \"{serial}\" ({}): {sectors} sectors after {}, but the region \
         asked for ends at sector {end} (the host did not add it to the store before \
         CreateContainer)",
        device.display(),
        show_duration(*waited)
    )]
    RegionPastEnd {
        serial: String,
        device: PathBuf,
        sectors: u64,
        end: u64,
        waited: Duration,
    },
    #[error("disk with serial \"{serial}\": region at sector {start} of 0 sectors")]
    EmptyRegion { serial: String, start: u64 },
    #[error("disk with serial \"{serial}\": mapping its region: {source}")]
    Map {
        serial: String,
        source: crate::dm::DmError,
    },
    #[error(
        "disk with serial \"{serial}\": fstype \"{fstype}\" is not supported (a layer must \
         be \"erofs\" or \"ext4\")"
    )]
    UnknownFsType { serial: String, fstype: String },
    #[error(
        "upper disk with serial \"{serial}\": fstype \"{fstype}\" cannot be the writable \
         layer (the upper disk must be \"ext4\", formatted by the host)"
    )]
    UpperNotExt4 { serial: String, fstype: String },
    #[error(
        "rootfs has no read-only layer (give at least one layer disk; an image without \
         layers needs one empty layer)"
    )]
    NoLayers,
    #[error("rootfs upper tmpfs of 0 bytes (give the tmpfs a size: upper_tmpfs_bytes > 0)")]
    EmptyTmpfs,
    #[error(
        "container directory {}: contains ',', ':' or '\\', which overlayfs mount options \
         cannot carry (use a container id without them)",
        path.display()
    )]
    UnusableBaseDir { path: PathBuf },
    #[error(
        "overlayfs options for {layers} layers under {} are {len} bytes, more than the \
         {MAX_MOUNT_DATA} mount(2) takes (use a shorter container directory or fewer layers)",
        base.display()
    )]
    OverlayOptionsTooLong {
        base: PathBuf,
        layers: usize,
        len: usize,
    },
    /// A step of [`ContainerRootfs::mount`] failed; the steps before it were undone.
    #[error("{step}: {source}{hint}{undo}")]
    Mount {
        step: String,
        source: io::Error,
        hint: &'static str,
        /// Empty, or what undoing the earlier steps could not undo.
        undo: String,
    },
    #[error(
        "rootfs under {}: teardown could not finish: {} (what failed is still there; \
         call teardown again once the cause is gone)",
        base.display(),
        failures.join("; ")
    )]
    Teardown {
        base: PathBuf,
        failures: Vec<String>,
    },
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

fn show_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

fn show_also_missing(serials: &[String]) -> String {
    if serials.is_empty() {
        return String::new();
    }
    let quoted: Vec<String> = serials.iter().map(|s| format!("\"{s}\"")).collect();
    format!("; also not attached: {}", quoted.join(", "))
}

fn show_unreadable(what: &[String]) -> String {
    if what.is_empty() {
        String::new()
    } else {
        format!("; could not read {}", what.join(", "))
    }
}

/// A file system a layer may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    Erofs,
    Ext4,
}

impl FsType {
    /// The protocol's name ("erofs" or "ext4"), or None for anything else.
    pub fn from_name(name: &str) -> Option<FsType> {
        match name {
            "erofs" => Some(FsType::Erofs),
            "ext4" => Some(FsType::Ext4),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Erofs => "erofs",
            FsType::Ext4 => "ext4",
        }
    }
}

/// A disk as the protocol names it (`Disk`): its serial and the file system on it, and
/// the region of that device it is, if it is not the whole device (a store's file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub serial: String,
    pub fstype: String,
    pub region: Option<Region>,
}

impl DiskSpec {
    /// The size, in sectors, its device must have before the disk can be used.
    fn min_sectors(&self) -> u64 {
        self.region
            .map_or(1, |r| r.start_sector.saturating_add(r.sectors))
    }
}

/// The protocol's writable layer (`Rootfs.upper`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpperSpec {
    /// A writable disk, formatted ext4 by the host.
    Disk(DiskSpec),
    /// A guest tmpfs of at most this many bytes.
    Tmpfs { size_bytes: u64 },
}

/// A read-only layer, its disk found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSource {
    /// The block device, `/dev/vdX` (a loop device in tests).
    pub device: PathBuf,
    pub fstype: FsType,
}

/// The writable layer, its disk (if any) found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpperSource {
    /// An ext4 block device, mounted read-write.
    Disk { device: PathBuf },
    /// A tmpfs of at most this many bytes.
    Tmpfs { size_bytes: u64 },
}

/// Checks a rootfs request and finds its disks: the layers' devices, topmost first,
/// and the upper layer. Everything that needs no disk is checked before waiting, so a
/// bad request fails at once; then all serials are looked up together (one sysfs scan
/// per attempt, whatever their number), waiting up to `timeout` for slots the host
/// has just filled.
pub fn resolve_rootfs(
    sysfs_block: &Path,
    layers: &[DiskSpec],
    upper: &UpperSpec,
    timeout: Duration,
) -> Result<(Vec<LayerSource>, UpperSource)> {
    if layers.is_empty() {
        return Err(StorageError::NoLayers);
    }
    let mut fstypes = Vec::with_capacity(layers.len());
    for layer in layers {
        let fstype =
            FsType::from_name(&layer.fstype).ok_or_else(|| StorageError::UnknownFsType {
                serial: layer.serial.clone(),
                fstype: layer.fstype.clone(),
            })?;
        fstypes.push(fstype);
    }
    let mut serials: Vec<(&str, u64)> = layers
        .iter()
        .map(|l| (l.serial.as_str(), l.min_sectors()))
        .collect();
    for disk in layers.iter().chain(match upper {
        UpperSpec::Disk(d) => Some(d),
        UpperSpec::Tmpfs { .. } => None,
    }) {
        if let Some(r) = disk.region.filter(|r| r.sectors == 0) {
            return Err(StorageError::EmptyRegion {
                serial: disk.serial.clone(),
                start: r.start_sector,
            });
        }
    }
    match upper {
        UpperSpec::Disk(disk) => {
            if disk.fstype != FsType::Ext4.as_str() {
                return Err(StorageError::UpperNotExt4 {
                    serial: disk.serial.clone(),
                    fstype: disk.fstype.clone(),
                });
            }
            serials.push((&disk.serial, disk.min_sectors()));
        }
        UpperSpec::Tmpfs { size_bytes: 0 } => return Err(StorageError::EmptyTmpfs),
        UpperSpec::Tmpfs { .. } => {}
    }

    let mut devices = wait_for_sized_disks(sysfs_block, &serials, timeout)?;
    let upper = match upper {
        UpperSpec::Disk(_) => UpperSource::Disk {
            // The upper disk's serial was pushed last.
            device: devices.pop().expect("one device per serial"),
        },
        UpperSpec::Tmpfs { size_bytes } => UpperSource::Tmpfs {
            size_bytes: *size_bytes,
        },
    };
    let layers = devices
        .into_iter()
        .zip(fstypes)
        .map(|(device, fstype)| LayerSource { device, fstype })
        .collect();
    Ok((layers, upper))
}

/// Maps the disks that are regions of a store (device-mapper's linear target) and
/// points their sources at the mappings; the mappings, for
/// [`ContainerRootfs::hold`]. `layers` and `upper` are [`resolve_rootfs`]'s answer to
/// `layer_specs` and `upper_spec`. On error nothing stays mapped.
pub fn map_regions(
    layers: &mut [LayerSource],
    layer_specs: &[DiskSpec],
    upper: &mut UpperSource,
    upper_spec: &UpperSpec,
) -> Result<Vec<Mapped>> {
    let mut mapped = Vec::new();
    let mut map = |device: &mut PathBuf, spec: &DiskSpec, read_only: bool| -> Result<()> {
        let Some(region) = spec.region else {
            return Ok(());
        };
        let m =
            crate::dm::acquire(device, region, read_only).map_err(|source| StorageError::Map {
                serial: spec.serial.clone(),
                source,
            })?;
        *device = m.path.clone();
        mapped.push(m);
        Ok(())
    };
    let mut result = layers
        .iter_mut()
        .zip(layer_specs)
        .try_for_each(|(layer, spec)| map(&mut layer.device, spec, true));
    if let (Ok(()), UpperSource::Disk { device }, UpperSpec::Disk(spec)) =
        (&result, &mut *upper, upper_spec)
    {
        result = map(device, spec, false);
    }
    match result {
        Ok(()) => Ok(mapped),
        Err(e) => {
            for failure in release_mappings(&mut mapped) {
                log::warn!("{failure}");
            }
            Err(e)
        }
    }
}

/// Releases mappings, keeping those that could not be released; why those could not.
pub fn release_mappings(mapped: &mut Vec<Mapped>) -> Vec<String> {
    let mut failures = Vec::new();
    mapped.retain(|m| match crate::dm::release(m) {
        Ok(()) => false,
        Err(e) => {
            failures.push(e.to_string());
            true
        }
    });
    failures
}

/// The attached disk with this serial and a non-zero size, as `/dev/vdX`, looking once.
pub fn find_disk(sysfs_block: &Path, serial: &str) -> Result<PathBuf> {
    wait_for_disk(sysfs_block, serial, Duration::ZERO)
}

/// [`find_disk`], looking again with a growing pause (from 2 ms) for up to `timeout`:
/// the guest sees a filled slot's new capacity a moment after the host filled it.
pub fn wait_for_disk(sysfs_block: &Path, serial: &str, timeout: Duration) -> Result<PathBuf> {
    let mut found = wait_for_disks(sysfs_block, &[serial], timeout)?;
    Ok(found.pop().expect("one device per serial"))
}

/// The devices (`/dev/vdX`) of these serials, in their order, waiting up to `timeout`
/// for all of them. Each attempt lists the vd* disks once, reads the size of those not
/// yet claimed and the serial only of those with a non-zero size (reading a serial is a
/// request to the device). A serial may be asked for twice; it gets the same device.
pub fn wait_for_disks(
    sysfs_block: &Path,
    serials: &[&str],
    timeout: Duration,
) -> Result<Vec<PathBuf>> {
    let sized: Vec<(&str, u64)> = serials.iter().map(|s| (*s, 1)).collect();
    wait_for_sized_disks(sysfs_block, &sized, timeout)
}

/// [`wait_for_disks`], each disk at least as many sectors as asked for with its serial
/// (a store grows as the host adds files to it).
pub fn wait_for_sized_disks(
    sysfs_block: &Path,
    wanted: &[(&str, u64)],
    timeout: Duration,
) -> Result<Vec<PathBuf>> {
    for (serial, _) in wanted {
        check_serial(serial)?;
    }
    let started = Instant::now();
    let mut found: Vec<Option<PathBuf>> = vec![None; wanted.len()];
    let mut backoff = FIRST_BACKOFF;
    loop {
        let scanned = scan(sysfs_block, wanted, &mut found)?;
        if found.iter().all(Option::is_some) {
            return Ok(found.into_iter().flatten().collect());
        }
        let waited = started.elapsed();
        if waited >= timeout {
            let unreadable = scanned.unreadable;
            let mut missing = wanted
                .iter()
                .zip(&found)
                .filter(|(_, device)| device.is_none())
                .map(|((serial, min), _)| (serial.to_string(), *min));
            let (serial, min) = missing.next().expect("a serial is missing");
            if let Some((device, sectors)) = scanned.too_small.get(&serial) {
                return Err(StorageError::RegionPastEnd {
                    serial,
                    device: device.clone(),
                    sectors: *sectors,
                    end: min,
                    waited: timeout,
                });
            }
            let missing = missing.map(|(serial, _)| serial);
            let mut also_missing: Vec<String> = Vec::new();
            for other in missing {
                if other != serial && !also_missing.contains(&other) {
                    also_missing.push(other);
                }
            }
            return Err(StorageError::NotAttached {
                serial,
                sysfs_block: sysfs_block.to_owned(),
                waited: timeout,
                also_missing,
                unreadable,
            });
        }
        std::thread::sleep(backoff.min(timeout - waited));
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn check_serial(serial: &str) -> Result<()> {
    let reason = if serial.is_empty() {
        "is empty (every disk the host attaches has a serial; ask for the one it gave)".to_string()
    } else if serial.len() > MAX_SERIAL_BYTES {
        format!(
            "is {} bytes, more than the {MAX_SERIAL_BYTES} a virtio-blk serial holds, so no \
             disk can have it (the host must use serials of at most {MAX_SERIAL_BYTES} bytes)",
            serial.len()
        )
    } else {
        return Ok(());
    };
    Err(StorageError::InvalidSerial {
        serial: serial.to_string(),
        reason,
    })
}

/// What one look at sysfs saw besides the disks it found.
struct Scanned {
    /// vd* attributes that could not be read, with why.
    unreadable: Vec<String>,
    /// Serials seen on a disk smaller than asked for: the disk and its sectors.
    too_small: HashMap<String, (PathBuf, u64)>,
}

/// One look at the vd* disks, filling `found` for the serials it finds on a disk of at
/// least the sectors asked for. Every disk is looked at each time: a store found for
/// one region may still be too small for another. Returns what it could not read (a
/// disk that vanished meanwhile is not that) and the serials seen on too small a disk.
fn scan(
    sysfs_block: &Path,
    wanted: &[(&str, u64)],
    found: &mut [Option<PathBuf>],
) -> Result<Scanned> {
    let list_error = |source| StorageError::ListBlockDevices {
        path: sysfs_block.to_owned(),
        source,
    };
    let mut scanned = Scanned {
        unreadable: Vec::new(),
        too_small: HashMap::new(),
    };
    for entry in fs::read_dir(sysfs_block).map_err(list_error)? {
        let name = entry.map_err(list_error)?.file_name();
        if !name.as_bytes().starts_with(b"vd") {
            continue;
        }
        let device = Path::new("/dev").join(&name);
        let dir = sysfs_block.join(&name);
        let size = match read_attribute(&dir.join("size")) {
            Ok(text) => text.parse::<u64>().unwrap_or(0),
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    scanned
                        .unreadable
                        .push(format!("{}/size ({e})", dir.display()));
                }
                continue;
            }
        };
        if size == 0 {
            continue;
        }
        let serial = match read_attribute(&dir.join("serial")) {
            Ok(serial) => serial,
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    scanned
                        .unreadable
                        .push(format!("{}/serial ({e})", dir.display()));
                }
                continue;
            }
        };
        for ((wanted, min), slot) in wanted.iter().zip(found.iter_mut()) {
            if *wanted != serial {
                continue;
            }
            match slot {
                Some(first) if *first != device => {
                    return Err(StorageError::DuplicateSerial {
                        serial,
                        first: first.clone(),
                        second: device,
                    })
                }
                Some(_) => {}
                None if size < *min => {
                    scanned
                        .too_small
                        .insert(serial.clone(), (device.clone(), size));
                }
                None => *slot = Some(device.clone()),
            }
        }
    }
    Ok(scanned)
}

/// A sysfs attribute, which one read returns whole; without its trailing newline.
fn read_attribute(path: &Path) -> io::Result<String> {
    let mut buf = [0u8; 64];
    let n = File::open(path)?.read(&mut buf)?;
    let text = String::from_utf8_lossy(&buf[..n]);
    Ok(text.trim_end_matches(['\n', '\0']).to_string())
}

/// A container's mounted root filesystem. It stays mounted until
/// [`teardown`](Self::teardown) succeeds: dropping it unmounts nothing.
#[derive(Debug)]
#[must_use = "a mounted rootfs stays mounted until teardown()"]
pub struct ContainerRootfs {
    base: PathBuf,
    rootfs: PathBuf,
    /// Mount points, in the order they were mounted.
    mounted: Vec<PathBuf>,
    /// Directories this made, in the order it made them.
    made_dirs: Vec<PathBuf>,
    /// Mappings of store regions its disks are, released once nothing is mounted.
    mapped: Vec<Mapped>,
}

impl ContainerRootfs {
    /// Mounts the layers read-only at `base_dir/layers/N` (topmost first), the upper
    /// layer at `base_dir/upper` (making `fs` and `work` in it if missing) and the
    /// overlay of them at `base_dir/rootfs`. Makes `base_dir` if missing. On failure
    /// the steps already done are undone and the error names the step that failed.
    pub fn mount(
        base_dir: &Path,
        layers: &[LayerSource],
        upper: &UpperSource,
    ) -> Result<ContainerRootfs> {
        if layers.is_empty() {
            return Err(StorageError::NoLayers);
        }
        if let UpperSource::Tmpfs { size_bytes: 0 } = upper {
            return Err(StorageError::EmptyTmpfs);
        }
        if base_dir
            .as_os_str()
            .as_bytes()
            .iter()
            .any(|b| matches!(b, b',' | b':' | b'\\'))
        {
            return Err(StorageError::UnusableBaseDir {
                path: base_dir.to_owned(),
            });
        }
        let layer_dirs: Vec<PathBuf> = (0..layers.len())
            .map(|n| base_dir.join("layers").join(n.to_string()))
            .collect();
        let upper_dir = base_dir.join("upper");
        let options = overlay_options(&layer_dirs, &upper_dir.join("fs"), &upper_dir.join("work"));
        if options.len() > MAX_MOUNT_DATA {
            return Err(StorageError::OverlayOptionsTooLong {
                base: base_dir.to_owned(),
                layers: layers.len(),
                len: options.len(),
            });
        }

        let mut rootfs = ContainerRootfs {
            base: base_dir.to_owned(),
            rootfs: base_dir.join("rootfs"),
            mounted: Vec::new(),
            made_dirs: Vec::new(),
            mapped: Vec::new(),
        };
        match rootfs.build(layers, &layer_dirs, upper, &upper_dir, &options) {
            Ok(()) => Ok(rootfs),
            Err(failed) => {
                let undo = match rootfs.teardown() {
                    Ok(()) => String::new(),
                    Err(e) => format!("; undoing the earlier steps also failed: {e}"),
                };
                Err(StorageError::Mount {
                    step: failed.step,
                    source: failed.source,
                    hint: failed.hint,
                    undo,
                })
            }
        }
    }

    fn build(
        &mut self,
        layers: &[LayerSource],
        layer_dirs: &[PathBuf],
        upper: &UpperSource,
        upper_dir: &Path,
        overlay_options: &OsString,
    ) -> Result<(), StepFailed> {
        let base = self.base.clone();
        self.make_base_dir(&base)?;
        self.make_dir(&base.join("layers"))?;
        for (n, (layer, dir)) in layers.iter().zip(layer_dirs).enumerate() {
            self.make_dir(dir)?;
            self.mount_one(
                Some(layer.device.as_os_str()),
                dir,
                layer.fstype.as_str(),
                MsFlags::MS_RDONLY,
                None,
            )
            .map_err(|e| {
                StepFailed::new(
                    format!(
                        "mounting layer {n} ({} from {}) read-only on {}",
                        layer.fstype.as_str(),
                        layer.device.display(),
                        dir.display()
                    ),
                    e,
                    layer_hint(e, layer.fstype),
                )
            })?;
        }

        self.make_dir(upper_dir)?;
        match upper {
            UpperSource::Disk { device } => self
                .mount_one(
                    Some(device.as_os_str()),
                    upper_dir,
                    "ext4",
                    MsFlags::empty(),
                    None,
                )
                .map_err(|e| {
                    StepFailed::new(
                        format!(
                            "mounting the upper disk (ext4 from {}) read-write on {}",
                            device.display(),
                            upper_dir.display()
                        ),
                        e,
                        upper_disk_hint(e),
                    )
                })?,
            UpperSource::Tmpfs { size_bytes } => {
                let options = OsString::from(format!("size={size_bytes},mode=0755"));
                self.mount_one(
                    Some("tmpfs".as_ref()),
                    upper_dir,
                    "tmpfs",
                    MsFlags::empty(),
                    Some(&options),
                )
                .map_err(|e| {
                    StepFailed::new(
                        format!(
                            "mounting the upper tmpfs ({size_bytes} bytes) on {}",
                            upper_dir.display()
                        ),
                        e,
                        "",
                    )
                })?
            }
        }
        // Inside the upper file system: they go with it, and an upper disk keeps them.
        for sub in ["fs", "work"] {
            let dir = upper_dir.join(sub);
            match DirBuilder::new().mode(0o755).create(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(StepFailed::new(
                        format!("making the upper directory {}", dir.display()),
                        e,
                        "",
                    ))
                }
            }
        }

        let rootfs = self.rootfs.clone();
        self.make_dir(&rootfs)?;
        self.mount_one(
            Some("overlay".as_ref()),
            &rootfs,
            "overlay",
            MsFlags::empty(),
            Some(overlay_options),
        )
        .map_err(|e| {
            StepFailed::new(
                format!("mounting the overlay on {}", rootfs.display()),
                e,
                overlay_hint(e),
            )
        })
    }

    fn mount_one(
        &mut self,
        source: Option<&std::ffi::OsStr>,
        target: &Path,
        fstype: &str,
        flags: MsFlags,
        data: Option<&OsString>,
    ) -> nix::Result<()> {
        mount(
            source,
            target,
            Some(fstype),
            flags,
            data.map(|d| d.as_os_str()),
        )?;
        self.mounted.push(target.to_owned());
        Ok(())
    }

    fn make_dir(&mut self, dir: &Path) -> Result<(), StepFailed> {
        match DirBuilder::new().mode(0o755).create(dir) {
            Ok(()) => {
                self.made_dirs.push(dir.to_owned());
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(StepFailed::new(
                format!("making the directory {}", dir.display()),
                e,
                "",
            )),
        }
    }

    /// The container's directory, and its parents if missing; only the directory
    /// itself is this rootfs's to remove.
    fn make_base_dir(&mut self, base: &Path) -> Result<(), StepFailed> {
        match DirBuilder::new().mode(0o755).create(base) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(parent) = base.parent() {
                    DirBuilder::new()
                        .recursive(true)
                        .mode(0o755)
                        .create(parent)
                        .map_err(|e| {
                            StepFailed::new(
                                format!("making the directory {}", parent.display()),
                                e,
                                "",
                            )
                        })?;
                }
                self.make_dir(base)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(StepFailed::new(
                format!("making the directory {}", base.display()),
                e,
                "",
            )),
            Ok(()) => {
                self.made_dirs.push(base.to_owned());
                Ok(())
            }
        }
    }

    /// The container's root: the overlay.
    pub fn rootfs_path(&self) -> &Path {
        &self.rootfs
    }

    /// The container's directory the rootfs lives under.
    pub fn base_dir(&self) -> &Path {
        &self.base
    }

    /// Takes the mappings its disks are ([`map_regions`]), to release in teardown.
    pub fn hold(&mut self, mapped: Vec<Mapped>) {
        self.mapped.extend(mapped);
    }

    /// Unmounts the overlay, the upper layer and the layers, in that order (detaching
    /// lazily what is still busy), then removes the directories [`mount`](Self::mount)
    /// made; the container's directory only if empty. Tries every step whatever fails
    /// (directories only once nothing is left mounted) and reports all failures;
    /// called again, it retries only what failed, and once it succeeded it does nothing.
    pub fn teardown(&mut self) -> Result<()> {
        let mut failures = Vec::new();
        let mut still_mounted = Vec::new();
        while let Some(target) = self.mounted.pop() {
            if let Err(e) = unmount(&target) {
                failures.push(format!("unmounting {}: {e}", target.display()));
                still_mounted.push(target);
            }
        }
        still_mounted.reverse();
        self.mounted = still_mounted;

        if self.mounted.is_empty() {
            let mut kept = Vec::new();
            while let Some(dir) = self.made_dirs.pop() {
                match fs::remove_dir(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    // The container's directory holds someone else's files too:
                    // theirs to remove.
                    Err(e)
                        if dir == self.base
                            && e.raw_os_error() == Some(Errno::ENOTEMPTY as i32) => {}
                    Err(e) => {
                        failures.push(format!("removing {}: {e}", dir.display()));
                        kept.push(dir);
                    }
                }
            }
            kept.reverse();
            self.made_dirs = kept;
            failures.extend(release_mappings(&mut self.mapped));
        }

        if failures.is_empty() {
            Ok(())
        } else {
            Err(StorageError::Teardown {
                base: self.base.clone(),
                failures,
            })
        }
    }
}

/// A failed step of `ContainerRootfs::build`, before the undo.
struct StepFailed {
    step: String,
    source: io::Error,
    hint: &'static str,
}

impl StepFailed {
    fn new(step: String, source: impl Into<io::Error>, hint: &'static str) -> StepFailed {
        StepFailed {
            step,
            source: source.into(),
            hint,
        }
    }
}

/// `lowerdir=L0:L1:..,upperdir=U,workdir=W`: lowerdir lists the topmost layer first,
/// the order the protocol gives them in.
fn overlay_options(layer_dirs: &[PathBuf], upper: &Path, work: &Path) -> OsString {
    let mut options = b"lowerdir=".to_vec();
    for (n, dir) in layer_dirs.iter().enumerate() {
        if n > 0 {
            options.push(b':');
        }
        options.extend_from_slice(dir.as_os_str().as_bytes());
    }
    options.extend_from_slice(b",upperdir=");
    options.extend_from_slice(upper.as_os_str().as_bytes());
    options.extend_from_slice(b",workdir=");
    options.extend_from_slice(work.as_os_str().as_bytes());
    OsString::from_vec(options)
}

fn layer_hint(e: Errno, fstype: FsType) -> &'static str {
    match (e, fstype) {
        (Errno::ENODEV, _) => " (the guest kernel cannot mount this file system type)",
        (Errno::ENOENT, _) => " (the device or the mount point does not exist)",
        (Errno::ENOTBLK | Errno::ENXIO, _) => " (the device is not a usable block device)",
        (Errno::EROFS, FsType::Ext4) => {
            " (the ext4 layer needs journal recovery, which a read-only disk cannot do: \
             build layers from a cleanly unmounted file system, or as erofs)"
        }
        (Errno::EINVAL | Errno::EUCLEAN | Errno::EBADMSG, FsType::Erofs) => {
            " (the disk does not hold a valid erofs image: check the layer's fstype and image)"
        }
        (Errno::EINVAL | Errno::EUCLEAN | Errno::EBADMSG, FsType::Ext4) => {
            " (the disk does not hold a valid ext4 file system: check the layer's fstype \
             and image)"
        }
        _ => "",
    }
}

fn upper_disk_hint(e: Errno) -> &'static str {
    match e {
        Errno::EROFS | Errno::EACCES => {
            " (the upper disk is read-only: the host must attach it writable)"
        }
        Errno::EINVAL | Errno::EUCLEAN | Errno::EBADMSG => {
            " (the upper disk does not hold a valid ext4 file system: the host must format it)"
        }
        Errno::ENOENT => " (the device or the mount point does not exist)",
        _ => "",
    }
}

fn overlay_hint(e: Errno) -> &'static str {
    match e {
        Errno::ENODEV => " (the guest kernel has no overlayfs)",
        Errno::EINVAL | Errno::ELOOP => {
            " (overlayfs refused these layers; the guest kernel log says why)"
        }
        _ => "",
    }
}

/// Unmounts `target`, detaching it lazily if busy; done if nothing is mounted there.
fn unmount(target: &Path) -> nix::Result<()> {
    let done = |result: nix::Result<()>| match result {
        // EINVAL: not a mount point (any more); ENOENT: no such directory.
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e),
    };
    match umount2(target, MntFlags::UMOUNT_NOFOLLOW) {
        Err(Errno::EBUSY) => done(umount2(
            target,
            MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW,
        )),
        result => done(result),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A fake /sys/block: each disk a directory with `serial` and `size`.
    struct FakeSysfs(tempfile::TempDir);

    impl FakeSysfs {
        fn new() -> Self {
            Self(tempfile::tempdir().unwrap())
        }

        fn path(&self) -> &Path {
            self.0.path()
        }

        fn disk(&self, name: &str, serial: &str, sectors: u64) -> &Self {
            let dir = self.path().join(name);
            fs::create_dir_all(&dir).unwrap();
            // As the kernel shows them: the serial without a newline, the size with one.
            fs::write(dir.join("serial"), serial).unwrap();
            self.set_size(name, sectors);
            self
        }

        /// Replaces the size in one step, as sysfs shows it: never half written.
        fn set_size(&self, name: &str, sectors: u64) {
            let dir = self.path().join(name);
            fs::write(dir.join("size.new"), format!("{sectors}\n")).unwrap();
            fs::rename(dir.join("size.new"), dir.join("size")).unwrap();
        }
    }

    #[test]
    fn finds_a_disk_by_serial_among_others() {
        let sys = FakeSysfs::new();
        sys.disk("vda", "layer-a", 2048)
            .disk("vdb", "layer-b", 4096)
            .disk("vdc", "upper-c", 8);
        assert_eq!(
            find_disk(sys.path(), "layer-b").unwrap(),
            Path::new("/dev/vdb")
        );
        assert_eq!(
            find_disk(sys.path(), "upper-c").unwrap(),
            Path::new("/dev/vdc")
        );
    }

    #[test]
    fn a_serial_of_exactly_20_bytes_matches() {
        let sys = FakeSysfs::new();
        let serial = "abcdefghij0123456789";
        sys.disk("vdq", serial, 1);
        assert_eq!(
            find_disk(sys.path(), serial).unwrap(),
            Path::new("/dev/vdq")
        );
    }

    #[test]
    fn an_empty_slot_with_the_serial_does_not_count() {
        let sys = FakeSysfs::new();
        sys.disk("vda", "layer-a", 0);
        let err = wait_for_disk(sys.path(), "layer-a", Duration::from_millis(30)).unwrap_err();
        assert!(matches!(err, StorageError::NotAttached { .. }), "{err}");
    }

    #[test]
    fn only_vd_disks_are_looked_at() {
        let sys = FakeSysfs::new();
        sys.disk("loop0", "layer-a", 2048)
            .disk("sda", "layer-a", 2048);
        assert!(find_disk(sys.path(), "layer-a").is_err());
    }

    #[test]
    fn a_missing_serial_says_what_to_do() {
        let sys = FakeSysfs::new();
        sys.disk("vda", "other", 2048);
        let err = wait_for_disk(sys.path(), "layer-x", Duration::from_millis(40)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "disk with serial \"layer-x\": not attached (no {}/vd* has this serial with a \
                 non-zero size after 40ms; attach it to a block slot before CreateContainer)",
                sys.path().display()
            )
        );
    }

    #[test]
    fn the_not_attached_message_with_the_default_timeout() {
        let err = StorageError::NotAttached {
            serial: "X".into(),
            sysfs_block: SYSFS_BLOCK.into(),
            waited: DEFAULT_DISK_TIMEOUT,
            also_missing: vec![],
            unreadable: vec![],
        };
        assert_eq!(
            err.to_string(),
            "disk with serial \"X\": not attached (no /sys/block/vd* has this serial with a \
             non-zero size after 10s; attach it to a block slot before CreateContainer)"
        );
    }

    #[test]
    fn waiting_gives_up_after_the_timeout_not_long_after() {
        let sys = FakeSysfs::new();
        let started = Instant::now();
        let timeout = Duration::from_millis(150);
        wait_for_disk(sys.path(), "nowhere", timeout).unwrap_err();
        let took = started.elapsed();
        assert!(took >= timeout, "gave up after {took:?}");
        assert!(took < timeout + Duration::from_secs(2), "took {took:?}");
    }

    #[test]
    fn waiting_sees_a_slot_filled_meanwhile() {
        let sys = FakeSysfs::new();
        sys.disk("vda", "layer-a", 0);
        let path = sys.path().to_owned();
        let filler = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(40));
            let dir = path.join("vda");
            fs::write(dir.join("size.new"), "2048\n").unwrap();
            fs::rename(dir.join("size.new"), dir.join("size")).unwrap();
        });
        let device = wait_for_disk(sys.path(), "layer-a", Duration::from_secs(5)).unwrap();
        filler.join().unwrap();
        assert_eq!(device, Path::new("/dev/vda"));
    }

    #[test]
    fn several_serials_are_found_in_their_order() {
        let sys = FakeSysfs::new();
        sys.disk("vda", "c", 1)
            .disk("vdb", "a", 1)
            .disk("vdc", "b", 1);
        let found = wait_for_disks(sys.path(), &["a", "b", "c", "a"], Duration::ZERO).unwrap();
        let want: Vec<PathBuf> = ["/dev/vdb", "/dev/vdc", "/dev/vda", "/dev/vdb"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(found, want);
    }

    #[test]
    fn every_missing_serial_is_named() {
        let sys = FakeSysfs::new();
        sys.disk("vda", "a", 1);
        let err =
            wait_for_disks(sys.path(), &["a", "b", "c", "b", "c"], Duration::ZERO).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("disk with serial \"b\": not attached"),
            "{text}"
        );
        assert!(text.ends_with("; also not attached: \"c\""), "{text}");
    }

    #[test]
    fn a_serial_on_two_disks_is_refused() {
        let sys = FakeSysfs::new();
        sys.disk("vda", "twin", 1).disk("vdb", "twin", 1);
        let err = find_disk(sys.path(), "twin").unwrap_err();
        assert!(matches!(err, StorageError::DuplicateSerial { .. }), "{err}");
        assert!(err.to_string().contains("attached twice"), "{err}");
    }

    #[test]
    fn impossible_serials_fail_at_once() {
        let sys = FakeSysfs::new();
        let started = Instant::now();
        let err = wait_for_disk(sys.path(), "", Duration::from_secs(10)).unwrap_err();
        assert!(matches!(err, StorageError::InvalidSerial { .. }), "{err}");
        let err = wait_for_disk(sys.path(), "abcdefghij0123456789x", Duration::from_secs(10))
            .unwrap_err();
        assert!(err.to_string().contains("21 bytes"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_missing_sysfs_is_an_error_naming_it() {
        let err = find_disk(Path::new("/nonexistent/sys/block"), "a").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot list block devices in /nonexistent/sys/block:"),
            "{err}"
        );
    }

    fn disk(serial: &str, fstype: &str) -> DiskSpec {
        DiskSpec {
            serial: serial.into(),
            fstype: fstype.into(),
            region: None,
        }
    }

    #[test]
    fn resolve_gives_layers_in_order_and_the_upper_disk() {
        let sys = FakeSysfs::new();
        sys.disk("vda", "top", 1)
            .disk("vdb", "bottom", 1)
            .disk("vdc", "upper", 1);
        let (layers, upper) = resolve_rootfs(
            sys.path(),
            &[disk("top", "erofs"), disk("bottom", "ext4")],
            &UpperSpec::Disk(disk("upper", "ext4")),
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(
            layers,
            vec![
                LayerSource {
                    device: "/dev/vda".into(),
                    fstype: FsType::Erofs
                },
                LayerSource {
                    device: "/dev/vdb".into(),
                    fstype: FsType::Ext4
                },
            ]
        );
        assert_eq!(
            upper,
            UpperSource::Disk {
                device: "/dev/vdc".into()
            }
        );
    }

    #[test]
    fn resolve_refuses_bad_requests_without_waiting() {
        let sys = FakeSysfs::new();
        let long = Duration::from_secs(10);
        let started = Instant::now();
        let tmpfs = UpperSpec::Tmpfs {
            size_bytes: 1 << 20,
        };

        let err = resolve_rootfs(sys.path(), &[disk("a", "btrfs")], &tmpfs, long).unwrap_err();
        assert_eq!(
            err.to_string(),
            "disk with serial \"a\": fstype \"btrfs\" is not supported (a layer must be \
             \"erofs\" or \"ext4\")"
        );
        let err = resolve_rootfs(sys.path(), &[], &tmpfs, long).unwrap_err();
        assert!(matches!(err, StorageError::NoLayers), "{err}");
        let err = resolve_rootfs(
            sys.path(),
            &[disk("a", "erofs")],
            &UpperSpec::Disk(disk("u", "erofs")),
            long,
        )
        .unwrap_err();
        assert!(matches!(err, StorageError::UpperNotExt4 { .. }), "{err}");
        let err = resolve_rootfs(
            sys.path(),
            &[disk("a", "erofs")],
            &UpperSpec::Tmpfs { size_bytes: 0 },
            long,
        )
        .unwrap_err();
        assert!(matches!(err, StorageError::EmptyTmpfs), "{err}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn overlay_options_list_the_topmost_layer_first() {
        let dirs = [PathBuf::from("/c/layers/0"), PathBuf::from("/c/layers/1")];
        let options = overlay_options(&dirs, Path::new("/c/upper/fs"), Path::new("/c/upper/work"));
        assert_eq!(
            options,
            "lowerdir=/c/layers/0:/c/layers/1,upperdir=/c/upper/fs,workdir=/c/upper/work"
        );
    }

    fn tmpfs_upper() -> UpperSource {
        UpperSource::Tmpfs {
            size_bytes: 1 << 20,
        }
    }

    fn some_layer() -> Vec<LayerSource> {
        vec![LayerSource {
            device: "/dev/null".into(),
            fstype: FsType::Erofs,
        }]
    }

    #[test]
    fn mount_refuses_what_overlayfs_cannot_take_before_touching_anything() {
        let tmp = tempfile::tempdir().unwrap();
        for bad in ["a,b", "a:b", "a\\b"] {
            let base = tmp.path().join(bad);
            let err = ContainerRootfs::mount(&base, &some_layer(), &tmpfs_upper()).unwrap_err();
            assert!(matches!(err, StorageError::UnusableBaseDir { .. }), "{err}");
            assert!(!base.exists());
        }
        let base = tmp.path().join("c".repeat(200));
        let layers: Vec<LayerSource> = (0..40).flat_map(|_| some_layer()).collect();
        let err = ContainerRootfs::mount(&base, &layers, &tmpfs_upper()).unwrap_err();
        assert!(
            matches!(err, StorageError::OverlayOptionsTooLong { .. }),
            "{err}"
        );
        let err = ContainerRootfs::mount(&base, &[], &tmpfs_upper()).unwrap_err();
        assert!(matches!(err, StorageError::NoLayers), "{err}");
        assert!(!base.exists());
    }

    // The tests below mount for real: they need root, loop devices, mkfs.ext4
    // (e2fsprogs) and mkfs.erofs (erofs-utils), which .ci/install-deps.sh installs.

    fn needs_root() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "needs root: this test mounts loop devices; run the tests as root"
        );
    }

    fn run(cmd: &mut Command) -> String {
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A directory tree written from (path, contents) pairs.
    fn tree(dir: &Path, files: &[(&str, &str)]) {
        fs::create_dir_all(dir).unwrap();
        for (path, contents) in files {
            let path = dir.join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, contents).unwrap();
        }
    }

    fn ext4_image(dir: &Path, image: &Path) {
        run(Command::new("mkfs.ext4")
            .args(["-q", "-d"])
            .arg(dir)
            .arg(image)
            .arg("4M"));
    }

    fn erofs_image(dir: &Path, image: &Path) {
        run(Command::new("mkfs.erofs")
            .arg("--quiet")
            .arg(image)
            .arg(dir));
    }

    /// A loop device, detached when dropped, even if the test failed.
    struct Loop(PathBuf);

    impl Loop {
        fn attach(image: &Path, read_only: bool) -> Loop {
            let mut cmd = Command::new("losetup");
            cmd.args(["--find", "--show"]);
            if read_only {
                cmd.arg("--read-only");
            }
            Loop(PathBuf::from(run(cmd.arg(image)).trim()))
        }
    }

    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }

    /// Tears the rootfs down if the test did not get to it, so a failed test leaves
    /// no mounts; dropped before the loop devices it uses.
    struct Mounted(ContainerRootfs);

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = self.0.teardown();
        }
    }

    fn mounts_under(dir: &Path) -> Vec<String> {
        let prefix = dir.to_str().unwrap();
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|line| {
                line.split(' ')
                    .nth(4)
                    .is_some_and(|mount_point| mount_point.starts_with(prefix))
            })
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn two_ext4_layers_under_a_tmpfs_upper() {
        needs_root();
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        tree(&t.join("top"), &[("etc/who", "top\n"), ("only-top", "t\n")]);
        tree(
            &t.join("bottom"),
            &[
                ("etc/who", "bottom\n"),
                ("only-bottom", "b\n"),
                ("bin/sh", "x"),
            ],
        );
        ext4_image(&t.join("top"), &t.join("top.img"));
        ext4_image(&t.join("bottom"), &t.join("bottom.img"));
        let top = Loop::attach(&t.join("top.img"), true);
        let bottom = Loop::attach(&t.join("bottom.img"), true);

        let base = t.join("containers").join("c1");
        let layers = [
            LayerSource {
                device: top.0.clone(),
                fstype: FsType::Ext4,
            },
            LayerSource {
                device: bottom.0.clone(),
                fstype: FsType::Ext4,
            },
        ];
        let mut rootfs = Mounted(ContainerRootfs::mount(&base, &layers, &tmpfs_upper()).unwrap());
        let root = rootfs.0.rootfs_path().to_owned();
        assert_eq!(root, base.join("rootfs"));
        assert_eq!(mounts_under(&base).len(), 4, "{:?}", mounts_under(&base));

        // The upper layer wins, and the lower ones show through.
        assert_eq!(fs::read_to_string(root.join("etc/who")).unwrap(), "top\n");
        assert_eq!(fs::read_to_string(root.join("only-top")).unwrap(), "t\n");
        assert_eq!(fs::read_to_string(root.join("only-bottom")).unwrap(), "b\n");
        assert!(root.join("bin/sh").exists());

        // Writes land in the upper layer; the layers stay as they were.
        fs::write(root.join("new"), "fresh\n").unwrap();
        fs::write(root.join("only-bottom"), "changed\n").unwrap();
        assert_eq!(
            fs::read_to_string(base.join("upper/fs/new")).unwrap(),
            "fresh\n"
        );
        assert_eq!(
            fs::read_to_string(base.join("upper/fs/only-bottom")).unwrap(),
            "changed\n"
        );
        assert_eq!(
            fs::read_to_string(base.join("layers/1/only-bottom")).unwrap(),
            "b\n"
        );
        assert_eq!(
            fs::read_to_string(root.join("only-bottom")).unwrap(),
            "changed\n"
        );

        rootfs.0.teardown().unwrap();
        assert_eq!(mounts_under(&base), Vec::<String>::new());
        assert!(!base.exists(), "teardown left {}", base.display());
        assert!(
            t.join("containers").exists(),
            "teardown removed a parent it did not make"
        );
        // Again: nothing left to do.
        rootfs.0.teardown().unwrap();
    }

    #[test]
    fn an_erofs_layer_under_an_ext4_upper_disk_that_keeps_the_writes() {
        needs_root();
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        tree(&t.join("layer"), &[("etc/os-release", "ID=peapod\n")]);
        erofs_image(&t.join("layer"), &t.join("layer.img"));
        tree(&t.join("empty"), &[]);
        ext4_image(&t.join("empty"), &t.join("upper.img"));
        let layer = Loop::attach(&t.join("layer.img"), true);
        let upper_disk = Loop::attach(&t.join("upper.img"), false);

        let base = t.join("c2");
        fs::create_dir(&base).unwrap();
        fs::write(base.join("config.json"), "{}").unwrap();
        let layers = [LayerSource {
            device: layer.0.clone(),
            fstype: FsType::Erofs,
        }];
        let upper = UpperSource::Disk {
            device: upper_disk.0.clone(),
        };
        let mut rootfs = Mounted(ContainerRootfs::mount(&base, &layers, &upper).unwrap());
        let root = rootfs.0.rootfs_path().to_owned();
        assert_eq!(
            fs::read_to_string(root.join("etc/os-release")).unwrap(),
            "ID=peapod\n"
        );
        fs::write(root.join("etc/written"), "kept\n").unwrap();
        rootfs.0.teardown().unwrap();
        assert_eq!(mounts_under(&base), Vec::<String>::new());
        // The directory was there before and holds another file: it stays, the
        // rootfs's own directories go.
        assert!(base.join("config.json").exists());
        for dir in ["layers", "upper", "rootfs"] {
            assert!(!base.join(dir).exists(), "teardown left {dir}");
        }

        // The same upper disk again: the write is still there.
        let mut again = Mounted(ContainerRootfs::mount(&base, &layers, &upper).unwrap());
        assert_eq!(
            fs::read_to_string(again.0.rootfs_path().join("etc/written")).unwrap(),
            "kept\n"
        );
        again.0.teardown().unwrap();
        assert_eq!(mounts_under(&base), Vec::<String>::new());
    }

    #[test]
    fn a_failed_step_undoes_the_steps_before_it() {
        needs_root();
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        tree(&t.join("layer"), &[("a", "a\n")]);
        ext4_image(&t.join("layer"), &t.join("layer.img"));
        let good = Loop::attach(&t.join("layer.img"), true);
        // An ext4 image declared as erofs: the second layer cannot mount.
        let mislabelled = Loop::attach(&t.join("layer.img"), true);

        let base = t.join("c3");
        let layers = [
            LayerSource {
                device: good.0.clone(),
                fstype: FsType::Ext4,
            },
            LayerSource {
                device: mislabelled.0.clone(),
                fstype: FsType::Erofs,
            },
        ];
        let err = ContainerRootfs::mount(&base, &layers, &tmpfs_upper()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "mounting layer 1 (erofs from {}) read-only on {}:",
                mislabelled.0.display(),
                base.join("layers/1").display()
            )),
            "{text}"
        );
        assert!(text.contains("valid erofs image"), "{text}");
        assert_eq!(mounts_under(&base), Vec::<String>::new());
        assert!(!base.exists(), "the failed mount left {}", base.display());

        // The last step failing, with the layer and the upper tmpfs mounted: the
        // overlay's mount point is a file.
        let base = t.join("c4");
        fs::create_dir(&base).unwrap();
        fs::write(base.join("rootfs"), "").unwrap();
        let err = ContainerRootfs::mount(&base, &layers[..1], &tmpfs_upper()).unwrap_err();
        assert!(
            err.to_string().starts_with(&format!(
                "mounting the overlay on {}:",
                base.join("rootfs").display()
            )),
            "{err}"
        );
        assert_eq!(mounts_under(&base), Vec::<String>::new());
        let left: Vec<_> = fs::read_dir(&base)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left,
            ["rootfs"],
            "only the file that was there before stays"
        );

        // A device that does not exist.
        let base = t.join("c5");
        fs::create_dir(&base).unwrap();
        let err = ContainerRootfs::mount(
            &base,
            &layers[..1],
            &UpperSource::Disk {
                device: t.join("no-such-device"),
            },
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("mounting the upper disk (ext4 from"),
            "{err}"
        );
        assert_eq!(mounts_under(&base), Vec::<String>::new());
        assert_eq!(fs::read_dir(&base).unwrap().count(), 0);
    }
}
