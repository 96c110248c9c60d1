//! A connected stream socket of any family (vsock, TCP, unix), so that one command
//! handler serves the guest's vsock and TCP listeners and the host's unit tests.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, VsockAddr};

/// `VMADDR_CID_HOST`: the host end of a guest's vsock.
pub const HOST_CID: u32 = 2;
/// `VMADDR_CID_ANY`: listen on whatever CID the guest has.
pub const ANY_CID: u32 = u32::MAX;

/// `SO_VM_SOCKETS_CONNECT_TIMEOUT` (linux/vm_sockets.h; `_OLD`, a `struct timeval`
/// on 64-bit). libc does not export it.
const SO_VM_SOCKETS_CONNECT_TIMEOUT: libc::c_int = 6;

#[derive(Debug)]
pub struct Sock(OwnedFd);

impl Sock {
    pub fn try_clone(&self) -> io::Result<Sock> {
        Ok(Sock(self.0.try_clone()?))
    }

    /// A duplicate of the descriptor, for a child's stdout or stderr.
    pub fn dup_fd(&self) -> io::Result<OwnedFd> {
        self.0.try_clone()
    }

    /// Tells the peer that no more data comes (it reads EOF), while still reading.
    pub fn shutdown_write(&self) -> io::Result<()> {
        socket::shutdown(self.0.as_raw_fd(), socket::Shutdown::Write).map_err(io::Error::from)
    }

    /// Reads without consuming: the data stays for the next read.
    pub fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        socket::recv(self.0.as_raw_fd(), buf, socket::MsgFlags::MSG_PEEK).map_err(io::Error::from)
    }

    /// Read and write timeouts (`SO_RCVTIMEO`, `SO_SNDTIMEO`); `None` waits forever.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        let tv = timeval(timeout.unwrap_or(Duration::ZERO));
        for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
            setsockopt_timeval(self.0.as_fd(), libc::SOL_SOCKET, opt, &tv)?;
        }
        Ok(())
    }

    /// Connects to `port` of the host (CID 2) over vsock, waiting up to `timeout`
    /// (the kernel's default, 2 s, is short for a guest whose kernel is emulated).
    pub fn vsock_connect(cid: u32, port: u32, timeout: Duration) -> io::Result<Sock> {
        let fd = socket::socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        setsockopt_timeval(
            fd.as_fd(),
            libc::AF_VSOCK,
            SO_VM_SOCKETS_CONNECT_TIMEOUT,
            &timeval(timeout),
        )?;
        loop {
            match socket::connect(fd.as_raw_fd(), &VsockAddr::new(cid, port)) {
                Ok(()) => return Ok(Sock(fd)),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl From<OwnedFd> for Sock {
    fn from(fd: OwnedFd) -> Self {
        Sock(fd)
    }
}

impl From<std::net::TcpStream> for Sock {
    fn from(s: std::net::TcpStream) -> Self {
        Sock(s.into())
    }
}

impl From<std::os::unix::net::UnixStream> for Sock {
    fn from(s: std::os::unix::net::UnixStream) -> Self {
        Sock(s.into())
    }
}

impl AsRawFd for Sock {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl AsFd for Sock {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        nix::unistd::read(&self.0, buf).map_err(io::Error::from)
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        nix::unistd::write(&self.0, buf).map_err(io::Error::from)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening stream socket; `accept` gives close-on-exec sockets, so that a shell
/// started for one connection does not hold the others open.
pub struct Listener(OwnedFd);

impl Listener {
    pub fn vsock(port: u32) -> io::Result<Listener> {
        let fd = socket::socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        socket::bind(fd.as_raw_fd(), &VsockAddr::new(ANY_CID, port))?;
        socket::listen(&fd, Backlog::new(128)?)?;
        Ok(Listener(fd))
    }

    pub fn accept(&self) -> io::Result<Sock> {
        let raw = socket::accept4(self.0.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
        // SAFETY: accept4 just returned this descriptor and nothing else owns it.
        Ok(Sock(unsafe { OwnedFd::from_raw_fd(raw) }))
    }
}

impl From<std::net::TcpListener> for Listener {
    fn from(l: std::net::TcpListener) -> Self {
        Listener(l.into())
    }
}

impl From<std::os::unix::net::UnixListener> for Listener {
    fn from(l: std::os::unix::net::UnixListener) -> Self {
        Listener(l.into())
    }
}

fn timeval(d: Duration) -> libc::timeval {
    libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    }
}

fn setsockopt_timeval(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    tv: &libc::timeval,
) -> io::Result<()> {
    // SAFETY: `tv` is a valid timeval for the duration of the call and the length
    // passed is its size; the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
