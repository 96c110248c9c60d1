//! A Linux tap interface opened for virtio-net: every read and write is one Ethernet
//! frame preceded by a 12-byte `virtio_net_hdr_v1`, the same header the guest's driver
//! uses, so checksum and segmentation offloads pass through untouched.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::device::HDR_LEN;
use super::NetBackend;

/// `struct ifreq` as TUNSETIFF and TUNGETIFF use it: a name and the flags member of
/// the union; the padding makes it as large as the kernel's, which copies all of it.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _union_rest: [u8; 22],
}
const _: () = assert!(std::mem::size_of::<IfReq>() == std::mem::size_of::<libc::ifreq>());

impl IfReq {
    fn new() -> Self {
        Self {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _union_rest: [0; 22],
        }
    }

    fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// The flags Peapod's taps have: Ethernet frames, no packet-info prefix, a virtio-net
/// header on every frame.
const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(
        "tap {name}: the name is {len} bytes, Linux allows at most {} (IFNAMSIZ - 1); \
         pick a shorter name",
        libc::IFNAMSIZ - 1
    )]
    NameTooLong { name: String, len: usize },
    #[error("tap {name:?}: the name is empty or contains a NUL byte; pick a name such as tap0")]
    BadName { name: String },
    #[error("tap {name}: cannot open /dev/net/tun: {source} ({hint})")]
    OpenTun {
        name: String,
        source: io::Error,
        hint: &'static str,
    },
    #[error("tap {name}: cannot create or attach it (TUNSETIFF): {source} ({hint})")]
    SetIff {
        name: String,
        source: io::Error,
        hint: &'static str,
    },
    #[error(
        "tap fd {fd}: not an attached tun/tap fd (TUNGETIFF: {source}); the shim must hand \
         over an fd of /dev/net/tun on which it called TUNSETIFF"
    )]
    NotATap { fd: RawFd, source: io::Error },
    #[error(
        "tap {name}: the handed-over fd has flags {flags:#x}, not IFF_TAP | IFF_NO_PI | \
         IFF_VNET_HDR; the shim must create the tap with exactly those flags"
    )]
    WrongFlags { name: String, flags: libc::c_short },
    #[error("tap {name}: {what} failed: {source} ({hint})")]
    Setup {
        name: String,
        what: &'static str,
        source: io::Error,
        hint: &'static str,
    },
}

/// An open tap interface. The interface disappears when the tap is dropped, unless
/// someone made it persistent (TUNSETPERSIST), as a CNI plugin may have.
#[derive(Debug)]
pub struct Tap {
    /// Reads and writes on the fd are read(2) and write(2): one frame each.
    file: File,
    name: String,
}

impl Tap {
    /// Creates tap `name`, or attaches to it if it exists (created persistent by a
    /// network plugin). Needs CAP_NET_ADMIN unless the tap's owner is this user.
    pub fn open_named(name: &str) -> Result<Tap, TapError> {
        if name.is_empty() || name.contains('\0') {
            return Err(TapError::BadName { name: name.into() });
        }
        if name.len() >= libc::IFNAMSIZ {
            return Err(TapError::NameTooLong {
                name: name.into(),
                len: name.len(),
            });
        }
        // std opens with O_CLOEXEC: the tap must not leak into anything the VMM spawns.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .map_err(|source| TapError::OpenTun {
                name: name.into(),
                hint: open_hint(&source),
                source,
            })?;
        let mut ifr = IfReq::new();
        ifr.name[..name.len()].copy_from_slice(name.as_bytes());
        ifr.flags = TAP_FLAGS as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `ifr` is one, laid out
        // as the kernel's and as large, and lives across the call.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr as *mut IfReq) };
        if ret < 0 {
            let source = io::Error::last_os_error();
            return Err(TapError::SetIff {
                name: name.into(),
                hint: setiff_hint(&source),
                source,
            });
        }
        let tap = Tap {
            file,
            name: ifr.name(),
        };
        tap.set_vnet_hdr_len()?;
        Ok(tap)
    }

    /// Adopts a tap fd the shim opened (so the VMM needs no CAP_NET_ADMIN); checks it
    /// is a tap with virtio-net headers and makes it non-blocking and close-on-exec.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        let raw = fd.as_raw_fd();
        let file = File::from(fd);
        let mut ifr = IfReq::new();
        // SAFETY: TUNGETIFF writes one `struct ifreq` into `ifr`, which is one and as
        // large as the kernel's; on any other kind of fd the ioctl fails, changing nothing.
        let ret = unsafe { libc::ioctl(raw, libc::TUNGETIFF, &mut ifr as *mut IfReq) };
        if ret < 0 {
            return Err(TapError::NotATap {
                fd: raw,
                source: io::Error::last_os_error(),
            });
        }
        let name = ifr.name();
        let wanted = TAP_FLAGS as libc::c_short;
        if ifr.flags & wanted != wanted {
            return Err(TapError::WrongFlags {
                name,
                flags: ifr.flags,
            });
        }
        let tap = Tap { file, name };
        tap.fcntl_add(
            libc::F_GETFL,
            libc::F_SETFL,
            libc::O_NONBLOCK,
            "making it non-blocking",
        )?;
        tap.fcntl_add(
            libc::F_GETFD,
            libc::F_SETFD,
            libc::FD_CLOEXEC,
            "making it close-on-exec",
        )?;
        tap.set_vnet_hdr_len()?;
        Ok(tap)
    }

    /// The interface name (the kernel's, if it completed a pattern such as `tap%d`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Says which offloads the guest's driver accepts on receive (`TUN_F_*` bits): the
    /// kernel then hands over unchecksummed or unsegmented frames only if allowed.
    pub fn set_offload(&self, tun_flags: libc::c_uint) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no memory of ours.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(tun_flags),
            )
        };
        if ret < 0 {
            return Err(self.setup_error(
                "TUNSETOFFLOAD",
                "the host kernel refuses these offload flags; is its tun driver older than the guest's?",
            ));
        }
        Ok(())
    }

    /// The guest always negotiates VERSION_1, whose header is 12 bytes (the legacy
    /// one, and the tap's default, is 10).
    fn set_vnet_hdr_len(&self) -> Result<(), TapError> {
        let len = HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points to
        // `len`, alive across the call.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETVNETHDRSZ,
                &len as *const libc::c_int,
            )
        };
        if ret < 0 {
            return Err(self.setup_error(
                "TUNSETVNETHDRSZ (12-byte virtio-net headers)",
                "Linux has supported it since 2.6.32; is this a tun device?",
            ));
        }
        Ok(())
    }

    fn fcntl_add(
        &self,
        get: libc::c_int,
        set: libc::c_int,
        flag: libc::c_int,
        what: &'static str,
    ) -> Result<(), TapError> {
        let fd = self.file.as_raw_fd();
        // SAFETY: F_GETFL/F_GETFD take no argument and only return the flags of `fd`,
        // which `self.file` keeps open.
        let flags = unsafe { libc::fcntl(fd, get) };
        // SAFETY: F_SETFL/F_SETFD take an int by value and change only `fd`'s flags.
        if flags < 0 || unsafe { libc::fcntl(fd, set, flags | flag) } < 0 {
            return Err(self.setup_error(what, "the fd the shim handed over is unusable"));
        }
        Ok(())
    }

    fn setup_error(&self, what: &'static str, hint: &'static str) -> TapError {
        TapError::Setup {
            name: self.name.clone(),
            what,
            source: io::Error::last_os_error(),
            hint,
        }
    }
}

fn open_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
            "the host has no tun driver here: modprobe tun, and in a container expose /dev/net/tun"
        }
        Some(libc::EACCES) | Some(libc::EPERM) => {
            "permission denied: the VMM needs access to /dev/net/tun, or an already-open tap fd"
        }
        _ => "unexpected error opening the tun device",
    }
}

fn setiff_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            "permission denied: the VMM needs CAP_NET_ADMIN or an already-open tap fd"
        }
        Some(libc::EBUSY) => {
            "another process has it open; a single-queue tap has one user, is an old VMM still running?"
        }
        Some(libc::EINVAL) => {
            "the name is not a valid interface name, or an interface of another kind (or a tun, \
             or a tap with other flags) already has it"
        }
        _ => "unexpected error from TUNSETIFF",
    }
}

impl Read for Tap {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl Write for Tap {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn name(&self) -> &str {
        &self.name
    }

    fn set_offload(&mut self, tun_flags: libc::c_uint) -> Result<(), TapError> {
        Tap::set_offload(self, tun_flags)
    }
}

/// For tests that create taps: they run as root (CI is root) and fail loudly if not.
#[cfg(test)]
pub(super) fn require_root_and_tun() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root && std::path::Path::new("/dev/net/tun").exists(),
        "this test needs root and /dev/net/tun (it creates a tap); run it as root, as CI does"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A name no other test process uses.
    fn tap_name(tag: &str) -> String {
        format!("pp{tag}{}", std::process::id() % 1_000_000)
    }

    #[test]
    fn a_handed_over_tap_fd_is_adopted() {
        require_root_and_tun();
        let name = tap_name("fd");
        let tap = Tap::open_named(&name).unwrap();
        let fd = OwnedFd::from(tap.file.try_clone().unwrap());
        let adopted = Tap::from_fd(fd).unwrap();
        assert_eq!(adopted.name(), name);
        adopted
            .set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4)
            .unwrap();
        let e = adopted.set_offload(0x8000_0000).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("tap {name}: TUNSETOFFLOAD")),
            "{e}"
        );
    }

    #[test]
    fn a_tap_without_virtio_headers_is_refused() {
        require_root_and_tun();
        let name = tap_name("nv");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        let mut ifr = IfReq::new();
        ifr.name[..name.len()].copy_from_slice(name.as_bytes());
        ifr.flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: as in open_named: one `struct ifreq`, alive across the call.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr as *mut IfReq) };
        assert_eq!(ret, 0, "{}", io::Error::last_os_error());
        let e = Tap::from_fd(OwnedFd::from(file)).unwrap_err();
        assert!(matches!(e, TapError::WrongFlags { .. }), "{e}");
        assert!(e.to_string().contains("IFF_VNET_HDR"), "{e}");
    }

    #[test]
    fn a_name_taken_by_another_kind_of_interface_is_refused() {
        require_root_and_tun();
        let e = Tap::open_named("lo").unwrap_err();
        assert!(matches!(e, TapError::SetIff { .. }), "{e}");
        assert!(e.to_string().contains("another kind"), "{e}");
    }

    #[test]
    fn names_are_checked_before_the_kernel_sees_them() {
        let e = Tap::open_named("a-name-of-16byte").unwrap_err();
        assert!(matches!(e, TapError::NameTooLong { len: 16, .. }), "{e}");
        assert!(e.to_string().contains("at most 15"), "{e}");
        assert!(matches!(Tap::open_named(""), Err(TapError::BadName { .. })));
        assert!(matches!(
            Tap::open_named("ta\0p"),
            Err(TapError::BadName { .. })
        ));
    }

    #[test]
    fn an_fd_that_is_not_a_tap_is_refused() {
        let file = File::open("/dev/null").unwrap();
        let e = Tap::from_fd(OwnedFd::from(file)).unwrap_err();
        assert!(matches!(e, TapError::NotATap { .. }), "{e}");
    }

    #[test]
    fn errors_name_the_object_and_the_fix() {
        let e = TapError::SetIff {
            name: "tap0".into(),
            source: io::Error::from_raw_os_error(libc::EPERM),
            hint: setiff_hint(&io::Error::from_raw_os_error(libc::EPERM)),
        };
        let msg = e.to_string();
        assert!(msg.starts_with("tap tap0: "), "{msg}");
        assert!(msg.contains("CAP_NET_ADMIN"), "{msg}");
    }
}
