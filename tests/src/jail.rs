//! What a jailed VMM looks like from the host: /proc/<pid>/status, limits, root and
//! mount namespace.

use std::path::Path;

/// What the jail's root holds, and nothing else.
pub const JAIL_ROOT: &[&str] = &["dev", "initrd", "peapod-vmm", "run", "vmlinux"];

fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(':')))
        .unwrap_or_else(|| panic!("no {key} in /proc status:\n{status}"))
        .trim()
        .to_owned()
}

/// Panics unless process `pid` runs jailed: a non-root uid and gid of its own, no
/// supplementary groups, no capabilities at all, `no_new_privs`, rlimits on open files,
/// threads, address space and core dumps, another mount namespace, and a root holding
/// only [`JAIL_ROOT`]: none of `hidden` (host paths that exist) is visible.
pub fn assert_jailed(pid: i32, hidden: &[&Path]) {
    let proc = Path::new("/proc").join(pid.to_string());
    let status = std::fs::read_to_string(proc.join("status")).unwrap();
    for key in ["Uid", "Gid"] {
        let ids: Vec<u32> = status_field(&status, key)
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        assert!(
            ids.len() == 4 && ids.iter().all(|&id| id == ids[0] && id != 0),
            "{key} of the VMM {pid}: {ids:?}: real, effective, saved and fs ids must be one \
             non-root id"
        );
    }
    assert_eq!(status_field(&status, "Groups"), "", "supplementary groups");
    for key in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            status_field(&status, key),
            "0000000000000000",
            "{key} of the VMM {pid}"
        );
    }
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");

    let limits = std::fs::read_to_string(proc.join("limits")).unwrap();
    for name in [
        "Max open files",
        "Max processes",
        "Max address space",
        "Max core file size",
    ] {
        let line = limits
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in the VMM's limits:\n{limits}"));
        assert!(
            !line.contains("unlimited"),
            "the VMM {pid} has no limit on {name}: {line}"
        );
    }

    let ns = |p: &Path| std::fs::read_link(p.join("ns/mnt")).unwrap();
    assert_ne!(
        ns(&proc),
        ns(Path::new("/proc/self")),
        "the VMM {pid} shares the host's mount namespace"
    );
    let root = proc.join("root");
    let mut entries: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(entries, JAIL_ROOT, "the VMM {pid}'s root");
    for path in hidden {
        assert!(path.exists(), "{} is not on the host", path.display());
        let inside = root.join(path.strip_prefix("/").unwrap_or(path));
        assert!(
            !inside.exists(),
            "the VMM {pid} sees the host's {}",
            path.display()
        );
    }
}

/// The cgroup process `pid` is in, the same in every hierarchy (as the shim puts a
/// VMM); panics if it is the root cgroup or the hierarchies disagree.
pub fn cgroup_of(pid: i32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let paths: Vec<&str> = text
        .lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .collect();
    assert!(
        !paths.is_empty() && paths.iter().all(|p| *p == paths[0] && *p != "/"),
        "process {pid} is not in one cgroup of its own in every hierarchy:\n{text}"
    );
    paths[0].to_owned()
}

/// Panics if cgroup `path` is still in any hierarchy mounted under /sys/fs/cgroup.
pub fn assert_cgroup_gone(path: &str) {
    let relative = path.trim_start_matches('/');
    let base = Path::new("/sys/fs/cgroup");
    let mut candidates = vec![base.join(relative)];
    for e in std::fs::read_dir(base).unwrap().flatten() {
        candidates.push(e.path().join(relative));
    }
    let left: Vec<_> = candidates.iter().filter(|c| c.is_dir()).collect();
    assert!(left.is_empty(), "the VMM's cgroup is left: {left:?}");
}
