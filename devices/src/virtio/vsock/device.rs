use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::packet::{self, PacketHeader, HDR_SIZE};
use super::{VsockBackend, VsockError, VsockMuxer};
use super::{
    EVENT_QUEUE, MAX_GUEST_CID, MAX_PKT_PAYLOAD, MIN_GUEST_CID, NUM_QUEUES, QUEUE_SIZE, RX_QUEUE,
    TX_QUEUE,
};
use crate::virtio::{
    check_chain, serve_queue, ActivateError, Activation, Interrupt, VirtioDevice, TYPE_VSOCK,
};

/// Resets for refused TX packets waiting for RX buffers; past this, more are dropped
/// (a guest that floods bad packets and reads nothing only loses its own resets).
const MAX_PENDING_REPLIES: usize = 256;

/// `struct virtio_vsock_event`'s id for a transport reset (virtio 1.2, 5.10.6.7).
const EVENT_TRANSPORT_RESET: u32 = 0;

pub(super) struct Active {
    pub memory: GuestMemoryMmap,
    pub queues: [Queue; NUM_QUEUES],
    pub kicks: [EventFd; NUM_QUEUES],
}

/// The vsock device; `B` carries the connections on the host side.
pub struct Vsock<B = VsockMuxer> {
    guest_cid: u64,
    pub(super) backend: B,
    interrupt: Arc<Interrupt>,
    pub(super) activate_evt: EventFd,
    pub(super) active: Option<Active>,
    pub(super) broken: bool,
    /// Resets owed to the guest for packets the device refused.
    replies: VecDeque<PacketHeader>,
    /// One packet's payload, either way.
    scratch: Vec<u8>,
}

impl Vsock<VsockMuxer> {
    /// A device for the guest `guest_cid` whose host side is the unix socket
    /// `uds_path` (bound now; host connections are accepted once the guest activates
    /// the device). The socket file is removed when the device is dropped.
    pub fn new(
        guest_cid: u64,
        uds_path: PathBuf,
        interrupt: Arc<Interrupt>,
    ) -> Result<Self, VsockError> {
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&guest_cid) {
            return Err(VsockError::ReservedCid(guest_cid));
        }
        let backend = VsockMuxer::new(guest_cid, uds_path)?;
        Self::with_backend(guest_cid, backend, interrupt)
    }

    pub fn uds_path(&self) -> &Path {
        self.backend.uds_path()
    }
}

impl<B: VsockBackend> Vsock<B> {
    pub fn with_backend(
        guest_cid: u64,
        backend: B,
        interrupt: Arc<Interrupt>,
    ) -> Result<Self, VsockError> {
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&guest_cid) {
            return Err(VsockError::ReservedCid(guest_cid));
        }
        Ok(Self {
            guest_cid,
            backend,
            interrupt,
            activate_evt: EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd)?,
            active: None,
            broken: false,
            replies: VecDeque::new(),
            scratch: vec![0; MAX_PKT_PAYLOAD as usize],
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Tells the guest that every connection it had is gone
    /// (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET), as after a restore, whose host side
    /// starts with none: the guest resets its sockets and reads its CID again. False
    /// if the device is not running or the driver left no event buffer (Linux keeps
    /// its event queue full).
    pub fn reset_transport(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let memory = &active.memory;
        let queue = &mut active.queues[EVENT_QUEUE];
        let Some(chain) = queue.pop_descriptor_chain(memory) else {
            return false;
        };
        let head = chain.head_index();
        let event = EVENT_TRANSPORT_RESET.to_le_bytes();
        let written = match check_chain(&chain) {
            Ok(size) if size.writable as usize >= event.len() => chain
                .clone()
                .find(|d| d.is_write_only() && d.len() as usize >= event.len())
                .and_then(|d| memory.write_slice(&event, d.addr()).ok())
                .map_or(0, |()| event.len() as u32),
            _ => 0,
        };
        if written == 0 {
            log::warn!("vsock: the driver's event buffer cannot hold the transport reset");
        }
        let used = queue.add_used(memory, head, written);
        if used.is_ok() && queue.needs_notification(memory).unwrap_or(true) {
            self.interrupt.signal_used_queue();
        }
        used.is_ok() && written > 0
    }

    /// Hands every packet the guest transmitted to the backend, then delivers what that
    /// produced (responses, resets).
    pub fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut().filter(|_| !self.broken) else {
            return;
        };
        let memory = &active.memory;
        let guest_cid = self.guest_cid;
        let (backend, replies, scratch) = (&mut self.backend, &mut self.replies, &mut self.scratch);
        let served = serve_queue(
            &mut active.queues[TX_QUEUE],
            memory,
            &self.interrupt,
            |chain| {
                match packet::read_tx(memory, chain, guest_cid, scratch) {
                    Ok(hdr) => backend.send_pkt(&hdr, &scratch[..hdr.len as usize]),
                    Err((e, reply)) => {
                        log::debug!("{e}");
                        if let Some(rst) = reply {
                            if replies.len() < MAX_PENDING_REPLIES {
                                replies.push_back(rst);
                            }
                        }
                    }
                }
                // TX buffers are only read.
                0
            },
        );
        if let Err(e) = served {
            self.stop(&format!("the driver broke the TX queue ({e})"));
            return;
        }
        self.process_rx();
    }

    /// Fills RX buffers with packets for the guest while both exist.
    pub fn process_rx(&mut self) {
        if self.broken || self.active.is_none() {
            return;
        }
        if let Err(e) = self.fill_rx_queue() {
            self.stop(&format!("the driver broke the RX queue ({e})"));
        }
    }

    /// The backend's fd is readable: let it work, then deliver what it produced.
    pub fn process_backend(&mut self) {
        if self.broken || self.active.is_none() {
            return;
        }
        self.backend.process_events();
        self.process_rx();
    }

    fn fill_rx_queue(&mut self) -> Result<(), virtio_queue::Error> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let memory = &active.memory;
        let queue = &mut active.queues[RX_QUEUE];
        let mut used = 0;
        loop {
            queue.disable_notification(memory)?;
            let mut out_of_buffers = false;
            while !self.replies.is_empty() || self.backend.has_pending_rx() {
                let Some(chain) = queue.iter(memory)?.next() else {
                    out_of_buffers = true;
                    break;
                };
                let head = chain.head_index();
                let capacity = match check_chain(&chain) {
                    Ok(size) if size.writable as usize >= HDR_SIZE => {
                        (size.writable as usize - HDR_SIZE).min(self.scratch.len())
                    }
                    Ok(size) => {
                        log::debug!(
                            "vsock: RX buffer of {} writable bytes cannot hold a header",
                            size.writable
                        );
                        queue.add_used(memory, head, 0)?;
                        used += 1;
                        continue;
                    }
                    Err(e) => {
                        log::debug!("vsock: RX buffer refused: {e}");
                        queue.add_used(memory, head, 0)?;
                        used += 1;
                        continue;
                    }
                };
                let payload = &mut self.scratch[..capacity];
                let hdr = match self.replies.pop_front() {
                    Some(rst) => rst,
                    None => match self.backend.recv_pkt(payload) {
                        Some(hdr) => hdr,
                        None if capacity == 0 => {
                            // Too small for what is waiting: hand it back unused
                            // rather than stall the queue behind it.
                            queue.add_used(memory, head, 0)?;
                            used += 1;
                            continue;
                        }
                        None => {
                            // Nothing after all: the buffer stays the driver's.
                            queue.go_to_previous_position();
                            break;
                        }
                    },
                };
                let len = (hdr.len as usize).min(capacity);
                let hdr = PacketHeader {
                    len: len as u32,
                    ..hdr
                };
                let written = match packet::write_rx(memory, chain, &hdr, &payload[..len]) {
                    Ok(n) => n,
                    Err(e) => {
                        // check_chain vetted the buffer, so this is not expected.
                        log::warn!("vsock: cannot write a packet into the guest's buffer: {e}");
                        0
                    }
                };
                queue.add_used(memory, head, written)?;
                used += 1;
            }
            let new_buffers = queue.enable_notification(memory)?;
            if !(out_of_buffers && new_buffers) {
                break;
            }
        }
        if used > 0 && queue.needs_notification(memory)? {
            self.interrupt.signal_used_queue();
        }
        Ok(())
    }

    fn stop(&mut self, why: &str) {
        log::warn!("virtio-vsock: {why}; device stopped");
        self.broken = true;
        self.interrupt.signal_needs_reset();
    }
}

impl<B: VsockBackend> VirtioDevice for Vsock<B> {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        // VERSION_1 comes from the transport; no SEQPACKET, no DGRAM.
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation {
            memory,
            queues,
            kicks,
            ..
        } = activation;
        let got = queues.len();
        let (Ok(queues), Ok(kicks)) = (
            <[Queue; NUM_QUEUES]>::try_from(queues),
            <[EventFd; NUM_QUEUES]>::try_from(kicks),
        ) else {
            return Err(ActivateError::QueueCount {
                got,
                wanted: NUM_QUEUES,
            });
        };
        self.active = Some(Active {
            memory,
            queues,
            kicks,
        });
        self.activate_evt.write(1).map_err(ActivateError::Wake)
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(|q| q.state()).collect())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}
