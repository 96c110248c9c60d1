//! The opened backing file of a slot, and the data path between it and the guest.
//!
//! Data goes through a fixed bounce buffer the device owns (`BOUNCE_BYTES`), one chunk
//! at a time: `virtio-queue`'s Reader and Writer only copy to and from Rust slices, and
//! pread/pwrite straight into guest memory would need raw pointers into it. The extra
//! copy is a memcpy next to a syscall; the buffer never grows with what a chain claims.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::sync::Arc;

use virtio_queue::{Reader, Writer};

use super::request::RequestError;
use super::{BlockBacking, BlockError, PassedFile, MAX_ID_BYTES};

pub(super) const SECTOR_SIZE: u64 = 512;
/// The bounce buffer: one chunk of a request's data.
pub(super) const BOUNCE_BYTES: usize = 128 << 10;

pub(super) struct Disk {
    pub backing: BlockBacking,
    file: File,
    /// Whole sectors; a partial last sector is out of the guest's reach.
    pub sectors: u64,
    /// The GET_ID answer: the ID, NUL padded.
    pub id: [u8; MAX_ID_BYTES],
}

impl Disk {
    /// Checks the ID and opens the file (or takes the one passed); nothing is kept on
    /// error.
    pub fn open(mut backing: BlockBacking) -> Result<Self, BlockError> {
        let id = id_bytes(&backing.id)?;
        let file = match backing.file.take() {
            Some(passed) => passed_file(passed, &backing)?,
            None => OpenOptions::new()
                .read(true)
                .write(!backing.read_only)
                .open(&backing.path)
                .map_err(|source| match source.kind() {
                    std::io::ErrorKind::NotFound => BlockError::NotFound {
                        path: backing.path.clone(),
                    },
                    _ => BlockError::Open {
                        path: backing.path.clone(),
                        read_only: backing.read_only,
                        source,
                    },
                })?,
        };
        let size_error = |source| BlockError::Size {
            path: backing.path.clone(),
            source,
        };
        let file_type = file.metadata().map_err(size_error)?.file_type();
        if !file_type.is_file() && !file_type.is_block_device() {
            return Err(BlockError::NotADisk {
                path: backing.path.clone(),
            });
        }
        // Seeking to the end sizes block devices too, whose metadata length is 0.
        let bytes = (&file).seek(SeekFrom::End(0)).map_err(size_error)?;
        if !bytes.is_multiple_of(SECTOR_SIZE) {
            log::warn!(
                "virtio-blk: {} is {bytes} bytes, not a multiple of {SECTOR_SIZE}; the guest \
                 sees only the whole sectors",
                backing.path.display()
            );
        }
        Ok(Self {
            sectors: bytes / SECTOR_SIZE,
            backing,
            file,
            id,
        })
    }

    /// Fills `data` from the file at `offset`.
    pub fn read_to(
        &self,
        offset: u64,
        data: &mut Writer<'_>,
        bounce: &mut [u8],
    ) -> Result<(), RequestError> {
        let mut offset = offset;
        let mut remaining = data.available_bytes();
        while remaining > 0 {
            let chunk = &mut bounce[..remaining.min(BOUNCE_BYTES)];
            // A file that shrank under the device ends early: an I/O error.
            self.file
                .read_exact_at(chunk, offset)
                .map_err(RequestError::Disk)?;
            data.write_all(chunk).map_err(RequestError::Guest)?;
            offset += chunk.len() as u64;
            remaining -= chunk.len();
        }
        Ok(())
    }

    /// Writes what is left in `data` to the file at `offset`.
    pub fn write_from(
        &self,
        offset: u64,
        data: &mut Reader<'_>,
        bounce: &mut [u8],
    ) -> Result<(), RequestError> {
        let mut offset = offset;
        let mut remaining = data.available_bytes();
        while remaining > 0 {
            let chunk = &mut bounce[..remaining.min(BOUNCE_BYTES)];
            data.read_exact(chunk).map_err(RequestError::Guest)?;
            self.file
                .write_all_at(chunk, offset)
                .map_err(RequestError::Disk)?;
            offset += chunk.len() as u64;
            remaining -= chunk.len();
        }
        Ok(())
    }

    /// Makes the guest's completed writes durable. A read-only file has none.
    pub fn flush(&self) -> Result<(), RequestError> {
        if self.backing.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(RequestError::Disk)
    }
}

/// The passed file, owned; refused if the slot must write and the file cannot.
fn passed_file(passed: PassedFile, backing: &BlockBacking) -> Result<File, BlockError> {
    let open_err = |source| BlockError::Open {
        path: backing.path.clone(),
        read_only: backing.read_only,
        source,
    };
    let file = Arc::try_unwrap(passed.0).or_else(|shared| shared.try_clone().map_err(open_err))?;
    // SAFETY: F_GETFL only reads the flags of `file`, an open descriptor we own.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(open_err(std::io::Error::last_os_error()));
    }
    if !backing.read_only && flags & libc::O_ACCMODE == libc::O_RDONLY {
        return Err(BlockError::PassedReadOnly {
            path: backing.path.clone(),
        });
    }
    Ok(file)
}

/// The GET_ID answer for `id`, or why `id` cannot be one.
pub(super) fn id_bytes(id: &str) -> Result<[u8; MAX_ID_BYTES], BlockError> {
    if id.len() > MAX_ID_BYTES {
        return Err(BlockError::IdTooLong {
            id: id.to_owned(),
            len: id.len(),
        });
    }
    if !id.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(BlockError::IdNotPrintable { id: id.to_owned() });
    }
    let mut bytes = [0; MAX_ID_BYTES];
    bytes[..id.len()].copy_from_slice(id.as_bytes());
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::test_support::TempImage;

    fn backing(path: &std::path::Path, id: &str) -> BlockBacking {
        BlockBacking {
            path: path.to_owned(),
            read_only: false,
            id: id.to_owned(),
            file: None,
        }
    }

    #[test]
    fn ids_are_padded_and_checked() {
        let image = TempImage::new(&[0; 512]);
        let disk = Disk::open(backing(&image.path, "pod-7 layer")).unwrap();
        assert_eq!(&disk.id[..11], b"pod-7 layer");
        assert_eq!(disk.id[11..], [0; 9]);
        assert!(Disk::open(backing(&image.path, &"x".repeat(20))).is_ok());

        let err = Disk::open(backing(&image.path, &"x".repeat(21)))
            .err()
            .unwrap();
        assert!(
            matches!(err, BlockError::IdTooLong { len: 21, .. }),
            "{err}"
        );
        for bad in ["tab\there", "caf\u{e9}", "nul\0"] {
            let err = Disk::open(backing(&image.path, bad)).err().unwrap();
            assert!(matches!(err, BlockError::IdNotPrintable { .. }), "{err}");
        }
    }

    /// A passed file is served as it is: its path is only a name, never opened.
    #[test]
    fn a_passed_file_is_used_and_its_path_only_names_it() {
        let image = TempImage::new(&[7; 1024]);
        let passed = |write: bool| {
            let f = OpenOptions::new()
                .read(true)
                .write(write)
                .open(&image.path)
                .unwrap();
            Some(PassedFile(Arc::new(f)))
        };
        let mut b = backing(std::path::Path::new("/nowhere/layer.img"), "p");
        b.file = passed(true);
        let disk = Disk::open(b).unwrap();
        assert_eq!(disk.sectors, 2);
        assert_eq!(disk.backing.file, None, "the disk owns the file now");

        let mut b = backing(std::path::Path::new("/nowhere/upper.img"), "p");
        b.file = passed(false);
        let err = Disk::open(b).err().unwrap();
        assert!(matches!(err, BlockError::PassedReadOnly { .. }), "{err}");
        assert!(err.to_string().contains("/nowhere/upper.img"), "{err}");

        let mut b = backing(std::path::Path::new("/nowhere/layer.img"), "p");
        b.read_only = true;
        b.file = passed(false);
        assert!(
            Disk::open(b).is_ok(),
            "a read-only slot takes a read-only file"
        );
    }

    #[test]
    fn capacity_is_whole_sectors() {
        let image = TempImage::new(&[1; 1000]);
        let disk = Disk::open(backing(&image.path, "a")).unwrap();
        assert_eq!(disk.sectors, 1);
        assert_eq!(disk.sectors * SECTOR_SIZE, 512);
    }

    #[test]
    fn open_errors_name_the_path_and_the_fix() {
        let missing = std::env::temp_dir().join("peapod-blk-test-no-such-file.img");
        let err = Disk::open(backing(&missing, "a")).err().unwrap();
        let msg = err.to_string();
        assert!(matches!(err, BlockError::NotFound { .. }), "{msg}");
        assert!(msg.contains(&*missing.to_string_lossy()), "{msg}");
        assert!(msg.contains("layer cache"), "{msg}");

        let directory = BlockBacking {
            read_only: true,
            ..backing(&std::env::temp_dir(), "a")
        };
        let err = Disk::open(directory).err().unwrap();
        assert!(matches!(err, BlockError::NotADisk { .. }), "{err}");
    }
}
