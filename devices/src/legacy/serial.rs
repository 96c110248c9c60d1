//! The 8250 UART at COM1, used only as the guest console.
//!
//! Every byte the guest writes is a VM exit, so the console is off unless asked for.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use super::EventFdTrigger;
use crate::BusDevice;

pub const COM1_PORT_BASE: u16 = 0x3f8;
pub const COM1_PORT_LEN: u16 = 8;
/// The ISA IRQ line of COM1.
pub const COM1_IRQ: u32 = 4;

pub struct SerialConsole {
    uart: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialConsole {
    /// `interrupt` is raised when the UART wants the guest's attention (an irqfd).
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::new(EventFdTrigger::new(interrupt), out),
        }
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.uart.read(offset),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            // A console that cannot be written (full disk, closed pipe) must not stop
            // the guest; losing console output is the lesser harm.
            if let Err(e) = self.uart.write(offset, *byte) {
                log::debug!("serial console: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_bytes_reach_the_console_and_wide_accesses_are_ignored() {
        let out = SharedBuf::default();
        let irq = EventFd::new(libc_nonblock()).unwrap();
        let mut uart = SerialConsole::new(irq, Box::new(out.clone()));
        for b in b"ok\n" {
            uart.write(0, &[*b]);
        }
        uart.write(0, b"xy");
        assert_eq!(out.0.lock().unwrap().as_slice(), b"ok\n");

        let mut wide = [0u8; 2];
        uart.read(5, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        let mut lsr = [0u8; 1];
        uart.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter holding register reads empty");
    }

    fn libc_nonblock() -> i32 {
        0o4000 // EFD_NONBLOCK
    }
}
