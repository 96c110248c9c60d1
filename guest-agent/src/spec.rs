//! Turning the OCI spec the host sends into the one the guest runs.
//!
//! The host writes the spec for a host: its root, namespace paths, cgroup path and
//! hooks name host objects. Inside the VM the agent owns all of those, so it
//! rewrites them, and drops the labels of the node's LSM (the guest has none);
//! everything else (process, mounts, capabilities, seccomp, rlimits, resources)
//! passes through to libcontainer unchanged.

use std::collections::BTreeMap;
use std::path::Path;

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxSeccomp, LinuxSeccompAction};
use serde_json::{json, Value};

use crate::beneath::Beneath;

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("container {id}: the OCI spec is not valid JSON: {cause} (send config.json's bytes as the host's runtime would write them)")]
    NotJson { id: String, cause: String },
    #[error("container {id}: the OCI spec is malformed: {cause}")]
    Malformed { id: String, cause: String },
    #[error("container {id}: the OCI process is malformed: {cause}")]
    BadProcess { id: String, cause: String },
    #[error("container {id}: mount {destination}: bind source {bind_source} does not exist in the guest (copy it in with CopyFile, under the shared directory, and name that path)")]
    MissingBindSource {
        id: String,
        destination: String,
        bind_source: String,
    },
    #[error("container {id}: the spec asks to join a {kind} namespace by path, but the pod has no sandbox container to share it (create the sandbox container first)")]
    NoSandboxToJoin { id: String, kind: String },
    #[error("container {id}: user {user:?} is not in the container's /etc/passwd (use a numeric uid, or add the user to the image)")]
    UnknownUser { id: String, user: String },
    #[error("container {id}: its seccomp profile hands calls to a seccomp agent (SCMP_ACT_NOTIFY), and a VM pod's guest has none (use SCMP_ACT_ERRNO or another action, or run the pod with runc)")]
    SeccompNotify { id: String },
}

/// What the agent decides about a container, which the spec must reflect.
pub struct GuestContext<'a> {
    pub container_id: &'a str,
    /// The overlay the agent mounted for this container.
    pub rootfs: &'a Path,
    /// The cgroup (relative to the cgroup2 root) the agent gives the container.
    pub cgroup_path: &'a str,
    pub terminal: bool,
    /// The sandbox container's init, whose IPC/UTS/PID namespaces a container that
    /// names namespaces by path joins.
    pub sandbox_pid: Option<i32>,
}

/// Namespaces a pod shares through its sandbox container (k8s shares IPC and UTS
/// always, PID with `shareProcessNamespace`).
const SHARED_KINDS: &[&str] = &["ipc", "uts", "pid"];
/// More of an image's /etc/passwd than a username lookup ever needs.
const MAX_PASSWD_BYTES: u64 = 4 << 20;

/// A container's spec as the guest runs it.
#[derive(Debug)]
pub struct GuestSpec {
    /// What goes to the bundle's config.json.
    pub json: Value,
    /// Its seccomp profile, which the agent also gives the container's execs
    /// (libcontainer does not: see seccomp.rs).
    pub seccomp: Option<LinuxSeccomp>,
    /// The spec's `net.*` sysctls, taken out of it: they belong to the pod's network,
    /// which is the guest's own, and the agent writes them there (see
    /// [`take_network_sysctls`]).
    pub network_sysctls: BTreeMap<String, String>,
    /// The spec's device rules (`linux.resources.devices`), which libcontainer
    /// leaves to the agent (see devices.rs).
    pub device_rules: Vec<LinuxDeviceCgroup>,
}

/// Parses and rewrites a container's spec for the guest.
pub fn guest_spec(raw: &[u8], ctx: &GuestContext) -> Result<GuestSpec, SpecError> {
    let id = ctx.container_id.to_owned();
    let mut spec: Value = serde_json::from_slice(raw).map_err(|e| SpecError::NotJson {
        id: id.clone(),
        cause: e.to_string(),
    })?;
    // Typed parse first: a field of the wrong type is reported here, by name,
    // rather than as a failure somewhere inside container creation.
    let typed = serde_json::from_value::<oci_spec::runtime::Spec>(spec.clone()).map_err(|e| {
        SpecError::Malformed {
            id: id.clone(),
            cause: e.to_string(),
        }
    })?;
    let seccomp = typed.linux().as_ref().and_then(|l| l.seccomp().clone());
    let device_rules = typed
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.devices().clone())
        .unwrap_or_default();
    if seccomp.as_ref().is_some_and(notifies) {
        return Err(SpecError::SeccompNotify { id });
    }
    let obj = spec.as_object_mut().ok_or_else(|| SpecError::Malformed {
        id: id.clone(),
        cause: "not a JSON object".into(),
    })?;
    if !obj.get("process").is_some_and(Value::is_object) {
        return Err(SpecError::Malformed {
            id,
            cause: "no \"process\": a container needs a process to run".into(),
        });
    }

    let readonly = obj
        .get("root")
        .and_then(|r| r.get("readonly"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    obj.insert(
        "root".into(),
        json!({ "path": ctx.rootfs, "readonly": readonly }),
    );
    // Host hooks name host binaries; the guest has none of them.
    obj.remove("hooks");
    let mount_label = obj
        .get_mut("linux")
        .and_then(Value::as_object_mut)
        .and_then(|l| l.remove("mountLabel"));
    rewrite_process(
        &mut obj["process"],
        ctx.terminal,
        mount_label,
        ctx.rootfs,
        &id,
    )?;

    for m in obj
        .get("mounts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        check_bind_source(m, &id)?;
    }

    let linux = obj
        .entry("linux")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or_else(|| SpecError::Malformed {
            id: id.clone(),
            cause: "\"linux\" is not an object".into(),
        })?;
    linux.insert("cgroupsPath".into(), Value::String(ctx.cgroup_path.into()));
    if let Some(namespaces) = linux.get_mut("namespaces").and_then(Value::as_array_mut) {
        rewrite_namespaces(namespaces, ctx)?;
    }
    let network_sysctls = take_network_sysctls(linux);
    Ok(GuestSpec {
        json: spec,
        seccomp,
        network_sysctls,
        device_rules,
    })
}

/// Takes the `net.*` sysctls out of a spec's `linux` section. On a node they are set in
/// the pod's network namespace, which the sandbox container creates: containerd 2.x
/// gives every pod's sandbox `net.ipv4.ip_unprivileged_port_start` and
/// `net.ipv4.ping_group_range`, and a pod's `securityContext.sysctls` land there too.
/// In the guest the pod's network is the guest's own (the network namespace is dropped
/// from the spec), so libcontainer would refuse them ("not allowed in host network
/// namespace"); the agent writes them to the guest's network instead, which is what
/// they mean. The rest (`kernel.shm*`, `fs.mqueue.*`...) stay, for the container's own
/// IPC namespace.
fn take_network_sysctls(linux: &mut serde_json::Map<String, Value>) -> BTreeMap<String, String> {
    let Some(sysctl) = linux.get_mut("sysctl").and_then(Value::as_object_mut) else {
        return BTreeMap::new();
    };
    let names: Vec<String> = sysctl
        .keys()
        .filter(|name| name.starts_with("net.") || name.starts_with("net/"))
        .cloned()
        .collect();
    names
        .into_iter()
        .filter_map(|name| {
            let value = sysctl.remove(&name)?;
            // The typed parse has checked that every value is a string.
            Some((name, value.as_str().unwrap_or_default().to_owned()))
        })
        .collect()
}

/// Whether `profile` hands calls to a seccomp agent (SCMP_ACT_NOTIFY), which a VM
/// pod's guest does not have: such a container is refused rather than run
/// unfiltered.
fn notifies(profile: &LinuxSeccomp) -> bool {
    profile.default_action() == LinuxSeccompAction::ScmpActNotify
        || profile
            .syscalls()
            .iter()
            .flatten()
            .any(|s| s.action() == LinuxSeccompAction::ScmpActNotify)
}

/// An exec's process: validated like a spec's, with the same user resolution.
pub fn guest_process(
    raw: &[u8],
    container_id: &str,
    rootfs: &Path,
    terminal: bool,
) -> Result<Value, SpecError> {
    let bad = |cause: String| SpecError::BadProcess {
        id: container_id.to_owned(),
        cause,
    };
    let mut process: Value = serde_json::from_slice(raw).map_err(|e| bad(e.to_string()))?;
    serde_json::from_value::<oci_spec::runtime::Process>(process.clone())
        .map_err(|e| bad(e.to_string()))?;
    if process
        .get("args")
        .and_then(Value::as_array)
        .is_none_or(Vec::is_empty)
    {
        return Err(bad("\"args\" is missing or empty".into()));
    }
    rewrite_process(&mut process, terminal, None, rootfs, container_id)?;
    Ok(process)
}

/// What the guest changes in a process, a container's own or an exec's: its
/// terminal is the agent's to decide, a false `noNewPrivileges` is left out, the
/// node's LSM labels are dropped (with the spec's mount label, if any), and a
/// username becomes the container's uid and gid.
fn rewrite_process(
    process: &mut Value,
    terminal: bool,
    mount_label: Option<Value>,
    rootfs: &Path,
    id: &str,
) -> Result<(), SpecError> {
    process["terminal"] = Value::Bool(terminal);
    normalise_no_new_privileges(process);
    drop_lsm_labels(process, mount_label, id);
    resolve_user(process, rootfs, id)
}

/// `"noNewPrivileges": false` means what its absence means, but libcontainer 0.7
/// tests only for presence when it orders seccomp: with an explicit false it installs
/// the filter after dropping capabilities and without no_new_privs, which the kernel
/// refuses (runc installs it before the drop). containerd omits a false value; other
/// runtimes' specs may not.
fn normalise_no_new_privileges(process: &mut Value) {
    if let Some(p) = process.as_object_mut() {
        if p.get("noNewPrivileges") == Some(&Value::Bool(false)) {
            p.remove("noNewPrivileges");
        }
    }
}

/// The labels a node's runtime puts in a spec for the node's own LSM: containerd's
/// CRI gives every non-privileged container `process.apparmorProfile` on AppArmor
/// nodes, and `process.selinuxLabel` and `linux.mountLabel` on SELinux nodes. The
/// guest kernel has neither LSM (the VM, not a label, is the pod's boundary), and
/// libcontainer refuses a profile it cannot apply and puts a mount label into mount
/// options the kernel then rejects: the labels are dropped, and that is said once.
fn drop_lsm_labels(process: &mut Value, mount_label: Option<Value>, id: &str) {
    let mut dropped: Vec<String> = Vec::new();
    if let Some(process) = process.as_object_mut() {
        for key in ["apparmorProfile", "selinuxLabel"] {
            if let Some(label) = process.remove(key) {
                dropped.push(format!("process.{key} {label}"));
            }
        }
    }
    if let Some(label) = mount_label {
        dropped.push(format!("linux.mountLabel {label}"));
    }
    static SAID: std::sync::Once = std::sync::Once::new();
    if !dropped.is_empty() {
        SAID.call_once(|| {
            log::debug!(
                "container {id}: the guest has no AppArmor or SELinux, so the spec's {} \
                 is not applied (nor are later containers' labels; this is said once)",
                dropped.join(", ")
            );
        });
    }
}

/// The pod's network is the guest's own (eth0 is configured by CreateSandbox), so
/// a network namespace is dropped; host paths of shared namespaces become the
/// sandbox container's.
fn rewrite_namespaces(namespaces: &mut Vec<Value>, ctx: &GuestContext) -> Result<(), SpecError> {
    namespaces.retain(|ns| ns.get("type").and_then(Value::as_str) != Some("network"));
    for ns in namespaces.iter_mut() {
        let Some(kind) = ns.get("type").and_then(Value::as_str).map(str::to_owned) else {
            continue;
        };
        let Some(obj) = ns.as_object_mut() else {
            continue;
        };
        if obj
            .get("path")
            .and_then(Value::as_str)
            .unwrap_or("")
            .is_empty()
        {
            continue;
        }
        match (SHARED_KINDS.contains(&kind.as_str()), ctx.sandbox_pid) {
            (true, Some(pid)) => {
                obj.insert("path".into(), json!(format!("/proc/{pid}/ns/{kind}")));
            }
            (true, None) => {
                return Err(SpecError::NoSandboxToJoin {
                    id: ctx.container_id.into(),
                    kind,
                })
            }
            // A host path of any other kind means nothing here: a new one.
            (false, _) => {
                obj.remove("path");
            }
        }
    }
    Ok(())
}

fn check_bind_source(mount: &Value, id: &str) -> Result<(), SpecError> {
    let is_bind = mount.get("type").and_then(Value::as_str) == Some("bind")
        || mount
            .get("options")
            .and_then(Value::as_array)
            .is_some_and(|o| o.iter().any(|v| v == "bind" || v == "rbind"));
    let source = mount.get("source").and_then(Value::as_str).unwrap_or("");
    if is_bind && !Path::new(source).exists() {
        return Err(SpecError::MissingBindSource {
            id: id.into(),
            destination: mount
                .get("destination")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .into(),
            bind_source: source.into(),
        });
    }
    Ok(())
}

/// OCI carries a numeric uid/gid on Linux; a `username` (which the host's
/// runtime resolves for images it can read) is looked up in the container's own
/// /etc/passwd, because only the guest can read that.
fn resolve_user(process: &mut Value, rootfs: &Path, id: &str) -> Result<(), SpecError> {
    let Some(user) = process.get_mut("user").and_then(Value::as_object_mut) else {
        return Ok(());
    };
    let Some(name) = user
        .get("username")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
    else {
        return Ok(());
    };
    // The image, and for an exec the running container, owns this file: it is read
    // in the container's root, so a symlink to a guest file or /dev/zero is harmless.
    let passwd = Beneath::open(rootfs)
        .and_then(|root| root.read_in_root(Path::new("etc/passwd"), MAX_PASSWD_BYTES))
        .unwrap_or_default();
    let passwd = String::from_utf8_lossy(&passwd);
    let (uid, gid) = lookup_passwd(&passwd, &name).ok_or_else(|| SpecError::UnknownUser {
        id: id.into(),
        user: name,
    })?;
    user.insert("uid".into(), json!(uid));
    user.insert("gid".into(), json!(gid));
    user.remove("username");
    Ok(())
}

fn lookup_passwd(passwd: &str, name: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 4 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base_spec() -> Value {
        json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs", "readonly": true},
            "hooks": {"prestart": [{"path": "/usr/bin/host-hook"}]},
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
            "linux": {
                "cgroupsPath": "kubepods-besteffort.slice:cri-containerd:abc",
                "namespaces": [
                    {"type": "pid"},
                    {"type": "network", "path": "/var/run/netns/cni-1234"},
                    {"type": "ipc", "path": "/proc/4242/ns/ipc"},
                    {"type": "uts", "path": "/proc/4242/ns/uts"},
                    {"type": "mount"}
                ]
            }
        })
    }

    fn ctx<'a>(rootfs: &'a Path, sandbox_pid: Option<i32>) -> GuestContext<'a> {
        GuestContext {
            container_id: "c1",
            rootfs,
            cgroup_path: "/peapod/c1",
            terminal: true,
            sandbox_pid,
        }
    }

    #[test]
    fn network_sysctls_go_to_the_guest_and_the_rest_stay() {
        let mut spec = base_spec();
        // What containerd 2.x puts on every sandbox, plus an IPC one.
        spec["linux"]["sysctl"] = json!({
            "net.ipv4.ip_unprivileged_port_start": "0",
            "net.ipv4.ping_group_range": "0 2147483647",
            "kernel.shm_rmid_forced": "1"
        });
        let raw = serde_json::to_vec(&spec).unwrap();
        let spec = guest_spec(&raw, &ctx(Path::new("/r"), Some(7))).unwrap();
        assert_eq!(
            spec.network_sysctls,
            BTreeMap::from([
                ("net.ipv4.ip_unprivileged_port_start".into(), "0".into()),
                ("net.ipv4.ping_group_range".into(), "0 2147483647".into()),
            ])
        );
        assert_eq!(
            spec.json["linux"]["sysctl"],
            json!({"kernel.shm_rmid_forced": "1"})
        );
        let none = guest_spec(
            &serde_json::to_vec(&base_spec()).unwrap(),
            &ctx(Path::new("/r"), Some(7)),
        )
        .unwrap();
        assert!(none.network_sysctls.is_empty());
    }

    #[test]
    fn host_objects_become_guest_ones() {
        let raw = serde_json::to_vec(&base_spec()).unwrap();
        let root = Path::new("/run/peapod/containers/c1/rootfs");
        let spec = guest_spec(&raw, &ctx(root, Some(7))).unwrap().json;
        assert_eq!(spec["root"]["path"], json!(root));
        assert_eq!(spec["root"]["readonly"], json!(true));
        assert!(spec.get("hooks").is_none());
        assert_eq!(spec["process"]["terminal"], json!(true));
        assert_eq!(spec["linux"]["cgroupsPath"], json!("/peapod/c1"));
        let ns = spec["linux"]["namespaces"].as_array().unwrap();
        assert!(!ns.iter().any(|n| n["type"] == "network"));
        let ipc = ns.iter().find(|n| n["type"] == "ipc").unwrap();
        assert_eq!(ipc["path"], json!("/proc/7/ns/ipc"));
        let pid = ns.iter().find(|n| n["type"] == "pid").unwrap();
        assert!(pid.get("path").is_none());
    }

    /// `base_spec` with `profile` as its `linux.seccomp`, through `guest_spec`.
    fn with_profile(profile: Value) -> Result<GuestSpec, SpecError> {
        let mut spec = base_spec();
        spec["linux"]["seccomp"] = profile;
        guest_spec(
            &serde_json::to_vec(&spec).unwrap(),
            &ctx(Path::new("/r"), Some(7)),
        )
    }

    #[test]
    fn a_spec_without_a_profile_has_none() {
        let raw = serde_json::to_vec(&base_spec()).unwrap();
        let spec = guest_spec(&raw, &ctx(Path::new("/r"), Some(7))).unwrap();
        assert!(spec.seccomp.is_none());
        assert!(with_profile(Value::Null).unwrap().seccomp.is_none());
    }

    #[test]
    fn a_profile_is_read_with_its_rules() {
        let spec = with_profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["chmod", "fchmodat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
        }))
        .unwrap();
        let p = spec.seccomp.expect("a profile");
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActAllow);
        assert_eq!(p.syscalls().as_ref().map(Vec::len), Some(1));
        assert_eq!(
            spec.json["linux"]["seccomp"]["defaultAction"],
            "SCMP_ACT_ALLOW"
        );
    }

    #[test]
    fn a_profile_that_needs_a_seccomp_agent_is_refused_by_name() {
        let e = with_profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "listenerPath": "/run/seccomp-agent.sock",
            "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]
        }))
        .expect_err("refused")
        .to_string();
        assert!(e.contains("c1") && e.contains("SCMP_ACT_NOTIFY"), "{e}");
    }

    #[test]
    fn a_malformed_profile_is_refused_by_name() {
        let e = with_profile(json!({"defaultAction": "SCMP_ACT_SOMETIMES"})).expect_err("refused");
        assert!(matches!(e, SpecError::Malformed { .. }), "{e}");
        let e = e.to_string();
        assert!(e.contains("c1") && e.contains("SCMP_ACT_SOMETIMES"), "{e}");
    }

    #[test]
    fn lsm_labels_are_dropped_from_specs_and_execs() {
        // What containerd's CRI sends on an AppArmor node, and on an SELinux node.
        let mut spec = base_spec();
        spec["process"]["apparmorProfile"] = json!("cri-containerd.apparmor.d");
        spec["process"]["selinuxLabel"] = json!("system_u:system_r:container_t:s0:c4,c5");
        spec["linux"]["mountLabel"] = json!("system_u:object_r:container_file_t:s0:c4,c5");
        let raw = serde_json::to_vec(&spec).unwrap();
        let spec = guest_spec(&raw, &ctx(Path::new("/r"), Some(7)))
            .unwrap()
            .json;
        assert!(spec["process"].get("apparmorProfile").is_none(), "{spec}");
        assert!(spec["process"].get("selinuxLabel").is_none(), "{spec}");
        assert!(spec["linux"].get("mountLabel").is_none(), "{spec}");
        assert_eq!(spec["process"]["args"], json!(["sh"]), "the rest stays");
        let p = guest_process(
            br#"{"args":["id"],"cwd":"/","user":{"uid":0,"gid":0},
                 "apparmorProfile":"localhost/k8s-apparmor-example-deny-write",
                 "selinuxLabel":"system_u:system_r:container_t:s0:c4,c5"}"#,
            "c1",
            Path::new("/r"),
            false,
        )
        .unwrap();
        assert!(p.get("apparmorProfile").is_none(), "{p}");
        assert!(p.get("selinuxLabel").is_none(), "{p}");
    }

    #[test]
    fn a_false_no_new_privileges_is_left_out() {
        let mut spec = base_spec();
        spec["process"]["noNewPrivileges"] = json!(false);
        let raw = serde_json::to_vec(&spec).unwrap();
        let spec = guest_spec(&raw, &ctx(Path::new("/r"), Some(7)))
            .unwrap()
            .json;
        assert!(spec["process"].get("noNewPrivileges").is_none(), "{spec}");
        let mut spec = base_spec();
        spec["process"]["noNewPrivileges"] = json!(true);
        let raw = serde_json::to_vec(&spec).unwrap();
        let spec = guest_spec(&raw, &ctx(Path::new("/r"), Some(7)))
            .unwrap()
            .json;
        assert_eq!(spec["process"]["noNewPrivileges"], json!(true));
        let p = guest_process(
            br#"{"args":["id"],"cwd":"/","user":{"uid":0,"gid":0},"noNewPrivileges":false}"#,
            "c1",
            Path::new("/r"),
            false,
        )
        .unwrap();
        assert!(p.get("noNewPrivileges").is_none(), "{p}");
    }

    #[test]
    fn joining_by_path_needs_a_sandbox() {
        let raw = serde_json::to_vec(&base_spec()).unwrap();
        let err = guest_spec(&raw, &ctx(Path::new("/r"), None)).unwrap_err();
        assert!(err.to_string().contains("ipc namespace"), "{err}");
    }

    #[test]
    fn malformed_specs_say_what_is_wrong() {
        let err = guest_spec(b"{not json", &ctx(Path::new("/r"), None)).unwrap_err();
        assert!(matches!(err, SpecError::NotJson { .. }), "{err}");
        let mut spec = base_spec();
        spec["process"]["args"] = json!("sh");
        let err = guest_spec(
            &serde_json::to_vec(&spec).unwrap(),
            &ctx(Path::new("/r"), Some(1)),
        )
        .unwrap_err();
        assert!(matches!(err, SpecError::Malformed { .. }), "{err}");
        let mut spec = base_spec();
        spec.as_object_mut().unwrap().remove("process");
        let err = guest_spec(
            &serde_json::to_vec(&spec).unwrap(),
            &ctx(Path::new("/r"), Some(1)),
        )
        .unwrap_err();
        assert!(err.to_string().contains("needs a process"), "{err}");
    }

    #[test]
    fn a_bind_mount_of_a_missing_source_is_refused() {
        let mut spec = base_spec();
        spec["mounts"] = json!([{"destination": "/etc/hosts", "type": "bind",
            "source": "/var/lib/containerd/nowhere/hosts", "options": ["rbind", "ro"]}]);
        let err = guest_spec(
            &serde_json::to_vec(&spec).unwrap(),
            &ctx(Path::new("/r"), Some(1)),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/etc/hosts"), "{err}");
        assert!(err.to_string().contains("CopyFile"), "{err}");
    }

    #[test]
    fn usernames_resolve_in_the_container_image() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nweb:x:33:34::/var/www:/bin/false\n",
        )
        .unwrap();
        let p = guest_process(
            br#"{"args":["id"],"cwd":"/","user":{"uid":0,"gid":0,"username":"web"}}"#,
            "c1",
            dir.path(),
            false,
        )
        .unwrap();
        assert_eq!(p["user"]["uid"], json!(33));
        assert_eq!(p["user"]["gid"], json!(34));
        let err = guest_process(
            br#"{"args":["id"],"cwd":"/","user":{"uid":0,"gid":0,"username":"ghost"}}"#,
            "c1",
            dir.path(),
            false,
        )
        .unwrap_err();
        assert!(err.to_string().contains("ghost"), "{err}");
        let err = guest_process(
            br#"{"args":[],"cwd":"/","user":{"uid":0,"gid":0}}"#,
            "c1",
            dir.path(),
            false,
        )
        .unwrap_err();
        assert!(err.to_string().contains("args"), "{err}");
    }

    #[test]
    fn etc_passwd_is_read_in_the_containers_root() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("etc")).unwrap();
        std::fs::create_dir_all(rootfs.join("usr/lib")).unwrap();
        std::fs::write(dir.path().join("passwd"), "web:x:1:1::/:/bin/sh\n").unwrap();
        std::fs::write(rootfs.join("usr/lib/passwd"), "web:x:33:34::/:/bin/sh\n").unwrap();
        let user = |rootfs: &Path| {
            guest_process(
                br#"{"args":["id"],"cwd":"/","user":{"uid":0,"gid":0,"username":"web"}}"#,
                "c1",
                rootfs,
                false,
            )
            .map(|p| p["user"]["uid"].clone())
        };
        // An absolute symlink means the image's own file, not the guest's.
        let guest_file = dir.path().join("passwd");
        std::os::unix::fs::symlink(&guest_file, rootfs.join("etc/passwd")).unwrap();
        assert!(user(&rootfs).is_err(), "read {}", guest_file.display());
        std::fs::remove_file(rootfs.join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("/../../usr/lib/passwd", rootfs.join("etc/passwd")).unwrap();
        assert_eq!(user(&rootfs).unwrap(), json!(33));
    }
}
