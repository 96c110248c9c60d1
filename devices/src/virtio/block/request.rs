//! One virtio-blk request (virtio 1.2, 5.2.6): a 16-byte header (type, reserved,
//! sector) the device reads, data, and a status byte the device writes last. The
//! status byte is taken as the last device-writable byte of the chain, so a driver
//! may put it in its own descriptor (Linux does) or at the end of the data one.

use std::io::{Read, Write};

use virtio_bindings::virtio_blk::*;
use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use super::contents::Contents;
use super::device::QUEUE_SIZE;
use super::disk::SECTOR_SIZE;
use super::MAX_ID_BYTES;
use crate::virtio::check_chain;

const HEADER_BYTES: usize = 16;
/// Data descriptors per request, advertised (VIRTIO_BLK_F_SEG_MAX): a whole queue but
/// the header and status, as QEMU offers.
pub(super) const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Bytes per data descriptor, advertised (VIRTIO_BLK_F_SIZE_MAX).
pub(super) const SIZE_MAX: u32 = 128 << 10;
/// The most data one request moves. Linux never builds more (it splits requests to
/// fit SEG_MAX and SIZE_MAX); a chain claiming more fails instead of holding the event
/// loop for as long as it likes.
pub(super) const MAX_REQUEST_BYTES: usize = SEG_MAX as usize * SIZE_MAX as usize;

/// Why one request failed; logged at debug level, since most are the guest's doing.
#[derive(Debug, thiserror::Error)]
pub(super) enum RequestError {
    #[error("the request header is shorter than {HEADER_BYTES} device-readable bytes")]
    BadHeader,
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("the slot has no backing file")]
    NoBacking,
    #[error("the backing file is read-only")]
    ReadOnly,
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    Unaligned(usize),
    #[error("data length {0} is over the {MAX_REQUEST_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("{len} bytes at sector {sector} run past the disk's {capacity} bytes")]
    OutOfRange {
        sector: u64,
        len: usize,
        capacity: u64,
    },
    #[error("sector {sector} is in no file of the store (a gap, or a file since removed)")]
    NoRegion { sector: u64 },
    #[error("the backing file failed: {0}")]
    Disk(std::io::Error),
    #[error("cannot copy the guest's buffer: {0}")]
    Guest(std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Other(u32),
}

struct Header {
    kind: RequestType,
    sector: u64,
}

/// Answers one chain and returns how many bytes went into guest memory (data read and
/// the status byte). A chain that fails `check_chain` or has no device-writable byte
/// for the status is returned untouched.
pub(super) fn serve(
    chain: DescriptorChain<&GuestMemoryMmap>,
    memory: &GuestMemoryMmap,
    contents: &Contents,
    bounce: &mut [u8],
) -> u32 {
    if let Err(e) = check_chain(&chain) {
        log::debug!("virtio-blk: request refused: {e}");
        return 0;
    }
    let (mut reader, mut data) = match (chain.clone().reader(memory), chain.writer(memory)) {
        (Ok(reader), Ok(writer)) => (reader, writer),
        (Err(e), _) | (_, Err(e)) => {
            log::debug!("virtio-blk: bad request chain: {e}");
            return 0;
        }
    };
    let Some(data_len) = data.available_bytes().checked_sub(1) else {
        log::debug!("virtio-blk: request refused: no device-writable status byte");
        return 0;
    };
    let mut status = match data.split_at(data_len) {
        Ok(status) => status,
        Err(e) => {
            log::debug!("virtio-blk: bad request chain: {e}");
            return 0;
        }
    };
    let code = match execute(&mut reader, &mut data, contents, bounce) {
        Ok(()) => VIRTIO_BLK_S_OK,
        Err(RequestError::Unsupported(kind)) => {
            log::debug!("virtio-blk: request type {kind} is not supported");
            VIRTIO_BLK_S_UNSUPP
        }
        Err(e @ RequestError::Disk(_)) => {
            log::warn!("virtio-blk: request failed: {e}");
            VIRTIO_BLK_S_IOERR
        }
        Err(e) => {
            log::debug!("virtio-blk: request failed: {e}");
            VIRTIO_BLK_S_IOERR
        }
    };
    // Data is bounded by MAX_REQUEST_BYTES, so the count fits.
    let written = data.bytes_written() + usize::from(status.write_all(&[code as u8]).is_ok());
    u32::try_from(written).unwrap_or(u32::MAX)
}

fn execute(
    reader: &mut Reader<'_>,
    data: &mut Writer<'_>,
    contents: &Contents,
    bounce: &mut [u8],
) -> Result<(), RequestError> {
    let header = read_header(reader)?;
    match header.kind {
        // Unknown types are unsupported whatever the slot holds.
        RequestType::Other(kind) => Err(RequestError::Unsupported(kind)),
        RequestType::In => {
            let (disk, offset) = contents.locate(header.sector, data.available_bytes(), false)?;
            disk.read_to(offset, data, bounce)
        }
        RequestType::Out => {
            let (disk, offset) = contents.locate(header.sector, reader.available_bytes(), true)?;
            disk.write_from(offset, reader, bounce)
        }
        RequestType::Flush => contents.flush(),
        RequestType::GetId => {
            let id = contents.id().ok_or(RequestError::NoBacking)?;
            let n = data.available_bytes().min(MAX_ID_BYTES);
            data.write_all(&id[..n]).map_err(RequestError::Guest)
        }
    }
}

fn read_header(reader: &mut Reader<'_>) -> Result<Header, RequestError> {
    let mut raw = [0u8; HEADER_BYTES];
    reader
        .read_exact(&mut raw)
        .map_err(|_| RequestError::BadHeader)?;
    let [t0, t1, t2, t3, _, _, _, _, sector @ ..] = raw;
    let kind = match u32::from_le_bytes([t0, t1, t2, t3]) {
        VIRTIO_BLK_T_IN => RequestType::In,
        VIRTIO_BLK_T_OUT => RequestType::Out,
        VIRTIO_BLK_T_FLUSH => RequestType::Flush,
        VIRTIO_BLK_T_GET_ID => RequestType::GetId,
        other => RequestType::Other(other),
    };
    Ok(Header {
        kind,
        sector: u64::from_le_bytes(sector),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::test_support::*;
    use crate::virtio::test_utils::*;
    use crate::virtio::VirtioDevice;

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    #[test]
    fn read_returns_file_contents() {
        let image = TempImage::new(&pattern(8 * 512));
        let memory = memory();
        let q = TestQueue::new(&memory, 0, QUEUE_SIZE);
        let mut block = active_block(&memory, &q, Some(image.backing(false, "disk")));
        // Two data descriptors, apart in guest memory.
        submit(
            &memory,
            &q,
            VIRTIO_BLK_T_IN,
            2,
            &[writable(DATA, 512), writable(DATA + 0x2000, 1024)],
        );
        block.process_queue();
        assert_eq!(q.used(0), (0, 1536 + 1));
        assert_eq!(status(&memory), OK);
        let contents = image.contents();
        assert_eq!(read(&memory, DATA, 512), contents[1024..1536]);
        assert_eq!(read(&memory, DATA + 0x2000, 1024), contents[1536..2560]);
        assert!(interrupted(block.interrupt()));
    }

    #[test]
    fn a_read_larger_than_the_bounce_buffer_is_whole() {
        let sectors = 3 * super::super::disk::BOUNCE_BYTES / 512 + 5;
        let image = TempImage::new(&pattern(sectors * 512));
        let memory = memory();
        let q = TestQueue::new(&memory, 0, QUEUE_SIZE);
        let mut block = active_block(&memory, &q, Some(image.backing(false, "disk")));
        let len = (sectors - 1) * 512;
        submit(
            &memory,
            &q,
            VIRTIO_BLK_T_IN,
            1,
            &[writable(DATA, len as u32)],
        );
        block.process_queue();
        assert_eq!(status(&memory), OK);
        assert_eq!(read(&memory, DATA, len), image.contents()[512..]);
    }

    #[test]
    fn write_lands_in_the_file() {
        let before = pattern(8 * 512);
        let image = TempImage::new(&before);
        let memory = memory();
        let q = TestQueue::new(&memory, 0, QUEUE_SIZE);
        let mut block = active_block(&memory, &q, Some(image.backing(false, "disk")));
        fill(&memory, DATA, &[0xab; 512]);
        fill(&memory, DATA + 0x2000, &[0xcd; 512]);
        submit(
            &memory,
            &q,
            VIRTIO_BLK_T_OUT,
            7,
            &[readable(DATA, 512)], // the last sector
        );
        block.process_queue();
        submit(
            &memory,
            &q,
            VIRTIO_BLK_T_OUT,
            0,
            &[readable(DATA + 0x2000, 512)],
        );
        block.process_queue();
        assert_eq!(q.used(0).1, 1, "only the status byte went to the guest");
        assert_eq!(q.used(1).1, 1);
        assert_eq!(status(&memory), OK);
        let mut expected = before;
        expected[7 * 512..].fill(0xab);
        expected[..512].fill(0xcd);
        assert_eq!(image.contents(), expected);
    }

    #[test]
    fn flush_succeeds_on_writable_and_read_only_files() {
        let image = TempImage::new(&pattern(512));
        for read_only in [false, true] {
            let memory = memory();
            let q = TestQueue::new(&memory, 0, QUEUE_SIZE);
            let mut block = active_block(&memory, &q, Some(image.backing(read_only, "disk")));
            submit(&memory, &q, VIRTIO_BLK_T_FLUSH, 0, &[]);
            block.process_queue();
            assert_eq!(q.used(0).1, 1);
            assert_eq!(status(&memory), OK, "read_only: {read_only}");
        }
    }

    #[test]
    fn get_id_returns_the_padded_id_and_no_more() {
        let image = TempImage::new(&pattern(512));
        let memory = memory();
        let q = TestQueue::new(&memory, 0, QUEUE_SIZE);
        let mut block = active_block(&memory, &q, Some(image.backing(true, "layer-3f2a")));
        fill(&memory, DATA, &[0x55; 32]);
        submit(&memory, &q, VIRTIO_BLK_T_GET_ID, 0, &[writable(DATA, 32)]);
        block.process_queue();
        assert_eq!(status(&memory), OK);
        assert_eq!(q.used(0).1, 20 + 1);
        let mut expected = b"layer-3f2a".to_vec();
        expected.resize(20, 0);
        expected.resize(32, 0x55); // past the 20 ID bytes: untouched
        assert_eq!(read(&memory, DATA, 32), expected);

        // A short buffer gets the start of the ID.
        submit(&memory, &q, VIRTIO_BLK_T_GET_ID, 0, &[writable(DATA, 4)]);
        block.process_queue();
        assert_eq!(q.used(1).1, 4 + 1);
        assert_eq!(status(&memory), OK);
    }

    #[test]
    fn sectors_past_the_end_fail_without_partial_io() {
        let before = pattern(8 * 512);
        let image = TempImage::new(&before);
        let memory = memory();
        let q = TestQueue::new(&memory, 0, QUEUE_SIZE);
        let mut block = active_block(&memory, &q, Some(image.backing(false, "disk")));
        fill(&memory, DATA, &[0xab; 1024]);
        let cases = [
            (VIRTIO_BLK_T_IN, 100, 512),  // starts past the end
            (VIRTIO_BLK_T_IN, 7, 1024),   // starts inside, ends past
            (VIRTIO_BLK_T_OUT, 100, 512), // starts past the end
            (VIRTIO_BLK_T_OUT, 7, 1024),  // starts inside, ends past
            (VIRTIO_BLK_T_IN, u64::MAX, 512),
            (VIRTIO_BLK_T_OUT, u64::MAX / 512 + 1, 512), // the byte offset overflows
        ];
        for (i, (kind, sector, len)) in cases.into_iter().enumerate() {
            let data = if kind == VIRTIO_BLK_T_IN {
                writable(DATA, len)
            } else {
                readable(DATA, len)
            };
            submit(&memory, &q, kind, sector, &[data]);
            block.process_queue();
            assert_eq!(status(&memory), IOERR, "case {i}");
            assert_eq!(q.used(i as u16).1, 1, "case {i}: only the status byte");
        }
        assert_eq!(read(&memory, DATA, 1024), vec![0xab; 1024], "nothing read");
        assert_eq!(image.contents(), before, "nothing written");
    }

    #[test]
    fn unaligned_lengths_fail() {
        let before = pattern(8 * 512);
        let image = TempImage::new(&before);
        let memory = memory();
        let q = TestQueue::new(&memory, 0, QUEUE_SIZE);
        let mut block = active_block(&memory, &q, Some(image.backing(false, "disk")));
        submit(&memory, &q, VIRTIO_BLK_T_IN, 0, &[writable(DATA, 100)]);
        block.process_queue();
        assert_eq!(status(&memory), IOERR);
        submit(&memory, &q, VIRTIO_BLK_T_OUT, 0, &[readable(DATA, 513)]);
        block.process_queue();
        assert_eq!(status(&memory), IOERR);
        assert_eq!(q.used(0).1, 1);
        assert_eq!(image.contents(), before);
    }

    #[test]
    fn read_only_backing_refuses_writes() {
        let before = pattern(8 * 512);
        let image = TempImage::new(&before);
        let memory = memory();
        let q = TestQueue::new(&memory, 0, QUEUE_SIZE);
        let mut block = active_block(&memory, &q, Some(image.backing(true, "disk")));
        fill(&memory, DATA, &[0xab; 512]);
        submit(&memory, &q, VIRTIO_BLK_T_OUT, 0, &[readable(DATA, 512)]);
        block.process_queue();
        assert_eq!(status(&memory), IOERR);
        assert_eq!(image.contents(), before);
        submit(&memory, &q, VIRTIO_BLK_T_IN, 0, &[writable(DATA, 512)]);
        block.process_queue();
        assert_eq!(status(&memory), OK, "reads still work");
        assert_eq!(read(&memory, DATA, 512), before[..512]);
    }

    #[test]
    fn an_empty_slot_fails_every_request() {
        let memory = memory();
        let q = TestQueue::new(&memory, 0, QUEUE_SIZE);
        let mut block = active_block(&memory, &q, None);
        let requests = [
            (VIRTIO_BLK_T_IN, writable(DATA, 512)),
            (VIRTIO_BLK_T_OUT, readable(DATA, 512)),
            (VIRTIO_BLK_T_FLUSH, writable(DATA, 0)),
            (VIRTIO_BLK_T_GET_ID, writable(DATA, 20)),
        ];
        for (i, (kind, data)) in requests.into_iter().enumerate() {
            submit(&memory, &q, kind, 0, &[data]);
            block.process_queue();
            assert_eq!(status(&memory), IOERR, "type {kind}");
            assert_eq!(q.used(i as u16).1, 1);
        }
        submit(&memory, &q, VIRTIO_BLK_T_DISCARD, 0, &[]);
        block.process_queue();
        assert_eq!(status(&memory), UNSUPP);
    }

    #[test]
    fn unknown_types_are_unsupported() {
        let image = TempImage::new(&pattern(512));
        let memory = memory();
        let q = TestQueue::new(&memory, 0, QUEUE_SIZE);
        let mut block = active_block(&memory, &q, Some(image.backing(false, "disk")));
        for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_SCSI_CMD, 0xdead_beef] {
            submit(&memory, &q, kind, 0, &[]);
            block.process_queue();
            assert_eq!(status(&memory), UNSUPP, "type {kind:#x}");
        }
    }

    #[test]
    fn hostile_chains_fail_only_their_request() {
        let before = pattern(8 * 512);
        let image = TempImage::new(&before);
        let memory = memory();
        let q = TestQueue::new(&memory, 0, QUEUE_SIZE);
        let mut block = active_block(&memory, &q, Some(image.backing(false, "disk")));
        write_header(&memory, VIRTIO_BLK_T_IN, 0);
        fill(&memory, STATUS, &[UNWRITTEN]);
        let header = readable(HEADER, 16);
        let status_desc = writable(STATUS, 1);
        // Returned untouched (0 bytes): the chain cannot be trusted or has no status.
        q.add_loop(HEADER, false);
        q.add_bad_next(HEADER);
        q.add_chain(&[header, writable(MEM_SIZE as u64 - 8, 512), status_desc]); // past memory
        q.add_chain(&[header, writable(DATA, u32::MAX), status_desc]); // oversize
        q.add_chain(&[header, status_desc, readable(DATA, 512)]); // misordered
        q.add_chain(&[header, readable(DATA, 512), readable(STATUS, 1)]); // status readable
        q.add_chain(&[header]); // no status at all
        block.process_queue();
        assert_eq!(q.used_idx(), 7, "every chain is returned to the driver");
        for i in 0..7 {
            assert_eq!(q.used(i).1, 0, "hostile chain {i} got no bytes");
        }
        assert_eq!(status(&memory), UNWRITTEN);

        // IOERR in the status byte: the header is unreadable.
        q.add_chain(&[writable(HEADER, 16), status_desc]); // header device-writable
        q.add_chain(&[readable(HEADER, 8), status_desc]); // header short
        q.add_chain(&[status_desc]); // no header at all
        block.process_queue();
        for i in 7..10 {
            assert_eq!(q.used(i).1, 1, "chain {i}: status only");
        }
        assert_eq!(status(&memory), IOERR);

        assert!(!block.interrupt().needs_reset());
        assert_eq!(image.contents(), before);
    }

    #[test]
    fn zero_length_data_descriptors_are_harmless() {
        let image = TempImage::new(&pattern(8 * 512));
        let memory = memory();
        let q = TestQueue::new(&memory, 0, QUEUE_SIZE);
        let mut block = active_block(&memory, &q, Some(image.backing(false, "disk")));
        submit(
            &memory,
            &q,
            VIRTIO_BLK_T_IN,
            1,
            &[writable(DATA, 0), writable(DATA + 0x2000, 512)],
        );
        block.process_queue();
        assert_eq!(status(&memory), OK);
        assert_eq!(q.used(0).1, 513);
        assert_eq!(
            read(&memory, DATA + 0x2000, 512),
            image.contents()[512..1024]
        );

        // No data at all: nothing to do.
        submit(&memory, &q, VIRTIO_BLK_T_IN, 1, &[writable(DATA, 0)]);
        block.process_queue();
        assert_eq!(status(&memory), OK);
        assert_eq!(q.used(1).1, 1);
    }

    #[test]
    fn a_request_over_the_limit_fails_before_any_io() {
        // 40 descriptors naming the same MiB of guest memory: 40 MiB of claimed data,
        // on a sparse disk big enough to take it.
        let image = TempImage::sized(64 << 20);
        let memory = memory();
        let q = TestQueue::new(&memory, 0, QUEUE_SIZE);
        let mut block = active_block(&memory, &q, Some(image.backing(false, "disk")));
        fill(&memory, DATA, &[0xab; 512]);
        let data = vec![readable(DATA, 1 << 20); 40];
        submit(&memory, &q, VIRTIO_BLK_T_OUT, 0, &data);
        let data = vec![writable(DATA, 1 << 20); 40];
        submit(&memory, &q, VIRTIO_BLK_T_IN, 0, &data);
        block.process_queue();
        assert_eq!(q.used(0).1, 1);
        assert_eq!(q.used(1).1, 1, "no data read");
        assert_eq!(status(&memory), IOERR);
        assert_eq!(read(&memory, DATA, 512), vec![0xab; 512]);
        assert_eq!(image.contents()[..512], [0; 512], "nothing written");
    }

    #[test]
    fn a_scribbled_ring_stops_the_device_not_the_vmm() {
        let image = TempImage::new(&pattern(512));
        let memory = memory();
        let q = TestQueue::new(&memory, 0, 16);
        let mut block = active_block(&memory, &q, Some(image.backing(false, "disk")));
        q.set_avail_idx(1000); // 1000 chains in a 16-entry ring
        block.process_queue();
        assert!(block.interrupt().needs_reset());
        q.set_avail_idx(1001);
        block.process_queue(); // ignored, no panic
        assert_eq!(q.used_idx(), 0);
    }
}
