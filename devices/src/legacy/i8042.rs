//! Just enough of the i8042 keyboard controller for a guest to reset the machine
//! (`reboot=k`: command 0xFE on port 0x64). The VMM treats that reset as the guest
//! asking to stop: a microVM is never rebooted in place.

use vm_superio::I8042Device;
use vmm_sys_util::eventfd::EventFd;

use super::EventFdTrigger;
use crate::BusDevice;

/// Data port 0x60 through command/status port 0x64.
pub const I8042_PORT_BASE: u16 = 0x60;
pub const I8042_PORT_LEN: u16 = 5;

pub struct I8042 {
    controller: I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// `reset` is written when the guest asks for a CPU reset.
    pub fn new(reset: EventFd) -> Self {
        Self {
            controller: I8042Device::new(EventFdTrigger::new(reset)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty; Linux's kb_wait() passes.
        let value = u8::try_from(offset).map_or(0xff, |off| self.controller.read(off));
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [value]) = (u8::try_from(offset), data) {
            if let Err(e) = self.controller.write(offset, *value) {
                log::error!("i8042: cannot signal the guest's reset request: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_on_port_0x64_signals_reset() {
        let reset = EventFd::new(0o4000).unwrap();
        let mut kbd = I8042::new(reset.try_clone().unwrap());
        kbd.write(0, &[0xfe]);
        assert!(
            reset.read().is_err(),
            "0xfe on the data port is not a reset"
        );
        kbd.write(4, &[0xfe]);
        assert_eq!(reset.read().unwrap(), 1);
    }
}
