//! The guest agent's library: PID 1 duties that the test guest's probe
//! (tests/guest-probe) shares, and the container runtime the agent serves.

pub mod beneath;
pub mod cgroups;
pub mod container;
pub mod devices;
pub mod dm;
pub mod files;
pub mod handshake;
pub mod init;
pub mod log;
pub mod network;
pub mod oom_log;
pub mod port_forward;
pub mod process;
pub mod sandbox;
pub mod seccomp;
pub mod server;
pub mod spec;
pub mod storage;
pub mod trace;

/// Locks a mutex; a thread that panicked while holding it leaves data that is
/// still the best the agent has.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
