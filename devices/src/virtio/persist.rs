//! A virtio device's state for snapshots: its transport's registers and where the
//! device is in each of its queues. What a device keeps of its own (a vsock
//! connection, a disk) is its own `persist` business.

use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;

use super::ActivateError;

/// One queue: its configuration and where the device is in its rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<&QueueSnapshot> for QueueState {
    fn from(q: &QueueSnapshot) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// The virtio-mmio transport's registers, its interrupt, and the device's queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportSnapshot {
    pub device_type: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub driver_features: u64,
    pub queue_select: u32,
    pub status: u32,
    pub broken: bool,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub needs_reset: bool,
    /// The queues as the driver configured them.
    pub queues: Vec<QueueSnapshot>,
    /// Once the device runs: the queues as it holds them (where it is in each ring).
    pub active_queues: Option<Vec<QueueSnapshot>>,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("the snapshot is of a device of type {saved}, this one is of type {here}")]
    DeviceType { saved: u32, here: u32 },
    #[error("the snapshot has {saved} queues, the device {here}")]
    QueueCount { saved: usize, here: usize },
    #[error("the device is already in use: a snapshot is restored into a new one")]
    InUse,
    #[error("queue {index} of the snapshot is not valid: {source:?}")]
    Queue {
        index: usize,
        source: virtio_queue::Error,
    },
    #[error("queue {index} of the snapshot lies outside guest memory")]
    QueueOutsideMemory { index: usize },
    #[error("starting the device again: {0}")]
    Activate(#[from] ActivateError),
    #[error("the device's own state: {0}")]
    Device(String),
}
