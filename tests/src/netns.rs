//! A private network for a VM, built from network namespaces so that a test touches
//! nothing of the host's network:
//!
//! ```text
//!  netns "pod" (the VMM runs here)              netns "peer"
//!   tap <--tc u32 mirred redirect--> veth  <==>  veth 10.a.b.1/24   (guest: 10.a.b.2)
//! ```
//!
//! The tap is persistent (`ip tuntap add`), so the VMM opens it by name. The tc
//! filters are `u32 match u8 0 0`: this host's kernel has no matchall or flower.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::require_root;

fn netns_path(ns: &str) -> String {
    format!("/run/netns/{ns}")
}

fn open_netns(ns: &str) -> File {
    File::open(netns_path(ns))
        .unwrap_or_else(|e| panic!("opening network namespace {ns} ({}): {e}", netns_path(ns)))
}

fn setns_net(f: &File) -> io::Result<()> {
    // SAFETY: setns(2) on a descriptor we own; it changes only this thread's network
    // namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes `cmd`'s process start in network namespace `ns` (as `ip netns exec` would,
/// but without a process in between: the child's pid is the program's).
pub fn enter_in_child(cmd: &mut Command, ns: &str) {
    let f = open_netns(ns);
    // SAFETY: the closure runs between fork and exec and only calls setns(2), which
    // is async-signal-safe; `f` stays open until then (and closes on exec).
    unsafe {
        cmd.pre_exec(move || setns_net(&f));
    }
}

/// Runs `f` on a thread inside network namespace `ns`; sockets it makes stay there.
pub fn run_in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = open_netns(ns);
    let ns = ns.to_string();
    std::thread::spawn(move || {
        setns_net(&file).unwrap_or_else(|e| panic!("entering network namespace {ns}: {e}"));
        f()
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Runs a command inside `ns` with `ip netns exec`.
pub fn netns_exec(ns: &str, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running ip netns exec {ns} {args:?}: {e}"))
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("cannot run {args:?}: {e} (is iproute2 installed?)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn output_of(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const NS_PREFIX: &str = "peapod-test-";

/// Deletes the namespaces of test processes that are gone (killed before their
/// fixtures could clean up); their interfaces go with them.
fn remove_stale_namespaces() {
    for line in output_of(&["ip", "netns", "list"]).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        // <pod|peer>-<pid>-<n>
        let pid = rest.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = run(&["ip", "netns", "del", name]);
            }
        }
    }
}

/// The names one fixture uses, to check afterwards that none is left.
#[derive(Clone, Debug)]
pub struct NetNames {
    pub pod: String,
    pub peer: String,
    pub tap: String,
    pub veth_pod: String,
    pub veth_peer: String,
}

/// Two namespaces, a tap, a veth pair and the redirect filters; all deleted on drop.
/// Drop the VMM first: a namespace lives on while a process is in it.
pub struct NetFixture {
    pub names: NetNames,
    /// The peer's address; the guest is given [`NetFixture::guest_ip`].
    pub peer_ip: Ipv4Addr,
    pub guest_ip: Ipv4Addr,
    pub prefix_len: u8,
}

impl NetFixture {
    pub fn new() -> Self {
        require_root();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        remove_stale_namespaces();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        // Interface names have at most 15 characters: 2 + 7 (pid_max) + 1 + up to 3.
        let names = NetNames {
            pod: format!("{NS_PREFIX}pod-{pid}-{n}"),
            peer: format!("{NS_PREFIX}peer-{pid}-{n}"),
            tap: format!("pt{pid}x{n}"),
            veth_pod: format!("pv{pid}x{n}"),
            veth_peer: format!("pe{pid}x{n}"),
        };
        // Namespaces are private, so the subnet only needs to differ from the host's
        // in the test's own eyes; vary it anyway to tell runs apart in captures.
        let (a, b) = (100 + (pid % 100) as u8, (n % 250) as u8);
        let fixture = NetFixture {
            names,
            peer_ip: Ipv4Addr::new(10, a, b, 1),
            guest_ip: Ipv4Addr::new(10, a, b, 2),
            prefix_len: 24,
        };
        // From here on a failure panics, and Drop removes whatever was made.
        if let Err(e) = fixture.build() {
            panic!("building the test network: {e}");
        }
        fixture
    }

    fn build(&self) -> Result<(), String> {
        let NetNames {
            pod,
            peer,
            tap,
            veth_pod,
            veth_peer,
        } = &self.names;
        let peer_cidr = format!("{}/{}", self.peer_ip, self.prefix_len);
        run(&["ip", "netns", "add", pod])?;
        run(&["ip", "netns", "add", peer])?;
        run(&[
            "ip", "-n", pod, "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr",
        ])?;
        run(&[
            "ip", "-n", pod, "link", "add", veth_pod, "type", "veth", "peer", "name", veth_peer,
            "netns", peer,
        ])?;
        for dev in [tap, veth_pod, &"lo".to_string()] {
            run(&["ip", "-n", pod, "link", "set", dev, "up"])?;
        }
        run(&[
            "ip", "-n", peer, "addr", "add", &peer_cidr, "dev", veth_peer,
        ])?;
        for dev in [veth_peer, &"lo".to_string()] {
            run(&["ip", "-n", peer, "link", "set", dev, "up"])?;
        }
        for (from, to) in [(tap, veth_pod), (veth_pod, tap)] {
            run(&["tc", "-n", pod, "qdisc", "add", "dev", from, "ingress"])?;
            run(&[
                "tc", "-n", pod, "filter", "add", "dev", from, "parent", "ffff:", "protocol",
                "all", "u32", "match", "u8", "0", "0", "action", "mirred", "egress", "redirect",
                "dev", to,
            ])?;
        }
        Ok(())
    }

    pub fn pod(&self) -> &str {
        &self.names.pod
    }

    pub fn peer(&self) -> &str {
        &self.names.peer
    }

    pub fn tap(&self) -> &str {
        &self.names.tap
    }
}

impl Default for NetFixture {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetFixture {
    fn drop(&mut self) {
        let n = &self.names;
        // Explicit deletes first, so that nothing waits for the namespaces' teardown.
        let _ = run(&["ip", "-n", &n.pod, "link", "del", &n.veth_pod]);
        let _ = run(&[
            "ip", "-n", &n.pod, "tuntap", "del", "dev", &n.tap, "mode", "tap",
        ]);
        let _ = run(&["ip", "netns", "del", &n.pod]);
        let _ = run(&["ip", "netns", "del", &n.peer]);
    }
}

/// What is left of a fixture on the host: its namespaces in `ip netns list`, its
/// interfaces in the host's namespace. Namespace teardown is asynchronous, so this
/// waits up to `timeout` for the list to empty.
pub fn leftovers(names: &NetNames, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let netns = output_of(&["ip", "netns", "list"]);
        let links = output_of(&["ip", "-o", "link", "show"]);
        let mut left = Vec::new();
        for ns in [&names.pod, &names.peer] {
            if netns.split_whitespace().any(|w| w == ns) {
                left.push(format!("netns {ns}"));
            }
        }
        for dev in [&names.tap, &names.veth_pod, &names.veth_peer] {
            // `ip -o link` lines read "<index>: <name>[@peer]: <flags> ...".
            let present = links.lines().any(|l| {
                l.split(": ")
                    .nth(1)
                    .is_some_and(|name| name.split('@').next() == Some(dev.as_str()))
            });
            if present {
                left.push(format!("interface {dev}"));
            }
        }
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A TCP echo server inside a network namespace; stops when dropped.
pub struct TcpEchoServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl TcpEchoServer {
    pub fn start_in(ns: &str, addr: SocketAddr) -> Self {
        let file = open_netns(ns);
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let stop2 = stop.clone();
        let ns2 = ns.to_string();
        let acceptor = std::thread::spawn(move || {
            let bound = setns_net(&file)
                .map_err(|e| format!("entering network namespace {ns2}: {e}"))
                .and_then(|_| {
                    TcpListener::bind(addr).map_err(|e| format!("binding {addr} in {ns2}: {e}"))
                });
            let listener = match bound {
                Ok(l) => l,
                Err(e) => return tx.send(Err(e)).unwrap(),
            };
            tx.send(Ok(listener.local_addr().unwrap())).unwrap();
            // Non-blocking accept, polled: a wake-up connection would have to come
            // from inside the namespace.
            listener.set_nonblocking(true).unwrap();
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        std::thread::spawn(move || echo_tcp(s));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        let addr = rx
            .recv()
            .unwrap()
            .unwrap_or_else(|e| panic!("starting the TCP echo server: {e}"));
        Self {
            addr,
            stop,
            acceptor: Some(acceptor),
        }
    }
}

fn echo_tcp(s: TcpStream) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(300)));
    let mut buf = vec![0u8; 64 * 1024];
    let mut r = &s;
    let mut w = &s;
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if w.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
}

impl Drop for TcpEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

/// Opens tap `name` of namespace `ns` as the VMM would (`IFF_TAP | IFF_NO_PI |
/// IFF_VNET_HDR`): frames read and written carry a 10-byte virtio-net header. For
/// checking the fixture's plumbing without a VM.
pub fn open_tap(ns: &str, name: &str) -> io::Result<File> {
    let name = name.to_string();
    // /dev/net/tun looks the name up in the namespace of whoever opened it.
    run_in_netns(ns, move || {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        // SAFETY: ifreq is plain data; all zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads and writes the ifreq, which outlives the call.
        if unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(f)
    })
}
