//! `containerd-shim-peapod-v2`: one shim per pod. It boots the pod's microVM (a
//! `peapod-vmm` child process), turns containerd's rootfs mounts into block devices and
//! drives the guest agent over vsock.

pub mod agent;
pub mod config;
pub mod network;
pub mod options;
pub mod pod;
pub mod rootfs;
pub mod shim;
pub mod state;
pub mod stdio;
pub mod vmm;
pub mod volumes;
