//! peapod-agent: `/init` of the Peapod guest.
//!
//! Today it prepares the guest (mounts /proc, /sys, /dev), reports that it is ready on
//! the console and powers the VM off when asked. It will run the pod's containers,
//! served over ttrpc on vsock.

mod init;

use std::io::Write;

fn main() {
    if std::process::id() != 1 {
        eprintln!("peapod-agent: must run as PID 1, the guest's /init");
        std::process::exit(1);
    }
    init::mount_filesystems();
    let mut console = init::Console::open();
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("unknown({e})"));
    let _ = writeln!(console, "peapod-agent: ready kernel={release}");

    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if init::poweroff_requested(&cmdline) {
        init::power_off(&mut console);
    }
    init::reap_forever();
}
