//! The pod's disks: every image and every container's upper disk is a file of one
//! *store*, a virtio-blk device (slot 0) whose capacity grows as files are added. The
//! guest maps each file's region as a device of its own (device-mapper's linear
//! target), so a pod's disks are not bounded by the VM's device slots: virtio-mmio
//! has no hotplug and one interrupt line per device, and a slot per disk capped a pod
//! at a few containers (docs/decisions.md, "A pod's disks: one growing store").
//!
//! Each image is added once and shared by reference count (one image's layers serve
//! all its containers); the last release drops it from the store.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use peapod_agent_protocol as agent_proto;
use peapod_vmm_api::BlockRegion;

use crate::error::{Result, ShimError};
use crate::vmm::VmmApi;

/// The block slot the store is in: the VM boots with it empty.
pub const STORE_SLOT: u32 = 0;
/// The store's serial, by which the guest finds it.
pub const STORE_SERIAL: &str = "peapod-store";

struct Attached {
    region: BlockRegion,
    refs: usize,
}

#[derive(Default)]
pub struct DiskStore {
    attached: HashMap<PathBuf, Attached>,
}

impl DiskStore {
    /// Adds an image to the store (or takes another reference to it); the disk the
    /// agent is told to use, with `fstype`.
    pub async fn attach(
        &mut self,
        api: &VmmApi,
        path: &Path,
        read_only: bool,
        fstype: &str,
    ) -> Result<agent_proto::Disk> {
        let region = match self.attached.get_mut(path) {
            Some(a) => {
                a.refs += 1;
                a.region
            }
            None => {
                let region = api
                    .block_append(STORE_SLOT, path, read_only, STORE_SERIAL)
                    .await
                    .map_err(|source| ShimError::Vmm {
                        what: format!("adding {} to the pod's disk store", path.display()),
                        source,
                    })?;
                self.attached
                    .insert(path.to_path_buf(), Attached { region, refs: 1 });
                region
            }
        };
        Ok(agent_proto::Disk {
            serial: STORE_SERIAL.into(),
            fstype: fstype.into(),
            start_sector: region.start_sector,
            sectors: region.sectors,
            ..Default::default()
        })
    }

    /// Drops one reference to an attached image; the last one removes it from the
    /// store, in the VM through `api` if it still runs.
    pub async fn release(&mut self, api: Option<&VmmApi>, path: &Path) {
        let Some(a) = self.attached.get_mut(path) else {
            return;
        };
        a.refs -= 1;
        if a.refs > 0 {
            return;
        }
        let start = a.region.start_sector;
        self.attached.remove(path);
        if let Some(api) = api {
            if let Err(e) = api.block_remove(STORE_SLOT, start).await {
                log::warn!(
                    "removing {} from the pod's disk store (sector {start}): {e}",
                    path.display()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a VM to talk to: the bookkeeping of shared and released images.
    #[tokio::test]
    async fn an_image_is_shared_and_dropped_with_the_last_reference() {
        let dir = tempfile::tempdir().unwrap();
        let api = VmmApi::new(dir.path().join("no-vmm.sock"));
        let mut store = DiskStore::default();
        // Nothing answers on the socket: nothing is recorded.
        let e = store
            .attach(&api, Path::new("/x.img"), true, "erofs")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("/x.img"), "{e}");
        assert!(store.attached.is_empty());
        // An image taken as attached (as after a VMM that answered).
        let region = BlockRegion {
            start_sector: 4096,
            sectors: 100,
        };
        store
            .attached
            .insert("/layer.img".into(), Attached { region, refs: 1 });
        let disk = store
            .attach(&api, Path::new("/layer.img"), true, "erofs")
            .await
            .unwrap();
        assert_eq!(
            (disk.serial.as_str(), disk.start_sector, disk.sectors),
            (STORE_SERIAL, 4096, 100),
            "a second container shares the image"
        );
        store.release(None, Path::new("/layer.img")).await;
        assert!(store.attached.contains_key(Path::new("/layer.img")));
        store.release(None, Path::new("/layer.img")).await;
        assert!(store.attached.is_empty());
    }
}
