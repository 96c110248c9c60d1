use std::mem::offset_of;
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::contents::{Contents, Region};
use super::disk::{Disk, BOUNCE_BYTES, SECTOR_SIZE};
use super::request::{self, SEG_MAX, SIZE_MAX};
use super::{BlockBacking, BlockError};
use crate::virtio::single_queue::ActiveQueue;
use crate::virtio::{serve_queue, ActivateError, Activation, Interrupt, VirtioDevice, TYPE_BLOCK};

pub(super) const QUEUE_SIZE: u16 = 256;
/// The configuration space up to the last field the device offers (blk_size).
const CONFIG_BYTES: usize = offset_of!(virtio_blk_config, blk_size) + 4;

/// A virtio-blk device: a slot that holds one backing file, a store of them, or none.
pub struct Block {
    interrupt: Arc<Interrupt>,
    features: u64,
    contents: Contents,
    /// Where request data passes between the file and guest memory.
    bounce: Vec<u8>,
    pub(super) activate_evt: EventFd,
    pub(super) active: Option<ActiveQueue>,
    broken: bool,
}

impl Block {
    /// A slot with `backing` in it, or an empty one (capacity 0). A read-only backing
    /// at boot makes the guest see a read-only disk (VIRTIO_BLK_F_RO) for good.
    pub fn new(
        backing: Option<BlockBacking>,
        interrupt: Arc<Interrupt>,
    ) -> Result<Self, BlockError> {
        let disk = backing.map(Disk::open).transpose()?;
        let mut features = 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE;
        if disk.as_ref().is_some_and(|d| d.backing.read_only) {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        Ok(Self {
            interrupt,
            features,
            contents: disk.map_or(Contents::Empty, Contents::Disk),
            bounce: vec![0; BOUNCE_BYTES],
            activate_evt: EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd)?,
            active: None,
            broken: false,
        })
    }

    /// Puts `backing` in the slot (or empties it with `None`) and tells the guest the
    /// capacity changed. The new file is opened first: on error the slot is unchanged.
    ///
    /// Whether the guest sees the disk as read-only (VIRTIO_BLK_F_RO) was settled at
    /// feature negotiation and cannot follow a new backing; the device enforces a
    /// read-only backing itself by failing writes (flushes succeed: nothing to flush).
    pub fn set_backing(&mut self, backing: Option<BlockBacking>) -> Result<(), BlockError> {
        let disk = backing.map(Disk::open).transpose()?;
        // Requests run on this thread, so none is using the old file.
        self.contents = disk.map_or(Contents::Empty, Contents::Disk);
        log::debug!("virtio-blk: slot now serves {}", self.contents.describe());
        // Linux re-reads the capacity on this interrupt and resizes the disk.
        self.interrupt.signal_config_change();
        Ok(())
    }

    /// Adds `backing` to the store in this slot (an empty slot becomes a store with
    /// the backing's ID) and tells the guest the capacity grew; where the file is.
    /// On error the slot is unchanged.
    pub fn append(&mut self, backing: BlockBacking) -> Result<Region, BlockError> {
        let region = self.contents.append(backing)?;
        log::debug!(
            "virtio-blk: store adds a file at sector {} ({} sectors)",
            region.start_sector,
            region.sectors
        );
        self.interrupt.signal_config_change();
        Ok(region)
    }

    /// Drops the store's file at `start_sector`; its sectors fail from now on. The
    /// capacity stays, so the guest is not told.
    pub fn remove(&mut self, start_sector: u64) -> Result<BlockBacking, BlockError> {
        self.contents.remove(start_sector)
    }

    /// The whole-disk backing; none for an empty slot or a store.
    pub fn backing(&self) -> Option<&BlockBacking> {
        self.contents.backing()
    }

    /// What the slot serves, for logs and the API's device list.
    pub fn describe(&self) -> String {
        self.contents.describe()
    }

    /// The capacity the guest sees, in 512-byte sectors; 0 for an empty slot.
    pub fn capacity_sectors(&self) -> u64 {
        self.contents.capacity_sectors()
    }

    /// Answers every request the guest made available.
    pub fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut().filter(|_| !self.broken) else {
            return;
        };
        let memory = &active.memory;
        let contents = &self.contents;
        let bounce = &mut self.bounce;
        if let Err(e) = serve_queue(&mut active.queue, memory, &self.interrupt, |chain| {
            request::serve(chain, memory, contents, bounce)
        }) {
            log::warn!("virtio-blk: the driver broke the request queue ({e}); device stopped");
            self.broken = true;
            self.interrupt.signal_needs_reset();
        }
    }

    fn config_space(&self) -> [u8; CONFIG_BYTES] {
        let mut config = [0; CONFIG_BYTES];
        let mut put = |offset: usize, bytes: &[u8]| {
            config[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(
            offset_of!(virtio_blk_config, capacity),
            &self.capacity_sectors().to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, size_max),
            &SIZE_MAX.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, seg_max),
            &SEG_MAX.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, blk_size),
            &(SECTOR_SIZE as u32).to_le_bytes(),
        );
        config
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config_space(), offset, data);
    }

    fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.active = Some(ActiveQueue::activate(activation, &self.activate_evt)?);
        Ok(())
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.active.as_ref().map(|a| vec![a.queue.state()])
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::test_support::*;
    use crate::virtio::test_utils::*;
    use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

    fn config_u64(block: &Block, offset: usize) -> u64 {
        let mut b = [0; 8];
        block.read_config(offset as u64, &mut b);
        u64::from_le_bytes(b)
    }

    fn config_u32(block: &Block, offset: usize) -> u32 {
        let mut b = [0; 4];
        block.read_config(offset as u64, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn offers_read_only_only_for_a_read_only_boot_backing() {
        let image = TempImage::new(&pattern(512));
        let always = 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE;
        let ro = 1 << VIRTIO_BLK_F_RO;
        let block = Block::new(Some(image.backing(true, "a")), interrupt()).unwrap();
        assert_eq!(block.features(), always | ro);
        let block = Block::new(Some(image.backing(false, "a")), interrupt()).unwrap();
        assert_eq!(block.features(), always);
        let mut block = Block::new(None, interrupt()).unwrap();
        assert_eq!(block.features(), always);
        block.set_backing(Some(image.backing(true, "a"))).unwrap();
        assert_eq!(block.features(), always, "features are fixed at boot");
    }

    #[test]
    fn config_space_follows_the_spec_layout() {
        let image = TempImage::new(&pattern(8 * 512 + 100));
        let block = Block::new(Some(image.backing(false, "a")), interrupt()).unwrap();
        assert_eq!(
            block.capacity_sectors(),
            8,
            "a partial last sector is dropped"
        );
        assert_eq!(config_u64(&block, 0), 8, "capacity");
        assert_eq!(config_u32(&block, 8), SIZE_MAX, "size_max");
        assert_eq!(config_u32(&block, 12), u32::from(QUEUE_SIZE) - 2, "seg_max");
        assert_eq!(config_u32(&block, 20), 512, "blk_size");
        assert_eq!(config_u32(&block, 24), 0, "past the fields offered");
        assert_eq!(config_u64(&block, 1 << 40), 0);
        // A driver reading the capacity as two halves.
        let mut low = [0xff; 4];
        block.read_config(4, &mut low);
        assert_eq!(low, [0; 4]);
        assert_eq!(block.queue_max_sizes(), &[256]);
        assert_eq!(block.device_type(), TYPE_BLOCK);
    }

    #[test]
    fn set_backing_changes_capacity_and_tells_the_guest() {
        let small = TempImage::new(&pattern(4 * 512));
        let big = TempImage::new(&vec![0x77; 16 * 512]);
        let memory = memory();
        let q = TestQueue::new(&memory, 0, QUEUE_SIZE);
        let mut block = active_block(&memory, &q, Some(small.backing(false, "small")));
        let interrupt = block.interrupt().clone();
        let generation = interrupt.config_generation();
        assert!(!interrupted(&interrupt));

        block.set_backing(Some(big.backing(false, "big"))).unwrap();
        assert!(interrupted(&interrupt), "config change interrupt raised");
        assert_ne!(interrupt.status() & VIRTIO_MMIO_INT_CONFIG, 0);
        assert_ne!(interrupt.config_generation(), generation);
        assert_eq!(config_u64(&block, 0), 16);
        assert_eq!(block.capacity_sectors(), 16);
        assert_eq!(block.backing(), Some(&big.backing(false, "big")));

        // Requests now reach the new file, including past the old capacity.
        submit(&memory, &q, VIRTIO_BLK_T_IN, 10, &[writable(DATA, 512)]);
        block.process_queue();
        assert_eq!(status(&memory), VIRTIO_BLK_S_OK as u8);
        assert_eq!(read(&memory, DATA, 512), vec![0x77; 512]);
        submit(&memory, &q, VIRTIO_BLK_T_GET_ID, 0, &[writable(DATA, 20)]);
        block.process_queue();
        assert_eq!(read(&memory, DATA, 4), b"big\0");

        // Emptied: capacity 0 and reads fail.
        block.set_backing(None).unwrap();
        assert!(interrupted(&interrupt));
        assert_eq!(config_u64(&block, 0), 0);
        assert_eq!(block.backing(), None);
        submit(&memory, &q, VIRTIO_BLK_T_IN, 0, &[writable(DATA, 512)]);
        block.process_queue();
        assert_eq!(status(&memory), VIRTIO_BLK_S_IOERR as u8);
    }

    /// A store: files laid end to end, each written and read where `append` put it;
    /// a removed file's sectors fail and are never reused.
    #[test]
    fn a_store_serves_each_file_at_its_region() {
        use crate::virtio::block::STORE_ALIGN_SECTORS as ALIGN;
        let layer = TempImage::new(&vec![0x11; 3 * 512]);
        let upper = TempImage::sized(8 * 512);
        let memory = memory();
        let q = TestQueue::new(&memory, 0, QUEUE_SIZE);
        let mut block = active_block(&memory, &q, None);
        let irq = block.interrupt().clone();

        let a = block.append(layer.backing(true, "store")).unwrap();
        assert_eq!((a.start_sector, a.sectors), (0, 3));
        assert!(interrupted(&irq), "the guest is told the capacity grew");
        let b = block.append(upper.backing(false, "store")).unwrap();
        assert_eq!((b.start_sector, b.sectors), (ALIGN, 8));
        assert_eq!(config_u64(&block, 0), ALIGN + 8);
        assert!(block.describe().contains("2 files"), "{}", block.describe());

        // Reads and writes land in the right file, at the offset within it.
        submit(&memory, &q, VIRTIO_BLK_T_IN, 1, &[writable(DATA, 1024)]);
        block.process_queue();
        assert_eq!(status(&memory), VIRTIO_BLK_S_OK as u8);
        assert_eq!(read(&memory, DATA, 1024), vec![0x11; 1024]);
        fill(&memory, DATA, &[0x22; 512]);
        submit(
            &memory,
            &q,
            VIRTIO_BLK_T_OUT,
            ALIGN + 2,
            &[readable(DATA, 512)],
        );
        block.process_queue();
        assert_eq!(status(&memory), VIRTIO_BLK_S_OK as u8);
        assert_eq!(upper.contents()[1024..1536], [0x22; 512]);
        assert!(upper.contents()[..1024].iter().all(|&b| b == 0));

        // Refused: a write to the read-only file, a request across a file's end, one
        // in the gap between files, and a file with another ID.
        let fails = |block: &mut Block, kind, sector, desc| {
            submit(&memory, &q, kind, sector, &[desc]);
            block.process_queue();
            status(&memory) == VIRTIO_BLK_S_IOERR as u8
        };
        assert!(fails(&mut block, VIRTIO_BLK_T_OUT, 0, readable(DATA, 512)));
        assert_eq!(layer.contents(), vec![0x11; 3 * 512]);
        assert!(fails(&mut block, VIRTIO_BLK_T_IN, 2, writable(DATA, 1024)));
        assert!(fails(&mut block, VIRTIO_BLK_T_IN, 3, writable(DATA, 512)));
        assert!(fails(
            &mut block,
            VIRTIO_BLK_T_IN,
            ALIGN + 8,
            writable(DATA, 512)
        ));
        let other = TempImage::sized(512);
        let e = block.append(other.backing(false, "other")).unwrap_err();
        assert!(matches!(e, BlockError::StoreId { .. }), "{e}");
        let e = block
            .append(TempImage::new(&[]).backing(false, "store"))
            .unwrap_err();
        assert!(matches!(e, BlockError::EmptyRegion { .. }), "{e}");

        // GET_ID answers the store's ID.
        submit(&memory, &q, VIRTIO_BLK_T_GET_ID, 0, &[writable(DATA, 20)]);
        block.process_queue();
        assert_eq!(read(&memory, DATA, 6), b"store\0");

        // Removed: its sectors fail, the capacity stays, the next file goes after.
        assert_eq!(block.remove(0).unwrap().path, layer.path);
        assert!(matches!(
            block.remove(0),
            Err(BlockError::NoSuchRegion { .. })
        ));
        assert!(fails(&mut block, VIRTIO_BLK_T_IN, 0, writable(DATA, 512)));
        assert_eq!(block.capacity_sectors(), ALIGN + 8);
        let c = block.append(layer.backing(true, "store")).unwrap();
        assert_eq!(c.start_sector, 2 * ALIGN);

        // A slot with a whole disk is not a store.
        let mut whole = Block::new(Some(other.backing(false, "w")), interrupt()).unwrap();
        let e = whole.append(upper.backing(false, "w")).unwrap_err();
        assert!(matches!(e, BlockError::NotAStore { .. }), "{e}");
        assert_eq!(whole.capacity_sectors(), 1);
    }

    #[test]
    fn a_failed_set_backing_keeps_the_old_one() {
        let image = TempImage::new(&pattern(4 * 512));
        let old = image.backing(false, "old");
        let mut block = Block::new(Some(old.clone()), interrupt()).unwrap();
        let missing = BlockBacking {
            path: std::env::temp_dir().join("peapod-blk-test-missing.img"),
            read_only: false,
            id: "new".into(),
            file: None,
        };
        let err = block.set_backing(Some(missing)).err().unwrap();
        assert!(
            err.to_string().contains("peapod-blk-test-missing.img"),
            "{err}"
        );
        let too_long = image.backing(false, "an-id-of-twenty-one-b");
        assert!(matches!(
            block.set_backing(Some(too_long)),
            Err(BlockError::IdTooLong { .. })
        ));
        assert_eq!(block.backing(), Some(&old));
        assert_eq!(block.capacity_sectors(), 4);
        assert!(!interrupted(block.interrupt()), "no config change");
    }

    #[test]
    fn a_read_only_backing_set_later_is_enforced_by_the_device() {
        let before = pattern(4 * 512);
        let image = TempImage::new(&before);
        let memory = memory();
        let q = TestQueue::new(&memory, 0, QUEUE_SIZE);
        let mut block = active_block(&memory, &q, None);
        block.set_backing(Some(image.backing(true, "ro"))).unwrap();
        fill(&memory, DATA, &[0xab; 512]);
        submit(&memory, &q, VIRTIO_BLK_T_OUT, 0, &[readable(DATA, 512)]);
        block.process_queue();
        assert_eq!(status(&memory), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(image.contents(), before);
    }

    #[test]
    fn a_missing_boot_backing_is_an_error() {
        let missing = BlockBacking {
            path: std::env::temp_dir().join("peapod-blk-test-missing-at-boot.img"),
            read_only: true,
            id: "a".into(),
            file: None,
        };
        let err = Block::new(Some(missing), interrupt()).err().unwrap();
        assert!(matches!(err, BlockError::NotFound { .. }), "{err}");
    }

    #[test]
    fn activation_needs_exactly_one_queue() {
        let memory = memory();
        let mut block = Block::new(None, interrupt()).unwrap();
        let (activation, _kicks) = activation(&memory, 0, vec![]);
        assert!(matches!(
            block.activate(activation),
            Err(ActivateError::QueueCount { got: 0, wanted: 1 })
        ));
        assert!(!block.is_activated());
    }
}
