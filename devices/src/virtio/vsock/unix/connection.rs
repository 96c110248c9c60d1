//! One vsock connection carried by one unix stream: its handshake state, credit-based
//! flow control both ways (virtio 1.2, 5.10.6.3), and its teardown.
//!
//! Host to guest, bytes are read from the stream straight into an RX packet, and only
//! as many as the guest's credit allows, so nothing is ever buffered that way. Guest
//! to host, bytes the stream cannot take yet wait in `tx_buf`, which the credit we
//! advertise (`CONN_BUF_ALLOC`) bounds.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vmm_sys_util::epoll::EventSet;

use super::{send_nosignal, Timeouts, CONN_BUF_ALLOC, CREDIT_LOW_WATER, CREDIT_UPDATE_FREED};
use crate::virtio::vsock::{op, shutdown, PacketHeader, HOST_CID, TYPE_STREAM};

/// A connection is named by its two ports (the CIDs are always the guest's and the
/// host's): `local_port` on the host side, `peer_port` in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

/// What the muxer does with a connection after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub(super) enum Verdict {
    Keep,
    /// Remove it without a word to the guest (the guest reset it).
    Close,
    /// Remove it and send the guest a reset.
    Reset,
}

pub(super) struct Connection {
    pub stream: UnixStream,
    key: ConnKey,
    guest_cid: u64,
    timeouts: Timeouts,
    /// Opened by a host process (its port is ours to free) rather than by the guest.
    pub host_initiated: bool,
    /// The guest answered our REQUEST, or we answered its.
    established: bool,
    /// Control packets owed to the guest.
    send_request: bool,
    send_response: bool,
    send_shutdown: bool,
    send_credit_request: bool,
    send_credit_update: bool,

    // Host to guest.
    /// The stream may have bytes to read (it polled readable and no read since came
    /// up short).
    rx_ready: bool,
    /// The host process will write no more: a read returned 0.
    host_eof: bool,
    /// Bytes sent to the guest (the spec's tx_cnt).
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// A CREDIT_REQUEST went out and the guest has not granted credit since.
    credit_requested: bool,

    // Guest to host.
    /// Guest bytes the stream could not take yet.
    tx_buf: VecDeque<u8>,
    /// Bytes written to the stream, as the guest learns it from our headers.
    fwd_cnt: u32,
    /// `fwd_cnt` as of the last header we sent.
    last_fwd_cnt_sent: u32,
    /// Bytes received from the guest (its tx_cnt).
    guest_tx_cnt: u32,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    write_shut: bool,

    /// When the muxer gives up on this connection and resets it.
    pub deadline: Option<Instant>,
    /// The events it is registered for in the muxer's epoll (empty: not registered).
    pub registered: EventSet,
    /// It sits in the muxer's RX queue.
    pub queued: bool,
}

impl Connection {
    fn new(stream: UnixStream, key: ConnKey, guest_cid: u64, timeouts: Timeouts) -> Self {
        Self {
            stream,
            key,
            guest_cid,
            timeouts,
            host_initiated: false,
            established: false,
            send_request: false,
            send_response: false,
            send_shutdown: false,
            send_credit_request: false,
            send_credit_update: false,
            rx_ready: false,
            host_eof: false,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            credit_requested: false,
            tx_buf: VecDeque::new(),
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            guest_tx_cnt: 0,
            peer_shutdown: 0,
            write_shut: false,
            deadline: None,
            registered: EventSet::empty(),
            queued: false,
        }
    }

    /// A host process asked for the guest's `key.peer_port`: a REQUEST goes out, and
    /// the guest has `timeouts.response` to answer it.
    pub fn host_initiated(
        stream: UnixStream,
        key: ConnKey,
        guest_cid: u64,
        timeouts: Timeouts,
    ) -> Self {
        let mut c = Self::new(stream, key, guest_cid, timeouts);
        c.host_initiated = true;
        c.send_request = true;
        c.deadline = Some(Instant::now() + timeouts.response);
        c
    }

    /// The guest's REQUEST `hdr` reached a host listener over `stream`.
    pub fn guest_initiated(
        stream: UnixStream,
        key: ConnKey,
        guest_cid: u64,
        timeouts: Timeouts,
        hdr: &PacketHeader,
    ) -> Self {
        let mut c = Self::new(stream, key, guest_cid, timeouts);
        c.established = true;
        c.send_response = true;
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = hdr.fwd_cnt;
        c
    }

    pub fn key(&self) -> ConnKey {
        self.key
    }

    /// Guest data waiting for the stream to take it.
    pub fn buffered(&self) -> usize {
        self.tx_buf.len()
    }

    /// How many bytes the guest can still take.
    fn credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether reading the stream is wanted at all (credit aside).
    fn reading(&self) -> bool {
        self.established && !self.host_eof && self.peer_shutdown & shutdown::RCV == 0
    }

    pub fn has_pending_rx(&self) -> bool {
        self.send_request
            || self.send_response
            || self.send_shutdown
            || self.send_credit_request
            || self.send_credit_update
            || (self.reading() && self.rx_ready && self.credit() > 0)
    }

    /// Stream readiness this connection waits for. Reading stops while the last
    /// readiness is unused (no RX buffer yet, or no credit), so that a readable stream
    /// does not wake the event loop again and again.
    pub fn wanted_events(&self) -> EventSet {
        let mut events = EventSet::empty();
        if self.reading() && !self.rx_ready {
            events |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            events |= EventSet::OUT;
        }
        events
    }

    /// The stream polled ready with `events`.
    pub fn on_stream_event(&mut self, events: EventSet) -> Verdict {
        let trouble = EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP;
        if self.registered.contains(EventSet::IN) && events.intersects(EventSet::IN | trouble) {
            // The read that follows tells data, end of stream and error apart.
            self.rx_ready = true;
            self.note_credit_need();
        }
        if !self.tx_buf.is_empty() && events.intersects(EventSet::OUT | trouble) {
            if let Err(e) = self.flush() {
                log::debug!("vsock {:?}: host stream write failed: {e}", self.key);
                return Verdict::Reset;
            }
            return self.apply_peer_shutdown();
        }
        Verdict::Keep
    }

    /// The guest sent `hdr` (with payload `data`) on this connection.
    pub fn on_guest_packet(&mut self, hdr: &PacketHeader, data: &[u8]) -> Verdict {
        // Every header carries the sender's credit.
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
        if self.credit() > 0 {
            self.credit_requested = false;
        }
        match hdr.op {
            op::RST => Verdict::Close,
            op::RESPONSE if !self.established => self.on_response(),
            op::SHUTDOWN if self.established => {
                self.peer_shutdown |= hdr.flags & shutdown::BOTH;
                self.apply_peer_shutdown()
            }
            op::RW if self.established && self.peer_shutdown & shutdown::SEND == 0 => {
                self.on_data(data)
            }
            op::CREDIT_UPDATE => Verdict::Keep,
            op::CREDIT_REQUEST => {
                self.send_credit_update = true;
                Verdict::Keep
            }
            // REQUEST on a live connection, RESPONSE twice, data before the
            // handshake or after the guest's own SHUTDOWN(SEND), unknown operations.
            other => {
                log::debug!("vsock {:?}: unexpected op {other} from the guest", self.key);
                Verdict::Reset
            }
        }
    }

    /// The deadline passed: whatever we waited for did not come.
    pub fn on_timeout(&mut self) -> Verdict {
        log::debug!("vsock {:?}: timed out; resetting", self.key);
        Verdict::Reset
    }

    fn on_response(&mut self) -> Verdict {
        self.established = true;
        self.deadline = None;
        let line = format!("OK {}\n", self.key.local_port);
        // The host process has read nothing from us yet, so the socket buffer is empty
        // and a short write means the stream is broken.
        match send_nosignal(&self.stream, line.as_bytes()) {
            Ok(n) if n == line.len() => Verdict::Keep,
            Ok(_) => Verdict::Reset,
            Err(e) => {
                log::debug!("vsock {:?}: cannot confirm to the host: {e}", self.key);
                Verdict::Reset
            }
        }
    }

    fn on_data(&mut self, data: &[u8]) -> Verdict {
        if self.tx_buf.len() + data.len() > CONN_BUF_ALLOC as usize {
            log::warn!(
                "vsock {:?}: the guest sent past the credit it was given; resetting",
                self.key
            );
            return Verdict::Reset;
        }
        self.guest_tx_cnt = self.guest_tx_cnt.wrapping_add(data.len() as u32);
        let mut rest = data;
        if self.tx_buf.is_empty() {
            match self.write_stream(data) {
                Ok(n) => rest = &data[n..],
                Err(e) => {
                    log::debug!("vsock {:?}: host stream write failed: {e}", self.key);
                    return Verdict::Reset;
                }
            }
        }
        self.tx_buf.extend(rest);
        self.note_forwarded();
        Verdict::Keep
    }

    /// Writes as much of `data` as the stream takes now.
    fn write_stream(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = write_some(&self.stream, data)?;
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            let len = front.len();
            let n = write_some(&self.stream, front)?;
            self.tx_buf.drain(..n);
            self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
            if n < len {
                break;
            }
        }
        if self.tx_buf.is_empty() {
            // Give back what a burst grew it to; most connections never buffer.
            self.tx_buf = VecDeque::new();
        }
        self.note_forwarded();
        Ok(())
    }

    /// After bytes reached the stream: owe the guest a credit update if it has been
    /// a while or it believes our buffer nearly full.
    fn note_forwarded(&mut self) {
        let freed = self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent);
        if freed == 0 {
            return;
        }
        let believed_used = self.guest_tx_cnt.wrapping_sub(self.last_fwd_cnt_sent);
        let believed_free = CONN_BUF_ALLOC.saturating_sub(believed_used);
        if freed >= CREDIT_UPDATE_FREED || believed_free < CREDIT_LOW_WATER {
            self.send_credit_update = true;
        }
    }

    /// With data to read but no credit, ask the guest for some, once.
    fn note_credit_need(&mut self) {
        if self.reading() && self.rx_ready && self.credit() == 0 && !self.credit_requested {
            self.send_credit_request = true;
            self.credit_requested = true;
        }
    }

    /// Carries out the guest's SHUTDOWN flags as far as buffered data allows.
    fn apply_peer_shutdown(&mut self) -> Verdict {
        if self.peer_shutdown & shutdown::RCV != 0 {
            // The guest will read no more: the host process's writes now fail instead
            // of filling a buffer nobody drains.
            let _ = self.stream.shutdown(Shutdown::Read);
            self.rx_ready = false;
        }
        if self.peer_shutdown & shutdown::SEND != 0 && self.tx_buf.is_empty() && !self.write_shut {
            let _ = self.stream.shutdown(Shutdown::Write);
            self.write_shut = true;
        }
        if self.peer_shutdown == shutdown::BOTH {
            if self.tx_buf.is_empty() {
                // Everything delivered: close, and confirm with the reset the spec
                // asks of the side that finishes a shutdown.
                return Verdict::Reset;
            }
            self.deadline
                .get_or_insert(Instant::now() + self.timeouts.shutdown);
        }
        Verdict::Keep
    }

    /// The next packet for the guest, its payload read into `buf`.
    pub fn recv_pkt(&mut self, buf: &mut [u8]) -> (Option<PacketHeader>, Verdict) {
        if self.send_request {
            self.send_request = false;
            return (Some(self.header(op::REQUEST, 0, 0)), Verdict::Keep);
        }
        if self.send_response {
            self.send_response = false;
            return (Some(self.header(op::RESPONSE, 0, 0)), Verdict::Keep);
        }
        // An empty `buf` (a header-only RX buffer) would read as end of stream.
        if self.reading() && self.rx_ready && self.credit() > 0 && !buf.is_empty() {
            let want = buf.len().min(self.credit() as usize);
            match self.stream.read(&mut buf[..want]) {
                Ok(0) => {
                    // The host will send nothing more; it may still read (a unix
                    // stream cannot tell close from shutdown(SHUT_WR)), so only SEND
                    // is shut, as TCP's FIN would. If the host closed for good, the
                    // guest's next write fails on the stream and resets.
                    self.host_eof = true;
                    self.rx_ready = false;
                    self.send_shutdown = true;
                }
                Ok(n) => {
                    self.rx_cnt = self.rx_cnt.wrapping_add(n as u32);
                    if n < want {
                        self.rx_ready = false;
                    }
                    self.note_credit_need();
                    return (Some(self.header(op::RW, n as u32, 0)), Verdict::Keep);
                }
                // Interrupted too: the level-triggered poll reports the stream again.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    self.rx_ready = false
                }
                Err(e) => {
                    log::debug!("vsock {:?}: host stream read failed: {e}", self.key);
                    return (None, Verdict::Reset);
                }
            }
        }
        if self.send_shutdown {
            self.send_shutdown = false;
            let hdr = self.header(op::SHUTDOWN, 0, shutdown::SEND);
            return (Some(hdr), Verdict::Keep);
        }
        if self.send_credit_request {
            self.send_credit_request = false;
            return (Some(self.header(op::CREDIT_REQUEST, 0, 0)), Verdict::Keep);
        }
        if self.send_credit_update {
            return (Some(self.header(op::CREDIT_UPDATE, 0, 0)), Verdict::Keep);
        }
        (None, Verdict::Keep)
    }

    /// A header from us to the guest. Each one tells the guest our credit, so no
    /// separate update is owed after it.
    fn header(&mut self, op: u16, len: u32, flags: u32) -> PacketHeader {
        self.send_credit_update = false;
        self.last_fwd_cnt_sent = self.fwd_cnt;
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }
}

/// Writes as much of `data` as `stream` takes without blocking.
fn write_some(stream: &UnixStream, data: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        match send_nosignal(stream, &data[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
