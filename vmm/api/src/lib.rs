//! The control API of `peapod-vmm`: JSON over HTTP/1.1 on a unix socket. One home for
//! what both sides must agree on: the endpoints ([`Endpoint`], [`paths`]), the bodies
//! they take and give ([`BlockSet`], [`BlockClear`], [`BlockRemove`], [`BlockRegion`],
//! [`VmInfo`], [`ErrorBody`]), and
//! a blocking client ([`VmmClient`]) for the shim and the tests. The VMM serves it
//! with `httparse` on a thread of its own (`vmm/src/api.rs`).
//!
//! ```no_run
//! use peapod_vmm_api::{VmState, VmmClient};
//! let vmm = VmmClient::new("/run/peapod/vmm-1234.sock");
//! let info = vmm.info()?;
//! assert_eq!(info.state, VmState::Running);
//! vmm.pause()?;
//! # Ok::<(), peapod_vmm_api::ClientError>(())
//! ```

mod client;
mod messages;

pub use client::{ClientError, RawReply, VmmClient, DEFAULT_TIMEOUT};
pub use messages::{
    BlockClear, BlockRegion, BlockRemove, BlockSet, DeviceInfo, DeviceKind, ErrorBody, QueueInfo,
    SnapshotCreate, VmInfo, VmState,
};

/// Every endpoint's path.
pub mod paths {
    /// What every path starts with.
    pub const PREFIX: &str = "/api/v1/";
    pub const VM_INFO: &str = "/api/v1/vm.info";
    pub const VM_PAUSE: &str = "/api/v1/vm.pause";
    pub const VM_RESUME: &str = "/api/v1/vm.resume";
    pub const VM_SHUTDOWN: &str = "/api/v1/vm.shutdown";
    pub const VM_SNAPSHOT: &str = "/api/v1/vm.snapshot";
    pub const BLOCK_SET: &str = "/api/v1/block.set";
    pub const BLOCK_CLEAR: &str = "/api/v1/block.clear";
    pub const BLOCK_APPEND: &str = "/api/v1/block.append";
    pub const BLOCK_REMOVE: &str = "/api/v1/block.remove";
}

/// The HTTP methods the API takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
}

impl Method {
    pub const fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        }
    }
}

/// One endpoint of the API: its path, its method, the status of its success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET`: the VM's state, size and devices ([`VmInfo`]).
    VmInfo,
    /// `PUT`: stops the vCPUs; 409 if already paused.
    VmPause,
    /// `PUT`: restarts them; 409 if not paused.
    VmResume,
    /// `PUT`: the VMM tears down and exits 0.
    VmShutdown,
    /// `PUT` [`SnapshotCreate`]: writes a paused VM's state and memory into a
    /// directory, from which `peapod-vmm --restore` starts it again; 409 if not paused.
    VmSnapshot,
    /// `PUT` [`BlockSet`]: gives a block slot a backing file.
    BlockSet,
    /// `PUT` [`BlockClear`]: empties a block slot.
    BlockClear,
    /// `PUT` [`BlockSet`]: adds a file to the store in a block slot (an empty slot
    /// becomes one); answers its [`BlockRegion`].
    BlockAppend,
    /// `PUT` [`BlockRemove`]: drops a file from a store.
    BlockRemove,
}

impl Endpoint {
    pub const ALL: [Endpoint; 9] = [
        Endpoint::VmInfo,
        Endpoint::VmPause,
        Endpoint::VmResume,
        Endpoint::VmShutdown,
        Endpoint::VmSnapshot,
        Endpoint::BlockSet,
        Endpoint::BlockClear,
        Endpoint::BlockAppend,
        Endpoint::BlockRemove,
    ];

    pub const fn path(self) -> &'static str {
        match self {
            Endpoint::VmInfo => paths::VM_INFO,
            Endpoint::VmPause => paths::VM_PAUSE,
            Endpoint::VmResume => paths::VM_RESUME,
            Endpoint::VmShutdown => paths::VM_SHUTDOWN,
            Endpoint::VmSnapshot => paths::VM_SNAPSHOT,
            Endpoint::BlockSet => paths::BLOCK_SET,
            Endpoint::BlockClear => paths::BLOCK_CLEAR,
            Endpoint::BlockAppend => paths::BLOCK_APPEND,
            Endpoint::BlockRemove => paths::BLOCK_REMOVE,
        }
    }

    /// The path without [`paths::PREFIX`]: `vm.info`.
    pub fn name(self) -> &'static str {
        &self.path()[paths::PREFIX.len()..]
    }

    /// The endpoint whose [`name`](Self::name) this is.
    pub fn from_name(name: &str) -> Option<Endpoint> {
        Endpoint::ALL.into_iter().find(|e| e.name() == name)
    }

    pub const fn method(self) -> Method {
        match self {
            Endpoint::VmInfo => Method::Get,
            _ => Method::Put,
        }
    }

    /// The status a success is answered with: 200 with a body, 204 without.
    pub const fn success_status(self) -> u16 {
        match self {
            Endpoint::VmInfo | Endpoint::BlockAppend => 200,
            _ => 204,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_lives_under_the_prefix_and_is_found_by_its_name() {
        for e in Endpoint::ALL {
            assert!(e.path().starts_with(paths::PREFIX), "{e:?}");
            assert_eq!(Endpoint::from_name(e.name()), Some(e));
        }
        assert_eq!(Endpoint::VmInfo.name(), "vm.info");
        assert_eq!(Endpoint::BlockSet.method(), Method::Put);
        assert_eq!(Endpoint::from_name("vm.nothing"), None);
    }
}
