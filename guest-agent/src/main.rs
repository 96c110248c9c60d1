//! peapod-agent: `/init` of the Peapod guest.
//!
//! Today it prepares the guest (mounts /proc, /sys, /dev), reports that it is ready on
//! the console and powers the VM off when asked. It will run the pod's containers,
//! served over ttrpc on vsock.
//!
//! `no_main`: with the VM's console off the kernel starts PID 1 with fds 0-2 closed,
//! and Rust's runtime, before `main`, would fill them from /dev/null, which does not
//! exist until the agent mounts /dev, and abort. PID 1 dying panics the kernel, so
//! the agent starts from the C entry point and sets up its fds itself.
#![cfg_attr(not(test), no_main)]

#[cfg(not(test))]
use peapod_agent::init;

#[cfg(not(test))]
#[no_mangle]
extern "C" fn main(
    _argc: std::ffi::c_int,
    _argv: *const *const std::ffi::c_char,
) -> std::ffi::c_int {
    use std::io::Write;
    if std::process::id() != 1 {
        eprintln!("peapod-agent: must run as PID 1, the guest's /init");
        return 1;
    }
    init::mount_filesystems();
    init::standard_fds();
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
