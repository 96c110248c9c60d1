//! virtio-vsock (virtio 1.2 section 5.10) with the hybrid host side Firecracker made
//! common: the guest sees AF_VSOCK, the host sees unix sockets.
//!
//! - Host to guest: a host process connects to the VM's socket (`uds_path`), writes
//!   `CONNECT <port>\n`, reads `OK <host port>\n`, and from then on the stream is a
//!   connection to the guest's vsock port.
//! - Guest to host: a guest connect to host port P becomes a connect to the unix
//!   socket `<uds_path>_<P>`; without a listener there the guest gets a reset.
//!
//! The device (`device.rs`) moves packets between the virtqueues and a
//! `VsockBackend`; it checks every packet the guest sends before a backend sees it.
//! The unix-socket backend (`unix/`) multiplexes the connections: one unix stream per
//! connection, credit-based flow control both ways, and orderly teardown.

mod device;
mod event_handler;
pub mod packet;
pub mod unix;

use std::os::fd::RawFd;
use std::path::PathBuf;

pub use device::Vsock;
pub use packet::PacketHeader;
pub use unix::VsockMuxer;

/// The host's context ID. A guest's lies in `MIN_GUEST_CID..=MAX_GUEST_CID`: 0, 1 and
/// 2 are the hypervisor, local loopback and the host, and CIDs are 32-bit in practice
/// (the spec reserves the upper half of the field; u32::MAX is VMADDR_CID_ANY).
pub const HOST_CID: u64 = 2;
pub const MIN_GUEST_CID: u64 = 3;
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

/// Queue indices and sizes.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
pub const QUEUE_SIZE: u16 = 256;
pub const NUM_QUEUES: usize = 3;

/// The most payload one packet carries, either way: Linux's
/// VIRTIO_VSOCK_MAX_PKT_BUF_SIZE. A longer TX packet is refused with a reset.
pub const MAX_PKT_PAYLOAD: u32 = 64 << 10;

/// The only socket type offered (VIRTIO_VSOCK_F_SEQPACKET is not).
pub const TYPE_STREAM: u16 = 1;

/// Packet operations (virtio 1.2, 5.10.6).
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flags: the sender will receive (RCV) or send (SEND) no more data.
pub mod shutdown {
    pub const RCV: u32 = 1;
    pub const SEND: u32 = 2;
    pub const BOTH: u32 = RCV | SEND;
}

/// What the device needs from whatever carries the connections on the host. The
/// device hands it only packets that passed validation: from the guest's CID to
/// `HOST_CID`, type STREAM, with the whole payload present.
pub trait VsockBackend: Send {
    /// The device was activated: start serving the host side (accepting connections).
    fn start(&mut self);
    /// One packet the guest sent; `data` is its payload (`hdr.len` bytes).
    fn send_pkt(&mut self, hdr: &PacketHeader, data: &[u8]);
    /// Whether `recv_pkt` may have a packet for the guest.
    fn has_pending_rx(&self) -> bool;
    /// The next packet for the guest, its payload written into `buf` (which bounds
    /// it); `None` if there was nothing after all.
    fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<PacketHeader>;
    /// The event loop watches this fd for reading; when it is readable, the device
    /// calls `process_events`.
    fn poll_fd(&self) -> RawFd;
    /// Handles whatever made `poll_fd` readable (new connections, stream readiness,
    /// timers).
    fn process_events(&mut self);
}

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error(
        "vsock: guest CID {0} is reserved or out of range (0-2 are the hypervisor, loopback \
         and host; CIDs are 32-bit and 4294967295 means any); pick one from 3 to 4294967294"
    )]
    ReservedCid(u64),
    #[error("vsock: cannot create the activation eventfd: {0}")]
    EventFd(std::io::Error),
    #[error(transparent)]
    Backend(#[from] unix::UnixError),
}

/// Where the guest-to-host connections to `port` go: `<uds_path>_<port>`.
pub fn host_port_path(uds_path: &std::path::Path, port: u32) -> PathBuf {
    let mut s = uds_path.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

#[cfg(test)]
mod tests;
