//! The JSON bodies of the API. Requests refuse unknown fields (a typo must not pass
//! silently); replies accept them, so that an older client reads a newer VMM.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The body of `block.set` (put a file in block slot `slot`) and of `block.append`
/// (add a file to the store in slot `slot`, whose ID `id` must then be).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockSet {
    /// Index among the VM's block devices (boot disks first, then empty slots).
    pub slot: u32,
    /// The file the VMM opens; with [`fd`](Self::fd), only its name in the VMM's log.
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// The serial the guest reads (at most 20 bytes); empty if `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The file comes open with the request (`SCM_RIGHTS`): how a jailed VMM, which
    /// cannot open host paths, gets its disks. [`VmmClient::block_set_open`] sets it.
    ///
    /// [`VmmClient::block_set_open`]: crate::VmmClient::block_set_open
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fd: bool,
}

impl BlockSet {
    /// What [`BlockSet`] the VMM is shown when the body is wrong.
    pub const EXAMPLE: &'static str =
        r#"{"slot": 1, "path": "/x.img", "read_only": true, "id": "layer0"}"#;
}

/// The body of `block.clear`: empty block slot `slot`; the guest sees a disk of size 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockClear {
    pub slot: u32,
}

impl BlockClear {
    pub const EXAMPLE: &'static str = r#"{"slot": 1}"#;
}

/// The reply of `block.append`: where the file is in the store, in 512-byte sectors.
/// The guest sees the store's capacity grow to at least its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRegion {
    pub start_sector: u64,
    pub sectors: u64,
}

/// The body of `block.remove`: drop the file at `start_sector` from the store in
/// block slot `slot`; its sectors fail from then on and are never reused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockRemove {
    pub slot: u32,
    pub start_sector: u64,
}

impl BlockRemove {
    pub const EXAMPLE: &'static str = r#"{"slot": 0, "start_sector": 2048}"#;
}

/// The body of `vm.snapshot`: the directory (which must exist) where the VMM writes
/// the paused VM's state (`vm.state`) and memory (`memory`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    pub dir: PathBuf,
}

impl SnapshotCreate {
    pub const EXAMPLE: &'static str = r#"{"dir": "/var/lib/peapod/templates/abc"}"#;
}

/// Whether the vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Running,
    Paused,
}

/// The reply of `vm.info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub state: VmState,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// Whether the VMM works around an emulating host (docs/vmm.md, "Emulating hosts").
    pub platform_quirks: bool,
    /// The virtio devices in the order the guest sees them.
    #[serde(default)]
    pub devices: Vec<DeviceInfo>,
}

/// The kinds of virtio device a VM has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Block,
    Net,
    Vsock,
    Rng,
}

/// What `vm.info` shows of one device: the guest-side queue addresses help debug a
/// driver, and tests use them to play a hostile guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    #[serde(rename = "type")]
    pub kind: DeviceKind,
    /// For block devices: the slot number `block.set` takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
    /// For block devices: what the slot serves, or `empty`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<String>,
    pub mmio_base: u64,
    pub irq: u32,
    /// The virtio device status register.
    pub status: u32,
    pub queues: Vec<QueueInfo>,
}

/// One virtqueue as the guest's driver set it up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueInfo {
    pub size: u16,
    pub ready: bool,
    /// Guest-physical addresses of the descriptor table and the two rings.
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// The body of every 4xx/5xx reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, naming the object, the cause and the fix.
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_the_documented_json() {
        let info = VmInfo {
            state: VmState::Paused,
            vcpus: 2,
            memory_mib: 256,
            platform_quirks: false,
            devices: vec![DeviceInfo {
                kind: DeviceKind::Block,
                slot: Some(0),
                backing: None,
                mmio_base: 0xc000_0000,
                irq: 5,
                status: 15,
                queues: vec![QueueInfo {
                    size: 256,
                    ready: true,
                    desc: 1,
                    avail: 2,
                    used: 3,
                }],
            }],
        };
        let text = serde_json::to_string(&info).unwrap();
        assert!(
            text.starts_with(r#"{"state":"paused","vcpus":2,"#),
            "{text}"
        );
        assert!(
            text.contains(r#""type":"block","slot":0,"mmio_base""#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<VmInfo>(&text).unwrap(), info);

        let set = BlockSet {
            slot: 1,
            path: "/x.img".into(),
            read_only: true,
            id: Some("layer0".into()),
            fd: false,
        };
        let text = serde_json::to_string(&set).unwrap();
        assert_eq!(
            text,
            r#"{"slot":1,"path":"/x.img","read_only":true,"id":"layer0"}"#
        );
        let example: BlockSet = serde_json::from_str(BlockSet::EXAMPLE).unwrap();
        assert_eq!(example, set);
        let open = serde_json::to_string(&BlockSet { fd: true, ..set }).unwrap();
        assert!(open.ends_with(r#","fd":true}"#), "{open}");
        let clear: BlockClear = serde_json::from_str(BlockClear::EXAMPLE).unwrap();
        assert_eq!(clear, BlockClear { slot: 1 });
    }

    #[test]
    fn requests_refuse_unknown_fields_and_replies_take_them() {
        let e = serde_json::from_str::<BlockClear>(r#"{"slot": 1, "x": 2}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `x`"), "{e}");
        let newer = r#"{"state":"running","vcpus":1,"memory_mib":128,
            "platform_quirks":true,"devices":[],"balloon":{}}"#;
        let info: VmInfo = serde_json::from_str(newer).unwrap();
        assert_eq!(info.state, VmState::Running);
    }
}
