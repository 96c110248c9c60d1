//! The port-forward redirect in a pod's network namespace: one nf_tables table, made
//! and removed over netlink in the calling thread's namespace.
//!
//! ```text
//! table inet peapod_port_forward {
//!     chain output {
//!         type nat hook output priority -100; policy accept;
//!         meta nfproto ipv4 meta l4proto tcp ip daddr 127.0.0.0/8 redirect to :<v4 port>
//!         meta nfproto ipv6 meta l4proto tcp ip6 daddr ::1 redirect to :<v6 port>
//!     }
//! }
//! ```
//!
//! containerd's CRI answers PortForward by dialing `localhost:<port>` inside the pod's
//! namespace on the node. The rule sends every such connection, whatever its port, to
//! the shim's listener; the listener reads the port that was dialed back with
//! `SO_ORIGINAL_DST` (`port_forward.rs`). Only connections made in the pod's namespace
//! to its loopback match, and only the `output` hook has the chain: nothing from the
//! network and nothing in the host's namespace changes.
//!
//! Crates: no maintained pure-Rust nf_tables crate fits. `rustables` generates its
//! bindings with bindgen at build time (libclang in CI), `nftnl` links libnftnl, and
//! the `nftables` crate runs the `nft` program, which a node may not have. The table
//! is six small messages, written here with their attribute numbers from
//! `<linux/netfilter/nf_tables.h>`.

use std::io;
use std::time::Duration;

use netlink_sys::{Socket, SocketAddr};
use peapod_netlink::kernel_message;

use crate::network::set_receive_timeout;

/// The table's name; `inet`, so one table holds the IPv4 and the IPv6 rule.
pub const TABLE: &str = "peapod_port_forward";
const CHAIN: &str = "output";

const NETLINK_NETFILTER: isize = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;

const NFPROTO_UNSPEC: u8 = 0;
const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NF_INET_LOCAL_OUT: u32 = 3;
/// `NF_IP_PRI_NAT_DST`: where `nft`'s `dstnat` priority puts destination NAT.
const PRIORITY_DSTNAT: i32 = -100;
const NF_ACCEPT: u32 = 1;

const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_REDIR_REG_PROTO_MIN: u16 = 1;
/// `NFT_REG_1`, a 16-byte register.
const REG: u32 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const IPPROTO_TCP: u8 = 6;

const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_APPEND: u16 = 0x800;
const NLM_F_CREATE: u16 = 0x400;

/// The kernel answers at once; longer is a bug, which must not hang the shim.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the redirect sends connections to the loopback: the listeners' ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Redirect {
    pub v4_port: u16,
    /// `None` when the namespace has no IPv6 loopback.
    pub v6_port: Option<u16>,
}

/// Makes the table in the calling thread's network namespace, replacing one that is
/// there: one batch, so it is all there or not at all.
pub fn install(redirect: Redirect) -> io::Result<()> {
    let mut batch = Batch::new();
    replace_table(&mut batch);
    batch.push(NFT_MSG_NEWCHAIN, NFPROTO_INET, NLM_F_CREATE, |m| {
        m.str(NFTA_CHAIN_TABLE, TABLE);
        m.str(NFTA_CHAIN_NAME, CHAIN);
        m.nested(NFTA_CHAIN_HOOK, |m| {
            m.u32(NFTA_HOOK_HOOKNUM, NF_INET_LOCAL_OUT);
            m.u32(NFTA_HOOK_PRIORITY, PRIORITY_DSTNAT as u32);
        });
        m.u32(NFTA_CHAIN_POLICY, NF_ACCEPT);
        m.str(NFTA_CHAIN_TYPE, "nat");
    });
    // ip daddr 127.0.0.0/8: the address's first byte (offset 16 in the header).
    push_rule(&mut batch, NFPROTO_IPV4, 16, &[127], redirect.v4_port);
    if let Some(port) = redirect.v6_port {
        // ip6 daddr ::1 (offset 24).
        push_rule(
            &mut batch,
            NFPROTO_IPV6,
            24,
            &std::net::Ipv6Addr::LOCALHOST.octets(),
            port,
        );
    }
    batch.commit()
}

/// Removes the table from the calling thread's network namespace; success if it is
/// not there.
pub fn remove() -> io::Result<()> {
    let mut batch = Batch::new();
    // Make it (a no-op if it exists), then delete it: no ENOENT to tell apart.
    batch.push(NFT_MSG_NEWTABLE, NFPROTO_INET, NLM_F_CREATE, |m| {
        m.str(NFTA_TABLE_NAME, TABLE)
    });
    batch.push(NFT_MSG_DELTABLE, NFPROTO_INET, 0, |m| {
        m.str(NFTA_TABLE_NAME, TABLE)
    });
    batch.commit()
}

fn replace_table(batch: &mut Batch) {
    for (kind, flags) in [
        (NFT_MSG_NEWTABLE, NLM_F_CREATE),
        (NFT_MSG_DELTABLE, 0),
        (NFT_MSG_NEWTABLE, NLM_F_CREATE),
    ] {
        batch.push(kind, NFPROTO_INET, flags, |m| m.str(NFTA_TABLE_NAME, TABLE));
    }
}

/// `meta nfproto <family> meta l4proto tcp <daddr bytes at offset> redirect to :<port>`
fn push_rule(batch: &mut Batch, family: u8, offset: u32, daddr: &[u8], port: u16) {
    batch.push(
        NFT_MSG_NEWRULE,
        NFPROTO_INET,
        NLM_F_CREATE | NLM_F_APPEND,
        |m| {
            m.str(NFTA_RULE_TABLE, TABLE);
            m.str(NFTA_RULE_CHAIN, CHAIN);
            m.nested(NFTA_RULE_EXPRESSIONS, |m| {
                meta_equals(m, NFT_META_NFPROTO, &[family]);
                meta_equals(m, NFT_META_L4PROTO, &[IPPROTO_TCP]);
                expression(m, "payload", |m| {
                    m.u32(NFTA_PAYLOAD_DREG, REG);
                    m.u32(NFTA_PAYLOAD_BASE, NFT_PAYLOAD_NETWORK_HEADER);
                    m.u32(NFTA_PAYLOAD_OFFSET, offset);
                    m.u32(NFTA_PAYLOAD_LEN, daddr.len() as u32);
                });
                equals(m, daddr);
                expression(m, "immediate", |m| {
                    m.u32(NFTA_IMMEDIATE_DREG, REG);
                    m.nested(NFTA_IMMEDIATE_DATA, |m| {
                        m.bytes(NFTA_DATA_VALUE, &port.to_be_bytes())
                    });
                });
                expression(m, "redir", |m| m.u32(NFTA_REDIR_REG_PROTO_MIN, REG));
            });
        },
    );
}

fn meta_equals(m: &mut Message, key: u32, value: &[u8]) {
    expression(m, "meta", |m| {
        m.u32(NFTA_META_DREG, REG);
        m.u32(NFTA_META_KEY, key);
    });
    equals(m, value);
}

fn equals(m: &mut Message, value: &[u8]) {
    expression(m, "cmp", |m| {
        m.u32(NFTA_CMP_SREG, REG);
        m.u32(NFTA_CMP_OP, NFT_CMP_EQ);
        m.nested(NFTA_CMP_DATA, |m| m.bytes(NFTA_DATA_VALUE, value));
    });
}

fn expression(m: &mut Message, name: &str, data: impl FnOnce(&mut Message)) {
    m.nested(NFTA_LIST_ELEM, |m| {
        m.str(NFTA_EXPR_NAME, name);
        m.nested(NFTA_EXPR_DATA, data);
    });
}

/// One netlink message being written: header, `nfgenmsg`, attributes.
struct Message {
    buf: Vec<u8>,
}

impl Message {
    fn attr(&mut self, kind: u16, value: &[u8]) {
        let len = 4 + value.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.pad();
    }

    fn pad(&mut self) {
        self.buf.resize(self.buf.len().next_multiple_of(4), 0);
    }

    /// nf_tables numbers are big-endian.
    fn u32(&mut self, kind: u16, value: u32) {
        self.attr(kind, &value.to_be_bytes());
    }

    fn str(&mut self, kind: u16, value: &str) {
        let mut v = value.as_bytes().to_vec();
        v.push(0);
        self.attr(kind, &v);
    }

    fn bytes(&mut self, kind: u16, value: &[u8]) {
        self.attr(kind, value);
    }

    fn nested(&mut self, kind: u16, inner: impl FnOnce(&mut Message)) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        inner(self);
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self.buf[start + 2..start + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    }
}

/// A transaction: `BATCH_BEGIN`, the messages, `BATCH_END`; the kernel applies all of
/// them or none.
struct Batch {
    buf: Vec<u8>,
    /// Sequence numbers of the messages whose ACK we wait for.
    acked: Vec<u32>,
    seq: u32,
}

impl Batch {
    fn new() -> Self {
        let mut b = Batch {
            buf: Vec::new(),
            acked: Vec::new(),
            seq: 0,
        };
        b.message(
            NFNL_MSG_BATCH_BEGIN,
            NFPROTO_UNSPEC,
            0,
            NFNL_SUBSYS_NFTABLES,
            |_| {},
        );
        b
    }

    fn push(&mut self, kind: u16, family: u8, flags: u16, attrs: impl FnOnce(&mut Message)) {
        let seq = self.message(
            (NFNL_SUBSYS_NFTABLES << 8) | kind,
            family,
            flags | NLM_F_ACK,
            0,
            attrs,
        );
        self.acked.push(seq);
    }

    fn message(
        &mut self,
        kind: u16,
        family: u8,
        flags: u16,
        res_id: u16,
        attrs: impl FnOnce(&mut Message),
    ) -> u32 {
        self.seq += 1;
        let mut m = Message { buf: Vec::new() };
        m.buf.extend_from_slice(&[0; 4]); // length, below
        m.buf.extend_from_slice(&kind.to_ne_bytes());
        m.buf
            .extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        m.buf.extend_from_slice(&self.seq.to_ne_bytes());
        m.buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        m.buf.extend_from_slice(&[family, 0]); // nfgenmsg: family, NFNETLINK_V0
        m.buf.extend_from_slice(&res_id.to_be_bytes());
        attrs(&mut m);
        let len = m.buf.len() as u32;
        m.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&m.buf);
        self.seq
    }

    /// Sends the batch and waits for every message's ACK; the first error, in the
    /// kernel's words where it gives them.
    fn commit(mut self) -> io::Result<()> {
        self.message(
            NFNL_MSG_BATCH_END,
            NFPROTO_UNSPEC,
            0,
            NFNL_SUBSYS_NFTABLES,
            |_| {},
        );
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        let _ = socket.set_ext_ack(true);
        set_receive_timeout(&socket, ANSWER_TIMEOUT)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        let sent = socket.send(&self.buf, 0)?;
        if sent != self.buf.len() {
            return Err(io::Error::other(format!(
                "nf_tables: sent {sent} of {} bytes",
                self.buf.len()
            )));
        }
        let mut buf = vec![0u8; 64 * 1024];
        while !self.acked.is_empty() {
            let n = match socket.recv(&mut &mut buf[..], 0) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("nf_tables: no answer within {ANSWER_TIMEOUT:?}"),
                    ))
                }
                r => r?,
            };
            let mut at = 0;
            while at + 16 <= n {
                let word =
                    |o: usize| u32::from_ne_bytes(buf[at + o..at + o + 4].try_into().unwrap());
                let len = word(0) as usize;
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                let flags = u16::from_ne_bytes([buf[at + 6], buf[at + 7]]);
                let seq = word(8);
                if len < 16 || at + len > n {
                    return Err(io::Error::other("nf_tables: a malformed answer"));
                }
                if kind == NLMSG_ERROR && len >= 20 {
                    let code = i32::from_ne_bytes(buf[at + 16..at + 20].try_into().unwrap());
                    if code != 0 {
                        let os = io::Error::from_raw_os_error(-code);
                        let text = kernel_message(flags, &buf[at + 20..at + len]);
                        return Err(match text {
                            Some(t) => io::Error::new(os.kind(), format!("{os}: {t}")),
                            None => os,
                        });
                    }
                    self.acked.retain(|s| *s != seq);
                }
                at += len.next_multiple_of(4);
            }
        }
        Ok(())
    }
}
