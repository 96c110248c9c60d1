//! The unix-socket backend: every vsock connection is one unix stream on the host.
//!
//! `muxer.rs` owns the VM's listening socket, the connections and an epoll instance
//! of its own (the device's event handler watches only that one fd, as Firecracker's
//! muxer does); `connection.rs` is one connection's state and flow control;
//! `handshake.rs` reads a host process's `CONNECT <port>\n` line. This file holds the
//! socket plumbing they share.

mod connection;
mod handshake;
mod muxer;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use muxer::VsockMuxer;

use super::MAX_PKT_PAYLOAD;

/// The receive buffer we promise the guest per connection (its `buf_alloc`): what a
/// connection may hold of guest data the host process has not read yet.
pub const CONN_BUF_ALLOC: u32 = 256 << 10;
/// A credit update goes to the guest once we have forwarded this much since the
/// last one...
const CREDIT_UPDATE_FREED: u32 = CONN_BUF_ALLOC / 2;
/// ...or as soon as we forwarded anything while the guest believes less than this is
/// free (so a sender never waits for the half mark with a nearly full window).
const CREDIT_LOW_WATER: u32 = MAX_PKT_PAYLOAD;
/// Open connections per VM; each costs a host fd and up to `CONN_BUF_ALLOC` bytes.
pub const MAX_CONNECTIONS: usize = 1024;
/// Host streams that have connected but not yet written their CONNECT line.
const MAX_HANDSHAKES: usize = 128;
/// Local (host) ports for host-initiated connections count up from here, clear of the
/// well-known ports guest services listen on.
const FIRST_HOST_PORT: u32 = 1 << 30;

/// How long the muxer waits for the other side at each step before giving up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    /// From a host process's connect to its complete CONNECT line.
    pub connect_line: Duration,
    /// From our REQUEST to the guest's RESPONSE.
    pub response: Duration,
    /// From a SHUTDOWN (ours, or the guest's with data still to flush) to the end of
    /// the connection.
    pub shutdown: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect_line: Duration::from_secs(5),
            response: Duration::from_secs(5),
            shutdown: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnixError {
    #[error(
        "vsock socket {0}: a live process is listening there (another VMM for this VM?); \
         stop it or choose another path"
    )]
    InUse(PathBuf),
    #[error(
        "vsock socket {0}: the path exists and is not a socket; remove it or choose another path"
    )]
    NotASocket(PathBuf),
    #[error("vsock socket {path}: cannot check or remove the stale socket there: {source}")]
    Stale { path: PathBuf, source: io::Error },
    #[error(
        "vsock socket {path}: cannot bind: {source} (does the directory exist, and may the \
         VMM write to it?)"
    )]
    Bind { path: PathBuf, source: io::Error },
    #[error(
        "vsock socket {0}: a unix socket path is at most 107 bytes, and guest-to-host \
         connections add `_<port>` to it; use a shorter directory"
    )]
    PathTooLong(PathBuf),
    #[error("vsock: cannot create the backend's {what}: {source} (out of file descriptors?)")]
    Setup {
        what: &'static str,
        source: io::Error,
    },
}

/// Binds the VM's listening socket at `path`, replacing a stale socket file left by a
/// VMM that died, but never a live one. Returns the listener (non-blocking) and the
/// identity of the socket file, so that only this file is removed later.
fn bind_listener(path: &Path) -> Result<(UnixListener, (u64, u64)), UnixError> {
    // `_4294967295` must still fit for guest-to-host connections.
    if sockaddr(&super::host_port_path(path, u32::MAX)).is_err() {
        return Err(UnixError::PathTooLong(path.to_owned()));
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(UnixError::NotASocket(path.to_owned()));
        }
        Ok(_) => match connect_nonblocking(path) {
            // EAGAIN: a listener whose backlog is full, alive all the same.
            Ok(_) => return Err(UnixError::InUse(path.to_owned())),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                return Err(UnixError::InUse(path.to_owned()));
            }
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                log::info!("vsock: replacing the stale socket {}", path.display());
                std::fs::remove_file(path).map_err(|source| UnixError::Stale {
                    path: path.to_owned(),
                    source,
                })?;
            }
            Err(source) => {
                return Err(UnixError::Stale {
                    path: path.to_owned(),
                    source,
                })
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(UnixError::Stale {
                path: path.to_owned(),
                source,
            })
        }
    }
    let bind_err = |source| UnixError::Bind {
        path: path.to_owned(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    let meta = std::fs::metadata(path).map_err(bind_err)?;
    Ok((listener, (meta.dev(), meta.ino())))
}

/// `path` as a unix socket address, with its length.
fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data, for which all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    // One byte stays zero: the terminator.
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a usable unix socket path", path.display()),
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

/// Connects to the unix socket at `path` without blocking: a listener whose backlog is
/// full fails with EAGAIN instead of stalling the event loop until it accepts.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let (addr, len) = sockaddr(path)?;
    // SAFETY: socket() takes no pointers; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket just created and owned by nobody else.
    let stream = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // SAFETY: `addr` is an initialised sockaddr_un of at least `len` bytes that lives
    // across the call; connect() only reads it.
    let r = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            std::ptr::from_ref(&addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

/// Writes to a stream whose reader may be gone: EPIPE comes back as an error instead
/// of a SIGPIPE that would end the VMM.
fn send_nosignal(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes during the call, and
        // the fd belongs to `stream`, which outlives it.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_must_fit_sockaddr_un() {
        assert!(sockaddr(Path::new("/tmp/x.sock")).is_ok());
        assert!(sockaddr(Path::new("")).is_err());
        let long = format!("/tmp/{}", "a".repeat(110));
        assert!(sockaddr(Path::new(&long)).is_err());
        let (_, len) = sockaddr(Path::new("/a")).unwrap();
        assert_eq!(len as usize, std::mem::size_of::<libc::sa_family_t>() + 3);
    }

    #[test]
    fn nonblocking_connect_reports_missing_listeners() {
        let e = connect_nonblocking(Path::new("/nonexistent-peapod-dir/x.sock")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
