//! What a pod can leave behind on the host, snapshotted before and after a test: shim
//! and VMM processes, mounts, files in the peapod state and data directories, upper
//! disks in containerd's snapshots, shim sockets, and interfaces and tc filters in the
//! test's network namespaces.
//!
//! ```ignore
//! let before = HostState::take(&ctd.host_filter(&[]));
//! // ... run and delete a pod ...
//! assert_no_leftovers(&before);
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Where shims' sockets go (containerd 1.6 puts them there whatever its own state
/// directory is).
pub const SHIM_SOCKET_DIR: &str = "/run/containerd/s";
/// How long teardown (asynchronous after `ctr task delete`) may take to finish.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Process names (comm, or the executable's file name) a pod may leave running.
fn is_pod_process(name: &str) -> bool {
    // comm holds at most 15 bytes: "containerd-shim-peapod-v2" reads "containerd-shim".
    name.starts_with("containerd-shim") || name == crate::containerd::VMM_NAME
}

/// What to look at beyond the host-wide things (processes, mounts, shim sockets).
#[derive(Clone, Debug, Default)]
pub struct HostFilter {
    /// Directories whose every file and socket counts (the peapod state and data
    /// directories).
    pub state_dirs: Vec<PathBuf>,
    /// overlayfs snapshotters' `snapshots` directories: a peapod upper disk in a
    /// snapshot's upperdir (`<id>/fs`) counts, the snapshot itself is containerd's.
    pub snapshot_dirs: Vec<PathBuf>,
    /// Named network namespaces (`ip netns`) whose interfaces, tc filters and ingress
    /// qdiscs count.
    pub netns: Vec<String>,
    /// A shim or VMM process counts only if its command line or environment holds one
    /// of these strings (a private containerd's directory: shims inherit containerd's
    /// environment and get its socket's path), so that other tests' shims and VMMs on
    /// a shared machine do not count; with none, every such process counts. With
    /// markers, a shim socket bound only by processes without one, and a mount under
    /// another containerd's directories (a mount point with an `io.containerd.`
    /// component and no marker), do not count either.
    pub markers: Vec<String>,
    /// A host bridge whose ports count (a CNI bridge: each pod adds a veth).
    pub bridge_ports: Option<String>,
    /// Whether the network namespaces CRI makes (`/run/netns/cni-*`) count.
    pub cri_netns: bool,
}

/// A snapshot of the host, as far as a pod could change it.
#[derive(Clone, Debug)]
pub struct HostState {
    filter: HostFilter,
    /// Shim and VMM processes by pid.
    processes: BTreeMap<i32, PodProcess>,
    mounts: BTreeSet<String>,
    files: BTreeSet<String>,
    sockets: BTreeSet<String>,
    net: BTreeSet<String>,
}

impl HostState {
    pub fn take(filter: &HostFilter) -> Self {
        let mut files = BTreeSet::new();
        for d in &filter.state_dirs {
            walk(d, &mut files);
        }
        files.extend(upper_disks_in(&filter.snapshot_dirs));
        let mut socket_dirs: Vec<PathBuf> = vec![SHIM_SOCKET_DIR.into()];
        socket_dirs.extend(filter.state_dirs.iter().cloned());
        Self {
            filter: filter.clone(),
            processes: pod_processes()
                .into_iter()
                .filter(|(pid, _)| has_marker(*pid, &filter.markers))
                .collect(),
            mounts: std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap()
                .lines()
                .filter(|l| !is_netns_mount(l) && !is_foreign_containerd_mount(l, &filter.markers))
                .map(|l| format!("mount: {l}"))
                .collect(),
            files,
            sockets: sockets_under(&socket_dirs, &filter.markers),
            net: filter
                .netns
                .iter()
                .flat_map(|ns| net_state(ns))
                .chain(filter.bridge_ports.iter().flat_map(|b| bridge_ports(b)))
                .chain(filter.cri_netns.then(cri_netns).into_iter().flatten())
                .collect(),
        }
    }

    /// What is in this snapshot and not in `before`. Teardown is asynchronous: while
    /// the list is not empty, snapshots are taken again for up to [`SETTLE_TIMEOUT`].
    pub fn leaked_since(&self, before: &HostState) -> Vec<String> {
        self.leaked_since_within(before, SETTLE_TIMEOUT)
    }

    pub fn leaked_since_within(&self, before: &HostState, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut now = self.clone();
        loop {
            let leaked = now.diff(before);
            if leaked.is_empty() || Instant::now() > deadline {
                return leaked;
            }
            std::thread::sleep(Duration::from_millis(250));
            now = HostState::take(&self.filter);
        }
    }

    fn diff(&self, before: &HostState) -> Vec<String> {
        let mut out = Vec::new();
        for (pid, p) in &self.processes {
            if before.processes.get(pid) != Some(p) {
                out.push(format!(
                    "process {pid}: {} ({}) started at {}",
                    p.comm, p.exe, p.start_time
                ));
            }
        }
        for set in [
            (&self.mounts, &before.mounts),
            (&self.files, &before.files),
            (&self.sockets, &before.sockets),
            (&self.net, &before.net),
        ] {
            out.extend(set.0.difference(set.1).cloned());
        }
        out
    }

    /// The pids of the shim and VMM processes in this snapshot.
    pub fn process_pids(&self) -> Vec<i32> {
        self.processes.keys().copied().collect()
    }

    /// The pids in this snapshot of processes named `name` (comm, or the executable's
    /// file name); comm is cut to 15 bytes, so a shim is best found by its executable.
    pub fn pids_named(&self, name: &str) -> Vec<i32> {
        self.processes
            .iter()
            .filter(|(_, p)| p.comm == name || p.exe == name)
            .map(|(pid, _)| *pid)
            .collect()
    }
}

/// Takes a snapshot now and panics, listing them, if anything new since `before` is
/// still there after [`SETTLE_TIMEOUT`]; leaked processes are killed after the check,
/// so that one failing test does not litter the machine.
pub fn assert_no_leftovers(before: &HostState) {
    assert_no_leftovers_within(before, SETTLE_TIMEOUT)
}

/// [`assert_no_leftovers`], giving teardown `timeout` to finish.
pub fn assert_no_leftovers_within(before: &HostState, timeout: Duration) {
    let leaked = HostState::take(&before.filter).leaked_since_within(before, timeout);
    if leaked.is_empty() {
        return;
    }
    let pids: Vec<i32> = leaked
        .iter()
        .filter_map(|l| l.strip_prefix("process "))
        .filter_map(|l| l.split(':').next()?.parse().ok())
        .collect();
    kill_stray(&pids);
    panic!(
        "left on the host after the pod was gone (processes now killed):\n  {}",
        leaked.join("\n  ")
    );
}

/// Whether process `pid`'s command line or environment holds one of `markers` (true
/// if there are none).
fn has_marker(pid: i32, markers: &[String]) -> bool {
    if markers.is_empty() {
        return true;
    }
    ["cmdline", "environ"].iter().any(|f| {
        let data = std::fs::read(format!("/proc/{pid}/{f}")).unwrap_or_default();
        let text = String::from_utf8_lossy(&data);
        markers.iter().any(|m| text.contains(m.as_str()))
    })
}

/// A named network namespace's mount (`ip netns add`): the namespaces are the test
/// fixtures' (and other tests' on the same machine), checked by name instead.
fn is_netns_mount(mountinfo_line: &str) -> bool {
    let mut f = mountinfo_line.split(' ');
    let point = f.nth(4).unwrap_or("");
    let fstype = mountinfo_line
        .split_once(" - ")
        .and_then(|(_, r)| r.split(' ').next())
        .unwrap_or("");
    // `ip netns add` also bind-mounts /run/netns onto itself, once.
    point == "/run/netns"
        || (fstype == "nsfs"
            && (point.starts_with("/run/netns/") || point.starts_with("/var/run/netns/")))
}

/// SIGKILLs `pids` (leaked shims or VMMs, after a test has seen them).
pub fn kill_stray(pids: &[i32]) {
    for &pid in pids {
        // SAFETY: kill(2) has no memory-safety preconditions; the pid came from a
        // snapshot of shim and VMM processes.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// A shim or VMM process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodProcess {
    pub comm: String,
    /// The executable's file name.
    pub exe: String,
    /// In clock ticks after boot: tells a reused pid from the process seen before.
    pub start_time: String,
}

/// The processes whose comm or executable's file name is a shim's or the VMM's, now.
pub fn pod_processes() -> BTreeMap<i32, PodProcess> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default();
        if !(is_pod_process(&comm) || is_pod_process(&exe)) {
            continue;
        }
        let start = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                let rest = s[s.rfind(')')? + 2..].to_string();
                rest.split_whitespace().nth(19).map(String::from)
            })
            .unwrap_or_default();
        out.insert(
            pid,
            PodProcess {
                comm,
                exe,
                start_time: start,
            },
        );
    }
    out
}

/// Every path under `dir` (not following links), as "file: <path>".
/// The peapod upper disks in the upperdirs of the snapshots under `dirs`.
fn upper_disks_in(dirs: &[PathBuf]) -> Vec<String> {
    dirs.iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .flatten()
        .map(|snapshot| {
            snapshot
                .path()
                .join("fs")
                .join(peapod_shim::rootfs::UPPER_IN_SNAPSHOT)
        })
        .filter(|disk| disk.exists())
        .map(|disk| format!("upper disk: {}", disk.display()))
        .collect()
}

fn walk(dir: &Path, out: &mut BTreeSet<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        out.insert(format!("file: {}", path.display()));
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&path, out);
        }
    }
}

/// Unix sockets bound under `dirs` (from /proc/net/unix), and socket files in the
/// shim socket directory. With `markers`, a socket bound only by processes without one
/// (another containerd's shims, on a shared machine) does not count.
fn sockets_under(dirs: &[PathBuf], markers: &[String]) -> BTreeSet<String> {
    let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    // inode -> path, for the sockets bound under `dirs`.
    let mut bound = BTreeMap::new();
    for line in table.lines().skip(1) {
        // Num RefCount Protocol Flags Type St Inode [Path]
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        if dirs.iter().any(|d| Path::new(f[7]).starts_with(d)) {
            bound.insert(f[6].to_string(), f[7].to_string());
        }
    }
    let foreign: BTreeSet<String> = if markers.is_empty() {
        BTreeSet::new()
    } else {
        let owners = socket_owners(&bound.keys().cloned().collect());
        bound
            .iter()
            .filter(|(inode, _)| {
                owners
                    .get(*inode)
                    .is_some_and(|pids| !pids.iter().any(|p| has_marker(*p, markers)))
            })
            .map(|(_, path)| path.clone())
            .collect()
    };
    let mut out = BTreeSet::new();
    for path in bound.values() {
        if !foreign.contains(path) {
            out.insert(format!("unix socket (bound): {path}"));
        }
    }
    use std::os::unix::fs::FileTypeExt;
    if let Ok(entries) = std::fs::read_dir(SHIM_SOCKET_DIR) {
        for e in entries.flatten() {
            let path = e.path().to_string_lossy().into_owned();
            if e.file_type().is_ok_and(|t| t.is_socket()) && !foreign.contains(&path) {
                out.insert(format!("unix socket (file): {path}"));
            }
        }
    }
    out
}

/// The pids holding each socket inode of `inodes` open (from /proc/*/fd).
fn socket_owners(inodes: &BTreeSet<String>) -> BTreeMap<String, Vec<i32>> {
    let mut owners: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    if inodes.is_empty() {
        return owners;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return owners;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            if let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
            {
                if inodes.contains(inode) {
                    owners.entry(inode.to_string()).or_default().push(pid);
                }
            }
        }
    }
    owners
}

/// A mount of another containerd (its snapshots, its containers' rootfs) on a shared
/// machine: a mount point with an `io.containerd.` component and none of `markers`.
fn is_foreign_containerd_mount(mountinfo_line: &str, markers: &[String]) -> bool {
    let point = mountinfo_line.split(' ').nth(4).unwrap_or("");
    !markers.is_empty()
        && point.contains("/io.containerd.")
        && !markers.iter().any(|m| point.contains(m.as_str()))
}

fn output_of(args: &[&str]) -> String {
    match Command::new(args[0]).args(&args[1..]).output() {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(e) => panic!("cannot run {args:?}: {e}"),
    }
}

/// The interfaces of namespace `ns`, and the tc filters and ingress/clsact qdiscs on
/// each. Nothing if the namespace is gone.
fn net_state(ns: &str) -> Vec<String> {
    let mut out = Vec::new();
    // `ip -o link` lines read "<index>: <name>[@peer]: <flags> ...".
    let links = output_of(&["ip", "-n", ns, "-o", "link", "show"]);
    for line in links.lines() {
        let Some(name) = line.split(": ").nth(1).and_then(|n| n.split('@').next()) else {
            continue;
        };
        out.push(format!("netns {ns}: interface {name}"));
        for f in output_of(&["tc", "-n", ns, "filter", "show", "dev", name, "ingress"]).lines() {
            out.push(format!("netns {ns}: {name} ingress filter: {}", f.trim()));
        }
        for q in output_of(&["tc", "-n", ns, "qdisc", "show", "dev", name]).lines() {
            if q.contains("ingress") || q.contains("clsact") {
                out.push(format!("netns {ns}: {name} qdisc: {}", q.trim()));
            }
        }
    }
    out
}

/// The host interfaces enslaved to `bridge`.
fn bridge_ports(bridge: &str) -> Vec<String> {
    output_of(&["ip", "-o", "link", "show", "master", bridge])
        .lines()
        .filter_map(|l| l.split(": ").nth(1)?.split('@').next().map(String::from))
        .map(|port| format!("bridge {bridge}: port {port}"))
        .collect()
}

/// The network namespaces CRI has made (`/run/netns/cni-<uuid>`).
fn cri_netns() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .filter(|n| n.starts_with("cni-"))
        .map(|n| format!("network namespace /run/netns/{n}"))
        .collect()
}

/// The interfaces of namespace `ns` (their names), for a test's own checks.
pub fn netns_links(ns: &str) -> Vec<String> {
    net_state(ns)
        .into_iter()
        .filter_map(|l| {
            l.split_once(": interface ")
                .map(|(_, name)| name.to_string())
        })
        .collect()
}

/// The tc filters on `dev`'s ingress in namespace `ns`.
pub fn ingress_filters(ns: &str, dev: &str) -> Vec<String> {
    output_of(&["tc", "-n", ns, "filter", "show", "dev", dev, "ingress"])
        .lines()
        .map(String::from)
        .collect()
}
