//! Loading a Linux guest for the 64-bit boot protocol: ELF `vmlinux`, initramfs,
//! command line and the zero page with its e820 map.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::elf;
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::load_cmdline;
use vm_memory::{Address, ByteValued, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_START, ZERO_PAGE_START,
};
use crate::memory::{place_file, ram_ranges};

/// The 64-bit entry point of a vmlinux is its ELF entry address.
pub struct LoadedKernel {
    pub entry: GuestAddress,
    /// First guest-physical byte past the kernel image (including its .bss).
    pub end: u64,
}

pub struct LoadedInitrd {
    pub addr: GuestAddress,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel {path}: {source} (build it with kernel-config/build.sh and pass --kernel)")]
    KernelOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {0}: not an ELF vmlinux (a bzImage is not supported: pass the uncompressed vmlinux from the kernel build)")]
    KernelNotElf(PathBuf),
    #[error("kernel {0}: a 64-bit x86 ELF vmlinux is needed")]
    KernelWrongElf(PathBuf),
    #[error("kernel {path}: it occupies guest memory up to {needs_mib} MiB, but the VM has {have_mib} MiB below the MMIO gap; give the VM more memory")]
    KernelTooBig {
        path: PathBuf,
        needs_mib: u64,
        have_mib: u64,
    },
    #[error("kernel {path}: truncated or corrupt ELF: {detail}")]
    KernelCorrupt { path: PathBuf, detail: String },
    #[error("initrd {path}: {source} (build it with rootfs/build.sh and pass --initrd)")]
    InitrdOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd {path}: {size} bytes do not fit between the kernel (ends at {kernel_end:#x}) and the end of low memory ({low_end:#x}); give the VM more memory")]
    InitrdTooBig {
        path: PathBuf,
        size: u64,
        kernel_end: u64,
        low_end: u64,
    },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("writing boot structures into guest memory: {0}")]
    GuestMemory(String),
}

/// End of the RAM range that starts at 0 (the kernel, initrd and boot data live there).
fn low_mem_end(memory_size: u64) -> u64 {
    memory_size.min(MMIO_GAP_START)
}

/// What of the kernel's ELF file goes into guest memory.
struct ElfImage {
    entry: u64,
    /// First guest-physical byte past the last segment (including its .bss).
    end: u64,
    segments: Vec<Segment>,
}

/// A loadable segment of the kernel's ELF file.
struct Segment {
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// Reads the ELF header and program headers, checking that the kernel is the right
/// kind of file, that its segments are sane and that it fits in guest memory.
fn read_elf(path: &Path, file: &mut File, memory_size: u64) -> Result<ElfImage, BootError> {
    let corrupt = |detail: &str| BootError::KernelCorrupt {
        path: path.into(),
        detail: detail.into(),
    };
    let mut ehdr = elf::Elf64_Ehdr::default();
    if file.read_exact(ehdr.as_mut_slice()).is_err()
        || ehdr.e_ident[..4] != [0x7f, b'E', b'L', b'F']
    {
        return Err(BootError::KernelNotElf(path.into()));
    }
    if ehdr.e_ident[elf::EI_CLASS] != elf::ELFCLASS64 || ehdr.e_machine != elf::EM_X86_64 {
        return Err(BootError::KernelWrongElf(path.into()));
    }
    let file_len = file.metadata().map_err(|e| corrupt(&e.to_string()))?.len();
    let mut segments = Vec::new();
    file.seek(SeekFrom::Start(ehdr.e_phoff))
        .map_err(|_| corrupt("program headers past end of file"))?;
    for _ in 0..ehdr.e_phnum {
        let mut phdr = elf::Elf64_Phdr::default();
        file.read_exact(phdr.as_mut_slice())
            .map_err(|_| corrupt("program headers past end of file"))?;
        if phdr.p_type != elf::PT_LOAD || phdr.p_memsz == 0 {
            continue;
        }
        if phdr.p_filesz > phdr.p_memsz
            || phdr
                .p_offset
                .checked_add(phdr.p_filesz)
                .is_none_or(|e| e > file_len)
        {
            return Err(corrupt("a segment runs past the end of the file"));
        }
        if phdr.p_paddr < HIMEM_START.raw_value() {
            return Err(corrupt("a segment loads below 1 MiB, over the boot data"));
        }
        phdr.p_paddr
            .checked_add(phdr.p_memsz)
            .ok_or_else(|| corrupt("segment address overflows"))?;
        segments.push(Segment {
            offset: phdr.p_offset,
            paddr: phdr.p_paddr,
            filesz: phdr.p_filesz,
            memsz: phdr.p_memsz,
        });
    }
    let end = segments
        .iter()
        .map(|s| s.paddr + s.memsz)
        .max()
        .unwrap_or(0);
    if end == 0 {
        return Err(corrupt("no loadable segments"));
    }
    let low_end = low_mem_end(memory_size);
    if end > low_end {
        return Err(BootError::KernelTooBig {
            path: path.into(),
            needs_mib: end.div_ceil(1 << 20),
            have_mib: low_end >> 20,
        });
    }
    Ok(ElfImage {
        entry: ehdr.e_entry,
        end,
        segments,
    })
}

/// Loads the kernel's segments (mapped from the file, see `memory::place_file`); a
/// segment's .bss lies in fresh guest memory and is already zero.
pub fn load_kernel(
    memory: &GuestMemoryMmap,
    memory_size: u64,
    path: &Path,
) -> Result<LoadedKernel, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::KernelOpen {
        path: path.into(),
        source,
    })?;
    let image = read_elf(path, &mut file, memory_size)?;
    for seg in &image.segments {
        place_file(
            memory,
            GuestAddress(seg.paddr),
            &mut file,
            seg.offset,
            seg.filesz,
        )
        .map_err(|e| BootError::KernelCorrupt {
            path: path.into(),
            detail: format!("loading the segment at {:#x}: {e}", seg.paddr),
        })?;
    }
    Ok(LoadedKernel {
        entry: GuestAddress(image.entry),
        end: image.end,
    })
}

/// Places the initramfs at the top of low memory, page aligned, as bootloaders do.
pub fn load_initrd(
    memory: &GuestMemoryMmap,
    memory_size: u64,
    kernel_end: u64,
    path: &Path,
) -> Result<LoadedInitrd, BootError> {
    let open_err = |source| BootError::InitrdOpen {
        path: path.into(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    if !meta.is_file() {
        return Err(open_err(std::io::Error::other(
            "not a regular file, so not an initramfs",
        )));
    }
    let size = meta.len();
    let low_end = low_mem_end(memory_size);
    let too_big = || BootError::InitrdTooBig {
        path: path.into(),
        size,
        kernel_end,
        low_end,
    };
    let addr = low_end.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if addr < kernel_end {
        return Err(too_big());
    }
    place_file(memory, GuestAddress(addr), &mut file, 0, size)
        .map_err(|e| open_err(std::io::Error::other(format!("cannot read it: {e}"))))?;
    Ok(LoadedInitrd {
        addr: GuestAddress(addr),
        size,
    })
}

/// Builds the command line from the VMM's own words and the user's extra ones.
pub fn build_cmdline(words: &[&str], extra: &str) -> Result<Cmdline, BootError> {
    let mut cmdline =
        Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    for word in words.iter().copied().chain(extra.split_whitespace()) {
        cmdline
            .insert_str(word)
            .map_err(|e| BootError::Cmdline(format!("adding {word:?}: {e}")))?;
    }
    Ok(cmdline)
}

/// e820 types from the boot protocol.
const E820_RAM: u32 = 1;

/// The RAM map the kernel sees: low memory below the EBDA, then from 1 MiB to the
/// end of low RAM, then above 4 GiB for large guests.
pub fn e820_map(memory_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![(0, EBDA_START.raw_value(), E820_RAM)];
    for (start, len) in ram_ranges(memory_size) {
        let end = start.raw_value() + len;
        let start = start.raw_value().max(HIMEM_START.raw_value());
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

pub fn write_boot_params(
    memory: &GuestMemoryMmap,
    memory_size: u64,
    cmdline: &Cmdline,
    initrd: &LoadedInitrd,
) -> Result<(), BootError> {
    load_cmdline(memory, CMDLINE_START, cmdline)
        .map_err(|e| BootError::GuestMemory(e.to_string()))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?
        .as_bytes()
        .len();

    let mut params = boot_params::default();
    // Values from Documentation/x86/boot.rst.
    params.hdr.type_of_loader = 0xff; // "undefined" bootloader
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.kernel_alignment = 0x0100_0000;
    params.hdr.cmd_line_ptr = CMDLINE_START.raw_value() as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.ramdisk_image = initrd.addr.raw_value() as u32;
    params.hdr.ramdisk_size = initrd.size as u32;

    let map = e820_map(memory_size);
    for (entry, (addr, size, type_)) in params.e820_table.iter_mut().zip(&map) {
        entry.addr = *addr;
        entry.size = *size;
        entry.r#type = *type_;
    }
    params.e820_entries = map.len() as u8;

    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, ZERO_PAGE_START),
        memory,
    )
    .map_err(|e| BootError::GuestMemory(e.to_string()))
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MMIO_GAP_END;

    #[test]
    fn e820_skips_the_legacy_hole_and_the_mmio_gap() {
        assert_eq!(
            e820_map(128 << 20),
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x10_0000, (128 << 20) - 0x10_0000, E820_RAM)
            ]
        );
        let big = 5u64 << 30;
        let map = e820_map(big);
        assert_eq!(map[1], (0x10_0000, MMIO_GAP_START - 0x10_0000, E820_RAM));
        assert_eq!(map[2], (MMIO_GAP_END, big - MMIO_GAP_START, E820_RAM));
    }

    #[test]
    fn cmdline_joins_vmm_and_user_words_and_refuses_overflow() {
        let c = build_cmdline(&["console=ttyS0", "quiet"], " foo=1  bar ").unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 quiet foo=1 bar"
        );
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(build_cmdline(&["quiet"], &long).is_err());
    }

    #[test]
    fn non_elf_and_oversized_kernels_are_named() {
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        let dir = std::env::temp_dir().join(format!("peapod-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_elf = dir.join("bzImage");
        std::fs::write(&not_elf, b"MZ this is not an ELF file").unwrap();
        let err = load_kernel(&mem, 64 << 20, &not_elf).err().unwrap();
        assert!(matches!(err, BootError::KernelNotElf(_)), "{err}");

        // An ELF header whose one PT_LOAD segment ends at 200 MiB.
        let mut ehdr = elf::Elf64_Ehdr::default();
        ehdr.e_ident[..4].copy_from_slice(b"\x7fELF");
        ehdr.e_ident[elf::EI_CLASS] = elf::ELFCLASS64;
        ehdr.e_ident[elf::EI_DATA] = elf::ELFDATA2LSB;
        ehdr.e_machine = elf::EM_X86_64;
        ehdr.e_phoff = std::mem::size_of::<elf::Elf64_Ehdr>() as u64;
        ehdr.e_phnum = 1;
        let phdr = elf::Elf64_Phdr {
            p_type: elf::PT_LOAD,
            p_paddr: 16 << 20,
            p_memsz: 184 << 20,
            ..Default::default()
        };
        let big = dir.join("vmlinux-big");
        std::fs::write(&big, [ehdr.as_slice(), phdr.as_slice()].concat()).unwrap();
        let err = load_kernel(&mem, 64 << 20, &big).err().unwrap();
        assert!(
            matches!(
                err,
                BootError::KernelTooBig {
                    needs_mib: 200,
                    have_mib: 64,
                    ..
                }
            ),
            "{err}"
        );

        // A segment that claims more file bytes than the file has.
        let truncated = dir.join("vmlinux-truncated");
        let phdr = elf::Elf64_Phdr {
            p_filesz: 1 << 20,
            ..phdr
        };
        std::fs::write(&truncated, [ehdr.as_slice(), phdr.as_slice()].concat()).unwrap();
        let err = load_kernel(&mem, 256 << 20, &truncated).err().unwrap();
        assert!(
            err.to_string().contains("runs past the end of the file"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
