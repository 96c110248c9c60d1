use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::sync::Arc;

use virtio_bindings::virtio_net::{
    virtio_net_hdr_v1, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{NetBackend, Tap};
use crate::virtio::{
    check_chain, read_config_bytes, serve_queue, ActivateError, Activation, Interrupt,
    VirtioDevice, TYPE_NET,
};

/// The header in front of every frame, in both directions: with VERSION_1 it is
/// always the 12-byte one, `num_buffers` included.
pub(super) const HDR_LEN: usize = std::mem::size_of::<virtio_net_hdr_v1>();
const _: () = assert!(HDR_LEN == 12);
/// Where `num_buffers` sits in the header; the tap leaves those two bytes alone.
const NUM_BUFFERS_OFFSET: usize = 10;
/// The largest frame after the header: a 64 KiB segmentation-offload packet with its
/// Ethernet and VLAN headers, the size Linux's driver gives its big receive buffers.
pub(super) const MAX_FRAME_LEN: usize = 65562;
pub(super) const MAX_PACKET_LEN: usize = HDR_LEN + MAX_FRAME_LEN;

const QUEUE_SIZE: u16 = 256;
/// Frames read from the backend per wakeup (NAPI's weight): a flood must not starve
/// the other devices on the event loop. The backend stays readable, so the loop comes
/// back.
pub(super) const RX_BUDGET: usize = 64;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Offloads in both directions (checksum and TCP segmentation), the MAC and the link
/// status. No mergeable receive buffers: with GUEST_TSO Linux then posts 64 KiB
/// buffers (indirect descriptors keep that to one ring slot each).
pub(super) const FEATURES: u64 = bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_STATUS);

/// Counters for the VMM's API; "dropped" is what a NIC would drop, "bad" what the
/// driver got wrong.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// The backend was full or refused the frame.
    pub tx_dropped: u64,
    pub tx_bad_chains: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// The guest's buffer was too small, or the backend gave a runt.
    pub rx_dropped: u64,
    pub rx_bad_chains: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(
        "virtio-net {tap}: MAC {mac} is {why}; use a unicast address, such as a locally \
         administered one (first byte 02)"
    )]
    BadMac {
        tap: String,
        mac: String,
        why: &'static str,
    },
    #[error(
        "virtio-net {tap}: cannot create its activation eventfd: {source} (is the VMM out of \
         file descriptors? raise RLIMIT_NOFILE)"
    )]
    EventFd { tap: String, source: io::Error },
}

pub(super) struct Active {
    pub memory: GuestMemoryMmap,
    pub rx: Queue,
    pub tx: Queue,
    pub rx_kick: EventFd,
    pub tx_kick: EventFd,
}

pub struct Net {
    backend: Box<dyn NetBackend>,
    /// The backend's name, for messages.
    name: String,
    /// MAC, then the status word (virtio 1.2, 5.1.4).
    config: [u8; 8],
    interrupt: Arc<Interrupt>,
    pub(super) activate_evt: EventFd,
    pub(super) active: Option<Active>,
    /// The driver broke a ring: the device does nothing more.
    broken: bool,
    /// The backend failed for good (say, the tap was deleted): nothing is received.
    backend_failed: bool,
    /// The frame read from the backend and not yet in a guest buffer, if any: it
    /// waits for the guest rather than being dropped.
    rx_frame: Vec<u8>,
    rx_pending: Option<usize>,
    /// A frame waits and the guest has no receive buffer: the backend is not watched
    /// (its fd is level-triggered) until the guest kicks the receive queue.
    rx_starved: bool,
    tx_frame: Vec<u8>,
    /// Whether the event loop watches the backend now (the event handler keeps it).
    pub(super) backend_watched: bool,
    stats: NetStats,
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6], interrupt: Arc<Interrupt>) -> Result<Net, NetError> {
        Self::with_backend(Box::new(tap), mac, interrupt)
    }

    pub(crate) fn with_backend(
        backend: Box<dyn NetBackend>,
        mac: [u8; 6],
        interrupt: Arc<Interrupt>,
    ) -> Result<Net, NetError> {
        let why = if mac == [0; 6] {
            Some("all zeros")
        } else if mac[0] & 1 != 0 {
            Some("a multicast address")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(NetError::BadMac {
                tap: backend.name().into(),
                mac: mac.map(|b| format!("{b:02x}")).join(":"),
                why,
            });
        }
        let activate_evt = EventFd::new(EFD_NONBLOCK).map_err(|source| NetError::EventFd {
            tap: backend.name().into(),
            source,
        })?;
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&mac);
        config[6..].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        Ok(Net {
            name: backend.name().into(),
            backend,
            config,
            interrupt,
            activate_evt,
            active: None,
            broken: false,
            backend_failed: false,
            rx_frame: vec![0; MAX_PACKET_LEN],
            rx_pending: None,
            rx_starved: false,
            tx_frame: vec![0; MAX_PACKET_LEN],
            backend_watched: false,
            stats: NetStats::default(),
        })
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    pub(super) fn backend_fd(&self) -> RawFd {
        self.backend.as_raw_fd()
    }

    /// Whether the event loop should watch the backend for frames.
    pub(super) fn wants_backend(&self) -> bool {
        self.active.is_some() && !self.broken && !self.backend_failed && !self.rx_starved
    }

    /// The backend's fd reported an error or hang-up that reading did not clear.
    pub(super) fn backend_hung_up(&mut self) {
        log::error!(
            "virtio-net {}: the tap reports an error or hang-up (was the interface deleted?); \
             the guest receives nothing more",
            self.name
        );
        self.backend_failed = true;
    }

    /// Sends every frame the guest queued for transmission.
    pub(crate) fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut().filter(|_| !self.broken) else {
            return;
        };
        let memory = &active.memory;
        let (backend, buf, stats) = (&mut self.backend, &mut self.tx_frame, &mut self.stats);
        let served = serve_queue(&mut active.tx, memory, &self.interrupt, |chain| {
            transmit(backend.as_mut(), buf, stats, memory, chain);
            0 // the device writes nothing into a transmit chain
        });
        if let Err(e) = served {
            self.stop("transmit", e);
        }
    }

    /// Moves frames from the backend into the guest's receive buffers until the
    /// backend is empty, the budget is spent, or the guest runs out of buffers.
    pub(crate) fn process_rx(&mut self) {
        if self.broken {
            return;
        }
        if let Err(e) = self.receive() {
            self.stop("receive", e);
        }
    }

    fn receive(&mut self) -> Result<(), virtio_queue::Error> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let (memory, queue) = (&active.memory, &mut active.rx);
        let name = &self.name;
        self.rx_starved = false;
        // While buffers last the device takes one per frame as frames come; it needs
        // the guest's kick only once it runs out.
        queue.disable_notification(memory)?;
        let mut returned = 0usize;
        let mut reads = 0usize;
        loop {
            let len = match self.rx_pending {
                Some(len) => len,
                None => {
                    if reads == RX_BUDGET || self.backend_failed {
                        break;
                    }
                    reads += 1;
                    match read_frame(self.backend.as_mut(), &mut self.rx_frame) {
                        Received::Frame(len) => {
                            self.rx_pending = Some(len);
                            len
                        }
                        Received::Runt(len) => {
                            log::debug!(
                                "virtio-net {name}: dropped a {len}-byte runt from the tap"
                            );
                            self.stats.rx_dropped += 1;
                            continue;
                        }
                        Received::Empty => break,
                        Received::Failed => {
                            self.backend_failed = true;
                            break;
                        }
                    }
                }
            };
            let Some(chain) = queue.iter(memory)?.next() else {
                if queue.enable_notification(memory)? {
                    // The guest added buffers while notifications were off.
                    queue.disable_notification(memory)?;
                    continue;
                }
                self.rx_starved = true;
                break;
            };
            let head = chain.head_index();
            let frame = self.rx_frame.get(..len).unwrap_or_default();
            let written = match deliver(memory, chain, frame) {
                Ok(written) => {
                    self.rx_pending = None;
                    self.stats.rx_frames += 1;
                    self.stats.rx_bytes += (len - HDR_LEN) as u64;
                    written
                }
                Err(Refused::TooSmall(room)) => {
                    // Buffers smaller than the frames the guest's features allow:
                    // waiting would stall the ring, so drop it, as a NIC drops an
                    // oversize frame.
                    log::debug!(
                        "virtio-net {name}: a {len}-byte frame does not fit a {room}-byte \
                         receive buffer; dropped"
                    );
                    self.rx_pending = None;
                    self.stats.rx_dropped += 1;
                    0
                }
                Err(Refused::Bad(why)) => {
                    // The frame stays pending for the next buffer.
                    log::debug!("virtio-net {name}: receive buffer refused: {why}");
                    self.stats.rx_bad_chains += 1;
                    0
                }
            };
            queue.add_used(memory, head, written)?;
            returned += 1;
        }
        if returned > 0 && queue.needs_notification(memory)? {
            self.interrupt.signal_used_queue();
        }
        Ok(())
    }

    fn stop(&mut self, queue: &str, e: virtio_queue::Error) {
        log::warn!(
            "virtio-net {}: the driver broke the {queue} queue ({e}); device stopped",
            self.name
        );
        self.broken = true;
        self.interrupt.signal_needs_reset();
    }
}

/// Writes one transmit chain (header and frame, device-readable only) to the backend
/// in one write: the backend takes a frame per write.
fn transmit(
    backend: &mut dyn NetBackend,
    buf: &mut [u8],
    stats: &mut NetStats,
    memory: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) {
    let refuse = |stats: &mut NetStats, why: String| {
        log::debug!(
            "virtio-net {}: transmit request refused: {why}",
            backend.name()
        );
        stats.tx_bad_chains += 1;
    };
    let size = match check_chain(&chain) {
        Ok(size) => size,
        Err(e) => return refuse(stats, e.to_string()),
    };
    if size.writable > 0 {
        return refuse(stats, "the chain has device-writable descriptors".into());
    }
    let len = size.readable as usize;
    if !(HDR_LEN..=MAX_PACKET_LEN).contains(&len) {
        return refuse(
            stats,
            format!("{len} bytes is not a header and a frame of at most {MAX_FRAME_LEN} bytes"),
        );
    }
    let Some(packet) = buf.get_mut(..len) else {
        return refuse(stats, format!("{len} bytes do not fit the transmit buffer"));
    };
    let read = chain
        .reader(memory)
        .map_err(|e| e.to_string())
        .and_then(|mut r| r.read_exact(packet).map_err(|e| e.to_string()));
    if let Err(why) = read {
        return refuse(stats, why);
    }
    let sent = loop {
        match backend.write(packet) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => break other,
        }
    };
    match sent {
        Ok(n) if n == len => {
            stats.tx_frames += 1;
            stats.tx_bytes += (len - HDR_LEN) as u64;
        }
        Ok(n) => {
            log::debug!(
                "virtio-net {}: the tap took {n} of {len} bytes; frame lost",
                backend.name()
            );
            stats.tx_dropped += 1;
        }
        Err(e) => {
            // A full tap queue (EAGAIN) is a NIC's full transmit ring: drop, as Linux's
            // own qdisc would; EINVAL is a header the kernel refused.
            log::debug!(
                "virtio-net {}: frame dropped, the tap refused it: {e}",
                backend.name()
            );
            stats.tx_dropped += 1;
        }
    }
}

enum Received {
    /// A frame of this many bytes, header included, is in the buffer.
    Frame(usize),
    /// Too short to hold even the header.
    Runt(usize),
    Empty,
    Failed,
}

fn read_frame(backend: &mut dyn NetBackend, buf: &mut [u8]) -> Received {
    loop {
        return match backend.read(buf) {
            Ok(0) => {
                log::error!(
                    "virtio-net {}: the backend closed; the guest receives nothing more",
                    backend.name()
                );
                Received::Failed
            }
            Ok(n) if n < HDR_LEN => Received::Runt(n),
            Ok(n) => {
                // The tap writes the 10-byte legacy header and skips the rest; the
                // frame is always in one buffer.
                if let Some(nb) = buf.get_mut(NUM_BUFFERS_OFFSET..HDR_LEN) {
                    nb.copy_from_slice(&1u16.to_le_bytes());
                }
                Received::Frame(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Received::Empty,
            Err(e) => {
                log::error!(
                    "virtio-net {}: cannot read from the tap: {e} (was the interface \
                     deleted?); the guest receives nothing more",
                    backend.name()
                );
                Received::Failed
            }
        };
    }
}

enum Refused {
    /// A well-formed buffer of this many bytes, smaller than the frame.
    TooSmall(u32),
    Bad(String),
}

/// Copies `frame` into a receive chain; returns the bytes written.
fn deliver(
    memory: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    frame: &[u8],
) -> Result<u32, Refused> {
    let size = check_chain(&chain).map_err(|e| Refused::Bad(e.to_string()))?;
    if size.readable > 0 {
        return Err(Refused::Bad(
            "the chain has device-readable descriptors".into(),
        ));
    }
    if (size.writable as usize) < frame.len() {
        return Err(Refused::TooSmall(size.writable));
    }
    let mut writer = chain
        .writer(memory)
        .map_err(|e| Refused::Bad(e.to_string()))?;
    writer
        .write_all(frame)
        .map_err(|e| Refused::Bad(e.to_string()))?;
    // A frame is at most MAX_PACKET_LEN bytes.
    Ok(frame.len() as u32)
}

/// The receive offloads to ask of the tap for what the driver accepted. Segmentation
/// offloads need checksum offload (the tap ignores them without it, and the spec
/// forbids a driver to accept them without it).
pub(super) fn tun_offload(features: u64) -> libc::c_uint {
    let has = |b: u32| features & bit(b) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    flags
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation {
            memory,
            features,
            queues,
            kicks,
        } = activation;
        let got = queues.len();
        let (Ok([rx, tx]), Ok([rx_kick, tx_kick])) = (
            <[Queue; 2]>::try_from(queues),
            <[EventFd; 2]>::try_from(kicks),
        ) else {
            return Err(ActivateError::QueueCount { got, wanted: 2 });
        };
        // A tap handed over by the shim may carry offloads the guest cannot take:
        // better no network than corrupt frames.
        self.backend
            .set_offload(tun_offload(features))
            .map_err(|e| ActivateError::Backend(e.to_string()))?;
        self.rx_pending = None;
        self.rx_starved = false;
        self.active = Some(Active {
            memory,
            rx,
            tx,
            rx_kick,
            tx_kick,
        });
        self.activate_evt.write(1).map_err(ActivateError::Wake)
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.active
            .as_ref()
            .map(|a| vec![a.rx.state(), a.tx.state()])
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}
