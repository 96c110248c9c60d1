//! `kubectl port-forward` to a VM pod, with containerd unchanged.
//!
//! ```text
//!  kubelet/kubectl --stream--> containerd CRI: in the pod's netns, dial localhost:PORT
//!    --nft redirect (nft.rs)--> shim listener 127.0.0.1:L (or [::1]:L6), in that netns
//!    --SO_ORIGINAL_DST: PORT--> vsock port 1027, "tcp PORT\n" --> agent dials
//!    127.0.0.1:PORT (then [::1]:PORT) in the guest, answers OK or ERR, relays
//! ```
//!
//! containerd answers PortForward by dialing the pod's loopback inside the pod's
//! network namespace on the node, where a VM pod has no server. In that namespace the
//! shim listens on the loopback and a redirect rule sends it every TCP connection to
//! the loopback, whatever the port, so nothing is set up per port and ports opened
//! later work. Each connection becomes one vsock stream to the agent; a port closed in
//! the guest resets the client's connection at once.
//!
//! The listeners and relays live as long as the pod's network: [`PortForward::stop`]
//! closes them (a socket would keep the namespace alive), and `network::detach`
//! removes the rule, after a crash too.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use peapod_agent_protocol::{ForwardHeader, MAX_FORWARD_HEADER, PORT_FORWARD_PORT};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::agent;
use crate::network::{self, NetworkError};
use crate::nft;

/// How long accept waits after a failure (out of descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The pod's port-forward listeners, each with its relays.
pub struct PortForward {
    loops: Vec<JoinHandle<()>>,
}

impl PortForward {
    /// Listens on the loopback of the namespace at `netns` (IPv6 too where it has
    /// `::1`) and installs the redirect to the listeners; connections go to the
    /// agent behind the VM's vsock socket `vsock`. `pod` names the pod in the log.
    pub async fn start(netns: &Path, vsock: &Path, pod: &str) -> Result<Self, NetworkError> {
        let listeners = network::in_netns(netns, false, listen_and_redirect)?
            .expect("the namespace is not treated as absent")
            .map_err(|(what, source)| NetworkError::Failed {
                netns: netns.to_path_buf(),
                what,
                source,
                hint: "; port-forward needs the node's kernel to have nf_tables with nat \
                       and redir (docs/install.md)"
                    .into(),
            })?;
        let shared = Arc::new((vsock.to_path_buf(), pod.to_string()));
        let mut loops = Vec::new();
        for listener in listeners {
            let listener =
                TcpListener::from_std(listener).map_err(|source| NetworkError::Failed {
                    netns: netns.to_path_buf(),
                    what: "registering the port-forward listener".into(),
                    source,
                    hint: String::new(),
                })?;
            loops.push(tokio::spawn(accept_loop(listener, shared.clone())));
        }
        Ok(PortForward { loops })
    }

    /// Closes the listeners and every relay, and waits until their sockets are
    /// closed.
    pub async fn stop(self) {
        for l in &self.loops {
            l.abort();
        }
        for l in self.loops {
            let _ = l.await;
        }
    }
}

type Failure = (String, io::Error);

/// In the pod's namespace: the listeners, then the rule that sends them the
/// loopback's connections.
fn listen_and_redirect() -> Result<Vec<std::net::TcpListener>, Failure> {
    let bind = |addr: SocketAddr| {
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        Ok::<_, io::Error>(l)
    };
    let v4 = bind((Ipv4Addr::LOCALHOST, 0).into())
        .map_err(|e| ("listening on 127.0.0.1".to_string(), e))?;
    // No `::1` (IPv6 off in the namespace): containerd then dials IPv4 only.
    let v6 = bind((Ipv6Addr::LOCALHOST, 0).into()).ok();
    let port = |l: &std::net::TcpListener| l.local_addr().map(|a| a.port());
    let redirect = nft::Redirect {
        v4_port: port(&v4).map_err(|e| ("reading the listener's port".to_string(), e))?,
        v6_port: v6.as_ref().and_then(|l| port(l).ok()),
    };
    nft::install(redirect).map_err(|e| {
        (
            format!(
                "installing the port-forward redirect (table inet {})",
                nft::TABLE
            ),
            e,
        )
    })?;
    Ok([Some(v4), v6].into_iter().flatten().collect())
}

/// Accepts until aborted; the relays are the loop's, so they end with it.
async fn accept_loop(listener: TcpListener, shared: Arc<(PathBuf, String)>) {
    let mut relays = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((conn, _)) => {
                    relays.spawn(relay(conn, shared.clone()));
                }
                Err(e) => {
                    log::warn!("pod {}: port-forward: accept: {e}", shared.1);
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = relays.join_next() => {}
        }
    }
}

/// One forwarded connection: to the port it was dialed on, in the guest.
async fn relay(mut conn: TcpStream, shared: Arc<(PathBuf, String)>) {
    let (vsock, pod) = (&shared.0, &shared.1);
    let port = match conn
        .local_addr()
        .and_then(|a| original_port(&conn, a.is_ipv6()))
    {
        Ok(p) => p,
        Err(e) => {
            log::warn!("pod {pod}: port-forward: the port a connection was made to: {e}");
            return reset(conn);
        }
    };
    let header = ForwardHeader { port }.encode();
    let mut guest =
        match agent::open_stream(vsock, PORT_FORWARD_PORT, &header, MAX_FORWARD_HEADER).await {
            Ok(s) => s,
            Err(e) => {
                log::debug!("pod {pod}: port-forward to port {port}: {e}");
                return reset(conn);
            }
        };
    let _ = conn.set_nodelay(true);
    if let Err(e) = tokio::io::copy_bidirectional(&mut conn, &mut guest).await {
        log::debug!("pod {pod}: port-forward to port {port}: {e}");
    }
}

/// Closes with a reset: the client learns at once that nothing answered.
fn reset(conn: TcpStream) {
    let _ = conn.set_zero_linger();
}

/// The port the client dialed, before the redirect, of connection `conn` accepted on
/// an IPv6 listener (`v6`) or an IPv4 one.
fn original_port(conn: &impl AsRawFd, v6: bool) -> io::Result<u16> {
    // SAFETY: sockaddr_in6 is plain data for which all-zero bytes are valid.
    let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    let (level, name) = if v6 {
        (libc::SOL_IPV6, libc::IP6T_SO_ORIGINAL_DST)
    } else {
        (libc::SOL_IP, libc::SO_ORIGINAL_DST)
    };
    // SAFETY: the kernel writes at most `len` bytes (a sockaddr_in or sockaddr_in6)
    // into `addr`, which is that large and outlives the call; the socket is open.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            level,
            name,
            (&mut addr as *mut libc::sockaddr_in6).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // sin_port and sin6_port are at the same offset, in network order.
    Ok(u16::from_be(addr.sin6_port))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream as StdStream;
    use std::process::Command;

    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixListener;

    use super::*;

    fn ip(args: &[&str]) {
        crate::test_util::run("ip", args);
    }

    /// A network namespace with its loopback up, deleted on drop.
    struct Netns(String);

    impl Netns {
        fn new(tag: &str) -> Self {
            crate::test_util::require_root("it creates network namespaces and nf_tables rules");
            let ns = Netns(format!("peapod-pf-{tag}-{}", std::process::id()));
            ip(&["netns", "add", &ns.0]);
            ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
            ns
        }

        fn path(&self) -> PathBuf {
            PathBuf::from(format!("/run/netns/{}", self.0))
        }

        fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
            network::in_netns(&self.path(), false, f).unwrap().unwrap()
        }

        /// [`Netns::run`], off the runtime's thread, which must go on serving the
        /// listeners.
        async fn run_async<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
            let path = self.path();
            tokio::task::spawn_blocking(move || {
                network::in_netns(&path, false, f).unwrap().unwrap()
            })
            .await
            .unwrap()
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    #[test]
    fn the_redirect_sends_every_loopback_port_to_the_listeners_until_removed() {
        let ns = Netns::new("rule");
        let ports = ns.run(|| {
            let listeners = listen_and_redirect().expect("listening and redirecting");
            assert_eq!(listeners.len(), 2, "an IPv4 and an IPv6 listener");
            let mut seen = Vec::new();
            for (listener, addr) in listeners.iter().zip(["127.0.0.1:4242", "[::1]:4243"]) {
                let _client = StdStream::connect(addr).unwrap_or_else(|e| {
                    panic!("connecting to {addr} (nothing listens there but the rule): {e}")
                });
                listener.set_nonblocking(false).unwrap();
                let (conn, _) = listener.accept().unwrap();
                let v6 = listener.local_addr().unwrap().is_ipv6();
                seen.push(original_port(&conn, v6).unwrap());
            }
            nft::remove().expect("removing the table");
            let after = StdStream::connect("127.0.0.1:4242").map(|_| ());
            nft::remove().expect("removing it again is no error");
            (seen, after.map_err(|e| e.kind()))
        });
        assert_eq!(ports.0, [4242, 4243]);
        assert_eq!(ports.1, Err(io::ErrorKind::ConnectionRefused));
    }

    /// Stands in for the VMM's vsock socket and the agent behind it: answers the
    /// handshake, refuses port 1, and echoes the others' bytes, upper-cased.
    async fn fake_agent(listener: UnixListener) {
        loop {
            let (conn, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut conn = BufReader::new(conn);
                let mut line = String::new();
                conn.read_line(&mut line).await.unwrap();
                assert_eq!(line, format!("CONNECT {PORT_FORWARD_PORT}\n"));
                conn.get_mut().write_all(b"OK 1\n").await.unwrap();
                line.clear();
                conn.read_line(&mut line).await.unwrap();
                if line == "tcp 1\n" {
                    conn.get_mut()
                        .write_all(b"ERR Connection refused (os error 111)\n")
                        .await
                        .unwrap();
                    return;
                }
                conn.get_mut().write_all(b"OK\n").await.unwrap();
                let mut data = Vec::new();
                conn.read_to_end(&mut data).await.unwrap();
                let answer = format!("{} {}", line.trim_end(), String::from_utf8_lossy(&data));
                conn.get_mut()
                    .write_all(answer.to_uppercase().as_bytes())
                    .await
                    .unwrap();
            });
        }
    }

    #[tokio::test]
    async fn connections_reach_the_agent_at_their_port_and_refusals_reset_them() {
        let ns = Netns::new("relay");
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        tokio::spawn(fake_agent(UnixListener::bind(&uds).unwrap()));
        let pf = PortForward::start(&ns.path(), &uds, "pod-1").await.unwrap();
        let results = ns
            .run_async(|| {
                let mut answers = Vec::new();
                for addr in ["127.0.0.1:8080", "[::1]:9090"] {
                    let mut c = StdStream::connect(addr).unwrap();
                    c.write_all(b"hello").unwrap();
                    c.shutdown(std::net::Shutdown::Write).unwrap();
                    let mut answer = String::new();
                    c.read_to_string(&mut answer).unwrap();
                    answers.push(answer);
                }
                let mut refused = StdStream::connect("127.0.0.1:1").unwrap();
                let closed = refused.read(&mut [0; 16]).map_err(|e| e.kind());
                (answers, closed)
            })
            .await;
        assert_eq!(results.0, ["TCP 8080 HELLO", "TCP 9090 HELLO"]);
        assert_eq!(results.1, Err(io::ErrorKind::ConnectionReset));
        let listeners = ns.run_async(listening_sockets).await;
        assert_eq!(listeners.len(), 2, "one listener per family");
        pf.stop().await;
        // The rule is still there (detach removes it) but this process holds no
        // listener. The kernel may keep one open a little longer: a concurrent test's
        // child, between its fork and its exec, holds a copy of every descriptor
        // (twice in CI, a listener seemed to outlive stop that way), so the
        // namespace's count is awaited.
        let held = held_sockets();
        assert!(
            listeners.iter().all(|inode| !held.contains(inode)),
            "a listener outlived stop: sockets {listeners:?}, held {held:?}"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !ns.run_async(listening_sockets).await.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "a listener is still open 10 s after stop"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The socket inodes of TCP sockets in LISTEN in the calling thread's network
    /// namespace.
    fn listening_sockets() -> Vec<u64> {
        ["tcp", "tcp6"]
            .iter()
            .flat_map(|table| {
                std::fs::read_to_string(format!("/proc/thread-self/net/{table}"))
                    .unwrap_or_default()
                    .lines()
                    .skip(1)
                    .map(|l| l.split_whitespace().collect::<Vec<_>>())
                    .filter(|fields| fields.get(3) == Some(&"0A"))
                    .filter_map(|fields| fields.get(9)?.parse().ok())
                    .collect::<Vec<u64>>()
            })
            .collect()
    }

    /// The socket inodes this process has descriptors of.
    fn held_sockets() -> Vec<u64> {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| {
                let target = std::fs::read_link(e.ok()?.path()).ok()?;
                let target = target.to_str()?;
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse()
                    .ok()
            })
            .collect()
    }
}
