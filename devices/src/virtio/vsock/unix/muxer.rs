//! The muxer: the VM's listening socket, every connection's unix stream, and the queue
//! of connections with something for the guest.
//!
//! All of it sits in one epoll instance the muxer owns; the device's event handler
//! watches that single fd. Streams come and go hundreds at a time, and this way they
//! never touch the VMM's event loop (whose dispatch table would go stale if a stream
//! were closed before being unregistered).

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{ConnKey, Connection, Verdict};
use super::handshake::Handshake;
use super::{
    bind_listener, connect_nonblocking, Timeouts, UnixError, FIRST_HOST_PORT, MAX_CONNECTIONS,
    MAX_HANDSHAKES,
};
use crate::virtio::vsock::{host_port_path, op, PacketHeader, VsockBackend, HOST_CID, TYPE_STREAM};

/// Epoll events handled per wake-up; more wait for the next round (level-triggered).
const EVENTS_PER_WAKE: usize = 64;
/// Connections accepted per wake-up, so that a connect storm cannot starve the rest.
const ACCEPTS_PER_WAKE: usize = 32;
/// Resets for unknown connections awaiting RX buffers; past this they are dropped.
const MAX_PENDING_RSTS: usize = 1024;
/// How long accepting pauses after accept() failed for lack of resources (EMFILE),
/// instead of spinning on a listener that stays readable.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

enum RxItem {
    /// A connection that may have packets for the guest.
    Conn(ConnKey),
    /// A reset for a connection that does not exist (any more).
    Rst(ConnKey),
}

pub struct VsockMuxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    /// (device, inode) of the socket file we bound, so Drop removes only ours.
    socket_id: (u64, u64),
    epoll: Epoll,
    timer: TimerFd,
    timer_deadline: Option<Instant>,
    /// Accepting host connections: only once the device is activated.
    started: bool,
    accept_paused_until: Option<Instant>,
    conns: HashMap<ConnKey, Connection>,
    conn_by_fd: HashMap<RawFd, ConnKey>,
    handshakes: HashMap<RawFd, Handshake>,
    /// Local ports held by host-initiated connections.
    host_ports: HashSet<u32>,
    next_host_port: u32,
    rxq: VecDeque<RxItem>,
    pending_rsts: usize,
    timeouts: Timeouts,
}

impl VsockMuxer {
    /// Binds `uds_path` (see `bind_listener`); nothing is accepted before `start`.
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, UnixError> {
        let setup = |what| move |source| UnixError::Setup { what, source };
        let epoll = Epoll::new().map_err(setup("epoll instance"))?;
        let timer = TimerFd::new()
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
            .map_err(setup("timer"))?;
        epoll
            .ctl(
                ControlOperation::Add,
                timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, timer.as_raw_fd() as u64),
            )
            .map_err(setup("timer registration"))?;
        let (listener, socket_id) = bind_listener(&uds_path)?;
        Ok(Self {
            guest_cid,
            uds_path,
            listener,
            socket_id,
            epoll,
            timer,
            timer_deadline: None,
            started: false,
            accept_paused_until: None,
            conns: HashMap::new(),
            conn_by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            host_ports: HashSet::new(),
            next_host_port: FIRST_HOST_PORT,
            rxq: VecDeque::new(),
            pending_rsts: 0,
            timeouts: Timeouts::default(),
        })
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Open connections (established or being set up).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Guest bytes waiting for host processes to read them, over all connections.
    pub fn buffered_bytes(&self) -> usize {
        self.conns.values().map(Connection::buffered).sum()
    }

    #[cfg(test)]
    pub(crate) fn set_timeouts(&mut self, timeouts: Timeouts) {
        self.timeouts = timeouts;
    }

    #[cfg(test)]
    pub(crate) fn handshake_count(&self) -> usize {
        self.handshakes.len()
    }

    fn watch(&self, fd: RawFd, op: ControlOperation, events: EventSet) {
        if let Err(e) = self.epoll.ctl(op, fd, EpollEvent::new(events, fd as u64)) {
            log::error!("vsock: epoll_ctl of fd {fd} in the backend failed: {e}");
        }
    }

    fn watch_listener(&mut self) {
        self.watch(
            self.listener.as_raw_fd(),
            ControlOperation::Add,
            EventSet::IN,
        );
    }

    fn accept_host_streams(&mut self) {
        for _ in 0..ACCEPTS_PER_WAKE {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Err(e) => {
                    log::warn!(
                        "vsock {}: cannot accept host connections ({e}); pausing",
                        self.uds_path.display()
                    );
                    self.watch(
                        self.listener.as_raw_fd(),
                        ControlOperation::Delete,
                        EventSet::IN,
                    );
                    let until = Instant::now() + ACCEPT_BACKOFF;
                    self.accept_paused_until = Some(until);
                    self.arm_timer(until);
                    return;
                }
            };
            if self.handshakes.len() >= MAX_HANDSHAKES || self.conns.len() >= MAX_CONNECTIONS {
                log::warn!(
                    "vsock {}: too many connections; refusing a host connection",
                    self.uds_path.display()
                );
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("vsock: cannot make a host stream non-blocking: {e}");
                continue;
            }
            let fd = stream.as_raw_fd();
            let deadline = Instant::now() + self.timeouts.connect_line;
            self.watch(fd, ControlOperation::Add, EventSet::IN);
            self.handshakes.insert(fd, Handshake::new(stream, deadline));
            self.arm_timer(deadline);
            // Host processes usually write their line right after connecting.
            self.continue_handshake(fd);
        }
    }

    fn continue_handshake(&mut self, fd: RawFd) {
        let Some(handshake) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let result = handshake.poll();
        if let Ok(None) = result {
            return;
        }
        self.watch(fd, ControlOperation::Delete, EventSet::IN);
        let Some(handshake) = self.handshakes.remove(&fd) else {
            return;
        };
        match result {
            Ok(Some(port)) => self.connect_to_guest(handshake.stream, port),
            Ok(None) => {}
            Err(e) => log::debug!("vsock {}: {e}; closing it", self.uds_path.display()),
        }
    }

    /// A host process asked for the guest's `peer_port` over `stream`.
    fn connect_to_guest(&mut self, stream: UnixStream, peer_port: u32) {
        if self.conns.len() >= MAX_CONNECTIONS {
            log::warn!("vsock: too many connections; refusing one to guest port {peer_port}");
            return;
        }
        let Some(local_port) = self.allocate_host_port(peer_port) else {
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port,
        };
        let conn = Connection::host_initiated(stream, key, self.guest_cid, self.timeouts);
        self.insert(conn);
    }

    /// The next free local port; a port is never shared while its connection lives.
    fn allocate_host_port(&mut self, peer_port: u32) -> Option<u32> {
        // At most MAX_CONNECTIONS ports are taken, so this finds one quickly.
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_host_port;
            self.next_host_port = port.checked_add(1).unwrap_or(FIRST_HOST_PORT);
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.host_ports.contains(&port) && !self.conns.contains_key(&key) {
                self.host_ports.insert(port);
                return Some(port);
            }
        }
        None
    }

    /// The guest's REQUEST `hdr` for a connection that does not exist yet.
    fn connect_to_host(&mut self, key: ConnKey, hdr: &PacketHeader) {
        if self.conns.len() >= MAX_CONNECTIONS {
            log::warn!(
                "vsock: too many connections; refusing the guest's to port {}",
                hdr.dst_port
            );
            self.queue_rst(key);
            return;
        }
        let path = host_port_path(&self.uds_path, hdr.dst_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let conn =
                    Connection::guest_initiated(stream, key, self.guest_cid, self.timeouts, hdr);
                self.insert(conn);
            }
            Err(e) => {
                log::debug!("vsock: guest connect to {}: {e}", path.display());
                self.queue_rst(key);
            }
        }
    }

    fn insert(&mut self, conn: Connection) {
        let key = conn.key();
        self.conn_by_fd.insert(conn.stream.as_raw_fd(), key);
        self.conns.insert(key, conn);
        self.settle(key, Verdict::Keep);
    }

    /// Brings the muxer in line with what just happened to connection `key`.
    fn settle(&mut self, key: ConnKey, verdict: Verdict) {
        match verdict {
            Verdict::Keep => {}
            Verdict::Close => return self.remove(key),
            Verdict::Reset => {
                self.remove(key);
                return self.queue_rst(key);
            }
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let wanted = conn.wanted_events();
        if wanted != conn.registered {
            let op = if conn.registered.is_empty() {
                ControlOperation::Add
            } else if wanted.is_empty() {
                ControlOperation::Delete
            } else {
                ControlOperation::Modify
            };
            let fd = conn.stream.as_raw_fd();
            // An unregistered fd never wakes the loop, so a peer's hang-up cannot spin
            // it while the connection waits for credit or RX buffers.
            match self.epoll.ctl(op, fd, EpollEvent::new(wanted, fd as u64)) {
                Ok(()) => conn.registered = wanted,
                Err(e) => {
                    log::error!("vsock {key:?}: cannot update its stream's events: {e}");
                    return self.settle(key, Verdict::Reset);
                }
            }
        }
        if !conn.queued && conn.has_pending_rx() {
            conn.queued = true;
            self.rxq.push_back(RxItem::Conn(key));
        }
        if let Some(deadline) = conn.deadline {
            self.arm_timer(deadline);
        }
    }

    /// Drops connection `key`, closing its stream (the host process sees EOF).
    fn remove(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        let fd = conn.stream.as_raw_fd();
        self.conn_by_fd.remove(&fd);
        if conn.host_initiated {
            self.host_ports.remove(&key.local_port);
        }
        if !conn.registered.is_empty() {
            self.watch(fd, ControlOperation::Delete, EventSet::empty());
        }
    }

    fn queue_rst(&mut self, key: ConnKey) {
        if self.pending_rsts >= MAX_PENDING_RSTS {
            log::debug!("vsock {key:?}: reset dropped, too many pending");
            return;
        }
        self.pending_rsts += 1;
        self.rxq.push_back(RxItem::Rst(key));
    }

    fn arm_timer(&mut self, deadline: Instant) {
        if self.timer_deadline.is_some_and(|t| t <= deadline) {
            return;
        }
        // A zero duration would disarm the timer.
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match self.timer.reset(wait, None) {
            Ok(()) => self.timer_deadline = Some(deadline),
            Err(e) => log::error!("vsock: cannot arm the timeout timer: {e}"),
        }
    }

    /// The timer fired: end whatever waited too long, then re-arm for the next one.
    fn expire(&mut self) {
        // Disarming also resets the expiry count, so the timer fd stops being
        // readable without a (blocking) read.
        if let Err(e) = self.timer.clear() {
            log::error!("vsock: cannot disarm the timeout timer: {e}");
        }
        self.timer_deadline = None;
        let now = Instant::now();
        if self.accept_paused_until.is_some_and(|t| t <= now) {
            self.accept_paused_until = None;
            self.watch_listener();
        }
        let late: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(&fd, _)| fd)
            .collect();
        for fd in late {
            log::debug!("vsock: host connection sent no CONNECT line in time; closing it");
            self.watch(fd, ControlOperation::Delete, EventSet::IN);
            self.handshakes.remove(&fd);
        }
        let late: Vec<ConnKey> = self
            .conns
            .values()
            .filter(|c| c.deadline.is_some_and(|d| d <= now))
            .map(Connection::key)
            .collect();
        for key in late {
            if let Some(conn) = self.conns.get_mut(&key) {
                let verdict = conn.on_timeout();
                self.settle(key, verdict);
            }
        }
        let next = self
            .handshakes
            .values()
            .map(|h| h.deadline)
            .chain(self.conns.values().filter_map(|c| c.deadline))
            .chain(self.accept_paused_until)
            .min();
        if let Some(deadline) = next {
            self.arm_timer(deadline);
        }
    }

    fn rst_header(&self, key: ConnKey) -> PacketHeader {
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            type_: TYPE_STREAM,
            op: op::RST,
            ..PacketHeader::default()
        }
    }
}

impl VsockBackend for VsockMuxer {
    fn start(&mut self) {
        if !self.started {
            self.started = true;
            self.watch_listener();
        }
    }

    fn send_pkt(&mut self, hdr: &PacketHeader, data: &[u8]) {
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            let verdict = conn.on_guest_packet(hdr, data);
            return self.settle(key, verdict);
        }
        match hdr.op {
            op::REQUEST => self.connect_to_host(key, hdr),
            // Nothing to reset.
            op::RST => {}
            _ => self.queue_rst(key),
        }
    }

    fn has_pending_rx(&self) -> bool {
        !self.rxq.is_empty()
    }

    fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<PacketHeader> {
        // Each queued item gets one turn: one with nothing that fits `buf` goes to
        // the back rather than being asked again.
        for _ in 0..self.rxq.len() {
            let item = self.rxq.pop_front()?;
            match item {
                RxItem::Rst(key) => {
                    self.pending_rsts -= 1;
                    return Some(self.rst_header(key));
                }
                RxItem::Conn(key) => {
                    let Some(conn) = self.conns.get_mut(&key) else {
                        continue;
                    };
                    conn.queued = false;
                    let (packet, verdict) = conn.recv_pkt(buf);
                    // Requeued at the back when it has more: connections take turns.
                    self.settle(key, verdict);
                    if packet.is_some() {
                        return packet;
                    }
                }
            }
        }
        None
    }

    fn poll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); EVENTS_PER_WAKE];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                log::error!("vsock: waiting on the backend's epoll failed: {e}");
                return;
            }
        };
        for event in &events[..n] {
            let fd = event.data() as RawFd;
            if fd == self.listener.as_raw_fd() {
                self.accept_host_streams();
            } else if fd == self.timer.as_raw_fd() {
                self.expire();
            } else if let Some(&key) = self.conn_by_fd.get(&fd) {
                if let Some(conn) = self.conns.get_mut(&key) {
                    let verdict = conn.on_stream_event(event.event_set());
                    self.settle(key, verdict);
                }
            } else {
                // Also covers an fd closed earlier in this batch: a stale event for
                // it finds no handshake and is ignored.
                self.continue_handshake(fd);
            }
        }
    }
}

impl Drop for VsockMuxer {
    fn drop(&mut self) {
        // Only our own socket: a successor VMM may have replaced it already.
        use std::os::unix::fs::MetadataExt;
        match std::fs::symlink_metadata(&self.uds_path) {
            Ok(meta) if (meta.dev(), meta.ino()) == self.socket_id => {
                if let Err(e) = std::fs::remove_file(&self.uds_path) {
                    log::warn!("vsock: cannot remove {}: {e}", self.uds_path.display());
                }
            }
            _ => {}
        }
    }
}
