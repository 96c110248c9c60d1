//! Legacy PC devices: a console UART and the i8042's reset line.

mod i8042;
mod serial;

pub use i8042::{I8042, I8042_PORT_BASE, I8042_PORT_LEN};
pub use serial::{SerialConsole, COM1_IRQ, COM1_PORT_BASE, COM1_PORT_LEN};

use std::io;
use vmm_sys_util::eventfd::EventFd;

/// vm-superio signals interrupts and resets through a `Trigger`; ours writes an
/// eventfd (an irqfd for interrupts, the VMM's event loop for resets).
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}
