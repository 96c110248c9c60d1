//! Why the VMM stops, and how a vCPU thread or device tells the event loop.

use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (i8042, triple fault): how a microVM powers off.
    GuestReset,
    /// A vCPU halted with the in-kernel irqchip bypassed; treated as a power-off.
    GuestHalted,
    /// SIGTERM or SIGINT.
    Signal,
    /// `PUT /api/v1/vm.shutdown`.
    ApiShutdown,
    /// The guest cannot go on: an emulation failure, a failed entry, a KVM error.
    VcpuFailed(String),
}

impl ExitReason {
    /// 0 for every orderly stop; 3 when the guest died (1 and 2 are setup errors and
    /// command-line mistakes).
    pub fn exit_code(&self) -> u8 {
        match self {
            ExitReason::VcpuFailed(_) => 3,
            _ => 0,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::GuestReset => f.write_str("the guest powered off (reset)"),
            ExitReason::GuestHalted => f.write_str("the guest halted"),
            ExitReason::Signal => f.write_str("stopped by SIGTERM or SIGINT"),
            ExitReason::ApiShutdown => f.write_str("shutdown requested over the API"),
            ExitReason::VcpuFailed(why) => write!(f, "the guest failed: {why}"),
        }
    }
}

/// The first reason raised wins; the eventfd wakes the event loop.
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    pub event: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            event: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    pub fn raise(&self, reason: ExitReason) {
        let mut slot = self
            .reason
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(reason);
        }
        drop(slot);
        if let Err(e) = self.event.write(1) {
            log::error!("cannot wake the event loop to stop: {e}");
        }
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_reason_wins_and_wakes_the_loop() {
        let exit = ExitSignal::new().unwrap();
        assert_eq!(exit.reason(), None);
        exit.raise(ExitReason::GuestReset);
        exit.raise(ExitReason::VcpuFailed("late".into()));
        assert_eq!(exit.reason(), Some(ExitReason::GuestReset));
        assert_eq!(exit.event.read().unwrap(), 2);
        assert_eq!(ExitReason::GuestReset.exit_code(), 0);
        assert_eq!(ExitReason::VcpuFailed(String::new()).exit_code(), 3);
    }
}
