//! What PID 1 of a guest must do: file systems, the console, children, power-off.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::wait::wait;

/// Kernel command-line word asking the agent to power the VM off once it is ready
/// (boot tests and benchmarks use it; a pod's VM is powered off by the shim).
pub const POWEROFF_FLAG: &str = "peapod.poweroff=ready";

struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// In order: later mounts go inside earlier ones.
const MOUNTS: &[Mount] = &[
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: None,
    },
    Mount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620"),
    },
    Mount {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("mode=1777"),
    },
    Mount {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    Mount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
];

/// Controllers the containers' cgroups may use; enabled at the root for children.
const CGROUP_CONTROLLERS: &str = "+cpu +memory +pids +io";

/// Where the initramfs is bound before it becomes the agent's root.
const ROOT_BIND: &str = "/.root";

/// Makes the agent's root a mount with a parent. The initramfs is the kernel's
/// `rootfs`, which has none, and pivot_root(2), which every container start
/// needs, refuses to move a root like that (EINVAL). A bind mount of it, moved
/// over `/` and chrooted into, is an ordinary mount: no copy of the files.
pub fn leave_rootfs() -> nix::Result<()> {
    std::fs::create_dir_all(ROOT_BIND)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))?;
    mount(
        Some("/"),
        ROOT_BIND,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )?;
    nix::unistd::chdir(ROOT_BIND)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)?;
    nix::unistd::chroot(".")?;
    nix::unistd::chdir("/")
}

/// Mounts what every later step needs. A failure is reported, not fatal: PID 1 must
/// not exit (the kernel would panic), and the console says what went wrong.
pub fn mount_filesystems() {
    for m in MOUNTS {
        let _ = std::fs::create_dir_all(m.target);
        match mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(e) => eprintln!("peapod-agent: mounting {} on {}: {e}", m.fstype, m.target),
        }
    }
    // A controller the kernel lacks fails the whole write: enable one at a time.
    for controller in CGROUP_CONTROLLERS.split(' ') {
        if let Err(e) = std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", controller) {
            eprintln!("peapod-agent: enabling cgroup controller {controller}: {e}");
        }
    }
    let _ = std::os::unix::fs::symlink("/proc/self/fd", "/dev/fd");
}

/// Points fds 0-2 at the console, or at /dev/null when the VM has none, so that
/// nothing the agent or its children write lands on a stray descriptor.
pub fn standard_fds() {
    let target = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
        .or_else(|_| OpenOptions::new().read(true).write(true).open("/dev/null"));
    // Without either there is nothing to write an error to; carry on without stdio.
    if let Ok(f) = target {
        let _ = nix::unistd::dup2_stdin(&f);
        let _ = nix::unistd::dup2_stdout(&f);
        let _ = nix::unistd::dup2_stderr(&f);
        // With 0-2 closed, the open itself took fd 0: closing it would undo that.
        if std::os::fd::AsRawFd::as_raw_fd(&f) <= 2 {
            std::mem::forget(f);
        }
    }
}

/// The guest console, if the VM has one (the VMM turns it off by default).
pub struct Console(Option<File>);

impl Console {
    pub fn open() -> Self {
        Self(OpenOptions::new().write(true).open("/dev/console").ok())
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.0 {
            Some(f) => f.write(buf),
            None => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.0 {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

pub fn poweroff_requested(cmdline: &str) -> bool {
    cmdline.split_whitespace().any(|w| w == POWEROFF_FLAG)
}

/// A microVM powers off by resetting: the VMM ends on the guest's reset, and a real
/// power-off would only halt the vCPUs (there is no ACPI).
pub fn power_off(console: &mut Console) -> ! {
    nix::unistd::sync();
    let err = reboot(RebootMode::RB_AUTOBOOT).unwrap_err();
    let _ = writeln!(console, "peapod-agent: cannot power off: {err}");
    reap_forever()
}

/// PID 1 adopts orphans; reap them so they do not linger as zombies.
pub fn reap_forever() -> ! {
    loop {
        if let Err(Errno::ECHILD) = wait() {
            nix::unistd::pause();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poweroff_flag_is_a_whole_word() {
        assert!(poweroff_requested("quiet peapod.poweroff=ready panic=1"));
        assert!(!poweroff_requested("quiet peapod.poweroff=readyish"));
        assert!(!poweroff_requested(""));
    }
}
