//! peapod-probe: PID 1 of the test guest (`rdinit=/peapod-probe`, in the initramfs
//! that rootfs/build-test.sh makes), and the protocol the host-side tests speak to it.
//!
//! It listens on vsock port [`PORT`] (any CID) and on TCP port [`PORT`], and serves one
//! command per connection (see [`serve`]). It is a test tool: anyone who can reach it
//! gets a root shell in the guest. It never goes into the product's initramfs.

pub mod echo;
pub mod serve;
pub mod sock;

pub use echo::{echo_check, pattern_fill};
pub use serve::{Config, Request, MAX_LINE, PORT};
pub use sock::Sock;
