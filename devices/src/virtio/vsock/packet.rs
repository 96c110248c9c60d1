//! The vsock packet header (virtio 1.2, 5.10.6) and the checks every packet the guest
//! transmits goes through before a backend sees it.

use std::io::{Read, Write};

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use super::{op, HOST_CID, MAX_PKT_PAYLOAD, TYPE_STREAM};
use crate::virtio::{check_chain, ChainError};

/// Bytes in `struct virtio_vsock_hdr`.
pub const HDR_SIZE: usize = 44;

/// `struct virtio_vsock_hdr`, decoded (all fields little-endian on the wire).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl PacketHeader {
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or_default());
        let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().unwrap_or_default());
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The reset a refused packet earns: from where it was sent to, back to its sender.
    pub fn reset_reply(&self) -> Self {
        Self {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            type_: TYPE_STREAM,
            op: op::RST,
            ..Self::default()
        }
    }
}

/// Why a TX packet was refused. Only that packet fails; `reply` says whether its
/// sender gets a reset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("vsock TX chain refused: {0}")]
    Chain(#[from] ChainError),
    #[error("vsock TX packet has {0} device-readable bytes, less than its 44-byte header")]
    ShortHeader(u32),
    #[error("vsock TX chain could not be read from guest memory")]
    Unreadable,
    #[error("vsock TX packet claims source CID {0}, not the guest's; dropped")]
    ForeignSource(u64),
    #[error("vsock TX packet to CID {0}: only the host (CID 2) is reachable")]
    UnknownDestination(u64),
    #[error("vsock TX packet of type {0}: only STREAM (1) is offered")]
    UnsupportedType(u16),
    #[error("vsock TX packet payload of {0} bytes exceeds the 64 KiB limit")]
    Oversize(u32),
    #[error("vsock TX packet header says {len} payload bytes, the chain holds {available}")]
    Truncated { len: u32, available: u32 },
}

/// A TX packet, or the reason it was refused and the reset its sender gets (none
/// when its addresses cannot be trusted, or when it is itself a reset).
pub type TxResult = Result<PacketHeader, (PacketError, Option<PacketHeader>)>;

/// Reads and checks one TX chain; on success the payload is in `payload[..hdr.len]`.
pub fn read_tx(
    memory: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    guest_cid: u64,
    payload: &mut [u8],
) -> TxResult {
    let size = check_chain(&chain).map_err(|e| (e.into(), None))?;
    if (size.readable as usize) < HDR_SIZE {
        return Err((PacketError::ShortHeader(size.readable), None));
    }
    let mut reader = chain
        .reader(memory)
        .map_err(|_| (PacketError::Unreadable, None))?;
    let mut raw = [0u8; HDR_SIZE];
    reader
        .read_exact(&mut raw)
        .map_err(|_| (PacketError::Unreadable, None))?;
    let hdr = PacketHeader::from_bytes(&raw);
    // A spoofed source is dropped unanswered: a reset to it would reach someone else.
    if hdr.src_cid != guest_cid {
        return Err((PacketError::ForeignSource(hdr.src_cid), None));
    }
    let refuse = |e: PacketError| {
        let reply = (hdr.op != op::RST).then(|| hdr.reset_reply());
        Err((e, reply))
    };
    if hdr.dst_cid != HOST_CID {
        return refuse(PacketError::UnknownDestination(hdr.dst_cid));
    }
    if hdr.type_ != TYPE_STREAM {
        return refuse(PacketError::UnsupportedType(hdr.type_));
    }
    if hdr.len > MAX_PKT_PAYLOAD {
        return refuse(PacketError::Oversize(hdr.len));
    }
    let available = reader.available_bytes();
    let len = hdr.len as usize;
    if len > available || len > payload.len() {
        return refuse(PacketError::Truncated {
            len: hdr.len,
            available: available as u32,
        });
    }
    if reader.read_exact(&mut payload[..len]).is_err() {
        return refuse(PacketError::Unreadable);
    }
    Ok(hdr)
}

/// Writes `hdr` and `payload` into an RX chain; returns the bytes written. The caller
/// checked the chain and sized `payload` to fit.
pub fn write_rx(
    memory: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    hdr: &PacketHeader,
    payload: &[u8],
) -> std::io::Result<u32> {
    let mut writer = chain
        .writer(memory)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    writer.write_all(&hdr.to_bytes())?;
    writer.write_all(payload)?;
    Ok(writer.bytes_written() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::*;
    use virtio_queue::QueueOwnedT;

    fn sample() -> PacketHeader {
        PacketHeader {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 0x1122_3344,
            dst_port: 1024,
            len: 5,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 0x4_0000,
            fwd_cnt: 0xdead_beef,
        }
    }

    #[test]
    fn header_round_trips_little_endian() {
        let hdr = sample();
        let bytes = hdr.to_bytes();
        assert_eq!(&bytes[0..8], &3u64.to_le_bytes());
        assert_eq!(&bytes[16..20], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&bytes[30..32], &op::RW.to_le_bytes());
        assert_eq!(&bytes[40..44], &0xdead_beefu32.to_le_bytes());
        assert_eq!(PacketHeader::from_bytes(&bytes), hdr);
    }

    #[test]
    fn reset_reply_swaps_addresses() {
        let rst = sample().reset_reply();
        assert_eq!((rst.src_cid, rst.dst_cid), (HOST_CID, 3));
        assert_eq!((rst.src_port, rst.dst_port), (1024, 0x1122_3344));
        assert_eq!((rst.op, rst.len), (op::RST, 0));
    }

    /// Reads the chain `descs` (header written at DATA_START) through `read_tx`.
    fn parse(hdr: &PacketHeader, descs: &[Desc]) -> TxResult {
        let memory = memory();
        fill(&memory, DATA_START, &hdr.to_bytes());
        fill(&memory, DATA_START + HDR_SIZE as u64, b"hello");
        let q = TestQueue::new(&memory, 0, 16);
        let mut queue = q.queue();
        q.add_chain(descs);
        let chain = queue.iter(&memory).unwrap().next().unwrap();
        let mut payload = vec![0; MAX_PKT_PAYLOAD as usize];
        let r = read_tx(&memory, chain, 3, &mut payload);
        if let Ok(h) = &r {
            assert_eq!(&payload[..h.len as usize], b"hello");
        }
        r
    }

    #[test]
    fn accepts_header_and_payload_split_anyhow() {
        let h = sample();
        assert_eq!(parse(&h, &[readable(DATA_START, 49)]), Ok(h));
        // The header itself split over two descriptors.
        let split = [readable(DATA_START, 20), readable(DATA_START + 20, 29)];
        assert_eq!(parse(&h, &split), Ok(h));
    }

    #[test]
    fn refuses_bad_packets_with_or_without_reset() {
        let h = sample();
        let whole = [readable(DATA_START, 49)];
        let no_reply = |r: TxResult| r.err().map(|(_, reply)| reply.is_none());
        let reply = |r: TxResult| r.err().and_then(|(_, reply)| reply);

        assert_eq!(no_reply(parse(&h, &[readable(DATA_START, 43)])), Some(true));
        let in_writable = [writable(DATA_START, 49)];
        assert_eq!(no_reply(parse(&h, &in_writable)), Some(true));
        let spoofed = PacketHeader { src_cid: 7, ..h };
        assert_eq!(no_reply(parse(&spoofed, &whole)), Some(true));

        let elsewhere = PacketHeader { dst_cid: 9, ..h };
        let rst = reply(parse(&elsewhere, &whole)).unwrap();
        assert_eq!((rst.src_cid, rst.op), (9, op::RST));
        let seqpacket = PacketHeader { type_: 2, ..h };
        assert!(reply(parse(&seqpacket, &whole)).is_some());
        let long = PacketHeader { len: 6, ..h };
        assert!(reply(parse(&long, &whole)).is_some());
        let huge = PacketHeader {
            len: MAX_PKT_PAYLOAD + 1,
            ..h
        };
        let big_chain = [readable(DATA_START, MAX_PKT_PAYLOAD + 100)];
        assert!(matches!(
            parse(&huge, &big_chain),
            Err((PacketError::Oversize(_), Some(_)))
        ));
        // A bad reset is never answered with a reset.
        let bad_rst = PacketHeader {
            dst_cid: 9,
            op: op::RST,
            ..h
        };
        assert_eq!(no_reply(parse(&bad_rst, &whole)), Some(true));
    }
}
