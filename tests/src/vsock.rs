//! The host side of the VMM's hybrid vsock (`--vsock cid=<n>,socket=<path>`):
//! connecting to a guest port through `<path>`, and listening at `<path>_<port>` for
//! the guest's connections to the host (CID 2).

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the VMM may take to answer `CONNECT`: it has to reach the guest's
/// kernel, which is slow on an emulating host.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

/// Connects to guest port `port` through the VMM's vsock socket `uds`: writes
/// `CONNECT <port>\n`, reads `OK <hostport>\n`. The stream is then the guest
/// connection, with no timeouts set.
pub fn vsock_connect(uds: &Path, port: u32) -> io::Result<UnixStream> {
    let mut s = UnixStream::connect(uds).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "connecting to the VMM's vsock socket {}: {e}",
                uds.display()
            ),
        )
    })?;
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    s.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Byte by byte: whatever follows the line is the guest's, and stays in the socket.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 {
        match s.read(&mut b) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!(
                        "{} closed the connection after CONNECT {port} (is the guest listening on port {port}?)",
                        uds.display()
                    ),
                ))
            }
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => line.push(b[0]),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("waiting for OK to CONNECT {port} on {}: {e}", uds.display()),
                ))
            }
        }
    }
    let text = String::from_utf8_lossy(&line);
    let ok = text
        .strip_prefix("OK ")
        .is_some_and(|p| p.trim().parse::<u32>().is_ok());
    if !ok {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} answered CONNECT {port} with {text:?}, not \"OK <port>\"",
                uds.display()
            ),
        ));
    }
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)?;
    Ok(s)
}

/// Where the VMM connects a guest's connection to host port `port`.
pub fn host_port_path(uds: &Path, port: u32) -> PathBuf {
    let mut p = uds.as_os_str().to_owned();
    p.push(format!("_{port}"));
    p.into()
}

/// Echoes every connection the guest makes to host port `port`, one thread each.
/// Stops and removes its socket when dropped.
pub struct EchoListener {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    acceptor: Option<JoinHandle<()>>,
}

impl EchoListener {
    pub fn start(uds: &Path, port: u32) -> Self {
        let path = host_port_path(uds, port);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .unwrap_or_else(|e| panic!("binding the echo listener {}: {e}", path.display()));
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let acceptor = {
            let (stop, connections, bytes) = (stop.clone(), connections.clone(), bytes.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let bytes = bytes.clone();
                    std::thread::spawn(move || {
                        if let Ok(n) = echo_stream(conn) {
                            bytes.fetch_add(n, Ordering::SeqCst);
                        }
                    });
                }
            })
        };
        Self {
            path,
            stop,
            connections,
            bytes,
            acceptor: Some(acceptor),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// Bytes echoed on connections that have ended.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }
}

/// Copies everything back until EOF, then ends the write side too.
fn echo_stream(conn: UnixStream) -> io::Result<u64> {
    conn.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut reader = &conn;
    let mut writer = &conn;
    let n = io::copy(&mut reader, &mut writer)?;
    conn.shutdown(std::net::Shutdown::Write)?;
    Ok(n)
}

impl Drop for EchoListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor so that it sees `stop`.
        let _ = UnixStream::connect(&self.path);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for the VMM's side of the handshake.
    fn fake_vmm(dir: &Path, answer: &'static str) -> PathBuf {
        let uds = dir.join("v.sock");
        let l = UnixListener::bind(&uds).unwrap();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let mut c = c.unwrap();
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while c.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
                    line.push(b[0]);
                }
                assert_eq!(line, b"CONNECT 5000");
                c.write_all(answer.as_bytes()).unwrap();
                // Then echo, as the guest's end would.
                let mut r = &c;
                let mut w = &c;
                let _ = io::copy(&mut r, &mut w);
            }
        });
        uds
    }

    #[test]
    fn handshake_then_the_stream_is_the_guests() {
        let dir = tempfile::tempdir().unwrap();
        let uds = fake_vmm(dir.path(), "OK 1073741824\n");
        let mut s = vsock_connect(&uds, 5000).unwrap();
        s.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
    }

    #[test]
    fn handshake_errors_say_what_went_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let uds = fake_vmm(dir.path(), "NOPE\n");
        let e = vsock_connect(&uds, 5000).unwrap_err().to_string();
        assert!(e.contains("answered CONNECT 5000 with \"NOPE\""), "{e}");
        let e = vsock_connect(&dir.path().join("none.sock"), 5000)
            .unwrap_err()
            .to_string();
        assert!(e.contains("none.sock"), "{e}");
    }

    #[test]
    fn echo_listener_echoes_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let l = EchoListener::start(&uds, 6000);
        let path = l.path().to_path_buf();
        assert_eq!(path, dir.path().join("v.sock_6000"));
        let c = UnixStream::connect(&path).unwrap();
        let got = peapod_guest_probe::echo_check(c.into(), 4, 100_000);
        assert_eq!(got, Ok(100_000));
        assert_eq!(l.connections(), 1);
        drop(l);
        assert!(!path.exists(), "the listener removes its socket");
    }
}
