//! `containerd-shim-peapod-v2`: one shim per pod. It boots the pod's microVM (a
//! `peapod-vmm` child process), turns containerd's rootfs mounts into block devices and
//! drives the guest agent over vsock.
