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
}

const MOUNTS: &[Mount] = &[
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
    },
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
    },
];

/// Mounts what every later step needs. A failure is reported, not fatal: PID 1 must
/// not exit (the kernel would panic), and the console says what went wrong.
pub fn mount_filesystems() {
    for m in MOUNTS {
        let _ = std::fs::create_dir_all(m.target);
        match mount(
            Some(m.source),
            m.target,
            Some(m.fstype),
            m.flags,
            None::<&str>,
        ) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(e) => eprintln!("peapod-agent: mounting {} on {}: {e}", m.fstype, m.target),
        }
    }
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
