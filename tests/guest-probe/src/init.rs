//! PID 1 duties of the test guest: file systems, stdio, loopback, orphans.
//! The same as the agent's (guest-agent/src/init.rs), kept separate so that the
//! product's agent carries nothing for tests.

use std::fs::OpenOptions;
use std::io;

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

/// A line on stderr: in the guest, the console or /dev/null once [`standard_fds`] has
/// run (before, fd 2 may be closed and std drops the line); by hand, the terminal.
pub fn say(msg: &str) {
    eprintln!("peapod-probe: {msg}");
}

pub fn mount_filesystems() {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    for (source, target, flags) in [
        ("proc", "/proc", nosuid_nodev_noexec),
        ("sysfs", "/sys", nosuid_nodev_noexec),
        ("devtmpfs", "/dev", MsFlags::MS_NOSUID),
    ] {
        let _ = std::fs::create_dir_all(target);
        match mount(Some(source), target, Some(source), flags, None::<&str>) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(e) => say(&format!("mounting {source} on {target}: {e}")),
        }
    }
}

/// The kernel may start PID 1 with fds 0-2 closed (console off): point them at the
/// console or /dev/null, so that no socket the probe opens becomes a child's stdio.
pub fn standard_fds() {
    let target = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
        .or_else(|_| OpenOptions::new().read(true).write(true).open("/dev/null"));
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

/// Brings `lo` up: nothing else in the guest does, and local TCP needs it.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `ifr` is a valid ifreq naming an interface; SIOCGIFFLAGS fills its flags.
    if unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS set the flags member of the union, which is read here.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above; SIOCSIFFLAGS reads the name and flags.
    if unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
