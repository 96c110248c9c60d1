//! The VM's disk slots. virtio-mmio has no hotplug, so the VM boots with a fixed
//! number of empty disks; an image is put in a free one when a container needs it.
//! Each image is attached once and shared by reference count (the layers of one image
//! are attached once for all its containers).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use crate::error::{Result, ShimError};
use crate::vmm::VmmApi;

struct Attached {
    slot: u32,
    serial: String,
    refs: usize,
}

pub struct BlockSlots {
    count: u32,
    free: BTreeSet<u32>,
    attached: HashMap<PathBuf, Attached>,
    next_serial: u64,
}

impl BlockSlots {
    /// `count` empty slots, as the VM booted with.
    pub fn new(count: u32) -> BlockSlots {
        BlockSlots {
            count,
            free: (0..count).collect(),
            attached: HashMap::new(),
            next_serial: 0,
        }
    }

    /// Attaches an image to a free slot (or takes another reference to it); the
    /// serial the guest sees it by.
    pub async fn attach(&mut self, api: &VmmApi, path: &Path, read_only: bool) -> Result<String> {
        if let Some(a) = self.attached.get_mut(path) {
            a.refs += 1;
            return Ok(a.serial.clone());
        }
        let Some(slot) = self.free.pop_first() else {
            return Err(ShimError::NoFreeSlot {
                path: path.into(),
                slots: self.count,
            });
        };
        self.next_serial += 1;
        let serial = format!("pp{}", self.next_serial);
        if let Err(source) = api.block_set(slot, path, read_only, &serial).await {
            self.free.insert(slot);
            return Err(ShimError::Vmm {
                what: format!("block slot {slot}"),
                source,
            });
        }
        self.attached.insert(
            path.to_path_buf(),
            Attached {
                slot,
                serial: serial.clone(),
                refs: 1,
            },
        );
        Ok(serial)
    }

    /// Drops one reference to an attached image; the last one empties its slot, in
    /// the VM through `api` if it still runs. A slot the VMM fails to empty stays
    /// taken.
    pub async fn release(&mut self, api: Option<&VmmApi>, path: &Path) {
        let Some(a) = self.attached.get_mut(path) else {
            return;
        };
        a.refs -= 1;
        if a.refs > 0 {
            return;
        }
        let slot = a.slot;
        self.attached.remove(path);
        if let Some(api) = api {
            if let Err(e) = api.block_clear(slot).await {
                log::warn!("emptying slot {slot} ({}): {e}", path.display());
                return;
            }
        }
        self.free.insert(slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a VM to talk to: the bookkeeping of shared and released images.
    #[tokio::test]
    async fn an_image_is_shared_and_its_slot_freed_with_the_last_reference() {
        let dir = tempfile::tempdir().unwrap();
        let api = VmmApi::new(dir.path().join("no-vmm.sock"));
        let mut slots = BlockSlots::new(2);
        // Nothing answers on the socket: the slot goes back.
        let e = slots
            .attach(&api, Path::new("/x.img"), true)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("block slot 0"), "{e}");
        assert_eq!(slots.free.len(), 2);
        // An image taken as attached (as after a VMM that answered).
        slots.attached.insert(
            "/layer.img".into(),
            Attached {
                slot: 0,
                serial: "pp7".into(),
                refs: 1,
            },
        );
        slots.free.remove(&0);
        let serial = slots
            .attach(&api, Path::new("/layer.img"), true)
            .await
            .unwrap();
        assert_eq!(serial, "pp7", "a second container shares the layer");
        slots.release(None, Path::new("/layer.img")).await;
        assert!(!slots.free.contains(&0), "one reference is left");
        slots.release(None, Path::new("/layer.img")).await;
        assert!(slots.free.contains(&0));
        slots.free.clear();
        let e = slots
            .attach(&api, Path::new("/y.img"), false)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("raise block_slots"), "{e}");
    }
}
