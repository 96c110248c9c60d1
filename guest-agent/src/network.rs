//! The pod's network inside the guest: interfaces found by MAC, renamed, given an MTU,
//! brought up and given their IPv4 and IPv6 addresses, then routes of both families;
//! all over rtnetlink, since the guest has no `ip` binary.
//!
//! Crates: `netlink-sys` for the socket (used blocking, without its tokio feature),
//! `netlink-packet-core` for the netlink framing (headers, attributes, ACKs) and
//! `netlink-packet-route` for the rtnetlink message headers and flags. They are the
//! rust-netlink project's maintained crates, which the async `rtnetlink` crate is built
//! on; `rtnetlink` would bring futures, a connection task and tokio into what is a
//! handful of requests made once per VM. Of netlink-packet-route only the headers are
//! used, not its typed attributes and messages (see `Body`): with those the static
//! agent grew by 880 KiB, without them it grows by 110 KiB with all of the sandbox preparation.
//!
//! Every syscall is costly in an emulated guest, so the agent opens one socket, dumps
//! the links once, then sends every change in one datagram in which only the last
//! request asks for an ACK: the kernel handles the requests in order and answers a
//! failed one by itself, so reading up to the last ACK collects every answer. A whole
//! configuration costs about nine system calls, however many interfaces and routes.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, NetlinkBuffer, NetlinkHeader, NlasIterator, NLMSG_DONE,
    NLMSG_ERROR, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressHeader, AddressScope};
use netlink_packet_route::link::{LinkFlags, LinkHeader};
use netlink_packet_route::route::{RouteHeader, RouteProtocol, RouteScope, RouteType};
use netlink_packet_route::AddressFamily;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};
use nix::libc;
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::TimeVal;
use peapod_netlink::{check_ifname, kernel_message, NETLINK_HEADER_LEN};

use crate::sandbox::SandboxError;

/// The pod's interfaces and routes, as CreateSandbox asks for them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxNetwork {
    pub interfaces: Vec<InterfaceConfig>,
    pub routes: Vec<RouteConfig>,
}

/// One guest interface: the VM's NIC with this MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceConfig {
    pub mac: MacAddr,
    /// The name to give it; `None` keeps the kernel's.
    pub name: Option<String>,
    pub addresses: Vec<IpCidr>,
    /// `None` keeps the device's MTU.
    pub mtu: Option<u32>,
}

/// One route in the main table, IPv4 or IPv6: every address in it is of one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// `0.0.0.0/0` or `::/0` for a default route; no host bits set.
    pub destination: IpCidr,
    pub gateway: Option<IpAddr>,
    /// The interface (by its name after renaming); `None` lets the kernel pick it by
    /// the gateway.
    pub device: Option<String>,
    /// Preferred source address.
    pub source: Option<IpAddr>,
}

/// An Ethernet address; parsed case-insensitively, shown in lowercase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

/// An IP address with a prefix length, as in `10.88.0.5/16` or `fd00:1::5/64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpCidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl InterfaceConfig {
    /// Parses the protocol's strings: `mac` as `aa:bb:cc:dd:ee:ff`, `name` (empty: keep
    /// the kernel's), `addresses` as IPv4 or IPv6 CIDRs, `mtu` (0: keep the device's).
    pub fn parse(
        mac: &str,
        name: &str,
        addresses: &[impl AsRef<str>],
        mtu: u32,
    ) -> Result<Self, SandboxError> {
        let mac: MacAddr = mac.parse().map_err(|reason| SandboxError::Invalid {
            object: format!("interface {mac:?}"),
            reason,
        })?;
        let object = || format!("interface {mac}");
        let name = if name.is_empty() {
            None
        } else {
            check_ifname(name).map_err(|reason| SandboxError::Invalid {
                object: object(),
                reason: format!("name {name:?} {reason}"),
            })?;
            Some(name.to_string())
        };
        let addresses = addresses
            .iter()
            .map(|a| parse_cidr(&object(), "address", a.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(InterfaceConfig {
            mac,
            name,
            addresses,
            mtu: (mtu != 0).then_some(mtu),
        })
    }
}

impl RouteConfig {
    /// Parses the protocol's strings: `destination` an IPv4 or IPv6 CIDR (empty: the
    /// default route of the gateway's family, IPv4 without a gateway), `gateway`,
    /// `device` and `source` each empty when not given, else of the destination's family.
    pub fn parse(
        destination: &str,
        gateway: &str,
        device: &str,
        source: &str,
    ) -> Result<Self, SandboxError> {
        let mut object = format!("route {}", or_default(destination));
        if !gateway.is_empty() {
            object += &format!(" via {gateway}");
        }
        if !device.is_empty() {
            object += &format!(" dev {device}");
        }
        let invalid = |reason: String| SandboxError::Invalid {
            object: object.clone(),
            reason,
        };
        let gateway = parse_optional_ip(&object, "gateway", gateway)?;
        let source = parse_optional_ip(&object, "source", source)?;
        let destination = if destination.is_empty() {
            let addr = match gateway.or(source) {
                Some(IpAddr::V6(_)) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            };
            IpCidr {
                addr,
                prefix_len: 0,
            }
        } else {
            parse_cidr(&object, "destination", destination)?
        };
        let network = destination.network();
        if network != destination.addr {
            return Err(invalid(format!(
                "destination {destination} has host bits set: did you mean {network}/{}?",
                destination.prefix_len
            )));
        }
        for (what, addr) in [("gateway", gateway), ("source", source)] {
            if let Some(addr) = addr.filter(|a| a.is_ipv6() != destination.addr.is_ipv6()) {
                return Err(invalid(format!(
                    "{what} {addr} is {}, the destination {} {destination}: a route's \
                     addresses must all be IPv4 or all IPv6",
                    family_name(&addr),
                    family_name(&destination.addr),
                )));
            }
        }
        let device = if device.is_empty() {
            None
        } else {
            check_ifname(device).map_err(|r| invalid(format!("device {device:?} {r}")))?;
            Some(device.to_string())
        };
        if gateway.is_none() && device.is_none() {
            return Err(invalid("needs a gateway, a device or both".to_string()));
        }
        Ok(RouteConfig {
            destination,
            gateway,
            device,
            source,
        })
    }
}

fn or_default(destination: &str) -> &str {
    match destination {
        "" | "0.0.0.0/0" | "::/0" => "default",
        d => d,
    }
}

fn family_name(addr: &IpAddr) -> &'static str {
    if addr.is_ipv6() {
        "IPv6"
    } else {
        "IPv4"
    }
}

fn parse_cidr(object: &str, what: &str, text: &str) -> Result<IpCidr, SandboxError> {
    let invalid = |reason: &str| SandboxError::Invalid {
        object: object.to_string(),
        reason: format!("{what} {text:?} {reason}"),
    };
    let Some((addr, prefix)) = text.split_once('/') else {
        return Err(invalid(
            "needs a prefix length, as in 10.88.0.5/16 or fd00:1::5/64",
        ));
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| invalid("is not an IP address with a prefix length"))?;
    let max = if addr.is_ipv6() { 128 } else { 32 };
    let prefix_len = match prefix.parse::<u8>() {
        Ok(p) if p <= max && !prefix.starts_with('+') => p,
        _ if max == 32 => return Err(invalid("has a prefix length that is not 0 to 32")),
        _ => return Err(invalid("has a prefix length that is not 0 to 128")),
    };
    Ok(IpCidr { addr, prefix_len })
}

fn parse_optional_ip(object: &str, what: &str, text: &str) -> Result<Option<IpAddr>, SandboxError> {
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| SandboxError::Invalid {
        object: object.to_string(),
        reason: format!("{what} {text:?} is not an IP address"),
    })
}

impl IpCidr {
    /// The address with its host bits cleared.
    fn network(&self) -> IpAddr {
        let keep = |bits: u32| {
            u128::MAX
                .checked_shl(bits - u32::from(self.prefix_len))
                .unwrap_or(0)
        };
        match self.addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & keep(32) as u32)),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & keep(128))),
        }
    }

    /// The broadcast address `ip` and CNI plugins give an IPv4 subnet of more than 2
    /// hosts; IPv6 has none.
    fn broadcast(&self) -> Option<Ipv4Addr> {
        let IpAddr::V4(a) = self.addr else {
            return None;
        };
        let host = u32::MAX
            .checked_shr(u32::from(self.prefix_len))
            .unwrap_or(0);
        (self.prefix_len < 31).then(|| Ipv4Addr::from(u32::from(a) | host))
    }

    fn family(&self) -> AddressFamily {
        if self.addr.is_ipv6() {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        }
    }
}

impl std::str::FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            *byte = parts
                .next()
                .filter(|p| p.len() == 2)
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or("is not a MAC address like 02:00:00:aa:bb:cc")?;
        }
        if parts.next().is_some() {
            return Err("is not a MAC address like 02:00:00:aa:bb:cc".to_string());
        }
        Ok(MacAddr(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// As `ip route` shows it: `default via 10.88.0.1 dev eth0 src 10.88.0.5`.
impl fmt::Display for RouteConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.destination.prefix_len == 0 {
            f.write_str("default")?;
        } else {
            write!(f, "{}", self.destination)?;
        }
        if let Some(gateway) = self.gateway {
            write!(f, " via {gateway}")?;
        }
        if let Some(device) = &self.device {
            write!(f, " dev {device}")?;
        }
        if let Some(source) = self.source {
            write!(f, " src {source}")?;
        }
        Ok(())
    }
}

/// Configures the guest's network as asked: `lo` up, then each interface, then the
/// routes. Running it again with the same configuration changes nothing and succeeds:
/// addresses and routes that exist already are kept.
/// `restored`: the guest was restored from a snapshot, so its one card has the
/// snapshot VM's MAC and takes the one interface's.
pub fn configure_network(net: &SandboxNetwork, restored: bool) -> Result<(), SandboxError> {
    let mut rtnl = Rtnl::open()?;
    let links = rtnl.links()?;
    let steps = plan(net, &links, restored)?;
    rtnl.apply(&steps)
}

/// A guest link as the dump shows it.
#[derive(Debug, Clone)]
struct Link {
    index: u32,
    name: String,
    mac: Option<MacAddr>,
    up: bool,
    loopback: bool,
    mtu: Option<u32>,
}

/// One rtnetlink request, with what to call it in an error.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Step {
    what: String,
    op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Up {
        index: u32,
    },
    Down {
        index: u32,
    },
    Rename {
        index: u32,
        name: String,
    },
    SetMac {
        index: u32,
        mac: MacAddr,
    },
    Mtu {
        index: u32,
        mtu: u32,
    },
    AddAddress {
        index: u32,
        cidr: IpCidr,
    },
    AddRoute {
        route: RouteConfig,
        oif: Option<u32>,
    },
}

/// Turns the configuration into requests against the guest's current links: what
/// must change, in order. Every lookup happens here, so a request naming a missing
/// interface changes nothing.
fn plan(net: &SandboxNetwork, links: &[Link], restored: bool) -> Result<Vec<Step>, SandboxError> {
    let mut steps = Vec::new();
    if let Some(lo) = links.iter().find(|l| l.loopback) {
        if !lo.up {
            steps.push(Step {
                what: format!("interface {}: bringing it up", lo.name),
                op: Op::Up { index: lo.index },
            });
        }
    }
    // Names after this configuration: route devices are found by them.
    let mut names: BTreeMap<u32, String> =
        links.iter().map(|l| (l.index, l.name.clone())).collect();
    let mut seen = Vec::new();
    for iface in &net.interfaces {
        let object = format!("interface {}", iface.mac);
        if seen.contains(&iface.mac) {
            return Err(SandboxError::Invalid {
                object,
                reason: "is asked for twice".to_string(),
            });
        }
        seen.push(iface.mac);
        let (link, new_mac) = match links
            .iter()
            .find(|l| !l.loopback && l.mac == Some(iface.mac))
        {
            Some(link) => (link, false),
            // A guest restored from a snapshot has the snapshot VM's MAC on its card:
            // with one card and one interface asked for, that card is it.
            None => match only_card(links).filter(|_| restored && net.interfaces.len() == 1) {
                Some(link) => (link, true),
                None => {
                    return Err(SandboxError::NoSuchMac {
                        object: object.clone(),
                        present: present_macs(links),
                    })
                }
            },
        };
        let index = link.index;
        let mut up = link.up;
        let mut name = link.name.as_str();
        if new_mac {
            if up {
                steps.push(Step {
                    what: format!("{object} ({name}): taking it down to set its MAC"),
                    op: Op::Down { index },
                });
                up = false;
            }
            steps.push(Step {
                what: format!("{object} ({name}): setting its MAC"),
                op: Op::SetMac {
                    index,
                    mac: iface.mac,
                },
            });
        }
        let rename = iface.name.as_deref().filter(|n| *n != link.name);
        if let Some(new) = rename {
            if let Err(reason) = check_ifname(new) {
                return Err(SandboxError::Invalid {
                    object,
                    reason: format!("name {new:?} {reason}"),
                });
            }
            if up {
                steps.push(Step {
                    what: format!("{object} ({name}): taking it down to rename it"),
                    op: Op::Down { index },
                });
                up = false;
            }
            steps.push(Step {
                what: format!("{object}: renaming {name} to {new}"),
                op: Op::Rename {
                    index,
                    name: new.to_string(),
                },
            });
            name = new;
        }
        if let Some(mtu) = iface.mtu.filter(|m| Some(*m) != link.mtu) {
            steps.push(Step {
                what: format!("{object} ({name}): setting MTU {mtu}"),
                op: Op::Mtu { index, mtu },
            });
        }
        // Up before the addresses: IPv6 starts using an address, and makes its prefix
        // route, when its link is up.
        if !up {
            steps.push(Step {
                what: format!("{object} ({name}): bringing it up"),
                op: Op::Up { index },
            });
        }
        for cidr in &iface.addresses {
            steps.push(Step {
                what: format!("{object} ({name}): adding address {cidr}"),
                op: Op::AddAddress { index, cidr: *cidr },
            });
        }
        names.insert(index, name.to_string());
    }
    let mut taken = BTreeMap::new();
    for (index, name) in &names {
        if let Some(other) = taken.insert(name.as_str(), *index) {
            let mac = |i| links.iter().find(|l| l.index == i).and_then(|l| l.mac);
            return Err(SandboxError::Invalid {
                object: format!("interface name {name}"),
                reason: format!(
                    "would be given to two interfaces ({} and {}): give each its own name",
                    mac(other).map_or("?".to_string(), |m| m.to_string()),
                    mac(*index).map_or("?".to_string(), |m| m.to_string()),
                ),
            });
        }
    }
    for route in &net.routes {
        let oif = match &route.device {
            None => None,
            Some(device) => {
                Some(
                    *taken
                        .get(device.as_str())
                        .ok_or_else(|| SandboxError::Invalid {
                            object: format!("route {route}"),
                            reason: format!(
                                "no guest interface is named {device} (there are: {})",
                                taken.keys().copied().collect::<Vec<_>>().join(", ")
                            ),
                        })?,
                )
            }
        };
        steps.push(Step {
            what: format!("route {route}"),
            op: Op::AddRoute {
                route: route.clone(),
                oif,
            },
        });
    }
    Ok(steps)
}

/// The guest's one network card, if it has exactly one.
fn only_card(links: &[Link]) -> Option<&Link> {
    let mut cards = links.iter().filter(|l| !l.loopback);
    match (cards.next(), cards.next()) {
        (Some(card), None) => Some(card),
        _ => None,
    }
}

fn present_macs(links: &[Link]) -> String {
    let list: Vec<String> = links
        .iter()
        .filter(|l| !l.loopback)
        .filter_map(|l| Some(format!("{} {}", l.name, l.mac?)))
        .collect();
    if list.is_empty() {
        "none but lo".to_string()
    } else {
        list.join(", ")
    }
}

/// A request's body: a fixed header of netlink-packet-route's, then attributes, built
/// here raw rather than with its typed messages (`LinkMessage`...): their emitters and
/// parsers cover every rtnetlink family and link kind (traffic control, bonds, CAN...),
/// and would add 120 KiB to the agent to emit, 800 KiB to parse answers as
/// `RouteNetlinkMessage`. Answers are read the same way (see [`Link::parse`]).
struct Body {
    header: Header,
    attributes: Vec<DefaultNla>,
}

enum Header {
    Link(LinkHeader),
    Address(AddressHeader),
    Route(RouteHeader),
}

// Attribute numbers, from <linux/if_link.h>, <linux/if_addr.h>, <linux/rtnetlink.h>.
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_EXT_MASK: u16 = 29;
const RTEXT_FILTER_SKIP_STATS: u32 = 1 << 3;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const IFA_FLAGS: u16 = 8;
const IFA_F_NODAD: u32 = 0x02;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PREFSRC: u16 = 7;

fn nla_u32(kind: u16, value: u32) -> DefaultNla {
    DefaultNla::new(kind, value.to_ne_bytes().to_vec())
}

fn nla_ip(kind: u16, addr: IpAddr) -> DefaultNla {
    let octets = match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    DefaultNla::new(kind, octets)
}

fn link_header(index: u32) -> LinkHeader {
    LinkHeader {
        interface_family: AddressFamily::Unspec,
        index,
        ..LinkHeader::default()
    }
}

impl Op {
    /// The request: its type, its `NLM_F_*` flags beyond `NLM_F_REQUEST`, its body.
    fn request(&self) -> (u16, u16, Body) {
        let create = NLM_F_CREATE | NLM_F_EXCL;
        let (kind, flags, header, attributes) = match self {
            Op::Up { index } | Op::Down { index } => {
                let mut header = link_header(*index);
                header.change_mask = LinkFlags::Up;
                if matches!(self, Op::Up { .. }) {
                    header.flags = LinkFlags::Up;
                }
                (libc::RTM_SETLINK, 0, Header::Link(header), vec![])
            }
            Op::Rename { index, name } => {
                let mut value = name.clone().into_bytes();
                value.push(0);
                let attributes = vec![DefaultNla::new(IFLA_IFNAME, value)];
                (
                    libc::RTM_SETLINK,
                    0,
                    Header::Link(link_header(*index)),
                    attributes,
                )
            }
            Op::SetMac { index, mac } => {
                let attributes = vec![DefaultNla::new(IFLA_ADDRESS, mac.0.to_vec())];
                (
                    libc::RTM_SETLINK,
                    0,
                    Header::Link(link_header(*index)),
                    attributes,
                )
            }
            Op::Mtu { index, mtu } => {
                let attributes = vec![nla_u32(IFLA_MTU, *mtu)];
                (
                    libc::RTM_SETLINK,
                    0,
                    Header::Link(link_header(*index)),
                    attributes,
                )
            }
            Op::AddAddress { index, cidr } => {
                let header = AddressHeader {
                    family: cidr.family(),
                    prefix_len: cidr.prefix_len,
                    scope: AddressScope::Universe,
                    index: *index,
                    ..AddressHeader::default()
                };
                let mut attributes =
                    vec![nla_ip(IFA_LOCAL, cidr.addr), nla_ip(IFA_ADDRESS, cidr.addr)];
                if let Some(broadcast) = cidr.broadcast() {
                    attributes.push(nla_ip(IFA_BROADCAST, IpAddr::V4(broadcast)));
                }
                if cidr.addr.is_ipv6() {
                    // No duplicate address detection: the pod's address is the veth's,
                    // which CNI checked on the node; detecting would keep it unusable
                    // ("tentative") for a second or more of the guest's start.
                    attributes.push(nla_u32(IFA_FLAGS, IFA_F_NODAD));
                }
                (
                    libc::RTM_NEWADDR,
                    create,
                    Header::Address(header),
                    attributes,
                )
            }
            Op::AddRoute { route, oif } => {
                let header = RouteHeader {
                    address_family: route.destination.family(),
                    destination_prefix_length: route.destination.prefix_len,
                    table: RouteHeader::RT_TABLE_MAIN,
                    protocol: RouteProtocol::Boot,
                    kind: RouteType::Unicast,
                    scope: if route.gateway.is_some() {
                        RouteScope::Universe
                    } else {
                        RouteScope::Link
                    },
                    ..RouteHeader::default()
                };
                let mut attributes = Vec::new();
                if route.destination.prefix_len > 0 {
                    attributes.push(nla_ip(RTA_DST, route.destination.addr));
                }
                if let Some(gateway) = route.gateway {
                    attributes.push(nla_ip(RTA_GATEWAY, gateway));
                }
                if let Some(oif) = oif {
                    attributes.push(nla_u32(RTA_OIF, *oif));
                }
                if let Some(source) = route.source {
                    attributes.push(nla_ip(RTA_PREFSRC, source));
                }
                (
                    libc::RTM_NEWROUTE,
                    create,
                    Header::Route(header),
                    attributes,
                )
            }
        };
        (kind, flags, Body { header, attributes })
    }

    /// Whether "exists already" is success: adding is idempotent.
    fn exists_ok(&self) -> bool {
        matches!(self, Op::AddAddress { .. } | Op::AddRoute { .. })
    }

    /// What to do about a failure, when the errno says more than the kernel does.
    fn hint(&self, errno: i32) -> &'static str {
        match (self, errno) {
            (Op::Rename { .. }, libc::EEXIST) => {
                "; another guest interface has this name already: give each its own"
            }
            (Op::Mtu { .. }, libc::EINVAL) => {
                "; the device refuses this MTU: ask for one within its range"
            }
            (Op::AddRoute { .. }, libc::ENETUNREACH) => {
                "; the gateway must be inside the subnet of one of the guest's addresses"
            }
            (Op::AddRoute { route, .. }, libc::EINVAL) if route.source.is_some() => {
                "; the source must be one of the guest's addresses"
            }
            _ => "",
        }
    }
}

impl Emitable for Body {
    fn buffer_len(&self) -> usize {
        self.header().buffer_len() + self.attributes.as_slice().buffer_len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        let header = self.header();
        header.emit(buffer);
        self.attributes
            .as_slice()
            .emit(&mut buffer[header.buffer_len()..]);
    }
}

impl Body {
    fn header(&self) -> &dyn Emitable {
        match &self.header {
            Header::Link(h) => h,
            Header::Address(h) => h,
            Header::Route(h) => h,
        }
    }
}

/// One rtnetlink socket.
struct Rtnl {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// How long to wait for the kernel's answer.
const ANSWER_TIMEOUT_SECS: i64 = 10;

/// Enough for any datagram the kernel sends: it sizes dump datagrams by the reader's
/// buffer, up to 32 KiB.
const RECV_BUF: usize = 32 * 1024;

/// The size of `struct ifinfomsg`, before a link's attributes.
const IFINFOMSG_LEN: usize = 16;

/// One message of a datagram from the kernel.
struct Reply<'a> {
    kind: u16,
    flags: u16,
    seq: u32,
    payload: &'a [u8],
}

fn netlink_error(what: &str, source: io::Error) -> SandboxError {
    SandboxError::Failed {
        what: format!("netlink: {what}"),
        source,
        hint: String::new(),
    }
}

fn malformed(e: DecodeError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("malformed answer: {e}"))
}

impl Rtnl {
    fn open() -> Result<Self, SandboxError> {
        let socket = Socket::new(NETLINK_ROUTE)
            .map_err(|e| netlink_error("opening a NETLINK_ROUTE socket", e))?;
        // The kernel then says why a request failed, in words, not only an errno.
        // Without it (kernels before 4.12) errors are only less precise.
        let _ = socket.set_ext_ack(true);
        // The kernel answers at once; waiting longer means a bug, which must not hang
        // CreateSandbox.
        let timeout = TimeVal::new(ANSWER_TIMEOUT_SECS, 0);
        setsockopt(&socket, sockopt::ReceiveTimeout, &timeout)
            .map_err(|e| netlink_error("setting SO_RCVTIMEO", e.into()))?;
        Ok(Rtnl {
            socket,
            seq: 0,
            buf: vec![0; RECV_BUF],
        })
    }

    /// Sends the requests in one datagram, numbered from the returned sequence number;
    /// each is flagged `NLM_F_REQUEST` and its own flags.
    fn send(&mut self, requests: &[(u16, u16, Body)]) -> io::Result<u32> {
        let first = self.seq.wrapping_add(1);
        let mut out = Vec::new();
        for (kind, flags, body) in requests {
            self.seq = self.seq.wrapping_add(1);
            let mut header = NetlinkHeader::default();
            header.length = (NETLINK_HEADER_LEN + body.buffer_len()) as u32;
            header.message_type = *kind;
            header.flags = NLM_F_REQUEST | *flags;
            header.sequence_number = self.seq;
            let start = out.len();
            out.resize(start + (header.length as usize).next_multiple_of(4), 0);
            header.emit(&mut out[start..]);
            body.emit(&mut out[start + NETLINK_HEADER_LEN..start + header.length as usize]);
        }
        let sent = self.socket.send(&out, 0)?;
        if sent != out.len() {
            return Err(io::Error::other(format!(
                "sent {sent} of {} bytes",
                out.len()
            )));
        }
        Ok(first)
    }

    /// Reads one datagram and splits it into messages.
    fn recv(&mut self) -> io::Result<Vec<Reply<'_>>> {
        let n = match self.socket.recv(&mut &mut self.buf[..], libc::MSG_TRUNC) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the kernel did not answer in {ANSWER_TIMEOUT_SECS} s"),
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
        let mut replies = Vec::new();
        let mut rest = &self.buf[..n];
        while !rest.is_empty() {
            let message = NetlinkBuffer::new_checked(rest).map_err(malformed)?;
            replies.push(Reply {
                kind: message.message_type(),
                flags: message.flags(),
                seq: message.sequence_number(),
                payload: message.payload(),
            });
            let len = (message.length() as usize).next_multiple_of(4);
            rest = rest.get(len..).unwrap_or_default();
        }
        Ok(replies)
    }

    /// Every link, with its name, MAC, state and MTU.
    fn links(&mut self) -> Result<Vec<Link>, SandboxError> {
        let what = "listing the guest's interfaces";
        let request = Body {
            header: Header::Link(LinkHeader::default()),
            attributes: vec![nla_u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)],
        };
        let request = [(libc::RTM_GETLINK, NLM_F_DUMP, request)];
        let seq = self.send(&request).map_err(|e| netlink_error(what, e))?;
        let mut links = Vec::new();
        loop {
            for reply in self.recv().map_err(|e| netlink_error(what, e))? {
                if reply.seq != seq {
                    continue;
                }
                match reply.kind {
                    libc::RTM_NEWLINK => {
                        links.push(Link::parse(reply.payload).map_err(|e| netlink_error(what, e))?)
                    }
                    NLMSG_DONE => return Ok(links),
                    NLMSG_ERROR => {
                        if let Some(errno) = error_code(reply.payload) {
                            let e = io::Error::from_raw_os_error(errno);
                            return Err(netlink_error(what, e));
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Sends the steps in one datagram, only the last asking for an ACK, and reads the
    /// answers up to that ACK. Returns the first failure.
    fn apply(&mut self, steps: &[Step]) -> Result<(), SandboxError> {
        let Some(last) = steps.len().checked_sub(1) else {
            return Ok(());
        };
        let requests: Vec<_> = steps
            .iter()
            .enumerate()
            .map(|(i, step)| {
                let (kind, flags, body) = step.op.request();
                let ack = if i == last { NLM_F_ACK } else { 0 };
                (kind, flags | ack, body)
            })
            .collect();
        let what = "configuring the guest's network";
        let first = self.send(&requests).map_err(|e| netlink_error(what, e))?;
        let mut failure = None;
        loop {
            for reply in self.recv().map_err(|e| netlink_error(what, e))? {
                let i = reply.seq.wrapping_sub(first) as usize;
                let Some(step) = steps.get(i).filter(|_| reply.kind == NLMSG_ERROR) else {
                    continue;
                };
                if let Some(errno) = error_code(reply.payload) {
                    if failure.is_none() && !(step.op.exists_ok() && errno == libc::EEXIST) {
                        let mut hint = String::new();
                        if let Some(said) = kernel_message(reply.flags, &reply.payload[4..]) {
                            hint = format!("; the kernel says: {said}");
                        }
                        hint += step.op.hint(errno);
                        failure = Some(SandboxError::Failed {
                            what: step.what.clone(),
                            source: io::Error::from_raw_os_error(errno),
                            hint,
                        });
                    }
                }
                if i == last {
                    return failure.map_or(Ok(()), Err);
                }
            }
        }
    }
}

/// The errno of an `NLMSG_ERROR` answer; `None` for an ACK.
fn error_code(payload: &[u8]) -> Option<i32> {
    let code = i32::from_ne_bytes(payload.get(..4)?.try_into().ok()?);
    (code != 0).then_some(-code)
}

impl Link {
    /// Reads the fields it needs from an `RTM_NEWLINK` body.
    fn parse(payload: &[u8]) -> io::Result<Link> {
        let header = LinkHeader::parse(payload).map_err(malformed)?;
        let mut link = Link {
            index: header.index,
            name: String::new(),
            mac: None,
            up: header.flags.contains(LinkFlags::Up),
            loopback: header.flags.contains(LinkFlags::Loopback),
            mtu: None,
        };
        for nla in NlasIterator::new(&payload[IFINFOMSG_LEN..]) {
            let nla = nla.map_err(malformed)?;
            let value = nla.value();
            match nla.kind() {
                IFLA_IFNAME => {
                    let name = value.split(|b| *b == 0).next().unwrap_or_default();
                    link.name = String::from_utf8_lossy(name).into_owned();
                }
                IFLA_ADDRESS => link.mac = value.try_into().ok().map(MacAddr),
                IFLA_MTU => link.mtu = value.try_into().ok().map(u32::from_ne_bytes),
                _ => {}
            }
        }
        Ok(link)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const NONE: &[&str] = &[];

    fn link(index: u32, name: &str, mac: &str, up: bool) -> Link {
        Link {
            index,
            name: name.to_string(),
            mac: Some(mac.parse().unwrap()),
            up,
            loopback: name == "lo",
            mtu: Some(1500),
        }
    }

    fn guest_links(eth0_up: bool) -> Vec<Link> {
        vec![
            link(1, "lo", "00:00:00:00:00:00", false),
            link(2, "eth0", "52:54:00:12:34:56", eth0_up),
        ]
    }

    fn ops(steps: &[Step]) -> Vec<Op> {
        steps.iter().map(|s| s.op.clone()).collect()
    }

    fn cidr(text: &str) -> IpCidr {
        parse_cidr("test", "cidr", text).unwrap()
    }

    #[test]
    fn macs_parse_case_insensitively() {
        let mac: MacAddr = "52:54:00:AB:cd:Ef".parse().unwrap();
        assert_eq!(mac.0, [0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:ef");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:01",
            "5254.00ab.cdef",
            "52:54:0:ab:cd:ef",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cidrs_parse() {
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        assert_eq!(
            cidr("10.88.0.5/16"),
            IpCidr {
                addr: ip("10.88.0.5"),
                prefix_len: 16
            }
        );
        assert_eq!(
            cidr("10.88.0.5/16").broadcast(),
            Some(Ipv4Addr::new(10, 88, 255, 255))
        );
        assert_eq!(cidr("10.88.0.5/16").network(), ip("10.88.0.0"));
        assert_eq!(cidr("0.0.0.0/0").network(), ip("0.0.0.0"));
        assert_eq!(cidr("0.0.0.0/0").broadcast(), Some(Ipv4Addr::BROADCAST));
        assert_eq!(cidr("10.0.0.1/31").broadcast(), None);
        assert_eq!(cidr("10.0.0.1/32").network(), ip("10.0.0.1"));
        assert_eq!(cidr("fd00:1:2::5/64").network(), ip("fd00:1:2::"));
        assert_eq!(cidr("fd00:1:2::5/64").broadcast(), None);
        assert_eq!(cidr("fd00:1:2:ffff::5/49").network(), ip("fd00:1:2:8000::"));
        assert_eq!(cidr("::/0").network(), ip("::"));
        assert_eq!(cidr("fd00::5/128").network(), ip("fd00::5"));
        assert_eq!(cidr("FD00::5/128").to_string(), "fd00::5/128");
        for (bad, why) in [
            ("10.88.0.5", "needs a prefix length"),
            ("fd00::5", "needs a prefix length"),
            ("10.88.0.5/33", "not 0 to 32"),
            ("fd00::5/129", "not 0 to 128"),
            ("fd00::5/64/1", "not 0 to 128"),
            ("10.88.0.5/+8", "not 0 to 32"),
            ("10.88.0.5/", "not 0 to 32"),
            ("10.88.0/16", "is not an IP address"),
        ] {
            let e = parse_cidr("interface x", "address", bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
            assert!(
                e.starts_with(&format!("interface x: address {bad:?} ")),
                "{e}"
            );
        }
    }

    #[test]
    fn ipv6_and_dual_stack_parse() {
        let i = InterfaceConfig::parse(
            "02:00:00:00:00:01",
            "eth0",
            &["10.88.0.5/16", "fd00:88::5/64"],
            0,
        )
        .unwrap();
        assert_eq!(i.addresses, [cidr("10.88.0.5/16"), cidr("fd00:88::5/64")]);
        let default = RouteConfig::parse("", "fd00:88::1", "eth0", "").unwrap();
        assert_eq!(
            default,
            RouteConfig::parse("::/0", "fd00:88::1", "eth0", "").unwrap()
        );
        assert_eq!(default.destination, cidr("::/0"));
        assert_eq!(default.to_string(), "default via fd00:88::1 dev eth0");
        // A default route by device alone is IPv4's, unless its source says otherwise.
        let by_device = RouteConfig::parse("", "", "eth0", "").unwrap();
        assert_eq!(by_device.destination, cidr("0.0.0.0/0"));
        let by_source = RouteConfig::parse("", "", "eth0", "fd00:88::5").unwrap();
        assert_eq!(by_source.destination, cidr("::/0"));
        let link_local = RouteConfig::parse("fd00:99::/48", "fe80::1", "eth0", "").unwrap();
        assert_eq!(link_local.to_string(), "fd00:99::/48 via fe80::1 dev eth0");
        for (dst, gw, src, why) in [
            (
                "10.0.0.0/8",
                "fd00::1",
                "",
                "route 10.0.0.0/8 via fd00::1: gateway fd00::1 is IPv6, the destination \
                 IPv4 10.0.0.0/8: a route's addresses must all be IPv4 or all IPv6",
            ),
            (
                "::/0",
                "10.0.0.1",
                "",
                "route default via 10.0.0.1: gateway 10.0.0.1 is IPv4, the destination \
                 IPv6 ::/0",
            ),
            (
                "",
                "fd00::1",
                "10.0.0.5",
                "route default via fd00::1: source 10.0.0.5 is IPv4, the destination IPv6",
            ),
            (
                "fd00:99::1/48",
                "fd00::1",
                "",
                "host bits set: did you mean fd00:99::/48?",
            ),
        ] {
            let e = RouteConfig::parse(dst, gw, "", src).unwrap_err();
            assert!(matches!(e, SandboxError::Invalid { .. }), "{e:?}");
            assert!(e.to_string().contains(why), "{e}");
        }
    }

    #[test]
    fn interfaces_parse() {
        let i =
            InterfaceConfig::parse("02:00:00:AA:BB:01", "eth1", &["10.88.0.5/16"], 1400).unwrap();
        assert_eq!(i.mac.to_string(), "02:00:00:aa:bb:01");
        assert_eq!(i.name.as_deref(), Some("eth1"));
        assert_eq!(i.addresses, [cidr("10.88.0.5/16")]);
        assert_eq!(i.mtu, Some(1400));
        let keep = InterfaceConfig::parse("02:00:00:aa:bb:01", "", NONE, 0).unwrap();
        assert_eq!((keep.name, keep.mtu), (None, None));
        for (mac, name, why) in [
            (
                "02:00:00:aa:bb",
                "eth0",
                "interface \"02:00:00:aa:bb\": is not a MAC",
            ),
            (
                "02:00:00:aa:bb:01",
                "a-very-long-name0",
                "longer than 15 bytes",
            ),
            ("02:00:00:aa:bb:01", "eth0:1", "has a '/', ':'"),
            ("02:00:00:aa:bb:01", "..", "not a valid interface name"),
        ] {
            let e = InterfaceConfig::parse(mac, name, NONE, 0)
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{mac} {name}: {e}");
        }
    }

    #[test]
    fn routes_parse() {
        let default = RouteConfig::parse("", "10.88.0.1", "", "").unwrap();
        assert_eq!(
            default,
            RouteConfig::parse("0.0.0.0/0", "10.88.0.1", "", "").unwrap()
        );
        assert_eq!(default.destination.prefix_len, 0);
        assert_eq!(default.to_string(), "default via 10.88.0.1");
        let full =
            RouteConfig::parse("10.99.0.0/16", "192.168.7.1", "eth1", "192.168.7.2").unwrap();
        assert_eq!(
            full.to_string(),
            "10.99.0.0/16 via 192.168.7.1 dev eth1 src 192.168.7.2"
        );
        let onlink = RouteConfig::parse("172.30.0.0/16", "", "eth1", "").unwrap();
        assert_eq!(
            (onlink.gateway, onlink.device.as_deref()),
            (None, Some("eth1"))
        );
        for (dst, gw, dev, src, why) in [
            (
                "10.1.0.0/8",
                "1.2.3.4",
                "",
                "",
                "host bits set: did you mean 10.0.0.0/8?",
            ),
            (
                "10.0.0.0/8",
                "",
                "",
                "",
                "needs a gateway, a device or both",
            ),
            (
                "10.0.0.0/8",
                "gw",
                "",
                "",
                "gateway \"gw\" is not an IP address",
            ),
            (
                "10.0.0.0/8",
                "1.2.3.4",
                "",
                "me",
                "source \"me\" is not an IP address",
            ),
            ("10.0.0.0", "1.2.3.4", "", "", "needs a prefix length"),
        ] {
            let e = RouteConfig::parse(dst, gw, dev, src).unwrap_err();
            let text = e.to_string();
            assert!(matches!(e, SandboxError::Invalid { .. }), "{text}");
            assert!(text.contains(why), "{text}");
            assert!(text.starts_with(&format!("route {dst}")), "{text}");
        }
    }

    #[test]
    fn plan_for_a_fresh_guest() {
        let net = SandboxNetwork {
            interfaces: vec![InterfaceConfig::parse(
                "52:54:00:12:34:56",
                "eth0",
                &["10.88.0.5/16"],
                1400,
            )
            .unwrap()],
            routes: vec![
                RouteConfig::parse("", "10.88.0.1", "", "").unwrap(),
                RouteConfig::parse("10.9.0.0/16", "", "eth0", "10.88.0.5").unwrap(),
            ],
        };
        let steps = plan(&net, &guest_links(false), false).unwrap();
        assert_eq!(
            ops(&steps),
            [
                Op::Up { index: 1 },
                Op::Mtu {
                    index: 2,
                    mtu: 1400
                },
                Op::Up { index: 2 },
                Op::AddAddress {
                    index: 2,
                    cidr: cidr("10.88.0.5/16")
                },
                Op::AddRoute {
                    route: net.routes[0].clone(),
                    oif: None
                },
                Op::AddRoute {
                    route: net.routes[1].clone(),
                    oif: Some(2)
                },
            ]
        );
        assert_eq!(
            steps[3].what,
            "interface 52:54:00:12:34:56 (eth0): adding address 10.88.0.5/16"
        );
        assert_eq!(steps[4].what, "route default via 10.88.0.1");
    }

    #[test]
    fn plan_gives_a_restored_guests_only_card_the_pods_mac() {
        let net = SandboxNetwork {
            interfaces: vec![InterfaceConfig::parse(
                "02:00:00:00:00:07",
                "eth0",
                &["10.88.0.7/16"],
                0,
            )
            .unwrap()],
            routes: vec![],
        };
        let e = plan(&net, &guest_links(true), false).unwrap_err();
        assert!(
            matches!(e, SandboxError::NoSuchMac { .. }),
            "not restored: {e}"
        );
        let steps = plan(&net, &guest_links(true), true).unwrap();
        assert_eq!(
            ops(&steps),
            [
                Op::Up { index: 1 },
                Op::Down { index: 2 },
                Op::SetMac {
                    index: 2,
                    mac: "02:00:00:00:00:07".parse().unwrap()
                },
                Op::Up { index: 2 },
                Op::AddAddress {
                    index: 2,
                    cidr: cidr("10.88.0.7/16")
                },
            ]
        );
        assert_eq!(
            steps[2].what,
            "interface 02:00:00:00:00:07 (eth0): setting its MAC"
        );
        // With two cards, which one is meant cannot be told.
        let mut two = guest_links(false);
        two.push(link(3, "eth1", "52:54:00:12:34:57", false));
        let e = plan(&net, &two, true).unwrap_err();
        assert!(matches!(e, SandboxError::NoSuchMac { .. }), "{e}");
    }

    #[test]
    fn plan_takes_an_up_interface_down_only_to_rename_it() {
        let rename = SandboxNetwork {
            interfaces: vec![
                InterfaceConfig::parse("52:54:00:12:34:56", "pod0", NONE, 1500).unwrap(),
            ],
            routes: vec![RouteConfig::parse("", "", "pod0", "").unwrap()],
        };
        let steps = plan(&rename, &guest_links(true), false).unwrap();
        assert_eq!(
            ops(&steps),
            [
                Op::Up { index: 1 },
                Op::Down { index: 2 },
                Op::Rename {
                    index: 2,
                    name: "pod0".to_string()
                },
                Op::Up { index: 2 },
                Op::AddRoute {
                    route: rename.routes[0].clone(),
                    oif: Some(2)
                },
            ]
        );
        assert_eq!(
            steps[2].what,
            "interface 52:54:00:12:34:56: renaming eth0 to pod0"
        );
        let mut links = guest_links(true);
        links[0].up = true;
        let same = SandboxNetwork {
            interfaces: vec![InterfaceConfig::parse("52:54:00:12:34:56", "eth0", NONE, 0).unwrap()],
            routes: vec![],
        };
        assert_eq!(plan(&same, &links, false).unwrap(), []);
    }

    #[test]
    fn plan_refuses_what_cannot_be() {
        let links = guest_links(false);
        let missing = SandboxNetwork {
            interfaces: vec![InterfaceConfig::parse("aa:bb:cc:dd:ee:ff", "", NONE, 0).unwrap()],
            routes: vec![],
        };
        assert_eq!(
            plan(&missing, &links, false).unwrap_err().to_string(),
            "interface aa:bb:cc:dd:ee:ff: no guest interface has this MAC (the VM's --net \
             mac= must match; the guest has: eth0 52:54:00:12:34:56)"
        );
        let twice = SandboxNetwork {
            interfaces: vec![
                InterfaceConfig::parse("52:54:00:12:34:56", "", NONE, 0).unwrap(),
                InterfaceConfig::parse("52:54:00:12:34:56", "", NONE, 0).unwrap(),
            ],
            routes: vec![],
        };
        assert!(plan(&twice, &links, false)
            .unwrap_err()
            .to_string()
            .contains("asked for twice"));
        let clash = SandboxNetwork {
            interfaces: vec![InterfaceConfig::parse("52:54:00:12:34:56", "lo", NONE, 0).unwrap()],
            routes: vec![],
        };
        let e = plan(&clash, &links, false).unwrap_err().to_string();
        assert!(
            e.contains("interface name lo: would be given to two interfaces"),
            "{e}"
        );
        let no_dev = SandboxNetwork {
            interfaces: vec![],
            routes: vec![RouteConfig::parse("10.0.0.0/8", "", "eth9", "").unwrap()],
        };
        assert_eq!(
            plan(&no_dev, &links, false).unwrap_err().to_string(),
            "route 10.0.0.0/8 dev eth9: no guest interface is named eth9 (there are: eth0, lo)"
        );
    }

    // Real netlink, in a network namespace of a test thread's own.

    /// These tests create network namespaces and interfaces: without root they fail.
    pub(crate) fn require_root() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root: it creates network namespaces and interfaces \
             (run the tests as root)"
        );
    }

    /// Runs `f` in a thread that has unshared its network namespace (and UTS, for
    /// hostnames): the namespace and everything in it go when the thread ends.
    pub(crate) fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        require_root();
        std::thread::spawn(move || {
            nix::sched::unshare(
                nix::sched::CloneFlags::CLONE_NEWNET | nix::sched::CloneFlags::CLONE_NEWUTS,
            )
            .expect("unshare(CLONE_NEWNET | CLONE_NEWUTS)");
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// Runs `ip` in the calling thread's network namespace (a child inherits it).
    pub(crate) fn ip(args: &[&str]) -> String {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .expect("the netlink tests need iproute2's `ip` to set up and check namespaces");
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A veth pair whose `guest` end has `mac`; the `host` end is up, for a carrier.
    pub(crate) fn veth(guest: &str, mac: &str, host: &str) {
        ip(&[
            "link", "add", guest, "address", mac, "type", "veth", "peer", "name", host,
        ]);
        ip(&["link", "set", host, "up"]);
    }

    fn pod_network() -> SandboxNetwork {
        SandboxNetwork {
            interfaces: vec![
                InterfaceConfig::parse(
                    "02:00:00:AA:BB:01",
                    "eth1",
                    &["10.88.0.5/16", "192.168.77.2/24", "fd00:88::5/64"],
                    1400,
                )
                .unwrap(),
                InterfaceConfig::parse("02:00:00:aa:bb:02", "net2", &["172.31.5.9/24"], 0).unwrap(),
            ],
            routes: vec![
                RouteConfig::parse("", "10.88.0.1", "", "").unwrap(),
                RouteConfig::parse("10.99.0.0/16", "192.168.77.1", "eth1", "192.168.77.2").unwrap(),
                RouteConfig::parse("172.30.0.0/16", "", "net2", "").unwrap(),
                RouteConfig::parse("", "fd00:88::1", "eth1", "").unwrap(),
                RouteConfig::parse("fd00:99::/48", "fe80::1", "net2", "").unwrap(),
            ],
        }
    }

    fn check_pod_network() {
        let lo = ip(&["-o", "link", "show", "lo"]);
        assert!(lo.contains(",UP"), "lo is up: {lo}");
        let eth1 = ip(&["-o", "link", "show", "eth1"]);
        assert!(eth1.contains("link/ether 02:00:00:aa:bb:01"), "{eth1}");
        assert!(eth1.contains(",UP") && eth1.contains("mtu 1400 "), "{eth1}");
        let net2 = ip(&["-o", "link", "show", "net2"]);
        assert!(net2.contains("link/ether 02:00:00:aa:bb:02"), "{net2}");
        assert!(net2.contains(",UP") && net2.contains("mtu 1500 "), "{net2}");
        let addrs = ip(&["-4", "-o", "addr", "show"]);
        for expected in [
            "lo    inet 127.0.0.1/8",
            "eth1    inet 10.88.0.5/16 brd 10.88.255.255 scope global eth1",
            "eth1    inet 192.168.77.2/24 brd 192.168.77.255 scope global eth1",
            "net2    inet 172.31.5.9/24 brd 172.31.5.255 scope global net2",
        ] {
            assert!(addrs.contains(expected), "{expected:?} in:\n{addrs}");
        }
        assert_eq!(addrs.lines().count(), 4, "each address once:\n{addrs}");
        let routes = ip(&["-4", "route", "show", "proto", "boot"]);
        let routes: Vec<&str> = routes.lines().map(str::trim_end).collect();
        assert_eq!(
            routes,
            [
                "default via 10.88.0.1 dev eth1",
                "10.99.0.0/16 via 192.168.77.1 dev eth1 src 192.168.77.2",
                "172.30.0.0/16 dev net2 scope link",
            ]
        );
        // Usable at once: not "tentative" while duplicate address detection runs.
        let addrs = ip(&["-6", "-o", "addr", "show", "scope", "global"]);
        assert!(
            addrs.contains("eth1    inet6 fd00:88::5/64 scope global nodad"),
            "{addrs}"
        );
        assert!(!addrs.contains("tentative"), "{addrs}");
        assert_eq!(addrs.lines().count(), 1, "each address once:\n{addrs}");
        let routes = ip(&["-6", "route", "show", "proto", "boot"]);
        let routes: Vec<&str> = routes.lines().map(str::trim_end).collect();
        assert_eq!(
            routes,
            [
                "fd00:99::/48 via fe80::1 dev net2 metric 1024 pref medium",
                "default via fd00:88::1 dev eth1 metric 1024 pref medium",
            ]
        );
    }

    #[test]
    fn configures_a_pod_network_and_again() {
        in_new_netns(|| {
            veth("pp-guest1", "02:00:00:aa:bb:01", "pp-host1");
            veth("pp-guest2", "02:00:00:aa:bb:02", "pp-host2");
            // One starts up (it is taken down to be renamed), with an address already.
            ip(&["link", "set", "pp-guest2", "up"]);
            ip(&[
                "addr",
                "add",
                "172.31.5.9/24",
                "brd",
                "+",
                "dev",
                "pp-guest2",
            ]);
            let net = pod_network();
            configure_network(&net, false).expect("first configuration");
            check_pod_network();
            configure_network(&net, false).expect("the same configuration again");
            check_pod_network();
        });
    }

    #[test]
    fn brings_lo_up_with_no_interfaces() {
        in_new_netns(|| {
            assert!(!ip(&["-o", "link", "show", "lo"]).contains(",UP"));
            configure_network(&SandboxNetwork::default(), false).unwrap();
            assert!(ip(&["-o", "link", "show", "lo"]).contains(",UP"));
            assert!(ip(&["-4", "-o", "addr", "show", "lo"]).contains("inet 127.0.0.1/8"));
        });
    }

    #[test]
    fn a_missing_mac_is_named_and_changes_nothing() {
        in_new_netns(|| {
            veth("pp-guest", "02:00:00:aa:bb:01", "pp-host");
            let net = SandboxNetwork {
                interfaces: vec![InterfaceConfig::parse(
                    "02:00:00:aa:bb:99",
                    "eth0",
                    &["10.88.0.5/16"],
                    0,
                )
                .unwrap()],
                routes: vec![],
            };
            let e = configure_network(&net, false).unwrap_err();
            assert!(matches!(e, SandboxError::NoSuchMac { .. }), "{e:?}");
            assert_eq!(
                e.to_string(),
                "interface 02:00:00:aa:bb:99: no guest interface has this MAC (the VM's \
                 --net mac= must match; the guest has: pp-host 02:00:00:aa:bb:01)"
                    .replace("pp-host 02:00:00:aa:bb:01", &present_in_netns()),
            );
            assert!(
                !ip(&["-o", "link", "show", "lo"]).contains(",UP"),
                "nothing changed"
            );
        });
    }

    fn present_in_netns() -> String {
        let mut rtnl = Rtnl::open().unwrap();
        present_macs(&rtnl.links().unwrap())
    }

    #[test]
    fn kernel_failures_name_the_route() {
        in_new_netns(|| {
            veth("pp-guest", "02:00:00:aa:bb:01", "pp-host");
            let net = SandboxNetwork {
                interfaces: vec![InterfaceConfig::parse(
                    "02:00:00:aa:bb:01",
                    "eth0",
                    &["10.88.0.5/16"],
                    0,
                )
                .unwrap()],
                routes: vec![
                    RouteConfig::parse("10.0.0.0/8", "1.2.3.4", "", "").unwrap(),
                    RouteConfig::parse("", "10.88.0.1", "", "").unwrap(),
                ],
            };
            let e = configure_network(&net, false).unwrap_err().to_string();
            assert!(
                e.starts_with("route 10.0.0.0/8 via 1.2.3.4: Network is unreachable"),
                "{e}"
            );
            assert!(e.contains("the gateway must be inside the subnet"), "{e}");
            // The requests after the failed one were still made.
            let routes = ip(&["-4", "route", "show"]);
            assert!(
                routes.contains("default via 10.88.0.1 dev eth0"),
                "{routes}"
            );
        });
    }
}
