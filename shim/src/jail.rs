//! The VMM's jail. The guest is the attacker and the VMM the wall, so the VMM runs
//! with nothing it does not need, set up between fork and exec:
//!
//! - its own mount namespace whose root is an empty read-only tmpfs holding only
//!   `/peapod-vmm`, `/vmlinux`, `/initrd` (read-only bind mounts of the host's files),
//!   `/dev/kvm` and `/dev/net/tun` (device nodes it owns) and `/run`, a bind mount of
//!   the pod's VM directory where its sockets and console live. The host's tree is
//!   detached: no /proc, no /etc, no containerd state. Disks come as open descriptors
//!   (`block.set` with `"fd": true`), the tap as an inherited one.
//! - a uid and gid of its own, `uid_base + its pid` (unique among live VMMs, so one
//!   VMM cannot signal or trace another), no supplementary groups;
//! - no capabilities (the bounding set emptied too) and `no_new_privs`;
//! - rlimits: open files, processes (its threads), address space (guest memory plus
//!   a margin), no core dumps (a core would hold the guest's memory).
//!
//! The shim stays root: it opens the disks, owns the tap and cleans up.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Where the VMM finds its files inside the jail.
pub const VMM: &str = "/peapod-vmm";
pub const KERNEL: &str = "/vmlinux";
pub const INITRD: &str = "/initrd";
/// The pod's VM directory (sockets, console), seen from inside.
pub const RUN_DIR: &str = "/run";
/// A template to restore (its state and memory, read-only), seen from inside.
pub const TEMPLATE_DIR: &str = "/template";
/// Where the VMM writes a template, seen from inside.
pub const TEMPLATE_OUT_DIR: &str = "/template-out";
/// Device nodes made in the jail, with the host node whose number they take.
const DEVICES: &[(&str, &str)] = &[("/dev/kvm", "dev/kvm"), ("/dev/net/tun", "dev/net/tun")];

/// Present when the host's KVM is the PVM module (as peapod-vmm's platform.rs
/// detects it; a jailed VMM cannot look in /sys, so its starter does).
const PVM_MODULE: &str = "/sys/module/kvm_pvm";

/// Open files: every queue has an ioeventfd and an irqfd, every disk of the pod's store
/// a file (one per image and one per container's upper disk); a pod of a few
/// containers uses a few dozen, so this bounds a pod at roughly a thousand disks.
const MAX_OPEN_FILES: u64 = 1024;
/// Address space beyond guest memory: the binary, thread stacks, glibc's per-thread
/// malloc arenas (64 MiB of reservation each), device buffers. Measured: a booted
/// 256 MiB VMM peaks at guest + 199 MiB with one vCPU, + 397 MiB with four (66 MiB a
/// vCPU), before its API thread's first request adds an arena; about twice that.
const ADDRESS_SPACE_MARGIN_MIB: u64 = 512;
const ADDRESS_SPACE_PER_VCPU_MIB: u64 = 96;
/// Threads beyond one per vCPU: the event loop, the API thread and their spares.
const SPARE_THREADS: u64 = 16;

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error(
        "the VMM's jail needs the shim to run as root (it makes a mount namespace and \
         device nodes, and changes the VMM's uid); run containerd as root or set \
         `jail = false` in the peapod config (debugging only)"
    )]
    NotRoot,
    #[error("the VMM's jail: {path}: {source} (check that it exists)")]
    Missing { path: PathBuf, source: io::Error },
    #[error(
        "the VMM's jail: {path} is not {need} by other users (mode {mode:o}); the VMM runs \
         under a uid of its own: chmod o+{flag} it"
    )]
    Mode {
        path: PathBuf,
        need: &'static str,
        flag: char,
        mode: u32,
    },
    #[error(
        "the VMM's jail: {0} is dynamically linked, and the jail holds no shared \
         libraries; install the static peapod-vmm (`make build`) or set `jail = false`"
    )]
    Dynamic(PathBuf),
    #[error("the VMM's jail: {what} {path}: {source}")]
    Prepare {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// What one VMM's jail is made of.
pub struct JailSpec<'a> {
    /// An empty host directory, the mount point of the jail's root (in the VMM's
    /// namespace only: on the host it stays empty).
    pub root: &'a Path,
    /// The host directory bound at [`RUN_DIR`].
    pub run_dir: &'a Path,
    pub vmm: &'a Path,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub uid_base: u32,
    pub memory_mib: u64,
    pub vcpus: u32,
    /// A template to restore: its state and memory files are bound read-only in
    /// [`TEMPLATE_DIR`].
    pub template: Option<&'a Path>,
    /// A directory to write a template into, bound writable at
    /// [`TEMPLATE_OUT_DIR`] and given to the VMM's uid.
    pub template_out: Option<&'a Path>,
}

/// A jail ready to be entered by a forked child: every path and number prepared,
/// so that [`Jail::enter`] only makes system calls.
pub struct Jail {
    root: CString,
    binds: Vec<(CString, CString)>,
    devices: Vec<(CString, libc::dev_t)>,
    dirs: Vec<CString>,
    /// Host directories bound writable (the pod's VM directory first), each given to
    /// the VMM's uid.
    writable: Vec<(CString, CString)>,
    uid_base: u32,
    rlimits: [(libc::__rlimit_resource_t, u64); 4],
}

impl Jail {
    /// Checks what the jail needs on the host and prepares it; creates `root` and
    /// `run_dir`.
    pub fn new(spec: &JailSpec) -> Result<Jail, JailError> {
        // SAFETY: geteuid(2) has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err(JailError::NotRoot);
        }
        let meta = |path: &Path| {
            std::fs::metadata(path).map_err(|source| JailError::Missing {
                path: path.into(),
                source,
            })
        };
        let need = |path: &Path, bit: u32, need, flag| {
            let mode = meta(path)?.permissions().mode();
            if mode & bit == 0 {
                return Err(JailError::Mode {
                    path: path.into(),
                    need,
                    flag,
                    mode: mode & 0o7777,
                });
            }
            Ok(())
        };
        need(spec.vmm, 0o001, "executable", 'x')?;
        need(spec.kernel, 0o004, "readable", 'r')?;
        need(spec.initrd, 0o004, "readable", 'r')?;
        if is_dynamic(spec.vmm).map_err(|source| JailError::Prepare {
            what: "reading",
            path: spec.vmm.into(),
            source,
        })? {
            return Err(JailError::Dynamic(spec.vmm.into()));
        }
        let mut devices = Vec::new();
        for (host, inside) in DEVICES {
            let rdev = meta(Path::new(host))?.rdev();
            devices.push((c_path(&spec.root.join(inside)), rdev));
        }
        for dir in [spec.root, spec.run_dir] {
            std::fs::create_dir_all(dir).map_err(|source| JailError::Prepare {
                what: "creating",
                path: dir.into(),
                source,
            })?;
        }
        let inside = |p: &str| c_path(&spec.root.join(p.trim_start_matches('/')));
        let mut binds = vec![
            (c_path(spec.vmm), inside(VMM)),
            (c_path(spec.kernel), inside(KERNEL)),
            (c_path(spec.initrd), inside(INITRD)),
        ];
        let mut dirs = vec![inside("dev"), inside("dev/net"), inside(RUN_DIR)];
        let mut writable = vec![(c_path(spec.run_dir), inside(RUN_DIR))];
        if let Some(template) = spec.template {
            dirs.push(inside(TEMPLATE_DIR));
            for name in [crate::templates::STATE_FILE, crate::templates::MEMORY_FILE] {
                let file = template.join(name);
                need(&file, 0o004, "readable", 'r')?;
                binds.push((c_path(&file), inside(&format!("{TEMPLATE_DIR}/{name}"))));
            }
        }
        if let Some(out) = spec.template_out {
            dirs.push(inside(TEMPLATE_OUT_DIR));
            writable.push((c_path(out), inside(TEMPLATE_OUT_DIR)));
        }
        let vcpus = u64::from(spec.vcpus);
        let address_space =
            spec.memory_mib + ADDRESS_SPACE_MARGIN_MIB + vcpus * ADDRESS_SPACE_PER_VCPU_MIB;
        Ok(Jail {
            root: c_path(spec.root),
            binds,
            devices,
            dirs,
            writable,
            uid_base: spec.uid_base,
            rlimits: [
                (libc::RLIMIT_NOFILE, MAX_OPEN_FILES),
                (libc::RLIMIT_NPROC, vcpus + SPARE_THREADS),
                (libc::RLIMIT_AS, address_space << 20),
                (libc::RLIMIT_CORE, 0),
            ],
        })
    }

    /// The uid (and gid) the VMM with `pid` runs as.
    pub fn id_of(uid_base: u32, pid: u32) -> u32 {
        uid_base.wrapping_add(pid)
    }

    /// Puts the calling process in the jail. Only for a child between fork and exec:
    /// it makes only async-signal-safe system calls, allocates nothing, and leaves
    /// the process unable to undo any of it. The program to exec is then [`VMM`].
    pub fn enter(&self) -> io::Result<()> {
        // SAFETY: every call below is a plain system call on NUL-terminated strings
        // owned by `self` (alive for the call) or on null pointers where the call
        // takes them; each result is checked.
        unsafe {
            // SAFETY: getpid(2) cannot fail.
            let id = Jail::id_of(self.uid_base, libc::getpid() as u32);
            check(libc::unshare(libc::CLONE_NEWNS))?;
            // Nothing done here reaches the host's mounts.
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                c"tmpfs".as_ptr(),
                self.root.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID,
                c"size=64k,mode=0755".as_ptr().cast(),
            ))?;
            for dir in &self.dirs {
                check(libc::mkdir(dir.as_ptr(), 0o755))?;
            }
            for (node, rdev) in &self.devices {
                check(libc::mknod(node.as_ptr(), libc::S_IFCHR | 0o600, *rdev))?;
                check(libc::chown(node.as_ptr(), id, id))?;
            }
            let read_only = libc::MS_BIND
                | libc::MS_REMOUNT
                | libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV;
            for (src, dst) in &self.binds {
                let fd = libc::open(
                    dst.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o600,
                );
                check(fd)?;
                libc::close(fd);
                bind(src, dst, read_only)?;
            }
            for (src, dst) in &self.writable {
                bind(
                    src,
                    dst,
                    libc::MS_BIND
                        | libc::MS_REMOUNT
                        | libc::MS_NOSUID
                        | libc::MS_NODEV
                        | libc::MS_NOEXEC,
                )?;
                // The directory behind the bind: the VMM makes its sockets (or a
                // template's files) there.
                check(libc::chown(dst.as_ptr(), id, id))?;
                check(libc::chmod(dst.as_ptr(), 0o700))?;
            }
            // The tmpfs becomes / and the host's tree is let go.
            check(libc::chdir(self.root.as_ptr()))?;
            check(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as i32)?;
            check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
            check(libc::chdir(c"/".as_ptr()))?;
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
                std::ptr::null(),
            ))?;
            for (resource, limit) in self.rlimits {
                let r = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                check(libc::setrlimit(resource, &r))?;
            }
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setresgid(id, id, id))?;
            // Dropping a capability from the bounding set needs CAP_SETPCAP: before
            // the uid changes. Past the last capability the kernel says EINVAL.
            for cap in 0.. {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                    break;
                }
            }
            // From root to another uid: the permitted, effective and ambient sets
            // are cleared.
            check(libc::setresuid(id, id, id))?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        }
        Ok(())
    }
}

/// The `--platform-quirks` value for a jailed VMM, which cannot detect the host's
/// kind of KVM itself.
pub fn platform_quirks() -> &'static str {
    if Path::new(PVM_MODULE).exists() {
        "on"
    } else {
        "off"
    }
}

/// Binds `src` on `dst`, then applies `flags` (a bind mount takes its flags only on
/// a remount).
///
/// # Safety
/// Only the async-signal-safe mount(2); see [`Jail::enter`].
unsafe fn bind(src: &CString, dst: &CString, flags: libc::c_ulong) -> io::Result<()> {
    // SAFETY: NUL-terminated strings alive for the calls; null where mount takes it.
    unsafe {
        check(libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ))?;
        check(libc::mount(
            std::ptr::null(),
            dst.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        ))
    }
}

fn check(ret: i32) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn c_path(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("paths from the config hold no NUL")
}

/// Whether the ELF file at `path` asks for a program interpreter (the dynamic
/// loader), which the jail does not hold. Reads the headers only: this is on every
/// pod's start path.
fn is_dynamic(path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::FileExt;
    const PT_INTERP: u32 = 3;
    const PHDR_MAX: usize = 64 << 10;
    let file = std::fs::File::open(path)?;
    let mut header = [0u8; 64];
    let n = file.read_at(&mut header, 0)?;
    if n < header.len() || &header[..4] != b"\x7fELF" || header[4] != 2 {
        // Not a 64-bit ELF file: exec will say what is wrong with it.
        return Ok(false);
    }
    let u16_at = |o: usize| usize::from(u16::from_le_bytes([header[o], header[o + 1]]));
    let phoff = u64::from_le_bytes(header[0x20..0x28].try_into().expect("8 bytes"));
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    let mut table = vec![0u8; (phentsize * phnum).min(PHDR_MAX)];
    file.read_exact_at(&mut table, phoff)?;
    Ok(table
        .chunks(phentsize.max(4))
        .any(|entry| entry.get(..4) == Some(&PT_INTERP.to_le_bytes()[..])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_and_dynamic_binaries_are_told_apart() {
        // The test binary itself is dynamically linked; /bin/sh too.
        let me = std::env::current_exe().unwrap();
        assert!(is_dynamic(&me).unwrap(), "{}", me.display());
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("script");
        std::fs::write(&text, "#!/bin/sh\n").unwrap();
        assert!(!is_dynamic(&text).unwrap(), "a script is not an ELF file");
        // A minimal ELF64 file with one program header: PT_LOAD (static), PT_INTERP.
        for (p_type, dynamic) in [(1u32, false), (3, true)] {
            let mut elf = vec![0u8; 64 + 56];
            elf[..5].copy_from_slice(b"\x7fELF\x02");
            elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
            elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
            elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
            elf[64..68].copy_from_slice(&p_type.to_le_bytes());
            let f = dir.path().join(format!("elf-{p_type}"));
            std::fs::write(&f, &elf).unwrap();
            assert_eq!(is_dynamic(&f).unwrap(), dynamic, "p_type {p_type}");
        }
    }
}
