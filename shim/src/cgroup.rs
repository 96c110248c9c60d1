//! The VMM's cgroup: the sandbox's `linux.cgroupsPath`, the cgroup runc would give the
//! pod's sandbox container, under the pod's cgroup (the kubelet's `pod<uid>`, whose
//! limits include the RuntimeClass overhead). The VMM, and so the guest's memory and
//! vCPUs, is charged there, in every mounted hierarchy (cgroup v2, or each v1 one).
//!
//! The shim makes the directories and opens their `cgroup.procs` before the fork; the
//! child writes "0" (itself) to each before exec. The directories are recorded in the
//! pod's directory and removed once the VMM is gone, also by a later `delete`.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "the sandbox's cgroupsPath {path:?} is neither a cgroupfs path (/a/b, no `..`) \
         nor slice:prefix:name (systemd); the runtime that made the spec is misconfigured"
    )]
    BadPath { path: String },
    #[error("the VMM's cgroup {dir}: {what}: {source}")]
    Io {
        dir: PathBuf,
        what: &'static str,
        source: io::Error,
    },
}

/// The VMM's cgroup, one directory per hierarchy.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VmmCgroup {
    pub dirs: Vec<PathBuf>,
}

impl VmmCgroup {
    /// Makes `cgroups_path` (from the sandbox's spec) in every hierarchy of
    /// `mountinfo` (the text of /proc/self/mountinfo).
    pub fn create(cgroups_path: &str, mountinfo: &str) -> Result<VmmCgroup, CgroupError> {
        let relative = relative_path(cgroups_path).ok_or_else(|| CgroupError::BadPath {
            path: cgroups_path.into(),
        })?;
        let mut made = VmmCgroup::default();
        for mount in hierarchies(mountinfo) {
            let dir = mount.join(&relative);
            if let Err(e) = make_dir(&mount, &relative) {
                made.remove();
                return Err(e);
            }
            made.dirs.push(dir);
        }
        Ok(made)
    }

    /// Each directory's `cgroup.procs`, open for writing (close-on-exec).
    pub fn procs_files(&self) -> Result<Vec<File>, CgroupError> {
        self.dirs
            .iter()
            .map(|d| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("cgroup.procs"))
                    .map_err(|source| CgroupError::Io {
                        dir: d.clone(),
                        what: "opening cgroup.procs",
                        source,
                    })
            })
            .collect()
    }

    /// Removes the directories (the VMM must be gone: a cgroup with a process in it
    /// stays busy). Missing ones are fine; returns the ones that could not go.
    pub fn remove(&self) -> Vec<(PathBuf, io::Error)> {
        let mut left = Vec::new();
        for dir in &self.dirs {
            // A killed VMM leaves its cgroup a moment after it is reaped.
            let mut tries = 0;
            loop {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 100 => {
                        tries += 1;
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    Err(e) => {
                        left.push((dir.clone(), e));
                        break;
                    }
                }
            }
        }
        left
    }
}

/// Moves the calling process into the cgroups of `procs` (from
/// [`VmmCgroup::procs_files`]). For a child between fork and exec: only write(2).
pub fn join(procs: &[File]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    for f in procs {
        // SAFETY: write(2) of one byte from a static buffer to an open descriptor.
        if unsafe { libc::write(f.as_raw_fd(), c"0".as_ptr().cast(), 1) } != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The cgroup's path below a hierarchy's root: cgroupfs' `/a/b/c` as it is; systemd's
/// `kubepods-burstable-pod1.slice:cri-containerd:id` as systemd lays it out,
/// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-id.scope`.
/// A relative cgroupfs path (CRI's when the kubelet names no cgroup parent: the bare
/// sandbox id) is taken from the hierarchies' root, as an absolute one.
fn relative_path(cgroups_path: &str) -> Option<PathBuf> {
    if !cgroups_path.contains(':') {
        let rest = cgroups_path.trim_start_matches('/');
        let p = PathBuf::from(rest);
        let plain = p
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        return (plain && !rest.is_empty()).then_some(p);
    }
    let mut parts = cgroups_path.split(':');
    let (slice, prefix, name) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || name.is_empty() || name.contains('/') || slice.contains('/') {
        return None;
    }
    let mut p = PathBuf::new();
    let slice = slice.strip_suffix(".slice").unwrap_or(slice);
    if !slice.is_empty() && slice != "-" {
        // Each dash-separated prefix is a parent slice.
        let mut so_far = String::new();
        for word in slice.split('-') {
            if !so_far.is_empty() {
                so_far.push('-');
            }
            so_far.push_str(word);
            p.push(format!("{so_far}.slice"));
        }
    }
    p.push(if prefix.is_empty() {
        format!("{name}.scope")
    } else {
        format!("{prefix}-{name}.scope")
    });
    Some(p)
}

/// The mount points of the cgroup hierarchies in `mountinfo`.
fn hierarchies(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            matches!(fstype, "cgroup" | "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .collect()
}

/// Makes `mount`/`relative` and its missing parents. A v1 cpuset directory starts with
/// no CPUs and no memory nodes, and takes no process until given some: each new one
/// gets its parent's.
fn make_dir(mount: &Path, relative: &Path) -> Result<(), CgroupError> {
    let mut dir = mount.to_path_buf();
    for part in relative.components() {
        let parent = dir.clone();
        dir.push(part);
        let io_err = |what, source| CgroupError::Io {
            dir: dir.clone(),
            what,
            source,
        };
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err("creating it", e)),
        }
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let mine = dir.join(file);
            if !mine.exists() {
                continue;
            }
            let value = std::fs::read_to_string(parent.join(file))
                .map_err(|e| io_err("reading its parent's cpuset", e))?;
            if !value.trim().is_empty() {
                std::fs::write(&mine, value.trim()).map_err(|e| io_err("setting its cpuset", e))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroupfs_and_systemd_paths() {
        assert_eq!(
            relative_path("/kubepods/burstable/pod1/abc"),
            Some(PathBuf::from("kubepods/burstable/pod1/abc"))
        );
        assert_eq!(
            relative_path("kubepods-burstable-pod1.slice:cri-containerd:abc"),
            Some(PathBuf::from(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/\
                 cri-containerd-abc.scope"
            ))
        );
        assert_eq!(
            relative_path("system.slice:docker:x"),
            Some(PathBuf::from("system.slice/docker-x.scope"))
        );
        assert_eq!(relative_path("abc"), Some(PathBuf::from("abc")));
        for bad in ["", "/", "/a/../b", "a:b", "a:b:c:d", "s.slice:p:"] {
            assert_eq!(relative_path(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn hierarchies_are_the_cgroup_mounts() {
        let mountinfo = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 23 0:40 / /proc rw - proc proc rw";
        assert_eq!(
            hierarchies(mountinfo),
            vec![
                PathBuf::from("/sys/fs/cgroup/cpu"),
                PathBuf::from("/sys/fs/cgroup/unified")
            ]
        );
    }

    /// The real hierarchies: made, joined by a child, removed once it is gone.
    #[test]
    fn a_child_joins_the_cgroup_and_it_goes_after() {
        crate::test_util::require_root("making cgroups");
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let path = format!("/peapod-unit-test/cg-{}", std::process::id());
        let cg = VmmCgroup::create(&path, &mountinfo).unwrap();
        assert!(!cg.dirs.is_empty(), "no cgroup hierarchy is mounted");
        let procs = cg.procs_files().unwrap();
        let mut cmd = std::process::Command::new("cat");
        cmd.arg("/proc/self/cgroup");
        // SAFETY: join only writes to descriptors opened before the fork.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || join(&procs));
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), cg.dirs.len(), "{text}");
        assert!(lines.iter().all(|l| l.ends_with(&path)), "{text}");
        assert!(cg.remove().is_empty());
        assert!(cg.dirs.iter().all(|d| !d.exists()));
        for d in &cg.dirs {
            let _ = std::fs::remove_dir(d.parent().unwrap());
        }
    }
}
