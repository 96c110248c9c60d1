//! `containerd-shim-peapod-v2`: one shim per pod. It boots the pod's microVM (a
//! `peapod-vmm` child process), turns containerd's rootfs mounts into block devices and
//! drives the guest agent over vsock.
//!
//! The modules, top down; a row uses only the rows below it (the VM and the tasks
//! never use the pod: the VM reports to it on a channel):
//!
//! ```text
//! shim                the shim process containerd runs: start, delete, the server
//! service             the task RPCs; a ShimError becomes a ttrpc status here only
//! pod                 the pod: its VM and tasks, the events containerd is told
//! sandbox_vm          the VM: boot, supervision (VmEvents to the pod), teardown
//! disk_store, tasks   the pod's disks in one growing store; containers, execs and their states
//! error               ShimError, the shim's one error type below the service
//! vmm, jail, cgroup, network, rootfs, volumes, stdio, agent, state, config, options
//! spec                a container's OCI spec, read through oci-spec
//! ```

pub mod agent;
pub mod cgroup;
pub mod config;
pub mod disk_store;
pub mod error;
pub mod jail;
pub mod network;
pub mod nft;
pub mod options;
pub mod pod;
pub mod port_forward;
pub mod rootfs;
pub mod sandbox_vm;
pub mod service;
pub mod shim;
pub mod sizing;
pub mod spec;
pub mod state;
pub mod stdio;
pub mod tasks;
pub mod templates;
pub mod vmm;
pub mod volumes;

#[cfg(test)]
pub(crate) mod test_util {
    /// Runs `program` with `args` and fails the test unless it succeeds; its stdout.
    pub fn run(program: &str, args: &[&str]) -> String {
        let out = std::process::Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {program} (iproute2 is needed): {e}"));
        assert!(
            out.status.success(),
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

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
