//! virtio-net (virtio 1.2 section 5.1) on a Linux tap interface: one receive and one
//! transmit queue, no control queue. The guest's 12-byte `virtio_net_hdr_v1` is the
//! header the tap reads and writes with IFF_VNET_HDR, so checksum and TCP segmentation
//! offloads pass through both ways without the VMM looking at packets.

mod device;
mod event_handler;
mod tap;

pub use device::{Net, NetError, NetStats};
pub use tap::{Tap, TapError};

/// Where frames go to and come from: a tap in production, a socket pair in tests.
/// Every read returns one frame and every write sends one (header included), and the
/// fd is non-blocking.
pub(crate) trait NetBackend:
    std::io::Read + std::io::Write + std::os::fd::AsRawFd + Send
{
    /// For log and error messages.
    fn name(&self) -> &str;
    /// Tells the backend which offloads the guest accepts on receive (`TUN_F_*`).
    fn set_offload(&mut self, tun_flags: libc::c_uint) -> Result<(), TapError>;
}

/// A socket-pair tap for the unit tests and the fuzz cases.
#[cfg(any(test, feature = "test-utils"))]
pub(crate) mod fake_tap;
#[cfg(test)]
mod tests;
