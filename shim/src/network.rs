//! The pod's network: CNI's veth, wired to a tap the VMM serves to the guest.
//!
//! ```text
//!  pod network namespace (CNI made it, with the veth, its addresses and routes)
//!   tap  --tc u32 (match all) mirred egress redirect-->  veth  <==> CNI's peer / bridge
//!   tap  <--tc u32 (match all) mirred egress redirect--  veth
//! ```
//!
//! In the pod's network namespace the shim creates a tap and two `ingress` qdiscs with
//! one filter each: whatever enters the veth leaves by the tap (to the VMM) and
//! whatever the VMM writes to the tap leaves by the veth. The guest's NIC takes the
//! veth's MAC, MTU, addresses and routes of both families (IPv4 and IPv6, for
//! dual-stack pods), so for the rest of the cluster the guest *is* the veth's end;
//! nothing else on the host changes. The filters are `u32` with one key
//! that matches everything (`match u8 0 0`): this host's kernel has neither matchall
//! nor flower.
//!
//! The tap is not persistent: it lives as long as a descriptor on it is open (the shim
//! passes [`PodNetwork::tap`] to the VMM child), and its qdisc and filter go with it.
//! The veth's qdisc stays until [`detach`].
//!
//! Crates: `netlink-sys` for a plain blocking socket, `netlink-packet-route` and
//! `netlink-packet-core` for typed rtnetlink messages (links, addresses, routes and tc
//! qdiscs, u32 filters and mirred actions), as the guest agent does. `rtnetlink` would
//! bring an async connection task and futures for a handful of requests that must run
//! on a dedicated thread inside the namespace anyway (the tap is opened by name, and
//! `/dev/net/tun` resolves names in the calling thread's namespace): a tokio runtime
//! on that thread would buy nothing.

use std::fmt;
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE,
    NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkExtentMask, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionMirrorOption, TcActionOption, TcActionType, TcAttribute,
    TcFilterU32Option, TcHandle, TcMessage, TcMirror, TcMirrorActionType, TcOption, TcU32Key,
    TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};
use peapod_netlink::{check_ifname, kernel_message};

/// One route for the guest, IPv4 or IPv6, as the agent's protocol has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `0.0.0.0/0` or `::/0` for a default route, else a network such as `10.1.0.0/16`.
    pub destination: String,
    /// Empty for a route without a gateway (on-link).
    pub gateway: String,
    /// The guest interface: the veth's name, which the guest's NIC takes.
    pub device: String,
    /// Preferred source address; empty if none.
    pub source: String,
}

/// The guest's NIC as the veth has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInterface {
    /// The veth's name (usually `eth0`); the guest names its NIC so.
    pub name: String,
    /// The veth's MAC, `aa:bb:cc:dd:ee:ff`: give it to the VMM (`--net fd=N,mac=..`).
    pub mac: String,
    pub mtu: u32,
    /// Addresses with prefix length, IPv4 then IPv6, as `10.88.0.5/16` and
    /// `fd00:88::5/64`: the veth's permanent ones, not its link-local IPv6 address (the
    /// guest's kernel makes the same from the MAC).
    pub addresses: Vec<String>,
}

/// A pod network attached to a tap: what the VMM and the guest agent need.
#[derive(Debug)]
pub struct PodNetwork {
    pub netns: PathBuf,
    /// The veth's name in `netns`.
    pub veth: String,
    pub tap_name: String,
    /// The tap, opened `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`: frames read and written
    /// carry a 10-byte virtio-net header first. Closing the last descriptor on it
    /// (this one and the VMM's copy) deletes the tap.
    pub tap: File,
    pub interface: GuestInterface,
    /// Routes via the veth, on-link ones first so that the guest can add the gateway
    /// routes after them. Connected routes the kernel made from addresses (`proto
    /// kernel`) are left out: the guest's kernel makes them when the agent adds the
    /// addresses.
    pub routes: Vec<Route>,
}

/// Why the pod network could not be attached or detached.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(
        "network namespace {netns}: cannot open it: {source} (the pod sandbox's namespace \
         must exist before the shim attaches to it: did the CNI setup run?)"
    )]
    OpenNamespace { netns: PathBuf, source: io::Error },
    #[error(
        "network namespace {netns}: cannot enter it (setns): {source} (the shim needs \
         CAP_SYS_ADMIN, and the path must be a network namespace such as \
         /var/run/netns/cni-...)"
    )]
    EnterNamespace { netns: PathBuf, source: io::Error },
    #[error(
        "network namespace {netns}: no interface but lo has an IP address (interfaces: \
         {present}); peapod wires the pod's one addressed interface to the VM: check that \
         the CNI plugin ran and gave the pod an IPv4 or IPv6 address"
    )]
    NoInterface { netns: PathBuf, present: String },
    #[error(
        "network namespace {netns}: several interfaces have IP addresses ({names}); \
         peapod wires exactly one to the VM: give the pod a single CNI network"
    )]
    SeveralInterfaces { netns: PathBuf, names: String },
    #[error("network namespace {netns}: tap name {name:?} {reason}")]
    InvalidName {
        netns: PathBuf,
        name: String,
        reason: &'static str,
    },
    #[error("network namespace {netns}: {what}: {source}{hint}")]
    Failed {
        netns: PathBuf,
        what: String,
        source: io::Error,
        /// What the kernel said and what to do, starting with "; ", or empty.
        hint: String,
    },
    #[error("network namespace {netns}: the thread working in it panicked: {message}")]
    Panicked { netns: PathBuf, message: String },
}

impl PodNetwork {
    /// Finds the one non-loopback interface with an IP address in `netns` (error
    /// naming the namespace if none, or more than one), reads it, creates the tap
    /// `tap_name` and the two filters. On failure nothing is left behind.
    ///
    /// Blocking: it works on a thread of its own that enters the namespace.
    pub fn attach(netns: &Path, tap_name: &str) -> Result<PodNetwork, NetworkError> {
        check_ifname(tap_name).map_err(|reason| NetworkError::InvalidName {
            netns: netns.to_path_buf(),
            name: tap_name.to_string(),
            reason,
        })?;
        let ns = netns.to_path_buf();
        let tap_name = tap_name.to_string();
        in_netns(netns, false, move || attach_here(&ns, &tap_name))?
            .expect("attach never treats the namespace as absent")
    }
}

/// Removes what [`PodNetwork::attach`] made (the veth's ingress qdisc, hence its
/// filter; the tap if it still exists), given only the names: the shim's `delete`
/// runs after a crash, with no [`PodNetwork`]. Idempotent: a missing namespace, veth,
/// qdisc or tap is success.
pub fn detach(netns: &Path, veth: &str, tap_name: &str) -> Result<(), NetworkError> {
    let ns = netns.to_path_buf();
    let veth = veth.to_string();
    let tap_name = tap_name.to_string();
    match in_netns(netns, true, move || detach_here(&ns, &veth, &tap_name))? {
        None => Ok(()), // the namespace is gone, and everything in it
        Some(result) => result,
    }
}

/// Runs `f` on a new thread inside the network namespace at `netns` and returns its
/// result. With `missing_ok`, a namespace that no longer exists gives `None`.
pub(crate) fn in_netns<T: Send + 'static>(
    netns: &Path,
    missing_ok: bool,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<Option<T>, NetworkError> {
    let file = match File::open(netns) {
        Ok(f) => f,
        Err(e) if missing_ok && e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(NetworkError::OpenNamespace {
                netns: netns.to_path_buf(),
                source,
            })
        }
    };
    let ns = netns.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("peapod-netns".to_string())
        .spawn(move || {
            // SAFETY: setns(2) on a descriptor we own; it changes only this thread's
            // network namespace, and this thread ends after `f`.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            drop(file);
            Ok(f())
        })
        .map_err(|source| NetworkError::Failed {
            netns: netns.to_path_buf(),
            what: "starting a thread to enter it".to_string(),
            source,
            hint: String::new(),
        })?;
    match thread.join() {
        Ok(Ok(value)) => Ok(Some(value)),
        // A path whose namespace was released (`ip netns del` unmounts it; a stale
        // file may be left) is not a namespace any more: EINVAL.
        Ok(Err(e)) if missing_ok && e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Ok(Err(source)) => Err(NetworkError::EnterNamespace { netns: ns, source }),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(NetworkError::Panicked { netns: ns, message })
        }
    }
}

/// A link as the dump shows it.
#[derive(Debug, Clone)]
struct Link {
    index: u32,
    name: String,
    mac: Option<[u8; 6]>,
    mtu: u32,
    loopback: bool,
}

struct Mac<'a>(&'a [u8; 6]);

impl fmt::Display for Mac<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Turns a netlink step's `(error, hint)` in `netns` into [`NetworkError::Failed`]
/// naming the step (`what`).
fn failed(netns: &Path, what: String) -> impl FnOnce((io::Error, String)) -> NetworkError {
    let netns = netns.to_path_buf();
    move |(source, hint)| NetworkError::Failed {
        netns,
        what,
        source,
        hint,
    }
}

/// [`PodNetwork::attach`], on a thread inside the namespace.
fn attach_here(netns: &Path, tap_name: &str) -> Result<PodNetwork, NetworkError> {
    let fail = |what: String| failed(netns, what);
    let mut rtnl =
        Rtnl::open().map_err(|e| fail("opening a netlink socket".into())((e, "".into())))?;
    let links = rtnl
        .links()
        .map_err(fail("listing the interfaces".into()))?;
    let addresses = rtnl
        .addresses()
        .map_err(fail("listing the IP addresses".into()))?;
    let candidates: Vec<&Link> = links
        .iter()
        .filter(|l| !l.loopback && addresses.iter().any(|(i, _)| *i == l.index))
        .collect();
    let veth = match candidates.as_slice() {
        [one] => (*one).clone(),
        [] => {
            let present: Vec<&str> = links.iter().map(|l| l.name.as_str()).collect();
            return Err(NetworkError::NoInterface {
                netns: netns.to_path_buf(),
                present: present.join(", "),
            });
        }
        several => {
            let names: Vec<&str> = several.iter().map(|l| l.name.as_str()).collect();
            return Err(NetworkError::SeveralInterfaces {
                netns: netns.to_path_buf(),
                names: names.join(", "),
            });
        }
    };
    let Some(mac) = veth.mac else {
        return Err(NetworkError::Failed {
            netns: netns.to_path_buf(),
            what: format!("reading interface {}", veth.name),
            source: io::Error::other("it has no Ethernet address"),
            hint: "; peapod needs an Ethernet interface such as a veth (CNI's ptp or bridge \
                   plugins make one)"
                .to_string(),
        });
    };
    if links.iter().any(|l| l.name == tap_name) {
        return Err(NetworkError::Failed {
            netns: netns.to_path_buf(),
            what: format!("creating tap {tap_name}"),
            source: io::Error::from_raw_os_error(libc::EEXIST),
            hint: "; an interface of this name is there already (a previous shim's? \
                   detach removes it): pick another tap name"
                .to_string(),
        });
    }
    let interface = GuestInterface {
        name: veth.name.clone(),
        mac: Mac(&mac).to_string(),
        mtu: veth.mtu,
        addresses: addresses
            .iter()
            .filter(|(i, _)| *i == veth.index)
            .map(|(_, a)| a.clone())
            .collect(),
    };
    let routes = rtnl
        .routes(veth.index, &veth.name)
        .map_err(fail("listing the routes".into()))?;

    // The tap first: if anything after fails, closing it deletes it, its qdisc and
    // its filter. The veth's qdisc comes last, and is the only thing to undo.
    let tap = open_tap(tap_name).map_err(|(source, hint)| NetworkError::Failed {
        netns: netns.to_path_buf(),
        what: format!("creating tap {tap_name} on /dev/net/tun"),
        source,
        hint,
    })?;
    let tap_index = rtnl
        .links()
        .map_err(fail("listing the interfaces".into()))?
        .into_iter()
        .find(|l| l.name == tap_name)
        .map(|l| l.index)
        .ok_or_else(|| NetworkError::Failed {
            netns: netns.to_path_buf(),
            what: format!("finding tap {tap_name} after creating it"),
            source: io::Error::from_raw_os_error(libc::ENODEV),
            hint: "; /dev/net/tun made it in another namespace?".to_string(),
        })?;
    rtnl.set_link_up(tap_index, veth.mtu).map_err(fail(format!(
        "setting tap {tap_name} up with MTU {} (the veth's)",
        veth.mtu
    )))?;
    rtnl.add_ingress_qdisc(tap_index)
        .map_err(fail(format!("adding an ingress qdisc to tap {tap_name}")))?;
    rtnl.add_redirect(tap_index, veth.index)
        .map_err(fail(format!(
            "adding a filter redirecting tap {tap_name}'s ingress to {}",
            veth.name
        )))?;
    rtnl.add_ingress_qdisc(veth.index)
        .map_err(|(source, mut hint)| {
            if source.raw_os_error() == Some(libc::EEXIST) {
                hint += "; the veth has an ingress qdisc already: another runtime's, or a \
                     previous shim's that was not detached (detach removes it)";
            }
            NetworkError::Failed {
                netns: netns.to_path_buf(),
                what: format!("adding an ingress qdisc to {}", veth.name),
                source,
                hint,
            }
        })?;
    if let Err(e) = rtnl.add_redirect(veth.index, tap_index) {
        // Undo: the qdisc made just now (the tap goes when `tap` is dropped).
        let _ = rtnl.del_ingress_qdisc(veth.index);
        return Err(fail(format!(
            "adding a filter redirecting {}'s ingress to tap {tap_name}",
            veth.name
        ))(e));
    }
    Ok(PodNetwork {
        netns: netns.to_path_buf(),
        veth: veth.name.clone(),
        tap_name: tap_name.to_string(),
        tap,
        interface,
        routes,
    })
}

/// [`detach`], on a thread inside the namespace.
fn detach_here(netns: &Path, veth: &str, tap_name: &str) -> Result<(), NetworkError> {
    let fail = |what: String| failed(netns, what);
    let mut rtnl =
        Rtnl::open().map_err(|e| fail("opening a netlink socket".into())((e, "".into())))?;
    let links = rtnl
        .links()
        .map_err(fail("listing the interfaces".into()))?;
    if let Some(link) = links.iter().find(|l| l.name == veth) {
        let has_ingress = rtnl
            .has_ingress_qdisc(link.index)
            .map_err(fail(format!("listing the qdiscs of {veth}")))?;
        if has_ingress {
            match rtnl.del_ingress_qdisc(link.index) {
                Err((e, _)) if e.raw_os_error() == Some(libc::ENOENT) => {}
                r => r.map_err(fail(format!("deleting the ingress qdisc of {veth}")))?,
            }
        }
    }
    if let Some(link) = links.iter().find(|l| l.name == tap_name) {
        match rtnl.del_link(link.index) {
            // Gone meanwhile: its last descriptor was closed.
            Err((e, _)) if e.raw_os_error() == Some(libc::ENODEV) => {}
            r => r.map_err(fail(format!("deleting tap {tap_name}")))?,
        }
    }
    // The port-forward redirect (`port_forward.rs`). Not a failure of the detach: a
    // node without nf_tables never had it.
    if let Err(e) = crate::nft::remove() {
        log::warn!(
            "network namespace {}: removing table inet {}: {e}",
            netns.display(),
            crate::nft::TABLE
        );
    }
    Ok(())
}

/// Bounds every read of a netlink `socket` by `timeout`.
pub(crate) fn set_receive_timeout(socket: &Socket, timeout: Duration) -> io::Result<()> {
    let timeout = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: SO_RCVTIMEO reads a timeval of the size given, which outlives the call;
    // the socket is open.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Opens `/dev/net/tun` and creates tap `name` on it, in the calling thread's network
/// namespace, with exactly the flags the VMM checks.
fn open_tap(name: &str) -> Result<File, (io::Error, String)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| {
            (
                e,
                "; the shim needs /dev/net/tun (modprobe tun) and CAP_NET_ADMIN".to_string(),
            )
        })?;
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: TUNSETIFF reads and writes the ifreq, which outlives the call; the
    // descriptor is open.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
        let e = io::Error::last_os_error();
        let hint = match e.raw_os_error() {
            Some(libc::EBUSY) => "; a tap of this name is open already: pick another name",
            Some(libc::EPERM) => "; creating a tap needs CAP_NET_ADMIN",
            _ => "",
        };
        return Err((e, hint.to_string()));
    }
    Ok(file)
}

/// A netlink failure: the errno and what the kernel said (as "; the kernel says: ..."),
/// or an empty string.
type NlError = (io::Error, String);

fn plain(e: io::Error) -> NlError {
    (e, String::new())
}

/// One rtnetlink socket, in the namespace of the thread that opened it.
struct Rtnl {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// The kernel answers at once; waiting longer means a bug, which must not hang the
/// shim.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Enough for any datagram the kernel sends: it sizes dump datagrams by the reader's
/// buffer, up to 32 KiB.
const RECV_BUF: usize = 64 * 1024;

/// `htons(ETH_P_ALL)`, the filter's protocol (`protocol all`).
const ETH_P_ALL_BE: u16 = (libc::ETH_P_ALL as u16).to_be();

impl Rtnl {
    fn open() -> io::Result<Self> {
        let socket = Socket::new(NETLINK_ROUTE)?;
        // The kernel then says why a request failed, in words. Without it (kernels
        // before 4.12) errors are only less precise.
        let _ = socket.set_ext_ack(true);
        set_receive_timeout(&socket, ANSWER_TIMEOUT)?;
        Ok(Rtnl {
            socket,
            seq: 0,
            buf: vec![0; RECV_BUF],
        })
    }

    fn send(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        let sent = self.socket.send(&out, 0)?;
        if sent != out.len() {
            return Err(io::Error::other(format!(
                "sent {sent} of {} bytes",
                out.len()
            )));
        }
        Ok(self.seq)
    }

    /// Reads one datagram; returns its messages of sequence number `seq`, each with
    /// its netlink flags.
    fn recv(&mut self, seq: u32) -> io::Result<Vec<(u16, NetlinkPayload<RouteNetlinkMessage>)>> {
        let n = match self.socket.recv(&mut &mut self.buf[..], libc::MSG_TRUNC) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the kernel did not answer in {ANSWER_TIMEOUT:?}"),
                ))
            }
            n => n?,
        };
        if n > self.buf.len() {
            return Err(io::Error::other(format!(
                "a {n}-byte answer did not fit in {} bytes",
                self.buf.len()
            )));
        }
        let mut out = Vec::new();
        let mut rest = &self.buf[..n];
        while !rest.is_empty() {
            let message = NetlinkBuffer::new_checked(rest).map_err(malformed)?;
            let len = message.length() as usize;
            if message.sequence_number() == seq {
                let flags = message.flags();
                let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rest[..len])
                    .map_err(malformed)?;
                out.push((flags, parsed.payload));
            }
            rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
        }
        Ok(out)
    }

    /// Sends a request asking for an ACK and waits for it.
    fn request(&mut self, message: RouteNetlinkMessage, flags: u16) -> Result<(), NlError> {
        let seq = self.send(message, flags | NLM_F_ACK).map_err(plain)?;
        loop {
            for (flags, payload) in self.recv(seq).map_err(plain)? {
                if let NetlinkPayload::Error(e) = payload {
                    return match e.code {
                        None => Ok(()),
                        Some(_) => {
                            let hint = kernel_message(flags, &e.header)
                                .map(|said| format!("; the kernel says: {said}"))
                                .unwrap_or_default();
                            Err((e.to_io(), hint))
                        }
                    };
                }
            }
        }
    }

    /// Sends a dump request and collects the answers.
    fn dump(&mut self, message: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>, NlError> {
        let seq = self.send(message, NLM_F_DUMP).map_err(plain)?;
        let mut all = Vec::new();
        loop {
            for (flags, payload) in self.recv(seq).map_err(plain)? {
                match payload {
                    NetlinkPayload::InnerMessage(m) => all.push(m),
                    NetlinkPayload::Done(_) => return Ok(all),
                    NetlinkPayload::Error(e) if e.code.is_some() => {
                        let hint = kernel_message(flags, &e.header)
                            .map(|said| format!("; the kernel says: {said}"))
                            .unwrap_or_default();
                        return Err((e.to_io(), hint));
                    }
                    _ => {}
                }
            }
        }
    }

    fn links(&mut self) -> Result<Vec<Link>, NlError> {
        let mut request = LinkMessage::default();
        request
            .attributes
            .push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
        let mut links = Vec::new();
        for message in self.dump(RouteNetlinkMessage::GetLink(request))? {
            let RouteNetlinkMessage::NewLink(m) = message else {
                continue;
            };
            let mut link = Link {
                index: m.header.index,
                name: String::new(),
                mac: None,
                mtu: 0,
                loopback: m.header.flags.contains(LinkFlags::Loopback),
            };
            for attribute in m.attributes {
                match attribute {
                    LinkAttribute::IfName(name) => link.name = name,
                    LinkAttribute::Address(a) => link.mac = a.as_slice().try_into().ok(),
                    LinkAttribute::Mtu(mtu) => link.mtu = mtu,
                    _ => {}
                }
            }
            links.push(link);
        }
        Ok(links)
    }

    /// Every address the guest takes, as (interface index, `a.b.c.d/len` or
    /// `x:y::z/len`), IPv4 first (see [`guest_address`]).
    fn addresses(&mut self) -> Result<Vec<(u32, String)>, NlError> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut request = AddressMessage::default();
            request.header.family = family;
            for message in self.dump(RouteNetlinkMessage::GetAddress(request))? {
                if let RouteNetlinkMessage::NewAddress(m) = message {
                    out.extend(guest_address(&m, family).map(|a| (m.header.index, a)));
                }
            }
        }
        Ok(out)
    }

    /// The main table's unicast routes of both families out of interface `index`, but
    /// those the kernel or a router advertisement made: on-link ones first.
    fn routes(&mut self, index: u32, device: &str) -> Result<Vec<Route>, NlError> {
        let mut routes = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut request = RouteMessage::default();
            request.header.address_family = family;
            for message in self.dump(RouteNetlinkMessage::GetRoute(request))? {
                let RouteNetlinkMessage::NewRoute(m) = message else {
                    continue;
                };
                if m.header.address_family == family {
                    routes.extend(guest_route(&m, index, device));
                }
            }
        }
        // Stable: the kernel's order otherwise.
        routes.sort_by_key(|r| !r.gateway.is_empty());
        Ok(routes)
    }

    fn set_link_up(&mut self, index: u32, mtu: u32) -> Result<(), NlError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        m.attributes.push(LinkAttribute::Mtu(mtu));
        self.request(RouteNetlinkMessage::SetLink(m), 0)
    }

    fn del_link(&mut self, index: u32) -> Result<(), NlError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        self.request(RouteNetlinkMessage::DelLink(m), 0)
    }

    /// `tc qdisc add dev X handle ffff: ingress`
    fn add_ingress_qdisc(&mut self, index: u32) -> Result<(), NlError> {
        self.request(
            RouteNetlinkMessage::NewQueueDiscipline(ingress_qdisc(index)),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// `tc qdisc del dev X ingress`: its filters go with it.
    fn del_ingress_qdisc(&mut self, index: u32) -> Result<(), NlError> {
        self.request(
            RouteNetlinkMessage::DelQueueDiscipline(ingress_qdisc(index)),
            0,
        )
    }

    fn has_ingress_qdisc(&mut self, index: u32) -> Result<bool, NlError> {
        let qdiscs = self.dump(RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()))?;
        Ok(qdiscs.iter().any(|m| {
            matches!(m, RouteNetlinkMessage::NewQueueDiscipline(q)
                if q.header.index == index as i32 && q.header.parent == TcHandle::INGRESS)
        }))
    }

    /// `tc filter add dev FROM parent ffff: protocol all u32 match u8 0 0 action
    /// mirred egress redirect dev TO`
    fn add_redirect(&mut self, from: u32, to: u32) -> Result<(), NlError> {
        self.request(
            RouteNetlinkMessage::NewTrafficFilter(redirect_filter(from, to)),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }
}

fn ingress_qdisc(index: u32) -> TcMessage {
    let mut m = TcMessage::with_index(index as i32);
    m.header.handle = TcHandle {
        major: 0xffff,
        minor: 0,
    };
    m.header.parent = TcHandle::INGRESS;
    m.attributes.push(TcAttribute::Kind("ingress".to_string()));
    m
}

/// The filter's message, as `tc` sends it.
fn redirect_filter(from: u32, to: u32) -> TcMessage {
    let mut m = TcMessage::with_index(from as i32);
    m.header.parent = TcHandle {
        major: 0xffff,
        minor: 0,
    };
    // tcm_info: the priority (0: the kernel picks) above, the protocol below.
    m.header.info = u32::from(ETH_P_ALL_BE);
    // One key that matches anything: 0 under mask 0 at offset 0.
    let mut selector = TcU32Selector::default();
    selector.flags = TcU32SelectorFlags::Terminal;
    selector.nkeys = 1;
    selector.keys = vec![TcU32Key::default()];
    let mut parms = TcMirror::default();
    parms.generic.action = TcActionType::Stolen;
    parms.eaction = TcMirrorActionType::EgressRedir;
    parms.ifindex = to;
    let mut action = TcAction::default();
    action.tab = 1;
    action.attributes = vec![
        TcActionAttribute::Kind("mirred".to_string()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            parms,
        ))]),
    ];
    m.attributes = vec![
        TcAttribute::Kind("u32".to_string()),
        TcAttribute::Options(vec![
            TcOption::U32(TcFilterU32Option::Selector(selector)),
            TcOption::U32(TcFilterU32Option::Action(vec![action])),
        ]),
    ];
    m
}

/// The guest's copy of an address of the dump (of `family`), if it is one to copy:
/// an IPv4 address, or an IPv6 one of global scope that is permanent (CNI's; not one
/// that autoconfiguration made, which the guest makes itself from the same router
/// advertisements) and that passed duplicate address detection.
fn guest_address(m: &AddressMessage, family: AddressFamily) -> Option<String> {
    if m.header.family != family {
        return None;
    }
    // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer's on
    // point-to-point links); either is there for an ordinary one.
    let mut local = None;
    let mut address = None;
    // The header's flags are the low 8 bits of IFA_FLAGS, which wins when present.
    let mut flags = AddressFlags::from_bits_truncate(u32::from(m.header.flags.bits()));
    for attribute in &m.attributes {
        match attribute {
            AddressAttribute::Local(a) => local = Some(*a),
            AddressAttribute::Address(a) => address = Some(*a),
            AddressAttribute::Flags(f) => flags = *f,
            _ => {}
        }
    }
    let addr = local.or(address)?;
    if addr.is_ipv6()
        && (m.header.scope != AddressScope::Universe
            || !flags.contains(AddressFlags::Permanent)
            || flags.contains(AddressFlags::Dadfailed))
    {
        return None;
    }
    Some(format!("{addr}/{}", m.header.prefix_len))
}

/// The guest's copy of a route of the dump, if it is one to copy: unicast, main
/// table, out of `index`, not one the kernel made from an address (`proto kernel`) or
/// from a router advertisement (`proto ra`: the guest hears the same advertisements).
fn guest_route(m: &RouteMessage, index: u32, device: &str) -> Option<Route> {
    let h = &m.header;
    if h.kind != RouteType::Unicast
        || matches!(h.protocol, RouteProtocol::Kernel | RouteProtocol::Ra)
    {
        return None;
    }
    let mut table = u32::from(h.table);
    let mut oif = None;
    let mut destination = None;
    let mut gateway = None;
    let mut source = None;
    let ip = |a: &RouteAddress| match a {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    };
    for attribute in &m.attributes {
        match attribute {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Destination(a) => destination = ip(a),
            RouteAttribute::Gateway(a) => gateway = ip(a),
            RouteAttribute::PrefSource(a) => source = ip(a),
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) || oif != Some(index) {
        return None;
    }
    let destination = match (destination, h.address_family) {
        (Some(d), _) => d.to_string(),
        (None, AddressFamily::Inet6) => "::".to_string(),
        (None, _) => "0.0.0.0".to_string(),
    };
    Some(Route {
        destination: format!("{destination}/{}", h.destination_prefix_length),
        gateway: gateway.map(|g| g.to_string()).unwrap_or_default(),
        device: device.to_string(),
        source: source.map(|s| s.to_string()).unwrap_or_default(),
    })
}

fn malformed(e: impl fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed netlink answer: {e}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, UdpSocket};
    use std::process::Command;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Instant;

    use crate::test_util::run;

    const VETH_MAC: &str = "02:00:5e:10:20:30";

    /// A pod namespace holding one end of a veth pair, the other end in a peer
    /// namespace; both namespaces (and so everything in them) deleted on drop.
    struct Fixture {
        pod: String,
        peer: String,
        veth: String,
        veth_peer: String,
        tap: String,
        pod_ip: Ipv4Addr,
        peer_ip: Ipv4Addr,
        /// The IPv6 prefix of the dual-stack fixture, `fd77:<n>::` (a /64).
        prefix6: String,
    }

    impl Fixture {
        /// With `address`, the pod's veth gets `pod_ip/24` and `<prefix6>2/64`, MTU
        /// 1400, a default route of each family via the peer, a gateway route and an
        /// on-link route, like CNI gives; and what CNI does not give: an address and a
        /// route of the kind IPv6 autoconfiguration makes.
        fn new(address: bool) -> Self {
            crate::test_util::require_root("it creates network namespaces, veths and taps");
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::SeqCst);
            let pid = std::process::id();
            let b = (n % 250) as u8;
            let f = Fixture {
                pod: format!("peapod-shim-pod-{pid}-{n}"),
                peer: format!("peapod-shim-peer-{pid}-{n}"),
                veth: format!("sv{pid}x{n}"),
                veth_peer: format!("sp{pid}x{n}"),
                tap: format!("st{pid}x{n}"),
                pod_ip: Ipv4Addr::new(10, 77, b, 2),
                peer_ip: Ipv4Addr::new(10, 77, b, 1),
                prefix6: format!("fd77:{b}::"),
            };
            // From here on Drop cleans up, whatever fails.
            run("ip", &["netns", "add", &f.pod]);
            run("ip", &["netns", "add", &f.peer]);
            run(
                "ip",
                &[
                    "-n",
                    &f.pod,
                    "link",
                    "add",
                    &f.veth,
                    "address",
                    VETH_MAC,
                    "mtu",
                    "1400",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &f.veth_peer,
                    "netns",
                    &f.peer,
                ],
            );
            run("ip", &["-n", &f.pod, "link", "set", &f.veth, "up"]);
            run(
                "ip",
                &[
                    "-n",
                    &f.peer,
                    "link",
                    "set",
                    &f.veth_peer,
                    "up",
                    "mtu",
                    "1400",
                ],
            );
            run(
                "ip",
                &[
                    "-n",
                    &f.peer,
                    "addr",
                    "add",
                    &format!("{}/24", f.peer_ip),
                    "dev",
                    &f.veth_peer,
                ],
            );
            if address {
                let cidr = format!("{}/24", f.pod_ip);
                let gw = f.peer_ip.to_string();
                run("ip", &["-n", &f.pod, "addr", "add", &cidr, "dev", &f.veth]);
                run("ip", &["-n", &f.pod, "route", "add", "default", "via", &gw]);
                run(
                    "ip",
                    &[
                        "-n",
                        &f.pod,
                        "route",
                        "add",
                        "10.200.0.0/16",
                        "via",
                        &gw,
                        "src",
                        &f.pod_ip.to_string(),
                    ],
                );
                run(
                    "ip",
                    &["-n", &f.pod, "route", "add", "192.0.2.1/32", "dev", &f.veth],
                );
                let (pod6, gw6) = (format!("{}2/64", f.prefix6), format!("{}1", f.prefix6));
                let v6 = |args: &[&str]| {
                    let mut all = vec!["-n", &f.pod, "-6"];
                    all.extend_from_slice(args);
                    run("ip", &all);
                };
                v6(&["addr", "add", &pod6, "dev", &f.veth, "nodad"]);
                v6(&["route", "add", "default", "via", &gw6, "dev", &f.veth]);
                // Autoconfiguration's kinds: an address with lifetimes, a route from
                // an advertisement. The guest makes its own; the shim copies neither.
                v6(&[
                    "addr",
                    "add",
                    "fd78::2/64",
                    "dev",
                    &f.veth,
                    "nodad",
                    "valid_lft",
                    "600",
                    "preferred_lft",
                    "600",
                ]);
                v6(&["route", "add", "fd79::/64", "via", &gw6, "proto", "ra"]);
            }
            f
        }

        fn netns(&self) -> PathBuf {
            PathBuf::from(format!("/run/netns/{}", self.pod))
        }

        fn in_pod(&self, program: &str, args: &[&str]) -> String {
            let mut all = vec!["netns", "exec", &self.pod, program];
            all.extend_from_slice(args);
            run("ip", &all)
        }

        fn links(&self) -> String {
            run("ip", &["-n", &self.pod, "-o", "link", "show"])
        }

        fn has_link(&self, name: &str) -> bool {
            self.links()
                .lines()
                .any(|l| l.split(": ").nth(1).and_then(|n| n.split('@').next()) == Some(name))
        }

        fn ingress_qdisc(&self, dev: &str) -> bool {
            self.in_pod("tc", &["qdisc", "show", "dev", dev])
                .contains("ingress ffff:")
        }

        fn filters(&self, dev: &str) -> String {
            self.in_pod("tc", &["filter", "show", "dev", dev, "ingress"])
        }

        /// Sends a UDP datagram to the pod's address from the peer namespace: the peer
        /// first asks for the address's MAC (ARP), then sends it. (No `ping` binary
        /// here; UDP makes the same frames' ARP and an IPv4 packet.)
        fn send_udp_from_peer(&self, port: u16) {
            let file = File::open(format!("/run/netns/{}", self.peer)).unwrap();
            let to = (self.pod_ip, port);
            std::thread::spawn(move || {
                // SAFETY: setns(2) on an open descriptor; only this thread changes.
                let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns: {}", io::Error::last_os_error());
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                s.send_to(b"peapod", to).unwrap();
            })
            .join()
            .unwrap();
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            for ns in [&self.pod, &self.peer] {
                let _ = Command::new("ip").args(["netns", "del", ns]).output();
            }
        }
    }

    /// Reads frames from the tap until `want` accepts one (its Ethernet frame, the
    /// virtio-net header stripped), or panics after 5 s.
    fn read_frame(tap: &mut File, what: &str, want: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {what} came out of the tap in 5 s");
            let mut pfd = libc::pollfd {
                fd: tap.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, valid for the call.
            let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) };
            assert!(r >= 0, "poll: {}", io::Error::last_os_error());
            if r == 0 {
                continue;
            }
            let n = tap.read(&mut buf).expect("reading the tap");
            assert!(
                n >= VNET_HDR + 14,
                "a {n}-byte read is shorter than the headers"
            );
            let frame = &buf[VNET_HDR..n];
            if want(frame) {
                return frame.to_vec();
            }
        }
    }

    const VNET_HDR: usize = 10;

    fn mac_bytes(text: &str) -> [u8; 6] {
        let v: Vec<u8> = text
            .split(':')
            .map(|p| u8::from_str_radix(p, 16).unwrap())
            .collect();
        v.try_into().unwrap()
    }

    #[test]
    fn attach_reads_the_veth_and_carries_frames_both_ways() {
        let f = Fixture::new(true);
        let mut net = PodNetwork::attach(&f.netns(), &f.tap).expect("attach");
        assert_eq!(net.veth, f.veth);
        assert_eq!(net.tap_name, f.tap);
        assert_eq!(
            net.interface,
            GuestInterface {
                name: f.veth.clone(),
                mac: VETH_MAC.to_string(),
                mtu: 1400,
                addresses: vec![format!("{}/24", f.pod_ip), format!("{}2/64", f.prefix6)],
            }
        );
        let route = |dst: &str, gw: &str, src: &str| Route {
            destination: dst.to_string(),
            gateway: gw.to_string(),
            device: f.veth.clone(),
            source: src.to_string(),
        };
        let gw = f.peer_ip.to_string();
        assert_eq!(
            net.routes,
            [
                route("192.0.2.1/32", "", ""),
                route("0.0.0.0/0", &gw, ""),
                route("10.200.0.0/16", &gw, &f.pod_ip.to_string()),
                route("::/0", &format!("{}1", f.prefix6), ""),
            ],
            "on-link first, no proto kernel or proto ra route"
        );

        // The tap: up, with the veth's MTU, and both redirects in place.
        let tap_link = run("ip", &["-n", &f.pod, "-o", "link", "show", &f.tap]);
        assert!(tap_link.contains("mtu 1400 "), "{tap_link}");
        assert!(tap_link.contains(",UP"), "{tap_link}");
        let veth_filters = f.filters(&f.veth);
        assert!(
            veth_filters.contains("u32")
                && veth_filters.contains(&format!("Egress Redirect to device {}", f.tap)),
            "{veth_filters}"
        );
        let tap_filters = f.filters(&f.tap);
        assert!(
            tap_filters.contains("u32")
                && tap_filters.contains(&format!("Egress Redirect to device {}", f.veth)),
            "{tap_filters}"
        );

        // veth -> tap: the peer's ARP request for the pod's address comes out of the
        // tap (the pod namespace's own stack never sees it).
        f.send_udp_from_peer(7777);
        let pod_ip = f.pod_ip.octets();
        let request = read_frame(&mut net.tap, "ARP request", |fr| {
            fr.len() >= 42
                && fr[12..14] == [0x08, 0x06]
                && fr[20..22] == [0, 1]
                && fr[38..42] == pod_ip
        });
        let peer_mac: [u8; 6] = request[22..28].try_into().unwrap();
        assert_eq!(request[0..6], [0xff; 6], "an ARP request is a broadcast");

        // tap -> veth: answer it through the tap as the guest would; the peer then
        // sends the datagram it held, to the veth's MAC.
        let veth_mac = mac_bytes(VETH_MAC);
        let mut reply = vec![0u8; VNET_HDR];
        reply.extend_from_slice(&peer_mac);
        reply.extend_from_slice(&veth_mac);
        reply.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
        reply.extend_from_slice(&veth_mac);
        reply.extend_from_slice(&pod_ip);
        reply.extend_from_slice(&peer_mac);
        reply.extend_from_slice(&f.peer_ip.octets());
        net.tap
            .write_all(&reply)
            .expect("writing an ARP reply to the tap");
        let udp = read_frame(&mut net.tap, "UDP datagram", |fr| {
            fr.len() >= 42 && fr[12..14] == [0x08, 0x00] && fr[23] == 17 && fr[30..34] == pod_ip
        });
        assert_eq!(udp[0..6], veth_mac, "sent to the MAC the tap answered with");
        assert_eq!(&udp[36..38], &7777u16.to_be_bytes());
        assert_eq!(&udp[42..48], b"peapod");

        // detach: the veth's qdisc and filter go, and the tap too (even open).
        detach(&f.netns(), &f.veth, &f.tap).expect("detach");
        assert!(
            !f.ingress_qdisc(&f.veth),
            "the veth's ingress qdisc is gone"
        );
        assert_eq!(f.filters(&f.veth).trim(), "", "the veth's filter is gone");
        assert!(!f.has_link(&f.tap), "the tap is gone:\n{}", f.links());
        assert!(f.has_link(&f.veth), "the veth stays");
        detach(&f.netns(), &f.veth, &f.tap).expect("detach again");
    }

    #[test]
    fn closing_the_tap_deletes_it_and_detach_removes_the_rest() {
        let f = Fixture::new(true);
        let net = PodNetwork::attach(&f.netns(), &f.tap).expect("attach");
        assert!(f.has_link(&f.tap));
        assert!(f.ingress_qdisc(&f.tap) && f.ingress_qdisc(&f.veth));
        drop(net.tap);
        assert!(
            !f.has_link(&f.tap),
            "closed, the tap is gone:\n{}",
            f.links()
        );
        assert!(
            f.ingress_qdisc(&f.veth),
            "the veth's qdisc stays until detach"
        );
        detach(&f.netns(), &f.veth, &f.tap).expect("detach without the tap");
        assert!(!f.ingress_qdisc(&f.veth));
        detach(&f.netns(), &f.veth, &f.tap).expect("detach twice");
        // A namespace that is gone, or a veth that is: nothing to do.
        detach(&f.netns(), "nosuchveth", &f.tap).expect("detach with a missing veth");
        let gone = PathBuf::from(format!(
            "/run/netns/peapod-shim-none-{}",
            std::process::id()
        ));
        detach(&gone, &f.veth, &f.tap).expect("detach on a missing namespace");
        // And attach again works: nothing stale was left.
        let again = PodNetwork::attach(&f.netns(), &f.tap).expect("attach again");
        assert_eq!(again.interface.name, f.veth);
    }

    #[test]
    fn attach_without_an_addressed_interface_names_the_namespace() {
        let f = Fixture::new(false);
        let e = PodNetwork::attach(&f.netns(), &f.tap).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, NetworkError::NoInterface { .. }), "{e:?}");
        assert!(text.contains(&f.netns().display().to_string()), "{text}");
        assert!(text.contains(&f.veth), "lists the interfaces: {text}");
        assert!(text.contains("CNI"), "{text}");
        assert!(!f.has_link(&f.tap), "no tap left");
        assert!(!f.ingress_qdisc(&f.veth));
    }

    #[test]
    fn attach_refuses_several_addressed_interfaces() {
        let f = Fixture::new(true);
        // (No dummy driver on this host: a second veth pair, both ends in the pod.)
        let dummy = format!("sd{}", std::process::id());
        let other = format!("se{}", std::process::id());
        run(
            "ip",
            &[
                "-n", &f.pod, "link", "add", &dummy, "type", "veth", "peer", "name", &other,
            ],
        );
        run(
            "ip",
            &["-n", &f.pod, "addr", "add", "10.99.0.1/24", "dev", &dummy],
        );
        let e = PodNetwork::attach(&f.netns(), &f.tap).unwrap_err();
        assert!(matches!(e, NetworkError::SeveralInterfaces { .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.contains(&f.veth) && text.contains(&dummy), "{text}");
        assert!(!f.has_link(&f.tap));
    }

    #[test]
    fn a_failed_attach_leaves_nothing() {
        let f = Fixture::new(true);
        // Someone else's ingress qdisc on the veth: attach fails at the last step.
        f.in_pod("tc", &["qdisc", "add", "dev", &f.veth, "ingress"]);
        let e = PodNetwork::attach(&f.netns(), &f.tap).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains(&format!("adding an ingress qdisc to {}", f.veth))
                && text.contains("File exists")
                && text.contains("detach removes it"),
            "{text}"
        );
        assert!(!f.has_link(&f.tap), "the tap was undone:\n{}", f.links());
        assert!(f.ingress_qdisc(&f.veth), "the other qdisc is untouched");
        assert_eq!(f.filters(&f.veth).trim(), "");
    }

    #[test]
    fn attach_refuses_a_tap_name_in_use_and_bad_names() {
        let f = Fixture::new(true);
        let e = PodNetwork::attach(&f.netns(), &f.veth)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("creating tap {}", f.veth)), "{e}");
        assert!(e.contains("is there already"), "{e}");
        assert!(f.has_link(&f.veth), "the veth is untouched");
        assert!(!f.ingress_qdisc(&f.veth));
        let e = PodNetwork::attach(&f.netns(), "a-name-much-too-long").unwrap_err();
        assert!(matches!(e, NetworkError::InvalidName { .. }), "{e:?}");
        assert!(e.to_string().contains("longer than 15 bytes"), "{e}");
    }

    #[test]
    fn attach_on_a_missing_namespace_names_it() {
        let path = PathBuf::from(format!(
            "/run/netns/peapod-shim-none-{}",
            std::process::id()
        ));
        let e = PodNetwork::attach(&path, "tap0").unwrap_err();
        assert!(matches!(e, NetworkError::OpenNamespace { .. }), "{e:?}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }

    #[test]
    fn the_filter_is_u32_matching_all_with_a_mirred_redirect() {
        let m = redirect_filter(3, 7);
        assert_eq!(m.header.index, 3);
        assert_eq!(
            m.header.parent,
            TcHandle {
                major: 0xffff,
                minor: 0
            }
        );
        // tc sends htons(ETH_P_ALL) in the low 16 bits of tcm_info.
        assert_eq!(m.header.info.to_ne_bytes()[..2], [0x00, 0x03]);
        let text = format!("{m:?}");
        assert!(
            text.contains("Kind(\"u32\")") && text.contains("Kind(\"mirred\")"),
            "{text}"
        );
        assert!(
            text.contains("EgressRedir") && text.contains("ifindex: 7"),
            "{text}"
        );
        assert!(text.contains("mask: 0, val: 0, off: 0"), "{text}");
    }
}
