//! `containerd-shim-peapod-v2`: one shim per pod. It boots the pod's microVM (a
//! `peapod-vmm` child process), turns containerd's rootfs mounts into block devices and
//! drives the guest agent over vsock.

pub mod agent;
pub mod block_slots;
pub mod cgroup;
pub mod config;
pub mod error;
pub mod jail;
pub mod network;
pub mod options;
pub mod pod;
pub mod rootfs;
pub mod service;
pub mod shim;
pub mod spec;
pub mod state;
pub mod stdio;
pub mod tasks;
pub mod vmm;
pub mod volumes;

#[cfg(test)]
pub(crate) mod test_util {
    /// Fails a unit test that needs root when run without it (CI runs as root, so a
    /// skip would hide a broken machine). `why` says what needs it.
    pub fn require_root(why: &str) {
        // SAFETY: geteuid(2) has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "this test needs root: {why} (run the tests as root)"
        );
    }
}
