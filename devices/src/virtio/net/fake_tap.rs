//! A tap stand-in for the unit tests and the fuzz cases: a datagram socket pair's end,
//! one message per frame and non-blocking like a tap, which records the offloads the
//! device asks for.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use super::{NetBackend, TapError};

pub(crate) struct FakeTap {
    pub(crate) sock: UnixDatagram,
    /// The last `set_offload`'s flags.
    pub(crate) offload: Arc<Mutex<Option<libc::c_uint>>>,
}

impl Read for FakeTap {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.recv(buf)
    }
}

impl Write for FakeTap {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.send(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl NetBackend for FakeTap {
    fn name(&self) -> &str {
        "fake0"
    }

    fn set_offload(&mut self, tun_flags: libc::c_uint) -> Result<(), TapError> {
        *crate::lock(&self.offload) = Some(tun_flags);
        Ok(())
    }
}
