//! Container images for the agent tests, built on the host without mounting anything:
//! layer disks (ext4 by `mkfs.ext4 -d`, EROFS by `mkfs.erofs`) holding a minimal
//! busybox rootfs, a one-file layer to stack on it, an empty writable disk, and a
//! realistic OCI runtime spec (what `runc spec` writes, adjusted to the tests).
//!
//! Each disk gets a random serial (content-independent, at most 20 bytes): the host
//! sets it on the block slot, the agent finds the disk by it.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use peapod_vmm_api::BlockSet;
use serde_json::{json, Value};

/// Debian's busybox-static (a dynamic busybox would need a libc in the image).
pub const BUSYBOX: &str = "/bin/busybox";
/// What `cat /etc/peapod-layer` prints in a container with [`app_layer`] on top.
pub const APP_LAYER_FILE: &str = "etc/peapod-layer";
pub const APP_LAYER_CONTENT: &str = "top\n";
/// The virtio-blk serial is at most 20 bytes.
pub const MAX_SERIAL: usize = 20;
/// The `PATH` of [`oci_spec`]'s process.
pub const SPEC_PATH: &str = "PATH=/usr/sbin:/usr/bin:/sbin:/bin";
/// The hostname of [`oci_spec`].
pub const SPEC_HOSTNAME: &str = "peapod-test";

/// The applets the busybox layer links in /bin.
pub const APPLETS: &[&str] = &[
    "sh", "cat", "echo", "uname", "sleep", "id", "ls", "head", "hostname", "true", "false", "dd",
    "env", "pwd", "mkdir", "touch", "stat", "tty", "wc", "tr", "rm", "kill", "ps", "grep", "mknod",
];

/// A disk image for a block slot, and how the agent should mount it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskImage {
    pub path: PathBuf,
    /// The virtio-blk serial to give the slot.
    pub serial: String,
    /// "ext4" or "erofs", as the agent's `Disk.fstype` says.
    pub fstype: &'static str,
}

impl DiskImage {
    /// The VMM's `block.set` that puts this disk in `slot` (the VMM opens the path).
    pub fn block_set(&self, slot: u32, read_only: bool) -> BlockSet {
        BlockSet {
            slot,
            path: self.path.clone(),
            read_only,
            id: Some(self.serial.clone()),
            fd: false,
        }
    }

    /// The agent's `Disk` for this image.
    pub fn disk(&self) -> peapod_agent_protocol::Disk {
        let mut d = peapod_agent_protocol::Disk::new();
        d.serial = self.serial.clone();
        d.fstype = self.fstype.into();
        d
    }
}

/// A random serial, `pp` and 16 hex digits: unique per disk, unrelated to its content.
pub fn random_serial() -> String {
    let mut b = [0u8; 8];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("reading /dev/urandom");
    let s: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("pp{s}")
}

/// A fresh directory `dir/name` (emptied if it exists).
fn fresh_dir(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    if p.exists() {
        std::fs::remove_dir_all(&p).unwrap();
    }
    std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
    p
}

/// The minimal rootfs tree: /bin/busybox and its links, the mount points, /etc/passwd
/// and /etc/group.
fn busybox_tree(dir: &Path) -> PathBuf {
    let busybox = Path::new(BUSYBOX);
    assert!(
        busybox.exists(),
        "{BUSYBOX} is missing: install busybox-static (.ci/install-deps.sh does)"
    );
    let tree = fresh_dir(dir, "busybox-tree");
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "root"] {
        std::fs::create_dir(tree.join(d)).unwrap();
    }
    std::fs::copy(busybox, tree.join("bin/busybox")).expect("copying /bin/busybox");
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet)).unwrap();
    }
    std::fs::write(
        tree.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .unwrap();
    std::fs::write(tree.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    set_mode(&tree.join("tmp"), 0o1777);
    tree
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Bytes the tree takes in 4 KiB blocks, with a block per entry for its inode and
/// directory entry.
fn tree_bytes(path: &Path) -> u64 {
    let meta = std::fs::symlink_metadata(path).unwrap();
    let own = 4096 + meta.len().div_ceil(4096) * 4096;
    if meta.is_dir() {
        own + std::fs::read_dir(path)
            .unwrap()
            .map(|e| tree_bytes(&e.unwrap().path()))
            .sum::<u64>()
    } else {
        own
    }
}

fn run(cmd: &mut Command, what: &str, hint: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {what}: {e} ({hint})"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An ext4 image of `tree`, just big enough, without a journal (a layer is read-only).
fn ext4_of_tree(tree: &Path, img: &Path) -> DiskImage {
    let size = (tree_bytes(tree) + (1 << 20)).div_ceil(1 << 20) << 20;
    File::create(img).unwrap().set_len(size).unwrap();
    run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-O", "^has_journal", "-b", "4096", "-d"])
            .arg(tree)
            .arg(img),
        &format!("mkfs.ext4 -d {} {}", tree.display(), img.display()),
        "install e2fsprogs: .ci/install-deps.sh does",
    );
    DiskImage {
        path: img.into(),
        serial: random_serial(),
        fstype: "ext4",
    }
}

/// An ext4 layer with the busybox rootfs.
pub fn busybox_layer(dir: &Path) -> DiskImage {
    let tree = busybox_tree(dir);
    ext4_of_tree(&tree, &dir.join("busybox.ext4"))
}

/// Whether `mkfs.erofs` (erofs-utils) is installed.
pub fn have_mkfs_erofs() -> bool {
    Command::new("mkfs.erofs")
        .arg("--help")
        .output()
        .is_ok_and(|o| !o.stdout.is_empty() || !o.stderr.is_empty())
}

/// An EROFS layer with the busybox rootfs (uncompressed, all files root's); `None`
/// where erofs-utils is not installed.
pub fn busybox_layer_erofs(dir: &Path) -> Option<DiskImage> {
    if !have_mkfs_erofs() {
        return None;
    }
    let tree = busybox_tree(dir);
    let img = dir.join("busybox.erofs");
    let _ = std::fs::remove_file(&img);
    run(
        Command::new("mkfs.erofs")
            .args(["--quiet", "--all-root"])
            .arg(&img)
            .arg(&tree),
        &format!("mkfs.erofs {} {}", img.display(), tree.display()),
        "install erofs-utils",
    );
    // A block device holds whole sectors; EROFS images are whole blocks already, but
    // make sure.
    let len = std::fs::metadata(&img).unwrap().len();
    let padded = len.div_ceil(4096) * 4096;
    if padded != len {
        File::options()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(padded)
            .unwrap();
    }
    Some(DiskImage {
        path: img,
        serial: random_serial(),
        fstype: "erofs",
    })
}

/// The busybox layer as EROFS where erofs-utils is installed, else as ext4.
pub fn busybox_layer_any(dir: &Path) -> DiskImage {
    busybox_layer_erofs(dir).unwrap_or_else(|| busybox_layer(dir))
}

/// A one-file ext4 layer to stack on the busybox one: /etc/peapod-layer holding
/// [`APP_LAYER_CONTENT`].
pub fn app_layer(dir: &Path) -> DiskImage {
    let tree = fresh_dir(dir, "app-tree");
    std::fs::create_dir(tree.join("etc")).unwrap();
    std::fs::write(tree.join(APP_LAYER_FILE), APP_LAYER_CONTENT).unwrap();
    ext4_of_tree(&tree, &dir.join("app.ext4"))
}

/// An empty ext4 image of `size` bytes (sparse), for a container's writable layer.
pub fn upper_disk(dir: &Path, size: u64) -> DiskImage {
    let img = dir.join(format!("upper-{}.ext4", random_serial()));
    File::create(&img).unwrap().set_len(size).unwrap();
    run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096"])
            .arg(&img),
        &format!("mkfs.ext4 {}", img.display()),
        "install e2fsprogs: .ci/install-deps.sh does",
    );
    DiskImage {
        path: img,
        serial: random_serial(),
        fstype: "ext4",
    }
}

/// runc's default capabilities (`runc spec`).
pub const DEFAULT_CAPS: &[&str] = &["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"];

/// The device rules containerd's CRI gives a container that is not privileged: its
/// default spec's deny-all, then `oci.WithDefaultUnixDevices` (null, random, full,
/// tty, zero, urandom, console, ptys, ptmx, tun).
pub fn cri_device_rules() -> Value {
    let mut rules = vec![json!({ "allow": false, "access": "rwm" })];
    for (major, minor) in [(1, 3), (1, 8), (1, 7), (5, 0), (1, 5), (1, 9), (5, 1)] {
        rules.push(
            json!({ "allow": true, "type": "c", "major": major, "minor": minor, "access": "rwm" }),
        );
    }
    rules.push(json!({ "allow": true, "type": "c", "major": 136, "access": "rwm" }));
    rules.push(json!({ "allow": true, "type": "c", "major": 5, "minor": 2, "access": "rwm" }));
    rules.push(json!({ "allow": true, "type": "c", "major": 10, "minor": 200, "access": "rwm" }));
    Value::Array(rules)
}

/// An OCI runtime spec (config.json) like `runc spec` writes, running `args`: root
/// 0:0, runc's default capabilities, mounts, namespaces (network too: the agent drops
/// it), masked and read-only paths, and containerd's CRI device rules.
pub fn oci_spec(args: &[&str], terminal: bool) -> Value {
    let mut env = vec![SPEC_PATH];
    if terminal {
        env.push("TERM=xterm");
    }
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": { "uid": 0, "gid": 0 },
            "args": args,
            "env": env,
            "cwd": "/",
            "capabilities": {
                "bounding": DEFAULT_CAPS,
                "effective": DEFAULT_CAPS,
                "permitted": DEFAULT_CAPS,
            },
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }],
            "noNewPrivileges": true,
        },
        "root": { "path": "rootfs", "readonly": false },
        "hostname": SPEC_HOSTNAME,
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            {
                "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts", "type": "devpts", "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
            },
            {
                "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
            {
                "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {
                "destination": "/sys", "type": "sysfs", "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
            {
                "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
            },
        ],
        "linux": {
            "resources": {
                "devices": cri_device_rules(),
            },
            "namespaces": [
                { "type": "pid" },
                { "type": "network" },
                { "type": "ipc" },
                { "type": "uts" },
                { "type": "mount" },
            ],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
            ],
        },
    })
}

/// `spec` with a memory limit (`linux.resources.memory.limit`) of `bytes`.
pub fn with_memory_limit(mut spec: Value, bytes: u64) -> Value {
    spec["linux"]["resources"]["memory"] = json!({ "limit": bytes });
    spec
}

/// `spec` with `profile` as its `linux.seccomp`.
pub fn with_seccomp(mut spec: Value, profile: Value) -> Value {
    spec["linux"]["seccomp"] = profile;
    spec
}

/// `spec` with the labels containerd's CRI puts on a non-privileged container on an
/// AppArmor node (`process.apparmorProfile`, its default profile) and on an SELinux
/// node (`process.selinuxLabel`, `linux.mountLabel`).
pub fn with_lsm_labels(mut spec: Value) -> Value {
    spec["process"]["apparmorProfile"] = json!("cri-containerd.apparmor.d");
    spec["process"]["selinuxLabel"] = json!("system_u:system_r:container_t:s0:c12,c345");
    spec["linux"]["mountLabel"] = json!("system_u:object_r:container_file_t:s0:c12,c345");
    spec
}

/// `spec` without `process.noNewPrivileges`, as containerd's CRI sends it unless
/// the pod sets `allowPrivilegeEscalation: false`.
pub fn without_no_new_privs(mut spec: Value) -> Value {
    if let Some(p) = spec["process"].as_object_mut() {
        p.remove("noNewPrivileges");
    }
    spec
}

/// The `process` object of [`oci_spec`], for `ExecProcess`.
pub fn oci_process(args: &[&str], terminal: bool) -> Value {
    oci_spec(args, terminal)["process"].take()
}

/// JSON bytes, as the agent's `oci_spec` and `oci_process` fields take them.
pub fn to_bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("serialising JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_ext4(img: &Path) -> bool {
        // The ext2/3/4 magic, 0xEF53, at byte 1080 (superblock at 1024, offset 56).
        let data = std::fs::read(img).unwrap();
        data.len() > 1082 && data[1080..1082] == [0x53, 0xef]
    }

    #[test]
    fn serials_are_random_and_fit() {
        let (a, b) = (random_serial(), random_serial());
        assert_ne!(a, b);
        assert!(a.len() <= MAX_SERIAL, "{a}");
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()), "{a}");
    }

    #[test]
    fn busybox_layer_is_an_ext4_image_just_big_enough() {
        let dir = tempfile::tempdir().unwrap();
        let img = busybox_layer(dir.path());
        assert_eq!(img.fstype, "ext4");
        assert!(is_ext4(&img.path), "{} is not ext4", img.path.display());
        let len = std::fs::metadata(&img.path).unwrap().len();
        let busybox = std::fs::metadata(BUSYBOX).unwrap().len();
        assert!(
            len > busybox && len < busybox + (4 << 20),
            "{len} bytes for a {busybox}-byte busybox"
        );
        assert_eq!(len % 512, 0);
        let tree = dir.path().join("busybox-tree");
        assert_eq!(
            std::fs::read_link(tree.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        let passwd = std::fs::read_to_string(tree.join("etc/passwd")).unwrap();
        assert!(passwd.starts_with("root:x:0:0:"), "{passwd}");
        assert!(passwd.contains("nobody:x:65534:65534:"), "{passwd}");
    }

    #[test]
    fn erofs_layer_where_erofs_utils_is_installed() {
        let dir = tempfile::tempdir().unwrap();
        let Some(img) = busybox_layer_erofs(dir.path()) else {
            assert!(!have_mkfs_erofs());
            return;
        };
        assert_eq!(img.fstype, "erofs");
        let data = std::fs::read(&img.path).unwrap();
        // EROFS_SUPER_MAGIC_V1, 0xE0F5E1E2 little-endian, at byte 1024.
        assert_eq!(data[1024..1028], [0xe2, 0xe1, 0xf5, 0xe0]);
        assert!(data.len() as u64 > std::fs::metadata(BUSYBOX).unwrap().len());
        assert_eq!(data.len() % 4096, 0);
    }

    #[test]
    fn app_layer_and_upper_disk() {
        let dir = tempfile::tempdir().unwrap();
        let app = app_layer(dir.path());
        assert!(is_ext4(&app.path));
        assert!(std::fs::metadata(&app.path).unwrap().len() <= 2 << 20);
        let upper = upper_disk(dir.path(), 64 << 20);
        assert!(is_ext4(&upper.path));
        assert_eq!(std::fs::metadata(&upper.path).unwrap().len(), 64 << 20);
        assert_ne!(app.serial, upper.serial);
        let body = serde_json::to_value(upper.block_set(3, false)).unwrap();
        assert_eq!(body["slot"], 3);
        assert_eq!(body["id"], upper.serial.as_str());
        assert_eq!(body["read_only"], false);
        assert_eq!(body["path"], upper.path.to_str().unwrap());
    }

    #[test]
    fn spec_has_what_runc_spec_writes() {
        let spec = oci_spec(&["sh", "-c", "echo hi"], false);
        let text = String::from_utf8(to_bytes(&spec)).unwrap();
        let spec: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(spec["ociVersion"], "1.0.2");
        let p = &spec["process"];
        assert_eq!(p["args"], json!(["sh", "-c", "echo hi"]));
        assert_eq!(p["terminal"], false);
        assert_eq!(p["user"], json!({ "uid": 0, "gid": 0 }));
        assert_eq!(p["env"], json!([SPEC_PATH]));
        assert_eq!(p["cwd"], "/");
        assert_eq!(p["noNewPrivileges"], true);
        assert_eq!(p["capabilities"]["bounding"], json!(DEFAULT_CAPS));
        assert_eq!(p["rlimits"][0]["type"], "RLIMIT_NOFILE");
        assert_eq!(spec["root"], json!({ "path": "rootfs", "readonly": false }));
        assert_eq!(spec["hostname"], SPEC_HOSTNAME);
        let mounts: Vec<&str> = spec["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        assert_eq!(
            mounts,
            [
                "/proc",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/dev/mqueue",
                "/sys",
                "/sys/fs/cgroup"
            ]
        );
        let ns: Vec<&str> = spec["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(ns, ["pid", "network", "ipc", "uts", "mount"]);
        assert!(spec["linux"]["maskedPaths"]
            .as_array()
            .unwrap()
            .contains(&json!("/proc/kcore")));
        assert!(spec["linux"]["readonlyPaths"]
            .as_array()
            .unwrap()
            .contains(&json!("/proc/sys")));
        assert!(spec["linux"]["resources"].get("memory").is_none());

        let tty = oci_spec(&["sh"], true);
        assert_eq!(tty["process"]["terminal"], true);
        assert!(tty["process"]["env"]
            .as_array()
            .unwrap()
            .contains(&json!("TERM=xterm")));
    }

    #[test]
    fn memory_limit_and_process_helpers() {
        let spec = with_memory_limit(oci_spec(&["true"], false), 32 << 20);
        assert_eq!(spec["linux"]["resources"]["memory"]["limit"], 32 << 20);
        assert_eq!(
            spec["linux"]["resources"]["devices"][0]["allow"], false,
            "the limit keeps the other resources"
        );
        let p = oci_process(&["sh", "-c", "cat"], true);
        assert_eq!(p["args"], json!(["sh", "-c", "cat"]));
        assert_eq!(p["terminal"], true);
        assert!(p.get("ociVersion").is_none());
    }
}
