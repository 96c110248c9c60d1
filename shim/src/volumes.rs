//! Bundle-level OCI mounts: a bind of a host file or directory (ConfigMap, Secret,
//! projected and downward-API volumes, the pod's /etc/hosts, resolv.conf, hostname,
//! an emptyDir's directory) is copied into the guest through the agent, under its
//! shared directory, and the mount's source is rewritten to that copy. Containers of
//! one pod binding the same host path share one copy (an emptyDir lives in the guest).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use oci_spec::runtime::Mount;
use peapod_agent_protocol::{AgentClient, CopyFileRequest};

use crate::agent::ctx;
use crate::spec::OciSpec;

/// Where the agent keeps copied files (its CopyFile paths are relative to this).
pub const GUEST_SHARED_DIR: &str = "/run/peapod/shared";
/// The largest chunk of a file one CopyFile carries.
const CHUNK: usize = 1 << 20;
/// The most a copied volume may hold: bigger ones belong on a block volume.
const MAX_VOLUME_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("container {id}: mount {destination}: {source_path}: {cause}")]
    Source {
        id: String,
        destination: String,
        source_path: String,
        cause: String,
    },
    #[error("container {id}: copying {path} into the guest: {cause}")]
    Copy {
        id: String,
        path: String,
        cause: String,
    },
}

/// One host path to copy: the mount's index and where it goes in the guest.
#[derive(Debug, Clone, PartialEq)]
pub struct Copy {
    pub host: PathBuf,
    /// Relative to [`GUEST_SHARED_DIR`].
    pub guest: String,
}

fn is_bind(mount: &Mount) -> bool {
    mount.typ().as_deref() == Some("bind")
        || mount
            .options()
            .iter()
            .flatten()
            .any(|o| o == "bind" || o == "rbind")
}

/// Rewrites the spec's bind mounts of host files and directories to guest copies and
/// lists what to copy. Binds of host devices, sockets or /proc and /sys are refused:
/// the guest has its own.
pub fn plan(spec: &mut OciSpec, id: &str) -> Result<Vec<Copy>, VolumeError> {
    let mut copies: Vec<Copy> = Vec::new();
    let mut rewrites = Vec::new();
    for (index, m) in spec.mounts().iter().enumerate() {
        if !is_bind(m) {
            continue;
        }
        let source = m
            .source()
            .as_ref()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let destination = m.destination().display().to_string();
        let fail = |cause: String| VolumeError::Source {
            id: id.into(),
            destination: destination.clone(),
            source_path: source.clone(),
            cause,
        };
        let meta = std::fs::metadata(&source)
            .map_err(|e| fail(format!("{e} (the bind source must exist on the node)")))?;
        if !(meta.is_file() || meta.is_dir()) {
            return Err(fail(
                "only files and directories can be bound into a VM pod (a device or socket \
                 of the node is not reachable from the guest)"
                    .into(),
            ));
        }
        for host_only in ["/proc", "/sys", "/dev"] {
            if Path::new(&source).starts_with(host_only) {
                return Err(fail(format!(
                    "{host_only} of the node cannot be bound into a VM pod: the guest has \
                     its own"
                )));
            }
        }
        let guest = guest_name(Path::new(&source));
        rewrites.push((index, format!("{GUEST_SHARED_DIR}/{guest}")));
        if !copies.iter().any(|c| c.guest == guest) {
            copies.push(Copy {
                host: source.into(),
                guest,
            });
        }
    }
    for (index, source) in rewrites {
        spec.set_mount_source(index, &source);
    }
    Ok(copies)
}

/// A stable guest name for a host path: its file name (readable in the guest) and a
/// hash of the whole path (unique).
fn guest_name(host: &Path) -> String {
    let mut h = DefaultHasher::new();
    host.hash(&mut h);
    let base: String = host
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c))
        .take(40)
        .collect();
    format!("{:016x}-{}", h.finish(), base.trim_start_matches('.'))
}

/// Copies one host file or directory tree into the guest.
pub async fn copy_in(agent: &AgentClient, id: &str, c: &Copy) -> Result<(), VolumeError> {
    let fail = |path: &Path, cause: String| VolumeError::Copy {
        id: id.into(),
        path: path.display().to_string(),
        cause,
    };
    let host = c.host.clone();
    let entries = tokio::task::spawn_blocking(move || walk(&host))
        .await
        .map_err(|e| fail(&c.host, e.to_string()))?
        .map_err(|e| fail(&c.host, e.to_string()))?;
    let total: u64 = entries.iter().map(|e| e.len).sum();
    if total > MAX_VOLUME_BYTES {
        return Err(fail(
            &c.host,
            format!(
                "{total} bytes, more than the {MAX_VOLUME_BYTES} a copied volume may hold \
                 (use a block volume)"
            ),
        ));
    }
    for e in entries {
        let guest = if e.rel.as_os_str().is_empty() {
            c.guest.clone()
        } else {
            format!("{}/{}", c.guest, e.rel.display())
        };
        let mut req = CopyFileRequest {
            path: guest,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            dir: e.kind == Kind::Dir,
            ..Default::default()
        };
        match e.kind {
            Kind::Dir => send(agent, &req).await.map_err(|m| fail(&e.host, m))?,
            Kind::Symlink(target) => {
                req.symlink_target = target;
                send(agent, &req).await.map_err(|m| fail(&e.host, m))?;
            }
            Kind::File => {
                let data = tokio::fs::read(&e.host)
                    .await
                    .map_err(|err| fail(&e.host, err.to_string()))?;
                let mut offset = 0usize;
                loop {
                    let end = (offset + CHUNK).min(data.len());
                    req.data = data[offset..end].to_vec();
                    req.offset = offset as u64;
                    send(agent, &req).await.map_err(|m| fail(&e.host, m))?;
                    offset = end;
                    if offset >= data.len() {
                        break;
                    }
                }
            }
        }
    }
    Ok(())
}

async fn send(agent: &AgentClient, req: &CopyFileRequest) -> Result<(), String> {
    agent
        .copy_file(ctx(Duration::from_secs(30)), req)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    File,
    Dir,
    Symlink(String),
}

#[derive(Debug)]
struct Entry {
    host: PathBuf,
    /// Relative to the copied root ("" for the root).
    rel: PathBuf,
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    len: u64,
}

/// The tree under `root`, parents before children. Symlinks are copied as symlinks
/// (Kubernetes' atomic-writer volumes are made of them).
fn walk(root: &Path) -> io::Result<Vec<Entry>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let host = if rel.as_os_str().is_empty() {
            root.to_path_buf()
        } else {
            root.join(&rel)
        };
        // The root itself is followed (it is the mount's source); below it, not.
        let meta = if rel.as_os_str().is_empty() {
            std::fs::metadata(&host)?
        } else {
            std::fs::symlink_metadata(&host)?
        };
        let kind = if meta.file_type().is_symlink() {
            Kind::Symlink(std::fs::read_link(&host)?.to_string_lossy().into_owned())
        } else if meta.is_dir() {
            Kind::Dir
        } else if meta.is_file() {
            Kind::File
        } else {
            continue;
        };
        if kind == Kind::Dir {
            let mut children: Vec<_> = std::fs::read_dir(&host)?
                .map(|e| e.map(|e| rel.join(e.file_name())))
                .collect::<io::Result<_>>()?;
            children.sort();
            children.reverse();
            stack.extend(children);
        }
        out.push(Entry {
            len: if kind == Kind::File { meta.len() } else { 0 },
            host,
            rel,
            kind,
            mode: meta.permissions().mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> OciSpec {
        OciSpec::from_json(v).unwrap()
    }

    #[test]
    fn binds_of_files_are_rewritten_and_listed_once() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        let mut oci = spec(json!({"mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": hosts, "options": ["rbind", "ro"]},
            {"destination": "/etc/hosts2", "source": hosts, "options": ["bind"]},
        ]}));
        let copies = plan(&mut oci, "c1").unwrap();
        let spec = oci.json();
        assert_eq!(copies.len(), 1);
        assert_eq!(copies[0].host, hosts);
        let src = spec["mounts"][1]["source"].as_str().unwrap();
        assert!(
            src.starts_with("/run/peapod/shared/") && src.ends_with("-hosts"),
            "{src}"
        );
        assert_eq!(spec["mounts"][2]["source"], spec["mounts"][1]["source"]);
        assert_eq!(spec["mounts"][0]["source"], "proc");
    }

    #[test]
    fn host_devices_and_missing_sources_are_refused_by_name() {
        let mut spec = spec(json!({"mounts": [
            {"destination": "/x", "type": "bind", "source": "/nonexistent/peapod"},
        ]}));
        let e = plan(&mut spec, "c1").unwrap_err().to_string();
        assert!(
            e.contains("c1") && e.contains("/x") && e.contains("/nonexistent/peapod"),
            "{e}"
        );
        let mut spec = self::spec(json!({"mounts": [
            {"destination": "/dev/null2", "type": "bind", "source": "/dev/null"},
        ]}));
        let e = plan(&mut spec, "c1").unwrap_err().to_string();
        assert!(e.contains("/dev/null") && e.contains("device"), "{e}");
    }

    #[test]
    fn a_tree_is_walked_parents_first_with_symlinks_kept() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("vol");
        std::fs::create_dir_all(root.join("..data")).unwrap();
        std::fs::write(root.join("..data/key"), "v").unwrap();
        std::os::unix::fs::symlink("..data/key", root.join("key")).unwrap();
        let entries = walk(&root).unwrap();
        let rels: Vec<_> = entries
            .iter()
            .map(|e| e.rel.display().to_string())
            .collect();
        assert_eq!(rels, ["", "..data", "..data/key", "key"]);
        assert_eq!(entries[3].kind, Kind::Symlink("..data/key".into()));
        assert_eq!(entries[2].len, 1);
    }
}
